"""What the HTTP integrations cache, and how a request's headers steer it.

One :class:`CachePolicy` is shared by the ASGI middleware and the httpx/httpx2 transports:
which routes are cached with which adapter, how the tenant scope is derived, and how the
request controls (``Cache-Control``, ``x-sse-cache-*``) are read. It is sans-IO: it turns a
method, a path, headers and a body into a :class:`Decision`.
"""

from __future__ import annotations

import logging
import math
import random
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from .._checks import (
    MAX_TTL,
    MAX_TTL_SHOWN,
    POSITIVE_BYTES,
    header_names,
    integer,
    mapping,
    text,
)
from .._logging import (
    RateLimitedLog,
    redact_query_key,
    redact_url,
    redact_userinfo,
    unreadable_url,
)
from ..adapters import AnthropicMessages, GeminiGenerateContent, OpenAIChat, OpenAIResponses
from ..errors import ConfigError
from ..keys import CREDENTIAL_HEADERS, SHARED_TENANT, lowered_tenant_scope
from ..pacing import Pacing
from ..protocols import KeyHeadersAdapter, ScreeningAdapter, StreamAdapter

__all__ = [
    "DEFAULT_ROUTES",
    "MAX_TTL",
    "SHARED_TENANT",
    "CachePolicy",
    "Controls",
    "Decision",
    "parse_controls",
]

#: Route suffixes cached by default. Gateways mount the provider APIs under prefixes
#: (``/openai/v1/responses``, ``/v1/...``): a route matches every path that ends with it.
#: ``{name}`` in a route stands for one path segment (Gemini's model: ``/v1beta/models/...``,
#: ``/v1/models/...`` and Vertex AI's ``/v1/projects/p/locations/l/publishers/google/models/...``).
DEFAULT_ROUTES: Mapping[str, Callable[[], StreamAdapter]] = {
    "/v1/responses": OpenAIResponses,
    "/v1/chat/completions": OpenAIChat,
    "/v1/messages": AnthropicMessages,
    "/models/{model}:generateContent": GeminiGenerateContent,
    "/models/{model}:streamGenerateContent": GeminiGenerateContent,
}


logger = logging.getLogger("sse_cache")
# A tenant callable that returns a wrong type does so for every request: one line per 10 s.
_bad_tenant_warnings = RateLimitedLog(logger)


_MAX_VARIANTS = 64
_NAMESPACE = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")
_FIELD = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_json_decode = msgspec.json.Decoder().decode
#: Request bodies nested deeper than this are not keyed (forwarded uncached, ``bypass``): real
#: requests (tool JSON schemas included) stay far below it, and canonicalising a body is
#: recursive.
MAX_BODY_DEPTH = 64
#: Request bodies with more objects and arrays than this are not keyed either: checking,
#: keying and canonicalising a body walk every one of them in Python, on the event loop
#: (~1 µs each), and a 4 MiB body of empty objects held it for a second (helper-83). Real
#: requests hold far fewer (a long conversation: a few per message). Counted by their
#: opening brackets, in C, before the body is decoded (brackets in strings count too).
MAX_BODY_CONTAINERS = 100_000

#: Request headers that change the answer on every route, beside each adapter's own key
#: headers: an AI gateway's choice of provider and of its configuration (Portkey's), which
#: its clients send with one credential for all of them (helper-88).
GATEWAY_KEY_HEADERS = (
    "x-portkey-provider",
    "x-portkey-config",
    "x-portkey-custom-host",
    "x-litellm-tags",  # (LiteLLM's tag-based routing picks the deployment: helper-147)
    # Helicone's choice of provider or resource, with one Helicone-Auth for all of them
    # (provider keys kept in its vault; helper-169).
    "helicone-target-url",
    "helicone-openai-api-base",
    "helicone-target-provider",
)

#: Headers an integration removes before forwarding a request upstream (our controls).
CONTROL_HEADER_PREFIX = "x-sse-cache-"

#: The query parameter that carries an API key (Gemini's ``?key=``): a credential, so it is
#: part of the tenant scope and never of a key, a route or a log line.
QUERY_CREDENTIAL = "key"
# The name the query credential has among the credentials when it cannot count as the
# x-goog-api-key header ("?" is not a header-name character: no real header is called so).
_QUERY_CREDENTIAL_NAME = "?key"
_GOOG_API_KEY = "x-goog-api-key"
_ROUTE_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class Controls(msgspec.Struct, frozen=True, kw_only=True):
    """The request controls, read from headers by :func:`parse_controls`."""

    lookup: bool = True
    """False for ``Cache-Control: no-cache``: answer from upstream (still stored)."""
    store: bool = True
    """False for ``Cache-Control: no-store``: never store this answer."""
    refresh: bool = False
    """``x-sse-cache-refresh``: replace the stored answer with a fresh one."""
    ttl: float | None = None
    """``x-sse-cache-ttl: <seconds>``: lifetime of the entry this request stores (at most
    :data:`MAX_TTL`)."""
    max_age: float | None = None
    """``x-sse-cache-max-age: <seconds>``: accept only entries younger than this (at most
    :data:`MAX_TTL`)."""
    namespace: str = ""
    """``x-sse-cache-namespace: <name>``: a separate partition of the cache."""
    variants: int = 1
    """``x-sse-cache-variants: N``: keep up to N different answers and serve one at random."""
    ignore_fields: frozenset[str] = frozenset()
    """``x-sse-cache-ignore-fields: a,b``: request fields left out of the key."""
    pacing: Pacing | None = None
    """``x-sse-cache-replay: instant | original | <x>x | <ms>ms``: replay speed of a hit."""


_SHOWN_CHARS = 80


def _shown(value: str, *, quote: bool = True) -> str:
    # A bad header's value in its error, cut short: a 100 KB header is not echoed back.
    short = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS]
    text = repr(short) if quote else short
    return text if short is value else f"{text}... ({len(value)} characters)"


def _seconds(name: str, value: str, *, zero: bool = False) -> float:
    """``value`` as a number of seconds > 0 (>= 0 with ``zero``), else a
    :class:`ConfigError` naming ``name`` and what it must be."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds >= 0 if zero else seconds > 0):  # (NaN too)
        what = "a non-negative" if zero else "a positive"
        raise ConfigError(f"{name} must be {what} number of seconds, got {_shown(value)}")
    return seconds


#: The slowest replay a request may ask for (``x-sse-cache-replay``): a fixed gap of at most
#: a second between events, or a tenth of the recorded speed.
MAX_REPLAY_GAP = 1.0
MIN_REPLAY_FACTOR = 0.1


def _lifetime(name: str, value: str) -> float:
    """:func:`_seconds`, at most :data:`MAX_TTL`: an entry's lifetime (echoed on every hit
    as ``x-sse-cache-ttl``; a "1e308 seconds" lifetime is a mistake, not an intention)."""
    seconds = _seconds(name, value)
    if seconds > MAX_TTL:  # (inf too)
        raise ConfigError(
            f"{name} must be at most {MAX_TTL} seconds ({MAX_TTL_SHOWN}), got {_shown(value)}"
        )
    return seconds


def parse_controls(headers: Mapping[str, str]) -> Controls:
    """Read the request controls from ``headers`` (lower-case names). Raises
    :class:`ConfigError` naming the header whose value is invalid."""
    options: dict[str, Any] = {}
    cache_control = headers.get("cache-control", "")
    if cache_control:
        for directive in cache_control.split(","):
            name, _, argument = directive.partition("=")
            name = name.strip().lower()
            if name == "no-cache":
                options["lookup"] = False
            elif name == "no-store":
                options["store"] = False
            elif name == "max-age":
                # RFC 9111 §5.2.1.1: no answer older than this. (A value that is not
                # delta-seconds is read as 0: the client asked for something fresh.)
                digits = argument.strip().strip('"')
                fresh = float(digits) if digits.isascii() and digits.isdigit() else 0.0
                options["max_age"] = min(options.get("max_age", math.inf), fresh)
    elif "no-cache" in headers.get("pragma", "").lower():
        # HTTP/1.0's, read where no Cache-Control is (RFC 9111 §5.4): what browsers' fetch()
        # sends with cache: "no-cache" beside it, and old clients alone.
        options["lookup"] = False
    if (value := headers.get("x-sse-cache-refresh")) is not None:
        if value.strip().lower() in ("", "1", "true", "yes", "on"):
            options["refresh"] = True
        elif value.strip().lower() not in ("0", "false", "no", "off"):
            raise ConfigError(f"x-sse-cache-refresh must be true or false, got {_shown(value)}")
    if (value := headers.get("x-sse-cache-ttl")) is not None:
        options["ttl"] = _lifetime("x-sse-cache-ttl", value)
    if (value := headers.get("x-sse-cache-max-age")) is not None:
        # (No upper bound: any age, ``inf`` included, accepts every entry; an entry
        # stored without a TTL may be older than a year.)
        seconds = _seconds("x-sse-cache-max-age", value, zero=True)
        options["max_age"] = min(options.get("max_age", math.inf), seconds)  # (and max-age)
    if (value := headers.get("x-sse-cache-namespace")) is not None:
        if not _NAMESPACE.match(value):
            raise ConfigError(
                "x-sse-cache-namespace must be 1-128 characters of letters, digits and "
                f"._:/@+=-, got {_shown(value)}"
            )
        options["namespace"] = value
    if (value := headers.get("x-sse-cache-variants")) is not None:
        # isascii(): str.isdigit() also takes digits int() refuses (superscripts, in Latin-1).
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= _MAX_VARIANTS:
            raise ConfigError(
                f"x-sse-cache-variants must be an integer from 1 to {_MAX_VARIANTS}, "
                f"got {_shown(value)}"
            )
        options["variants"] = int(digits)
    if (value := headers.get("x-sse-cache-ignore-fields")) is not None:
        fields = frozenset(f.strip() for f in value.split(",") if f.strip())
        bad = sorted(f for f in fields if not _FIELD.match(f))
        if bad:
            raise ConfigError(
                f"x-sse-cache-ignore-fields has invalid field names: {_shown(', '.join(bad))}"
            )
        options["ignore_fields"] = fields
    if (value := headers.get("x-sse-cache-replay")) is not None:
        try:
            pacing = Pacing.parse(value)
        except ConfigError as exc:
            raise ConfigError(f"x-sse-cache-replay: {_shown(str(exc), quote=False)}") from None
        # A client's pacing is bounded: 99999999ms held a replay (and its connection, its
        # place under --limit-concurrency) open for days (helper-156).
        if pacing.mode == "fixed" and pacing.gap > MAX_REPLAY_GAP:
            raise ConfigError(
                f"x-sse-cache-replay: a fixed gap is at most {MAX_REPLAY_GAP * 1000:g}ms, "
                f"got {_shown(value)}"
            )
        if pacing.mode == "original" and pacing.factor < MIN_REPLAY_FACTOR:
            raise ConfigError(
                f"x-sse-cache-replay: a speed factor is at least {MIN_REPLAY_FACTOR:g}x, "
                f"got {_shown(value)}"
            )
        options["pacing"] = pacing
    return Controls(**options)


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What to do with one request. ``adapter`` is None when the request is not cacheable
    (then ``reason`` says why and the request passes through, marked ``bypass``)."""

    adapter: StreamAdapter | None = None
    route: str = ""
    streaming: bool = False
    body: Mapping[str, Any] | None = None
    tenant: str = ""
    key_headers: Mapping[str, str] = {}
    last_event_id: str | None = None
    """``Last-Event-ID`` of a reconnecting client: a hit replays only what came after it."""
    controls: Controls = Controls()
    reason: str = ""
    origin: str = ""
    """The server that answers the request, as its key holds it (:meth:`CachePolicy.decide`)."""

    @property
    def cacheable(self) -> bool:
        return self.adapter is not None


# How many request paths CachePolicy.match remembers (then it starts afresh).
_MATCHED_PATHS = 1024


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether the decoded JSON ``value`` nests arrays/objects more than ``limit`` deep (an
    explicit stack over its containers: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _clean_path(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/") or "/"


def _as_sent(query: str) -> str:
    """``query`` as its bytes, in Latin-1: given decoded (the HTTP integrations pass the raw
    query, Latin-1), its characters as their UTF-8 bytes, as a client sends them."""
    if not query.isascii() and max(query) > "\xff":
        return query.encode("utf-8", "surrogateescape").decode("latin-1")
    return query


def _split_query(query: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The query's parameters without the credential, and the credential values: decoded
    byte for byte (Latin-1), as a server may read them — as UTF-8, every invalid escape was
    one U+FFFD, and ``x=%ff`` shared an entry with ``x=%fe`` (helper-80)."""
    if not query:
        return [], []
    query = _as_sent(query)
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, encoding="latin-1")
    keys = [v for k, v in pairs if k == QUERY_CREDENTIAL]
    return [(k, v) for k, v in pairs if k != QUERY_CREDENTIAL], keys


# What a server may read otherwise than this cache decodes it: a ``;`` (a separator to
# some), a ``+`` (a space to form decoding, itself to RFC 3986's), an escape that is none.
_AMBIGUOUS_QUERY = re.compile(r"[;+]|%(?![0-9A-Fa-f]{2})")


def _query_as_sent(query: str, params: Iterable[tuple[str, str]]) -> str:
    """The query's parameters as sent — those of ``params``, the ones keyed (the credential
    and what an adapter's route drops, Gemini's ``alt``, left out), ordered by name as
    :func:`_route_of` orders them — when one of them reads otherwise to some server
    (:data:`_AMBIGUOUS_QUERY`), else ``""``. Decoded alone, two queries a server reads apart
    keyed alike: ``a=1;b=2`` and ``a=1%3Bb=2`` (a server that splits at ``;``), ``b+c`` and
    ``b%20c`` (one that reads ``+`` as itself), ``%zz`` and ``%25zz`` (one that refuses a bad
    escape); helper-157."""
    if _AMBIGUOUS_QUERY.search(query) is None:  # (nearly every query)
        return ""
    query = _as_sent(query)  # (as _split_query read it: a name above U+00FF was lost)
    names = {name for name, _ in params}
    kept = [
        piece
        for piece in query.split("&")
        if piece and urllib.parse.unquote_plus(piece.partition("=")[0], "latin-1") in names
    ]
    if not any(_AMBIGUOUS_QUERY.search(piece) for piece in kept):  # (only the key was)
        return ""
    return "&".join(sorted(kept, key=_raw_name_of))


def _raw_name_of(piece: str) -> str:
    return piece.partition("=")[0]


def _route_of(method: str, path: str, params: Iterable[tuple[str, str]], origin: str = "") -> str:
    # The order of names never changes an answer; values (e.g. Azure's api-version) may, and
    # so may the order of one name's values (a server reads the first or the last): sorted
    # by name alone, which keeps that order. Escaped as the bytes they were (_split_query).
    pairs = sorted(params, key=_name_of)
    if not pairs:
        return f"{method.upper()} {origin}{path}"
    return f"{method.upper()} {origin}{path}?{urllib.parse.urlencode(pairs, encoding='latin-1')}"


def _name_of(pair: tuple[str, str]) -> str:
    return pair[0]


def path_as_sent(raw_path: bytes | None, path: str) -> str:
    """The path a request is matched and keyed by, from its path as sent (``raw_path``; a
    query after it is dropped) and decoded (``path``): as sent when it holds escapes, since
    ``/v1/chat%2Fcompletions`` or ``/v1/chat/completions%3Fx`` decode to the path of another
    request but reach the server as they are; else the decoded path, which is the same."""
    if raw_path is None or b"%" not in raw_path:
        return path
    return raw_path.split(b"?", 1)[0].decode("latin-1")


_BAD_HOST = re.compile(r'[<>"{}|\\^`]')
_WHITESPACE = re.compile(r"\s")


def origin_of(url: str, name: str = "origin") -> str:
    """The part of ``url`` that names the server answering a route, as keys hold it:
    ``scheme://host[:port][/base]``, the scheme and host lower-cased, a default port and a
    trailing slash left out; never its credentials (``user:password@``), query or
    fragment. ``""`` for ``""``. A URL that is not one raises
    :class:`~sse_cache.errors.ConfigError` naming ``name`` and the URL without its password."""
    if not url:
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        why = unreadable_url(exc)
        raise ConfigError(f"{name} is not a valid URL ({why}): {_url_shown(url)!r}") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise ConfigError(f"{name} must be an http(s):// URL with a host, got {_url_shown(url)!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name} {_url_shown(url)!r} has a bad port") from None
    if port == 0:  # (no server answers on port 0: the URL was mistyped)
        raise ConfigError(f"{name} {_url_shown(url)!r} has a bad port (0)")
    if _BAD_HOST.search(host) or _WHITESPACE.search(url):
        # (urlsplit drops tabs and newlines, and takes "h h" for a host name)
        raise ConfigError(f"{name} {_url_shown(url)!r} has a bad host name or whitespace")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host += f":{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"


def base_url_of(url: str, name: str = "upstream") -> str:
    """``url`` checked to be a base URL the request's path and query can be appended to (a
    proxy's upstream): an http(s):// URL with a host (see :func:`origin_of`) and no query
    or fragment, which would end up before the appended path. Returned with its scheme
    lower-cased (``HTTPS://`` is ``https://``) and no trailing slash; its credentials are
    kept (they are the upstream's to read), never shown in an error."""
    if not isinstance(url, str):
        raise ConfigError(f"{name} must be an http(s):// URL, got {type(url).__name__}")
    origin_of(url, name)
    if "?" in url or "#" in url:  # (even an empty one: ``http://h?`` + ``/v1/x``)
        raise ConfigError(
            f"{name} must be a base URL without a query (?...) or fragment (#...): the "
            f"request's path would be appended after them; got {_url_shown(url)!r}"
        )
    scheme, rest = url.split(":", 1)
    return f"{scheme.lower()}:{rest.rstrip('/')}"


def _url_shown(url: str) -> str:
    """``url`` fit for an error message: its user info and its credential-looking query
    values (``key=``, ``token=``...) as ``***``."""
    url = redact_userinfo(url)
    redacted = redact_url(url)
    # An unparsable URL: redact_url cannot read its query; the ``key=`` values at least go.
    return redact_query_key(url) if redacted == "<unparsable URL>" else redacted


def _with_query_key(
    headers: Mapping[str, str], keys: list[str], credentials: tuple[str, ...]
) -> Mapping[str, str]:
    """``headers`` with a ``?key=`` credential among them: as the ``x-goog-api-key`` header it
    stands for (the same key, the same tenant) unless the request has another value there."""
    if not keys:
        return headers
    value = ", ".join(keys)  # several: all of them count, as for a repeated header
    out = dict(headers)
    if _GOOG_API_KEY in credentials and out.get(_GOOG_API_KEY, value) == value:
        out[_GOOG_API_KEY] = value
    else:
        out[_QUERY_CREDENTIAL_NAME] = value
    return out


def _route_matcher(route: str) -> Callable[[str], bool]:
    """Whether a path is ``route`` or ends with it; ``{name}`` matches one path segment (or
    the part of one before a ``:``, as in ``/models/{model}:generateContent``)."""
    if "{" not in route:
        return lambda path: path == route or path.endswith(route)
    pieces = _ROUTE_PARAM.split(route)
    if any("{" in p or "}" in p for p in pieces):
        raise ConfigError(f"route {route!r}: write a path parameter as {{name}}")
    pattern = re.compile(".*" + "[^/:]+".join(re.escape(p) for p in pieces) + "$", re.S)
    return lambda path: pattern.fullmatch(path) is not None


class _NoScope(Exception):
    """The tenant callable returned something other than a string or None (logged)."""


def check_tenant(tenant: object) -> None:
    """Check the ``tenant`` option: None, :data:`SHARED_TENANT` or a callable (anything else
    is a :class:`ConfigError` naming it, at construction, not a failure of every request)."""
    if tenant is None or (isinstance(tenant, str) and tenant == SHARED_TENANT):
        return
    if isinstance(tenant, str) or not callable(tenant):
        raise ConfigError(f"tenant must be None, a callable or {SHARED_TENANT!r}, got {tenant!r}")


class CachePolicy:
    """Routes, tenant scope and limits for the HTTP integrations.

    ``routes``: path (or path suffix) → adapter, or a factory of one; default
    :data:`DEFAULT_ROUTES`. A path matches a route when it equals it or ends with it, so
    ``/openai/v1/responses`` and Azure-style ``/openai/deployments/x/chat/completions``
    (add the route ``/chat/completions``) are easy to cover; ``{name}`` in a route matches
    one path segment (``/models/{model}:generateContent``). Only ``POST`` is cached. Routes
    given the same adapter class or factory share one adapter (and so one cache).

    ``tenant``: how the tenant scope is derived — None (default) hashes the credentials the
    request carries (``credential_headers``: ``Authorization``, ``x-api-key``, ``api-key``,
    ``x-goog-api-key``, AI gateways' own...; and any header whose name ends like one:
    :data:`~sse_cache.keys.CREDENTIAL_SUFFIXES`; a request without one is not cached: its
    caller cannot be told apart), a callable
    receives the lower-cased request headers and returns a scope string, and
    :data:`SHARED_TENANT` lets all callers share entries (explicit opt-in). A ``key`` query
    parameter (Gemini's ``?key=``) is a credential too: it counts as the ``x-goog-api-key``
    header (also for a callable), and is removed from the route in the key and in logs.
    Credentials themselves are never stored.

    ``key_headers``: request headers that key the answer on every route, beside each
    adapter's own (:data:`GATEWAY_KEY_HEADERS` by default: a gateway's choice of provider).

    ``max_body_bytes``: larger request bodies pass through uncached (``bypass``).
    """

    def __init__(
        self,
        routes: Mapping[str, StreamAdapter | Callable[[], StreamAdapter]] | None = None,
        *,
        tenant: str | Callable[[Mapping[str, str]], str | None] | None = None,
        credential_headers: Iterable[str] = CREDENTIAL_HEADERS,
        key_headers: Iterable[str] = GATEWAY_KEY_HEADERS,
        max_body_bytes: int = 4 * 1024 * 1024,
        origin: str = "",
    ) -> None:
        table = DEFAULT_ROUTES if routes is None else routes
        mapping("routes", table, what="a mapping of path to adapter")
        text("origin", origin)
        check_tenant(tenant)
        max_body_bytes = integer("max_body_bytes", max_body_bytes, what=POSITIVE_BYTES)
        #: The server the routes are answered by (see :func:`origin_of`), in every key.
        self.origin = origin_of(origin)
        self.routes: dict[str, StreamAdapter] = {}
        made_by: dict[int, StreamAdapter] = {}  # one adapter per class or factory
        for path, adapter in table.items():
            if not path.startswith("/"):
                raise ConfigError(f"route {path!r} must start with '/'")
            made: Any = made_by.get(id(adapter))
            if made is None:
                # A class or factory is called; an adapter instance is used as it is. (A
                # class must be checked first: it has every attribute the protocol asks for.)
                made = adapter() if isinstance(adapter, type) else adapter
                if not isinstance(made, StreamAdapter) and callable(made):
                    made = made()
                if not isinstance(made, StreamAdapter):
                    raise ConfigError(f"route {path!r}: {adapter!r} is not a StreamAdapter")
                made_by[id(adapter)] = made
            self.routes[path.rstrip("/") or "/"] = made
        # Longest route first: the most specific suffix wins.
        self._ordered = [
            (route, _route_matcher(route), adapter)
            for route, adapter in sorted(self.routes.items(), key=lambda kv: -len(kv[0]))
        ]
        self._matched: dict[str, tuple[str, StreamAdapter] | None] = {}
        # Each adapter's key headers, read once: a runtime protocol check on every request
        # cost more than the rest of deciding it.
        # (With the headers that key every route's answers.)
        everywhere = header_names("key_headers", key_headers)
        self._key_headers = {
            id(adapter): tuple(
                dict.fromkeys(
                    (
                        *(adapter.key_headers if isinstance(adapter, KeyHeadersAdapter) else ()),
                        *everywhere,
                    )
                )
            )
            for adapter in self.routes.values()
        }
        # ... and what says which requests it passes through uncached, if anything does.
        self._screens = {
            id(adapter): adapter.uncached_reason if isinstance(adapter, ScreeningAdapter) else None
            for adapter in self.routes.values()
        }
        self._tenant = tenant
        self._credentials = header_names("credential_headers", credential_headers)
        self.max_body_bytes = max_body_bytes

    def match(self, method: str, path: str) -> tuple[str, StreamAdapter] | None:
        """The route and adapter for a request, or None when it is not a cached route."""
        if method != "POST" and method.upper() != "POST":
            return None
        # Remembered by path: a request is matched by the middleware, the proxy's access log
        # and decide(), and the routes are fixed. Bounded, as clients choose the paths.
        try:
            return self._matched[path]
        except KeyError:
            pass
        clean = _clean_path(path)
        found = next(((r, a) for r, matches, a in self._ordered if matches(clean)), None)
        if len(self._matched) >= _MATCHED_PATHS:
            self._matched.clear()
        self._matched[path] = found
        return found

    def key_headers_of(self, adapter: StreamAdapter, headers: Mapping[str, str]) -> dict[str, str]:
        """The request headers that key ``adapter``'s answers, as a decision holds them
        (names lower-cased; those ``headers`` carry)."""
        return self._key_headers_in(adapter, {n.lower(): v for n, v in headers.items()})

    def _key_headers_in(self, adapter: StreamAdapter, lowered: Mapping[str, str]) -> dict[str, str]:
        return {name: lowered[name] for name in self._key_headers[id(adapter)] if name in lowered}

    def tenant_of(self, headers: Mapping[str, str], query: str = "") -> str | None:
        """The tenant scope of a request; None when the scope cannot tell who is asking (by
        default: no credential header, no ``key`` query parameter; a callable: it returned
        None or ``""``, or something other than a string, which is logged as a warning):
        such requests are not cached, since their callers could not be kept
        apart (opt in with ``tenant="shared"``). Header names in any case."""
        lowered = {name.lower(): value for name, value in headers.items()}
        try:
            return self._tenant_of(lowered, _split_query(query)[1])
        except _NoScope:  # (logged)
            return None

    def _tenant_of(self, headers: Mapping[str, str], keys: list[str]) -> str | None:
        headers = _with_query_key(headers, keys, self._credentials)
        if self._tenant is None:
            credentials = (
                (*self._credentials, _QUERY_CREDENTIAL_NAME) if keys else self._credentials
            )
            return lowered_tenant_scope(headers, credentials) or None
        if self._tenant == SHARED_TENANT:
            return ""
        assert callable(self._tenant)  # (check_tenant: a str is SHARED_TENANT)
        scope = self._tenant(headers)
        if scope is None or scope == "":
            # The callable cannot tell who is asking either: scoping all such requests as
            # one ("c:") would share their answers between every such caller.
            return None
        if not isinstance(scope, str):
            # The server's own callable is wrong, not the request: logged, and the request
            # is forwarded uncached (never answered 400, which would blame the client).
            why = (
                f"the tenant callable {self._tenant!r} returned "
                f"{_shown(repr(scope), quote=False)}, not a string or None"
            )
            _bad_tenant_warnings.warning(self, "tenant", "sse_cache: %s: not cached", why)
            raise _NoScope(why)
        return "c:" + scope  # never equal to a credential hash ("t:...") or the shared scope

    def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        query: str = "",
        origin: str | None = None,
    ) -> Decision:
        """Decide for one request. ``headers`` must have lower-case names. ``body`` is the
        complete request body, or None when it was larger than :attr:`max_body_bytes`.
        Raises :class:`ConfigError` for an invalid control header (answer 400).

        The request's own path and query (not just the route it matched) are part of its
        key: two Azure deployments, or two prefixes in front of different upstreams, never
        share an entry even when the bodies are equal. The ``key`` query parameter is not
        (it is a credential: see ``tenant``). The server that answers the request is:
        ``origin`` (``scheme://host[:port]``, as :func:`origin_of` writes it; an HTTP
        client's transport passes each request's own), else the policy's :attr:`origin`
        (the proxy's upstream), so that two servers never share an entry. An adapter with
        an ``http_route(path, params)`` method (Gemini: the path says whether a request
        streams) rewrites the path and parameters in the key, says whether the request
        streams, and may pass it through uncached (a non-empty ``reason``)."""
        matched = self.match(method, path)
        if matched is None:
            return Decision(reason="not a cached route")
        _, adapter = matched
        where = self.origin if origin is None else origin
        clean = _clean_path(path)
        # Matched without its trailing slashes, keyed with them: the upstream may answer
        # /v1/chat/completions/ otherwise (a 404, say).
        slashes = ""
        if clean != "/" and path.endswith("/"):  # (seldom)
            slashes = path.partition("?")[0][len(clean) :]
        params, keys = _split_query(query)
        streaming: bool | None = None
        why = ""
        http_route = getattr(adapter, "http_route", None)
        if http_route is not None:
            keyed, keyed_params, streaming, why = http_route(clean, params)
            if why:  # passed through: logged as it was asked (less its credential)
                parse_controls(headers)
                return self._unkeyable(_route_of(method, clean + slashes, params, where), why)
            clean, params = keyed, list(keyed_params)
        route = _route_of(method, clean + slashes, params, where)
        if query and (sent := _query_as_sent(query, params)):
            route = f"{route} as sent: {sent}"
        controls = parse_controls(headers)
        # (Each logged in one line, as every request passed through uncached: helper-87.)
        if body is None:
            return self._unkeyable(route, f"request body over {self.max_body_bytes} bytes")
        if headers.get("content-encoding", "identity").lower() not in ("", "identity"):
            return self._unkeyable(route, "compressed request body")
        deep = f"request body nested deeper than {MAX_BODY_DEPTH} levels"
        brackets = body.count(b"{") + body.count(b"[")
        if brackets > MAX_BODY_CONTAINERS:
            why = f"request body holds more than {MAX_BODY_CONTAINERS} objects and arrays"
            return self._unkeyable(route, why)
        try:
            parsed = _json_decode(body)
        except msgspec.DecodeError:  # (a string not UTF-8 too: msgspec >= 0.23)
            return self._unkeyable(route, "request body is not JSON")
        except RecursionError:  # msgspec's own bound, far deeper than ours
            return self._unkeyable(route, deep)
        if not isinstance(parsed, dict):
            return self._unkeyable(route, "request body is not a JSON object")
        # Each level of nesting opens with a bracket of its own: a body with no more brackets
        # than the bound (most, as brackets in strings count too) need not be walked.
        if brackets > MAX_BODY_DEPTH and _nested_deeper_than(parsed, MAX_BODY_DEPTH):
            return self._unkeyable(route, deep)
        screen = self._screens[id(adapter)]
        if screen is not None:
            why = screen(parsed)
            if why:
                return self._unkeyable(route, why)
        try:
            tenant = self._tenant_of(headers, keys)
        except _NoScope as exc:  # the server's tenant callable is wrong: logged, forwarded
            return Decision(route=route, reason=str(exc))
        if tenant is None:
            why = (
                "no credential header to scope the entry by (to cache it: tenant= in code; "
                "sse-cache proxy --credential-header NAME or --shared-tenant)"
                if self._tenant is None
                else "the tenant callable returned no scope"
            )
            return Decision(route=route, reason=why)
        return Decision(
            adapter=adapter,
            route=route,
            streaming=adapter.is_streaming(parsed) if streaming is None else streaming,
            body=parsed,
            tenant=tenant,
            key_headers=self._key_headers_in(adapter, headers),
            last_event_id=headers.get("last-event-id"),
            controls=controls,
            origin=where,
        )

    @staticmethod
    def _unkeyable(route: str, reason: str) -> Decision:
        # One concise line per such request (no traceback): it is forwarded uncached. Its
        # query's credentials are redacted here, not only by the proxy's log filter: in an
        # app's own logging (the middleware, the transports) they were written as they came
        # (helper-123: ?access_token=, ?subscription-key=).
        logger.info("sse_cache: %s forwarded uncached: %s", redact_query_key(route), reason)
        return Decision(route=route, reason=reason)

    @staticmethod
    def pick_variant(controls: Controls) -> int:
        """Which of ``controls.variants`` stored answers this request uses."""
        return random.randrange(controls.variants) if controls.variants > 1 else 0

"""Cache keys: which stored answer a request maps to.

A key is the hex BLAKE2b-256 digest of the entry format version, the adapter (schema) name,
the route, the tenant scope, the namespace, the variant number and the canonical JSON (sorted
keys, no insignificant whitespace) of the request fields that define the answer. Which fields
those are is the adapter's decision (:meth:`StreamAdapter.key_fields`); the keyer only hashes.
"""

from __future__ import annotations

import hashlib
import math
import re
import reprlib
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from .entry import ENTRY_FORMAT_VERSION
from .errors import ConfigError

__all__ = [
    "ALIAS_PREFIX",
    "CREDENTIAL_HEADERS",
    "CREDENTIAL_SUFFIXES",
    "SHARED_TENANT",
    "CacheRequest",
    "DefaultKeyer",
    "canonical_json",
    "check_key",
    "credential_scoped",
    "lowered_tenant_scope",
    "tenant_scope",
]

#: The start of every alias key: an index row that names an entry by another name (a
#: Responses response id, to resume its stream), whose value is the entry's key in ASCII, not
#: an entry. :class:`DefaultKeyer`'s keys are hex digests and never start with it.
ALIAS_PREFIX = "alias-"


def new_lease_token() -> str:
    """A fresh token for a cross-process producer's lease (32 lowercase hex digits), the form
    :func:`parse_live_alias_target` knows it by."""
    return uuid.uuid4().hex


def live_alias_target(key: str, token: str) -> str:
    """What a live alias holds (an alias of a Responses stream another process produces, to
    resume it by id): the stream's key and its producer's lease token, which name that
    producer's fan-out channel."""
    return f"{key} {token}"


def parse_live_alias_target(target: str) -> tuple[str, str] | None:
    """The stream's key and its producer's lease token in ``target``, the value of an alias
    (:func:`live_alias_target`), or None when it is a plain alias (an entry's key). Told by the
    token's form after the last space: a custom keyer's key may hold spaces."""
    key, _, token = target.rpartition(" ")
    if key and _LEASE_TOKEN.fullmatch(token):
        return key, token
    return None


_LEASE_TOKEN = re.compile(r"[0-9a-f]{32}")


#: Request headers whose value identifies the tenant (the caller's credential).
CREDENTIAL_HEADERS = (
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "x-litellm-api-key",
    # AI gateways' own credentials, which their clients send beside a placeholder (or the
    # same provider) ``Authorization`` (helper-88: two Portkey users shared an entry).
    "x-portkey-api-key",
    "x-portkey-virtual-key",
    "cf-aig-authorization",
    "helicone-auth",
    # Azure Functions' key, which an Azure-hosted model or gateway may ask for beside a
    # placeholder ``Authorization`` (helper-123: its callers shared entries).
    "x-functions-key",
    # Who an identity-aware proxy in front authenticated (AWS ALB, Azure App Service, Google
    # IAP, Cloudflare Access, oauth2-proxy, a web server's REMOTE_USER), whose users share
    # one provider key or a placeholder ``Authorization`` (helper-169: they shared entries).
    # Such a proxy sets them (and strips a client's own). Their stable names for a user:
    # a signed assertion that may be minted anew per request (Google IAP's, ALB's
    # ``x-amzn-oidc-data``) would leave no request a hit, and comes with one of these.
    "x-amzn-oidc-identity",
    "cf-access-jwt-assertion",  # (Cloudflare's session token; with a service token, alone)
    "x-jwt-assertion",
    "x-ms-client-principal",
    "x-ms-client-principal-id",
    "x-ms-client-principal-name",
    "x-goog-authenticated-user-id",
    "x-goog-authenticated-user-email",
    "cf-access-authenticated-user-email",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
    "remote-user",
    "x-remote-user",
)

#: Endings of header names that are read as credentials too (``x-acme-api-key``,
#: ``x-acme-authorization``, ``acme-auth``, ``x-acme-token``): a gateway's own credential
#: that no list names. Spelt with ``_`` too (``x_api_key``: a server behind CGI or WSGI
#: reads it as ``x-api-key``; helper-123). A header wrongly taken for one only splits its
#: callers' entries; a credential missed would share them.
CREDENTIAL_SUFFIXES = (
    "authorization",
    "api-key",
    "apikey",
    "-auth",
    "-token",
    "-secret",
    # Cloudflare's legacy ``X-Auth-Key``, an ``x-access-key`` (helper-147: their callers
    # shared entries behind a constant ``Authorization``).
    "auth-key",
    "access-key",
    # Tokens spelt as one word: AWS ALB's ``X-Amzn-Oidc-Accesstoken`` (helper-169; it is
    # renewed with the user's session, which splits that user's entries each time: the
    # price of reading any gateway's token so spelt).
    "accesstoken",
    "idtoken",
    "api_key",
    "_auth",
    "_token",
    "_secret",
    "auth_key",
    "access_key",
)

#: Pass as ``tenant=SHARED_TENANT`` to let every caller share entries (explicit opt-in: the
#: middleware, the transports, the proxy's ``--shared-tenant``; the engine's is
#: ``StreamCache.request(body, shared=True)``, where a tenant "shared" is just a tenant).
SHARED_TENANT = "shared"

_json_encoder = msgspec.json.Encoder(order="sorted")
# How many key heads (see DefaultKeyer) a keyer remembers.
_REMEMBERED_HEADS = 1024


class CacheRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a key is made of.

    ``fields`` are the answer-defining request fields the adapter selected (already without
    transport-only fields such as ``stream``); ``tenant`` is the tenant scope (see
    :func:`tenant_scope`), ``namespace`` an operator-chosen partition, ``variant`` the index
    when several answers are kept for one request, ``headers`` the answer-defining request
    headers (lower-case names; e.g. ``anthropic-version``), ``ignored`` the request fields a
    caller asked to leave out of the key (``x-sse-cache-ignore-fields``): the list itself is
    part of the key, so such a request never lands on the entry of one that did not ask.
    ``uncached``, not part of the key: why the adapter passes this request through uncached
    (its ``uncached_reason``: a Responses ``conversation``, a ``stream`` flag that is neither
    true nor false), or ``""``; :meth:`StreamCache.stream` neither looks such a request up,
    nor shares, nor stores it (status ``bypass``).
    """

    schema: str
    route: str
    fields: Mapping[str, Any]
    tenant: str = ""
    namespace: str = ""
    variant: int = 0
    headers: Mapping[str, str] = {}
    ignored: tuple[str, ...] = ()
    uncached: str = ""


_ARRAYS = (list, tuple)


def _normalise(value: Any) -> Any:
    # JSON does not tell 1 from 1.0 apart; Python does. An integral float keys like the int
    # so that `"temperature": 1` and `"temperature": 1.0` share an entry.
    if isinstance(value, str):  # (the most common value: first)
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        if not math.isfinite(value):
            # (msgspec writes NaN and the infinities as null: such a request keyed as one
            # with null, answered from its entry; helper-158. JSON has no such number.)
            raise ConfigError(f"request fields hold {value!r}, which is not a JSON number")
        return value
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, _ARRAYS):
        return [_normalise(v) for v in value]
    if value is None or isinstance(value, int):  # (bool is an int)
        return value
    if isinstance(value, Mapping):  # (a mapping that is not a dict: as the dict it is)
        return {k: _normalise(v) for k, v in value.items()}
    # Not JSON (a set, bytes, a Decimal, a datetime...): msgspec would write each as an
    # array or a string, keying it as the JSON value it is not (bytes as base64 text).
    raise ConfigError(
        f"request fields hold a {type(value).__name__}, which is not a JSON value (the "
        "decoded JSON body is keyed: str, int, float, bool, None, dict and list)"
    )


def canonical_json(value: Any) -> bytes:
    """Canonical JSON of a decoded JSON value: sorted keys, no whitespace, integral floats
    written as integers. Equal JSON documents give equal bytes."""
    try:
        return _json_encoder.encode(_normalise(value))
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigError(f"request fields are not JSON-serialisable: {exc}") from None
    except UnicodeEncodeError:
        # (A string cut inside a surrogate pair: what a JavaScript client slicing an emoji
        # sends. The HTTP integrations pass such a body through uncached.)
        raise ConfigError(
            "request fields hold a string that is not valid Unicode (a lone surrogate): "
            "it cannot be keyed"
        ) from None
    except RecursionError:
        raise ConfigError("request fields are nested too deeply to key") from None


class DefaultKeyer:
    """The default :class:`~sse_cache.protocols.CacheKeyer`: BLAKE2b-256, hex (64 chars).

    ``salt`` (optional) is mixed into every key: two deployments with different salts never
    share entries even on one backend.
    """

    def __init__(self, *, salt: str = "") -> None:
        if not isinstance(salt, str):  # (an int failed at the first key)
            raise ConfigError(f"salt must be a str, got {type(salt).__name__}")
        self._salt = salt
        # The length-prefixed parts before the request's own (the version, the salt, the
        # schema, route, tenant, namespace and variant) by what they are made of: they
        # repeat from request to request (one route, one tenant), and writing them is most
        # of a key's cost. Bounded, as tenants are many; forgotten all at once when full.
        self._heads: dict[tuple[str, str, str, str, int], bytes] = {}

    def key(self, request: CacheRequest) -> str:
        # Length-prefixed parts: no choice of values can make two different requests collide
        # by shifting bytes from one part into its neighbour. (Joined, then hashed at once:
        # the same bytes as one update per part, in a third of the time.)
        parts = (request.schema, request.route, request.tenant, request.namespace, request.variant)
        head: bytes | None
        if type(request.variant) is not int:
            # (True == 1 and 1.0 == 1 share a slot, but not their str(): remembered by
            # value, the first of them seen would decide the others' keys.)
            head = self._head(*parts)
        elif (head := self._heads.get(parts)) is None:
            head = self._head(*parts)
            if len(self._heads) >= _REMEMBERED_HEADS:
                self._heads.clear()
            self._heads[parts] = head
        chunks = [head]
        if request.ignored:
            raw = canonical_json(sorted(set(request.ignored)))
            chunks += (b"\x00ignored" + len(raw).to_bytes(4, "big"), raw)
        if request.headers:
            # Only present when set, so that keys without headers stay as they were.
            raw = canonical_json(dict(request.headers))
            chunks += (b"\x00headers" + len(raw).to_bytes(4, "big"), raw)
        chunks.append(canonical_json(request.fields))
        return hashlib.blake2b(b"".join(chunks), digest_size=32).hexdigest()

    def _head(self, schema: str, route: str, tenant: str, namespace: str, variant: int) -> bytes:
        chunks: list[bytes] = []
        for part in (
            f"sse-cache/{ENTRY_FORMAT_VERSION}",
            self._salt,
            schema,
            route,
            tenant,
            namespace,
            str(variant),
        ):
            raw = part.encode("utf-8")
            chunks += (len(raw).to_bytes(4, "big"), raw)
        return b"".join(chunks)


def tenant_scope(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    credential_headers: Iterable[str] = CREDENTIAL_HEADERS,
    suffixes: Iterable[str] | None = None,
) -> str:
    """The default tenant scope: a hash of the credentials the request carried.

    Every one of ``credential_headers`` (case-insensitive) present in ``headers`` is part of
    the scope — name and value, in the order of ``credential_headers`` — and so is every
    other header whose name ends with one of ``suffixes`` (None: :data:`CREDENTIAL_SUFFIXES`
    with the default ``credential_headers``, none with a list of your own, which then says
    all there is), in the order of their names, all hashed together (BLAKE2b-128, hex):
    requests that differ in any one credential never share a scope, even when another (a
    gateway's constant ``Authorization``, say) is the same. ``""`` (the anonymous scope)
    when none is present. The credentials themselves are never stored or logged.
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    found = {k.lower(): v for k, v in items}
    if credential_headers is CREDENTIAL_HEADERS and suffixes is None:
        # (Lower-case, without repeats already: the same tuples on every call, which the
        # names found are remembered by.)
        return lowered_tenant_scope(found, CREDENTIAL_HEADERS, CREDENTIAL_SUFFIXES)
    names = tuple(dict.fromkeys(n.lower() for n in credential_headers))
    return lowered_tenant_scope(found, names, tuple(s.lower() for s in suffixes or ()))


def credential_scoped(scope: str) -> bool:
    """Whether the tenant scope ``scope`` is one of :func:`tenant_scope`'s: the same only for
    requests with the same credentials (not the shared scope, nor a tenant callable's)."""
    return scope.startswith("t:")


def lowered_tenant_scope(
    headers: Mapping[str, str],
    credential_headers: tuple[str, ...],
    suffixes: tuple[str, ...] = CREDENTIAL_SUFFIXES,
) -> str:
    """:func:`tenant_scope` of ``headers`` whose names are lower-case already, for
    ``credential_headers`` lower-case and without repeats and ``suffixes`` lower-case (what
    a policy holds): the same scope, without normalising both on every request."""
    names = _credential_names(tuple(headers), credential_headers, suffixes)
    parts = [f"{name}\0{value}" for name in names if (value := headers[name])]
    if not parts:
        return ""
    # HTTP header values hold no NUL, so the joined parts cannot be confused with one
    # another; with one credential this is the digest earlier versions used.
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=16)
    return "t:" + digest.hexdigest()


def _credential_names(
    names: tuple[str, ...], listed: tuple[str, ...], suffixes: tuple[str, ...]
) -> tuple[str, ...]:
    """Which of a request's header ``names`` are credentials: the ``listed`` ones it has, in
    their order, then those that end with one of ``suffixes``, sorted (after the listed
    ones: a request with only those has the scope it always had). Remembered by the names a
    request came with, which are the same on every request of one client: a lookup per
    listed name, an ``endswith`` per header and a sort cost ~10k instructions on every hit,
    this a tenth."""
    # Per (listed, suffixes) — a policy's, the same tuples on every request: found by their
    # identity (each kept with its memo, so that its id is never another's), not by hashing
    # and comparing ~50 names on every hit (~3k instructions).
    lists = _NAMES_BY_LISTS.get(id(listed))
    if lists is None or lists[0] is not listed or lists[1] is not suffixes:
        if len(_NAMES_BY_LISTS) >= _REMEMBERED_LISTS:
            _NAMES_BY_LISTS.clear()
        lists = _NAMES_BY_LISTS[id(listed)] = (listed, suffixes, {})
    remembered = lists[2]
    found = remembered.get(names)
    if found is None:
        if len(remembered) >= _REMEMBERED_NAME_SETS:  # (clients choose their headers)
            remembered.clear()
        present = set(names)
        found = remembered[names] = (
            *(n for n in listed if n in present),
            *sorted(n for n in names if suffixes and n.endswith(suffixes) and n not in listed),
        )
    return found


_NAMES_BY_LISTS: dict[
    int, tuple[tuple[str, ...], tuple[str, ...], dict[tuple[str, ...], tuple[str, ...]]]
] = {}
_REMEMBERED_LISTS = 64
_REMEMBERED_NAME_SETS = 256


def check_key(key: str, what: str = "key") -> None:
    """Raise ValueError naming ``key`` when it cannot be encoded as UTF-8 (a lone surrogate,
    such as ``"a\\udc80"``), TypeError when it is not a ``str``: every backend refuses such
    keys alike, and the engine before it asks one (a caller's mistake, not a failure of the
    backend). Cheap for the engine's keys, which are ASCII."""
    if key.__class__ is str and key.isascii():
        return
    if not isinstance(key, str):
        raise TypeError(f"{what} must be str, got {type(key).__name__}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} {reprlib.repr(key)} is not encodable as UTF-8: it holds the lone "
            f"surrogate {key[exc.start]!r} at index {exc.start}"
        ) from None

"""The caching reverse proxy behind ``sse-cache proxy``.

:class:`Forwarder` is an ASGI app that forwards every request to an upstream base URL with
httpx2, streaming both ways; :func:`create_proxy_app` puts :class:`CacheMiddleware` in front
of it and adds the operational endpoints ``GET /_sse_cache/health`` and
``GET /_sse_cache/metrics`` (Prometheus text; ``HEAD`` too, any other method is ``405``), an
access line per request on a cached route (:class:`~sse_cache._logging.AccessLog`), and at
startup a line saying what it serves and a check of the backend (a warning when it cannot be
reached: the proxy serves anyway, uncached).
"""

from __future__ import annotations

import dataclasses
import http.cookiejar
import json
import logging
import math
import re
import time
import types
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import anyio

from ._asgi_io import (
    ENDS_BY_ITSELF,
    Message,
    Receive,
    Scope,
    Send,
    request_path,
    send_json_error,
    task_group,
    until_disconnect,
)
from ._logging import (
    AccessLog,
    RateLimitedLog,
    logged_path,
    proxy_log_config,
    redact_url,
)
from ._notices import Notice
from ._upstream_connections import environment_client
from .asgi import CacheMiddleware
from .breaker import BreakerState
from .errors import ConfigError
from .flight import SharedStreamAborted
from .http._wire import body_ends_by_itself
from .http.policy import CONTROL_HEADER_PREFIX, base_url_of
from .metrics import Metrics

try:
    import httpx2
except ImportError:  # pragma: no cover - exercised only without the extra
    httpx2 = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_BACKEND",
    "Forwarder",
    "ProxyApp",
    "create_proxy_app",
    "log_config",
    "no_cookies",
]

DEFAULT_BACKEND = "sqlite:///./sse-cache.db"
#: Seconds the health endpoint and the startup check wait for the backend.
BACKEND_CHECK_TIMEOUT = 2.0
#: Seconds the lifespan shutdown waits for requests still running to end before it closes
#: the upstream client and the backend. By then the server has cancelled them (uvicorn's
#: ``--graceful-timeout``): they only unwind, log their line and let go of what they hold.
UNWIND_TIMEOUT = 5.0
#: Bytes the forwarder reads from the upstream ahead of what it has sent on; the upstream's
#: reads are 64 KiB.
READ_AHEAD_BYTES = 256 * 1024

#: Seconds a request's body may go without a byte arriving (``body_timeout``): nginx's
#: ``client_body_timeout``.
DEFAULT_BODY_TIMEOUT = 60.0

logger = logging.getLogger("sse_cache")
# One line per 10 s while requests are refused (for --limit-concurrency, or a stalled body),
# not one per request.
_refusal_warnings = RateLimitedLog(logger)

# RFC 9110 §7.6.1 hop-by-hop headers, plus those httpx2 sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
# Response headers not passed on: the hop-by-hop ones, and those the proxy's own server
# writes on every response (uvicorn's defaults: the upstream's copies are dropped, as nginx
# does, or a response would carry two `Date`s).
_NOT_PASSED_BACK = _HOP_BY_HOP | {b"date", b"server"}
_CONTROL_HEADERS = CONTROL_HEADER_PREFIX.encode()


# How a response breaks off: the upstream's connection failed or timed out mid-body, or the
# live stream a follower read stopped before its end.
_BROKEN_OFF: tuple[type[Exception], ...] = (
    (SharedStreamAborted, httpx2.HTTPError) if httpx2 is not None else (SharedStreamAborted,)
)


_KEEPALIVE = 20  # idle upstream connections kept for reuse (httpx2's default)


def _need_httpx2() -> None:
    if httpx2 is None:
        raise ConfigError("the proxy needs httpx2 and uvicorn: pip install 'sse-cache[proxy]'")


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def no_cookies() -> http.cookiejar.CookieJar:
    """A cookie jar that keeps none, for an HTTP client that forwards many callers' requests:
    httpx2's own keeps every ``Set-Cookie`` an upstream sends and adds it to every later
    request, whoever sends it (one tenant's session cookie reached the upstream with
    another's request; helper-132), and grows with each cookie name."""
    return http.cookiejar.CookieJar(policy=_NoCookies())


class Forwarder:
    """Forward requests to ``upstream`` (a base URL: the request path is appended).

    Request and response bodies stream through unchanged; hop-by-hop headers are dropped
    (RFC 9110), ``x-sse-cache-*`` controls are not forwarded, and ``accept-encoding:
    identity`` is asked for so that answers stay readable (and storable). An upstream that
    cannot be reached is answered ``502``, one that times out ``504``, both as JSON; a
    stream that breaks midway is cut for the client too. When the client disconnects, the
    upstream request is cancelled.

    The client it builds keeps no cookies and adds no header of its own (no user-agent):
    it forwards for every caller. A ``client`` given is used as it is, its cookie jar and
    default headers included: give it ``cookies=no_cookies()``.
    """

    def __init__(
        self,
        upstream: str,
        *,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_connections: int | None = None,
        client: Any = None,
    ) -> None:
        _need_httpx2()
        # An http(s):// URL with a host and a good port (its scheme in any case), and no query
        # or fragment, which the request's path would be appended after (every request would
        # then miss its route upstream). Errors show it without its password.
        upstream = base_url_of(upstream)
        if max_connections is not None and max_connections < 1:
            raise ConfigError(f"max_connections must be None or >= 1, got {max_connections!r}")
        self.upstream = upstream
        # httpx2's default pool holds 100 connections, and a request past them waits for one
        # with nothing sent to its client: a gateway streaming long answers would quietly stall
        # its 101st miss. No limit unless one is asked for (an upstream's own rate limit is the
        # upstream's to enforce); idle keep-alive connections are still capped.
        limits = httpx2.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(max_connections or _KEEPALIVE, _KEEPALIVE),
        )
        self._new_client: Callable[[], Any] | None = None
        if client is None:

            def new_client() -> Any:
                made = environment_client(
                    lambda: httpx2.AsyncClient(
                        timeout=httpx2.Timeout(timeout, connect=connect_timeout),
                        limits=limits,
                        follow_redirects=False,
                        cookies=no_cookies(),
                    ),
                    "start the proxy without it",
                )
                # The client's request headers go as they came: httpx2's defaults added its
                # own user-agent and accept to a request that had none (helper-132).
                for name in ("user-agent", "accept"):
                    del made.headers[name]
                # (Its own transport and the environment's proxies it mounted, guarded: a
                # transport given would leave HTTP_PROXY and the like unread.)
                return made

            self._new_client = new_client
            client = self._new_client()
        self._client = client

    async def aclose(self) -> None:
        await self._client.aclose()

    def reopen(self) -> None:
        """Open the upstream client again if :meth:`aclose` closed it (the lifespan's
        startup: an app served again, a test client per test on one app), unless it was
        given (``client=``: its owner's to open)."""
        if self._new_client is not None and self._client.is_closed:
            self._client = self._new_client()

    async def _sent(
        self,
        request: httpx2.Request,
        receive: Receive,
        disconnected: anyio.Event,
        whole: anyio.Event,
    ) -> httpx2.Response | None:
        """The upstream's response to ``request``, its head awaited while the client is
        watched once its body has all gone upstream (``whole``: until then the upload reads
        ``receive``): None when the client left first (the upstream's request is cancelled).
        The cache middleware hides the departure from this app while others wait for the
        stream: then the head is awaited for them. (helper-138: a client gone during the
        upstream's time to first byte was noticed only once the head came.)"""
        response: httpx2.Response | None = None

        async def watch(scope: anyio.CancelScope) -> None:
            await whole.wait()
            await _watch_disconnect(receive, disconnected, scope)

        async with task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            response = await self._client.send(request, stream=True)
            tg.cancel_scope.cancel()
        if disconnected.is_set():
            if response is not None:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
            return None
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.reopen, self.aclose)
            return
        if scope["type"] != "http":
            return
        path = scope.get("raw_path") or scope["path"].encode()
        problem = _not_a_path_under(path)
        if not problem and b"#" in scope.get("query_string", b""):
            path += b"?" + scope["query_string"]
            problem = _FRAGMENT
        if problem:
            shown = path[:100].decode("latin-1")
            await send_json_error(
                send, 400, f"the request target {problem}, got {shown!r}", "invalid_request_error"
            )
            return
        url = self.upstream + path.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        headers = _forwarded_headers(list(scope.get("headers", ())))
        disconnected = anyio.Event()
        # A body that came whole (every LLM request: the cache middleware has read it already)
        # goes upstream whole, with its length: one write, no chunked encoding. Only a body
        # still arriving is streamed through.
        first = await receive()
        content: bytes | AsyncIterator[bytes]
        if first["type"] == "http.disconnect":
            return
        whole = anyio.Event()  # the request's body has all gone upstream
        if first.get("more_body", False):
            content = _body(receive, disconnected, first.get("body", b""), whole)
        else:
            content = first.get("body", b"")
            whole.set()
        request = self._client.build_request(scope["method"], url, headers=headers, content=content)
        try:
            response = await self._sent(request, receive, disconnected, whole)
            if response is None:
                return  # the client left before the upstream's head: nothing to send
        except _ClientLeft:
            # The client left before its body was complete: the upstream's request was cut
            # off mid-body, never sent whole (an abandoned upload must not run upstream).
            return
        except httpx2.TimeoutException as exc:
            await send_json_error(send, 504, f"upstream timed out: {exc!r}", "upstream_timeout")
            return
        except httpx2.HTTPError as exc:
            await send_json_error(send, 502, f"upstream unreachable: {exc!r}", "upstream_error")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _passed_back_headers(response.headers.raw),
                    # (to the cache middleware: whether a cut can be told from the end)
                    ENDS_BY_ITSELF: body_ends_by_itself(
                        response.extensions.get("http_version"), response.headers
                    ),
                }
            )
            # (An upstream that broke off raises httpx2's own error, not a task group's.)
            async with task_group() as tg:
                # Watch for the client leaving while the body streams: then stop reading the
                # upstream (the cache sees the disconnect and stores nothing).
                tg.start_soon(_watch_disconnect, receive, disconnected, tg.cancel_scope)
                # The upstream's body is read by a task of its own, and everything that
                # arrived while the last message was sent goes out as one: an upstream
                # faster than the client costs one message (one parse, one socket write) per
                # batch, not per chunk, and a paced one still has each chunk sent as it comes.
                arrived = _Arrived(READ_AHEAD_BYTES)
                tg.start_soon(arrived.fill, response.aiter_raw())
                while (body := await arrived.take()) is not None:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                tg.cancel_scope.cancel()
            if not disconnected.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


class _Arrived:
    """The upstream's body between the task reading it (:meth:`fill`) and the one sending it
    on (:meth:`take`): every chunk that arrived since the last :meth:`take`, taken at once.
    At most about ``limit`` bytes wait (a read may overshoot it by one read): beyond that
    the reader waits, and a client that reads slowly paces the upstream, as it would if
    each chunk were sent before the next is read."""

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._ended = False
        self._error: Exception | None = None
        self._arrival = anyio.Event()
        self._taken = anyio.Event()

    async def fill(self, chunks: AsyncIterator[bytes]) -> None:
        """Read ``chunks`` to their end. An error reading them is raised by :meth:`take`
        after the chunks that came before it (the client gets every byte the upstream sent
        before it broke off)."""
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                self._chunks.append(chunk)
                self._size += len(chunk)
                self._arrival.set()
                while self._size >= self._limit:
                    await self._taken.wait()
        except Exception as exc:
            self._error = exc
        self._ended = True
        self._arrival.set()

    async def take(self) -> bytes | None:
        """Everything that arrived since the last call, as one ``bytes``; waits for a chunk
        when none has (never for a second one). None once the body ended; raises what
        broke it off instead, once everything before the break was taken."""
        while not self._chunks:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            await self._arrival.wait()
            self._arrival = anyio.Event()
        chunks, self._chunks, self._size = self._chunks, [], 0
        self._taken.set()
        self._taken = anyio.Event()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# The scheme and authority of an absolute-form request target (``POST http://host/v1/...``).
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/]*")


def _as_forwarded(scope: Scope) -> Scope | None:
    """``scope`` as the upstream is asked it, where the cache must see the same: its target
    in origin form (:func:`_in_origin_form`), and without the headers its ``Connection``
    header names. The forwarder drops those (hop-by-hop): kept for the key, a client naming
    ``openai-beta`` there had the upstream's answer without it stored under a key with it,
    served to every other client asking with it (helper-74).

    None for a request that declares both a chunked and a counted body: a server in front
    that reads the other framing than uvicorn's would take part of this body for the next
    request on the connection (request smuggling; refused). (One pass over the headers for
    both: every request, hits included, comes here.)"""
    raw = scope.get("raw_path")
    if raw is not None and not raw.startswith(b"/"):
        scope = _in_origin_form(scope, raw)
    headers = scope.get("headers", ())
    named: set[bytes] | None = None
    chunked = counted = upgrade = False
    empty = True  # (no body declared: no framing, or a length of 0)
    for name, value in headers:  # (ASGI header names are lower-case)
        if name == b"connection":
            if value.lower() in _PLAIN_CONNECTION:
                continue  # (what the SDKs send: httpx's "keep-alive")
            tokens = _connection_tokens(value) - _PLAIN_CONNECTION
            named = tokens if named is None else named | tokens
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            counted = True  # (a length of 0 beside chunked framing too: CL.TE smuggling)
            empty = empty and value.strip() == b"0"
        elif name == b"upgrade":
            upgrade = True
    if chunked and counted:
        return None
    if upgrade and (chunked or not empty):
        # (Seldom: curl --http2 on http://.) The body must be checked: see _body_kept.
        scope[_UPGRADE_WITH_BODY] = True
    # A new list, also of nearly every request's headers, none named: uvicorn's httptools
    # adds a chunked body's trailer fields to the scope's list as they arrive, after the
    # head and after this look at it. A late trailer ``Connection: openai-beta`` dropped that
    # header from what was forwarded, not from the key: the upstream's answer without it was
    # stored under a key with it (helper-157). Trailers are not headers (RFC 9110 §6.5.1).
    # In the same scope: a copy of it would hide from middleware around the proxy what the
    # app writes into it (helper-159).
    if not named:  # (nearly every request)
        scope["headers"] = [*headers]
        return scope
    # The cache's own controls stay for the cache: meant for this hop, the proxy (a client
    # naming cache-control in Connection had its no-store ignored; helper-157). The
    # forwarder drops them all the same.
    scope["headers"] = [
        (name, value)
        for name, value in headers
        if name not in named or name in _CONTROLS or name.startswith(b"x-sse-cache-")
    ]
    return scope


#: The request headers the cache reads as controls (not keys: see http.policy).
_CONTROLS = frozenset({b"cache-control", b"pragma"})
#: A scope key: the request offers a protocol upgrade and declares a body (_body_kept).
_UPGRADE_WITH_BODY = "sse_cache.upgrade_with_body"


async def _body_kept(receive: Receive) -> Receive | None:
    """``receive`` as it was for a request offering a protocol upgrade with a body, or None
    when its server lost that body: uvicorn's httptools stops reading a request at an
    upgrade offer (``Upgrade: h2c``) and hands the app an empty body as if whole. Forwarded,
    the upstream was asked with nothing for a body (chunked), or the forward failed with a
    500 and a traceback (a length with no bytes; helper-157). Every server hands over some
    of a body it has, or says there is more, in its first piece."""
    first = await receive()
    if first["type"] == "http.request" and not first.get("body") and not first.get("more_body"):
        return None
    given = False

    async def receiving() -> Message:
        nonlocal given
        if not given:
            given = True
            return first
        return await receive()

    return receiving


# What a Connection header says that names no other header.
_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive", b""})


def _in_origin_form(scope: Scope, raw: bytes) -> Scope:
    """``scope``, whose request target ``raw`` is no path, with an absolute-form target (RFC
    9112 §3.2.2: a server must accept it) turned into its path, by which the request is
    matched, keyed and forwarded: the proxy answers for its one upstream whatever authority
    the target names. Any other target is left as it is: the forwarder refuses it."""
    found = _ABSOLUTE_FORM.match(raw)
    if found is None:
        return scope
    path = raw[found.end() :] or b"/"
    scope["raw_path"], scope["path"] = path, unquote(path.decode("latin-1"))  # (in place too)
    return scope


def _not_a_path_under(path: bytes) -> str:
    """Why ``path`` (a request's raw path) cannot be appended to the upstream's base URL, or
    "". The URL is the base URL and this path: anything but a path there ("@host/...",
    ":port/...", ".example.com/...") would name another server, and a dot segment
    ("/../admin") would leave the base URL's own path once resolved (httpx2 resolves them).
    (ProxyApp turns an absolute-form target into its path before this.)"""
    if not path.startswith(b"/"):
        return "must be a path starting with '/'"
    if b"#" in path:
        return _FRAGMENT
    # Also escaped: an upstream that decodes before it resolves (nginx does; RFC 3986
    # §6.2.2.2 says %2E is ".") would resolve "/%2e%2e/" too (helper-76) — and "..%2f" or
    # "..%5c", whose "/" or "\" it decodes first (helper-113: they reached the base URL's
    # parent). So the path is decoded, then split at both.
    decoded = unquote_to_bytes(path) if b"%" in path else path
    if b"." in decoded and any(part in (b".", b"..") for part in _SEGMENTS.split(decoded)):
        return "must not hold '.' or '..' segments (also escaped: %2e, %2f, %5c)"
    return ""


# Where an upstream may end a path segment: at "/", and at "\" (Windows servers, and
# WHATWG URL parsers for http URLs).
_SEGMENTS = re.compile(rb"[/\\]")
# RFC 9112 §3.2: a request target never holds a fragment. HTTP clients drop it from the
# URL they send (the upstream got "/v1/embeddings" for "/v1/embeddings#/v1/chat/completions",
# which the cache had matched and keyed as a chat completion; helper-113).
_FRAGMENT = "must not hold a fragment ('#')"


def _nominated(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names (lower-case) a message's ``Connection`` header lists: hop-by-hop
    too (RFC 9110 §7.6.1), so a proxy drops them."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= _connection_tokens(value)
    return named


def _connection_tokens(value: bytes) -> set[bytes]:
    """The names a ``Connection`` header's value lists, lower-case."""
    return {token.strip().lower() for token in value.split(b",")}


def _forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's request headers as the upstream gets them: without the hop-by-hop ones
    (also those its ``Connection`` header names), the cache's ``x-sse-cache-*`` controls and
    its ``accept-encoding`` (``identity`` is asked for, so that answers stay readable and
    storable); without its ``content-length`` when it framed its body chunked (RFC 9112
    §6.3: the length it declared is not the body's; httpx2 frames the body itself)."""
    dropped = _HOP_BY_HOP | _nominated(headers) | {b"accept-encoding"}
    if any(name.lower() == b"transfer-encoding" for name, _ in headers):
        dropped |= {b"content-length"}
    forwarded = [
        (name, value)
        for name, value in headers
        if (lowered := name.lower()) not in dropped and not lowered.startswith(_CONTROL_HEADERS)
    ]
    forwarded.append((b"accept-encoding", b"identity"))
    return forwarded


def _passed_back_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client gets them: without the hop-by-hop ones
    (also those its ``Connection`` header names) and those the proxy's server writes; their
    names lower-case, as ASGI has them. Without its ``content-length`` when it framed its
    body chunked (RFC 9112 §6.3: an intermediary removes it; helper-165: passed back, the
    client was sent the body under a length that was not its own, and cut at it)."""
    lowered = [(name.lower(), value) for name, value in headers]
    dropped = _NOT_PASSED_BACK | _nominated(lowered)
    if any(name == b"transfer-encoding" for name, _ in lowered):
        dropped |= {b"content-length"}
    return [(name, value) for name, value in lowered if name not in dropped]


class _ClientLeft(Exception):
    """The client disconnected before its request body was complete."""


async def _body(
    receive: Receive, disconnected: anyio.Event, first: bytes, whole: anyio.Event
) -> AsyncIterator[bytes]:
    # The request's body as it comes; ``whole`` is set once all of it was read.
    if first:
        yield first
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            # Raised into httpx2's upload: the upstream's request is cut off mid-body. (Ending
            # the body here would end the upload cleanly: the upstream would run the part of
            # the request that came, or the whole of it under a chunked framing.)
            raise _ClientLeft
        chunk = message.get("body", b"")
        if not message.get("more_body", False):
            whole.set()
        if chunk:
            yield chunk
        if whole.is_set():
            return


async def _watch_disconnect(receive: Receive, flag: anyio.Event, scope: anyio.CancelScope) -> None:
    if flag.is_set():  # (the upload saw it: the request has failed already)
        return
    await until_disconnect(receive)
    flag.set()
    scope.cancel()


async def _lifespan(
    receive: Receive, send: Send, on_startup: Callable[[], None], on_shutdown: Any
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            on_startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


class ProxyApp:
    """The proxy's ASGI app: operational endpoints, then the cache, then the forwarder.

    ``access_log``: the hook of ``cached`` that writes a line per request on a cached route
    (None: no access lines). ``backend_label``: how the startup line names the backend (its
    URL with any password redacted; default: its class)."""

    def __init__(
        self,
        cached: CacheMiddleware,
        metrics: Metrics,
        forwarder: Forwarder,
        *,
        access_log: AccessLog | None = None,
        backend_label: str = "",
        limit_concurrency: int | None = None,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        if limit_concurrency is not None and limit_concurrency < 1:
            raise ConfigError(f"limit_concurrency must be None or >= 1, got {limit_concurrency!r}")
        if body_timeout is not None and not 0 < body_timeout < math.inf:
            raise ConfigError(f"body_timeout must be None or > 0 seconds, got {body_timeout!r}")
        self.body_timeout = body_timeout
        self.cached = cached
        self.metrics = metrics
        self.forwarder = forwarder
        self.access_log = access_log
        self.backend_label = backend_label or type(cached.service.backend).__name__
        self.started = time.time()
        self._running = 0  # HTTP requests in __call__
        self._ended: anyio.Event | None = None  # set when _running falls to 0 (at shutdown)
        self.limit_concurrency = limit_concurrency
        self._admitted = 0  # requests counted against limit_concurrency
        metrics.watch_requests(self)

    @property
    def requests_in_progress(self) -> int:
        """HTTP requests being handled (``sse_cache_requests_in_progress``): each from its
        arrival until its handling ends (its response's last byte; the stream's end when it
        is read on for others after its client left). :attr:`limit_concurrency` counts each
        until its last byte or its client's leaving: at most this many."""
        return self._running

    async def aclose(self) -> None:
        """Close the upstream client and the cache's backend, and publish the metrics a last
        time for the other processes sharing them (lifespan shutdown does this when the
        server runs the lifespan protocol)."""
        try:
            await self.forwarder.aclose()
            await self.cached.aclose()
        finally:
            self.metrics.publish()

    async def _requests_ended(self) -> None:
        """Return once no HTTP request is running, or after :data:`UNWIND_TIMEOUT`."""
        if self._running:
            self._ended = anyio.Event()
            with anyio.move_on_after(UNWIND_TIMEOUT):
                await self._ended.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            forwarded = _as_forwarded(scope)
            if forwarded is None:
                await send_json_error(
                    send,
                    400,
                    "the request declares both Transfer-Encoding and Content-Length"
                    " (RFC 9112 §6.1): refused, and the connection closed",
                    "invalid_request_error",
                    headers=[(b"connection", b"close")],  # (the server closes it)
                )
                return
            scope = forwarded
            if scope["path"].startswith("/_sse_cache/"):
                # (Never refused for being busy: a health check must not fail a proxy
                # because it is serving its limit.)
                await self._ops(scope, send)
                return
            if self.body_timeout is not None:
                receive = _body_in_time(receive, self.body_timeout)
            admission: _Admission | None = None
            if self.limit_concurrency is not None:
                if self._admitted >= self.limit_concurrency:
                    await self._refuse_busy(send)
                    return
                self._admitted += 1
                admission = _Admission(self._release_admission)
                send = admission.sending(send)
                receive = admission.receiving(receive)
            self._running += 1
            try:
                if _UPGRADE_WITH_BODY in scope:
                    kept = await _body_kept(receive)
                    if kept is None:
                        await send_json_error(
                            send,
                            400,
                            "the request offers a protocol upgrade (Upgrade) and declares a "
                            "body, which this server did not read (uvicorn's httptools stops "
                            "at an upgrade offer): send it without Upgrade",
                            "invalid_request_error",
                            headers=[(b"connection", b"close")],
                        )
                        return
                    receive = kept
                log, policy = self.access_log, self.cached.service.policy
                # (The route is matched only when there is a line to write.)
                if (
                    log is not None
                    and log.enabled
                    and policy.match(scope["method"], request_path(scope))
                ):
                    await log.serve(self.cached, scope, receive, send)
                else:
                    await self.cached(scope, receive, send)
            except _BodyStalled as exc:
                # No response was started: every way through reads the whole body first.
                _refusal_warnings.warning(self, "stalled", "sse_cache: %s", exc)
                self.metrics(Notice(kind="refused", key="", detail="body_timeout"))
                await send_json_error(
                    send,
                    408,
                    f"{exc}: the request is refused, and the connection closed",
                    "request_timeout",
                    headers=[(b"connection", b"close")],  # (the server closes it)
                )
            except _BROKEN_OFF as exc:
                # The upstream broke off mid-answer (or the live stream this request followed
                # did). Returning without the response's end has the server close the
                # connection — the client's response is aborted, as by the exception — with
                # one line saying why instead of the server's traceback of it.
                logger.warning(
                    "sse_cache: %s %s: response aborted: %r",
                    scope["method"],
                    logged_path(scope),
                    exc,
                )
            finally:
                if admission is not None:
                    admission.release()
                self._running -= 1
                if not self._running and self._ended is not None:
                    self._ended.set()
            return
        if scope["type"] == "lifespan":
            await self.cached(scope, self._stopping(receive), self._starting(send))
            return
        await self.cached(scope, receive, send)

    def _release_admission(self) -> None:
        self._admitted -= 1

    async def _refuse_busy(self, send: Send) -> None:
        limit = self.limit_concurrency
        self.metrics(Notice(kind="refused", key="", detail="limit_concurrency"))
        _refusal_warnings.warning(
            self, "busy", "sse_cache: serving --limit-concurrency %s requests: refusing more", limit
        )
        await send_json_error(
            send,
            503,
            f"the proxy is serving its limit of {limit} requests at once "
            "(--limit-concurrency); retry shortly",
            "overloaded",
            headers=[(b"retry-after", RETRY_AFTER_BUSY)],
        )

    def _stopping(self, receive: Receive) -> Receive:
        # The shutdown reaches the app (which closes the upstream client and the backend)
        # once the requests still running have ended. Those the server cancelled at the end
        # of its graceful shutdown are only unwinding: closing under them would fail their
        # cleanup, and the server could end the process before they log what happened.
        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._requests_ended()
            return message

        return receiving

    def _starting(self, send: Send) -> Send:
        # Say what is served and check the backend once startup is through, before the
        # server reports it complete.
        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.log_startup()
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # The requests have ended (see _stopping): what they counted since the last
                # periodic write goes to the other workers now, or never (a restart or a
                # scale-down of --workers N lost up to a second of counts: helper-97).
                self.metrics.publish()
            await send(message)

        return sending

    async def log_startup(self) -> None:
        """Log what the proxy serves (upstream, backend, routes; no credentials) and whether
        the backend answers: a warning when it does not, and the proxy serves on (fail-open:
        every request a miss until the backend is back)."""
        routes = ", ".join(
            f"{path}={adapter.name}" for path, adapter in self.cached.service.policy.routes.items()
        )
        logger.info(
            "sse_cache: proxy for %s, backend %s, routes %s",
            redact_url(self.forwarder.upstream),
            self.backend_label,
            routes,
        )
        problem = await self.probe_backend()
        if problem is None:
            logger.info("sse_cache: backend %s answers", self.backend_label)
        else:
            logger.warning(
                "sse_cache: backend %s does not answer (%s): serving uncached until it does",
                self.backend_label,
                problem,
            )

    async def _checked_backend(self) -> str | None:
        """The health check's verdict on the backend: None when it answers. While the
        breaker skips it, at once (without waiting on it) until its cooldown has passed;
        then this check is the breaker's probe, as a request would be. (Without traffic,
        only the check probes it: a backend back after an outage would otherwise be reported
        down, and the instance kept out of rotation, until a request came.)"""
        breaker = self.cached.service.breaker
        if breaker.state is BreakerState.CLOSED:
            return await self.probe_backend()
        if not breaker.allow(time.monotonic()):
            return f"circuit {breaker.state.value}"
        try:
            problem = await self.probe_backend()
        except BaseException:
            breaker.cancelled()
            raise
        if problem is None:
            breaker.success()
        else:
            breaker.failure(time.monotonic(), problem)
        return problem

    async def probe_backend(self) -> str | None:
        """Read one key from the backend within :data:`BACKEND_CHECK_TIMEOUT` seconds: None
        when that worked, else what went wrong."""
        try:
            with anyio.fail_after(BACKEND_CHECK_TIMEOUT):
                await self.cached.service.backend.get("sse-cache:health-probe")
        except Exception as exc:
            return repr(exc)
        return None

    async def _ops(self, scope: Scope, send: Send) -> None:
        path = scope["path"]
        if path not in _OPS_PATHS:
            await send_json_error(send, 404, f"unknown endpoint {path}", "not_found")
            return
        method = scope["method"].upper()
        if method not in _OPS_METHODS:
            # They only report: a POST or a DELETE there is a client's mistake, answered as
            # one (never a 200 that reads as if something was done).
            allow = ", ".join(_OPS_METHODS)
            await send_json_error(
                send,
                405,
                f"{path} answers {' and '.join(_OPS_METHODS)} only, not {method}",
                "method_not_allowed",
                headers=[(b"allow", allow.encode())],
            )
            return
        head = method == "HEAD"
        if path == "/_sse_cache/metrics":
            body = self.metrics.render().encode()
            await _plain(send, 200, body, "text/plain; version=0.0.4; charset=utf-8", head=head)
        else:
            service = self.cached.service
            backend = service.backend
            problem = await self._checked_backend()
            breaker = service.breaker.state
            if problem is None:
                status, state = 200, "ok"
            else:
                status, state = 503, f"backend unavailable: {problem}"
            body = json.dumps(
                {
                    "status": state,
                    "backend": type(backend).__name__,
                    "breaker": breaker.value,
                    "uptime_seconds": round(time.time() - self.started, 3),
                }
            ).encode()
            await _plain(send, status, body, "application/json", head=head)


class _BodyStalled(Exception):
    """The client sent nothing of its request body for ``body_timeout`` seconds."""


def _body_in_time(receive: Receive, timeout: float) -> Receive:
    """``receive``, each wait for a piece of the request body bounded by ``timeout`` (then
    :class:`_BodyStalled`); unbounded once the body is complete (a wait for the client's
    disconnect may last as long as the response). A client that sent its head and then
    nothing, or part of its body, held its request's place (``--limit-concurrency``) for
    good: two of them locked every other caller out (helper-113)."""
    complete = False

    async def receiving() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        # A piece already there (a request's whole body, nearly always) is taken without a
        # timer: a cancel scope per request was ~50k instructions a hit, 5 % of the proxy's.
        # Only a receive that waits is bounded, from where it waits.
        call = receive().__await__()
        message: Message | None
        try:
            waiting_on = call.send(None)
        except StopIteration as done:
            message = done.value
        else:
            message = None
            with anyio.move_on_after(timeout):
                message = await _go_on(call, waiting_on)
            if message is None:
                raise _BodyStalled(
                    f"no byte of the request body came for {timeout:g} s (body_timeout)"
                )
        assert message is not None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receiving


@types.coroutine
def _go_on(call: Generator[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Await ``call`` (an awaitable's ``__await__()``), started by hand and now waiting on
    ``waiting_on`` (what its first ``send`` gave): what ``await`` would have done from there,
    as ``yield from`` does — what it waits on goes up to the event loop, what comes back (a
    result, a cancellation) goes down to it."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            call.close()
            raise
        except BaseException as exc:
            try:
                waiting_on = call.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = call.send(sent)
            except StopIteration as done:
                return done.value


class _Admission:
    """One request counted against :attr:`ProxyApp.limit_concurrency`, from its arrival to
    its response's end (a stream's last byte) or its client's leaving, released once.
    Released as the response's last message is sent, not after: a client that read the end
    of one answer and sends the next request at once must find the place free, whatever the
    first request still does after its end (storing it). Released as the client is known
    gone: a stream read on for others (a resume window, followers, finish-on-disconnect)
    counts against ``max_background``, not against this; held, it refused the client's own
    resume for as long as the upstream streamed (helper-99)."""

    __slots__ = ("_held", "_on_release")

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release = on_release  # (gives the place back)
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._on_release()

    def sending(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.release()
            await send(message)

        return sending

    def receiving(self, receive: Receive) -> Receive:
        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.release()
            return message

        return receiving


#: The ``retry-after`` of a request refused for ``limit_concurrency`` (seconds).
RETRY_AFTER_BUSY = b"1"

#: The proxy's own endpoints (:meth:`ProxyApp._ops`), and the methods they answer.
_OPS_PATHS = frozenset({"/_sse_cache/health", "/_sse_cache/metrics"})
_OPS_METHODS = ("GET", "HEAD")


async def _plain(
    send: Send, status: int, body: bytes, content_type: str, *, head: bool = False
) -> None:
    # A HEAD answer has the GET answer's headers (its length included) and no body.
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


def log_config(level: str = "info") -> dict[str, Any]:
    """The logging ``sse-cache proxy`` sets up, as a :func:`logging.config.dictConfig` dict,
    for an app made by :func:`create_proxy_app` and served another way
    (``uvicorn.run(app, log_config=log_config())``, or ``dictConfig`` in the app's module
    under ``uvicorn module:app``): the ``sse_cache`` and ``uvicorn`` loggers at ``level``
    (``critical``, ``error``, ``warning``, ``info``, ``debug``), one line format on stderr,
    the value of a ``key=`` query parameter shown as ``***`` in every line. Without it the
    ``sse_cache`` loggers have no handler (no startup line, no access lines) and uvicorn's
    access line shows Gemini's ``key=`` in full. An unknown level is a
    :class:`~sse_cache.errors.ConfigError`."""
    return proxy_log_config(level)


def create_proxy_app(
    upstream: str,
    backend: Any = DEFAULT_BACKEND,
    *,
    ttl: float | None = None,
    hooks: Iterable[Any] = (),
    upstream_timeout: float = 600.0,
    connect_timeout: float = 10.0,
    upstream_connections: int | None = None,
    access_log: bool = True,
    metrics_dir: str | None = None,
    metrics_interval: float = 1.0,
    limit_concurrency: int | None = None,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    **options: Any,
) -> ProxyApp:
    """The caching reverse proxy for ``upstream``: cacheable routes through
    :class:`CacheMiddleware` (``options`` are its keyword options), everything else passed
    through unchanged. ``upstream_timeout`` bounds each upstream read (and, unless
    ``join_timeout`` is given, a follower's wait for a live stream's next piece),
    ``connect_timeout`` the connection, ``upstream_connections`` the connections open to the
    upstream at once (None: no limit; a request past the limit waits for one).
    ``access_log``: an INFO line on the ``sse_cache.access`` logger per request on a cached
    route (cache status, key prefix, bytes, duration, why a miss was not stored).
    ``metrics_dir``: a directory the worker processes of one proxy share their metrics
    through, so that a scrape of any of them shows them all, each writing its figures every
    ``metrics_interval`` seconds, at each scrape and as it shuts down.
    ``limit_concurrency``: requests served at once (None: no limit), each counted from its
    arrival to its response's end (a stream's last byte); past it a request is answered
    ``503`` with ``retry-after``. ``/_sse_cache/health`` and ``/_sse_cache/metrics`` are
    never refused, and are not counted. ``body_timeout``: seconds a request's body may go
    without a byte arriving (None: no limit); then it is answered ``408`` and its connection
    closed."""
    metrics = Metrics(share_dir=metrics_dir, share_interval=metrics_interval)
    log = AccessLog() if access_log else None
    forwarder = Forwarder(
        upstream,
        timeout=upstream_timeout,
        connect_timeout=connect_timeout,
        max_connections=upstream_connections,
    )
    ours = [metrics, log] if log is not None else [metrics]
    # Keyed by the upstream too: proxies of different upstreams on one backend never share.
    # And a follower waits for a live stream's next piece as long as its producer waits for
    # the upstream's (followers gave up at 300 s of a reasoning model's silence, while the
    # producer, which waits upstream_timeout, went on; helper-102).
    given = options.get("options")
    if given is None:
        options.setdefault("origin", upstream)
        options.setdefault("join_timeout", upstream_timeout)
    elif not given.origin:
        options["options"] = dataclasses.replace(given, origin=upstream)
    cached = CacheMiddleware(forwarder, backend, ttl=ttl, hooks=[*ours, *hooks], **options)
    label = redact_url(backend) if isinstance(backend, str) else ""
    return ProxyApp(
        cached,
        metrics,
        forwarder,
        access_log=log,
        backend_label=label,
        limit_concurrency=limit_concurrency,
        body_timeout=body_timeout,
    )

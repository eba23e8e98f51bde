"""The httpx / httpx2 cache transports: one implementation for both libraries.

httpx 0.28 and httpx2 share the transport API (``handle_async_request`` / ``handle_request``,
``Request``, ``Response``, ``AsyncByteStream`` / ``SyncByteStream``); they differ only in the
module. The classes here are written against that API, with the library module as the class
attribute ``_lib``: :mod:`sse_cache.httpx` and :mod:`sse_cache.httpx2` subclass them together
with that library's base transport, and nothing here imports either library.

Every caching decision is the :class:`~sse_cache.http.service.CacheService`'s, exactly as in the
ASGI middleware (routes, keys, tenant scope, request controls, response headers, hits,
single-flight, what is stored). A transport only translates:

- a request on a cached route is read whole, then ``service.decide`` → ``service.exchange``;
- a hit (or a live identical stream) becomes a response whose stream replays the answer;
- a miss goes to the wrapped transport; its response stream is handed to the client chunk by
  chunk as it arrives, and each chunk is recorded once the client came back for the next one
  (deliver first, record second). The exchange is left when the body ends (stored if it
  completed) or when the client closes the response early (nothing stored).

With hooks, every response on a cached route reports its time to first byte (a
``first_byte`` notice, as from the ASGI middleware): from the start of ``handle_async_request``
/ ``handle_request`` to its first non-empty chunk handed to the client.

The sync transport drives the async service through an anyio blocking portal: one event loop
in a daemon thread per transport, started on first use and stopped by ``close()``. The
caller's thread never runs an event loop; the wrapped sync transport still does the network
I/O in the caller's thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import urllib.parse
import weakref
from functools import cache, partial
from types import ModuleType
from typing import Any, ClassVar

import anyio
import anyio.from_thread

from ._async_bodies import (
    NoExchange,
    _AsyncAnswerBody,
    _AsyncOpen,
    _AsyncPassBody,
    _AsyncTeeBody,
    _AsyncTeeStream,
)
from ._checks import integer
from ._sync_bodies import (
    _exiting,
    _SyncAnswerBody,
    _SyncOpen,
    _SyncPassBody,
    _SyncTeeBody,
    _SyncTeeStream,
    unless_closed,
)
from ._transport_bodies import _closed_under, _TransportClosed
from ._upstream_connections import (
    AsyncUpstreamTransport,
    UpstreamTransport,
    expire_connections_holding_excess,
)
from .backends import asyncio_only
from .errors import ConfigError
from .http._slots import BackgroundSlots
from .http._wire import body_ends_by_itself, json_error_body, merge_headers
from .http.options import CacheOptions
from .http.policy import CONTROL_HEADER_PREFIX, Decision, origin_of, path_as_sent
from .http.service import CacheService, Exchange
from .protocols import Backend

logger = logging.getLogger("sse_cache")

__all__ = ["AsyncCacheTransportBase", "CacheTransportBase"]

_SSE = "text/event-stream"
_CONTROL = CONTROL_HEADER_PREFIX.encode("latin-1")


@cache
def _stream_types(lib: ModuleType) -> dict[str, type[Any]]:
    """Our body classes as subclasses of ``lib``'s byte streams (a response only accepts
    those)."""
    types = {
        name: type(name, (base, getattr(lib, lib_base)), {"__module__": __name__, "_lib": lib})
        for name, base, lib_base in (
            ("AsyncTeeBody", _AsyncTeeBody, "AsyncByteStream"),
            ("AsyncTeeStream", _AsyncTeeStream, "AsyncByteStream"),
            ("AsyncAnswerBody", _AsyncAnswerBody, "AsyncByteStream"),
            ("AsyncPassBody", _AsyncPassBody, "AsyncByteStream"),
            ("SyncTeeBody", _SyncTeeBody, "SyncByteStream"),
            ("SyncTeeStream", _SyncTeeStream, "SyncByteStream"),
            ("SyncAnswerBody", _SyncAnswerBody, "SyncByteStream"),
            ("SyncPassBody", _SyncPassBody, "SyncByteStream"),
        )
    }
    types["AsyncTeeBody"]._answer_body = types["AsyncAnswerBody"]  # type: ignore[attr-defined]
    types["SyncTeeBody"]._answer_body = types["SyncAnswerBody"]  # type: ignore[attr-defined]
    return types


# -- requests ----------------------------------------------------------------------------


def _request_headers(request: Any) -> dict[str, str]:
    """Lower-case names; repeated headers joined with ``", "`` (as the ASGI middleware)."""
    out: dict[str, str] = {}
    for raw_name, raw_value in request.headers.raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _body_or_none(body: bytes, limit: int) -> bytes | None:
    return body if len(body) <= limit else None


def _forward(lib: ModuleType, request: Any, decision: Decision) -> Any:
    """The request as sent upstream: without our ``x-sse-cache-*`` controls and, when its
    answer may be stored, asking for an uncompressed body (a compressed one is not stored)."""
    raw: list[tuple[bytes, bytes]] = request.headers.raw
    storing = decision.cacheable and decision.controls.store
    kept = [
        (k, v)
        for k, v in raw
        if not k.lower().startswith(_CONTROL) and not (storing and k.lower() == b"accept-encoding")
    ]
    if storing:
        kept.append((b"accept-encoding", b"identity"))
    elif len(kept) == len(raw):
        return request  # nothing to change: forward the caller's request object itself
    return lib.Request(
        request.method,
        request.url,
        headers=kept,
        stream=request.stream,
        extensions=request.extensions,
    )


def _with_host(origin: str, scheme: str, host: str) -> str:
    """``origin`` (the URL's), keyed with the server a ``Host`` header of its own names
    unless it is the same (normalised as origins are: ``h:443`` on https is ``h``). Its text
    is escaped, no ``/`` left in it: a Host ``b/openai`` read as part of the path, and keyed
    as another request's (helper-161)."""
    try:
        named = "" if "@" in host else origin_of(f"{scheme}://{host.strip()}")
    except ConfigError:
        named = ""
    if named == origin:
        return origin
    # (As normalised where it is a host: h:443 and h on https key alike; as written else.)
    host = named.partition("://")[2] if named else host.strip().lower()
    return f"{origin} host={urllib.parse.quote(host, safe=':[]')}"


#: The decision for a request on no cached route, or a resume the cache cannot answer: passed
#: through, without our controls (set for every request with an SDK's ``default_headers``,
#: an ``x-sse-cache-namespace`` holding a user id reached the provider; helper-160).
_PASSED = Decision(reason="not a cached route")


def _error_response(lib: ModuleType, message: str) -> Any:
    # The same answer as the ASGI middleware's for an invalid control header.
    body = json_error_body(message)
    return lib.Response(
        400,
        headers=[("content-type", "application/json"), ("x-sse-cache", "bypass")],
        content=body,
    )


def _is_sse(headers: Any) -> bool:
    return str(headers.get("content-type", "")).split(";", 1)[0].strip().lower() == _SSE


# -- transports ---------------------------------------------------------------------------


_CLOSED_WITH_ITS_BACKEND = (
    "this AsyncCacheTransport is closed, and the backend it opened from its URL with it "
    "(closing its client closes it: `await client.aclose()`, or leaving `async with client:`). "
    "Build the transport with each client, or give it a Backend object, which it never closes"
)


#: The event loops a sync transport's portal can run.
_PORTAL_BACKENDS = ("asyncio", "trio")


class _Options:
    """The constructor shared by both transports (the same options as ``CacheMiddleware``)."""

    _lib: ClassVar[ModuleType]

    def __init_subclass__(cls, library: ModuleType | None = None, **kwargs: Any) -> None:
        # ``class AsyncCacheTransport(AsyncCacheTransportBase, httpx2.AsyncBaseTransport,
        # library=httpx2)``: the library module is all that differs between the two.
        super().__init_subclass__(**kwargs)
        if library is not None:
            cls._lib = library

    def __init__(
        self,
        backend: Backend | str,
        transport: Any = None,
        *,
        options: CacheOptions | None = None,
        max_background: int = 8,
        **keywords: Any,
    ) -> None:
        own = (
            "max_background",
            *(("portal_backend",) if isinstance(self, CacheTransportBase) else ()),
        )
        self._options = CacheOptions.of(options, keywords, own)
        #: At most ``max_background`` streams are read on for a resume window at once.
        self._holds = BackgroundSlots(
            integer("max_background", max_background, minimum=0, what="a whole number >= 0"),
            self._options.hooks,
        )
        if transport is not None:
            # Checked before the backend is opened: else a wrong object (a URL, the class
            # itself, a sync transport in an async one) fails only at the first request.
            self._check_transport(transport)
        #: The backend's URL when the transport opened it (and so can open it again).
        self._backend_url = backend if isinstance(backend, str) else None
        self.service = CacheService(backend, self._options)
        self.transport: Any = expire_connections_holding_excess(
            transport if transport is not None else self._default_transport()
        )
        #: Why requests are refused (the async transport after aclose()), or "".
        self._refused = ""
        _transports.add(self)

    def _check_transport(self, transport: object) -> None:
        lib = self._lib.__name__
        method, example = (
            ("handle_async_request", "AsyncHTTPTransport")
            if isinstance(self, AsyncCacheTransportBase)
            else ("handle_request", "HTTPTransport")
        )
        if isinstance(transport, type) or not callable(getattr(transport, method, None)):
            given = (
                f"the class {transport.__name__} (call it)"
                if isinstance(transport, type)
                else repr(transport)
            )
            raise ConfigError(
                f"transport must be a transport object with a {method} method, such as "
                f"{lib}.{example}(), got {given}"
            )
        other = "httpx" if lib == "httpx2" else "httpx2"
        if type(transport).__module__.partition(".")[0] == other:
            # It has the method, but speaks the other library's requests and responses:
            # every cached request failed inside it (a bare AssertionError; helper-82).
            raise ConfigError(
                f"transport is {other}'s {type(transport).__name__}, and this is the transport "
                f"of sse_cache.{lib}, for {lib} clients: give it a {lib} transport, or use "
                f"sse_cache.{other} with {other}"
            )

    def _forked(self) -> None:
        """In a child process just forked: the backend's threads and connections (and a sync
        transport's portal thread) are the parent's. A backend opened from a URL is opened
        anew; the parent's objects are kept, never closed here (closing them could close
        what the parent still uses)."""
        self._inherited = self.service
        inherited: list[object] = [self._holds]
        if self._backend_url is not None:
            self.service = CacheService(self._backend_url, self._options)
            inherited += self._inherited.live_registries()
        # The parent's streams read on without their client are not read here: none of
        # them holds a place (helper-172: the child refused its own, for good), and the
        # metrics report the child's own streams, not the parent's.
        self._holds = BackgroundSlots(self._holds.bound, self._options.hooks)
        for hook in self._options.hooks:
            forget = getattr(hook, "forget", None)
            if callable(forget):
                for watched in inherited:
                    forget(watched)

    def _default_transport(self) -> Any:
        raise NotImplementedError

    def _decide(self, request: Any, body: bytes) -> Decision:
        service = self.service
        url = request.url
        return service.decide(
            request.method,
            _request_path(url),
            _request_headers(request),
            _body_or_none(body, service.policy.max_body_bytes),
            url.query.decode("latin-1"),
            self._origin(request),
        )

    def _origin(self, request: Any) -> str | None:
        # The server is part of the key: two servers asked the same never share an entry.
        # (An origin in the options wins, None: replicas of one service, keyed as one.)
        if self.service.policy.origin:
            return None
        url = request.url
        netloc = url.netloc.decode()
        origin = origin_of(f"{url.scheme}://{netloc}")
        # A Host header of its own names another server at that address (virtual hosts
        # behind one ingress): two such were answered from one entry (helper-160). The
        # client sets it to the URL's otherwise.
        host = request.headers.get("host")
        if host is None or host == netloc:
            return origin
        return _with_host(origin, url.scheme, host)

    def _started(self, started: float) -> float | None:
        # When the request arrived, if anyone wants its time to first byte (the hooks).
        return started if self.service.hooks else None

    def _passthrough(self, upstream: Any, ex: Exchange, opened: _AsyncOpen | _SyncOpen) -> Any:
        # Nothing to record: the upstream's response as it is, plus our headers (its body
        # wrapped only to note its first bytes, when they are reported).
        stream = upstream.stream
        if opened.timing:
            kind = "AsyncPassBody" if isinstance(opened, _AsyncOpen) else "SyncPassBody"
            stream = _stream_types(self._lib)[kind](stream, opened)
        return self._relay(upstream, ex, stream)

    def _relay(self, upstream: Any, ex: Exchange, stream: Any) -> Any:
        """The upstream's response with our headers, its body read from ``stream``."""
        return self._lib.Response(
            upstream.status_code,
            headers=merge_headers(upstream.headers.raw, ex.headers()),
            stream=stream,
            extensions=upstream.extensions,
        )


#: Every transport of this process, for :func:`_after_fork_in_child`.
_transports: weakref.WeakSet[_Options] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for transport in list(_transports):
        transport._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AsyncCacheTransportBase(_Options):
    """An async transport that caches streamed (and non-streamed) LLM answers.

    ``backend``: a :class:`~sse_cache.protocols.Backend` or a URL (``sqlite:///cache.db``,
    ``redis://...``; then the transport owns it and :meth:`aclose` closes it). ``transport``:
    the transport that reaches the network (default: the library's own, through the proxy the
    environment names, as its client would go).
    ``routes``, ``tenant``, ``ttl``, ``max_entry_bytes``, ``max_body_bytes``, ``pacing``,
    ``hooks``, ``backend_timeout``, ``single_flight``, ``keyer``, ``codec``: as for
    :class:`~sse_cache.asgi.CacheMiddleware` (the same :class:`~sse_cache.http.service.CacheService`
    decides everything: routes ``POST /v1/responses``, ``/v1/chat/completions``,
    ``/v1/messages``, Gemini's ``…:generateContent`` / ``:streamGenerateContent``; tenant
    scope from the request's API keys; request controls).

    Responses on a cached route carry ``x-sse-cache: hit | miss | bypass | refresh | shared``
    and ``x-sse-cache-key`` (hits also ``age`` and ``x-sse-cache-ttl``). A miss's body reaches
    the client as it arrives and is stored if it completes; a response the client closes
    before its end stores nothing (unless the completing event had already been delivered:
    the openai SDK stops at chat's ``[DONE]``). An invalid control header is answered ``400``
    without calling the upstream. Other requests pass through untouched.

    ``resume_window``: a response closed early is read on for up to that many seconds (on
    asyncio), so that the program can resume it — at most ``max_background`` (8) at once,
    as in the middleware; past that, as without a window.
    """

    #: Set while :meth:`aclose` runs: another close waits for it.
    _closing_now: anyio.Event | None = None

    def _default_transport(self) -> Any:
        return AsyncUpstreamTransport(self._lib)

    async def handle_async_request(self, request: Any) -> Any:
        if self._refused:
            # Served on, every request would be an uncached miss with a warning at most.
            raise RuntimeError(self._refused)
        started = time.monotonic()
        lib = self._lib
        service = self.service
        types = _stream_types(lib)
        if request.method == "GET":
            # A client resuming a stream by its id (Responses): from its live stream while it
            # is produced, from the cache once stored; else the upstream answers. (Its time to
            # first byte is not reported: the ASGI middleware reports none for a resume.)
            answer = await service.resume("GET", *_resume_args(request), self._origin(request))
            if answer is not None:
                opened = _AsyncOpen(NoExchange(answer))
                await opened.enter()
                body = types["AsyncAnswerBody"](answer.chunks, opened, _read_timeout(request))
                return lib.Response(answer.status, headers=answer.headers, stream=body)
        if service.policy.match(request.method, _request_path(request.url)) is None:
            return await self.transport.handle_async_request(_forward(lib, request, _PASSED))
        try:
            decision = self._decide(request, await request.aread())
        except ConfigError as exc:
            return _error_response(lib, str(exc))
        opened = _AsyncOpen(service.exchange(decision, publish=True), self._started(started))
        ex = await opened.enter()
        handed_over = False  # ... to its followers, with the exchange: theirs to leave
        try:
            answer = ex.answer
            if answer is not None:
                return lib.Response(
                    answer.status,
                    headers=answer.headers,
                    stream=types["AsyncAnswerBody"](answer.chunks, opened, _read_timeout(request)),
                )
            upstream = await self.transport.handle_async_request(_forward(lib, request, decision))
            tee = None
            try:
                tee = await ex.tee(
                    upstream.status_code,
                    upstream.headers.multi_items(),
                    ends_by_itself=_ends_by_itself(upstream),
                )
                if tee is not None:
                    await tee.flush()  # the head, to followers in other processes at once
            except BaseException:
                if tee is not None:
                    # Cancelled while the head went to other processes: the followers here
                    # have it, and read the upstream on, as after a close at the head
                    # (helper-139: they were all aborted, the upstream cut).
                    body = types["AsyncTeeBody"](upstream.stream, tee, opened, self._holds)
                    handed_over = body.hand_over()
                if not handed_over:
                    await upstream.aclose()
                raise
            if tee is None:
                await opened.leave()
                return self._passthrough(upstream, ex, opened)
            body = types["AsyncTeeBody"](upstream.stream, tee, opened, self._holds)
            return self._relay(upstream, ex, types["AsyncTeeStream"](body))
        except BaseException as exc:
            if not handed_over:
                await opened.leave(exc)
            raise

    async def aclose(self) -> None:
        """Close the wrapped transport, and the backend if it was opened from a URL. A
        transport whose backend closed with it refuses requests afterwards (``RuntimeError``);
        one given a backend object serves on (that backend is the caller's to close).

        A stream whose client has gone while it is read on for others (followers, in other
        processes too, or a resume window) ends first, failed for its readers (stored if
        what was relayed holds the completing event), while its upstream and backend are
        open: followers elsewhere are told at once, not after a lease's silence. A close
        called while another is under way (from another task) waits for that one."""
        closing = self._closing_now
        if closing is not None:
            # (helper-144: a second close found the streams taken by the first, and closed
            # the backend while the first still published their failures.)
            await closing.wait()
            return
        closing = self._closing_now = anyio.Event()
        try:
            # Shielded: cancelled midway, the streams not ended yet would have the backend
            # closed under them all the same (each one's end is bounded by the backend's
            # timeouts).
            with anyio.CancelScope(shield=True):
                await self.service.end_handed_over("the transport was closed")
            await self.transport.aclose()
        finally:
            try:
                if self._backend_url is not None:
                    self._refused = _CLOSED_WITH_ITS_BACKEND
                await self.service.aclose()
            finally:
                self._closing_now = None
                closing.set()


class CacheTransportBase(_Options):
    """The sync twin of :class:`AsyncCacheTransportBase` (same options and behaviour);
    ``transport`` defaults to the library's own, as the async one's does.

    The cache itself is async (backends, single-flight): the transport runs it on an anyio
    blocking portal — an event loop in a daemon thread owned by this transport, started on
    first use and stopped by :meth:`close`. Callers never need an event loop of their own,
    and the network I/O stays in the caller's thread. ``portal_backend``: the portal's event
    loop, ``"asyncio"`` (default; needed by the Redis backend) or ``"trio"``.
    """

    def __init__(
        self,
        backend: Backend | str,
        transport: Any = None,
        *,
        portal_backend: str = "asyncio",
        **options: Any,
    ) -> None:
        if portal_backend not in _PORTAL_BACKENDS:  # (before a backend is opened)
            raise ConfigError(
                f"portal_backend must be one of {', '.join(map(repr, _PORTAL_BACKENDS))}, "
                f"got {portal_backend!r}"
            )
        if portal_backend == "trio" and asyncio_only(backend):
            # (Accepted, every request's lookup failed and the cache was never used.)
            raise ConfigError(
                "portal_backend='trio' cannot run the Redis backend: redis-py's client runs on "
                "asyncio only; use portal_backend='asyncio' (the default)"
            )
        super().__init__(backend, transport, **options)
        self._portal_backend = portal_backend
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        # One close() at a time: another thread's waits for it, then has nothing to do.
        self._closing_lock = threading.Lock()
        #: Set as close() begins: responses still read in other threads end with the
        #: library's ReadError (see _SyncOpen.call). Held by this transport and each of its
        #: open exchanges (_SyncOpen): once it is collected, no response of this transport
        #: is open or can be, and its portal is stopped (_stop_dropped).
        self._closing = threading.Event()
        self._dropped: weakref.finalize[Any, Any] | None = None
        self._unusable = ""  # why, after a fork, this transport cannot serve
        #: Misses whose clients have all left while a drain thread reads on (see close).
        self._draining: weakref.WeakSet[Any] = weakref.WeakSet()

    def _forked(self) -> None:
        # The portal's thread was not forked, and a call into it would wait for ever; its
        # lock may have been held by a thread of the parent. A portal is started anew on
        # first use, for a backend opened anew — one given as an object cannot be.
        used = self._portal is not None
        if self._dropped is not None:
            self._dropped.detach()  # (the parent's portal: not running here)
            self._dropped = None
        self._lock = threading.Lock()
        self._closing_lock = threading.Lock()
        self._portal = self._thread = None
        # The parent's drain threads were not forked: their misses are the parent's (a close
        # here settled them through the parent's portal, and waited for ever; helper-108).
        self._draining = weakref.WeakSet()
        super()._forked()
        if used and self._backend_url is None:
            self._unusable = (
                "this CacheTransport was used before the process forked, with a backend given "
                "as an object, which cannot be carried into the child: create the transport "
                "in each process after the fork, or give it the backend's URL"
            )

    def _default_transport(self) -> Any:
        return UpstreamTransport(self._lib)

    @property
    def portal(self) -> anyio.from_thread.BlockingPortal:
        """The blocking portal the cache runs on (started on first use): run your own
        coroutines against the same backend with ``transport.portal.call(fn, *args)``, while
        you hold the transport (one dropped unclosed stops its portal once collected)."""
        portal = self._portal
        if portal is not None:
            return portal
        with self._lock:
            if self._closed:
                raise RuntimeError("this CacheTransport is closed")
            if self._unusable:
                raise ConfigError(self._unusable)
            if self._portal is None:
                self._portal, self._thread = _start_portal(self._portal_backend)
                # A transport dropped unclosed (a client made per call and never closed, as
                # the sync SDKs are used) kept its thread, its loop and an owned backend's
                # sockets for the life of the process (helper-131: 20 dropped, 20 threads).
                self._dropped = weakref.finalize(
                    self._closing, _stop_dropped, self._portal, self.service
                )
                self._dropped.atexit = False
            return self._portal

    def handle_request(self, request: Any) -> Any:
        started = time.monotonic()
        lib = self._lib
        service = self.service
        if request.method == "GET":
            # A client resuming a stream by its id (Responses): see the async transport.
            portal = self.portal
            try:
                answer = unless_closed(
                    self._closing,
                    portal.call,
                    service.resume,
                    "GET",
                    *_resume_args(request),
                    self._origin(request),
                )
                if answer is not None:
                    opened = _SyncOpen(
                        NoExchange(answer),
                        portal,
                        closing=self._closing,
                    )
                    opened.enter()
                    body = _stream_types(lib)["SyncAnswerBody"](
                        answer.chunks, opened, portal, _read_timeout(request)
                    )
                    return lib.Response(answer.status, headers=answer.headers, stream=body)
            except _TransportClosed as exc:
                raise _closed_under(lib) from exc
        if service.policy.match(request.method, _request_path(request.url)) is None:
            return self.transport.handle_request(_forward(lib, request, _PASSED))
        try:
            decision = self._decide(request, request.read())
        except ConfigError as exc:
            return _error_response(lib, str(exc))
        portal = self.portal
        opened = _SyncOpen(
            service.exchange(decision, publish=True),
            portal,
            self._started(started),
            self._closing,
        )
        types = _stream_types(lib)
        settled = False  # the exchange is the body's to leave (handed over, or left)
        try:
            ex = opened.enter()
            answer = ex.answer
            if answer is not None:
                return lib.Response(
                    answer.status,
                    headers=answer.headers,
                    stream=types["SyncAnswerBody"](
                        answer.chunks, opened, portal, _read_timeout(request)
                    ),
                )
            upstream = self.transport.handle_request(_forward(lib, request, decision))
            tee = None
            try:
                tee = opened.call(
                    partial(ex.tee, ends_by_itself=_ends_by_itself(upstream)),
                    upstream.status_code,
                    upstream.headers.multi_items(),
                )
                if tee is not None:
                    opened.call(tee.flush)  # the head, to followers in other processes at once
            except BaseException:
                if tee is None:
                    upstream.close()
                    raise
                # Interrupted (a signal's exception in this thread) while the head went to
                # other processes — or the transport closed meanwhile: the followers here
                # have the head, and read the upstream on, as after a close at the head (the
                # body's close hands it over, or closes it and leaves the exchange;
                # helper-139: they were all aborted). (The head's publish goes on in the
                # portal meanwhile: the channel's writes are queued behind it.)
                types["SyncTeeBody"](
                    upstream.stream, tee, opened, portal, self._holds, self._draining
                ).close_unread()
                settled = True
                raise
            if tee is None:
                opened.leave()
                return self._passthrough(upstream, ex, opened)
            body = types["SyncTeeBody"](
                upstream.stream, tee, opened, portal, self._holds, self._draining
            )
            return self._relay(upstream, ex, types["SyncTeeStream"](body))
        except _TransportClosed as exc:
            if not settled:
                opened.leave()
            raise _closed_under(lib) from exc
        except BaseException as exc:
            if not settled:
                opened.leave(exc)
            raise

    def close(self) -> None:
        """Close the wrapped transport and the backend (if opened from a URL), then stop
        the portal thread. Responses still open are abandoned (nothing of them is stored),
        except a stream every client of which has left while its upstream was read on for
        them: it is stored if what they had holds the answer's completing event (each client
        stopped at chat's [DONE], as the SDKs do, and the program closes at once); one still
        read on for followers (here, or in other processes with ``cross_process``) fails
        first, so that they are told at once and its lease is released.
        The transport cannot be used afterwards. A transport never closed does not keep the
        program from exiting: its portal runs in a daemon thread."""
        with self._closing_lock:
            if self._closed:
                return
            for body in list(self._draining):
                body.settle()  # before the backend closes: its answer may be stored
            self._closing.set()
            try:
                self.transport.close()
            finally:
                self._stop()

    def _stop(self) -> None:
        if self._unusable:
            # In a child forked after use, with a backend given as an object: it and the
            # portal it ran on are the parent's (nothing of them runs here; never closed
            # here). Closing is all the same allowed: leaving `with client:` calls it.
            with self._lock:
                self._closed = True
            return
        portal = self.portal  # the backend is async: it is closed on the portal's loop
        with self._lock:
            self._closed = True
            thread = self._thread
            self._portal = self._thread = None
            if self._dropped is not None:
                self._dropped.detach()  # (stopped here)
                self._dropped = None
        try:
            portal.call(self.service.aclose)
        finally:
            portal.call(portal.stop, True)
            if thread is not None:
                thread.join()


def _read_timeout(request: Any) -> float | None:
    """The request's read timeout (httpx's ``timeout.read``): a hit or a follower waits at
    most this long for each chunk, as a client reading the upstream would."""
    timeout = request.extensions.get("timeout")
    read = timeout.get("read") if isinstance(timeout, dict) else None
    return float(read) if isinstance(read, (int, float)) else None


def _resume_args(request: Any) -> tuple[str, str, dict[str, str]]:
    url = request.url
    return _request_path(url), url.query.decode("latin-1"), _request_headers(request)


def _request_path(url: Any) -> str:
    # (httpx's raw_path holds the query too.)
    return path_as_sent(url.raw_path, url.path)


def _start_portal(backend: str) -> tuple[anyio.from_thread.BlockingPortal, threading.Thread]:
    """A blocking portal whose event loop runs in a daemon thread of its own. (anyio's
    ``start_blocking_portal`` runs it in a worker of a thread pool, which the interpreter
    joins at exit: a transport that was never closed — the usual way the sync SDKs are
    used — would keep the program from ever exiting.)"""
    ready: queue.SimpleQueue[anyio.from_thread.BlockingPortal | BaseException] = queue.SimpleQueue()

    async def run() -> None:
        async with anyio.from_thread.BlockingPortal() as portal:
            ready.put(portal)
            await portal.sleep_until_stopped()

    def main() -> None:
        try:
            anyio.run(run, backend=backend)
        except BaseException as exc:  # e.g. trio is not installed: tell the caller
            ready.put(exc)

    thread = threading.Thread(target=main, name="sse-cache-portal", daemon=True)
    thread.start()
    result = ready.get()
    if isinstance(result, BaseException):
        raise result
    return result, thread


def _ends_by_itself(upstream: Any) -> bool:
    # (The transport's response: its headers as the upstream sent them, framing included.)
    return body_ends_by_itself(upstream.extensions.get("http_version"), upstream.headers)


def _stop_dropped(portal: anyio.from_thread.BlockingPortal, service: CacheService) -> None:
    # A sync transport collected unclosed, with every response of it (see its _closing):
    # its portal and a backend it opened go too. A finalizer runs in whichever thread
    # collected it, the portal's own included, where a blocking call into the portal would
    # wait for ever: stopped from a thread of its own. (Not at exit: the daemon thread ends.)
    if _exiting():
        return
    threading.Thread(
        target=_stop_quietly, args=(portal, service), name="sse-cache-dropped", daemon=True
    ).start()


def _stop_quietly(portal: anyio.from_thread.BlockingPortal, service: CacheService) -> None:
    try:
        portal.call(service.aclose)
    except Exception as exc:  # (the backend failed to close: its sockets go with it)
        logger.debug("sse_cache: closing a dropped transport's backend failed: %r", exc)
    finally:
        with contextlib.suppress(Exception):
            portal.call(portal.stop, True)

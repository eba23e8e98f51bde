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

The sync transport drives the async service through an anyio blocking portal: one event loop
in a daemon thread per transport, started on first use and stopped by ``close()``. The
caller's thread never runs an event loop; the wrapped sync transport still does the network
I/O in the caller's thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from functools import cache
from types import ModuleType, TracebackType
from typing import Any, ClassVar

import anyio
import anyio.from_thread

from .errors import ConfigError
from .flight import SharedStreamAborted
from .http._wire import close_iterator, json_error_body, merge_headers
from .http.options import CacheOptions
from .http.policy import CONTROL_HEADER_PREFIX, Decision
from .http.service import CacheService, Exchange, ResponseTee
from .protocols import Backend

__all__ = ["AsyncCacheTransportBase", "CacheTransportBase"]

_SSE = "text/event-stream"
_CONTROL = CONTROL_HEADER_PREFIX.encode("latin-1")
_ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
_NO_EXC: _ExcInfo = (None, None, None)


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


async def _feed(tee: ResponseTee, chunk: bytes) -> None:
    # One portal hop for both: record the chunk, and publish what was relayed to other
    # processes following this stream (cross-process single-flight), if any.
    tee.feed(chunk)
    await tee.flush()


def _aborted(lib: ModuleType, exc: SharedStreamAborted) -> Exception:
    """What a follower's client sees when the live stream it read stopped before its end: the
    library's error for a response cut short, as when a server drops the connection (the
    SDKs raise their connection error)."""
    return lib.RemoteProtocolError(f"sse-cache: {exc}")  # type: ignore[no-any-return]


# -- async --------------------------------------------------------------------------------


class _AsyncOpen:
    """An exchange entered by ``handle_async_request`` and left when the response ends."""

    __slots__ = ("_cm", "open")

    def __init__(self, cm: AbstractAsyncContextManager[Exchange]) -> None:
        self._cm = cm
        self.open = False

    async def enter(self) -> Exchange:
        ex = await self._cm.__aenter__()
        self.open = True
        return ex

    async def leave(self, exc: BaseException | None = None) -> None:
        if not self.open:
            return
        self.open = False
        # Shielded: a store that has begun finishes even if the reader is being cancelled
        # (every backend call is bounded by ``backend_timeout``).
        with anyio.CancelScope(shield=True):
            if exc is None:
                await self._cm.__aexit__(None, None, None)
            else:
                await self._cm.__aexit__(type(exc), exc, exc.__traceback__)


_tasks: set[asyncio.Task[None]] = set()


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _background(work: Coroutine[Any, Any, None]) -> None:
    # A task that outlives the request (a resume window): kept referenced until it ends.
    task = asyncio.get_running_loop().create_task(work, name="sse-cache resume window")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class _AsyncTeeBody:
    """The body of a miss: the upstream's chunks, each handed to the client (and to the
    followers of its live stream) first and recorded when the client asks for the next one.

    When the client closes it early while followers still read, the upstream is handed over
    to them: they read it on, in turn, until its end (stored if it completed) or until the
    last of them leaves (then it is closed)."""

    def __init__(self, inner: Any, tee: ResponseTee, opened: _AsyncOpen) -> None:
        self._inner = inner
        self._it: AsyncIterator[bytes] | None = None
        self._tee = tee
        self._opened = opened
        self._pending = b""
        self._handed_over = False

    # One iterator for every ``async for``: a client that drains the rest of a response it
    # stopped reading (the openai SDK after ``[DONE]``) continues where it was.
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._handed_over:
            raise StopAsyncIteration
        chunk = await self._next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _next(self) -> bytes | None:
        tee = self._tee
        if self._pending:
            tee.feed(self._pending)
            self._pending = b""
            await tee.flush()  # to other processes following this stream, if any
        if not self._opened.open:
            return None
        it = self._it
        if it is None:
            it = self._it = aiter(self._inner)
        try:
            chunk: bytes = await it.__anext__()
        except StopAsyncIteration:
            tee.end()
            await self._finish()
            return None
        except BaseException as exc:
            tee.fail(f"the upstream body failed: {exc!r}")
            await self._finish(exc)
            raise
        tee.relay(chunk)
        self._pending = chunk
        return chunk

    async def _finish(self, exc: BaseException | None = None) -> None:
        try:
            if self._handed_over:
                # No client will close this response: close the upstream's (its connection
                # goes back to the pool).
                await close_iterator(self._it)
                await self._inner.aclose()
        finally:
            await self._opened.leave(exc)  # stores the answer if it completed

    async def _pull(self) -> bool:
        # For the followers, once the client has gone: one more chunk into the live stream.
        return await self._next() is not None

    async def _abandon(self) -> None:
        try:
            await close_iterator(self._it)
            await self._inner.aclose()
        finally:
            self._tee.fail("every reader left before the stream ended")
            await self._opened.leave()

    async def aclose(self) -> None:
        if self._handed_over:
            return
        tee = self._tee
        if self._opened.open and not tee.ended:
            if self._pending:
                tee.feed(self._pending)
                self._pending = b""
            # A resume window needs a task that reads on while no one reads: on asyncio, a
            # task of the loop (trio has none outside a nursery: no window there).
            hold = tee.resume_window is not None and _on_asyncio()
            if tee.client_left(hold=hold):
                self._handed_over = True
                tee.hand_over(self._pull, self._abandon)
                if hold:
                    _background(tee.read_through_window())
                return
        await self._abandon()


class _AsyncAnswerBody:
    """The body of a hit or of a joined live stream."""

    _lib: ClassVar[ModuleType]

    def __init__(self, chunks: AsyncIterator[bytes], opened: _AsyncOpen) -> None:
        self._chunks = chunks
        self._opened = opened

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self._opened.open:
            raise StopAsyncIteration
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            await self._opened.leave()
            raise
        except SharedStreamAborted as exc:
            await self._opened.leave(exc)
            raise _aborted(self._lib, exc) from exc
        except BaseException as exc:
            await self._opened.leave(exc)
            raise

    async def aclose(self) -> None:
        try:
            await close_iterator(self._chunks)
        finally:
            await self._opened.leave()


# -- sync ---------------------------------------------------------------------------------


class _SyncOpen:
    """An exchange entered by ``handle_request`` (in the portal's event loop, in one task
    for its whole life) and left when the response ends."""

    __slots__ = ("_cm", "open")

    def __init__(self, cm: AbstractContextManager[Exchange]) -> None:
        self._cm = cm
        self.open = False

    def enter(self) -> Exchange:
        ex = self._cm.__enter__()
        self.open = True
        return ex

    def leave(self, exc: BaseException | None = None) -> None:
        if not self.open:
            return
        self.open = False
        if exc is None:
            self._cm.__exit__(None, None, None)
        else:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)


async def _pass(tee: ResponseTee, delivered: bytes, chunk: bytes) -> bool:
    # One portal hop per chunk: record the chunk the client had, hand the new one to the
    # followers, publish to other processes. False when no one wants the stream any more.
    tee.feed(delivered)
    tee.relay(chunk)
    await tee.flush()
    return tee.wanted


def _end(tee: ResponseTee, delivered: bytes) -> None:
    tee.feed(delivered)
    tee.end()


class _SyncTeeBody:
    """The sync twin of :class:`_AsyncTeeBody`; the recording and the live stream live in
    the portal's loop (followers of the same stream wait there). When the client closes it
    early while followers still read, a daemon thread reads the upstream on for them."""

    def __init__(
        self,
        inner: Any,
        tee: ResponseTee,
        opened: _SyncOpen,
        portal: anyio.from_thread.BlockingPortal,
    ) -> None:
        self._inner = inner
        self._it: Iterator[bytes] | None = None
        self._tee = tee
        self._opened = opened
        self._portal = portal
        self._pending = b""
        self._handed_over = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._handed_over:
            raise StopIteration
        chunk = self._next()
        if chunk is None:
            raise StopIteration
        return chunk

    def _next(self) -> bytes | None:
        if not self._opened.open:
            return None
        it = self._it
        if it is None:
            it = self._it = iter(self._inner)
        try:
            chunk: bytes = next(it)
        except StopIteration:
            self._portal.call(_end, self._tee, self._pending)
            self._pending = b""
            self._opened.leave()  # stores the answer if it completed
            return None
        except BaseException as exc:
            self._portal.call(self._tee.fail, f"the upstream body failed: {exc!r}")
            self._opened.leave(exc)
            raise
        self._portal.call(_pass, self._tee, self._pending, chunk)
        self._pending = chunk
        return chunk

    def _drain(self) -> None:
        # The client has gone and followers read on: read the upstream for them until its
        # end, or until no one wants it any more.
        try:
            while self._next() is not None:
                if not self._portal.call(lambda: self._tee.wanted):
                    self._abandon()
                    return
        except BaseException:  # already failed for the followers, and the exchange left
            return
        finally:
            self._inner.close()  # no client will close this response

    def _abandon(self) -> None:
        try:
            self._inner.close()
        finally:
            if self._opened.open:
                self._portal.call(self._tee.fail, "every reader left before the stream ended")
            self._opened.leave()

    def close(self) -> None:
        if self._handed_over:
            return
        tee = self._tee
        if self._opened.open and self._portal.call(_client_left, tee, self._pending):
            self._pending = b""
            self._handed_over = True
            threading.Thread(target=self._drain, name="sse-cache-drain", daemon=True).start()
            if tee.resume_window is not None:
                # The drain thread reads on while the stream is held; the window's end is
                # kept in the portal's loop.
                self._portal.start_task_soon(tee.release_after_window)
            return
        self._abandon()


async def _nothing() -> None:
    """The followers of a sync producer's stream need no action to abandon it: its drain
    thread sees that nobody wants it after its next chunk."""


def _client_left(tee: ResponseTee, delivered: bytes) -> bool:
    if tee.ended:
        return False
    tee.feed(delivered)
    return tee.client_left(_nothing, hold=tee.resume_window is not None)


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


class _SyncAnswerBody:
    """A hit or a joined live stream, read through the portal (replays come in ~64 KiB
    chunks, so one portal hop costs little per event)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        opened: _SyncOpen,
        portal: anyio.from_thread.BlockingPortal,
    ) -> None:
        self._chunks = chunks
        self._opened = opened
        self._portal = portal

    def __iter__(self) -> Iterator[bytes]:
        return self

    _lib: ClassVar[ModuleType]

    def __next__(self) -> bytes:
        if not self._opened.open:
            raise StopIteration
        try:
            chunk = self._portal.call(_next_chunk, self._chunks)
        except SharedStreamAborted as exc:
            self._opened.leave(exc)
            raise _aborted(self._lib, exc) from exc
        except BaseException as exc:
            self._opened.leave(exc)
            raise
        if chunk is None:
            self._opened.leave()
            raise StopIteration
        return chunk

    def close(self) -> None:
        try:
            if self._opened.open:
                self._portal.call(close_iterator, self._chunks)
        finally:
            self._opened.leave()


@cache
def _stream_types(lib: ModuleType) -> dict[str, type[Any]]:
    """Our body classes as subclasses of ``lib``'s byte streams (a response only accepts
    those)."""
    return {
        name: type(name, (base, getattr(lib, lib_base)), {"__module__": __name__, "_lib": lib})
        for name, base, lib_base in (
            ("AsyncTeeBody", _AsyncTeeBody, "AsyncByteStream"),
            ("AsyncAnswerBody", _AsyncAnswerBody, "AsyncByteStream"),
            ("SyncTeeBody", _SyncTeeBody, "SyncByteStream"),
            ("SyncAnswerBody", _SyncAnswerBody, "SyncByteStream"),
        )
    }


# -- transports ---------------------------------------------------------------------------


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
        **keywords: Any,
    ) -> None:
        self.service = CacheService(backend, CacheOptions.of(options, keywords))
        self.transport: Any = transport if transport is not None else self._default_transport()

    def _default_transport(self) -> Any:
        raise NotImplementedError

    def _decide(self, request: Any, body: bytes) -> Decision:
        service = self.service
        return service.decide(
            request.method,
            request.url.path,
            _request_headers(request),
            _body_or_none(body, service.policy.max_body_bytes),
            request.url.query.decode("latin-1"),
        )

    def _passthrough(self, upstream: Any, ex: Exchange) -> Any:
        # Nothing to record: the upstream's response as it is, plus our headers.
        return self._lib.Response(
            upstream.status_code,
            headers=merge_headers(upstream.headers.raw, ex.headers()),
            stream=upstream.stream,
            extensions=upstream.extensions,
        )


class AsyncCacheTransportBase(_Options):
    """An async transport that caches streamed (and non-streamed) LLM answers.

    ``backend``: a :class:`~sse_cache.protocols.Backend` or a URL (``sqlite:///cache.db``,
    ``redis://...``; then the transport owns it and :meth:`aclose` closes it). ``transport``:
    the transport that reaches the network (default: the library's ``AsyncHTTPTransport()``).
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
    """

    def _default_transport(self) -> Any:
        return self._lib.AsyncHTTPTransport()

    async def handle_async_request(self, request: Any) -> Any:
        lib = self._lib
        service = self.service
        types = _stream_types(lib)
        if request.method == "GET":
            # A client resuming a stream by its id (Responses): from its live stream while it
            # is produced, from the cache once stored; else the upstream answers.
            answer = await service.resume("GET", *_resume_args(request))
            if answer is not None:
                opened = _AsyncOpen(_no_exchange())
                await opened.enter()
                body = types["AsyncAnswerBody"](answer.chunks, opened)
                return lib.Response(answer.status, headers=answer.headers, stream=body)
        if service.policy.match(request.method, request.url.path) is None:
            return await self.transport.handle_async_request(request)
        try:
            decision = self._decide(request, await request.aread())
        except ConfigError as exc:
            return _error_response(lib, str(exc))
        opened = _AsyncOpen(service.exchange(decision, publish=True))
        ex = await opened.enter()
        try:
            answer = ex.answer
            if answer is not None:
                return lib.Response(
                    answer.status,
                    headers=answer.headers,
                    stream=types["AsyncAnswerBody"](answer.chunks, opened),
                )
            upstream = await self.transport.handle_async_request(_forward(lib, request, decision))
            try:
                tee = await ex.tee(upstream.status_code, upstream.headers.multi_items())
                if tee is not None:
                    await tee.flush()  # the head, to followers in other processes at once
            except BaseException:
                await upstream.aclose()
                raise
            if tee is None:
                await opened.leave()
                return self._passthrough(upstream, ex)
            body = types["AsyncTeeBody"](
                upstream.stream,
                tee,
                opened,
            )
            return lib.Response(
                upstream.status_code,
                headers=merge_headers(upstream.headers.raw, ex.headers()),
                stream=body,
                extensions=upstream.extensions,
            )
        except BaseException as exc:
            await opened.leave(exc)
            raise

    async def aclose(self) -> None:
        """Close the wrapped transport, and the backend if it was opened from a URL."""
        try:
            await self.transport.aclose()
        finally:
            await self.service.aclose()


class CacheTransportBase(_Options):
    """The sync twin of :class:`AsyncCacheTransportBase` (same options and behaviour);
    ``transport`` defaults to the library's ``HTTPTransport()``.

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
        super().__init__(backend, transport, **options)
        self._portal_backend = portal_backend
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _default_transport(self) -> Any:
        return self._lib.HTTPTransport()

    @property
    def portal(self) -> anyio.from_thread.BlockingPortal:
        """The blocking portal the cache runs on (started on first use): run your own
        coroutines against the same backend with ``transport.portal.call(fn, *args)``."""
        portal = self._portal
        if portal is not None:
            return portal
        with self._lock:
            if self._closed:
                raise RuntimeError("this CacheTransport is closed")
            if self._portal is None:
                self._portal, self._thread = _start_portal(self._portal_backend)
            return self._portal

    def handle_request(self, request: Any) -> Any:
        lib = self._lib
        service = self.service
        if request.method == "GET":
            # A client resuming a stream by its id (Responses): see the async transport.
            portal = self.portal
            answer = portal.call(service.resume, "GET", *_resume_args(request))
            if answer is not None:
                opened = _SyncOpen(portal.wrap_async_context_manager(_no_exchange()))
                opened.enter()
                body = _stream_types(lib)["SyncAnswerBody"](answer.chunks, opened, portal)
                return lib.Response(answer.status, headers=answer.headers, stream=body)
        if service.policy.match(request.method, request.url.path) is None:
            return self.transport.handle_request(request)
        try:
            decision = self._decide(request, request.read())
        except ConfigError as exc:
            return _error_response(lib, str(exc))
        portal = self.portal
        opened = _SyncOpen(
            portal.wrap_async_context_manager(service.exchange(decision, publish=True))
        )
        ex = opened.enter()
        types = _stream_types(lib)
        try:
            answer = ex.answer
            if answer is not None:
                return lib.Response(
                    answer.status,
                    headers=answer.headers,
                    stream=types["SyncAnswerBody"](answer.chunks, opened, portal),
                )
            upstream = self.transport.handle_request(_forward(lib, request, decision))
            try:
                tee = portal.call(ex.tee, upstream.status_code, upstream.headers.multi_items())
                if tee is not None:
                    portal.call(tee.flush)  # the head, to followers in other processes at once
            except BaseException:
                upstream.close()
                raise
            if tee is None:
                opened.leave()
                return self._passthrough(upstream, ex)
            body = types["SyncTeeBody"](
                upstream.stream,
                tee,
                opened,
                portal,
            )
            return lib.Response(
                upstream.status_code,
                headers=merge_headers(upstream.headers.raw, ex.headers()),
                stream=body,
                extensions=upstream.extensions,
            )
        except BaseException as exc:
            opened.leave(exc)
            raise

    def close(self) -> None:
        """Close the wrapped transport and the backend (if opened from a URL), then stop
        the portal thread. Responses still open are abandoned (nothing of them is stored).
        The transport cannot be used afterwards. A transport never closed does not keep the
        program from exiting: its portal runs in a daemon thread."""
        if self._closed:
            return
        try:
            self.transport.close()
        finally:
            portal = self.portal  # the backend is async: it is closed on the portal's loop
            with self._lock:
                self._closed = True
                thread = self._thread
                self._portal = self._thread = None
            try:
                portal.call(self.service.aclose)
            finally:
                portal.call(portal.stop, True)
                if thread is not None:
                    thread.join()


def _resume_args(request: Any) -> tuple[str, str, dict[str, str]]:
    return request.url.path, request.url.query.decode("latin-1"), _request_headers(request)


@asynccontextmanager
async def _no_exchange() -> AsyncIterator[Any]:
    # The answer bodies leave an exchange when they end; a resume has none to leave.
    yield None


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

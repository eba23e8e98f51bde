"""The response bodies of the httpx / httpx2 cache transports (:mod:`sse_cache._transport`):
a miss's body hands each upstream chunk to the client and records it; an answer's body
replays from the cache. Async bodies run on the caller's event loop; sync ones drive the
async service through the transport's blocking portal.

Each body also notes when its first non-empty chunk goes to the client (only when the
transport has hooks: one boolean check per chunk otherwise): the response's time to first
byte, reported once through :meth:`Exchange.first_byte`, as the ASGI middleware does."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, suppress
from functools import cache
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.from_thread

from ._cancellation import on_asyncio
from .flight import SharedStreamAborted
from .http._wire import close_iterator
from .http.service import Exchange, ResponseTee

_R = TypeVar("_R")

logger = logging.getLogger("sse_cache")


async def _feed(tee: ResponseTee, chunk: bytes) -> None:
    # One portal hop for both: record the chunk, and publish what was relayed to other
    # processes following this stream (cross-process single-flight), if any.
    tee.feed(chunk)
    await tee.flush()


def _timed_out(lib: ModuleType, seconds: float) -> Exception:
    """What a hit's or a follower's client sees when no chunk came within its read timeout:
    the library's own error for that (the SDKs raise their timeout error)."""
    return lib.ReadTimeout(  # type: ignore[no-any-return]
        f"sse-cache: no chunk of the shared stream came within the read timeout ({seconds:g} s)"
    )


def _aborted(lib: ModuleType, exc: SharedStreamAborted) -> Exception:
    """What a follower's client sees when the live stream it read stopped before its end: the
    library's error for a response cut short, as when a server drops the connection (the
    SDKs raise their connection error)."""
    return lib.RemoteProtocolError(f"sse-cache: {exc}")  # type: ignore[no-any-return]


def _closed_under(lib: ModuleType) -> Exception:
    """What a sync response's reader sees when its transport was closed while it read (from
    another thread): the library's error for a connection closed under a reader (the SDKs
    raise their connection error), not the portal's bare ``RuntimeError``."""
    return lib.ReadError(  # type: ignore[no-any-return]
        "sse-cache: the CacheTransport was closed while this response was read"
    )


def _being_cancelled() -> bool:
    """Whether the current asyncio task has a cancellation pending (its own, not a shielded
    future's)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _closed_by_client(lib: ModuleType) -> Exception:
    """What a response's reader sees when the response was closed (from another task or
    thread: a stop handler) while it read: the library's error for a connection closed under
    a reader, as without the cache (the SDKs raise their connection error), never a clean end
    of part of the answer."""
    return lib.ReadError(  # type: ignore[no-any-return]
        "sse-cache: the response was closed while it was read"
    )


class _ClosedUnderReader(Exception):
    """A client's read of a miss ended after the client closed the response from another
    task: the reader gets the library's ReadError."""


class _TransportClosed(Exception):
    """A call into the portal of a transport that is closing or closed (see
    :meth:`_SyncOpen.call`); the bodies turn it into :func:`_closed_under`."""


class HoldSlots:
    """A transport's bound on the streams read on for a resume window after their client
    left (its ``max_background``, as the middleware's): each holds an upstream call and up
    to two copies of ``max_entry_bytes``, and a program whose clients leave faster than the
    window passes would hold without bound. Past it, a client that leaves is treated as
    without a window (its answer abandoned at once, unless followers read it). Taken and
    given back in one event loop (the async transport's, the sync one's portal)."""

    __slots__ = ("bound", "taken")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.bound:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        self.taken -= 1

    async def held_for(self, window: Callable[[], Awaitable[None]]) -> None:
        """Run ``window()`` (a held stream's resume window), then give its place back."""
        try:
            await window()
        finally:
            self.give()


# -- async --------------------------------------------------------------------------------


class _AsyncOpen:
    """An exchange entered by ``handle_async_request`` and left when the response ends.

    ``started``: when the request arrived (``time.monotonic()``), to report the response's
    time to first byte; None when nobody wants it (no hooks, or a resume: the middleware
    reports none for those either)."""

    __slots__ = ("_cm", "_ex", "_started", "open", "timing")

    def __init__(
        self, cm: AbstractAsyncContextManager[Exchange], started: float | None = None
    ) -> None:
        self._cm = cm
        self._started = started
        self._ex: Exchange | None = None
        self.open = False
        #: The response's first body bytes are still to be reported.
        self.timing = False

    async def enter(self) -> Exchange:
        ex = self._ex = await self._cm.__aenter__()
        self.open = True
        self.timing = self._started is not None
        return ex

    def first_byte(self) -> None:
        """The response's first body bytes go to the client now: report the time it waited
        for them (once)."""
        self.timing = False
        assert self._ex is not None and self._started is not None
        self._ex.first_byte(time.monotonic() - self._started)

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


def _background(work: Coroutine[Any, Any, None]) -> None:
    # A task that outlives the request (a resume window): kept referenced until it ends.
    task = asyncio.get_running_loop().create_task(work, name="sse-cache resume window")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _read_one(chunks: AsyncIterator[bytes]) -> bytes:
    return await chunks.__anext__()


class _AsyncTeeBody:
    """The body of a miss: the upstream's chunks, each handed to the client (and to the
    followers of its live stream) first and recorded when the client asks for the next one.

    When the client closes it early while followers still read, the upstream is handed over
    to them: they read it on, in turn, until its end (stored if it completed) or until the
    last of them leaves (then it is closed). So it is when the client's read is cancelled
    while followers read, on asyncio: a read begun while the stream was followed runs in a
    task of its own, which the caller's cancellation leaves running (the HTTP library closes
    the upstream under a cancelled read)."""

    _lib: ClassVar[ModuleType]

    def __init__(self, inner: Any, tee: ResponseTee, opened: _AsyncOpen, holds: HoldSlots) -> None:
        self._inner = inner
        self._it: AsyncIterator[bytes] | None = None
        self._tee = tee
        self._opened = opened
        self._holds = holds
        self._pending = b""
        self._handed_over = False
        # The read of the upstream's next chunk running in a task, while its result (or
        # error) has not been taken: whoever reads next takes it.
        self._reading: asyncio.Future[bytes] | None = None
        # The client closed this response (aclose), perhaps from another task than the one
        # reading it ("stop generation"): that reader's read ends with the library's
        # ReadError, as without the cache, never with a chunk or a clean end.
        self._closed = False
        # The client's own read runs inline (not in a task), and what a puller waiting for
        # its end waits on.
        self._client_reading = False
        self._client_read_done: anyio.Event | None = None

    # One iterator for every ``async for``: a client that drains the rest of a response it
    # stopped reading (the openai SDK after ``[DONE]``) continues where it was.
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise _closed_by_client(self._lib)
        if self._handed_over:
            raise StopAsyncIteration
        chunk = await self._next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _next(self, *, pulling: bool = False) -> bytes | None:
        # ``pulling``: for the followers, once the client has gone (_pull); else the client's.
        tee = self._tee
        if self._pending:
            tee.feed(self._pending)
            self._pending = b""
            await tee.flush()  # to other processes following this stream, if any
        if self._closed and not pulling:
            # (Closed meanwhile, perhaps while the flush waited: the upstream is the
            # followers' now, or closed.)
            raise _closed_by_client(self._lib)
        if not self._opened.open:
            return None
        it = self._it
        if it is None:
            it = self._it = aiter(self._inner)
        try:
            chunk = await self._read(it, pulling)
        except _ClosedUnderReader:
            # The client closed this response from another task while this read of its own
            # was under way in a task: its chunk, if one came, is the followers' (their
            # puller awaits the same read), and the close settled the rest.
            raise _closed_by_client(self._lib) from None
        except StopAsyncIteration:
            tee.end()
            await self._finish()
            if self._closed and not pulling:
                raise _closed_by_client(self._lib) from None
            return None
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            if self._closed and not pulling and self._reading is not None:
                # The client closed this response from another task, and its read runs on
                # in its task for the followers (handed over): theirs to settle. A
                # cancellation of this task stays one (helper-92: it became a ReadError,
                # and stopped the followers' read).
                if cancelled:
                    raise
                raise _closed_by_client(self._lib) from exc
            if cancelled:
                if self._reading is not None:
                    # The caller was cancelled, not the read (its own task): followers read
                    # on from it, as when a client closes early — unless the answer is
                    # complete already. The openai SDK drains a chat body after [DONE] by
                    # cancelling its read: the followers' streams end now, with the answer
                    # stored, rather than when the upstream ends its body.
                    # (A follower pulling the upstream handed over to it is no producer: its
                    # pull was alone, nothing to hand over to — the flight ends with it.)
                    self._opened.timing = False
                    if not self._handed_over and self._hand_over():
                        raise
                    await self._stop_reading()
                # The reader was cancelled midway (a timeout around its read; the openai SDK
                # drains the body after chat's [DONE] for 0.1 s at most): the HTTP library
                # has closed the upstream. What was recorded is the answer if it holds its
                # completing event, for the cache and for the followers alike.
                tee.stop(f"the read of the upstream was cancelled: {exc!r}")
            else:
                tee.fail(f"the upstream body failed: {exc!r}")
            await self._finish(exc)
            if self._closed and not pulling and not cancelled:
                # The upstream's connection was closed under this read by the client's own
                # close, from another task (a cancellation stays one).
                raise _closed_by_client(self._lib) from exc
            raise
        tee.relay(chunk)
        self._pending = chunk
        if self._closed and not pulling:
            # Closed by another task while this inline read was under way: its chunk is
            # passed on to the followers all the same (above: the puller waited for it;
            # helper-92: dropped, a follower's answer missed it and was stored so), and the
            # reader is told its response was closed.
            raise _closed_by_client(self._lib)
        if self._opened.timing and chunk:
            self._opened.first_byte()
        return chunk

    async def _read(self, chunks: AsyncIterator[bytes], pulling: bool = False) -> bytes:
        reading = self._reading
        if reading is None:
            # (A task per chunk costs ~9 µs: only for the producer's reads while followed.
            # Once handed over, the followers' pulls run in a task already.)
            if self._handed_over or not (self._tee.followed and on_asyncio()):
                if pulling:
                    return await chunks.__anext__()
                # The client's own read, inline: a close from another task while it is under
                # way hands the upstream over, and the followers' puller waits for this read
                # to end (and pass its chunk on) before it reads (see _pull).
                self._client_reading = True
                try:
                    return await chunks.__anext__()
                finally:
                    self._client_reading = False
                    waiting, self._client_read_done = self._client_read_done, None
                    if waiting is not None:
                        waiting.set()
            reading = self._reading = asyncio.ensure_future(_read_one(chunks))
        try:
            chunk = await asyncio.shield(reading)
        except asyncio.CancelledError:
            # The read itself (_stop_reading), not only the caller: no one takes it.
            if reading.cancelled() and self._reading is reading:
                self._reading = None
            if self._closed and not pulling and not _being_cancelled():
                # Stopped by the client's own close from another task (no one followed):
                # not a cancellation of this task.
                raise _ClosedUnderReader from None
            raise  # the caller's: the read goes on, its chunk is the next one taken
        except BaseException:
            if self._closed and not pulling:
                raise _ClosedUnderReader from None  # (the followers' puller takes it)
            if self._reading is reading:
                self._reading = None
            raise
        if self._closed and not pulling:
            # Closed (and handed over) while this read was under way: the chunk is taken by
            # the followers' puller, which awaits the same read (helper-91: both relayed it,
            # and a follower got it twice).
            raise _ClosedUnderReader
        if self._reading is reading:
            self._reading = None
        return chunk

    async def _stop_reading(self) -> None:
        # No one will take the read running in its task: stop it (the HTTP library closes
        # the upstream) before the upstream's iterator is closed.
        reading, self._reading = self._reading, None
        if reading is None:
            return
        reading.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([reading])
        if not reading.cancelled():
            reading.exception()  # (taken: asyncio logs an error never retrieved)

    def _hand_over(self) -> bool:
        # The client went (closed early, or its read was cancelled): True when followers
        # (or a resume window) read on, and the upstream is theirs now.
        tee = self._tee
        if not self._opened.open or tee.ended:
            return False
        if self._pending:
            tee.feed(self._pending)
            self._pending = b""
        # A resume window needs a task that reads on while no one reads: on asyncio, a
        # task of the loop (trio has none outside a nursery: no window there).
        hold = tee.resume_window is not None and on_asyncio() and self._holds.take()
        if not tee.client_left(hold=hold):
            if hold:
                self._holds.give()
            return False
        self._handed_over = True
        tee.hand_over(self._pull, self._abandon)
        if hold:
            _background(self._holds.held_for(tee.read_through_window))
        return True

    async def _finish(self, exc: BaseException | None = None) -> None:
        try:
            if self._handed_over:
                # No client will close this response: close the upstream's (its connection
                # goes back to the pool), also if its iterator cannot be closed.
                try:
                    await close_iterator(self._it)
                finally:
                    await self._inner.aclose()
        finally:
            await self._opened.leave(exc)  # stores the answer if it completed

    async def _pull(self) -> bool:
        # For the followers, once the client has gone: one more chunk into the live stream.
        # No client delivers it first: it is recorded (and published) at once, and a
        # complete answer ends the stream with it.
        if self._client_reading:
            # The client's own read was under way when it closed this response (from another
            # task): it passes that read's chunk (or end, or failure) on; reading the
            # upstream under it raised the generator's RuntimeError (helper-92).
            if self._client_read_done is None:
                self._client_read_done = anyio.Event()
            await self._client_read_done.wait()
            if not self._opened.open or self._tee.ended or self._tee.cut:
                return False
            if not self._pending:
                return True  # (nothing came: read on)
        elif await self._next(pulling=True) is None:
            return False
        tee = self._tee
        tee.feed(self._pending)
        self._pending = b""
        await tee.flush()
        if not tee.end_if_answered():
            return True
        await self._finish()  # closes the upstream (its body's end is not waited for)
        return False

    async def _abandon(self) -> None:
        try:
            await self._stop_reading()
            try:
                if not self._client_reading:
                    await close_iterator(self._it)
                # (else another task is inside the iterator, which cannot be closed under
                # it: closing the upstream's response ends that read with an error.)
            finally:
                await self._inner.aclose()
        finally:
            # Every reader left (each had what was relayed): complete if that holds the
            # completing event (the SDKs stop at chat's [DONE]), else failed.
            tee = self._tee
            if self._pending:
                tee.feed(self._pending)
                self._pending = b""
            tee.stop("every reader left before the stream ended")
            await self._opened.leave()

    async def aclose(self) -> None:
        self._opened.timing = False  # the client is gone: no byte it never had is reported
        self._closed = True
        if self._handed_over or self._hand_over():
            return
        await self._abandon()


class _AsyncAnswerBody:
    """The body of a hit or of a joined live stream. ``read_timeout``: the request's; a chunk
    that does not come within it (a follower of a producer whose upstream went quiet) ends
    the response with the library's ``ReadTimeout``, as reading the upstream would."""

    _lib: ClassVar[ModuleType]

    def __init__(
        self, chunks: AsyncIterator[bytes], opened: _AsyncOpen, read_timeout: float | None = None
    ) -> None:
        self._chunks = chunks
        self._opened = opened
        self._read_timeout = read_timeout
        # The read under way, which a close from another task cancels (the iterator cannot
        # be closed under it: "asynchronous generator is already running"; helper-91).
        self._scope: anyio.CancelScope | None = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        opened = self._opened
        if self._closed:
            raise _closed_by_client(self._lib)
        if not opened.open:
            raise StopAsyncIteration
        timeout = self._read_timeout
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if timeout is None:
                    chunk = await self._chunks.__anext__()
                else:
                    with anyio.fail_after(timeout):
                        chunk = await self._chunks.__anext__()
            if scope.cancel_called:  # closed by another task under this read
                await close_iterator(self._chunks)
                await opened.leave()
                raise _closed_by_client(self._lib)
        except StopAsyncIteration:
            await opened.leave()
            raise
        except SharedStreamAborted as exc:
            await opened.leave(exc)
            raise _aborted(self._lib, exc) from exc
        except TimeoutError as exc:
            await opened.leave(exc)
            raise _timed_out(self._lib, timeout or 0) from exc
        except BaseException as exc:
            await opened.leave(exc)
            raise
        finally:
            self._scope = None
        if opened.timing and chunk:
            opened.first_byte()
        return chunk

    async def aclose(self) -> None:
        self._closed = True
        if self._scope is not None:
            # Another task reads: its read is stopped, and it closes and leaves.
            self._scope.cancel()
            return
        try:
            await close_iterator(self._chunks)
        finally:
            await self._opened.leave()


class _AsyncPassBody:
    """The upstream's body as it came, nothing recorded (a passthrough on a cached route),
    noting its first bytes for the time to first byte. Used only when that is wanted: else
    the upstream's own stream is the response's."""

    def __init__(self, inner: Any, opened: _AsyncOpen) -> None:
        self._inner = inner
        self._it: AsyncIterator[bytes] | None = None
        self._opened = opened

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        it = self._it
        if it is None:
            it = self._it = aiter(self._inner)
        chunk: bytes = await it.__anext__()
        if self._opened.timing and chunk:
            self._opened.first_byte()
        return chunk

    async def aclose(self) -> None:
        try:
            await close_iterator(self._it)
        finally:
            await self._inner.aclose()


# -- sync ---------------------------------------------------------------------------------


def _exiting() -> bool:
    """The interpreter is exiting: the portal's daemon thread runs no more, and a call into
    it would wait for ever. (A caller that left a streamed response unclosed has it closed by
    the garbage collector at exit: the response is simply dropped, and nothing of it, never
    ended, is stored.)"""
    return sys.is_finalizing()


def unless_closed(closing: threading.Event, fn: Callable[..., _R], *args: Any) -> _R:
    """``fn(*args)``, a call into a sync transport's portal from the caller's thread. Raises
    :class:`_TransportClosed` when ``closing`` is set (another thread called ``close()``):
    before the call, or when the call failed as the portal stopped — it refuses calls
    (``RuntimeError``) and cancels those under way, and the cancellation of its loop
    (asyncio's ``CancelledError``, trio's ``Cancelled``: not exceptions) then reaches this
    thread, which must not die of it."""
    if closing.is_set():
        raise _TransportClosed
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if closing.is_set():
            raise _TransportClosed from exc
        raise


class _SyncOpen:
    """An exchange entered by ``handle_request`` (in the portal's event loop, in one task
    for its whole life) and left when the response ends. ``started``: as for
    :class:`_AsyncOpen`."""

    __slots__ = ("_closing", "_cm", "_ex", "_leaving", "_portal", "_started", "open", "timing")

    def __init__(
        self,
        cm: AbstractContextManager[Exchange],
        portal: anyio.from_thread.BlockingPortal,
        started: float | None = None,
        closing: threading.Event | None = None,
    ) -> None:
        self._cm = cm
        self._portal = portal
        self._started = started
        #: Set when the transport begins to close: its portal stops, and with it the task
        #: that holds this exchange (which then fails, so nothing of the response is stored).
        self._closing = closing if closing is not None else threading.Event()
        self._ex: Exchange | None = None
        self.open = False
        # (A drain thread and the closing transport's thread may both leave at once.)
        self._leaving = threading.Lock()
        #: The response's first body bytes are still to be reported.
        self.timing = False

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the portal's loop. Raises :class:`_TransportClosed` when the
        transport is closing or closed (see :func:`unless_closed`)."""
        return unless_closed(self._closing, self._portal.call, fn, *args)

    def enter(self) -> Exchange:
        ex = self._ex = unless_closed(self._closing, self._cm.__enter__)
        self.open = True
        self.timing = self._started is not None
        return ex

    def first_byte(self) -> None:
        """As :meth:`_AsyncOpen.first_byte`, measured in the caller's thread; the notice is
        given to the hooks in the portal's thread, where every other notice of the exchange
        is (hooks never see two threads at once). Once per response, only with hooks."""
        self.timing = False
        ex, started = self._ex, self._started
        assert ex is not None and started is not None
        seconds = time.monotonic() - started
        try:
            self.call(ex.first_byte, seconds)
        except _TransportClosed:  # the next read says so
            return

    def leave(self, exc: BaseException | None = None) -> None:
        with self._leaving:
            if not self.open:
                return
            self.open = False
        if self._closing.is_set():
            return  # the portal's stop ends the exchange (failed: nothing stored)
        if exc is None:
            self._cm.__exit__(None, None, None)
        else:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)


class _SyncTeeBody:
    """The sync twin of :class:`_AsyncTeeBody`; the recording and the live stream live in
    the portal's loop (followers of the same stream wait there). When the client closes it
    early while followers still read, a daemon thread reads the upstream on for them.

    The chunk the client has but the recording has not yet taken (``_delivered``) is kept
    and changed only in the portal's loop, in the same step as the recording: a caller's
    thread interrupted around a hop (``KeyboardInterrupt``, a signal handler's exception)
    cannot leave the two apart. An interruption between a chunk read and its hop fails the
    stream: the chunk may have reached the followers, the recording, both or neither, and a
    recording with a chunk missing or doubled would be stored as a whole answer."""

    def __init__(
        self,
        inner: Any,
        tee: ResponseTee,
        opened: _SyncOpen,
        portal: anyio.from_thread.BlockingPortal,
        holds: HoldSlots,
        draining: weakref.WeakSet[Any] | None = None,
    ) -> None:
        self._inner = inner
        self._it: Iterator[bytes] | None = None
        self._tee = tee
        self._opened = opened
        self._portal = portal
        self._holds = holds  # taken and given back in the portal's loop
        self._holding = False  # one of them is taken: the stream is held for its window
        self._draining = draining  # the transport's: settled when it closes
        self._delivered = b""  # in the portal's loop only
        self._handed_over = False
        # The client closed this response, perhaps from another thread than the one reading
        # it (a stop handler): that reader's next read ends with the library's ReadError.
        self._closed = False
        # One read of the upstream (and its hop) at a time: the reader's, or the drain
        # thread's once the client has gone — closed from another thread under a read, the
        # drain read the generator at once ("generator already executing"), and every
        # follower was aborted (helper-91).
        self._reading = threading.Lock()
        # A response its program drops without closing it (an SDK stream left by ``break``
        # outside ``with``) is never left by its body, and its live stream would be offered
        # for good to identical requests, which would wait on it until their read timeout.
        # Once the body is collected, its exchange is left (failed) instead.
        weakref.finalize(self, _left_unclosed, opened).atexit = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise _closed_by_client(self._lib)
        if self._handed_over:
            raise StopIteration
        try:
            chunk = self._next(reader=True)
        except _TransportClosed as exc:
            raise _closed_under(self._lib) from exc
        except Exception as exc:
            if self._closed:  # (its upstream closed under this read, by the close)
                raise _closed_by_client(self._lib) from exc
            raise
        if chunk is None:
            if self._closed:
                raise _closed_by_client(self._lib)
            raise StopIteration
        return chunk

    _lib: ClassVar[ModuleType]

    # -- in the portal's loop

    async def _pass(self, chunk: bytes) -> None:
        # One hop per chunk: record the chunk the client had, hand the new one to the
        # followers, publish to other processes.
        tee = self._tee
        if tee.ended or tee.cut:  # (settled meanwhile: nothing more goes anywhere)
            return
        tee.feed(self._delivered)
        self._delivered = chunk
        tee.relay(chunk)
        await tee.flush()

    def _end(self) -> None:
        self._tee.feed(self._delivered)
        self._delivered = b""
        self._tee.end()

    def _end_if_answered(self) -> bool:
        # No client delivers what the drain reads: recorded at once, and a complete answer
        # ends the stream with it (ResponseTee.end_if_answered).
        self._tee.feed(self._delivered)
        self._delivered = b""
        return self._tee.end_if_answered()

    def _stop_unread(self) -> None:
        # Every reader left (each had what was relayed): complete if that holds the
        # completing event (the SDKs stop at chat's [DONE]), else failed.
        self._tee.feed(self._delivered)
        self._delivered = b""
        self._tee.stop("every reader left before the stream ended")

    def _client_left(self) -> bool:
        tee = self._tee
        if tee.ended:
            return False
        tee.feed(self._delivered)
        self._delivered = b""
        hold = tee.resume_window is not None and self._holds.take()
        if tee.client_left(_nothing, hold=hold):
            self._holding = hold
            return True
        if hold:
            self._holds.give()
        return False

    # -- in the caller's thread (or the drain thread)

    def _next(self, *, reader: bool = False) -> bytes | None:
        # ``reader``: the client's read (else the drain thread's).
        with self._reading:
            if reader and self._closed:
                # Closed while this thread waited for the lock: the drain thread reads for
                # the followers now (helper-92: this read took a chunk from between theirs).
                raise _closed_by_client(self._lib)
            return self._next_read()

    def _next_read(self) -> bytes | None:
        if not self._opened.open:
            return None
        it = self._it
        if it is None:
            it = self._it = iter(self._inner)
        opened = self._opened
        try:
            chunk: bytes = next(it)
            opened.call(self._pass, chunk)
        except StopIteration:
            opened.call(self._end)
            opened.leave()  # stores the answer if it completed
            return None
        except _TransportClosed:
            opened.leave()
            raise
        except BaseException as exc:
            # The upstream failed, or this thread was interrupted around the hop.
            opened.call(self._tee.fail, f"the upstream body failed: {exc!r}")
            opened.leave(exc)
            raise
        if self._opened.timing and chunk:
            self._opened.first_byte()
        return chunk

    def _drain(self) -> None:
        # The client has gone and followers read on: read the upstream for them until its
        # end, or until no one wants it any more.
        try:
            while self._next() is not None:
                if self._opened.call(self._end_if_answered):
                    self._opened.leave()  # stores the answer
                    return
                if not self._opened.call(lambda: self._tee.wanted):
                    self._abandon()
                    return
        except BaseException:  # already failed for the followers, and the exchange left
            return
        finally:
            if self._draining is not None:
                self._draining.discard(self)
            self._inner.close()  # no client will close this response

    def settle(self) -> None:
        """The transport closes while this drain reads the upstream on: if no one reads it
        any more, judge what was relayed now (stored, as the exchange is left, if it holds
        the completing event) and leave, before the backend closes. (The drain thread
        finds the exchange left at its next step.)"""
        opened = self._opened
        try:
            if not opened.open or opened.call(lambda: self._tee.wanted):
                return  # still read (it is abandoned with the transport)
            opened.call(self._stop_unread)
        except _TransportClosed:
            return
        opened.leave()

    def _abandon(self) -> None:
        try:
            self._inner.close()
        finally:
            try:
                if self._opened.open:
                    self._opened.call(self._stop_unread)
            except _TransportClosed:
                pass  # the stream ended with the transport
            self._opened.leave()

    def close(self) -> None:
        self._opened.timing = False  # the client is gone: no byte it never had is reported
        self._closed = True
        if self._handed_over or _exiting():
            return
        try:
            handed_over = self._opened.open and self._opened.call(self._client_left)
        except _TransportClosed:
            handed_over = False
        if handed_over:
            self._handed_over = True
            if self._draining is not None:
                self._draining.add(self)
            threading.Thread(target=self._drain, name="sse-cache-drain", daemon=True).start()
            if self._holding:
                # The drain thread reads on while the stream is held; the window's end is
                # kept in the portal's loop.
                self._portal.start_task_soon(self._holds.held_for, self._tee.release_after_window)
            return
        self._abandon()


class _Dropped(Exception):
    """A sync miss's response was collected before it was read to its end or closed."""


def _left_unclosed(opened: _SyncOpen) -> None:
    # A finalizer runs in whichever thread collected the body, the portal's own included,
    # where a blocking call into the portal would wait for ever: the exchange is left from
    # a thread of its own.
    if opened.open:
        threading.Thread(
            target=_leave_dropped, args=(opened,), name="sse-cache-dropped", daemon=True
        ).start()


def _leave_dropped(opened: _SyncOpen) -> None:
    try:
        opened.leave(_Dropped("the response was dropped before it ended"))
    except Exception as exc:  # (the transport closed meanwhile, or the backend failed)
        logger.debug("sse_cache: leaving a dropped response failed: %r", exc)


async def _nothing() -> None:
    """The followers of a sync producer's stream need no action to abandon it: its drain
    thread sees that nobody wants it after its next chunk."""


async def _next_chunk(chunks: AsyncIterator[bytes], within: float | None) -> bytes | None:
    # ``within``: the request's read timeout, applied here, in the portal's loop.
    try:
        if within is None:
            return await chunks.__anext__()
        with anyio.fail_after(within):
            return await chunks.__anext__()
    except StopAsyncIteration:
        return None


class _SyncAnswerBody:
    """A hit or a joined live stream, read through the portal (replays come in ~64 KiB
    chunks, so one portal hop costs little per event). ``read_timeout``: as for
    :class:`_AsyncAnswerBody`."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        opened: _SyncOpen,
        portal: anyio.from_thread.BlockingPortal,
        read_timeout: float | None = None,
    ) -> None:
        self._chunks = chunks
        self._opened = opened
        self._portal = portal
        self._read_timeout = read_timeout
        # As for _AsyncAnswerBody, in the portal's loop: the read under way, which a close
        # from another thread cancels.
        self._scope: anyio.CancelScope | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    _lib: ClassVar[ModuleType]

    async def _read(self) -> bytes | None:
        # In the portal's loop.
        if self._closed:  # (closed while this thread made its way here: helper-92)
            raise _ClosedUnderReader
        chunk: bytes | None = None
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                chunk = await _next_chunk(self._chunks, self._read_timeout)
            finally:
                self._scope = None
        if scope.cancel_called:
            # Cancelled by close() from another thread — also when its chunk came in the
            # same turn: close() left the exchange to this reader (helper-92: else never).
            raise _ClosedUnderReader
        return chunk

    async def _close(self) -> bool:
        # In the portal's loop: True when a reader in another thread is stopped, and leaves.
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
            return True
        await close_iterator(self._chunks)
        return False

    def __next__(self) -> bytes:
        if self._closed:
            self._opened.leave()
            raise _closed_by_client(self._lib)
        if not self._opened.open:
            raise StopIteration
        try:
            chunk: bytes | None = self._opened.call(self._read)
        except _ClosedUnderReader:
            with suppress(_TransportClosed):
                self._opened.call(close_iterator, self._chunks)
            self._opened.leave()
            raise _closed_by_client(self._lib) from None
        except _TransportClosed as exc:
            self._opened.leave()
            raise _closed_under(self._lib) from exc
        except SharedStreamAborted as exc:
            self._opened.leave(exc)
            raise _aborted(self._lib, exc) from exc
        except TimeoutError as exc:
            self._opened.leave(exc)
            raise _timed_out(self._lib, self._read_timeout or 0) from exc
        except BaseException as exc:
            self._opened.leave(exc)
            raise
        if chunk is None:
            self._opened.leave()
            raise StopIteration
        if self._opened.timing and chunk:
            self._opened.first_byte()
        return chunk

    def close(self) -> None:
        if _exiting():
            return
        try:
            if self._opened.open and self._opened.call(self._close):
                return  # another thread reads: it leaves, with the library's ReadError
        except _TransportClosed:
            pass  # the portal's stop ended the replay
        self._opened.leave()


class _SyncPassBody:
    """The sync twin of :class:`_AsyncPassBody`."""

    def __init__(self, inner: Any, opened: _SyncOpen) -> None:
        self._inner = inner
        self._it: Iterator[bytes] | None = None
        self._opened = opened

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        it = self._it
        if it is None:
            it = self._it = iter(self._inner)
        chunk: bytes = next(it)
        if self._opened.timing and chunk:
            self._opened.first_byte()
        return chunk

    def close(self) -> None:
        self._inner.close()


@cache
def _stream_types(lib: ModuleType) -> dict[str, type[Any]]:
    """Our body classes as subclasses of ``lib``'s byte streams (a response only accepts
    those)."""
    return {
        name: type(name, (base, getattr(lib, lib_base)), {"__module__": __name__, "_lib": lib})
        for name, base, lib_base in (
            ("AsyncTeeBody", _AsyncTeeBody, "AsyncByteStream"),
            ("AsyncAnswerBody", _AsyncAnswerBody, "AsyncByteStream"),
            ("AsyncPassBody", _AsyncPassBody, "AsyncByteStream"),
            ("SyncTeeBody", _SyncTeeBody, "SyncByteStream"),
            ("SyncAnswerBody", _SyncAnswerBody, "SyncByteStream"),
            ("SyncPassBody", _SyncPassBody, "SyncByteStream"),
        )
    }

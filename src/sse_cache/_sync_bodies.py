"""The response bodies of the sync httpx / httpx2 cache transport
(:class:`sse_cache._transport.CacheTransportBase`): each drives the async service through the
transport's blocking portal from the caller's thread. A miss's body hands each upstream chunk
to the client and records it; an answer's body replays from the cache; a pass's body relays
the upstream's. Time to first byte: as for :mod:`sse_cache._async_bodies`."""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, suppress
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.from_thread

from ._transport_bodies import (
    HoldSlots,
    _aborted,
    _closed_by_client,
    _closed_under,
    _ClosedUnderReader,
    _timed_out,
    _TransportClosed,
)
from .flight import SharedStreamAborted
from .http._wire import close_iterator
from .http.service import Exchange, ResponseTee

_R = TypeVar("_R")

logger = logging.getLogger("sse_cache")


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
    :class:`_AsyncOpen`.

    (anyio's ``wrap_async_context_manager`` does the same, but a caller's thread interrupted
    while the exchange is entered — Ctrl-C during the lookup, or while a follower waits for
    its producer's head — left its task entering it regardless, then waiting for good: the
    request stayed its key's producer, never answering, and every identical request waited
    twice its ``join_timeout`` for it; helper-108. The task is cancelled then.)"""

    __slots__ = (
        "_abandoned",
        "_closing",
        "_cm",
        "_ex",
        "_exit",
        "_held",
        "_leave",
        "_leaving",
        "_portal",
        "_scope",
        "_started",
        "open",
        "timing",
    )

    def __init__(
        self,
        cm: AbstractAsyncContextManager[Exchange],
        portal: anyio.from_thread.BlockingPortal,
        started: float | None = None,
        closing: threading.Event | None = None,
    ) -> None:
        self._cm = cm
        self._portal = portal
        self._held: Future[None] | None = None  # the task holding the exchange
        self._scope: anyio.CancelScope | None = None  # its scope, once it runs
        self._leave: anyio.Event | None = None  # set (in the loop) when it is to be left
        self._exit: BaseException | None = None  # what it is left with
        self._abandoned = False  # the caller's thread was interrupted while it was entered
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
        entered: Future[Exchange] = Future()
        try:
            self._held = unless_closed(
                self._closing, self._portal.start_task_soon, self._hold, entered
            )
            ex = self._ex = unless_closed(self._closing, entered.result)
            self.open = True
        except BaseException:
            # Whatever stopped this thread's wait (an interruption: the task entering the
            # exchange runs on; it may even land while the task is being started), the task
            # is stopped: it leaves the exchange, failed, if it got in, or never enters it.
            # (Done already if entering the exchange raised.)
            self.open = False
            self._abandoned = True
            scope = self._scope
            if scope is not None:
                with suppress(RuntimeError):  # (the portal stops: so does the task)
                    self._portal.call(scope.cancel)
            raise
        self.timing = self._started is not None
        return ex

    async def _hold(self, entered: Future[Exchange]) -> None:
        # The exchange's whole life, in one task of the portal's loop (its task groups and
        # cancel scopes are entered and left in the same task). Its scope is what enter()
        # cancels when its thread was interrupted: set before _abandoned is read here, as
        # enter() sets _abandoned before it reads the scope, so one of them sees the other.
        with anyio.CancelScope() as self._scope:
            if self._abandoned:
                return
            self._leave = anyio.Event()
            try:
                ex = await self._cm.__aenter__()
            except BaseException as exc:
                entered.set_exception(exc)
                raise
            entered.set_result(ex)
            try:
                await self._leave.wait()
            except BaseException as exc:
                # Cancelled: the portal stops (the transport closes), or the caller's thread
                # was interrupted while it entered. Left failed, then; in the second case
                # shielded, for its flight and lease are released in full (nothing else
                # will).
                with anyio.CancelScope(shield=self._abandoned):
                    await self._cm.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            failure = self._exit
            if failure is None:
                await self._cm.__aexit__(None, None, None)
            else:
                await self._cm.__aexit__(type(failure), failure, failure.__traceback__)

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
        held, leave = self._held, self._leave
        assert held is not None and leave is not None
        self._exit = exc
        self._portal.call(leave.set)
        held.result()  # (once the exchange was left: the answer stored, say)


class _SyncTeeBody:
    """The sync twin of :class:`_AsyncTeeBody`; the recording and the live stream live in
    the portal's loop (followers of the same stream wait there). When the client closes it
    early while followers still read, a daemon thread reads the upstream on for them.

    A chunk is recorded and handed to the followers in one step in the portal's loop (its
    hop), before the client has it. An interruption between a chunk read and its hop
    (``KeyboardInterrupt``, a signal handler's exception in the caller's thread) fails the
    stream: the chunk may have reached the followers and the recording or neither, and a
    recording with a chunk missing would be stored as a whole answer."""

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
        # One hop per chunk: record it and hand it to the followers, publish it to other
        # processes (at once: held until the next hop, it reached them one upstream chunk
        # late, a model's pause late; helper-110).
        tee = self._tee
        if tee.ended or tee.cut:  # (settled meanwhile: nothing more goes anywhere)
            return
        tee.relay(chunk)
        await tee.flush()

    def _stop_unread(self) -> None:
        # Every reader left (each had what was relayed): complete if that holds the
        # completing event (the SDKs stop at chat's [DONE]), else failed.
        self._tee.stop("every reader left before the stream ended")

    def _client_left(self) -> bool:
        tee = self._tee
        if tee.ended:
            return False
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
            opened.call(self._tee.end)
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
            while True:
                # Judged before each read, the first time once the client's read under way
                # when it closed has passed its chunk on (it may complete the answer): no
                # client delivers what the drain reads, a complete answer ends the stream.
                with self._reading:
                    answered = self._opened.call(self._tee.end_if_answered)
                    wanted = not answered and self._opened.call(lambda: self._tee.wanted)
                if answered:
                    self._opened.leave()  # stores the answer
                    return
                if not wanted:
                    self._abandon()
                    return
                if self._next() is None:
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

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
from typing import Any, ClassVar, TypeVar, cast

import anyio
import anyio.from_thread

from . import flight
from ._async_bodies import NoExchange
from ._transport_bodies import (
    _aborted,
    _closed_by_client,
    _closed_under,
    _ClosedUnderReader,
    _timed_out,
    _TransportClosed,
    watch_client,
)
from .flight import Cursor, LiveFlight, SharedStreamAborted
from .http._slots import BackgroundSlots
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
        "_left",
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
        self._left: anyio.Event | None = None  # set (in the loop) once the task has ended
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

    def beside(self, cm: AbstractAsyncContextManager[Any]) -> _SyncOpen:
        """Another exchange (or a :class:`NoExchange`), held as this one is: in the same
        portal, failing as this one does once the transport begins to close."""
        return _SyncOpen(cm, self._portal, closing=self._closing)

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
            left = self._left = anyio.Event()
            try:
                await self._held_until_left(entered, self._leave)
            finally:
                left.set()

    async def _held_until_left(self, entered: Future[Exchange], leave: anyio.Event) -> None:
        try:
            ex = await self._cm.__aenter__()
        except BaseException as exc:
            entered.set_exception(exc)
            raise
        entered.set_result(ex)
        try:
            await leave.wait()
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

    def collected(self) -> None:
        """The response was collected unclosed (see :func:`_settled_when_collected`: a hit's or a
        follower's; a miss's body is closed instead, see :class:`_SyncTeeStream`): as
        :meth:`_AsyncOpen.collected`, the exchange is left (once, whoever else leaves too)."""
        if not self.open:
            return
        self.leave()

    def _leaves(self) -> bool:
        # Whether this caller leaves the exchange (the first to, while the portal runs: its
        # stop ends the exchange, failed, nothing stored).
        with self._leaving:
            if not self.open:
                return False
            self.open = False
        return not self._closing.is_set()

    async def leave_here(self) -> None:
        """:meth:`leave`, from a task of the portal's loop (where :meth:`leave` would wait
        for ever): waits until the exchange was left (the answer stored, say)."""
        if not self._leaves():
            return
        leave, left = self._leave, self._left
        assert leave is not None and left is not None
        self._exit = None
        leave.set()
        with anyio.CancelScope(shield=True):
            await left.wait()

    def wait_left(self) -> None:
        """Wait until the exchange was left, by whichever thread leaves it (a closing
        transport waits for a drain thread's leaving: the backend closes after it)."""
        held = self._held
        if held is not None:
            with suppress(Exception):  # (its failure is the leaver's)
                held.result()

    def leave(self, exc: BaseException | None = None) -> None:
        if not self._leaves():
            return
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
    recording with a chunk missing would be stored as a whole answer.

    A client that stops reading without closing its response (google-genai) is found out
    by the followers' looks (:meth:`_stalled`), and they go on without it, as
    :class:`_AsyncTeeBody`'s do. One whose response is collected unclosed is closed then
    (the client holds a shell of this body: :class:`_SyncTeeStream`)."""

    _answer_body: ClassVar[type[_SyncAnswerBody]]  # (the same library's)

    def __init__(
        self,
        inner: Any,
        tee: ResponseTee,
        opened: _SyncOpen,
        portal: anyio.from_thread.BlockingPortal,
        holds: BackgroundSlots,
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
        # The client's reads begun (counted under _reading, which a read under way holds),
        # their count at the followers' last look and when it was seen to change (in the
        # portal's loop): see _stalled.
        self._reads = 0
        self._reads_seen = -1
        self._seen_at = 0.0
        # The followers' decision to go on without the client, and the client's close, each
        # in one step (never blocking: taken in the portal's loop).
        self._turn = threading.Lock()
        # The answer was stored while the client did not read: its reads pass the rest of
        # the upstream's body on, unrecorded (see _stalled).
        self._passing = False
        # Mid-answer: the client's place in the live stream, kept where it was, and its
        # reads on from there once it reads again (see _stalled).
        self._place: tuple[LiveFlight[bytes], Cursor] | None = None
        self._reading_on: _SyncAnswerBody | None = None
        self._resumable = True  # a resume window may hold the stream once the client left
        watch_client(tee, self)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise _closed_by_client(self._lib)
        if self._handed_over:
            return self._after_left()
        try:
            chunk = self._next(reader=True)
        except _TransportClosed as exc:
            raise _closed_under(self._lib) from exc
        except Exception as exc:
            if self._closed:  # (its upstream closed under this read, by the close)
                raise _closed_by_client(self._lib) from exc
            raise
        if chunk is _LEFT_BEHIND:
            return self._after_left()  # (the followers went on without it meanwhile)
        if chunk is None:
            if self._closed:
                raise _closed_by_client(self._lib)
            raise StopIteration
        return chunk

    def _after_left(self) -> bytes:
        # The client reads again after the followers went on without it (_stalled): past a
        # stored answer, the upstream's body as it comes; mid-answer, from its place in the
        # live stream. Closed meanwhile (by another thread, since this read's check): the
        # library's error, as for any read of a closed response — never a clean end
        # (helper-119: a stop button's close ended the reader with 179 of 536 bytes).
        if self._closed or (not self._passing and self._place is None):
            raise _closed_by_client(self._lib)
        if self._passing:
            return self._passed_on()
        return self._read_on()

    def _passed_on(self) -> bytes:
        it = self._it
        if it is None:
            it = self._it = iter(self._inner)
        try:
            chunk: bytes = next(it)
        except StopIteration:
            raise
        except Exception as exc:
            if self._closed:  # (its upstream closed under this read, by the close)
                raise _closed_by_client(self._lib) from exc
            raise
        return chunk

    def _read_on(self) -> bytes:
        # From the client's place in the live stream, as a follower reads (through an answer
        # body, as a resume's: no exchange of its own to leave).
        reading_on = self._reading_on
        if reading_on is None:
            assert self._place is not None
            live, cursor = self._place
            opened = self._opened.beside(NoExchange())
            try:
                opened.enter()
                opened.call(live.flight.claim, cursor)  # (it came back: its place is wanted)
            except _TransportClosed as exc:
                opened.leave()
                raise _closed_under(self._lib) from exc
            reading_on = self._answer_body(
                live.chunks(cursor, self._tee.join_timeout), opened, self._portal
            )
            with self._turn:
                closed = self._closed
                if not closed:
                    self._reading_on = reading_on
            if closed:  # (closed by another thread meanwhile: it left the place)
                reading_on.close()
                raise _closed_by_client(self._lib)
        return next(reading_on)

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

    async def _stalled(self) -> bool:
        # Asked by a follower that waited STALL_LOOK seconds for a piece (as
        # _AsyncTeeBody._stalled): a client that began no read for a whole look's time, and
        # is in none now, stopped reading — google-genai drops every stream it stops without
        # closing it (its followers, and every identical request after them, waited out
        # their read timeout, until a collection found the response; helper-117). The
        # followers go on without it. Decided under the client's read lock, taken without
        # waiting (its holder may be waiting for this loop), before anything is awaited: a
        # read begun after it, or another follower's look, finds it decided. True: the
        # followers went on without the client.
        now = time.monotonic()
        if not self._reading.acquire(blocking=False):
            self._reads_seen = self._reads  # (a read is under way)
            self._seen_at = now
            return False
        try:
            reads = self._reads
            if reads != self._reads_seen:
                self._reads_seen = reads
                self._seen_at = now
                return False
            # (Looks from several followers come together: a whole look's time since the
            # client's reads were last seen to change, or to go on.)
            if now - self._seen_at < flight.STALL_LOOK:
                return False
            tee = self._tee
            with self._turn:
                if self._closed or self._handed_over or not self._opened.open:
                    return False
                answered = tee.answered
                if not answered and not tee.read_elsewhere:
                    return False  # (no one reads on: as _AsyncTeeBody._stalled)
                if not answered:
                    # Mid-answer: a place kept where the client was in the live stream
                    # (none: the stream failed — then nothing is taken over, and the
                    # client's next read says so, never a clean end).
                    place = tee.follow_on()
                    if place is None:
                        return False
                    self._place = place
                self._opened.timing = False  # (what the followers pull is no byte it had)
                self._passing = answered
                self._handed_over = True
        finally:
            self._reading.release()
        if answered:
            # The answer is complete: it is stored, and the followers' streams end, now. The
            # client, if it reads again, gets the rest of the upstream's body as it comes,
            # not recorded: exactly the upstream's bytes.
            tee.stop("the client stopped reading after the completing event")
            await self._opened.leave_here()
            return True
        # Mid-answer: the followers take the upstream over, as from a client that closed
        # its response (a drain thread reads on for them; else it ends here: both block,
        # so in a thread). The client, if it reads again, reads on from its place.
        threading.Thread(target=self._let_go_quietly, name="sse-cache-drain", daemon=True).start()
        return True

    def _client_left(self) -> bool:
        tee = self._tee
        if tee.ended:
            return False
        hold = self._resumable and tee.resume_window is not None and self._holds.take()
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
            if reader:
                if self._closed:
                    # Closed while this thread waited for the lock: the drain thread reads
                    # for the followers now (helper-92: this read took a chunk from between
                    # theirs).
                    raise _closed_by_client(self._lib)
                if self._handed_over:
                    return cast("bytes", _LEFT_BEHIND)  # (by the followers: see _stalled)
                self._reads += 1
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
        """The transport closes while this drain reads the upstream on: the stream ends now
        and its exchange is left before the backend closes — what was relayed judged (stored
        if it holds the completing event) when no one reads it any more, else failed for its
        readers, here and in other processes (told at once, its lease released, rather than
        after a lease's silence). A leaving under way in the drain thread (the answer
        stored, say) is waited for. (The drain thread finds the exchange left at its next
        step.)"""
        opened = self._opened
        if opened.open:
            try:
                opened.call(self._end_for_closing)
            except _TransportClosed:
                return
            opened.leave()
        opened.wait_left()

    def _end_for_closing(self) -> None:
        # (The portal's: see settle.)
        tee = self._tee
        if tee.ended:
            return
        if tee.wanted:
            tee.fail("the transport was closed")
        else:
            self._stop_unread()

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

    def close_unread(self) -> None:
        """Close this body, never handed to its client (its request was interrupted after
        the head): as :meth:`close` — the followers read on, or the upstream is closed and
        the exchange left — but no resume window holds the stream: the client had nothing
        to resume by."""
        self._resumable = False
        self.close()

    def close(self) -> None:
        self._opened.timing = False  # the client is gone: no byte it never had is reported
        with self._turn:
            if self._closed:  # (once)
                return
            self._closed = True
            handed_over, passing = self._handed_over, self._passing
            place, self._place = self._place, None
            reading_on, self._reading_on = self._reading_on, None
        if _exiting():
            return
        if passing:
            # (Its exchange was left when the answer was stored: see _stalled.)
            self._inner.close()
            return
        if place is not None:
            # The followers went on without the client (_stalled): it leaves its place in
            # the live stream, as a follower does — also if it never read from it.
            try:
                if reading_on is not None:
                    reading_on.close()
            finally:
                live, cursor = place
                with suppress(_TransportClosed):
                    self._opened.call(live.leave, cursor)  # (idempotent)
            return
        if handed_over:
            return
        self._let_go()

    def _let_go_quietly(self) -> None:
        # (A thread's: see _stalled.)
        try:
            self._let_go()
        except Exception as exc:  # (the transport closed meanwhile, or the backend failed)
            logger.debug("sse_cache: going on without a stalled client failed: %r", exc)

    def _let_go(self) -> None:
        # The client went (closed its response, or stopped reading: _stalled): the followers
        # read the upstream on (a drain thread), else the stream ends here.
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


class _SyncTeeStream:
    """What the client's response holds of a miss's body (a :class:`_SyncTeeBody`): its
    reads and its close are the body's.

    A response its program drops without closing it (an SDK stream left by ``break``
    outside ``with``; google-genai's; httpx's sync responses are in a reference cycle: only
    a collection finds them) is never closed by its client, and its live stream would be
    offered for good to identical requests, which would wait on it until their read
    timeout. Once this shell is collected, the body goes on as if its client had closed it:
    the followers read the upstream on (a complete answer is stored), else it is closed
    and what was recorded judged. The body is never collected with the shell (the shell's
    finalizer holds it), nor is its upstream, which the followers may still read on
    (collected with the response, the upstream was closed by its own finalizers, and the
    followers failed: helper-116's D11)."""

    _lib: ClassVar[ModuleType]

    def __init__(self, body: _SyncTeeBody) -> None:
        self._body = body
        unclosed = lambda: not body._closed  # noqa: E731 - (the finalizer must not hold self)
        weakref.finalize(self, _settled_when_collected, unclosed, body.close).atexit = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return self._body.__next__()

    def close(self) -> None:
        self._body.close()


def _settled_when_collected(pending: Callable[[], bool], settle: Callable[[], None]) -> None:
    # A response's finalizer: ``settle()`` (a miss's body is closed, a hit's or a follower's
    # exchange left) unless ``pending()`` says there is nothing left to do. A finalizer runs
    # in whichever thread collected the response, the portal's own included, where a
    # blocking call into the portal would wait for ever: settled from a thread of its own.
    if pending() and not _exiting():
        threading.Thread(
            target=_settle_quietly, args=(settle,), name="sse-cache-dropped", daemon=True
        ).start()


def _settle_quietly(settle: Callable[[], None]) -> None:
    try:
        settle()
    except Exception as exc:  # (the transport closed meanwhile, or the backend failed)
        logger.debug("sse_cache: settling a dropped response failed: %r", exc)


_LEFT_BEHIND = object()  # (_next: the followers went on without the client)


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
        # Dropped unclosed (a hit, a follower, a producer's client reading on), its exchange
        # would never be left: its task would wait in the portal for good.
        unleft = lambda: opened.open  # noqa: E731 - (the finalizer must not hold self)
        weakref.finalize(self, _settled_when_collected, unleft, opened.collected).atexit = False

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
            if self._closed:  # (as _AsyncAnswerBody: a close from another thread under it)
                raise _closed_by_client(self._lib) from exc
            raise _aborted(self._lib, exc) from exc
        except TimeoutError as exc:
            self._opened.leave(exc)
            raise _timed_out(self._lib, self._read_timeout or 0) from exc
        except BaseException as exc:
            self._opened.leave(exc)
            raise
        if chunk is None:
            self._opened.leave()
            if self._closed:
                raise _closed_by_client(self._lib)
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

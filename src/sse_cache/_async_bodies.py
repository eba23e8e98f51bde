"""The response bodies of the async httpx / httpx2 cache transport
(:class:`sse_cache._transport.AsyncCacheTransportBase`), run on the caller's event loop: a
miss's body hands each upstream chunk to the client and records it; an answer's body replays
from the cache; a pass's body relays the upstream's.

Each body also notes when its first non-empty chunk goes to the client (only when the
transport has hooks: one boolean check per chunk otherwise): the response's time to first
byte, reported once through :meth:`Exchange.first_byte`, as the ASGI middleware does."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Any, ClassVar

import anyio

from . import flight
from ._cancellation import on_asyncio
from ._transport_bodies import (
    _aborted,
    _closed_by_client,
    _ClosedUnderReader,
    _timed_out,
    watch_client,
)
from .flight import Cursor, LiveFlight, SharedStreamAborted
from .http._answers import Answer
from .http._slots import BackgroundSlots
from .http._wire import close_iterator
from .http.service import Exchange, ResponseTee


def _being_cancelled() -> bool:
    """Whether the current asyncio task has a cancellation pending (its own, not a shielded
    future's)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _AsyncOpen:
    """An exchange entered by ``handle_async_request`` and left when the response ends.

    ``started``: when the request arrived (``time.monotonic()``), to report the response's
    time to first byte; None when nobody wants it (no hooks, or a resume: the middleware
    reports none for those either).

    A program may drop its response without closing it (an SDK stream left by ``break``
    outside ``async with``; google-genai never closes a stream it stops): its body never
    leaves the exchange then. While it is open, an async generator of its own
    (:func:`_left_when_collected`) waits here; when the response is collected, the event
    loop's finalizer closes that generator, in a task, and it leaves the exchange — else the
    flight would stay offered to identical requests that no one would ever feed, and a
    cross-process lease would be renewed for good. The program's own ``finally: await
    response.aclose()``, collected with it, may run at the same time: whichever comes first
    leaves, the other finds it left (helper-115: two tasks drove the exchange's exit at
    once; the answer was lost, or asyncio logged ``anext(): asynchronous generator is
    already running``). A miss's body takes the watch over (:meth:`watched_by`): it goes
    on without its client rather than leave at once."""

    __slots__ = ("_cm", "_ex", "_on_collected", "_started", "_watch", "open", "timing")

    def __init__(
        self, cm: AbstractAsyncContextManager[Exchange], started: float | None = None
    ) -> None:
        self._cm = cm
        self._started = started
        self._ex: Exchange | None = None
        self._watch: AsyncGenerator[None, None] | None = None
        # What the watch does once collected, when the response's body watches for itself
        # (a miss's: see watched_by).
        self._on_collected: Callable[[], Awaitable[None]] | None = None
        self.open = False
        #: The response's first body bytes are still to be reported.
        self.timing = False

    async def enter(self) -> Exchange:
        ex = self._ex = await self._cm.__aenter__()
        self.open = True
        self.timing = self._started is not None
        watch = self._watch = _left_when_collected(self)
        await anext(watch)  # (started: only a started generator is finalized)
        return ex

    def first_byte(self) -> None:
        """The response's first body bytes go to the client now: report the time it waited
        for them (once)."""
        self.timing = False
        assert self._ex is not None and self._started is not None
        self._ex.first_byte(time.monotonic() - self._started)

    def watched_by(self, collected: Callable[[], Awaitable[None]]) -> AsyncGenerator[None, None]:
        """The watch, given to the client's side of a miss's body (its shell) to hold:
        once that is collected, ``collected()`` runs in place of :meth:`collected` — the body
        goes on without its client (see :class:`_AsyncTeeStream`). It is no longer closed
        as the exchange is left: the body closes it as it closes, else it is finalized with
        the shell and finds nothing to do."""
        watch, self._watch = self._watch, None
        assert watch is not None
        self._on_collected = collected
        return watch

    def watched_by_nothing(self) -> None:
        """The body that took the watch over (:meth:`watched_by`) was closed: once collected,
        the watch does nothing (not :meth:`collected`'s own work: that body's followers may
        read on)."""
        self._on_collected = _nothing_to_do

    async def leave(self, exc: BaseException | None = None) -> None:
        if not self.open:
            return
        self.open = False
        watch, self._watch = self._watch, None
        # Shielded: a store that has begun finishes even if the reader is being cancelled
        # (every backend call is bounded by ``backend_timeout``).
        with anyio.CancelScope(shield=True):
            try:
                if exc is None:
                    await self._cm.__aexit__(None, None, None)
                else:
                    await self._cm.__aexit__(type(exc), exc, exc.__traceback__)
            finally:
                if watch is not None:
                    await watch.aclose()  # (it finds the exchange left: nothing to do)

    async def collected(self) -> None:
        """The response was collected unclosed: its client is gone. A hit's or a follower's
        exchange is left (once, whoever else leaves too); a miss's body, which took the
        watch over (:meth:`watched_by`), goes on without its client."""
        on_collected = self._on_collected
        if on_collected is not None:
            await on_collected()
            return
        if not self.open:
            return
        self._watch = None  # (the generator running this)
        await self.leave()


async def _nothing_to_do() -> None:
    pass


async def _left_when_collected(opened: _AsyncOpen) -> AsyncGenerator[None, None]:
    # (See _AsyncOpen.) Referenced only by ``opened`` while it is open (a cycle, which its
    # leaving breaks: a finished generator drops its frame).
    try:
        yield
    finally:
        await opened.collected()


class NoExchange:
    """What an :class:`_AsyncOpen` (or the sync transport's) enters and leaves when there is
    no exchange to leave: a resume's answer, a producer's client reading on from its live
    stream. ``answer``: a resume's, closed as it is left, as an exchange closes its own (the
    live stream it follows is left so, also when its response was dropped unread); None
    where the body closes what it reads."""

    __slots__ = ("_answer",)

    def __init__(self, answer: Answer | None = None) -> None:
        self._answer = answer

    async def __aenter__(self) -> Any:  # (None, where an exchange would be)
        return None

    async def __aexit__(self, *exc: object) -> bool:
        if self._answer is not None:
            await self._answer.aclose()
        return False


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
    the upstream under a cancelled read). And so it is when the client's response is
    collected unclosed (:meth:`collected`: the client holds a shell of this body,
    :class:`_AsyncTeeStream`)."""

    _lib: ClassVar[ModuleType]
    _answer_body: ClassVar[type[_AsyncAnswerBody]]  # (the same library's)

    def __init__(
        self, inner: Any, tee: ResponseTee, opened: _AsyncOpen, holds: BackgroundSlots
    ) -> None:
        self._inner = inner
        self._it: AsyncIterator[bytes] | None = None
        self._tee = tee
        self._opened = opened
        self._holds = holds
        # A chunk was relayed since the last publish to other processes (at the next read).
        self._unpublished = False
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
        # A follower's pull is inside the upstream's iterator (on trio, in the follower's
        # own task: asyncio pulls in a task that is stopped before the upstream is closed).
        self._follower_reading = False
        # The client's reads begun, and whether one is under way: a follower that waited
        # for a piece finds out from them whether the client stopped reading (_stalled).
        self._reads = 0
        self._reads_seen = -1
        self._seen_at = 0.0
        self._asking = False
        # The answer was stored while the client did not read: its reads pass the rest of
        # the upstream's body on, unrecorded (see _stalled).
        self._passing = False
        # Once the followers took the upstream over from a client that had stopped reading:
        # that client's reads on, from its live stream as a follower's, and its place there.
        self._reading_on: _AsyncAnswerBody | None = None
        self._place: tuple[LiveFlight[bytes], Cursor] | None = None
        # The watch of the client's side (its shell: _AsyncTeeStream), which calls
        # collected() once that is collected; closed (quietly) when the client closes.
        self._watch: weakref.ref[AsyncGenerator[None, None]] | None = None
        watch_client(tee, self)

    # One iterator for every ``async for``: a client that drains the rest of a response it
    # stopped reading (the openai SDK after ``[DONE]``) continues where it was.
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise _closed_by_client(self._lib)
        if self._handed_over:
            if self._passing:
                return await self._passed_on()
            reading_on = self._reading_on
            if reading_on is None:
                raise StopAsyncIteration
            assert self._place is not None
            live, cursor = self._place
            live.flight.claim(cursor)  # (it came back: its place is wanted now)
            return await reading_on.__anext__()
        self._asking = True
        try:
            chunk = await self._next()
        finally:
            self._asking = False
            self._reads += 1
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _stalled(self) -> bool:
        # Asked by a follower that waited STALL_LOOK seconds for a piece: a client that asked
        # for none since the last look, and asks for none now, stopped reading — a program
        # that dropped the response without closing it (google-genai does so with every
        # stream it stops: its followers, and every identical request after them, waited out
        # their read timeout, until a collection found the response; helper-115), or one slow
        # to read on. True: the followers went on without it.
        reads = self._reads
        now = time.monotonic()
        if self._asking or reads != self._reads_seen:
            self._reads_seen = reads
            self._seen_at = now
            return False
        # (Looks from several followers come together: a whole look's time since the
        # client's reads were last seen to change, or to go on.)
        if now - self._seen_at < flight.STALL_LOOK:
            return False
        if self._closed or self._handed_over or not self._opened.open:
            return False
        tee = self._tee
        # Decided before anything is awaited: another follower's look, or the client's next
        # read, sees it at once.
        if tee.answered:
            # The answer is complete: it is stored, and the followers' streams end, now. The
            # client, if it reads again, gets the rest of the upstream's body as it comes,
            # not recorded: exactly the upstream's bytes (read on from the live stream, it
            # ended with the answer, after half a trailing comment: helper-116).
            self._handed_over = self._passing = True
            self._opened.timing = False  # (no byte of it reaches the client now)
            tee.stop("the client stopped reading after the completing event")
            await self._opened.leave()
            return True
        # Mid-answer: the followers take the upstream over, as from a client that closed its
        # response, and read on (a complete answer is stored). The client, if it reads
        # again, reads on from the live stream, as they do, from a place kept where it was
        # (none: the stream failed — then nothing is taken over, and the client's next read
        # says so, never a clean end). Not when no one else reads on (a cross-process
        # publish failed, say, and its keeper looked: the client, slow, was cut; helper-119).
        if not tee.read_elsewhere:
            return False
        place = tee.follow_on()
        if place is None:
            return False
        live, cursor = place
        opened = _AsyncOpen(NoExchange())
        opened.open = True  # (nothing to enter)
        self._handed_over = True
        self._opened.timing = False  # (what the followers pull is no byte this client had)
        self._place = place
        self._reading_on = self._answer_body(live.chunks(cursor, tee.join_timeout), opened)
        if not self._hand_over():
            await self._abandon()  # (no one reads on: the stream stopped)
        return True

    async def _passed_on(self) -> bytes:
        # After the answer, stored without this client (_stalled): the upstream's body on.
        if self._it is None:
            raise StopAsyncIteration
        return await self._it.__anext__()

    async def _next(self, *, pulling: bool = False) -> bytes | None:
        # ``pulling``: for the followers, once the client has gone (_pull); else the client's.
        tee = self._tee
        if self._unpublished:
            self._unpublished = False
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
        self._unpublished = True
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

    def hand_over(self) -> bool:
        """The client went before this body was handed to it (its request was cancelled
        after the head): True when followers read on, and the upstream and the exchange
        are theirs now; else the caller closes the upstream and leaves the exchange. No
        resume window holds the stream: the client had nothing to resume by."""
        self._opened.timing = False  # (no byte went to the client: no first byte to report)
        return self._hand_over(resumable=False)

    def _hand_over(self, *, resumable: bool = True) -> bool:
        # The client went (closed early, or its read was cancelled): True when followers
        # (or a resume window) read on, and the upstream is theirs now.
        tee = self._tee
        if not self._opened.open or tee.ended:
            return False
        # A resume window needs a task that reads on while no one reads: on asyncio, a
        # task of the loop (trio has none outside a nursery: no window there).
        hold = resumable and tee.resume_window is not None and on_asyncio() and self._holds.take()
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
        # For the followers, once the client has gone: one more chunk into the live stream,
        # published at once; a complete answer ends the stream with it.
        if self._client_reading:
            # The client's own read was under way when it closed this response (from another
            # task): it passes that read's chunk (or end, or failure) on; reading the
            # upstream under it raised the generator's RuntimeError (helper-92).
            if self._client_read_done is None:
                self._client_read_done = anyio.Event()
            await self._client_read_done.wait()
            if not self._opened.open or self._tee.ended or self._tee.cut:
                return False
            if not self._unpublished:
                return True  # (nothing came: read on)
        else:
            self._follower_reading = True
            try:
                chunk = await self._next(pulling=True)
            finally:
                self._follower_reading = False
            if chunk is None:
                return False
        tee = self._tee
        self._unpublished = False
        await tee.flush()
        if not tee.end_if_answered():
            return True
        await self._finish()  # closes the upstream (its body's end is not waited for)
        return False

    async def _abandon(self) -> None:
        try:
            await self._stop_reading()
            try:
                if not (self._client_reading or self._follower_reading):
                    await close_iterator(self._it)
                # (else another task is inside the iterator, which cannot be closed under
                # it: closing the upstream's response ends that read with an error. So it
                # is when the transport closes under a follower's pull on trio: it raised
                # "aclose(): asynchronous generator is already running"; helper-145.)
            finally:
                await self._inner.aclose()
        finally:
            # Every reader left (each had what was relayed): complete if that holds the
            # completing event (the SDKs stop at chat's [DONE]), else failed.
            tee = self._tee
            tee.stop("every reader left before the stream ended")
            await self._opened.leave()

    async def collected(self) -> None:
        # The client's side of this body (its shell) was collected unclosed: its program
        # dropped the response. This body was not collected with it (the shell's finalizer
        # held it), nor was its upstream: it goes on as if the client had closed it — the
        # followers read the upstream on (a complete answer is stored), else the upstream is
        # closed and what was recorded judged. (Collected with the response, the upstream
        # was closed by its own finalizers, and the followers failed: helper-116's D11.)
        self._watch = None  # (the generator running this)
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:  # (once: the program's close and the collector's may both come)
            return
        self._opened.timing = False  # the client is gone: no byte it never had is reported
        self._closed = True
        watch = None if self._watch is None else self._watch()
        self._watch = None
        if watch is not None:
            await watch.aclose()  # (it finds this body closed: nothing to do)
        # Nothing more for the watch to do: the exchange lets go of this body, which holds
        # it (a cycle that kept every closed miss's body, recording and upstream stream
        # until the next collection: helper-121).
        self._opened.watched_by_nothing()
        if self._passing:
            # (Its exchange was left when the answer was stored: see _stalled.)
            try:
                await close_iterator(self._it, quiet=True)  # (quiet: perhaps read elsewhere)
            finally:
                await self._inner.aclose()
            return
        reading_on, self._reading_on = self._reading_on, None
        if reading_on is not None:
            # Taken over (_stalled): the client leaves its place in the live stream, as a
            # follower does — also if it never read from it (its reader never began).
            assert self._place is not None
            live, cursor = self._place
            try:
                await reading_on.aclose()
            finally:
                await live.leave(cursor)  # (the last reader to leave closes the upstream)
            return
        if self._handed_over or self._hand_over():
            return
        await self._abandon()


class _AsyncTeeStream:
    """What the client's response holds of a miss's body (an :class:`_AsyncTeeBody`): its
    reads and its close are the body's.

    Apart from the body for a program that drops its response unclosed: the collector then
    finds this shell and its watch (:meth:`_AsyncOpen.watched_by`), never the body, which a
    finalizer of the watch holds until the watch is gone — nor the body's upstream, which
    the followers may still read on (:meth:`_AsyncTeeBody.collected`).

    Of the watch, not of this shell: the collector kills the weakrefs to what it finds in a
    cycle before it runs any finalizer, also when a finalizer then brings it all back. A
    young collection that found this shell, not the watch (older: made as the exchange was
    entered), let go of the body while the event loop's finalizer of the program's own
    generator in the cycle (httpx's ``aiter_raw()``) brought the shell and the watch back,
    unfinalized: the next collection found the body with them, and the loop closed the
    generators under its upstream (httpx's, httpcore's) as it closed the watch — the
    followers it handed the upstream to read a closed iterator: a clean end of part of the
    answer (helper-124). The watch's finalizer runs in the collection that kills its weakref
    (the loop's hook keeps the watch, and with it the body, until it has run)."""

    _lib: ClassVar[ModuleType]

    def __init__(self, body: _AsyncTeeBody) -> None:
        self._body = body
        watch = self._watch = body._opened.watched_by(body.collected)
        body._watch = weakref.ref(watch)
        weakref.finalize(watch, _kept, body).atexit = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._body.__anext__()

    def aclose(self) -> Awaitable[None]:
        return self._body.aclose()


def _kept(body: _AsyncTeeBody) -> None:
    """(A finalizer's: it only holds ``body`` while its shell's watch lives.)"""


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
            if self._closed:  # (see below)
                raise _closed_by_client(self._lib) from None
            raise
        except SharedStreamAborted as exc:
            await opened.leave(exc)
            if self._closed:
                # Closed by the client from another task, whose close left the stream under
                # this read before its cancellation landed (a piece came in the same turn:
                # the read was woken, and anyio delivers no cancellation to it then): the
                # library's ReadError, as for any read under a close (helper-125: an abort).
                raise _closed_by_client(self._lib) from exc
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

"""The streams :class:`~sse_cache.engine.StreamCache` hands out, and the engine's side of a
live stream it produces.

:class:`CachedStream` is what :meth:`StreamCache.stream` and :meth:`StreamCache.replay` yield:
an instant or paced replay of stored events, or a reader of a live flight (the producer's own
reader or a follower's). :class:`Production` pulls the upstream for a live flight, records it
and judges and stores it once.

They know nothing of the cache itself: the engine hands each what it needs as values — a
``notify`` callable for notices, a ``store`` callable for the judged entry, and, for a
follower, a ``rejoin`` callable that takes it round the lookup order once more (which then
calls :meth:`CachedStream.follow`). :class:`~sse_cache._recording.LiveRecording` (a stream an
integration pushes) takes the same ``notify`` and ``store``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from types import TracebackType

import anyio
import anyio.lowlevel
import msgspec

from ._notices import CacheStatus, Notice
from .entry import Entry
from .events import Event
from .flight import Cursor, Head, LiveFlight, Phase, SharedStreamAborted
from .pacing import Pacing
from .recorder import Recorder, RecorderState, event_size

__all__ = [
    "CachedStream",
    "Notify",
    "Production",
    "Rejoin",
    "SaveEntry",
    "not_an_event",
]

logger = logging.getLogger("sse_cache")

#: Hands a :class:`Notice` to the cache's hooks.
Notify = Callable[[Notice], None]
#: Stores a judged entry under a key for a lifetime in seconds (None: none), for a request
#: that began at a ``time.time()`` (None: unknown), returning why it was not stored (the
#: entry could not be encoded, the backend write failed or was skipped, a newer entry is
#: stored: see EntryStore.save), ``""`` when it was.
SaveEntry = Callable[[str, Entry, float | None, float | None], Awaitable[str]]
#: Takes a follower whose flight failed before sending it anything round the lookup order
#: once more: it follows another flight (:meth:`CachedStream.follow`) or produces one.
Rejoin = Callable[["CachedStream"], None]

# An instant replay yields to the event loop after running this long without a pause (checked
# every _CHECKPOINT_EVERY events): a checkpoint per event costs more than the event itself,
# one per 64 events still adds a quarter to a replay (docs/benchmarks.md), none at all would
# starve other tasks and delay cancellation.
_CHECKPOINT_EVERY = 64
_YIELD_AFTER = 0.002
_CLOSE_TIMEOUT = 5.0
_INSTANT = Pacing()
_RECORDING = RecorderState.RECORDING
# The engine's live streams carry events, with no HTTP head of their own.
_EVENTS_HEAD = Head(200, [("content-type", "text/event-stream")])


class Production:
    """The engine's side of a live stream it produces: the upstream iterator (the flight's
    source, pulled in turn by whichever reader needs the next event), the recording, and the
    verdict — judged once (a ``not_stored`` notice to ``notify`` when it cannot be stored),
    stored once (by ``store``, which says why when it could not)."""

    __slots__ = (
        "abandoned",
        "began",
        "clock",
        "entry",
        "iterator",
        "judged",
        "keep_event",
        "keep_time",
        "key",
        "limit",
        "live",
        "notify",
        "recorder",
        "settled",
        "started",
        "store",
        "stored",
        "ttl",
    )

    def __init__(
        self,
        live: LiveFlight[Event],
        key: str,
        recorder: Recorder,
        ttl: float | None,
        *,
        notify: Notify,
        store: SaveEntry,
        began: float | None = None,
    ) -> None:
        self.notify = notify
        self.store = store
        #: When the request began (``time.time()``): not stored over an entry created since.
        self.began = began
        self.live = live
        self.key = key
        self.recorder = recorder
        self.keep_event, self.keep_time, self.limit = recorder.sink()
        self.ttl = ttl
        self.iterator: AsyncIterator[Event] | None = None
        self.started = 0.0
        self.clock = time.monotonic
        self.judged = False
        self.entry: Entry | None = None  # judged storable, being stored
        self.settled = False  # the store was attempted (once per flight)
        self.stored = False
        self.abandoned = False
        live.production = self
        live.judge = self.judge
        live.respond(_EVENTS_HEAD)

    async def pull(self) -> bool:
        """The flight's source: one event from the upstream into the log and the recording.
        False at the upstream's end."""
        assert self.iterator is not None
        try:
            event = await self.iterator.__anext__()
            if type(event) is not Event and not isinstance(event, Event):
                raise not_an_event(event)
        except StopAsyncIteration:
            self.ended()
            return False
        except Exception as exc:
            self.recorder.fail(f"the upstream stream failed: {exc!r}")
            raise
        self.live.deliver(event, self.record(event))
        return True

    def record(self, event: Event) -> int:
        """Record ``event``; its size."""
        recorder = self.recorder
        size = event_size(event)
        if recorder.state is _RECORDING and (
            event.data.__class__ is str or not recorder.refuse_unsound(event)
        ):
            total = recorder.size = recorder.size + size
            if total > self.limit:
                recorder.overflow()
            else:
                self.keep_event(event)
                self.keep_time(self.clock() - self.started)
        return size

    def ended(self) -> None:
        # Judged and stored when a reader leaves its ``async with`` (or an identical request
        # arrives first): the reader gets the end of its stream before paying for judging
        # (a pass over the events), encoding and writing.
        self.live.source = None
        self.live.end()

    async def abandon(self) -> None:
        """Every reader left before the end: close the upstream. What the adapter already
        saw complete (e.g. ``response.completed``) may still be stored."""
        self.abandoned = True
        self.judge(clean_end=False)
        await _aclose_quietly(self.iterator)

    def judge(self, clean_end: bool = True) -> None:
        if self.judged:
            return
        self.judged = True
        entry = self.recorder.finish(clean_end=clean_end)
        if entry is not None and self.ttl is not None:
            entry = msgspec.structs.replace(entry, expires_at=time.time() + self.ttl)
        self.entry = self.live.entry = entry
        if entry is None:
            self.settled = True
            self.notify(Notice(kind="not_stored", key=self.key, detail=self.recorder.reason))
            # A failed or unstorable stream is offered no more: an identical request asks
            # the upstream itself, never joins and replays it as "shared".
            self.live.close()

    async def finish(self) -> None:
        """Judge and store, once per flight, whoever gets here first."""
        self.judge(clean_end=self.live.flight.phase is Phase.ENDED)
        if self.settled:
            return
        self.settled = True
        assert self.entry is not None
        try:
            why = await self.store(self.key, self.entry, self.ttl, self.began)
            if why:
                self.recorder.reason = why
            else:
                self.stored = True
        finally:
            self.live.close()  # from now on identical requests find the stored entry


class CachedStream:
    """The events of one request, from the cache or the upstream. Iterate it with
    ``async for``, once, inside its ``async with`` block (it is an iterator, as a file is:
    a second ``async for`` gets nothing more); :attr:`status` and :attr:`key` are known
    before the first event.

    After the stream, :attr:`stored` tells whether it was stored and :attr:`reason` why not.

    A stream that reads a live flight (:meth:`follow`) is an async context manager:
    :meth:`StreamCache.stream` leaves the flight when its block is left, and judges and stores
    what the upstream sent.
    """

    def __init__(
        self,
        status: CacheStatus,
        key: str,
        *,
        entry: Entry | None = None,
        events: Sequence[Event] = (),
        pacing: Pacing = _INSTANT,
        rejoin: Rejoin | None = None,
    ) -> None:
        self.status = status
        self.key = key
        self.entry = entry
        self.stored = False
        self.reason = ""
        self._events = events
        self._pacing = pacing
        self._live_flight: LiveFlight[Event] | None = None
        self._cursor: Cursor | None = None
        self._join_timeout = 0.0
        self._rejoin = rejoin  # a follower's way back into the lookup order, used once
        self._retried = False
        self._left = False
        self._it: AsyncIterator[Event] | None = None
        self._batched = False

    def follow(self, live: LiveFlight[Event], cursor: Cursor, join_timeout: float) -> None:
        """Read ``live`` from ``cursor`` on (a flight a :class:`Production` pulls), giving up
        with :class:`SharedStreamAborted` when it sends nothing for ``join_timeout`` seconds."""
        self._live_flight = live
        self._cursor = cursor
        self._join_timeout = join_timeout

    async def __aenter__(self) -> CachedStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self._leave(None)
            return
        # Leaving by an exception (cancellation included) must still leave the flight.
        with anyio.CancelScope(shield=True):
            await self._leave(exc)

    @property
    def age(self) -> float | None:
        """Seconds since the replayed entry was stored (hits only)."""
        if self.entry is None:
            return None
        return max(0.0, time.time() - self.entry.created_at)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterator()

    def __anext__(self) -> Awaitable[Event]:
        return self._iterator().__anext__()

    def _iterator(self) -> AsyncIterator[Event]:
        # Plain async generators, created once: no resource lives in them (the upstream is
        # closed by the ``async with`` around the stream), so abandoning one is harmless on
        # asyncio and trio alike, and they are the cheapest way to yield events.
        if self._left:
            # (It said the shared stream stopped because every reader left: misleading.)
            raise RuntimeError(
                "this stream's block was left: iterate it inside `async with cache.stream(...)`"
            )
        it = self._it
        if it is None:
            if self._batched:
                raise RuntimeError("this stream is already being iterated in batches")
            if self._live_flight is not None:
                it = self._live()
            elif self._pacing.instant:
                it = self._instant()
            else:
                it = self._paced()
            self._it = it
        return it

    def batches(
        self, max_events: int = 256, *, idle_tick: float | None = None
    ) -> AsyncIterator[list[Event]]:
        """The same events in lists of whatever is ready (at most ``max_events`` each): lets
        an HTTP integration write many events at once, which is far cheaper than one write
        per event. Paced replays still come one event per list, at their time; with
        ``idle_tick``, an empty list every ``idle_tick`` seconds of a longer wait, so that
        the integration can keep its connection alive (the keep-alive comments of the
        original are not recorded: without them a paced hit was silent until its first
        event, and proxies and clients with an idle timeout cut it; helper-89). Use either
        this or plain iteration on a stream, not both."""
        if self._it is not None or self._batched:
            raise RuntimeError("this stream is already being iterated")
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events!r}")
        if idle_tick is not None and not idle_tick > 0:
            raise ValueError(f"idle_tick must be > 0 seconds or None, got {idle_tick!r}")
        self._batched = True
        if self._live_flight is not None:
            return self._live_batches(max_events)
        if self._pacing.instant:
            return self._instant_batches(max_events)
        return self._paced_batches(idle_tick)

    async def _instant(self) -> AsyncIterator[Event]:
        events = self._events
        clock = time.monotonic
        due = clock() + _YIELD_AFTER
        for start in range(0, len(events), _CHECKPOINT_EVERY):
            for event in events[start : start + _CHECKPOINT_EVERY]:
                yield event
            if clock() >= due:
                await anyio.lowlevel.checkpoint()
                due = clock() + _YIELD_AFTER

    async def _instant_batches(self, size: int) -> AsyncIterator[list[Event]]:
        events = self._events
        for start in range(0, len(events), size):
            yield list(events[start : start + size])
            await anyio.lowlevel.checkpoint()

    async def _paced(self) -> AsyncIterator[Event]:
        async with aclosing(self._paced_batches(None)) as batches:
            async for (event,) in batches:
                yield event

    async def _paced_batches(self, tick: float | None) -> AsyncGenerator[list[Event], None]:
        # One event a list, at its time; with ``tick``, an empty list for every ``tick``
        # seconds of a longer wait.
        pacing = self._pacing
        begin = time.monotonic()
        for i, event in enumerate(self._events):
            due = begin + (pacing.delay(event.at) if pacing.mode == "original" else pacing.gap * i)
            left = due - time.monotonic()
            while tick is not None and left > tick:
                await anyio.sleep(tick)
                yield []
                left = due - time.monotonic()
            await anyio.sleep(max(0.0, left))
            yield [event]

    async def _live(self) -> AsyncIterator[Event]:
        # The hot loop of a miss: the flight's state machine is driven inline (no helper
        # generator or coroutine per event: a layer per event costs more than the event).
        while True:
            live, cursor = self._live_flight, self._cursor
            assert live is not None and cursor is not None
            flight = live.flight
            production: Production = live.production
            iterator = production.iterator
            cursors = flight.cursors
            while True:
                if (
                    live.source is not None
                    and not live.pulling
                    and len(cursors) == 1
                    and cursor.index - flight.base == len(flight.chunks)
                ):
                    # Alone on the upstream, and caught up: pull, record, yield — the same
                    # steps as LiveFlight.pull and Flight.read, without a call per event.
                    live.pulling = True
                    try:
                        assert iterator is not None
                        if cursor is live.producer_cursor:
                            event = await iterator.__anext__()  # bounded by the upstream
                        else:
                            # A follower left alone on the upstream gives up after
                            # join_timeout of silence, as it does with company.
                            event = await self._within_join_timeout(iterator)
                        if type(event) is not Event and not isinstance(event, Event):
                            raise not_an_event(event)
                    except StopAsyncIteration:
                        production.ended()
                        live.pulled()  # (ended by this pull: no longer read on)
                        break
                    except Exception as exc:
                        production.recorder.fail(f"the upstream stream failed: {exc!r}")
                        live.fail(f"the upstream failed: {exc!r}")
                        live.pulled()
                        raise
                    except BaseException:
                        # Cancelled inside the pull: the upstream iterator is finished for
                        # good (see LiveFlight.pull); whoever joined meanwhile must fail.
                        live.fail("the reader pulling the upstream was cancelled mid-read")
                        live.pulled()
                        raise
                    finally:
                        live.pulling = False
                    size = production.record(event)
                    if not flight.joinable and len(cursors) == 1:
                        cursor.offset += size  # (only counted: it was sent something)
                        yield event  # no one else reads it, nor ever will: no log
                        continue
                    live.deliver(event, size)
                    if flight.chunks and flight.chunks[-1] is event and len(cursors) == 1:
                        cursor.index += 1
                        cursor.offset = flight.total
                        yield event
                    continue  # (someone joined meanwhile: read it from the log below)
                events = flight.read(cursor)
                if not events:
                    break
                for event in events:
                    yield event
            if not await self._more():
                return

    async def _live_batches(self, size: int) -> AsyncIterator[list[Event]]:
        while True:
            live, cursor = self._live_flight, self._cursor
            assert live is not None and cursor is not None
            events = live.flight.read(cursor)
            for start in range(0, len(events), size):
                yield events[start : start + size]
            if not events and not await self._more():
                return

    async def _within_join_timeout(self, iterator: AsyncIterator[Event]) -> Event:
        idle = self._join_timeout
        with anyio.move_on_after(idle):
            return await iterator.__anext__()
        # (The upstream iterator, cancelled inside, is finished: the flight fails with it.)
        raise SharedStreamAborted(f"the shared stream sent nothing for {idle} s")

    async def _more(self) -> bool:
        """Nothing is ready for this reader: pull the upstream or wait for whoever does.
        False at the flight's clean end; raises :class:`SharedStreamAborted` at any other
        end — unless this reader was sent nothing yet, which then goes round once more."""
        live, cursor = self._live_flight, self._cursor
        assert live is not None and cursor is not None
        flight = live.flight
        phase = flight.state(cursor)
        if phase is Phase.ENDED:
            return False
        if phase is Phase.FAILED:
            if self._may_retry():
                assert self._rejoin is not None
                self._retried = True
                await live.leave(cursor)  # the last to leave closes the failed upstream
                self._rejoin(self)
                return True
            raise SharedStreamAborted(f"the shared stream stopped: {flight.why(cursor)}")
        idle = self._join_timeout
        if live.source is not None and not live.pulling:
            await live.pull(idle)
        elif not await live.wait(idle):
            raise SharedStreamAborted(f"the shared stream sent nothing for {idle} s")
        return True

    def _may_retry(self) -> bool:
        # A follower sent nothing yet asks again, once; one that has events must fail.
        cursor = self._cursor
        return (
            self._rejoin is not None
            and not self._retried
            and cursor is not None
            and cursor.offset == 0
            and self.status is CacheStatus.SHARED
        )

    async def _leave(self, exc: BaseException | None) -> None:
        live, cursor = self._live_flight, self._cursor
        if live is None or cursor is None or self._left:
            return
        self._left = True
        production: Production = live.production
        flight = live.flight
        if exc is not None and flight.phase is not Phase.ENDED and flight.cursors == {cursor}:
            production.recorder.fail(f"the reader left with {type(exc).__name__}")
        await live.leave(cursor)  # the last reader to leave early abandons the upstream
        if live.flight.phase is Phase.ENDED and (exc is None or not live.flight.cursors):
            # Whoever leaves first after the end judges and stores; a reader leaving with an
            # exception leaves that to the others, unless it is the last.
            await production.finish()
        elif production.abandoned and not production.settled:
            await production.finish()
        self.stored = production.stored
        if production.stored:
            self.reason = ""
        elif not live.flight.done:
            # Whether it is stored is for those still reading to learn (it said nothing).
            self.reason = (
                "left a shared stream early"
                if self.status is CacheStatus.SHARED
                else "left before the end: the stream went on for the readers following it"
            )
        else:
            self.reason = production.recorder.reason


def not_an_event(item: object) -> TypeError:
    """The error for an upstream that yielded ``item``, which is not an :class:`Event`."""
    shown = repr(item)
    if len(shown) > 80:
        shown = shown[:80] + "..."
    return TypeError(
        f"the upstream yielded {type(item).__name__} {shown}: it must yield sse_cache.Event "
        "objects (e.g. Event(data=...))"
    )


async def _aclose_quietly(iterator: AsyncIterator[Event] | None) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    # Shielded and bounded: closing must finish even when we are being cancelled, and a
    # hung upstream must not hang the caller forever.
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
        try:
            await aclose()
        except Exception as exc:
            logger.debug("sse_cache: closing the upstream raised %r", exc)

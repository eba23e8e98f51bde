"""The tee/replay engine: :class:`StreamCache`.

On a miss it pulls events from the upstream, hands each to the caller as soon as it arrives and
records a copy (:class:`~sse_cache.recorder.Recorder`); it stores the stream only when the
adapter says it completed. On a hit it replays the stored events. Identical requests that
arrive while a stream is being recorded join it live (single-flight). The engine knows only
the protocols: any backend, codec, keyer and adapter plug in.

Cleanup: :meth:`StreamCache.stream` is an async context manager, so closing the upstream never
depends on async-generator finalisation (which differs between asyncio and trio and may run
late or never). Leaving the ``async with`` block — normally, by an exception, or by
cancellation — closes the upstream (shielded, bounded in time) unless other readers of the
same live stream still need it.
"""

from __future__ import annotations

import logging
import math
import operator
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from ._decoded import DECODED_EVENT_BYTES, DecodedEntries
from ._logging import backend_warnings
from ._notices import CacheStatus, Hook, LiveStreamsHook, Notice, emit
from .breaker import Breaker, BreakerState
from .codec import MsgpackCodec, WireEntry
from .entry import Entry
from .errors import ConfigError, CorruptEntry
from .events import EOL, Event, serialize_sse
from .flight import Cursor, Flight, Flights, Head, LiveFlight, Phase, SharedStreamAborted
from .keys import CacheRequest, DefaultKeyer
from .pacing import Pacing
from .protocols import (
    Backend,
    CacheKeyer,
    EventCodec,
    NearCachingBackend,
    StreamAdapter,
    WireCodec,
)
from .recorder import DEFAULT_MAX_ENTRY_BYTES, EVENT_OVERHEAD, Recorder, RecorderState

__all__ = [
    "CacheStatus",
    "CachedStream",
    "LiveRecording",
    "LiveStreamsHook",
    "Notice",
    "SharedStreamAborted",
    "StreamCache",
    "Upstream",
]

logger = logging.getLogger("sse_cache")

#: A zero-argument callable that opens the upstream stream and returns its events.
Upstream = Callable[[], AsyncIterator[Event]]

# An instant replay yields to the event loop after running this long without a pause (checked
# every _CHECKPOINT_EVERY events): a checkpoint per event costs more than the event itself,
# one per 64 events still adds a quarter to a replay (docs/benchmarks.md), none at all would
# starve other tasks and delay cancellation.
_CHECKPOINT_EVERY = 64
_YIELD_AFTER = 0.002
#: Default budget of :class:`StreamCache`'s decoded-entry cache (hot entries, per process).
DEFAULT_DECODED_CACHE_BYTES = 64 * 1024 * 1024
_CLOSE_TIMEOUT = 5.0
_INSTANT = Pacing()
_RECORDING = RecorderState.RECORDING
# The engine's live streams carry events, with no HTTP head of their own.
_EVENTS_HEAD = Head(200, [("content-type", "text/event-stream")])


_E = TypeVar("_E", Entry, WireEntry)
_R = TypeVar("_R")


class _Skipped(Exception):
    """The backend's breaker is open: the call was not made."""


class _Production:
    """The engine's side of a live stream it produces: the upstream iterator (the flight's
    source, pulled in turn by whichever reader needs the next event), the recording, and the
    verdict — judged once, stored once."""

    __slots__ = (
        "abandoned",
        "cache",
        "clock",
        "entry",
        "iterator",
        "judged",
        "keep_event",
        "keep_time",
        "key",
        "limit",
        "live",
        "recorder",
        "settled",
        "started",
        "stored",
        "ttl",
    )

    def __init__(
        self,
        cache: StreamCache,
        live: LiveFlight[Event],
        key: str,
        recorder: Recorder,
        ttl: float | None,
    ) -> None:
        self.cache = cache
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
        size = len(event.data) + EVENT_OVERHEAD
        if recorder.state is _RECORDING:
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
            self.cache._emit(Notice(kind="not_stored", key=self.key, detail=self.recorder.reason))
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
            if await self.cache.store(self.key, self.entry, ttl=self.ttl):
                self.stored = True
            else:
                self.recorder.reason = "the backend write failed"
        finally:
            self.live.close()  # from now on identical requests find the stored entry


class CachedStream:
    """The events of one request, from the cache or the upstream. Iterate it with
    ``async for``; :attr:`status` and :attr:`key` are known before the first event.

    After the stream, :attr:`stored` tells whether it was stored and :attr:`reason` why not.
    """

    def __init__(
        self,
        cache: StreamCache,
        status: CacheStatus,
        key: str,
        *,
        entry: Entry | None = None,
        events: Sequence[Event] = (),
        pacing: Pacing = _INSTANT,
        live: LiveFlight[Event] | None = None,
        cursor: Cursor | None = None,
    ) -> None:
        self.status = status
        self.key = key
        self.entry = entry
        self.stored = False
        self.reason = ""
        self._cache = cache
        self._events = events
        self._pacing = pacing
        self._live_flight = live
        self._cursor = cursor
        self._retry: Upstream | None = None  # a follower's own upstream, to ask once if needed
        self._retried = False
        self._it: AsyncIterator[Event] | None = None
        self._batched = False

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

    def batches(self, max_events: int = 256) -> AsyncIterator[list[Event]]:
        """The same events in lists of whatever is ready (at most ``max_events`` each): lets
        an HTTP integration write many events at once, which is far cheaper than one write
        per event. Paced replays still come one event per list, at their time. Use either
        this or plain iteration on a stream, not both."""
        if self._it is not None or self._batched:
            raise RuntimeError("this stream is already being iterated")
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events!r}")
        self._batched = True
        if self._live_flight is not None:
            return self._live_batches(max_events)
        if self._pacing.instant:
            return self._instant_batches(max_events)
        return self._single(self._paced())

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
        pacing = self._pacing
        begin = time.monotonic()
        for i, event in enumerate(self._events):
            due = begin + (pacing.delay(event.at) if pacing.mode == "original" else pacing.gap * i)
            await anyio.sleep(max(0.0, due - time.monotonic()))
            yield event

    @staticmethod
    async def _single(events: AsyncIterator[Event]) -> AsyncIterator[list[Event]]:
        async for event in events:
            yield [event]

    async def _live(self) -> AsyncIterator[Event]:
        # The hot loop of a miss: the flight's state machine is driven inline (no helper
        # generator or coroutine per event: a layer per event costs more than the event).
        while True:
            live, cursor = self._live_flight, self._cursor
            assert live is not None and cursor is not None
            flight = live.flight
            production: _Production = live.production
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
                        event = await iterator.__anext__()
                    except StopAsyncIteration:
                        production.ended()
                        break
                    except Exception as exc:
                        production.recorder.fail(f"the upstream stream failed: {exc!r}")
                        live.fail(f"the upstream failed: {exc!r}")
                        raise
                    except BaseException:
                        # Cancelled inside the pull: the upstream iterator is finished for
                        # good (see LiveFlight.pull); whoever joined meanwhile must fail.
                        live.fail("the reader pulling the upstream was cancelled mid-read")
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
                assert self._retry is not None
                self._retried = True
                await live.leave(cursor)  # the last to leave closes the failed upstream
                self._cache._rejoin(self, self._retry)
                return True
            raise SharedStreamAborted(f"the shared stream stopped: {flight.why(cursor)}")
        idle = self._cache.join_timeout
        if live.source is not None and not live.pulling:
            await live.pull(idle)
        elif not await live.wait(idle):
            raise SharedStreamAborted(f"the shared stream sent nothing for {idle} s")
        return True

    def _may_retry(self) -> bool:
        # A follower sent nothing yet asks again, once; one that has events must fail.
        cursor = self._cursor
        return (
            self._retry is not None
            and not self._retried
            and cursor is not None
            and cursor.offset == 0
            and self.status is CacheStatus.SHARED
        )

    async def _close(self, exc: BaseException | None) -> None:
        live, cursor = self._live_flight, self._cursor
        if live is None or cursor is None:
            return
        production: _Production = live.production
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
        elif self.status is CacheStatus.SHARED and not live.flight.done:
            self.reason = "left a shared stream early"
        else:
            self.reason = production.recorder.reason


class LiveRecording:
    """Records a stream whose events are pushed to us (see :meth:`StreamCache.recording`):
    an integration that receives a response by push (the ASGI middleware wraps ``send``)
    adds its events here; it is judged when it ends and stored when the block is left. The
    live stream that identical requests follow is the integration's own (of bytes: see
    :mod:`sse_cache.flight`)."""

    __slots__ = (
        "_cache",
        "_key",
        "_started",
        "_ttl",
        "entry",
        "eol",
        "recorder",
        "status",
        "stored",
    )

    def __init__(self, cache: StreamCache, key: str, recorder: Recorder, ttl: float | None) -> None:
        self._cache = cache
        self._key = key
        self._ttl = ttl
        self._started = time.monotonic()
        self.recorder = recorder
        self.status = (200, "text/event-stream")
        #: The entry judged storable when the stream ended (None before, or if it failed).
        self.entry: Entry | None = None
        self.stored = False
        #: The line ends of the stream's bytes (set by the integration that parses them):
        #: ``"crlf"`` when every line ended with CRLF, so that its replays do too.
        self.eol: EOL = "lf"

    def add(self, events: Iterable[Event]) -> None:
        """Record events that were just delivered to the producer's client."""
        at = time.monotonic() - self._started
        record = self.recorder.add
        for event in events:
            record(event, at)

    def respond(self, status: int, content_type: str) -> None:
        """The upstream's status and content type (a non-2xx status is never stored)."""
        self.status = (status, content_type)

    def fail(self, reason: str) -> None:
        """Nothing of this stream will be stored (``reason`` is logged with the notice)."""
        self.recorder.fail(reason)

    def end(self) -> None:
        """The stream ended by itself: judge it now (stored when the block is left)."""
        if self.entry is None and self.recorder.state is _RECORDING:
            status, content_type = self.status
            entry = self.recorder.finish(
                clean_end=True, status=status, content_type=content_type, eol=self.eol
            )
            if entry is not None and self._ttl is not None:
                entry = msgspec.structs.replace(entry, expires_at=time.time() + self._ttl)
            self.entry = entry

    @property
    def reason(self) -> str:
        return self.recorder.reason

    async def _close(self, clean: bool) -> None:
        if not clean:
            self.recorder.fail("the stream was cut before it completed")
        elif self.entry is None:
            self.end()
        if self.entry is None:
            self._cache._emit(Notice(kind="not_stored", key=self._key, detail=self.reason))
            return
        if await self._cache.store(self._key, self.entry, ttl=self._ttl):
            self.stored = True
        else:
            self.recorder.reason = "the backend write failed"


class StreamCache:
    """Caches streamed answers of one schema on one backend.

    ``backend``: a :class:`~sse_cache.protocols.Backend` or a URL for
    :func:`sse_cache.backends.from_url` (then the cache owns it and :meth:`aclose` closes it).
    ``adapter``: the schema (:mod:`sse_cache.adapters`). ``ttl``: default entry lifetime in
    seconds (None: no expiry). ``max_entry_bytes``: larger streams are delivered but not
    stored. ``pacing``: default replay pacing. ``hooks``: callables receiving a
    :class:`Notice` for every hit, miss, store and failure (for metrics and logs; a hook that
    raises is logged and ignored). ``backend_timeout``: seconds any single backend call may
    take before it counts as failed. ``single_flight``: let identical concurrent requests
    share one upstream stream; a request that joined one gives up (``SharedStreamAborted``)
    when it delivers nothing for ``join_timeout`` seconds. ``decoded_cache_bytes``: memory
    for recently decoded entries, so that a hot entry is not decoded again on every hit (its
    bytes are still read from the backend and compared; 0 turns it off; another cache's
    :attr:`decoded` shares one budget). ``breaker``: the backend's
    :class:`~sse_cache.breaker.Breaker` (default: opens after 5 consecutive failures, for 10 s;
    ``Breaker(failures=0)`` never opens; caches on one backend may share one).

    Fail open: a backend that is down, slow or returns garbage costs a miss and a logged
    warning, never a failed stream; corrupt entries are deleted. A backend that keeps failing
    is skipped for a while (the breaker): then a request pays nothing for it.
    """

    def __init__(
        self,
        backend: Backend | str,
        adapter: StreamAdapter,
        *,
        keyer: CacheKeyer | None = None,
        codec: EventCodec | None = None,
        ttl: float | None = None,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        pacing: str | float | Pacing = "instant",
        hooks: Iterable[Hook] = (),
        backend_timeout: float = 2.0,
        single_flight: bool = True,
        join_timeout: float = 300.0,
        decoded_cache_bytes: int | DecodedEntries[Entry | WireEntry] = (
            DEFAULT_DECODED_CACHE_BYTES
        ),
        breaker: Breaker | None = None,
    ) -> None:
        from .backends import open_backend  # the registry, not a concrete backend

        self.backend, self._owns_backend = open_backend(backend)
        # A backend that knows some values at once is asked first (no timeout scope, no
        # breaker, no thread: what it answers is current by its contract).
        self._cached: Callable[[str], bytes | None] | None = (
            self.backend.cached if isinstance(self.backend, NearCachingBackend) else None
        )
        _check_ttl(ttl)
        if max_entry_bytes <= 0:
            raise ConfigError(f"max_entry_bytes must be positive, got {max_entry_bytes!r}")
        if not backend_timeout > 0:
            raise ConfigError(f"backend_timeout must be positive, got {backend_timeout!r}")
        self.adapter = adapter
        self.keyer: CacheKeyer = keyer or DefaultKeyer()
        self.codec: EventCodec = codec or MsgpackCodec()
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.pacing = Pacing.parse(pacing)
        self.backend_timeout = backend_timeout
        self.single_flight = single_flight
        if not join_timeout > 0:
            raise ConfigError(f"join_timeout must be positive, got {join_timeout!r}")
        self.join_timeout = join_timeout
        self.decoded: DecodedEntries[Entry | WireEntry] = (
            decoded_cache_bytes
            if isinstance(decoded_cache_bytes, DecodedEntries)
            else DecodedEntries(decoded_cache_bytes)
        )
        # Names in the decoded cache carry the codec: caches sharing one budget but not one
        # codec (another secret, say) never use each other's decodings.
        tag = f"{id(self.codec):x}"
        self._names = (f"e{tag}:", f"w{tag}:")
        self._hooks = tuple(hooks)
        self.breaker = breaker if breaker is not None else Breaker()
        if self.breaker.on_change is None:
            self.breaker.on_change = self._breaker_changed
        #: The live streams of this cache's keys: the single-flight state (one registry for
        #: the engine's streams and the HTTP integrations' responses).
        self.live = Flights()
        for hook in self._hooks:
            if isinstance(hook, LiveStreamsHook):
                hook.watch(self.live)

    # -- keys ------------------------------------------------------------------------------

    def request(
        self,
        body: Mapping[str, Any],
        *,
        route: str = "",
        tenant: str = "",
        namespace: str = "",
        variant: int = 0,
    ) -> CacheRequest:
        """The :class:`CacheRequest` for a decoded JSON request body (the adapter picks the
        answer-defining fields)."""
        return CacheRequest(
            schema=self.adapter.name,
            route=route,
            fields=self.adapter.key_fields(body),
            tenant=tenant,
            namespace=namespace,
            variant=variant,
        )

    def key(self, request: CacheRequest | str) -> str:
        """The key of ``request`` (a string is taken as a key already)."""
        return request if isinstance(request, str) else self.keyer.key(request)

    # -- storage (fail open) ---------------------------------------------------------------

    async def lookup(self, key: str, *, max_age: float | None = None) -> Entry | None:
        """The stored entry for ``key``, or None on a miss, an expired/too-old entry, a
        backend failure (logged) or a corrupt entry (logged and deleted)."""
        raw = await self._fetch(key)
        if raw is None:
            return None
        entry = await self._decoded(self._names[0], key, raw, Entry, self.codec.decode)
        return None if entry is None else self._fresh(key, entry, max_age)

    async def lookup_wire(self, key: str, *, max_age: float | None = None) -> WireEntry | None:
        """Like :meth:`lookup`, for an HTTP replay: a recorded stream comes as its canonical
        SSE bytes, without building events when the codec can (a :class:`WireCodec`)."""
        raw = await self._fetch(key)
        if raw is None:
            return None
        codec = self.codec
        decode: Callable[[bytes], WireEntry] = (
            codec.decode_wire
            if isinstance(codec, WireCodec)
            else lambda data: _to_wire(codec.decode(data))
        )
        wire = await self._decoded(self._names[1], key, raw, WireEntry, decode)
        return None if wire is None else self._fresh(key, wire, max_age)

    async def _decoded(
        self, name: str, key: str, raw: bytes, kind: type[_E], decode: Callable[[bytes], _E]
    ) -> _E | None:
        """``raw`` decoded by ``decode``, or the form kept from an earlier decode of the same
        bytes; None (logged, deleted) when it is corrupt."""
        kept = self.decoded.get(name + key, raw)
        if isinstance(kept, kind):
            return kept
        try:
            value = decode(raw)
        except CorruptEntry as exc:
            await self._drop(key, exc)
            return None
        self.decoded.put(name + key, raw, value, _decoded_size)
        return value

    async def alias(self, name: str, key: str, *, expires_at: float | None = None) -> bool:
        """Store ``name`` as another name of the entry ``key`` (until ``expires_at``), e.g. a
        response id by which a stream can be resumed. Fail-open: False when the write failed."""
        ttl = None if expires_at is None else max(1.0, expires_at - time.time())
        try:
            value = key.encode("ascii")
            await self._use_backend("set", lambda: self.backend.set(name, value, ttl))
        except _Skipped:
            return False
        except Exception as exc:
            self._warn("store_failed", name, f"backend write of an alias failed: {exc!r}")
            return False
        return True

    async def resolve(self, name: str) -> str | None:
        """The key an :meth:`alias` names, or None (missing, or the backend failed)."""
        raw = await self._fetch(name)
        if raw is None:
            return None
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None

    async def _fetch(self, key: str) -> bytes | None:
        if self._cached is not None:
            try:
                value = self._cached(key)
            except Exception:  # against the contract: then ask the backend as usual
                value = None
            if value is not None:
                return value
        try:
            return await self._use_backend("get", lambda: self.backend.get(key))
        except _Skipped:
            return None  # a miss, at no cost
        except Exception as exc:
            self._warn("read_failed", key, f"backend read failed: {exc!r}")
            return None

    async def _use_backend(self, operation: str, call: Callable[[], Awaitable[_R]]) -> _R:
        """``call()`` on the backend, bounded by ``backend_timeout``, through the breaker:
        raises :class:`_Skipped` while it is open, and the call's own error otherwise. Its
        duration is reported as a ``backend`` notice for ``operation``."""
        breaker = self.breaker
        started = time.monotonic()
        if not breaker.allow(started):
            raise _Skipped
        try:
            with anyio.fail_after(self.backend_timeout):
                result = await call()
        except Exception as exc:
            ended = time.monotonic()
            breaker.failure(ended, repr(exc))
            self._timed(operation, ended - started)
            raise
        except BaseException:
            breaker.cancelled()  # says nothing about the backend
            raise
        breaker.success()
        self._timed(operation, time.monotonic() - started)
        return result

    def _timed(self, operation: str, seconds: float) -> None:
        if self._hooks:  # (no notice to build when no one listens)
            self._emit(Notice(kind="backend", key="", detail=operation, seconds=seconds))

    def _breaker_changed(self, state: BreakerState, why: str) -> None:
        # One line per transition, not one per skipped request.
        log = logger.info if state is BreakerState.CLOSED else logger.warning
        log("sse_cache: backend circuit %s (%s)", state.value, why)
        self._emit(Notice(kind="breaker", key="", detail=state.value))

    async def _drop(self, key: str, exc: CorruptEntry) -> None:
        self._warn("corrupt", key, f"deleting corrupt entry: {exc}")
        await self.delete(key)

    def _forget_decoded(self, key: str) -> None:
        self.decoded.discard(self._names[0] + key)
        self.decoded.discard(self._names[1] + key)

    def _fresh(self, key: str, entry: _E, max_age: float | None) -> _E | None:
        if entry.schema != self.adapter.name:
            # The key includes the schema: another schema's entry here is a collision or
            # tampering. Not served (and not deleted: it may be valid for its own schema).
            self._warn("corrupt", key, f"entry is of schema {entry.schema!r}")
            return None
        now = time.time()
        if max_age is not None and now - entry.created_at > max_age:
            return None
        # Backends expire entries themselves, some at a coarse granularity (memcached:
        # whole seconds); never serve one past its recorded end.
        if entry.expires_at is not None and now >= entry.expires_at:
            return None
        return entry

    async def store(self, key: str, entry: Entry, *, ttl: float | None = None) -> bool:
        """Encode and store ``entry``; False (logged) when the backend failed. ``ttl`` falls
        back to the cache's default."""
        ttl = self.ttl if ttl is None else ttl
        if ttl is not None:
            entry = msgspec.structs.replace(entry, expires_at=time.time() + ttl)
        self._forget_decoded(key)
        try:
            data = self.codec.encode(entry)
            await self._use_backend("set", lambda: self.backend.set(key, data, ttl))
        except _Skipped:
            self._emit(Notice(kind="store_skipped", key=key, detail="backend circuit open"))
            return False
        except Exception as exc:
            self._warn("store_failed", key, f"backend write failed: {exc!r}")
            return False
        self._emit(Notice(kind="store", key=key, events=len(entry.events or ()), bytes=len(data)))
        return True

    async def delete(self, key: str) -> None:
        """Remove ``key`` (fail open: a backend failure is logged)."""
        self._forget_decoded(key)
        try:
            await self._use_backend("delete", lambda: self.backend.delete(key))
        except _Skipped:
            pass
        except Exception as exc:
            backend_warnings.warning(
                self.backend, "delete_failed", "sse_cache: could not delete %s: %r", key, exc
            )

    async def aclose(self) -> None:
        """Close the backend if this cache opened it from a URL."""
        if self._owns_backend:
            await self.backend.aclose()

    async def __aenter__(self) -> StreamCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- answers from entries ------------------------------------------------------------

    def events_of(self, entry: Entry) -> Sequence[Event] | None:
        """The events to replay for ``entry``: its recording, or a stream synthesised from
        its non-stream body by the adapter (None if the adapter cannot)."""
        if entry.events is not None:
            return entry.events
        if entry.body is None:
            return None
        return self.adapter.synthesize(entry.body)

    def body_of(self, entry: Entry) -> bytes | None:
        """The non-stream answer for ``entry``: its body, or one recovered from its recorded
        stream by the adapter (None if the adapter cannot)."""
        if entry.body is not None:
            return entry.body
        assert entry.events is not None
        return self.adapter.final_body(entry.events)

    def recorder(self) -> Recorder:
        """A fresh :class:`Recorder` with this cache's adapter and size limit, for drivers
        that push events (the ASGI middleware) rather than pull them."""
        return Recorder(self.adapter, max_entry_bytes=self.max_entry_bytes)

    def replay(
        self,
        entry: Entry,
        pacing: str | float | Pacing | None = None,
        *,
        events: Sequence[Event] | None = None,
    ) -> CachedStream:
        """A stream replaying ``entry`` (status ``hit``), or only ``events`` of it (resume)."""
        if events is None:
            events = self.events_of(entry)
        if events is None:
            raise ConfigError(f"adapter {self.adapter.name!r} cannot stream this entry")
        return CachedStream(
            self,
            CacheStatus.HIT,
            "",
            entry=entry,
            events=events,
            pacing=self.pacing if pacing is None else Pacing.parse(pacing),
        )

    # -- the streaming front door ----------------------------------------------------------

    @asynccontextmanager
    async def stream(
        self,
        request: CacheRequest | str,
        upstream: Upstream,
        *,
        lookup: bool = True,
        store: bool = True,
        refresh: bool = False,
        ttl: float | None = None,
        max_age: float | None = None,
        pacing: str | float | Pacing | None = None,
    ) -> AsyncIterator[CachedStream]:
        """Answer one streamed request: from the cache, by joining an identical live stream,
        or from ``upstream`` (recorded, and stored if it completes).

        ``lookup=False`` skips the lookup (status ``bypass``; ``refresh=True`` says
        ``refresh``) but still stores; ``store=False`` never stores. ``ttl`` overrides the
        default lifetime; ``max_age`` rejects older entries; ``pacing`` the replay speed.
        ``upstream`` is called only on a miss.

        A stream that joined another (``shared``) ends cleanly only where the upstream
        ended cleanly; otherwise iterating it raises :class:`SharedStreamAborted` (the
        reader pulling the upstream when it failed gets the upstream's own error).
        """
        _check_ttl(ttl)
        key = self.key(request)
        pace = self.pacing if pacing is None else Pacing.parse(pacing)
        use_cache = lookup and not refresh
        ttl = self.ttl if ttl is None else ttl
        live: LiveFlight[Event] | None = None
        cursor: Cursor | None = None
        if use_cache:
            entry = await self.lookup(key, max_age=max_age)
            if entry is not None and (hit := self._hit(key, entry, pace)) is not None:
                yield hit
                return
            pending, live, cursor = self.settle(key, share=store)
            if pending is not None and (hit := self._hit(key, pending, pace)) is not None:
                yield hit
                return
            if live is not None and cursor is not None:
                shared = CachedStream(self, CacheStatus.SHARED, key, live=live, cursor=cursor)
                shared._retry = upstream
                self._emit(Notice(kind="shared", key=key))
                async with self._closing(shared):
                    yield shared
                return
        status = (
            CacheStatus.MISS
            if use_cache
            else (CacheStatus.REFRESH if refresh else CacheStatus.BYPASS)
        )
        stream = CachedStream(self, status, key)
        self._produce(stream, live, upstream, store=store, ttl=ttl)
        async with self._closing(stream):
            yield stream

    def _produce(
        self,
        stream: CachedStream,
        live: LiveFlight[Event] | None,
        upstream: Upstream,
        *,
        store: bool,
        ttl: float | None,
    ) -> None:
        """Make ``stream`` the producer of ``live`` (registered by :meth:`settle`), or of a
        flight of its own that no one else can join: its upstream is opened now."""
        key = stream.key
        if live is None:
            # Not offered to others (no-cache, no-store, single-flight off): its log keeps
            # nothing that its one reader has read.
            live = LiveFlight(Flight(key, max_log_bytes=0, max_lag_bytes=sys.maxsize))
        recorder = self.recorder()
        if not store:
            recorder.fail("the request asked not to store (no-store)")
        production = _Production(self, live, key, recorder, ttl)
        cursor = live.flight.follow()
        live.flight.producer_left()  # the producing request reads as a follower does
        assert cursor is not None
        live.producer_cursor = cursor  # (but is not counted as one)
        stream._live_flight, stream._cursor = live, cursor
        self._emit(Notice(kind=stream.status.value, key=key))
        try:
            production.started = time.monotonic()
            production.iterator = aiter(upstream())
        except BaseException as exc:
            live.fail(f"the upstream could not be opened: {exc!r}")
            raise
        live.hand_over(production.pull, production.abandon)

    def _rejoin(self, stream: CachedStream, upstream: Upstream) -> None:
        """``stream`` followed a flight that failed before it was sent anything: it goes
        round the lookup order once more (without the backend read), joining whoever asks
        the upstream next — or being it (status ``miss``)."""
        _, live, cursor = self.settle(stream.key)
        if live is not None and cursor is not None:
            stream._live_flight, stream._cursor = live, cursor
            return
        stream.status = CacheStatus.MISS
        self._produce(stream, live, upstream, store=True, ttl=self.ttl)

    def settle(
        self, key: str, *, share: bool = True
    ) -> tuple[Any, LiveFlight[Any] | None, Cursor | None]:
        """The rest of the one lookup order, once the backend had no fresh entry for
        ``key``: an entry being stored (``(entry, None, None)``), the live stream to follow
        (``(None, live, cursor)``), or the new live stream the caller produces, registered
        before its upstream call (``(None, live, None)``); ``(None, None, None)`` when the
        caller must not share (``share=False``, or single-flight is off).

        Synchronous, hence atomic: no identical request can slip in between the look and
        the claim. The engine's :meth:`stream` and every HTTP integration go through it.
        """
        live = self.live.get(key) if self.single_flight else None
        ended = live is not None and live.flight.phase is Phase.ENDED
        if live is not None and ended and live.entry is None and live.judge is not None:
            # The upstream ended and its reader has not left yet: judge now, so that a
            # complete stream answers as a hit and an unstorable one is offered no more.
            live.judge()
            live = self.live.get(key)
        if live is not None and live.entry is not None:
            return live.entry, None, None
        if not share or not self.single_flight:
            return None, None, None
        live, cursor = self.live.claim(key, max_log_bytes=self.max_entry_bytes)
        return None, live, cursor

    def _hit(self, key: str, entry: Entry, pacing: Pacing) -> CachedStream | None:
        events = self.events_of(entry)
        if events is None:
            return None
        seconds = events[-1].at if events else 0.0
        self._emit(Notice(kind="hit", key=key, events=len(events), seconds=seconds))
        return CachedStream(self, CacheStatus.HIT, key, entry=entry, events=events, pacing=pacing)

    @asynccontextmanager
    async def _closing(self, stream: CachedStream) -> AsyncIterator[None]:
        try:
            yield
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await stream._close(exc)
            raise
        await stream._close(None)

    @asynccontextmanager
    async def recording(
        self, key: str, *, store: bool = True, ttl: float | None = None
    ) -> AsyncIterator[LiveRecording]:
        """Record a stream whose events are pushed to us (see :class:`LiveRecording`).

        Leaving the block ends the stream: cleanly when the block exits normally (then the
        stream is judged and stored if complete), as cut when it raises.
        """
        _check_ttl(ttl)
        recorder = self.recorder()
        if not store:
            recorder.fail("the request asked not to store (no-store)")
        recording = LiveRecording(self, key, recorder, self.ttl if ttl is None else ttl)
        clean = False
        try:
            yield recording
            clean = True
        finally:
            with anyio.CancelScope(shield=True):
                await recording._close(clean)

    # -- notices ---------------------------------------------------------------------------

    def _emit(self, notice: Notice) -> None:
        emit(self._hooks, notice)

    def _warn(self, kind: str, key: str, message: str) -> None:
        # A backend that is down fails every request: one line per kind per 10 s, counted.
        backend_warnings.warning(self.backend, kind, "sse_cache: %s (key %s)", message, key)
        self._emit(Notice(kind=kind, key=key, detail=message))


_data_of = operator.attrgetter("data")


def _decoded_size(entry: Entry | WireEntry) -> int:
    if isinstance(entry, WireEntry):
        return len(entry.sse or b"") + len(entry.body or b"")
    events = entry.events
    if events is None:
        return len(entry.body or b"")
    # getsizeof: the memory of each text as CPython holds it (1, 2 or 4 bytes a character).
    texts = sum(map(sys.getsizeof, map(_data_of, events)))
    return texts + DECODED_EVENT_BYTES * len(events)


def _to_wire(entry: Entry) -> WireEntry:
    events = entry.events
    return WireEntry(
        schema=entry.schema,
        created_at=entry.created_at,
        status=entry.status,
        content_type=entry.content_type,
        meta=entry.meta,
        count=len(events) if events is not None else 0,
        duration=events[-1].at if events else 0.0,
        sse=serialize_sse(events, eol=entry.eol) if events is not None else None,
        body=entry.body,
        expires_at=entry.expires_at,
        eol=entry.eol,
    )


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
        raise ConfigError(f"ttl must be a positive number of seconds, got {ttl!r}")


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

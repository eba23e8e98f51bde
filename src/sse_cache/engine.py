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

import enum
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
from .codec import MsgpackCodec, WireEntry
from .entry import Entry
from .errors import ConfigError, CorruptEntry
from .events import Event, serialize_sse
from .flight import Flights, SharedStreamAborted
from .keys import CacheRequest, DefaultKeyer
from .pacing import Pacing
from .protocols import Backend, CacheKeyer, EventCodec, StreamAdapter, WireCodec
from .recorder import DEFAULT_MAX_ENTRY_BYTES, EVENT_OVERHEAD, Recorder, RecorderState

__all__ = [
    "CacheStatus",
    "CachedStream",
    "LiveRecording",
    "Notice",
    "SharedStreamAborted",
    "StreamCache",
    "Upstream",
]

logger = logging.getLogger("sse_cache")

#: A zero-argument callable that opens the upstream stream and returns its events.
Upstream = Callable[[], AsyncIterator[Event]]

# An instant replay yields to the event loop after running this long without a pause (checked
# every _CHECKPOINT_EVERY events): a checkpoint per event costs more than the event itself, one
# per 64 events still doubles the cost of a replay (LIMITS.md), none at all would starve other
# tasks and delay cancellation.
_CHECKPOINT_EVERY = 64
_YIELD_AFTER = 0.002
#: Default budget of :class:`StreamCache`'s decoded-entry cache (hot entries, per process).
DEFAULT_DECODED_CACHE_BYTES = 64 * 1024 * 1024
_CLOSE_TIMEOUT = 5.0
# At most this long, a cancelled reader finishes the pull it had started for the others.
_HANDOVER_TIMEOUT = 60.0
_INSTANT = Pacing()
_RECORDING = RecorderState.RECORDING


class CacheStatus(enum.StrEnum):
    """How a request was answered; the value of the ``x-sse-cache`` response header."""

    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"
    REFRESH = "refresh"
    SHARED = "shared"


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """What a hook receives. ``kind`` is one of ``hit``, ``miss``, ``bypass``, ``refresh``,
    ``shared``, ``store``, ``not_stored``, ``store_failed``, ``read_failed``, ``corrupt``, and
    from the HTTP integrations ``replayed`` (bytes sent from the cache) and ``invalid`` (a
    request answered 400 for a bad control header).
    ``events``/``bytes``/``seconds`` are filled where they mean something (``seconds``: the
    recorded duration of a replayed stream, i.e. upstream time saved)."""

    kind: str
    key: str
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


Hook = Callable[[Notice], None]
_E = TypeVar("_E", Entry, WireEntry)


class _Flight:
    """One upstream stream being read, possibly by several requests (single-flight).

    The events read so far form a shared log. Whoever needs the next event and finds no one
    pulling pulls it from the upstream; the others wait for a signal. There is no background
    task: the upstream lives exactly as long as someone reads it.
    """

    __slots__ = (
        "content_type",
        "entry",
        "error",
        "finished",
        "iterator",
        "judged",
        "key",
        "log",
        "pulling",
        "pushed",
        "readers",
        "recorder",
        "settled",
        "signal",
        "started",
        "status",
        "stored",
        "ttl",
        "waiting",
    )

    def __init__(self, key: str, recorder: Recorder, ttl: float | None) -> None:
        self.key = key
        self.recorder = recorder
        self.ttl = ttl
        self.iterator: AsyncIterator[Event] | None = None
        self.log: list[Event] = []
        self.started = 0.0
        self.pulling = False
        self.finished = False  # the upstream ended, cleanly or not
        self.error: BaseException | None = None
        self.readers = 0
        self.waiting = 0
        self.signal = anyio.Event()
        self.judged = False  # the recording was judged (once per flight)
        self.entry: Entry | None = None  # judged storable, being stored
        self.settled = False  # the store was attempted (once per flight)
        self.stored = False
        self.pushed = False  # events are pushed by a producer (ASGI), not pulled by readers
        self.status = 200
        self.content_type = "text/event-stream"

    def notify(self) -> None:
        if self.waiting:
            self.signal.set()
            self.signal = anyio.Event()


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
        flight: _Flight | None = None,
    ) -> None:
        self.status = status
        self.key = key
        self.entry = entry
        self.stored = False
        self.reason = ""
        self._cache = cache
        self._events = events
        self._pacing = pacing
        self._flight = flight
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
            if self._flight is not None:
                it = self._live(self._flight)
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
        if self._flight is not None:
            return self._live_batches(self._flight, max_events)
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

    async def _live(self, flight: _Flight) -> AsyncIterator[Event]:
        # The hot loop of a miss: the pull is inlined (no helper coroutine per event), as a
        # coroutine layer per event costs more than recording the event.
        log = flight.log
        cache = self._cache
        iterator = flight.iterator  # None for a pushed stream: its readers never pull
        recorder = flight.recorder
        keep_event, keep_time, limit = recorder.sink()  # recorder.add, inlined below
        recording = _RECORDING
        clock = time.monotonic
        started = flight.started
        flights = cache._flights
        i = 0
        while True:
            if i < len(log):
                event = log[i]
                i += 1
                yield event
                continue
            if flight.finished or flight.pulling:
                if await _wait_for_puller(flight, cache.join_timeout):
                    return
                continue
            assert iterator is not None
            shared = flight.readers > 1
            if shared:
                # A reader already cancelled leaves here, before touching the upstream: its
                # pulls are shielded (below), so it might otherwise never notice.
                await anyio.lowlevel.checkpoint_if_cancelled()
                if flight.pulling or flight.finished:
                    continue  # (in case that checkpoint let another reader in)
            flight.pulling = True
            try:
                if shared:
                    event = await _pull_for_others(iterator, cache.join_timeout)
                else:
                    event = await iterator.__anext__()
            except StopAsyncIteration:
                cache._upstream_ended(flight)
                return
            except BaseException as exc:
                cache._upstream_failed(flight, exc)
                if isinstance(exc, SharedStreamAborted):
                    # The bounded hand-over gave up: a cancelled reader leaves by its own
                    # cancellation, the others by this error.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                raise
            finally:
                flight.pulling = False
                if flight.waiting:
                    flight.notify()
            # The log is for other readers: a stream read by one reader that nobody else can
            # join (not offered: no-store, no-cache) keeps no copy beyond its recording.
            if flight.readers > 1 or flights.get(flight.key) is flight:
                log.append(event)
                i += 1
            if recorder.state is recording:
                # On the recorder, not in a local: the readers of a flight pull in turn.
                size = recorder.size = recorder.size + len(event.data) + EVENT_OVERHEAD
                if size > limit:
                    recorder.overflow()
                else:
                    keep_event(event)
                    keep_time(clock() - started)
            yield event

    async def _live_batches(self, flight: _Flight, size: int) -> AsyncIterator[list[Event]]:
        log = flight.log
        i = 0
        async for _ in self._live(flight):
            # One event was pulled (or was ready): hand over everything else already read.
            # The inner iterator re-yields events already handed out: skip those.
            batch = log[i : i + size]
            if batch:
                i += len(batch)
                yield batch

    async def _close(self, exc: BaseException | None) -> None:
        flight = self._flight
        if flight is None:
            return
        await self._cache._leave(flight, self, exc)


class LiveRecording:
    """The producer's side of a pushed stream (see :meth:`StreamCache.recording`): an
    integration that receives events by push (the ASGI middleware wraps ``send``) adds them
    here; identical requests arriving meanwhile read them live (``shared``)."""

    __slots__ = ("_cache", "_flight", "key")

    def __init__(self, cache: StreamCache, flight: _Flight) -> None:
        self._cache = cache
        self._flight = flight
        self.key = flight.key

    def add(self, events: Iterable[Event]) -> None:
        """Record events that were just delivered to the producer's client."""
        flight = self._flight
        if flight.finished:
            return
        at = time.monotonic() - flight.started
        record = flight.recorder.add
        # The log exists for readers who join: a stream nobody has joined and nobody can
        # join (not offered, or no longer) keeps no copy beyond the bounded recording.
        log = (
            flight.log if flight.readers or self._cache._flights.get(flight.key) is flight else None
        )
        for event in events:
            if log is not None:
                log.append(event)
            record(event, at)
        if flight.waiting:
            flight.notify()

    def respond(self, status: int, content_type: str) -> None:
        """The upstream's status and content type (a non-2xx status is never stored)."""
        self._flight.status = status
        self._flight.content_type = content_type

    def fail(self, reason: str) -> None:
        """Nothing of this stream will be stored (``reason`` is logged with the notice)."""
        self._flight.recorder.fail(reason)

    def end(self) -> None:
        """The stream ended by itself: judge it now, so that identical requests arriving
        before the store completes are answered from it (stored when the block is left)."""
        flight = self._flight
        if not flight.finished:
            flight.finished = True
            flight.notify()
            self._cache._judge(flight, clean_end=True)

    @property
    def stored(self) -> bool:
        return self._flight.stored

    @property
    def entry(self) -> Entry | None:
        """The entry judged storable when the stream ended (None before, or if it failed)."""
        return self._flight.entry

    @property
    def reason(self) -> str:
        return self._flight.recorder.reason


async def _pull_for_others(iterator: AsyncIterator[Event], idle_timeout: float) -> Event:
    """The next event of an upstream that other readers share. A cancelled reader must not
    break it for them (an async generator cancelled inside ``__anext__`` is finished): the
    pull completes shielded, bounded by ``min(idle_timeout, 60)`` seconds, and the reader's
    cancellation lands right after it, at its next checkpoint."""
    bound = min(idle_timeout, _HANDOVER_TIMEOUT)
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + bound
        return await iterator.__anext__()
    # Only reached when the deadline cancelled the pull.
    raise SharedStreamAborted(f"the shared upstream stream sent nothing for {bound} s")


async def _wait_for_puller(flight: _Flight, idle_timeout: float) -> bool:
    """A reader caught up with the log of a live stream that another reader is pulling (or
    that ended): wait for the next event. True when the stream is over.

    A producer that goes silent for ``idle_timeout`` seconds (a response its client stopped
    reading without closing it, say) ends the stream for the readers waiting on it, rather
    than holding them forever."""
    if flight.finished:
        if flight.error is not None:
            raise SharedStreamAborted(
                f"the shared upstream stream failed: {flight.error!r}"
            ) from flight.error
        return True
    flight.waiting += 1
    try:
        with anyio.move_on_after(idle_timeout) as idle:
            await flight.signal.wait()
    finally:
        flight.waiting -= 1
    if idle.cancelled_caught:
        raise SharedStreamAborted(f"the shared stream sent nothing for {idle_timeout} s")
    return False


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
    :attr:`decoded` shares one budget).

    Fail open: a backend that is down, slow or returns garbage costs a miss and a logged
    warning, never a failed stream; corrupt entries are deleted.
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
    ) -> None:
        from .backends import open_backend  # the registry, not a concrete backend

        self.backend, self._owns_backend = open_backend(backend)
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
        self._flights: dict[str, _Flight] = {}
        #: The live streams of the HTTP integrations (single-flight of response bytes).
        self.live = Flights()

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
            with anyio.fail_after(self.backend_timeout):
                await self.backend.set(name, key.encode("ascii"), ttl)
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
        try:
            with anyio.fail_after(self.backend_timeout):
                return await self.backend.get(key)
        except Exception as exc:
            self._warn("read_failed", key, f"backend read failed: {exc!r}")
            return None

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
            with anyio.fail_after(self.backend_timeout):
                await self.backend.set(key, data, ttl)
        except Exception as exc:
            self._warn("store_failed", key, f"backend write failed: {exc!r}")
            return False
        self._emit(Notice(kind="store", key=key, events=len(entry.events or ()), bytes=len(data)))
        return True

    async def delete(self, key: str) -> None:
        """Remove ``key`` (fail open: a backend failure is logged)."""
        self._forget_decoded(key)
        try:
            with anyio.fail_after(self.backend_timeout):
                await self.backend.delete(key)
        except Exception as exc:
            logger.warning("sse_cache: could not delete %s: %r", key, exc)

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
        """
        _check_ttl(ttl)
        key = self.key(request)
        pace = self.pacing if pacing is None else Pacing.parse(pacing)
        use_cache = lookup and not refresh
        if use_cache:
            pending = self.pending(key)
            if pending is not None and (hit := self._hit(key, pending, pace)) is not None:
                yield hit
                return
            if (flight := self._joinable(key)) is not None:
                async with self._reading(flight) as stream:
                    yield stream
                return
            entry = await self.lookup(key, max_age=max_age)
            if entry is not None and (hit := self._hit(key, entry, pace)) is not None:
                yield hit
                return
            # A joinable flight may have started while we were reading the backend.
            if (flight := self._joinable(key)) is not None:
                async with self._reading(flight) as stream:
                    yield stream
                return
        status = (
            CacheStatus.MISS
            if use_cache
            else (CacheStatus.REFRESH if refresh else CacheStatus.BYPASS)
        )
        recorder = self.recorder()
        if not store:
            recorder.fail("the request asked not to store (no-store)")
        flight = _Flight(key, recorder, self.ttl if ttl is None else ttl)
        flight.readers = 1
        # Only a stream that may be stored, on the default path, is offered to others: a
        # no-cache / no-store request wants its own answer.
        if self.single_flight and use_cache and store:
            self._flights[key] = flight
        stream = CachedStream(self, status, key, flight=flight)
        self._emit(Notice(kind=status.value, key=key))
        try:
            flight.started = time.monotonic()
            flight.iterator = aiter(upstream())
        except BaseException:
            self._forget(flight)
            raise
        async with self._closing(stream):
            yield stream

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
            await stream._close(exc)
            raise
        await stream._close(None)

    @asynccontextmanager
    async def recording(
        self, key: str, *, store: bool = True, ttl: float | None = None, share: bool = True
    ) -> AsyncIterator[LiveRecording]:
        """Record a stream whose events are pushed to us (see :class:`LiveRecording`).

        Leaving the block ends the stream: cleanly when the block exits normally (then the
        stream is judged and stored if complete), as cut when it raises. With ``share``,
        identical requests may :meth:`join` it while it lasts.
        """
        _check_ttl(ttl)
        recorder = self.recorder()
        if not store:
            recorder.fail("the request asked not to store (no-store)")
        flight = _Flight(key, recorder, self.ttl if ttl is None else ttl)
        flight.pushed = True
        flight.pulling = True  # readers never pull: they wait for the producer's signal
        flight.started = time.monotonic()
        if self.single_flight and share and store:
            self._flights.setdefault(key, flight)
        clean = False
        try:
            yield LiveRecording(self, flight)
            clean = True
        finally:
            if not flight.finished:
                flight.finished = True
                if not clean:
                    flight.error = SharedStreamAborted("the producer of this stream failed")
                    recorder.fail("the stream was cut before it completed")
            flight.notify()
            await self._finish(flight, clean_end=clean)

    @asynccontextmanager
    async def join(self, key: str) -> AsyncIterator[CachedStream | None]:
        """Join the live stream being recorded for ``key``, if any (status ``shared``);
        yields None when there is none (see also :meth:`pending`)."""
        flight = self._joinable(key)
        if flight is None:
            yield None
            return
        async with self._reading(flight) as stream:
            yield stream

    def pending(self, key: str) -> Entry | None:
        """The entry for ``key`` that a stream which just completed is storing right now:
        the window between a stream's end and its store completing answers as a hit."""
        flight = self._flight(key)
        return flight.entry if flight is not None else None

    def _joinable(self, key: str) -> _Flight | None:
        flight = self._flight(key)
        return flight if flight is not None and flight.entry is None else None

    def _flight(self, key: str) -> _Flight | None:
        flight = self._flights.get(key) if self.single_flight else None
        if flight is not None and flight.finished and not flight.judged:
            # The upstream ended and its reader has not left yet: judge now, so that a failed
            # or unstorable stream is forgotten (the request asks the upstream itself) and a
            # complete one answers as a hit — never joined and replayed as "shared".
            self._judge(flight, clean_end=flight.error is None)
            flight = self._flights.get(key)
        return flight

    @asynccontextmanager
    async def _reading(self, flight: _Flight) -> AsyncIterator[CachedStream]:
        stream = CachedStream(self, CacheStatus.SHARED, flight.key, flight=flight)
        flight.readers += 1
        self._emit(Notice(kind="shared", key=flight.key))
        async with self._closing(stream):
            yield stream

    # -- single-flight internals -----------------------------------------------------------

    def _upstream_ended(self, flight: _Flight) -> None:
        # The stream is judged and stored when a reader leaves its ``async with``, not here:
        # the caller gets the end of its stream first and pays for judging (a pass over the
        # events), encoding and writing afterwards. An identical request arriving before
        # that judges it first (``_flight``): a hit from the judged entry, or a miss.
        flight.finished = True

    def _upstream_failed(self, flight: _Flight, exc: BaseException) -> None:
        # The upstream broke, or the reader pulling it was cancelled mid-read (which leaves
        # the upstream unusable): the stream ends here for every reader.
        flight.finished = True
        flight.error = exc
        flight.recorder.fail(f"the upstream stream failed: {exc!r}")
        self._forget(flight)

    def _judge(self, flight: _Flight, *, clean_end: bool) -> None:
        if flight.judged:
            return
        flight.judged = True
        recorder = flight.recorder
        entry = recorder.finish(
            clean_end=clean_end, status=flight.status, content_type=flight.content_type
        )
        if entry is not None and flight.ttl is not None:
            entry = msgspec.structs.replace(entry, expires_at=time.time() + flight.ttl)
        flight.entry = entry
        if entry is None:
            flight.settled = True
            self._emit(Notice(kind="not_stored", key=flight.key, detail=recorder.reason))
            self._forget(flight)

    async def _finish(self, flight: _Flight, *, clean_end: bool) -> None:
        self._judge(flight, clean_end=clean_end)
        if flight.settled:
            return
        flight.settled = True  # one store per flight, whoever gets here first
        assert flight.entry is not None
        try:
            if await self.store(flight.key, flight.entry, ttl=flight.ttl):
                flight.stored = True
            else:
                flight.recorder.reason = "the backend write failed"
        finally:
            # From now on identical requests find the stored entry.
            self._forget(flight)

    async def _leave(
        self, flight: _Flight, stream: CachedStream, exc: BaseException | None
    ) -> None:
        flight.readers -= 1
        last = flight.readers == 0
        if flight.pushed:
            # A reader of a pushed stream never owns it: its producer decides and stores.
            stream.stored = flight.stored
            stream.reason = "" if flight.stored else "joined a live stream"
            return
        if not flight.finished:
            if not last:
                # Others still read this upstream: keep it open for them.
                stream.reason = "left a shared stream early"
                return
            # The last reader left before the end: close the upstream; what the adapter
            # already saw complete (e.g. response.completed) may still be stored.
            flight.finished = True
            if exc is not None:
                flight.recorder.fail(f"the reader left with {type(exc).__name__}")
            # Judge first (no await): from here on a new request finds either the judged
            # entry (a hit) or nothing — never a flight that ends early without an error.
            self._judge(flight, clean_end=False)
            await _aclose_quietly(flight.iterator)
            await self._finish(flight, clean_end=False)
        else:
            # The upstream ended. Whoever leaves first judges and stores; a reader leaving
            # with an exception leaves that to the others, unless it is last.
            if flight.error is None and (exc is None or last):
                await self._finish(flight, clean_end=True)
            if last:
                await _aclose_quietly(flight.iterator)
        stream.stored = flight.stored
        stream.reason = "" if flight.stored else flight.recorder.reason

    def _forget(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    # -- notices ---------------------------------------------------------------------------

    def _emit(self, notice: Notice) -> None:
        emit(self._hooks, notice)

    def _warn(self, kind: str, key: str, message: str) -> None:
        logger.warning("sse_cache: %s (key %s)", message, key)
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
        sse=serialize_sse(events) if events is not None else None,
        body=entry.body,
        expires_at=entry.expires_at,
    )


def emit(hooks: Iterable[Hook], notice: Notice) -> None:
    """Give ``notice`` to every hook; a hook that raises is logged and ignored."""
    for hook in hooks:
        try:
            hook(notice)
        except Exception:
            logger.exception("sse_cache: hook %r failed", hook)


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

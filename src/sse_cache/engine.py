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

The engine's parts live in private modules, one job each: the backend calls (breaker,
timeouts, decoded entries, fail-open warnings) in :mod:`sse_cache._entries`, the streams it
hands out (:class:`CachedStream`, and the production of a live stream) in
:mod:`sse_cache._streams`, and the recording of a pushed stream (:class:`LiveRecording`) in
:mod:`sse_cache._recording`. The public names are re-exported here.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any

from ._checks import (
    BYTES,
    POSITIVE_BYTES,
    boolean,
    callables,
    instance_of,
    integer,
    pacing_of,
    positive_number,
    ttl_of,
)
from ._decoded import DecodedEntries
from ._entries import EntryStore, too_old
from ._logging import backend_warnings
from ._notices import CacheStatus, Hook, LiveStreamsHook, Notice, emit
from ._recording import LiveRecording
from ._streams import CachedStream, Production
from .breaker import Breaker
from .codec import MsgpackCodec, WireEntry
from .entry import Entry
from .errors import ConfigError
from .events import Event
from .flight import Cursor, Flight, Flights, LiveFlight, Phase, SharedStreamAborted
from .keys import CacheRequest, DefaultKeyer, check_key
from .pacing import Pacing
from .protocols import Backend, CacheKeyer, EventCodec, ScreeningAdapter, StreamAdapter
from .recorder import DEFAULT_MAX_ENTRY_BYTES, Recorder

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

#: Default budget of :class:`StreamCache`'s decoded-entry cache (hot entries, per process).
DEFAULT_DECODED_CACHE_BYTES = 64 * 1024 * 1024
#: Default seconds a follower of a live stream waits for its head, and then for each next
#: piece, before it gives up on it (:class:`~sse_cache.engine.SharedStreamAborted`).
DEFAULT_JOIN_TIMEOUT = 300.0


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
        join_timeout: float = DEFAULT_JOIN_TIMEOUT,
        decoded_cache_bytes: int | DecodedEntries[Entry | WireEntry] = (
            DEFAULT_DECODED_CACHE_BYTES
        ),
        breaker: Breaker | None = None,
    ) -> None:
        from .backends import open_backend  # the registry, not a concrete backend

        # Every argument is checked here, once, naming it (the checkers CacheOptions uses;
        # the backend last, by open_backend, as the middleware and the transports check it:
        # a URL opens a backend only once everything else was found right).
        instance_of("adapter", adapter, StreamAdapter)
        instance_of("keyer", keyer, CacheKeyer, optional=True)
        instance_of("codec", codec, EventCodec, optional=True)
        ttl = _checked_ttl(ttl)
        max_entry_bytes = integer("max_entry_bytes", max_entry_bytes, what=POSITIVE_BYTES)
        self.pacing = pacing_of("pacing", pacing)
        self._hooks = callables("hooks", hooks)
        backend_timeout = positive_number("backend_timeout", backend_timeout)
        boolean("single_flight", single_flight)
        join_timeout = positive_number("join_timeout", join_timeout, finite=False)
        if not isinstance(decoded_cache_bytes, DecodedEntries):
            decoded_cache_bytes = integer(
                "decoded_cache_bytes", decoded_cache_bytes, minimum=0, what=BYTES
            )
        instance_of("breaker", breaker, Breaker, optional=True)
        self.backend, self._owns_backend = open_backend(backend)
        self.adapter = adapter
        # Whether the adapter passes some requests through uncached: decided once.
        self._screen = adapter.uncached_reason if isinstance(adapter, ScreeningAdapter) else None
        self._said_shared = False  # (request() without tenant=: warned once)
        self.keyer: CacheKeyer = DefaultKeyer() if keyer is None else keyer
        self.codec: EventCodec = MsgpackCodec() if codec is None else codec
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.backend_timeout = backend_timeout
        self.single_flight = single_flight
        self.join_timeout = join_timeout
        self.decoded: DecodedEntries[Entry | WireEntry] = (
            decoded_cache_bytes
            if isinstance(decoded_cache_bytes, DecodedEntries)
            else DecodedEntries(decoded_cache_bytes)
        )
        self._notify = partial(emit, self._hooks)
        self.breaker = breaker if breaker is not None else Breaker()
        self._entries = EntryStore(
            self.backend,
            schema=adapter.name,
            codec=self.codec,
            decoded=self.decoded,
            breaker=self.breaker,
            timeout=backend_timeout,
            hooks=self._hooks,
        )
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
        tenant: str | None = None,
        shared: bool = False,
        namespace: str = "",
        variant: int = 0,
    ) -> CacheRequest:
        """The :class:`CacheRequest` for a decoded JSON request body (the adapter picks the
        answer-defining fields; a request it passes through uncached says why in
        ``uncached``, and :meth:`stream` then bypasses the cache).

        ``tenant``: whose answer this is — a scope of the caller, such as
        :func:`~sse_cache.keys.tenant_scope` of its request headers (a hash of its
        credentials), its user or organisation id — so that callers never share answers.
        Without one, every caller of this cache shares its answers: say so with
        ``shared=True`` (keyed as the HTTP integrations' ``tenant="shared"``); a request with
        neither is keyed the same, and the cache logs a warning once (an integration written
        from the README answered one user from another's entry, the README calling it
        tenant-safe; helper-156). No tenant keys as the shared scope, "shared" included.
        ``""`` (``tenant_scope`` of a request that carries no credential) cannot tell callers
        apart: such a request is passed through uncached (``uncached`` says so), as the HTTP
        integrations pass it; its key is no other request's (check ``uncached`` before
        keying a request by hand for :meth:`lookup` or :meth:`recording`).

        Raises TypeError for a body that is not a mapping (a JSON object), a part of the key
        of the wrong type, or both ``tenant`` and ``shared=True``; ValueError for a negative
        variant. A body holding what no JSON body holds (NaN, a set, bytes...) makes
        :meth:`key` and :meth:`stream` raise :class:`~sse_cache.errors.ConfigError`."""
        if not isinstance(body, Mapping):
            raise TypeError(
                f"body must be the decoded JSON object of the request (a mapping), "
                f"got {type(body).__name__}"
            )
        if shared is not False and shared is not True:
            raise TypeError(f"shared must be True or False, got {shared!r}")
        if shared and tenant is not None:
            raise TypeError("request() takes tenant= or shared=True, not both")
        for name, part in (
            ("route", route),
            ("tenant", "" if tenant is None else tenant),
            ("namespace", namespace),
        ):
            if not isinstance(part, str):
                raise TypeError(f"{name} must be a str, got {type(part).__name__}")
        uncached = ""
        if tenant is None:
            scope = ""  # (the scope the HTTP integrations' shared tenant keys with)
            if not shared and not self._said_shared:
                self._said_shared = True
                logger.warning(
                    "sse_cache: StreamCache.request() without tenant=: every caller of this "
                    "cache shares its answers. Pass tenant= (whose answer it is: e.g. "
                    "sse_cache.keys.tenant_scope(request_headers), a user id), or "
                    "shared=True to say they are shared"
                )
        else:
            scope = tenant  # (never "": the shared scope is no tenant's)
            if not tenant:
                uncached = "no tenant scope (the request carries no credential)"
                # A scope of its own: its key (cache.key, for stream(key), lookup(),
                # recording()) is no other request's (helper-161).
                scope = f"\x00{secrets.token_hex(16)}"
        if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
            raise ValueError(f"variant must be an int >= 0, got {variant!r}")
        return CacheRequest(
            schema=self.adapter.name,
            route=route,
            fields=self.adapter.key_fields(body),
            tenant=scope,
            namespace=namespace,
            variant=variant,
            uncached=uncached or ("" if self._screen is None else self._screen(body)),
        )

    def key(self, request: CacheRequest | str) -> str:
        """The key of ``request`` (a string is taken as a key already). Raises TypeError
        for anything else, ValueError for a string no backend takes as a key (see
        :func:`~sse_cache.keys.check_key`)."""
        if isinstance(request, str):
            check_key(request)
            return request
        if not isinstance(request, CacheRequest):
            raise TypeError(
                f"expected a CacheRequest (cache.request(body, tenant=...)) or a key (str), "
                f"got {type(request).__name__}"
            )
        return self.keyer.key(request)

    # -- storage (fail open) ---------------------------------------------------------------

    async def lookup(self, key: str, *, max_age: float | None = None) -> Entry | None:
        """The stored entry for ``key``, or None on a miss, an expired/too-old entry, a
        backend failure (logged) or a corrupt entry (logged and deleted)."""
        return await self._entries.lookup(key, max_age)

    async def lookup_wire(self, key: str, *, max_age: float | None = None) -> WireEntry | None:
        """Like :meth:`lookup`, for an HTTP replay: a recorded stream comes as its canonical
        SSE bytes, without building events when the codec can (a
        :class:`~sse_cache.protocols.WireCodec`)."""
        return await self._entries.lookup_wire(key, max_age)

    async def alias(self, name: str, key: str, *, expires_at: float | None = None) -> bool:
        """Store ``name`` as another name of the entry ``key`` (until ``expires_at``), e.g. a
        response id by which a stream can be resumed. Fail-open: False when the write failed."""
        return await self._entries.alias(name, key, expires_at)

    async def resolve(self, name: str) -> str | None:
        """The key an :meth:`alias` names, or None (missing, or the backend failed)."""
        return await self._entries.resolve(name)

    async def store(
        self, key: str, entry: Entry, *, ttl: float | None = None, began: float | None = None
    ) -> bool:
        """Encode and store ``entry``; False (logged) when it could not be encoded or the
        backend failed, or (with ``began``, when the request it answers began, by
        ``time.time()``) an entry created since is stored: an answer never replaces a newer
        one. ``ttl`` falls back to the cache's default."""
        return await self._entries.store(key, entry, self.ttl if ttl is None else ttl, began)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (fail open: a backend failure is logged)."""
        await self._entries.delete(key)

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
        return self.synthesized(entry.body)

    def synthesized(self, body: bytes) -> Sequence[Event] | None:
        """A stream synthesised from the non-stream ``body`` by the adapter; None when it
        cannot (also when it raises on a body it did not foresee: then logged, and the
        request is a miss rather than a failed one)."""
        try:
            return self.adapter.synthesize(body)
        except Exception as exc:
            backend_warnings.warning(
                self,
                "adapter_failed",
                "sse_cache: %s could not synthesise a stream: %r",
                self.adapter.name,
                exc,
            )
            return None

    def body_of(self, entry: Entry) -> bytes | None:
        """The non-stream answer for ``entry``: its body, or one recovered from its recorded
        stream by the adapter (None if the adapter cannot, or raises: logged)."""
        if entry.body is not None:
            return entry.body
        assert entry.events is not None
        try:
            return self.adapter.final_body(entry.events)
        except Exception as exc:
            backend_warnings.warning(
                self,
                "adapter_failed",
                "sse_cache: %s could not build a body: %r",
                self.adapter.name,
                exc,
            )
            return None

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
        ``upstream`` is called only on a miss. A request the adapter passes through uncached
        (``request.uncached``: a Responses ``conversation``, whose state is the upstream's) is
        neither looked up, shared nor stored: status ``bypass``, its ``Notice`` saying why.

        A stream that joined another (``shared``) ends cleanly only where the upstream
        ended cleanly; otherwise iterating it raises :class:`SharedStreamAborted` (the
        reader pulling the upstream when it failed gets the upstream's own error).
        """
        ttl = _checked_ttl(ttl)
        # (An answer is not stored over an entry created since: EntryStore.save.)
        began = time.time()
        key = self.key(request)
        pace = self.pacing if pacing is None else Pacing.parse(pacing)
        uncached = request.uncached if isinstance(request, CacheRequest) else ""
        if uncached:
            lookup, store, refresh = False, False, False
        use_cache = lookup and not refresh
        ttl = self.ttl if ttl is None else ttl
        live: LiveFlight[Event] | None = None
        cursor: Cursor | None = None
        if use_cache:
            entry = await self.lookup(key, max_age=max_age)
            if entry is not None and (hit := self._hit(key, entry, pace)) is not None:
                yield hit
                return
            pending, live, cursor = self.settle(key, share=store, max_age=max_age)
            if pending is not None and (hit := self._hit(key, pending, pace)) is not None:
                yield hit
                return
            if live is not None and cursor is not None:
                # (A follower that takes over stores its own answer with its own ttl:
                # helper-89 found it stored without expiry.)
                rejoin = partial(self._rejoin, upstream=upstream, ttl=ttl, began=began)
                shared = CachedStream(CacheStatus.SHARED, key, rejoin=rejoin)
                shared.follow(live, cursor, self.join_timeout)
                self._notify(Notice(kind="shared", key=key))
                async with shared:
                    yield shared
                return
        status = (
            CacheStatus.MISS
            if use_cache
            else (CacheStatus.REFRESH if refresh else CacheStatus.BYPASS)
        )
        stream = CachedStream(status, key)
        self._produce(stream, live, upstream, store=store, ttl=ttl, began=began, why=uncached)
        async with stream:
            yield stream

    def _produce(
        self,
        stream: CachedStream,
        live: LiveFlight[Event] | None,
        upstream: Upstream,
        *,
        store: bool,
        ttl: float | None,
        began: float,
        why: str = "",
    ) -> None:
        """Make ``stream`` the producer of ``live`` (registered by :meth:`settle`), or of a
        flight of its own that no one else can join: its upstream is opened now. ``began``:
        when its request began (``time.time()``); ``why``: why it bypasses the cache, if the
        adapter said (its notice's detail, and why it is not stored)."""
        key = stream.key
        if live is None:
            # Not offered to others (no-cache, no-store, single-flight off): its log keeps
            # nothing that its one reader has read.
            live = LiveFlight(Flight(key, max_log_bytes=0, max_lag_bytes=sys.maxsize))
        recorder = self.recorder()
        if not store:
            recorder.fail(why or "the request asked not to store (no-store)")
        production = Production(
            live, key, recorder, ttl, notify=self._notify, store=self._entries.save, began=began
        )
        cursor = live.flight.follow()
        live.flight.producer_left()  # the producing request reads as a follower does
        assert cursor is not None
        live.producer_cursor = cursor  # (but is not counted as one)
        stream.follow(live, cursor, self.join_timeout)
        self._notify(Notice(kind=stream.status.value, key=key, detail=why))
        try:
            production.started = time.monotonic()
            production.iterator = aiter(upstream())
        except BaseException as exc:
            live.fail(f"the upstream could not be opened: {exc!r}")
            raise
        live.hand_over(production.pull, production.abandon)

    def _rejoin(
        self, stream: CachedStream, upstream: Upstream, ttl: float | None, began: float
    ) -> None:
        """``stream`` followed a flight that failed before it was sent anything: it goes
        round the lookup order once more (without the backend read), joining whoever asks
        the upstream next — or being it (status ``miss``), with the request's ``ttl``."""
        _, live, cursor = self.settle(stream.key)
        if live is not None and cursor is not None:
            stream.follow(live, cursor, self.join_timeout)
            return
        stream.status = CacheStatus.MISS
        self._produce(stream, live, upstream, store=True, ttl=ttl, began=began)

    def settle(
        self, key: str, *, share: bool = True, max_age: float | None = None
    ) -> tuple[Any, LiveFlight[Any] | None, Cursor | None]:
        """The rest of the one lookup order, once the backend had no fresh entry for
        ``key``: an entry being stored (``(entry, None, None)``), the live stream to follow
        (``(None, live, cursor)``), or the new live stream the caller produces, registered
        before its upstream call (``(None, live, None)``); ``(None, None, None)`` when the
        caller must not share (``share=False``, or single-flight is off), or when the entry
        being stored is older than ``max_age`` (held to it as its stored copy would be).

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
            if too_old(live.entry, max_age, time.time()):
                return None, None, None
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
        self._notify(Notice(kind="hit", key=key, events=len(events), seconds=seconds))
        return CachedStream(CacheStatus.HIT, key, entry=entry, events=events, pacing=pacing)

    def recording(
        self,
        key: str,
        *,
        store: bool = True,
        ttl: float | None = None,
        began: float | None = None,
    ) -> LiveRecording:
        """Record a stream whose events are pushed to us: ``async with cache.recording(key)
        as live`` (see :class:`LiveRecording`).

        Leaving the block ends the stream: cleanly when the block exits normally (then the
        stream is judged and stored if complete), as cut when it raises. (The recording is
        its own context manager, no generator: one left unclosed at the loop's end is
        finalized once, not twice.) ``began``: when the request began (``time.time()``):
        then its answer is not stored over an entry created since (None: stored as it ends).
        """
        ttl = _checked_ttl(ttl)
        recorder = self.recorder()
        if not store:
            recorder.fail("the request asked not to store (no-store)")
        return LiveRecording(
            key,
            recorder,
            self.ttl if ttl is None else ttl,
            notify=self._notify,
            store=self._entries.save,
            began=began,
        )


def _checked_ttl(ttl: float | None) -> float | None:
    """``ttl`` as the cache uses it (seconds as a float), or None; checked, naming it."""
    return None if ttl is None else ttl_of("ttl", ttl)

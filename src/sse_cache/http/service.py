"""The HTTP-level cache shared by every integration (ASGI middleware, httpx/httpx2 transports).

An integration knows how to read a request and write a response in its framework; everything
else lives here, once: which requests are cached (:class:`~sse_cache.http.policy.CachePolicy`),
their keys, the lookup, answering a hit (replayed, synthesised or recovered), joining a live
identical stream, and recording a miss's response as it passes through (:class:`ResponseTee`).

Usage by an integration::

    decision = service.decide(method, path, headers, body)   # ConfigError -> 400
    async with service.exchange(decision) as ex:
        if ex.answer is not None:         # hit or shared: no upstream call
            send(ex.answer.status, ex.answer.headers, ex.answer.chunks)
        else:                             # miss / bypass / refresh: call the upstream
            tee = await ex.tee(status, response_headers)   # None: not recordable
            for chunk in upstream_body:   # deliver each chunk, then record and relay it
                send(chunk); tee and tee.relay(chunk)
            tee and tee.end()             # the upstream body ended by itself
    # leaving the block stores what completed (a tee that did not end stores nothing)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import Any

import anyio
import msgspec

from .._decoded import DecodedEntries
from .._notices import CacheStatus, Notice, emit
from ..breaker import (
    Breaker,
    BreakerState,
)
from ..codec import MsgpackCodec, WireEntry
from ..engine import LiveRecording, StreamCache
from ..entry import PARTIAL_CONTENT, Entry
from ..errors import ConfigError
from ..events import Event
from ..flight import Cursor, Flights, Head, LiveFlight, SharedStreamAborted
from ..keys import (
    CREDENTIAL_HEADERS,
    CacheRequest,
    DefaultKeyer,
    credential_scoped,
    live_alias_target,
)
from ..pacing import Pacing
from ..protocols import (
    Backend,
    FanoutBackend,
    LeasingBackend,
    Outcome,
    ResumingAdapter,
    StreamAdapter,
)
from . import _resume
from ._answers import (
    SSE_TYPE,
    Answer,
    _as_shared,
    _Counted,
    answer_entry,
    answer_wire,
)
from ._fanout import (
    _FANOUT_TTL,
    _LIVE_ALIAS_TTL,
    _FanoutBackend,
    _Lease,
    end_lead,
    lead_or_follow,
)
from ._resume import alias_key, alias_scope, live_alias_key, resumable
from ._tee import ResponseTee, encoding_of, media_type, not_recorded_because
from ._watch import ClientGone, FollowerLeft, unless_gone
from .options import DEFAULT_CROSS_PROCESS_LEASE, CacheOptions
from .policy import GATEWAY_KEY_HEADERS, CachePolicy, Decision

__all__ = [
    "DEFAULT_CROSS_PROCESS_LEASE",
    "Answer",
    "CacheService",
    "Exchange",
    "FollowerLeft",
    "ResponseTee",
]

logger = logging.getLogger("sse_cache")

#: The upstream's response headers a follower of its live stream gets: those that describe
#: the body, as a hit's do (``x-accel-buffering`` keeps a proxy in front from holding it
#: back), and those a client needs to act on an answer that is no success, which a flight
#: shares too (a 429's ``retry-after``, a 401's ``www-authenticate``, a redirect's
#: ``location``, and ``x-should-retry``, which the openai and anthropic SDKs obey before the
#: status: without it the followers retried what the producer's SDK did not, or not what it
#: did; helper-108). Never what the upstream said to the producer's caller alone: its
#: cookies, request id, organisation, rate limits.
_SHARED_HEAD = frozenset(
    {
        "content-type",
        "content-length",
        "content-language",
        "cache-control",
        "vary",
        "x-accel-buffering",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "www-authenticate",
        "location",
        "allow",
    }
)


def _check_lease(lease: float, backend: object) -> None:
    """Warn of a lease too short for the backend's timeout. A producer's write to its channel
    may take twice that timeout plus 0.25 s, and its followers wait a lease's length for its
    next message: a lease not above a third of itself plus that, 3 x timeout + 0.375 s, lets
    a slow write that succeeds make its followers give up on a live producer (aborted,
    never a clean end). Accepted silently before (helper-101)."""
    timeout = getattr(backend, "timeout", None)
    if not isinstance(timeout, (int, float)):
        return
    shortest = 3 * timeout + 0.375
    if lease <= shortest:
        logger.warning(
            "sse_cache: cross_process_lease=%g s is too short for the backend's timeout of "
            "%g s: keep it above %g s (3 x timeout + 0.375), or a write that is slow but "
            "succeeds makes the followers of a live producer give up on it (their responses "
            "are aborted)",
            lease,
            timeout,
            shortest,
        )


class CacheService:
    """Policy + one :class:`StreamCache` per adapter, all on one backend.

    ``backend`` is a Backend or a URL (then the service owns and closes it). The options:
    one :class:`~sse_cache.http.options.CacheOptions` (``options=``), or its fields as keywords.
    A ``resume_window`` keeps a streamed miss whose client left being read, so that the
    client can come back and resume it (docs/single-flight.md).
    """

    def __init__(
        self, backend: Backend | str, options: CacheOptions | None = None, **keywords: Any
    ) -> None:
        from ..backends import open_backend  # the registry, not a concrete backend

        o = self.options = CacheOptions.of(options, keywords)
        #: The live streams that name their response (Responses), by tenant and response id
        #: (:func:`alias_key`): what ``GET .../responses/{id}?stream=true`` resumes.
        self.live_responses: dict[str, LiveFlight[bytes]] = {}

        self._backend_url = backend if isinstance(backend, str) else None
        self._closed = False
        self.backend, self._owns_backend = open_backend(backend)
        self.cross_process_lease = o.cross_process_lease
        self.policy = CachePolicy(
            o.routes,
            tenant=o.tenant,
            credential_headers=(*CREDENTIAL_HEADERS, *o.credential_headers),
            key_headers=(*GATEWAY_KEY_HEADERS, *o.key_headers),
            max_body_bytes=o.max_body_bytes,
            origin=o.origin,
        )
        self.hooks = tuple(o.hooks)
        self._keyer = o.keyer or DefaultKeyer()
        self._codec = o.codec or MsgpackCodec()
        self.ttl = o.ttl
        self._use(self.backend)
        if self.fanout is not None:
            _check_lease(o.cross_process_lease, self.fanout)

    def _use(self, backend: Backend) -> None:
        # What works on the backend: its breaker, the fan-out of live streams and one cache
        # per adapter. A new backend (reopened) gets a new breaker: one opened by calls to
        # the closed one (requests served without a lifespan meanwhile) would skip the new
        # one for its cooldown (helper-99).
        o = self.options
        # One breaker for the one backend, whichever route's cache calls it.
        self.breaker = Breaker(
            o.breaker_failures, o.breaker_cooldown, on_change=self._breaker_changed
        )
        self.fanout: _FanoutBackend | None = None
        if o.cross_process:
            if not (isinstance(backend, LeasingBackend) and isinstance(backend, FanoutBackend)):
                raise ConfigError(
                    f"cross_process needs a backend with locks and fan-out (Redis), "
                    f"not {type(backend).__name__}"
                )
            self.fanout = backend
        decoded: DecodedEntries[Entry | WireEntry] = DecodedEntries(o.decoded_cache_bytes)
        self._caches: dict[int, StreamCache] = {
            id(adapter): StreamCache(
                backend,
                adapter,
                keyer=self._keyer,
                codec=self._codec,
                ttl=o.ttl,
                max_entry_bytes=o.max_entry_bytes,
                pacing=o.pacing,
                hooks=self.hooks,
                backend_timeout=o.backend_timeout,
                single_flight=o.single_flight,
                join_timeout=o.join_timeout,
                decoded_cache_bytes=decoded,  # one budget for all the schemas
                breaker=self.breaker,
            )
            for adapter in self.policy.routes.values()
        }

    def _breaker_changed(self, state: BreakerState, why: str) -> None:
        # One line per transition, not one per skipped request.
        log = logger.info if state is BreakerState.CLOSED else logger.warning
        log("sse_cache: backend circuit %s (%s)", state.value, why)
        emit(self.hooks, Notice(kind="breaker", key="", detail=state.value))

    def cache_for(self, adapter: StreamAdapter) -> StreamCache:
        return self._caches[id(adapter)]

    def live_registries(self) -> list[Flights]:
        """The live streams' registries of this service's caches (one per adapter)."""
        return [cache.live for cache in self._caches.values()]

    async def end_handed_over(self, reason: str) -> None:
        """End every live stream read on with no producer — its client gone, its upstream
        read for followers here or in other processes, or for a resume window — as its
        integration closes: it fails now for its readers (here, and elsewhere at once rather
        than after a lease's silence), its upstream is closed and its exchange left (what
        completed is stored, a cross-process lease released) while the backend is open."""
        for cache in self._caches.values():  # (one per adapter)
            await cache.live.end_handed_over(reason)

    async def aclose(self) -> None:
        if self._owns_backend and not self._closed:
            self._closed = True
            await self.backend.aclose()

    def reopen(self) -> None:
        """Open the backend again from its URL after :meth:`aclose` (an app served again,
        as a test client serves it once per ``with`` block); nothing to do otherwise."""
        from ..backends import open_backend

        if self._closed and self._backend_url is not None:
            self.backend, _ = open_backend(self._backend_url)
            self._use(self.backend)
            self._closed = False

    def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        query: str = "",
        origin: str | None = None,
    ) -> Decision:
        """The policy's decision for a request (see :meth:`CachePolicy.decide`). Raises
        :class:`~sse_cache.errors.ConfigError` for an invalid control header (answer 400)."""
        try:
            return self.policy.decide(method, path, headers, body, query, origin)
        except ConfigError as exc:
            emit(self.hooks, Notice(kind="invalid", key="", detail=str(exc)))
            raise

    def exchange(
        self,
        decision: Decision,
        *,
        publish: bool = False,
        client_gone: ClientGone | None = None,
    ) -> Exchange:
        """One request/response, for a :meth:`decide` decision, as an ``async with`` block.
        Leaving the block normally stores what completed; leaving it with an exception stores
        nothing.

        ``publish``: the integration calls :meth:`ResponseTee.flush` after each chunk, so a
        miss can lead a cross-process single-flight (``cross_process=True``).
        ``client_gone``: returns once the request's client has left (an ASGI server's
        ``http.disconnect``): a request waiting for the head of the live stream it follows
        leaves it then, and entering raises :class:`FollowerLeft`."""
        return Exchange(self, decision, publish=publish, client_gone=client_gone)

    async def resume(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        origin: str | None = None,
    ) -> Answer | None:
        """Answer ``GET .../responses/{id}?stream=true&starting_after=N`` for the tenant that
        started that response, on the same server (``origin``, as for :meth:`decide`): the
        events after sequence number N — from its live stream while it is produced (here, or
        by another process with ``cross_process``), from its entry once stored. None when it
        is not such a request or the stream is neither live nor cached (then the request
        goes upstream). No exchange holds the answer: the caller closes it
        (:meth:`Answer.aclose`) however its sending ends."""
        return await _resume.resume(self, method, path, query, headers, origin)

    async def resume_remote(
        self, cache: StreamCache, key: str, had: Callable[[Event], bool | None]
    ) -> Answer | None:
        """:meth:`resume_live` for the stream of ``key`` that another process produces: read
        from the start of its producer's fan-out channel. None when no process produces it,
        or it cannot be followed (failed before it answered, or Redis failed)."""
        return await _resume.resume_remote(self, cache, key, had)

    async def resume_live(
        self, cache: StreamCache, live: LiveFlight[bytes], had: Callable[[Event], bool | None]
    ) -> Answer | None:
        """Answer a client that reconnects to a live stream: the stream's exact bytes after
        the last event it had (``had``: see :class:`~sse_cache.events.ResumeCut`), then the
        rest as it comes, ending (or failing) as the stream does. None when the stream can
        no longer be joined (it failed, or its log outgrew ``max_entry_bytes``)."""
        return await _resume.resume_live(self, cache, live, had)


class Exchange:
    """The cache's side of one request (see :meth:`CacheService.exchange`): an ``async with``
    block. (A class of its own, not an ``asynccontextmanager``: that costs three times as
    much to enter and leave, on every request.)"""

    def __init__(
        self,
        service: CacheService,
        decision: Decision,
        *,
        publish: bool = False,
        client_gone: ClientGone | None = None,
    ) -> None:
        self.decision = decision
        self._client_gone = client_gone
        self.status = CacheStatus.BYPASS
        self.key = ""
        self.answer: Answer | None = None
        self._service = service
        self._publish = publish
        self._cache: StreamCache | None = None
        self._stack = AsyncExitStack()  # what leaving the block undoes (recording, flights)
        self._tee: ResponseTee | None = None
        self._live: LiveRecording | None = None
        self._lead: _Lease | None = None  # while leading a cross-process flight
        self._flight: LiveFlight[bytes] | None = None  # the live stream this request produces
        self._follows_process = False  # ... fed by another process's (cross-process)
        self._unindex: Callable[[], None] | None = None  # drops this stream's live index
        self._live_alias: tuple[str, str] | None = None  # (its name, what it names), if any
        #: When this request went to the upstream (``time.time()``), if it does: its answer
        #: is not stored over an entry created since (a refresh's; EntryStore.save).
        self._began: float | None = None
        self._let_go = ""  # why its client's leaving before the head ended the stream

    async def __aenter__(self) -> Exchange:
        """Look the request up: then the integration answers, or tees the upstream."""
        try:
            if self.decision.adapter is not None:
                await self._look(self._stack, publish=self._publish)
            elif self.decision.route:
                notice = Notice(kind="bypass", key="", detail=self.decision.reason)
                emit(self._service.hooks, notice)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Close the tee, undo what the lookup set up (leaving the recording stores what
        completed; nothing when the block raised) and index what was stored: as an ``async
        with`` of :attr:`_stack` around the block, then :meth:`_index`, would."""
        try:
            answer = self.answer
            if answer is not None and not answer.instant:
                # Closed by the integration as it sent it (then this does nothing), or never
                # read (a response dropped unread): what it reads is let go of, the live
                # stream it follows left. (An instant hit's body holds nothing else: every
                # hot hit, spared the call.)
                await answer.aclose()
            if exc is not None:
                suppressed = await self._stack.__aexit__(exc_type, exc, tb)
                if not suppressed:
                    return False
            else:
                async with self._stack:
                    tee = self._tee
                    if tee is not None:
                        if not tee.ended:
                            tee.fail("the response did not complete")
                        await tee.close()
                        if tee.body_not_stored:  # (the access line's reason, say)
                            why = tee.body_not_stored
                            notice = Notice(kind="not_stored", key=self.key, detail=why)
                            emit(self._service.hooks, notice)
            await self._index()
            return exc is not None
        finally:
            unindex, self._unindex = self._unindex, None
            if unindex is not None:
                unindex()
            if self._live_alias is not None:
                with anyio.CancelScope(shield=True):  # (bounded by the backend's timeout)
                    await self._expire_live_alias()
            lease, self._lead = self._lead, None
            if lease is not None:
                tee = self._tee
                await end_lead(lease, self.key, None if tee is None else tee.publish_rest)

    @property
    def cacheable(self) -> bool:
        return self.decision.adapter is not None

    @property
    def may_store(self) -> bool:
        """Whether the upstream's answer to this request may be stored (once its head says
        what it is): a cached route, a miss, no ``no-store``, not a reconnection that gets
        the rest of a stream only."""
        decision = self.decision
        return (
            decision.adapter is not None
            and self.answer is None
            and decision.controls.store
            and decision.last_event_id is None
        )

    def read_on_for_others(
        self, abandon: Callable[[], Awaitable[None]], keep: Callable[[], bool] | None = None
    ) -> bool:
        """Before the upstream's head came, the client left. True when others read this
        request's live stream, or may: followers here — then, if the last of them leaves
        before its end, ``keep`` is asked whether the integration reads it on itself (see
        :attr:`~sse_cache.flight.LiveFlight.keep`), else ``abandon`` is called — or in other
        processes (it leads a cross-process flight, whose followers cannot be counted).
        False, with nothing changed, otherwise (see :meth:`let_go`)."""
        if self._lead is not None:
            return True
        live = self._flight
        if live is None or not live.followers:
            return False
        live.producer_left()  # (followers read: it goes on for them)
        live.abandon = abandon
        live.keep = keep
        return True

    def let_go(self, reason: str) -> None:
        """Before the upstream's head came, the client left and no one reads on (see
        :meth:`read_on_for_others`): the live stream fails now, so that no identical request joins a
        stream about to be stopped (each asks the upstream itself), and nothing that comes
        after is shared or stored (:meth:`tee` returns None)."""
        self._let_go = reason
        live = self._flight
        if live is not None:
            live.fail(reason)

    def headers(self) -> list[tuple[str, str]]:
        """The ``x-sse-cache`` headers for this request's response (none when the route is
        not cached at all)."""
        if self.decision.adapter is None:
            return [("x-sse-cache", CacheStatus.BYPASS.value)] if self.decision.route else []
        out = [("x-sse-cache", self.status.value)]
        if self.key:
            out.append(("x-sse-cache-key", self.key))
        return out

    def first_byte(self, seconds: float) -> None:
        """Report this response's time to first byte to the hooks: ``seconds`` from the
        request's arrival to its first non-empty body bytes going to the client, as a
        ``first_byte`` notice with this exchange's key and cache status in ``detail``
        (:class:`~sse_cache.metrics.Metrics` observes it in
        ``sse_cache_time_to_first_byte_seconds``). An integration calls it at most once per
        response, also after the exchange was left (a passthrough), never for a response
        that sent no body bytes."""
        notice = Notice(kind="first_byte", key=self.key, detail=self.status.value, seconds=seconds)
        emit(self._service.hooks, notice)

    async def _look(self, stack: AsyncExitStack, *, publish: bool = False) -> None:
        decision = self.decision
        adapter = decision.adapter
        assert adapter is not None and decision.body is not None
        controls = decision.controls
        cache = self._cache = self._service.cache_for(adapter)
        self._stack = stack
        fields = adapter.key_fields(decision.body)
        if controls.ignore_fields:
            fields = {k: v for k, v in fields.items() if k not in controls.ignore_fields}
        self.key = cache.key(
            CacheRequest(
                schema=adapter.name,
                route=decision.route,
                fields=fields,
                tenant=decision.tenant,
                namespace=controls.namespace,
                variant=CachePolicy.pick_variant(controls),
                headers=decision.key_headers,
                ignored=tuple(sorted(controls.ignore_fields)),
            )
        )
        if controls.refresh or not controls.lookup:
            self.status = CacheStatus.REFRESH if controls.refresh else CacheStatus.BYPASS
            self._began = time.time()
            emit(self._service.hooks, Notice(kind=self.status.value, key=self.key))
            return
        self.status = CacheStatus.MISS
        # Only a streamed request whose answer may be stored, asking for all of it, is
        # offered to others or joins others: a no-store request wants its own answer, a
        # non-streamed one other bytes, a reconnecting one (Last-Event-ID) a suffix.
        shares = (
            decision.streaming
            and cache.single_flight
            and controls.store
            and decision.last_event_id is None
        )
        # The one lookup order: a fresh entry, an entry being stored, a live stream, or become
        # its producer. A follower whose producer failed before answering (it has been sent
        # nothing) goes round once more: it joins whoever asks the upstream next, or is it.
        for _attempt in range(2):
            if await self._lookup(cache):
                return
            pending, live, cursor = cache.settle(self.key, share=shares, max_age=controls.max_age)
            if pending is not None:  # an entry being stored
                self.answer = answer_entry(
                    self._service.hooks,
                    self.key,
                    self.decision,
                    cache,
                    pending,
                    self._pacing(cache),
                )
                if self.answer is not None:
                    self.status = CacheStatus.HIT
                    return
            if live is None:
                break
            if cursor is None:
                self._produce(live, stack)
                break
            stack.push_async_callback(live.leave, cursor)  # whatever happens to the answer
            if await self._follow(live, cursor):
                return
        if (
            decision.last_event_id is not None
            and decision.streaming
            and controls.store
            and cache.single_flight
            and await self._resume_live(cache, decision.last_event_id)
        ):
            return
        fanout = self._service.fanout
        if (
            fanout is not None
            and publish
            and self._flight is not None
            # While the breaker keeps the backend out, so are its locks: a hung Redis would
            # cost every miss a lock call's timeout (no single-flight across processes then).
            and self._service.breaker.state is BreakerState.CLOSED
        ):
            self._lead, answer = await lead_or_follow(
                fanout,
                self.key,
                self._flight,
                cache,
                self._service.cross_process_lease,
                hooks=self._service.hooks,
                gone=self._client_gone,
            )
            if answer is not None:
                self.status = CacheStatus.SHARED
                emit(self._service.hooks, Notice(kind="shared", key=self.key))
                self._follows_process = True
                self.answer = msgspec.structs.replace(answer, chunks=self._counted(answer.chunks))
                return
            # Leading now: another process's producer may have stored its answer and let go of
            # the key since this request looked (it stores, then releases): that answer, not a
            # second upstream call. (The lease is let go on the way out; a process that
            # followed it meanwhile sees it fail before its head, and looks again.)
            if self._lead is not None and await self._lookup(cache):
                return
        self._began = time.time()
        emit(self._service.hooks, Notice(kind="miss", key=self.key))
        # Keyed: the decoded body is not needed any more, and a miss may stream for minutes
        # (a long conversation's body decodes to ~6 times its size; helper-85).
        self.decision = msgspec.structs.replace(decision, body=None)

    async def _resume_live(self, cache: StreamCache, last_id: str) -> bool:
        """A client reconnecting with ``Last-Event-ID`` to an answer still being produced:
        it gets the rest of that live stream."""
        live = cache.live.get(self.key)
        fanout = self._service.fanout
        if live is None and fanout is None:
            return False
        found = False

        def had(event: Event) -> bool | None:
            # The first event with that id (as for a stored stream): the client has it and
            # those before; not found, the client saw another stream and gets all of this one.
            nonlocal found
            if found:
                return False
            found = event.id == last_id
            return True if found else None

        if live is not None:
            answer = await self._service.resume_live(cache, live, had)
        else:  # produced by another process, perhaps (cross-process): its channel
            answer = await self._service.resume_remote(cache, self.key, had)
        if answer is None:
            return False
        self.status = CacheStatus.SHARED
        self.answer = answer
        return True

    def _pacing(self, cache: StreamCache) -> Pacing:
        return self.decision.controls.pacing or cache.pacing

    async def _lookup(self, cache: StreamCache) -> bool:
        """Answer from a fresh stored entry, if there is one."""
        decision = self.decision
        pacing = self._pacing(cache)
        max_age = decision.controls.max_age
        if decision.streaming and pacing.instant and decision.last_event_id is None:
            # The fast path: a recorded stream goes out as its stored SSE bytes.
            wire = await cache.lookup_wire(self.key, max_age=max_age)
            if wire is not None:
                self.answer = answer_wire(self._service.hooks, self.key, cache, wire)
        else:
            entry = await cache.lookup(self.key, max_age=max_age)
            if entry is not None:
                self.answer = answer_entry(
                    self._service.hooks, self.key, self.decision, cache, entry, pacing
                )
        if self.answer is None:
            return False
        self.status = CacheStatus.HIT
        if decision.streaming and decision.last_event_id is not None:
            # A client reconnecting for the rest of a stored answer: a resume, as from the
            # live stream (also a hit: a request on a cached route). (A non-streamed request
            # with the header gets the whole body: no resume; helper-104.)
            logger.info("sse_cache: %s resumed from its stored entry", self.key)
            emit(self._service.hooks, Notice(kind="resumed", key=self.key))
        return True

    def _produce(self, live: LiveFlight[bytes], stack: AsyncExitStack) -> None:
        # This request's response is the live stream of its key. Closed (no longer offered)
        # when the exchange ends, after the store: until then a request that finds it ended
        # is answered from its entry.
        self._flight = live
        stack.callback(lambda: live.close(keep_readers=self._follows_process))

    async def _follow(self, live: LiveFlight[bytes], cursor: Cursor) -> bool:
        """Answer with the live stream's bytes once its producer has its response head. False
        when the producer failed before that (this request has been sent nothing)."""
        cache = self._cache
        assert cache is not None
        try:
            head = await self._head_of(live, cache.join_timeout)
        except SharedStreamAborted as exc:
            logger.warning("sse_cache: not following %s: %s", self.key, exc)
            head = None
        if head is None:
            await live.leave(cursor)
            return False
        self.status = CacheStatus.SHARED
        emit(self._service.hooks, Notice(kind="shared", key=self.key))
        self.answer = Answer(
            status=head.status,
            headers=_as_shared(head.headers),
            chunks=self._counted(live.chunks(cursor, cache.join_timeout)),
        )
        return True

    async def _head_of(self, live: LiveFlight[bytes], idle_timeout: float) -> Head | None:
        # The live stream's head, while the client is watched (if it can be).
        return await unless_gone(
            partial(live.wait_head, idle_timeout), self._client_gone, f"{self.key}'s live stream"
        )

    async def _expire_live_alias(self) -> None:
        # The stream is over: its live alias (written to last an hour, as a stream may) now
        # lasts as long as the channel it names, a minute; not one row per answer for an
        # hour in Redis.
        named, cache = self._live_alias, self._cache
        if named is not None and cache is not None:
            self._live_alias = None
            await cache.alias(*named, expires_at=time.time() + _FANOUT_TTL)

    async def _index(self) -> None:
        # A stored stream that names its response (OpenAI Responses) is indexed by that id,
        # per tenant, so that GET /v1/responses/{id}?stream=true can resume it.
        live, cache = self._live, self._cache
        if live is None or cache is None or not live.stored or live.entry is None:
            return
        response_id = live.entry.meta.get("response_id")
        if response_id:
            decision = self.decision
            alias = alias_key(
                cache.adapter.name,
                decision.tenant,
                response_id,
                decision.origin,
                _alias_scope_of(decision),
            )
            await cache.alias(alias, self.key, expires_at=live.entry.expires_at)

    def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return _Counted(self._service.hooks, self.key, chunks)

    async def tee(
        self, status: int, headers: Iterable[tuple[str, str]], *, ends_by_itself: bool = True
    ) -> ResponseTee | None:
        """Start passing on the upstream's response (after its status and headers arrived):
        to the followers of this request's live stream, to other processes following it, and
        to the recording. None when there is nothing to pass on: no one can follow this
        request and its answer will not be stored (``no-store``, a non-2xx status, a
        compressed body, a content type other than SSE for a stream / JSON otherwise), or
        the request was let go (:meth:`let_go`).
        ``ends_by_itself``: False for a body that ends only as the upstream closes its
        connection (HTTP/1 without a length or chunks:
        :func:`~sse_cache.http._wire.body_ends_by_itself`), whose end cannot be told from a
        cut; an answer (a stream or a JSON body) whose adapter has no completing event
        (``generic``) is then neither shared nor stored."""
        if self.decision.adapter is None or self.answer is not None or self._let_go:
            return None
        assert self._cache is not None and self._stack is not None
        headers = list(headers)
        # A header sent twice reads as its lines joined (RFC 9110 §5.3): a second
        # Content-Encoding line of "identity" hid the first's gzip, and the followers got
        # its bytes as text (helper-165); two Content-Types are neither SSE nor JSON.
        lowered: dict[str, str] = {}
        for name, value in headers:
            name = name.lower()
            lowered[name] = f"{lowered[name]}, {value}" if name in lowered else value
        live = self._flight
        lease = self._lead
        head = None
        media = media_type(lowered)
        unshared = _not_shared_because(status, encoding_of(lowered), self.decision.tenant)
        if (
            not ends_by_itself
            and not unshared
            and self._cache.adapter.end_outcome() is Outcome.COMPLETE
        ):
            # (A stream or a JSON body alike: generic takes any body whole.)
            unshared = _END_UNTOLD
        if unshared and (live is not None or lease is not None):
            # Not an answer every identical request may have: the followers waiting here or
            # in other processes have been sent nothing, and ask for themselves.
            if live is not None:
                live.fail(f"{unshared}: not shared")
                live = None
            if lease is not None:
                # The failure marker, then the lock freed: those in other processes go
                # round and one of them leads in turn.
                self._lead = None
                await end_lead(lease, self.key, None)
                lease = None
        if live is not None:
            # After the store (the recording's, below, is left first), before the flight is
            # closed: followers end once the answer is stored.
            self._stack.callback(self._release_followers)
        if live is not None or lease is not None:
            # What a follower is sent of the upstream's head: what describes the body, as a
            # hit has it, never what the upstream said to the producer's caller alone (its
            # cookies, request id, organisation, rate limits: another tenant's, with
            # tenant="shared"; helper-80).
            sent = [(k, v) for k, v in headers if k.lower() in _SHARED_HEAD]
            if media == SSE_TYPE:
                # A stream's followers may end at its answer, before the bytes the upstream
                # announced (what it sends after the completing event is not theirs): sent
                # under its length, they were cut short of it (helper-165). Chunked.
                sent = [(k, v) for k, v in sent if k.lower() != "content-length"]
            head = Head(status, [*sent, *self.headers()])
            if live is not None:
                live.respond(head)
        controls = self.decision.controls
        # A reconnecting client may get only the rest of a stream: never store that.
        wanted = self.may_store
        reason = not_recorded_because(status, lowered, media, wanted=wanted)
        if not reason and unshared == _END_UNTOLD:
            reason = _END_UNTOLD
        tee: ResponseTee | None = None
        if reason:
            logger.debug("sse_cache: not recording %s: %s", self.key, reason)
            if live is not None or lease is not None:
                tee = ResponseTee(flight=live)
        elif media == SSE_TYPE:
            recording = await self._stack.enter_async_context(
                self._cache.recording(
                    self.key, ttl=_bounded_ttl(controls.ttl, self._cache.ttl), began=self._began
                )
            )
            recording.respond(status, lowered.get("content-type", media))
            self._live = recording
            # Schemas with a completing event may be stored when the client stops right after
            # it (see ResponseTee.client_left); generic SSE needs the real end of the body.
            completing = self._cache.adapter.end_outcome() is not Outcome.COMPLETE
            tee = ResponseTee(
                flight=live,
                recording=recording,
                completing=completing,
                limit=self._cache.max_entry_bytes,  # (of the stream's bytes kept, if any)
            )
        else:
            tee = ResponseTee(
                flight=live,
                cache=self._cache,
                key=self.key,
                ttl=_bounded_ttl(controls.ttl, self._cache.ttl),
                content_type=lowered.get("content-type", media),
                status=status,
                limit=self._cache.max_entry_bytes,
                # A request that takes the stored entry as it is: a recorded stream there
                # is kept (one that refreshes it, or found it too old, replaces it).
                keep_stream=controls.lookup and not controls.refresh and controls.max_age is None,
                began=self._began,
            )
        if tee is not None and lease is not None and head is not None:
            tee.publish_to(lease, head)
        if tee is not None:
            tee.resume_window = self._service.options.resume_window
            tee.join_timeout = self._cache.join_timeout
        by_id = isinstance(self.decision.adapter, ResumingAdapter)
        if tee is not None and live is not None and media == SSE_TYPE and by_id:
            tee.identify = self._index_live
        self._tee = tee
        return tee

    def _release_followers(self) -> None:
        if self._tee is not None:
            self._tee.release_followers()

    def _index_live(self, events: Sequence[Event]) -> None:
        # The stream names its response (Responses' response.created): a client can resume
        # it by that id while it is live, until this exchange ends (then by its entry).
        live, adapter, stack = self._flight, self.decision.adapter, self._stack
        assert live is not None and isinstance(adapter, ResumingAdapter) and stack is not None
        response_id = adapter.meta(events).get("response_id")
        if not response_id or not resumable(adapter, events):
            return
        decision = self.decision
        scope = _alias_scope_of(decision)
        alias = alias_key(adapter.name, decision.tenant, response_id, decision.origin, scope)
        index = self._service.live_responses
        index[alias] = live
        lease, tee, cache = self._lead, self._tee, self._cache
        if lease is not None and tee is not None and cache is not None:
            # Other processes resume it from this producer's own fan-out channel (key and
            # token): not from whoever holds the key's lease when they ask — a producer that
            # took over, or the next request's after this one failed, asked the upstream
            # again and streams another response, whose end is no suffix of this one. (The
            # channel outlives the stream by a minute: a resume just after the end reads it.)
            name = live_alias_key(
                adapter.name, decision.tenant, response_id, decision.origin, scope
            )
            until = time.time() + _LIVE_ALIAS_TTL
            target = live_alias_target(self.key, lease.token)
            tee.later(lambda: cache.alias(name, target, expires_at=until))
            self._live_alias = (name, target)

        def unindex() -> None:
            if index.get(alias) is live:
                del index[alias]

        # Dropped once the stored entry is indexed (__aexit__): a resume in between would
        # find neither, and go to the upstream.
        self._unindex = unindex


#: Why a generic answer (a stream or a JSON body) whose body ends only as its connection
#: closes is neither shared nor stored: a cut looks like its end (helper-132: two of five
#: events stored, replayed).
_END_UNTOLD = "its body ends only as the upstream closes its connection (a cut looks the same)"


def _not_shared_because(status: int, encoding: str, tenant: str) -> str:
    """Why a response with this status and ``content-encoding`` is not passed on to the
    identical requests following it under the tenant scope ``tenant`` ("": it is)."""
    if encoding:
        # Encoded as this request asked (its Accept-Encoding): an identical request need not
        # have asked the same, and may not read it.
        return f"the response is encoded ({encoding})"
    if status == PARTIAL_CONTENT:
        return f"the upstream answered {status}: a part, for this request's Range"
    if not 200 <= status < 300 and not credential_scoped(tenant):
        # An error answers the caller's credentials as much as the request (a rejected or
        # missing key, its rate limit, its organisation's access): under a scope that is not
        # the credentials (tenant="shared", a tenant callable), another caller's — the
        # upstream's text naming the rejected key, the rate limit of another account, to
        # every caller joining a request sent with a bad key (helper-106).
        return f"the upstream answered {status} to this caller's credentials"
    return ""


def _bounded_ttl(asked: float | None, bound: float | None) -> float | None:
    """The lifetime of the entry a request stores: what it asked for (``x-sse-cache-ttl``),
    at most the ``ttl`` the cache was given — the operator's bound on how long an answer
    outlives, say, a revoked key (a client's one year overrode a 60 s ``ttl``; helper-156)."""
    if asked is None:
        return None  # (the cache's own ttl)
    return asked if bound is None else min(asked, bound)


def _alias_scope_of(decision: Decision) -> str:
    """:func:`~sse_cache.http._resume.alias_scope` of the request ``decision`` answers: the
    prefix of its path (from its route: ``METHOD origin/path?query``) before its last
    ``/responses`` (a prefix may hold one: ``/responses-team/v1``; helper-123) and its key
    headers."""
    # (A route ends "?query" and, for a query not plain, " as sent: ..."; a path has no space.)
    path = decision.route.partition(" ")[2][len(decision.origin) :].partition("?")[0]
    path = path.partition(" ")[0]
    cut = path.rfind("/responses")
    return alias_scope(path[:cut] if cut >= 0 else path, decision.key_headers)

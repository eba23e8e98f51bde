"""The HTTP-level cache shared by every integration (ASGI middleware, httpx/httpx2 transports).

An integration knows how to read a request and write a response in its framework; everything
else lives here, once: which requests are cached (:class:`~sse_cache.policy.CachePolicy`),
their keys, the lookup, answering a hit (replayed, synthesised or recovered), joining a live
identical stream, and recording a miss's response as it passes through (:class:`ResponseTee`).

Usage by an integration::

    decision = service.decide(method, path, headers, body)   # ConfigError -> 400
    async with service.exchange(decision) as ex:
        if ex.answer is not None:         # hit or shared: no upstream call
            send(ex.answer.status, ex.answer.headers, ex.answer.chunks)
        else:                             # miss / bypass / refresh: call the upstream
            tee = await ex.tee(status, response_headers)   # None: not recordable
            for chunk in upstream_body:   # deliver each chunk first, then record it
                send(chunk); tee and tee.feed(chunk)
            tee and tee.end()             # the upstream body ended by itself
    # leaving the block stores what completed (a tee that did not end stores nothing)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Protocol

import anyio
import msgspec

from ._decoded import DecodedEntries
from .codec import MsgpackCodec, WireEntry
from .engine import (
    DEFAULT_DECODED_CACHE_BYTES,
    CachedStream,
    CacheStatus,
    Hook,
    LiveRecording,
    Notice,
    SharedStreamAborted,
    StreamCache,
    emit,
)
from .entry import Entry
from .errors import ConfigError, SSEError
from .events import Event, SSEParser, serialize_sse
from .keys import CacheRequest, DefaultKeyer
from .pacing import Pacing
from .policy import CachePolicy, Decision
from .protocols import (
    Backend,
    CacheKeyer,
    EventCodec,
    FanoutBackend,
    LockingBackend,
    Outcome,
    StreamAdapter,
)
from .recorder import DEFAULT_MAX_ENTRY_BYTES

__all__ = ["Answer", "CacheService", "Exchange", "ResponseTee"]

logger = logging.getLogger("sse_cache")

SSE_TYPE = "text/event-stream"
JSON_TYPE = "application/json"
# An instant replay is written in chunks of about this size: one write per event costs
# several times more than the rest of a replay together (LIMITS.md).
_CHUNK_BYTES = 64 * 1024
_BATCH_EVENTS = 256
_SSE_HEADERS = [("cache-control", "no-cache")]


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """A response the cache gives without calling the upstream."""

    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterator[bytes]


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class CacheService:
    """Policy + one :class:`StreamCache` per adapter, all on one backend.

    ``backend`` is a Backend or a URL (then the service owns and closes it). ``routes``,
    ``tenant``, ``max_body_bytes``: see :class:`CachePolicy`. ``ttl``, ``max_entry_bytes``,
    ``pacing``, ``hooks``, ``backend_timeout``, ``single_flight``, ``keyer``, ``codec``,
    ``decoded_cache_bytes`` (one budget shared by every route's cache): see
    :class:`StreamCache`.
    """

    def __init__(
        self,
        backend: Backend | str,
        *,
        routes: Mapping[str, StreamAdapter | Callable[[], StreamAdapter]] | None = None,
        tenant: str | Callable[[Mapping[str, str]], str] | None = None,
        ttl: float | None = None,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_body_bytes: int = 4 * 1024 * 1024,
        pacing: str | float | Pacing = "instant",
        hooks: Iterable[Hook] = (),
        backend_timeout: float = 2.0,
        single_flight: bool = True,
        keyer: CacheKeyer | None = None,
        codec: EventCodec | None = None,
        cross_process: bool = False,
        cross_process_wait: float = 60.0,
        decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES,
    ) -> None:
        from .backends import open_backend  # the registry, not a concrete backend

        self.backend, self._owns_backend = open_backend(backend)
        # Cross-process single-flight needs a lock and live fan-out (Redis offers both).
        backend_ = self.backend
        self.fanout: _FanoutBackend | None = None
        if cross_process:
            if not (isinstance(backend_, LockingBackend) and isinstance(backend_, FanoutBackend)):
                raise ConfigError(
                    f"cross_process needs a backend with locks and fan-out (Redis), "
                    f"not {type(backend_).__name__}"
                )
            self.fanout = backend_
        self.cross_process_wait = cross_process_wait
        self.policy = CachePolicy(routes, tenant=tenant, max_body_bytes=max_body_bytes)
        hooks = self.hooks = tuple(hooks)
        keyer = keyer or DefaultKeyer()
        codec = codec or MsgpackCodec()
        decoded: DecodedEntries[Entry | WireEntry] = DecodedEntries(decoded_cache_bytes)
        self._caches: dict[int, StreamCache] = {
            id(adapter): StreamCache(
                self.backend,
                adapter,
                keyer=keyer,
                codec=codec,
                ttl=ttl,
                max_entry_bytes=max_entry_bytes,
                pacing=pacing,
                hooks=hooks,
                backend_timeout=backend_timeout,
                single_flight=single_flight,
                decoded_cache_bytes=decoded,  # one budget for all the schemas
            )
            for adapter in self.policy.routes.values()
        }
        self.ttl = ttl

    def cache_for(self, adapter: StreamAdapter) -> StreamCache:
        return self._caches[id(adapter)]

    async def aclose(self) -> None:
        if self._owns_backend:
            await self.backend.aclose()

    def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        query: str = "",
    ) -> Decision:
        """The policy's decision for a request (see :meth:`CachePolicy.decide`). Raises
        :class:`~sse_cache.errors.ConfigError` for an invalid control header (answer 400)."""
        try:
            return self.policy.decide(method, path, headers, body, query)
        except ConfigError as exc:
            emit(self.hooks, Notice(kind="invalid", key="", detail=str(exc)))
            raise

    @asynccontextmanager
    async def exchange(
        self, decision: Decision, *, publish: bool = False
    ) -> AsyncIterator[Exchange]:
        """One request/response, for a :meth:`decide` decision. Leaving the block normally
        stores what completed; leaving it with an exception stores nothing.

        ``publish``: the integration calls :meth:`ResponseTee.flush` after each chunk, so a
        miss can lead a cross-process single-flight (``cross_process=True``)."""
        ex = Exchange(self, decision)
        try:
            async with AsyncExitStack() as stack:
                if decision.adapter is not None:
                    await ex._look(stack, publish=publish)
                elif decision.route:
                    emit(self.hooks, Notice(kind="bypass", key="", detail=decision.reason))
                yield ex
                tee = ex._tee
                if tee is not None:
                    if not tee.ended:
                        tee.abort("the response did not complete")
                    await tee.close()
            await ex._index()
        finally:
            await ex._end_lead()

    async def resume(
        self, method: str, path: str, query: str, headers: Mapping[str, str]
    ) -> Answer | None:
        """Answer ``GET .../responses/{id}?stream=true&starting_after=N`` from the cache when
        that response's stream is stored (for the same tenant): the events after sequence
        number N. None when it is not such a request or the stream is not cached (then the
        request goes upstream)."""
        match = _RESUME.search(path)
        if method != "GET" or match is None:
            return None
        params = urllib.parse.parse_qs(query)
        if params.get("stream", [""])[-1].lower() != "true":
            return None
        try:
            after = int(params.get("starting_after", ["-1"])[-1])
        except ValueError:
            return None  # the upstream answers the malformed request
        matched = self.policy.match("POST", path[: match.start()] + "/responses")
        if matched is None:
            return None
        _, adapter = matched
        events_after = getattr(adapter, "events_after", None)
        if events_after is None:
            return None
        cache = self.cache_for(adapter)
        tenant = self.policy.tenant_of(headers)
        if tenant is None:
            return None
        key = await cache.resolve(alias_key(adapter.name, tenant, match["id"]))
        if key is None:
            return None
        entry = await cache.lookup(key)
        # The index may outlive its entry (a refresh or an eviction stores another answer
        # under the key): only the stream of that very response is resumed.
        if entry is None or entry.events is None or entry.meta.get("response_id") != match["id"]:
            return None
        events = events_after(entry.events, after)
        base = [("content-type", entry.content_type), *_SSE_HEADERS]
        chunks = _slices(serialize_sse(events))
        duration = entry.events[-1].at if entry.events else 0.0
        return _hit_answer(self.hooks, key, entry, chunks, base, len(events), duration)


class Exchange:
    """The cache's side of one request (see :meth:`CacheService.exchange`)."""

    def __init__(self, service: CacheService, decision: Decision) -> None:
        self.decision = decision
        self.status = CacheStatus.BYPASS
        self.key = ""
        self.answer: Answer | None = None
        self._service = service
        self._cache: StreamCache | None = None
        self._stack: AsyncExitStack | None = None
        self._tee: ResponseTee | None = None
        self._live: LiveRecording | None = None
        self._lead: str | None = None  # the lock token while leading a cross-process flight

    @property
    def cacheable(self) -> bool:
        return self.decision.adapter is not None

    def headers(self) -> list[tuple[str, str]]:
        """The ``x-sse-cache`` headers for this request's response (none when the route is
        not cached at all)."""
        if self.decision.adapter is None:
            return [("x-sse-cache", CacheStatus.BYPASS.value)] if self.decision.route else []
        out = [("x-sse-cache", self.status.value)]
        if self.key:
            out.append(("x-sse-cache-key", self.key))
        return out

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
            emit(self._service.hooks, Notice(kind=self.status.value, key=self.key))
            return
        self.status = CacheStatus.MISS
        if decision.streaming and (shared := await stack.enter_async_context(cache.join(self.key))):
            self.status = CacheStatus.SHARED
            self.answer = Answer(
                status=200,
                headers=[
                    ("content-type", SSE_TYPE),
                    ("cache-control", "no-cache"),
                    *self.headers(),
                ],
                chunks=self._counted(_stream_chunks(shared)),
            )
            return
        pacing = controls.pacing or cache.pacing
        if (pending := cache.pending(self.key)) is not None:
            # A stream that just completed and is being stored: answer from it.
            self.answer = self._answer_entry(cache, pending, pacing)
        elif decision.streaming and pacing.instant and decision.last_event_id is None:
            # The fast path: a recorded stream goes out as its stored SSE bytes.
            wire = await cache.lookup_wire(self.key, max_age=controls.max_age)
            if wire is not None:
                self.answer = self._answer_wire(cache, wire)
        else:
            entry = await cache.lookup(self.key, max_age=controls.max_age)
            if entry is not None:
                self.answer = self._answer_entry(cache, entry, pacing)
        if self.answer is not None:
            self.status = CacheStatus.HIT
            return
        fanout = self._service.fanout
        leads = fanout is not None and publish and decision.streaming and controls.store
        if leads and fanout is not None and await self._lead_or_follow(fanout):
            return
        emit(self._service.hooks, Notice(kind="miss", key=self.key))

    # -- cross-process single-flight ---------------------------------------------------------

    async def _lead_or_follow(self, fanout: _FanoutBackend) -> bool:
        """Take the key's lock (then this request leads: its chunks are published as they
        pass) or, when another process holds it, follow that process's live stream. True when
        this request is answered by following."""
        channel = _CHANNEL + self.key
        token = uuid.uuid4().hex
        try:
            if await fanout.acquire(channel, token, _LOCK_TTL):
                self._lead = token
                return False
        except Exception as exc:  # fail open: no single-flight across processes this time
            logger.warning("sse_cache: cross-process lock failed for %s: %r", self.key, exc)
            return False
        reader = fanout.read(channel, block=self._service.cross_process_wait)
        try:
            first = await reader.__anext__()
        except Exception as exc:  # the leader died, or never published: ask upstream
            logger.info("sse_cache: not following %s: %r", self.key, exc)
            await _aclose(reader)
            return False
        if first[:1] != b"d":
            await _aclose(reader)
            return False  # the leader failed before answering: ask upstream ourselves
        self.status = CacheStatus.SHARED
        emit(self._service.hooks, Notice(kind="shared", key=self.key))
        self.answer = Answer(
            status=200,
            headers=[("content-type", SSE_TYPE), *_SSE_HEADERS, *self.headers()],
            chunks=self._counted(_followed(first, reader)),
        )
        return True

    async def _end_lead(self) -> None:
        token, fanout = self._lead, self._service.fanout
        if token is None or fanout is None:
            return
        self._lead = None
        channel = _CHANNEL + self.key
        tee = self._tee
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FANOUT_CLOSE_TIMEOUT):
            try:
                if tee is not None and tee.ended and not tee.failed:
                    await tee.flush()
                else:
                    await fanout.publish(channel, b"x", ttl=_FANOUT_TTL)
                await fanout.finish(channel, ttl=_FANOUT_TTL)
            except Exception as exc:
                logger.warning("sse_cache: could not end the fan-out of %s: %r", self.key, exc)
            finally:
                with contextlib.suppress(Exception):
                    await fanout.release(channel, token)

    def _answer_wire(self, cache: StreamCache, wire: WireEntry) -> Answer | None:
        if wire.sse is not None:
            chunks = _slices(wire.sse)
            content_type, events, duration = wire.content_type, wire.count, wire.duration
        else:
            assert wire.body is not None
            synthesized = cache.adapter.synthesize(wire.body)
            if synthesized is None:
                return None
            chunks = _slices(serialize_sse(synthesized))
            content_type, events, duration = SSE_TYPE, len(synthesized), 0.0
        return self._answer(
            wire, chunks, [("content-type", content_type), *_SSE_HEADERS], events, duration
        )

    def _answer_entry(self, cache: StreamCache, entry: Entry, pacing: Pacing) -> Answer | None:
        if self.decision.streaming:
            events = cache.events_of(entry)
            if events is None:
                return None
            stream = cache.replay(
                entry, pacing, events=_after_id(events, self.decision.last_event_id)
            )
            content_type = entry.content_type if entry.is_stream else SSE_TYPE
            base = [("content-type", content_type), *_SSE_HEADERS]
            chunks = _stream_chunks(stream)
        else:
            body = cache.body_of(entry)
            if body is None:
                return None
            content_type = JSON_TYPE if entry.is_stream else entry.content_type
            base = [("content-type", content_type), ("content-length", str(len(body)))]
            chunks = _one(body)
        events = entry.events or ()
        return self._answer(entry, chunks, base, len(events), events[-1].at if events else 0.0)

    def _answer(
        self,
        entry: Entry | WireEntry,
        chunks: AsyncIterator[bytes],
        base: list[tuple[str, str]],
        events: int,
        duration: float,
    ) -> Answer:
        return _hit_answer(self._service.hooks, self.key, entry, chunks, base, events, duration)

    async def _index(self) -> None:
        # A stored stream that names its response (OpenAI Responses) is indexed by that id,
        # per tenant, so that GET /v1/responses/{id}?stream=true can resume it.
        live, cache = self._live, self._cache
        if live is None or cache is None or not live.stored or live.entry is None:
            return
        response_id = live.entry.meta.get("response_id")
        if response_id:
            alias = alias_key(cache.adapter.name, self.decision.tenant, response_id)
            await cache.alias(alias, self.key, expires_at=live.entry.expires_at)

    def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return _counted(self._service.hooks, self.key, chunks)

    async def tee(self, status: int, headers: Iterable[tuple[str, str]]) -> ResponseTee | None:
        """Start recording the upstream's response (after its status and headers arrived).
        None when it will not be stored: not cacheable, ``no-store``, a non-2xx status, a
        compressed body, or a content type other than SSE for a stream / JSON otherwise."""
        if self.decision.adapter is None or self.answer is not None:
            return None
        assert self._cache is not None and self._stack is not None
        controls = self.decision.controls
        if not controls.store or self.decision.last_event_id is not None:
            # A reconnecting client may get only the rest of a stream: never store that.
            return None
        lowered = {k.lower(): v for k, v in headers}
        reason = ""
        media = _media_type(lowered.get("content-type", ""))
        if not 200 <= status < 300:
            reason = f"upstream status {status}"
        elif lowered.get("content-encoding", "identity").lower() not in ("", "identity"):
            reason = "compressed response body"
        elif media not in (SSE_TYPE, JSON_TYPE):
            reason = f"content type {media or 'missing'}"
        if reason:
            logger.debug("sse_cache: not recording %s: %s", self.key, reason)
            return None
        content_type = lowered.get("content-type", media)
        if media == SSE_TYPE:
            live = await self._stack.enter_async_context(
                self._cache.recording(
                    self.key,
                    ttl=controls.ttl,
                    share=self.status is CacheStatus.MISS and self.decision.streaming,
                )
            )
            live.respond(status, content_type)
            self._live = live
            # Schemas with a completing event may be stored when the client stops right after
            # it (see ResponseTee.stop); generic SSE needs the real end of the body.
            completing = self._cache.adapter.end_outcome() is not Outcome.COMPLETE
            self._tee = ResponseTee(live=live, completing=completing)
            if self._lead is not None and self._service.fanout is not None:
                self._tee._publish_to(self._service.fanout, _CHANNEL + self.key)
            return self._tee
        self._tee = ResponseTee(
            cache=self._cache,
            key=self.key,
            ttl=controls.ttl,
            content_type=content_type,
            status=status,
            limit=self._cache.max_entry_bytes,
        )
        return self._tee


class ResponseTee:
    """Records a miss's response body while it passes through, unchanged, to the client.

    Feed it the body's chunks *after* delivering them; call :meth:`end` when the upstream body
    ended by itself and :meth:`abort` when it broke or the client left. An SSE body is parsed
    and recorded event by event (identical requests can join it live); a JSON body is kept
    whole and stored by :meth:`close` if the adapter accepts it.
    """

    def __init__(
        self,
        *,
        live: LiveRecording | None = None,
        cache: StreamCache | None = None,
        key: str = "",
        ttl: float | None = None,
        content_type: str = JSON_TYPE,
        status: int = 200,
        limit: int = DEFAULT_MAX_ENTRY_BYTES,
        completing: bool = False,
    ) -> None:
        self._live = live
        self._parser = SSEParser() if live is not None else None
        self._has_completing_event = completing
        self._cache = cache
        self._key = key
        self._ttl = ttl
        self._content_type = content_type
        self._status = status
        self._limit = limit
        self._body: list[bytes] = []
        self._size = 0
        self._failed = ""
        self.ended = False
        self._fanout: _FanoutBackend | None = None
        self._channel = ""
        self._outbox: list[bytes] = []

    @property
    def failed(self) -> bool:
        return bool(self._failed)

    def _publish_to(self, fanout: _FanoutBackend, channel: str) -> None:
        self._fanout, self._channel = fanout, channel

    async def flush(self) -> None:
        """Publish the chunks fed since the last flush to processes following this stream
        (cross-process single-flight); nothing to do otherwise. Fail-open."""
        if self._fanout is None or not self._outbox:
            return
        data = b"d" + b"".join(self._outbox)
        self._outbox = []
        try:
            await self._fanout.publish(self._channel, data, ttl=_FANOUT_TTL)
        except Exception as exc:
            logger.warning("sse_cache: fan-out publish failed, followers will retry: %r", exc)
            self._fanout = None

    def feed(self, chunk: bytes) -> None:
        if self._failed or not chunk:
            return
        if self._fanout is not None:
            self._outbox.append(chunk)
        if self._parser is not None:
            assert self._live is not None
            try:
                events = self._parser.feed(chunk)
            except SSEError as exc:
                self.abort(f"upstream sent invalid SSE: {exc}")
                return
            if events:
                self._live.add(events)
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self.abort(f"response body exceeds max_entry_bytes={self._limit}")
            return
        self._body.append(chunk)

    def abort(self, reason: str) -> None:
        """The body will not complete (upstream broke, client left): store nothing."""
        if not self._failed:
            self._failed = reason
            self._body = []
            if self._live is not None:
                self._live.fail(reason)

    def stop(self) -> None:
        """The client stopped reading before the body ended. What it received is kept if it
        already holds the schema's completing event (the openai SDK stops reading at chat's
        ``data: [DONE]`` without waiting for the end of the body); anything else is an
        early close, and nothing is stored."""
        if self.ended or self._failed:
            return
        if self._live is not None and self._has_completing_event:
            self.end()  # the recorder judges: without the completing event, not stored
        else:
            self.abort("the client closed the response before it ended")

    def end(self) -> None:
        """The upstream body ended by itself."""
        self.ended = True
        if self._parser is not None:
            self._parser.close()
            if self._parser.discarded:
                # WHATWG: an unterminated last event is never dispatched; the stream did
                # not end cleanly, whatever the adapter would have said.
                self.abort("the stream ended inside an event (no final blank line)")
            elif self._live is not None and not self._failed:
                self._live.end()

    async def close(self) -> bool:
        """Store a completed JSON body (called when the exchange ends; SSE streams are
        stored by their recording). True when something was stored."""
        if self._live is not None or self._failed or not self.ended:
            return False
        assert self._cache is not None
        body = b"".join(self._body)
        if self._cache.adapter.body_outcome(body) is not Outcome.COMPLETE:
            return False
        entry = Entry(
            schema=self._cache.adapter.name,
            created_at=time.time(),
            status=self._status,
            content_type=self._content_type,
            body=body,
        )
        return await self._cache.store(self._key, entry, ttl=self._ttl)


_CHANNEL = "sf:"
_LOCK_TTL = 600.0  # longer than any stream; released as soon as the leader is done
_FANOUT_TTL = 60.0  # a finished channel stays readable this long for late followers
_FANOUT_CLOSE_TIMEOUT = 5.0


class _FanoutBackend(LockingBackend, FanoutBackend, Protocol):
    """A backend with both capabilities cross-process single-flight needs."""


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _followed(first: bytes, reader: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # Messages are b"d" + chunk bytes, or b"x" when the leader's stream failed.
    try:
        yield first[1:]
        async for message in reader:
            if message[:1] != b"d":
                raise SharedStreamAborted("the stream this request followed failed")
            yield message[1:]
    finally:
        await _aclose(reader)


def _hit_answer(
    hooks: Iterable[Hook],
    key: str,
    entry: Entry | WireEntry,
    chunks: AsyncIterator[bytes],
    base: list[tuple[str, str]],
    events: int,
    duration: float,
) -> Answer:
    """A hit: ``base`` headers plus ``x-sse-cache``, the key, ``age`` and the remaining TTL;
    the hit and (once sent) the bytes replayed are reported to ``hooks``."""
    now = time.time()
    headers = [*base, ("x-sse-cache", CacheStatus.HIT.value), ("x-sse-cache-key", key)]
    headers.append(("age", str(max(0, int(now - entry.created_at)))))
    if entry.expires_at is not None:
        headers.append(("x-sse-cache-ttl", str(max(0, int(entry.expires_at - now)))))
    emit(hooks, Notice(kind="hit", key=key, events=events, seconds=duration))
    return Answer(status=200, headers=headers, chunks=_counted(hooks, key, chunks))


async def _counted(
    hooks: Iterable[Hook], key: str, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    sent = 0
    try:
        async with aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                sent += len(chunk)
                yield chunk
    finally:
        emit(hooks, Notice(kind="replayed", key=key, bytes=sent))


_RESUME = re.compile(r"/responses/(?P<id>[A-Za-z0-9_.:-]{1,200})/?$")


def alias_key(schema: str, tenant: str, name: str) -> str:
    """The backend key under which the key of an entry named ``name`` (a response id) is
    kept, per schema and tenant."""
    h = hashlib.blake2b(digest_size=32)
    for part in ("sse-cache/alias", schema, tenant, name):
        raw = part.encode()
        h.update(len(raw).to_bytes(4, "big") + raw)
    return "alias-" + h.hexdigest()


def _after_id(events: Sequence[Event], last_id: str | None) -> Sequence[Event]:
    # A reconnecting client (Last-Event-ID) gets what came after that event; an id that is
    # not in the stream means it saw another stream: it gets all of this one.
    if last_id is not None:
        for i, event in enumerate(events):
            if event.id == last_id:
                return events[i + 1 :]
    return events


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _slices(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), _CHUNK_BYTES):
        yield data[start : start + _CHUNK_BYTES]


async def _stream_chunks(stream: CachedStream) -> AsyncIterator[bytes]:
    # Instant replays come in large batches: coalesce them into ~64 KiB writes. Paced replays
    # and live streams come as they are due and are written at once.
    pending: list[Event] = []
    size = 0
    batches = stream.batches(_BATCH_EVENTS)
    async with aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            pending += batch
            size += sum(len(e.data) for e in batch)
            if size >= _CHUNK_BYTES or len(batch) < _BATCH_EVENTS:
                yield serialize_sse(pending)
                pending, size = [], 0
    if pending:
        yield serialize_sse(pending)

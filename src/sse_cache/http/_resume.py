"""Resuming a Responses stream by its id (``GET .../responses/{id}?stream=true&starting_after=N``)
or a stream by ``Last-Event-ID``: from the live stream while it is produced — in this process,
or by another through its fan-out channel — and from the stored entry once it is stored. The
entry points are :meth:`CacheService.resume`, :meth:`~CacheService.resume_live` and
:meth:`~CacheService.resume_remote`."""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from .._notices import Hook, Notice, emit
from ..engine import StreamCache
from ..events import Event
from ..flight import Cursor, Flight, Head, LiveFlight, SharedStreamAborted
from ..keys import ALIAS_PREFIX, parse_live_alias_target
from ..protocols import ResumingAdapter, StreamAdapter
from ._answers import (
    _SSE_HEADERS,
    Answer,
    _After,
    _as_shared,
    _Counted,
    _hit_answer,
    _without_length,
    recorded_after,
)
from ._fanout import (
    _CHANNEL,
    TimedFanout,
    _channel,
    _FanoutBackend,
    _follow_channel,
    _open_channel,
    _Presence,
)
from .policy import CachePolicy


class _Service(Protocol):
    """What resuming needs of the :class:`~sse_cache.http.service.CacheService`."""

    policy: CachePolicy
    live_responses: dict[str, LiveFlight[bytes]]
    hooks: tuple[Hook, ...]
    fanout: _FanoutBackend | None
    cross_process_lease: float

    def cache_for(self, adapter: StreamAdapter) -> StreamCache: ...


logger = logging.getLogger("sse_cache")

_RESUME = re.compile(r"/responses/(?P<id>[A-Za-z0-9_.:-]{1,200})/?$")
_SEQUENCE_NUMBER = re.compile(r"-?[0-9]{1,18}")


def alias_key(schema: str, tenant: str, name: str, origin: str = "", scope: str = "") -> str:
    """The backend key under which the key of an entry named ``name`` (a response id) is
    kept, per schema, tenant, server (``origin``, as the entry's key holds it: two servers
    may give out the same id) and ``scope`` (:func:`alias_scope`)."""
    h = hashlib.blake2b(digest_size=32)
    # (The origin and scope only when there are: the aliases of a cache without are unchanged.)
    parts = ("sse-cache/alias", schema, tenant, name, *((origin,) if origin or scope else ()))
    for part in (*parts, *((scope,) if scope else ())):
        raw = part.encode()
        h.update(len(raw).to_bytes(4, "big") + raw)
    return ALIAS_PREFIX + h.hexdigest()


def live_alias_key(schema: str, tenant: str, name: str, origin: str = "", scope: str = "") -> str:
    """The backend key under which the producer of a stream named ``name`` is kept while
    another process produces it (cross-process resume), per schema, tenant, server and
    scope: its :func:`~sse_cache.keys.live_alias_target`."""
    return alias_key(schema + "/live", tenant, name, origin, scope)


def alias_scope(prefix: str, key_headers: Mapping[str, str]) -> str:
    """What else an answer's key held that a resume by response id must match: the path
    before ``/responses`` (``prefix``: a gateway's ``/team-a/v1`` and ``/team-b/v1`` answer
    for other accounts) and the request headers that key it (an ``openai-organization`` or
    ``openai-project`` of one API key): else a resume in another organisation, project or
    prefix was answered from this one's stream, where the upstream answers 404 (helper-88).
    ``""`` for the plain ``/v1`` with no such header (the aliases of earlier versions); the
    empty prefix (``/responses`` itself) is another scope."""
    if not key_headers:
        if prefix == "/v1":
            return ""
        if not prefix:
            return "\0"
    return "\0".join((prefix, *(f"{k}={v}" for k, v in sorted(key_headers.items()))))


def resumable(adapter: ResumingAdapter, events: Sequence[Event]) -> bool:
    """Whether a stream beginning with ``events`` can be resumed by position: the adapter
    gives them back when asked for all of it (``starting_after=-1``). A Responses stream
    without sequence numbers (the API's own, before 2025-04) cannot: every resume of it was
    answered with an empty stream, as a hit (helper-109); the upstream answers those."""
    # (Once one event is given back, every one after it is: the first one tells.)
    return bool(adapter.events_after(events[:1], -1))


async def resume(
    service: _Service,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    origin: str | None = None,
) -> Answer | None:
    """:meth:`CacheService.resume`."""
    match = _RESUME.search(path)
    if method != "GET" or match is None:
        return None
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if params.get("stream", [""])[-1].lower() != "true":
        return None
    given = params.get("starting_after", ["-1"])
    if len(given) != 1 or not _SEQUENCE_NUMBER.fullmatch(given[0]):
        # The upstream answers what is not one plain integer (empty, repeated, "3_0", "+3",
        # " 3", other scripts' digits: int() would take them, the API may not).
        return None
    after = int(given[0])
    matched = service.policy.match("POST", path[: match.start()] + "/responses")
    if matched is None:
        return None
    _, adapter = matched
    if not isinstance(adapter, ResumingAdapter):
        return None
    events_after = adapter.events_after
    cache = service.cache_for(adapter)
    tenant = service.policy.tenant_of(headers, query)  # (the ?key= credential too, as a POST)
    if tenant is None:
        return None

    def had(event: Event) -> bool:
        return not events_after([event], after)  # the client has events up to N

    where = service.policy.origin if origin is None else origin
    scope = alias_scope(path[: match.start()], service.policy.key_headers_of(adapter, headers))
    alias = alias_key(adapter.name, tenant, match["id"], where, scope)
    live_alias = live_alias_key(adapter.name, tenant, match["id"], where, scope)
    live = service.live_responses.get(alias)
    if live is not None and live.entry is None:
        # Still being produced: the events after N from its log, then the rest as it
        # comes. (Once it ended, its entry — stored, or being stored — answers.)
        answer = await resume_live(service, cache, live, had)
        if answer is not None:
            return answer
    entry = live.entry if live is not None else None
    key = live.key if live is not None else await cache.resolve(alias)
    if key is None:
        return await _resume_remote(service, cache, live_alias, had)
    if entry is None:
        entry = await cache.lookup(key)
    # The index may outlive its entry (a refresh or an eviction stores another answer
    # under the key): only the stream of that very response is resumed.
    if entry is None or entry.events is None or entry.meta.get("response_id") != match["id"]:
        return await _resume_remote(service, cache, live_alias, had)
    if not resumable(adapter, entry.events):
        return None
    events = events_after(entry.events, after)
    base = [("content-type", entry.content_type), *_SSE_HEADERS]
    body = recorded_after(entry, events)
    duration = entry.events[-1].at if entry.events else 0.0
    # A resume as from the live stream: a `resumed` notice and a line, not a hit (it is no
    # request on a cached route; helper-101: counted as one, it was a hit in
    # sse_cache_requests_total, no resume, and logged nothing).
    logger.info("sse_cache: %s resumed from its stored entry", key)
    return _hit_answer(service.hooks, key, entry, body, base, len(events), duration, "resumed")


async def _resume_remote(
    service: _Service, cache: StreamCache, live_alias: str, had: Callable[[Event], bool]
) -> Answer | None:
    # Produced by another process (cross-process): its producer indexed its channel (the
    # stream's key and its lease token) under ``live_alias``; resumed from that very channel,
    # also once the producer ended (the channel outlives it by a minute; its entry may not be
    # indexed yet). Never from the key's current holder: that may stream another response.
    if service.fanout is None:
        return None
    target = await cache.resolve(live_alias)
    channel = parse_live_alias_target(target) if target else None
    if channel is None:
        return None  # (none, or written by an older version: the upstream answers)
    key, token = channel
    return await _from_channel(service, cache, key, token, had)


async def resume_remote(
    service: _Service, cache: StreamCache, key: str, had: Callable[[Event], bool | None]
) -> Answer | None:
    """:meth:`CacheService.resume_remote`: from the start of the producer's channel."""
    assert service.fanout is not None
    fanout = TimedFanout(service.fanout, service.hooks)
    try:
        holder = await fanout.holder(_CHANNEL + key)
    except Exception:
        holder = None  # fail open: the upstream answers
    if holder is None:
        return None
    return await _from_channel(service, cache, key, holder, had)


async def _from_channel(
    service: _Service,
    cache: StreamCache,
    key: str,
    token: str,
    had: Callable[[Event], bool | None],
) -> Answer | None:
    """From the start of the fan-out channel of the producer holding (or that held) ``key``'s
    lease as ``token``; None when it cannot be followed."""
    assert service.fanout is not None
    fanout = TimedFanout(service.fanout, service.hooks)
    channel = _channel(key, token)
    presence = _Presence(fanout, key, token, service.cross_process_lease)
    opened = await _open_channel(fanout, channel, service.cross_process_lease, cache, presence)
    if opened is None:
        return None
    head, first, reader = opened
    # A flight of this resumer's own (not offered to others): the channel's copy.
    live: LiveFlight[bytes] = LiveFlight(Flight(key, max_log_bytes=cache.max_entry_bytes))
    cursor = _follow_channel(live, head, first, reader, cache.join_timeout, presence)
    return _resumed(service, cache, live, cursor, head, had)


async def resume_live(
    service: _Service,
    cache: StreamCache,
    live: LiveFlight[bytes],
    had: Callable[[Event], bool | None],
) -> Answer | None:
    """:meth:`CacheService.resume_live`."""
    cursor = live.flight.follow()
    if cursor is None:
        return None
    try:
        head = await live.wait_head(cache.join_timeout)
    except SharedStreamAborted:
        head = None
    if head is None:
        await live.leave(cursor)
        return None
    return _resumed(service, cache, live, cursor, head, had)


def _resumed(
    service: _Service,
    cache: StreamCache,
    live: LiveFlight[bytes],
    cursor: Cursor,
    head: Head,
    had: Callable[[Event], bool | None],
) -> Answer:
    logger.info("sse_cache: %s resumed from its live stream", live.key)
    emit(service.hooks, Notice(kind="resumed", key=live.key))
    chunks = _After(live.chunks(cursor, cache.join_timeout), had)
    return Answer(
        status=head.status,
        headers=_as_shared(_without_length(head.headers)),
        chunks=_Counted(service.hooks, live.key, chunks),
    )

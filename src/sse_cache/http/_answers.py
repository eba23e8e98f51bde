"""Answers the cache gives without calling the upstream: hits (stored bytes, replayed or
synthesised events) and joined or resumed live streams, and their headers and counting."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from functools import partial

import msgspec

from .._notices import CacheStatus, Hook, Notice, emit
from ..codec import WireEntry
from ..engine import CachedStream, StreamCache
from ..entry import Entry
from ..events import BOM, EOL, Event, ResumeCut, event_ends, serialize_sse
from ..pacing import Pacing
from ._wire import close_iterator
from .policy import Decision

logger = logging.getLogger("sse_cache")

SSE_TYPE = "text/event-stream"
JSON_TYPE = "application/json"
# A replay decoded event by event is written in chunks of about this size: one write per
# event costs several times more than the rest of a replay together (docs/benchmarks.md).
# A stored stream's own bytes go out in one write (no copies, one ASGI message).
_CHUNK_BYTES = 64 * 1024
_BATCH_EVENTS = 256
#: A paced replay waiting longer than this for its next event sends an SSE comment (which
#: every client ignores) at this interval: the keep-alive comments of the original are not
#: recorded, and a proxy or client with an idle timeout (nginx's 60 s) cut a paced hit that
#: waited for its first event as long as the original did (helper-89).
PACED_KEEPALIVE_SECONDS = 15.0
_KEEPALIVE = {"lf": b": keep-alive\n\n", "crlf": b": keep-alive\r\n\r\n"}
_SSE_HEADERS = [("cache-control", "no-cache")]
#: On an answer sent over time (paced, or after Last-Event-ID): not held back by nginx.
_NO_BUFFERING = ("x-accel-buffering", "no")


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """A response the cache gives without calling the upstream."""

    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterator[bytes]
    #: The body is all in memory (an instant hit): it can be sent at once, with no need to
    #: watch for the client leaving meanwhile (:meth:`take_body`).
    instant: bool = False

    def take_body(self) -> bytes:
        """All of an :attr:`instant` answer's body at once: what its chunks would give,
        counted as replayed as they would be (its chunks are then at their end)."""
        chunks = self.chunks
        assert isinstance(chunks, _Whole), "not an instant answer"
        return chunks.take()

    async def aclose(self) -> None:
        """Let go of what the answer reads from: the live stream it follows (its place is
        left), its paced replay. Idempotent and quiet (what a stream that failed raises on
        closing is that stream's error, already reported). Whoever holds an answer closes
        it, sent or not: an :class:`~sse_cache.http.Exchange` its own as it is left, the
        integration a :meth:`~sse_cache.http.CacheService.resume`'s (``async with
        contextlib.aclosing(answer)``), which no exchange holds."""
        if not self.instant:  # (an instant answer's body holds nothing else)
            await close_iterator(self.chunks, quiet=True)


def _as_shared(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A producer's response headers as a follower gets them: ``x-sse-cache: shared``."""
    out = [(k, v) for k, v in headers if k.lower() != "x-sse-cache"]
    out.append(("x-sse-cache", CacheStatus.SHARED.value))
    return out


def _without_length(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A producer's response headers for a reader sent only part of its body (a resume):
    the upstream's ``content-length`` counts the whole of it."""
    return [(k, v) for k, v in headers if k.lower() != "content-length"]


def _hit_answer(
    hooks: Iterable[Hook],
    key: str,
    entry: Entry | WireEntry,
    body: bytes | AsyncIterator[bytes],
    base: list[tuple[str, str]],
    events: int,
    duration: float,
    notice: str = "hit",
) -> Answer:
    """A hit: ``base`` headers plus ``x-sse-cache``, the key, ``age`` and the remaining TTL;
    the hit (a ``notice`` of that kind: ``resumed`` for a stream resumed by its response id,
    which is no request on a cached route) and, once sent, the bytes replayed are reported
    to ``hooks``. ``body``: all of it (an instant answer, which says its length), or its
    chunks as they are due."""
    now = time.time()
    status = entry.status  # the upstream's own (any 2xx but 206 is stored)
    headers = base
    if isinstance(body, bytes) and status != 204:
        # The length is known: a client can tell a cut answer from a whole one without the
        # chunked framing (an HTTP/1.0 client, which has none, at all), and the server frames
        # no chunks. (A 204 has no body, and must not say a length.)
        headers = [*base, ("content-length", str(len(body)))]
    headers = [*headers, ("x-sse-cache", CacheStatus.HIT.value), ("x-sse-cache-key", key)]
    headers.append(("age", str(max(0, int(now - entry.created_at)))))
    if entry.expires_at is not None:
        headers.append(("x-sse-cache-ttl", str(max(0, int(entry.expires_at - now)))))
    emit(hooks, Notice(kind=notice, key=key, events=events, seconds=duration))
    if isinstance(body, bytes):
        return Answer(status=status, headers=headers, chunks=_Whole(hooks, key, body), instant=True)
    return Answer(status=status, headers=headers, chunks=_Counted(hooks, key, body))


class _Whole:
    """The chunks of an instant answer: its one body, counted as replayed once taken or
    closed. (A class, not two nested async generators: this is every hot hit's path.)"""

    def __init__(self, hooks: Iterable[Hook], key: str, body: bytes) -> None:
        self._hooks = hooks
        self._key = key
        self._body: bytes | None = body
        self._sent = 0
        self._counted = False

    def __aiter__(self) -> _Whole:
        return self

    async def __anext__(self) -> bytes:
        body, self._body = self._body, None
        if body is None:
            self._count()
            raise StopAsyncIteration
        self._sent = len(body)
        return body

    async def aclose(self) -> None:
        self._body = None
        self._count()

    def take(self) -> bytes:
        body, self._body = self._body, None
        if body is not None:
            self._sent = len(body)
        self._count()
        return body or b""

    def _count(self) -> None:
        if not self._counted:
            self._counted = True
            emit(self._hooks, Notice(kind="replayed", key=self._key, bytes=self._sent))


class _Counted:
    """An answer's chunks (``chunks``), the bytes sent reported to ``hooks`` once (a
    ``replayed`` notice) as it ends, fails or is closed; closing it closes ``chunks``.

    A class, not an async generator, as is everything it may read (a live stream's
    :class:`~sse_cache.flight.LiveChunks`, a resume's :class:`_After`): a response dropped
    unclosed drops them together, and the event loop closed each generator in a task of its
    own, at once — the second found the first closing it (a follower, the last reader of
    its stream, waits there for the upstream to close) and logged "aclose(): asynchronous
    generator is already running" (helper-121). Nor would a generator never read have
    closed what it held: the exchange closes its answer as it ends (also one never read),
    and a transport's response whose program dropped it leaves its exchange."""

    __slots__ = ("_chunks", "_done", "_hooks", "_key", "_sent")

    def __init__(self, hooks: Iterable[Hook], key: str, chunks: AsyncIterator[bytes]) -> None:
        self._hooks = hooks
        self._key = key
        self._chunks = chunks
        self._sent = 0
        self._done = False

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._chunks.__anext__()
        except BaseException:  # (its end too)
            await self.aclose()
            raise
        self._sent += len(chunk)
        return chunk

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            await close_iterator(self._chunks)
        finally:
            emit(self._hooks, Notice(kind="replayed", key=self._key, bytes=self._sent))


class _After:
    """A live stream read from its start, cut after the last event the reconnecting client
    had; what follows goes as it comes. Held back only while the point is not known. (A
    class, not an async generator: see :class:`_Counted`.)"""

    __slots__ = ("_chunks", "_cut", "_ended")

    def __init__(self, chunks: AsyncIterator[bytes], had: Callable[[Event], bool | None]) -> None:
        self._chunks = chunks
        self._cut = ResumeCut(had)
        self._ended = False

    def __aiter__(self) -> _After:
        return self

    async def __anext__(self) -> bytes:
        cut = self._cut
        while not self._ended:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:  # the stream ended cleanly
                self._ended = True
                if tail := cut.close():
                    return tail
                break
            except BaseException:
                await self.aclose()
                raise
            if out := cut.feed(chunk):
                return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._ended = True
        await close_iterator(self._chunks)


def _after_id(events: Sequence[Event], last_id: str | None) -> Sequence[Event]:
    # A reconnecting client (Last-Event-ID) gets what came after that event; an id that is
    # not in the stream means it saw another stream: it gets all of this one.
    if last_id is not None:
        for i, event in enumerate(events):
            if event.id == last_id:
                return events[i + 1 :]
    return events


class RecordedBytes:
    """A stream stored as the bytes it came in (:attr:`Entry.wire`), written back event by
    event: :meth:`write` gives the bytes of the next events, from the ``start``-th on (what
    precedes an event goes with it, what follows the last one with the last). :attr:`lead`:
    what must go before anything else, keep-alive comments included (a BOM the stream
    started with: after a comment it would be part of a line)."""

    __slots__ = ("_ends", "_next", "_pos", "_wire", "lead")

    def __init__(self, wire: bytes, start: int = 0) -> None:
        self._wire = wire
        self._ends = event_ends(wire)
        self._next = start
        self._pos = self._ends[start - 1] if start else 0
        self.lead = BOM if start == 0 and wire.startswith(BOM) else b""
        self._pos += len(self.lead)

    def write(self, events: Sequence[Event]) -> bytes:
        upto = self._next + len(events)
        end = self._ends[upto - 1] if upto < len(self._ends) else len(self._wire)
        out = self._wire[self._pos : end]
        self._next, self._pos = upto, end
        return out


def _writer(entry: Entry, start: int, eol: EOL) -> tuple[bytes, Callable[[Sequence[Event]], bytes]]:
    """How a replay of ``entry``'s events from the ``start``-th writes them: what goes first,
    and the bytes of events: its recorded bytes, or the canonical form with ``eol``."""
    if entry.wire is not None:
        recorded = RecordedBytes(entry.wire, start)
        return recorded.lead, recorded.write
    return b"", partial(serialize_sse, eol=eol)


def recorded_after(entry: Entry, events: Sequence[Event]) -> bytes:
    """The bytes of ``events``, the last of a recorded stream's (a resume), as it sent them."""
    assert entry.events is not None
    lead, write = _writer(entry, len(entry.events) - len(events), entry.eol)
    return lead + write(events)


async def _stream_chunks(
    stream: CachedStream, eol: EOL, lead: bytes, write: Callable[[Sequence[Event]], bytes]
) -> AsyncIterator[bytes]:
    # Instant replays come in large batches: coalesce them into ~64 KiB writes. Paced replays
    # and live streams come as they are due and are written at once (a paced one with a
    # keep-alive comment in a long wait). ``eol``: the line ends the stream was recorded
    # with; ``lead`` and ``write``: what goes first, and the bytes of events (see _writer).
    if lead:
        yield lead
    pending: list[Event] = []
    size = 0
    batches = stream.batches(_BATCH_EVENTS, idle_tick=PACED_KEEPALIVE_SECONDS)
    async with aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            if not batch:  # a paced replay's long wait: keep the connection alive
                yield _KEEPALIVE[eol]
                continue
            pending += batch
            size += sum(len(e.data) for e in batch)
            if size >= _CHUNK_BYTES or len(batch) < _BATCH_EVENTS:
                yield write(pending)
                pending, size = [], 0
    # The rest, and what the stream sent after its last event: also with no event left at
    # all (a Last-Event-ID naming the last one), as a resume by id and a live resume send
    # it. (Once the last event was written, this is empty.)
    if out := write(pending):
        yield out


def answer_wire(
    hooks: Iterable[Hook], key: str, cache: StreamCache, wire: WireEntry
) -> Answer | None:
    """A streamed hit straight from the stored bytes (the fast path): the recorded SSE, or
    SSE synthesised from a stored JSON body. None when the body cannot be synthesised."""
    if wire.sse is not None:
        body = wire.sse  # already in the recorded line ends (wire.eol)
        content_type, events, duration = wire.content_type, wire.count, wire.duration
    else:
        assert wire.body is not None
        synthesized = cache.synthesized(wire.body)
        if synthesized is None:
            return None
        body = serialize_sse(synthesized)  # synthesised: canonical LF
        content_type, events, duration = SSE_TYPE, len(synthesized), 0.0
    base = [("content-type", content_type), *_SSE_HEADERS]
    return _hit_answer(hooks, key, wire, body, base, events, duration)


def answer_entry(
    hooks: Iterable[Hook],
    key: str,
    decision: Decision,
    cache: StreamCache,
    entry: Entry,
    pacing: Pacing,
) -> Answer | None:
    """A hit from a decoded entry, in the shape the request asked for: SSE (paced, or after
    ``Last-Event-ID``) for a streamed request, the JSON body otherwise. None when the entry
    cannot give that shape."""
    if decision.streaming:
        events = cache.events_of(entry)
        if events is None:
            return None
        after = _after_id(events, decision.last_event_id)
        stream = cache.replay(entry, pacing, events=after)
        content_type = entry.content_type if entry.is_stream else SSE_TYPE
        # Sent as it is due, not at once: a proxy in front (nginx) must pass it on so.
        base = [("content-type", content_type), *_SSE_HEADERS, _NO_BUFFERING]
        # A recorded stream as it was recorded; a synthesised one in LF.
        eol: EOL = entry.eol if entry.is_stream else "lf"
        lead, write = _writer(entry, len(events) - len(after), eol)
        chunks: bytes | AsyncIterator[bytes] = _stream_chunks(stream, eol, lead, write)
    else:
        body = cache.body_of(entry)
        if body is None:
            return None
        content_type = JSON_TYPE if entry.is_stream else entry.content_type
        base = [("content-type", content_type)]
        chunks = body
    recorded = entry.events or ()
    duration = recorded[-1].at if recorded else 0.0
    return _hit_answer(hooks, key, entry, chunks, base, len(recorded), duration)

"""``ResponseTee``: a miss's response passed on, unchanged, to its client's followers, to other
processes following it, and to the recording."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio

from .._kept_bytes import KeptBytes
from ..engine import (
    DEFAULT_JOIN_TIMEOUT,
    LiveRecording,
    StreamCache,
)
from ..entry import Entry, storable_status
from ..errors import SSEError
from ..events import Event, SSEParser
from ..flight import Cursor, Head, LiveFlight
from ..protocols import (
    Outcome,
)
from ..recorder import DEFAULT_MAX_ENTRY_BYTES
from ._answers import JSON_TYPE, SSE_TYPE
from ._fanout import _encode_head, _Lease

logger = logging.getLogger("sse_cache")


def media_type(headers: Mapping[str, str]) -> str:
    """The media type of a response's ``content-type`` (lower-case names), without its
    parameters."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def encoding_of(headers: Mapping[str, str]) -> str:
    """The content coding of a response (``headers`` with lower-case names): ``""`` for
    none (``identity``), else ``gzip``, ``br``..."""
    coding = headers.get("content-encoding", "").strip().lower()
    return "" if coding == "identity" else coding


def not_recorded_because(
    status: int, headers: Mapping[str, str], media: str, *, wanted: bool
) -> str:
    """Why the upstream's response (``headers`` with lower-case names) is not recorded for
    storage, or ``""`` when it is: only a wanted 2xx (not a 206), uncompressed SSE or JSON
    answer is."""
    if not wanted:
        return "not to be stored"
    if not storable_status(status):
        return f"upstream status {status}"
    if encoding_of(headers):
        return "compressed response body"
    if media not in (SSE_TYPE, JSON_TYPE):
        return f"content type {media or 'missing'}"
    return ""


class ResponseTee:
    """Passes a miss's response on while it goes, unchanged, to the client: to the recording
    and the followers of its live stream (:meth:`relay`), and to other processes following
    it (:meth:`flush`).

    The integration calls :meth:`relay` with each chunk it hands to its client; :meth:`end`
    when the upstream body ended by itself, :meth:`fail` when it broke or the producer
    stopped, :meth:`client_left` when its client went away. An SSE body is parsed and
    recorded event by event; a JSON body is kept whole and stored by :meth:`close` if the
    adapter accepts it. The followers get exactly the bytes the entry will hold (a stream
    stopped at its answer holds nothing after it: see :meth:`relay`); what the recording
    makes of the bytes (an unparsable byte, a body too large to store) never changes what
    they receive.
    """

    def __init__(
        self,
        *,
        flight: LiveFlight[bytes] | None = None,
        recording: LiveRecording | None = None,
        cache: StreamCache | None = None,
        key: str = "",
        ttl: float | None = None,
        content_type: str = JSON_TYPE,
        status: int = 200,
        limit: int = DEFAULT_MAX_ENTRY_BYTES,
        completing: bool = False,
        keep_stream: bool = False,
        began: float | None = None,
    ) -> None:
        self._flight = flight
        self._began = began  # when the request began: not stored over a newer entry
        self._live = recording
        self._parser = SSEParser() if recording is not None else None
        # The stream's own bytes, where the canonical form would not give them back.
        self._kept = KeptBytes(self._parser, limit) if self._parser is not None else None
        self._has_completing_event = completing
        # Of a stream others may follow: the recording is judged as each chunk comes, and
        # once it holds the complete answer (then True) what comes after the answer waits in
        # ``_after_answer`` for the upstream's end (see relay).
        self._answer_recorded = False
        self._after_answer: list[bytes] | None = None
        self._after_size = 0
        self._cache = cache
        self._key = key
        self._ttl = ttl
        self._content_type = content_type
        self._status = status
        self._limit = limit
        self._keep_stream = keep_stream  # a JSON body is not stored over a recorded stream
        self._body: list[bytes] = []
        self._size = 0
        # Nothing is recorded for storage when there is no recording and no JSON body to keep.
        self._failed = "" if (recording is not None or cache is not None) else "not recorded"
        self.ended = False  # the upstream body ended by itself
        self.cut = ""  # why the stream stopped any other way
        self._lease: _Lease | None = None
        self._outbox: list[bytes] = []  # body relayed, not yet published
        self._head_message = b""  # the head, not yet published
        self.publish_failed = False
        #: Why a JSON body was not stored, once :meth:`close` ran ("": stored, or not one).
        self.body_not_stored = ""
        #: Called once with the first events recorded (then dropped): the exchange indexes
        #: a live stream by the response it names.
        self.identify: Callable[[Sequence[Event]], None] | None = None
        self._jobs: list[Callable[[], Awaitable[object]]] = []  # for the next flush
        #: Seconds a stream whose client left is read on for a client that may come back
        #: (the service's ``resume_window``); None: not at all.
        self.resume_window: float | None = None
        #: Seconds a reader of its live stream waits for a piece (the cache's
        #: ``join_timeout``): also the producer's client once it reads on as one (follow_on).
        self.join_timeout = DEFAULT_JOIN_TIMEOUT
        # The followers' end waits for the answer's store: the exchange calls
        # release_followers once it stored (a follower whose client asks again at once finds
        # the answer stored, in this process or another).
        self._followers_end_due = False

    @property
    def failed(self) -> bool:
        """Nothing of this response will be stored."""
        return bool(self._failed)

    def publish_to(self, lease: _Lease, head: Head) -> None:
        """Publish this response to other processes following it (cross-process): it is
        then read to its end even when no one here reads it any more."""
        self._lease = lease
        self._head_message = b"h" + _encode_head(head)
        if self._flight is not None:
            self._flight.remote = True

    async def flush(self) -> None:
        """Publish what was relayed since the last flush to processes following this stream
        (cross-process single-flight); nothing to do otherwise. Fail-open. (The lease's
        fan-out times each publish for the hooks: :class:`~._fanout.TimedFanout`.)"""
        while self._jobs:
            await self._jobs.pop(0)()
        lease = self._lease
        if lease is None or not (self._outbox or self._head_message):
            return
        # The head, if not published yet, then the body relayed since, as one piece. (The
        # head is kept apart: told from the body by its first byte, a body chunk that began
        # with "h" was published as a head, and every follower in another process failed on
        # it; helper-103.)
        messages = [self._head_message] if self._head_message else []
        self._head_message = b""
        if self._outbox:
            messages.append(b"d" + b"".join(self._outbox))
            self._outbox = []
        try:
            # Shielded: a publish cancelled midway (the client left; the proxy stops its
            # app at once) may have reached Redis all the same, and is then counted failed:
            # every follower in another process got the whole answer, then an abort
            # (helper-105: the openai SDK closing a chat stream at [DONE]). Bounded by the
            # lease's length, which is as long as the followers wait for the next message.
            deadline = anyio.current_time() + lease.ttl
            with anyio.CancelScope(shield=True, deadline=deadline) as publishing:
                for message in messages:
                    await lease.publish(message)
            if publishing.cancelled_caught:
                raise TimeoutError(f"publishing took longer than the lease ({lease.ttl} s)")
        except BaseException as exc:
            # The followers in other processes are now missing bytes (also when this publish
            # was cancelled midway): when this response ends they are told it failed (never
            # a clean end), not sent what comes next — nor read on for: the stream is no
            # longer read to its end for them when no one here reads it.
            lease.stalled = None  # (its keeper looks for no one now: helper-119)
            lease.failed()  # (and tells them, once Redis answers)
            self._lease = None
            self.publish_failed = True
            if self._flight is not None:
                self._flight.remote = False
            if not isinstance(exc, Exception):
                raise
            logger.warning("sse_cache: fan-out publish failed, followers will fail: %r", exc)

    async def publish_rest(self) -> bool:
        """At the end of a lead: publish what is left of a response that completed. True when
        all of it reached the channel (followers in other processes then end cleanly), False
        when it did not complete or a publish failed (they must be told it failed)."""
        if self.publish_failed:
            return False
        completed = self.ended and not self.cut
        if not completed:
            # The followers in other processes get what the producer's client got (a
            # provider's error event after the answer among it), then are told it failed;
            # nothing is indexed for a failed stream.
            self._jobs.clear()
        await self.flush()
        return completed and not self.publish_failed

    def later(self, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` at the next :meth:`flush` (backend writes, from a synchronous step)."""
        self._jobs.append(job)

    def relay(self, chunk: bytes) -> None:
        """``chunk`` is being handed to the producer's client: it is recorded, and the
        followers get it too. Nothing once the response stopped or ended: an app stopped
        there may still send what it had read before it noticed (helper-100: the followers
        got bytes past the stored answer, then its clean end).

        What the followers get is what the entry holds, whenever the stream stops. Once the
        recording holds the complete answer, what the upstream sends after it (a comment,
        part of an event it may never finish) waits here: it goes to the followers, and into
        the recording, when the upstream ends its body; if the stream stops before that (the
        producer's client left at the answer, its read was cancelled), the answer is what
        the entry holds and the followers end with — not bytes after it that no hit would
        replay (helper-105, helper-111). A chunk that completes the answer is cut there
        (after its last event)."""
        if not chunk or self.ended or self.cut:
            return
        held = self._after_answer
        if held is not None:
            held.append(chunk)
            self._after_size += len(chunk)
            if self._after_size > self._limit:
                # More after the answer than an entry may hold: the answer is what is kept.
                self.stop("the upstream sent more after the completing event than max_entry_bytes")
            return
        if not self._failed:
            end = self._record(chunk)
            if end is not None:
                rest = chunk[end:]
                chunk = chunk[:end]
                self._after_answer = [rest] if rest else []
                self._after_size = len(rest)
        self._deliver(chunk)

    def _deliver(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._flight is not None:
            self._flight.deliver(chunk)
        if self._lease is not None:
            self._outbox.append(chunk)

    def _record(self, chunk: bytes) -> int | None:
        # Records ``chunk``. Of a stream others may follow whose answer it completes: where
        # in it the answer ends (after its last event; the bytes after it are not recorded).
        parser = self._parser
        if parser is None:
            self._size += len(chunk)
            if self._size > self._limit:
                self.abort(f"response body exceeds max_entry_bytes={self._limit}")
            else:
                self._body.append(chunk)
            return None
        assert self._live is not None and self._kept is not None
        # Judged as it comes only where a follower may end with it (a flight here, or one
        # in other processes); else the recording is judged once, at its end. Not a chunk
        # without a line end, which ends no event: copied at each such piece, a long line
        # (a large response.completed in small pieces) cost time quadratic in its length
        # (helper-112: 545 ms for 4 MiB in 1 KiB pieces).
        before = (
            parser.copy()
            if self._has_completing_event
            and not self._answer_recorded
            and (self._flight is not None or self._lease is not None)
            and (b"\n" in chunk or b"\r" in chunk)
            else None
        )
        try:
            events = parser.feed(chunk)
        except SSEError as exc:
            self.abort(f"upstream sent invalid SSE: {exc}")
            return None
        end: int | None = None
        if events:
            self._live.add(events)
            if before is not None and self._live.recorder.answered_by_last():
                end = before.dispatch_end(chunk, len(events))
                if end < len(chunk):
                    # Recorded up to the answer's end only: what follows is the upstream's
                    # to finish (relay), and a stop leaves it out of the entry.
                    parser.restore(before)
                    parser.feed(chunk[:end])
                    chunk = chunk[:end]
            if self.identify is not None:
                identify, self.identify = self.identify, None
                identify(events)
        if not self._kept.add(chunk, len(events)):
            # (Also with the chunk that completed the answer: nothing will be stored, and
            # the followers read on to the upstream's end, as for any stream too large.)
            self.abort(f"the stream's bytes exceed max_entry_bytes={self._limit}")
            return None
        if end is not None:
            self._answer_recorded = True
        return end

    def abort(self, reason: str) -> None:
        """Store nothing of this response (the followers are not affected)."""
        if not self._failed:
            self._failed = reason
            self._body = []
            self._kept = None
            if self._live is not None:
                self._live.fail(reason)

    def fail(self, reason: str) -> None:
        """The response stopped before the upstream ended it (the upstream broke, the producer
        was cancelled or gave up): store nothing, and every follower's stream fails."""
        if self.ended or self.cut:
            return
        self._after_answer = None  # (the followers' streams fail)
        self.cut = reason
        self.abort(reason)
        if self._flight is not None:
            self._flight.fail(reason)

    def client_left(
        self,
        abandon: Callable[[], Awaitable[None]] | None = None,
        *,
        hold: bool = False,
        keep: Callable[[], bool] | None = None,
    ) -> bool:
        """The producer's client went away before the body ended. True when followers still
        read: then the integration must keep reading the upstream for them (and call
        :meth:`end` or :meth:`fail` as usual), until ``abandon`` is called — when the last
        follower leaves before the end. Otherwise the stream ends here: what the
        client received is stored only if it already holds the schema's completing event
        (the openai SDK stops reading at chat's ``data: [DONE]`` without waiting for the end
        of the body); anything else is an early close, and nothing is stored.

        ``hold``: keep the stream going with no one reading it (a resume window; the
        integration calls :meth:`release` when the window is over). ``keep``: asked when
        the last follower leaves before the end, instead of ``abandon``: True when the
        integration reads the stream on to its end itself (a background completion), which
        new identical requests then join (see :attr:`~sse_cache.flight.LiveFlight.keep`).

        Once what was recorded holds the completing event (the client stopped there, or the
        openai SDK drains a chat body after ``[DONE]`` by cancelling its read), the answer
        is complete whoever still reads: it is stored and the followers' streams end now, as
        by :meth:`stop` — read on, they would wait for the upstream to end its body."""
        if self.ended or self.cut:
            return False
        if self.answered:
            self.stop("the client left after the completing event")
            return False
        flight = self._flight
        if flight is not None and hold:
            flight.held = True
        if flight is not None and (flight.producer_left() or self._lease is not None):
            # Followers here, or possibly in other processes (a producer cannot count those:
            # it reads its upstream to the end for them, and the answer is stored).
            if abandon is not None and self._lease is None:
                flight.abandon = abandon
                flight.keep = keep
            return True
        if self._completable is not None:
            self._finish_recording(cut=True)  # the recorder judges: without the event, not stored
        else:
            self.abort("the client closed the response before it ended")
        self.cut = "the client closed the response before it ended"
        return False

    async def release_after_window(self) -> None:
        """Wait out the resume window of a held stream whose upstream someone else reads on
        (the app, a drain thread), then release it: abandoned if no one reads it by then.
        A stream that ends sooner is released when it ends (its hold is counted against a
        bound: ``max_background``)."""
        live, window = self._flight, self.resume_window
        assert window is not None
        if live is None:
            return
        await live.wait_done(window)
        await live.release()

    async def read_through_window(self) -> None:
        """For a held stream whose upstream was handed over (:meth:`hand_over`): read it
        for its resume window, taking turns with any reader, then :meth:`release` it. (The
        window ends at the first chunk after it: an upstream read is not cut midway.)"""
        live, window = self._flight, self.resume_window
        assert live is not None and window is not None
        deadline = anyio.current_time() + window
        try:
            while live.source is not None and not live.flight.done:
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                if live.pulling:
                    await live.wait(left)
                else:
                    await live.pull()
        except Exception as exc:
            # The upstream failed: the flight has failed with it, for its readers and for
            # anyone resuming. No one awaits this task to be told again.
            logger.debug("sse_cache: the held stream of %s failed: %r", live.key, exc)
        finally:
            await live.release()

    def hand_over(
        self, source: Callable[[], Awaitable[bool]], abandon: Callable[[], Awaitable[None]]
    ) -> None:
        """After :meth:`client_left` said True: followers read the upstream on through
        ``source`` (see :meth:`~sse_cache.flight.LiveFlight.hand_over`)."""
        assert self._flight is not None
        self._flight.hand_over(source, abandon, isolated=True)  # (reads the network)
        if self._lease is not None:
            # Followers in other processes need the rest: read it even if no one here does.
            self._lease.drain(self._flight)

    def watch_client(self, stalled: Callable[[], Awaitable[bool]]) -> None:
        """Followers of this response ask ``stalled`` when they have waited a while for the
        next piece (see :attr:`~sse_cache.flight.LiveFlight.stalled`); so does the keeper
        of its cross-process lease, for the followers in other processes."""
        if self._flight is not None:
            self._flight.stalled = stalled
        if self._lease is not None:
            self._lease.stalled = stalled

    @property
    def read_elsewhere(self) -> bool:
        """Someone besides the producer's client reads this response (a follower here, not
        a place kept for that client) or may (followers in other processes)."""
        followed = self._flight is not None and self._flight.followers > 0
        return followed or self._lease is not None

    def follow_on(self) -> tuple[LiveFlight[bytes], Cursor] | None:
        """The producer's client reads on as a follower, from what it has: its live stream
        and its cursor there (None when the stream failed, or no one else can read it)."""
        flight = self._flight
        if flight is None or self.cut:
            return None
        cursor = flight.flight.follow_on()
        return None if cursor is None else (flight, cursor)

    def end_if_answered(self) -> bool:
        """After :meth:`client_left` said True, once a chunk read on for the followers was
        relayed: if what was recorded is now the complete answer, the stream stops here, as
        by :meth:`stop` (stored, the followers' streams end) — the upstream may take its
        time to end its body after the completing event. True then: the integration closes
        the upstream."""
        if not self._answer_recorded or self._failed or self.ended or self.cut:
            return False
        self.stop("the answer is complete")
        return self.ended

    @property
    def answered(self) -> bool:
        """What was recorded already is the complete answer (the schema's completing event,
        and its whole-stream check passes): stopped now, the response is complete
        (:meth:`stop` stores it and ends the followers' streams). A stream that cannot be
        stored (too large, not to be stored) is never answered: its followers read on."""
        live = self._completable
        return live is not None and live.recorder.holds_answer

    @property
    def _completable(self) -> LiveRecording | None:
        # The recording, when what was read may be the whole answer (recorded, not failed,
        # and the schema has a completing event; the recorder judges whether it is).
        if self._has_completing_event and not self._failed:
            return self._live
        return None

    @property
    def lag_limit(self) -> int | None:
        """How many bytes a reader of this response may fall behind the stream before it is
        cut off (the flight's bound); None when no one else can read it."""
        return self._flight.flight.max_lag_bytes if self._flight is not None else None

    @property
    def followed(self) -> bool:
        """Followers (here, or in other processes) read this response."""
        flight = self._flight
        return flight is not None and (bool(flight.flight.cursors) or flight.remote)

    @property
    def wanted(self) -> bool:
        """Someone (the client, a follower here or, while publishing, in another process)
        still reads this response."""
        if self._lease is not None:
            return True
        flight = self._flight
        if flight is None:
            return not self.cut
        return flight.flight.wanted or flight.held

    def end(self) -> None:
        """The upstream body ended by itself."""
        if self.ended or self.cut:
            return
        held, self._after_answer = self._after_answer, None
        for chunk in held or ():
            # What came after the answer is part of the stream the upstream ended: recorded,
            # and passed on.
            if not self._failed:
                self._record(chunk)
            self._deliver(chunk)
        self.ended = True
        self._end_followers()
        self._finish_recording()

    def stop(self, reason: str) -> None:
        """The response stops here, before the upstream ended it, and will not go on: its
        read was cancelled (the HTTP library closes the upstream then), every reader left,
        or the app was stopped. Complete if what was recorded already holds the schema's
        completing event: then it is stored and the followers' streams end cleanly (what
        follows that event is not part of the answer). Anything else fails, as
        :meth:`fail`."""
        if self.ended or self.cut:
            return
        live = self._completable
        if live is not None:
            # What came after the answer is no part of it: neither recorded nor passed on.
            held, self._after_answer = self._after_answer, None
            failure, told = self._failure_after_answer(held)
            if failure:
                # The followers get what the producer's client got, the failure included
                # (their SDKs raise the provider's error, as its SDK did), then fail.
                self._deliver(told)
                self.fail(failure)
                return
            if self._parser is not None and self._parser.mid_crlf:
                # Stopped between the CR and the LF of a CRLF-framed stream's line end (its
                # chunks came apart there): the followers' streams and the bytes kept would
                # end without the LF its framing owes (helper-100, helper-104). It is added,
                # as the upstream would have sent it.
                self.relay(b"\n")
            self._finish_recording(cut=True)
            if live.entry is not None:
                self.ended = True
                self._end_followers()
                return
        self.fail(reason)

    def _failure_after_answer(self, held: list[bytes] | None) -> tuple[str, bytes]:
        # A whole event after the answer that the schema judges a failure (an ``event:
        # error`` after Anthropic's message_stop): the producer's client got it (its SDK
        # raised, then closed the response), and had the upstream ended its body there the
        # stream would have failed. It fails stopped too (helper-136: the answer was stored,
        # and the followers and every hit after ended cleanly). Part of an event is no event.
        # With the failure: the held bytes up to the end of their last whole event (the
        # followers got none of them; helper-162: theirs failed with no provider's error).
        if not held or self._parser is None or self._live is None:
            return "", b""
        after = b"".join(held)
        try:
            events = self._parser.copy().feed(after)
        except SSEError:
            return "", b""  # (not SSE: no event the schema could judge)
        failure = self._live.recorder.failure_among(events)
        if not failure:
            return "", b""
        return failure, after[: self._parser.dispatch_end(after, len(events))]

    def _end_followers(self) -> None:
        if self._flight is not None:
            self._followers_end_due = True  # (by release_followers, after the store)
            self._flight.settling = True

    def release_followers(self) -> None:
        """The answer was stored (or could not be): the followers' streams end now, if the
        stream ended. (The exchange calls it as it leaves, after the store.)"""
        if self._followers_end_due:
            self._followers_end_due = False
            assert self._flight is not None
            self._flight.end()

    def _finish_recording(self, *, cut: bool = False) -> None:
        # ``cut``: the stream stopped before its upstream's end (its client left, its read was
        # cancelled): stored only if it holds its completing event, and a line left
        # unterminated after that event does not matter (bytes after it are no part of the
        # answer; the client that left never read them either).
        if self._parser is None:
            return
        between_events = cut or self._parser.idle
        self._parser.close(cut=cut)
        if self._parser.discarded and not cut:
            # WHATWG: an unterminated last event is never dispatched; the stream did not end
            # cleanly, whatever the adapter would have said (followers still got its bytes).
            self.abort("the stream ended inside an event (no final blank line)")
        elif self._live is not None and not self._failed:
            if self._parser.crlf:  # every line ended with CRLF: replays will too
                self._live.eol = "crlf"
            if self._kept is not None:  # replays send the bytes that came, if need be
                self._live.recorded = self._kept.recorded(between_events=between_events)
                self._kept = None
            self._live.end(clean=not cut)
            if self._flight is not None:
                self._flight.entry = self._live.entry

    async def close(self) -> bool:
        """Store a completed JSON body (called when the exchange ends; SSE streams are
        stored by their recording). True when something was stored; else
        :attr:`body_not_stored` says why, for a JSON body (a recording says so itself)."""
        if self._live is not None or (not self.ended and not self._failed):
            return False
        if self._failed:
            if self._cache is not None and self._failed != "not recorded":
                self.body_not_stored = self._failed  # (over max_entry_bytes, cut...)
            return False
        assert self._cache is not None
        body = b"".join(self._body)
        if self._cache.adapter.body_outcome(body) is not Outcome.COMPLETE:
            self.body_not_stored = "the body is not a complete answer of the route's schema"
            return False
        if await self._stream_kept():
            logger.debug("sse_cache: %s: a recorded stream of it is kept, not this body", self._key)
            self.body_not_stored = "a recorded stream of the same request is kept instead"
            return False
        entry = Entry(
            schema=self._cache.adapter.name,
            created_at=time.time(),
            status=self._status,
            content_type=self._content_type,
            body=body,
        )
        return await self._cache.store(self._key, entry, ttl=self._ttl, began=self._began)

    async def _stream_kept(self) -> bool:
        # A streamed request of the same key (the modes share entries: each answers the
        # other) stored its recording meanwhile: its entry replays the upstream's own bytes,
        # where one made from this body is synthesised. The last store would win: a stream
        # and a non-stream miss at once replaced the recording 13 times in 40 (helper-78).
        # (A stream still being recorded stores after this body, and replaces it: no need
        # to wait for it, which may yet fail.)
        if not self._keep_stream:
            return False
        assert self._cache is not None
        stored = await self._cache.lookup_wire(self._key)
        return stored is not None and stored.is_stream

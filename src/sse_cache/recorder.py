"""The sans-IO recorder: decides, event by event, whether a stream may be stored.

It holds no I/O and no clock: the driver (the engine, the ASGI middleware, a transport) feeds
it events with their ``at`` offsets and asks at the end for the :class:`Entry` to store, if
any. Testable with plain values.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping

from .entry import Entry
from .events import EOL, Event, unsound_event
from .protocols import Outcome, StreamAdapter, VerifyingAdapter

__all__ = ["DEFAULT_MAX_ENTRY_BYTES", "Recorder", "RecorderState"]

DEFAULT_MAX_ENTRY_BYTES = 32 * 1024 * 1024

# Per-event overhead counted on top of the text, so that a stream of tiny events is also
# bounded. Stored, an event costs a few bytes beyond its text (msgpack columns); recorded, it
# is ~120 bytes of Python objects, and ~200 once its entry is built: counted as 16, a stream
# of 1.9M one-letter events (17 MB on the wire) passed as 32 MB and took 600 MiB of memory
# to record and store (helper-83). 48 keeps real answers storable (100,000 events of
# ~260 bytes are 31 MB) and such a stream's memory at ~2-3x the limit while it is recorded
# (~4x for a moment as its entry is built), not ~20x.
EVENT_OVERHEAD = 48


def event_size(event: Event) -> int:
    """What ``event`` counts against ``max_entry_bytes``: its text in UTF-8 bytes, as stored
    (non-ASCII text takes up to 4 a character), plus :data:`EVENT_OVERHEAD`. (isascii() is
    O(1) on CPython: ASCII text costs no encode.) An event whose ``data`` is no str counts
    the overhead and its length, if it has one (see :meth:`Recorder.refuse_unsound`)."""
    data = event.data
    if data.__class__ is not str and not isinstance(data, str):
        return EVENT_OVERHEAD + (len(data) if isinstance(data, bytes | bytearray) else 0)
    text = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    return text + EVENT_OVERHEAD


class RecorderState(enum.Enum):
    RECORDING = "recording"
    """Events are coming; no verdict yet."""
    COMPLETE = "complete"
    """Judged by :meth:`Recorder.finish`: the stream completed and may be stored."""
    FAILED = "failed"
    """The stream reported a failure, broke, ended early, or was not to be stored."""
    OVERSIZE = "oversize"
    """The stream outgrew ``max_entry_bytes``; recording stopped (delivery goes on)."""


_RECORDING = RecorderState.RECORDING  # enum member lookups are slow: the hot path uses this
_CONTINUE, _COMPLETE, _FAIL = Outcome.CONTINUE, Outcome.COMPLETE, Outcome.FAIL


class Recorder:
    """Records one stream: ``add`` for each event with its arrival time, then ``finish`` for
    the entry to store (or None, with :attr:`reason`).

    ``add`` is all that runs on the delivery path, so it only keeps the event; the adapter
    judges the events (completing event? failure event?) once, in ``finish``. Recording stops
    and memory is released when the stream outgrows ``max_entry_bytes`` or ``fail`` is called
    (the upstream broke, the request asked not to store).
    """

    __slots__ = (
        "_adapter",
        "_completions",
        "_events",
        "_judged_upto",
        "_judgement",
        "_limit",
        "_times",
        "_verification",
        "reason",
        "size",
        "state",
    )

    def __init__(
        self, adapter: StreamAdapter, *, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    ) -> None:
        self._adapter = adapter
        self._limit = max_entry_bytes
        self._events: list[Event] = []
        self._times: list[float] = []
        self.size = 0  # bytes counted against max_entry_bytes so far
        self.state = RecorderState.RECORDING
        self.reason = ""
        # The verdict on the first ``_judged_upto`` events, and the whole-stream check's on
        # the events counted: events are only appended while recording, so a second look
        # (holds_answer, then finish) judges only what came since, and checks nothing again.
        self._judged_upto = 0
        self._judgement: tuple[Outcome, Event | None] = (Outcome.CONTINUE, None)
        self._verification: tuple[int, bool] = (-1, False)
        self._completions = 0  # completing events judged so far

    @property
    def events(self) -> list[Event]:
        """The events recorded so far (emptied once the stream cannot be stored, or once its
        entry is built)."""
        return self._events

    @property
    def active(self) -> bool:
        """Whether events are still being kept."""
        return self.state is _RECORDING

    @property
    def holds_answer(self) -> bool:
        """The events recorded so far are a complete answer wherever the stream stops now:
        its schema's completing event, no failure, and the schema's whole-stream check
        passes — what :meth:`finish` would store. Judges every event, as :meth:`finish`
        does: not for a hot path. (Only asks: the recording goes on as it was.)"""
        if self.state is not _RECORDING or self._judged()[0] is not Outcome.COMPLETE:
            return False
        return self._verified()

    def answered_by_last(self) -> bool:
        """Judges the events recorded since the last look: True when one of them is the
        schema's completing event and the events so far are a complete answer, as
        :meth:`holds_answer`. For a caller judging a stream as it comes: the whole-stream
        check runs once per completing event, not at every look (a stream whose completing
        event does not complete it, Gemini's first of two candidates finishing, is not
        checked again at every chunk after it)."""
        if self.state is not _RECORDING or self._judged_upto == len(self._events):
            return False
        seen = self._completions
        if self._judged()[0] is not _COMPLETE or self._completions == seen:
            return False
        return self._verified()

    def failure_among(self, events: Iterable[Event]) -> str:
        """Why the stream failed, if one of ``events`` (not recorded: what came after the
        answer) is one the schema judges a failure, as :meth:`finish` would have had they
        been recorded; "" otherwise."""
        outcome = self._adapter.outcome
        for event in events:
            if outcome(event) is _FAIL:
                return f"the stream reported a failure after its answer ({_named(event)})"
        return ""

    def add(self, event: Event, at: float) -> None:
        """Record ``event``, which arrived ``at`` seconds after the stream started."""
        if not isinstance(event, Event):
            raise TypeError(f"add() takes an Event, got {type(event).__name__}")
        if self.state is not _RECORDING or (
            event.data.__class__ is not str and self.refuse_unsound(event)
        ):
            return
        self.size += event_size(event)
        if self.size > self._limit:
            self.overflow()
            return
        self._events.append(event)
        self._times.append(at)

    def refuse_unsound(self, event: Event) -> bool:
        """Whether ``event`` has a field of a type the adapters and the codec cannot read
        (see :func:`~sse_cache.events.unsound_event`): then nothing of its stream is stored
        (:meth:`fail`), and it is delivered as it came (an adapter judging it raised, after
        every event was delivered; helper-158). Asked where ``data`` is no str, the one field
        every adapter reads; the codec names the others when it encodes the entry."""
        why = unsound_event(event)
        if why:
            self.fail(f"the upstream yielded {why}")
        return bool(why)

    def sink(self) -> tuple[Callable[[Event], None], Callable[[float], None], int]:
        """For a driver's hot loop, which cannot afford a method call per event: the appends
        of the event list and of the time list, and ``max_entry_bytes``.

        The caller must, for each event while :attr:`active`: add :func:`event_size` to
        :attr:`size` (on the recorder: several loops may feed one recorder in turn), call
        :meth:`overflow` once it is over the limit, and otherwise append the event and its
        time. :meth:`add` does exactly this.
        """
        return self._events.append, self._times.append, self._limit

    def overflow(self) -> None:
        """The stream outgrew ``max_entry_bytes``: stop recording and release the events."""
        if self.state is _RECORDING:
            self._stop(RecorderState.OVERSIZE, f"stream exceeds max_entry_bytes={self._limit}")

    def fail(self, reason: str) -> None:
        """Nothing will be stored, whatever comes next (``reason`` says why)."""
        if self.state is _RECORDING:
            self._stop(RecorderState.FAILED, reason)

    def finish(
        self,
        *,
        clean_end: bool,
        status: int = 200,
        content_type: str = "text/event-stream",
        created_at: float | None = None,
        meta: Mapping[str, str] | None = None,
        eol: EOL = "lf",
    ) -> Entry | None:
        """The entry to store, or None (then :attr:`reason` says why).

        ``clean_end``: the upstream ended by itself (False: the reader left before the end).
        A stream is stored when the HTTP status is 2xx, no event reported a failure, and
        either an event completed it (e.g. ``response.completed``: then it does not matter
        that the reader left afterwards) or the schema has no completing event
        (``end_outcome``) and the stream ended cleanly. ``eol``: the line ends the stream came
        with (``"crlf"`` when every line ended with CRLF), for a byte-exact replay.
        """
        if self.state is not _RECORDING:
            return None
        if not 200 <= status < 300:
            self._stop(RecorderState.FAILED, f"upstream status {status} is not 2xx")
            return None
        verdict = self._verdict()
        if verdict is Outcome.CONTINUE:
            if clean_end and self._adapter.end_outcome() is Outcome.COMPLETE:
                verdict = Outcome.COMPLETE
            else:
                self._stop(
                    RecorderState.FAILED,
                    "the stream ended without its completing event"
                    if clean_end
                    else "the stream was cut or abandoned before it completed",
                )
                return None
        if verdict is not Outcome.COMPLETE:
            return None
        if not self._verified():
            self._stop(RecorderState.FAILED, "the stream failed its schema's whole-stream check")
            return None
        self.state = RecorderState.COMPLETE
        # ``at`` is attached here, once, rather than per event on the delivery path.
        events = tuple(
            [
                Event(e.data, e.event, e.id, e.retry, t)
                for e, t in zip(self._events, self._times, strict=True)
            ]
        )
        # The entry holds the events now: the recording's own lists go (a second copy of
        # every event, for as long as the recorder lives).
        self._events, self._times = [], []
        info = dict(self._adapter.meta(events))
        if meta:
            info.update(meta)
        return Entry(
            schema=self._adapter.name,
            created_at=time.time() if created_at is None else created_at,
            status=status,
            content_type=content_type,
            events=events,
            meta=info,
            eol=eol,
        )

    def _verdict(self) -> Outcome:
        # The events' verdict (below); a failure stops the recording.
        verdict, failing = self._judged()
        if failing is not None:
            self._stop(RecorderState.FAILED, f"the stream reported a failure ({_named(failing)})")
        return verdict

    def _verified(self) -> bool:
        # The schema's whole-stream check, if it has one, passes on the events.
        count = len(self._events)
        checked_at, passed = self._verification
        if checked_at != count:
            adapter = self._adapter
            passed = (
                not isinstance(adapter, VerifyingAdapter)
                or adapter.verify(self._events) is Outcome.COMPLETE
            )
            self._verification = (count, passed)
        return passed

    def _judged(self) -> tuple[Outcome, Event | None]:
        # COMPLETE once a completing event was seen, FAIL (with the event) as soon as any
        # event failed (a late "completion" cannot revive a failed stream), else CONTINUE.
        # The events judged before are not judged again.
        verdict, failing = self._judgement
        events = self._events
        if failing is None:
            outcome = self._adapter.outcome
            # (A slice: islice would step over every event judged before, at every look.)
            for event in events[self._judged_upto :]:
                result = outcome(event)
                if result is _CONTINUE:
                    continue
                if result is _FAIL:
                    verdict, failing = _FAIL, event
                    break
                verdict = result
                self._completions += 1
            self._judgement = (verdict, failing)
        self._judged_upto = len(events)
        return verdict, failing

    def _stop(self, state: RecorderState, reason: str) -> None:
        self.state = state
        self.reason = reason
        self._events = []
        self._times = []
        self._judged_upto, self._judgement = 0, (Outcome.CONTINUE, None)
        self._verification = (-1, False)


def _named(event: Event) -> str:
    """How a failure's reason names the event that reported it: its type, or (a data-only
    event, as Chat Completions sends its errors) the start of its data. It said "None"."""
    if event.event is not None:
        return event.event
    data = event.data if len(event.data) <= 120 else event.data[:117] + "..."
    return f"data: {data}"

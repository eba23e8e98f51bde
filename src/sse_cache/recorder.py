"""The sans-IO recorder: decides, event by event, whether a stream may be stored.

It holds no I/O and no clock: the driver (the engine, the ASGI middleware, a transport) feeds
it events with their ``at`` offsets and asks at the end for the :class:`Entry` to store, if
any. Testable with plain values.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping

from .entry import Entry
from .events import Event
from .protocols import Outcome, StreamAdapter

__all__ = ["DEFAULT_MAX_ENTRY_BYTES", "Recorder", "RecorderState"]

DEFAULT_MAX_ENTRY_BYTES = 32 * 1024 * 1024

# Per-event overhead counted on top of the text, so that a stream of tiny events is also
# bounded (msgpack columns cost a few bytes per event and field).
_EVENT_OVERHEAD = 16


class RecorderState(enum.Enum):
    RECORDING = "recording"
    """Events are coming; no verdict yet."""
    COMPLETE = "complete"
    """The adapter saw the completing event; more events may still arrive and are kept."""
    FAILED = "failed"
    """The stream reported a failure, the upstream broke, or the reader went away."""
    OVERSIZE = "oversize"
    """The stream outgrew ``max_entry_bytes``; recording stopped (delivery goes on)."""


class Recorder:
    """Records one stream. ``add`` for each event, then ``finish`` for the entry to store.

    Recording stops (and memory is released) as soon as the verdict can no longer be "store":
    a failing event or the size limit. ``finish(clean_end=True)`` is called when the
    upstream ended by itself; ``fail()`` when it broke or the reader left early.
    """

    __slots__ = ("_adapter", "_events", "_limit", "_size", "reason", "state")

    def __init__(
        self, adapter: StreamAdapter, *, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    ) -> None:
        self._adapter = adapter
        self._limit = max_entry_bytes
        self._events: list[Event] = []
        self._size = 0
        self.state = RecorderState.RECORDING
        self.reason = ""

    @property
    def events(self) -> list[Event]:
        """The events recorded so far (emptied once the stream cannot be stored)."""
        return self._events

    @property
    def active(self) -> bool:
        """Whether events are still being kept."""
        return self.state is RecorderState.RECORDING or self.state is RecorderState.COMPLETE

    def add(self, event: Event) -> None:
        """Record ``event`` (its ``at`` already set by the driver)."""
        if not self.active:
            return
        self._size += len(event.data) + _EVENT_OVERHEAD
        if self._size > self._limit:
            self._stop(RecorderState.OVERSIZE, f"stream exceeds max_entry_bytes={self._limit}")
            return
        self._events.append(event)
        outcome = self._adapter.outcome(event)
        if outcome is Outcome.COMPLETE:
            self.state = RecorderState.COMPLETE
        elif outcome is Outcome.FAIL:
            self._stop(RecorderState.FAILED, f"the stream reported a failure ({event.event})")

    def fail(self, reason: str) -> None:
        """The stream broke or its reader left before the end: nothing will be stored."""
        if self.state is RecorderState.RECORDING:
            self._stop(RecorderState.FAILED, reason)

    def finish(
        self,
        *,
        clean_end: bool,
        status: int = 200,
        content_type: str = "text/event-stream",
        created_at: float | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> Entry | None:
        """The entry to store, or None (then :attr:`reason` says why).

        ``clean_end``: the upstream ended by itself (not cut, not abandoned). A stream is
        stored when the HTTP status is 2xx and either the adapter saw its completing event or,
        for schemas without one, the stream ended cleanly.
        """
        if self.state is RecorderState.RECORDING:
            if clean_end and self._adapter.end_outcome() is Outcome.COMPLETE:
                self.state = RecorderState.COMPLETE
            else:
                self._stop(
                    RecorderState.FAILED,
                    "the stream ended without its completing event"
                    if clean_end
                    else "the stream was cut or abandoned before it completed",
                )
        if self.state is not RecorderState.COMPLETE:
            return None
        if not 200 <= status < 300:
            self._stop(RecorderState.FAILED, f"upstream status {status} is not 2xx")
            return None
        events = tuple(self._events)
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
        )

    def _stop(self, state: RecorderState, reason: str) -> None:
        self.state = state
        self.reason = reason
        self._events = []

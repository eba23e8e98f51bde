"""A stream whose events an integration pushes to the engine: :class:`LiveRecording`, what
:meth:`StreamCache.recording <sse_cache.engine.StreamCache.recording>` yields."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import TracebackType

import anyio
import msgspec

from ._kept_bytes import KeptStream
from ._notices import Notice
from ._streams import Notify, SaveEntry
from .entry import Entry
from .errors import SSEError
from .events import EOL, Event, recorded_wire
from .recorder import Recorder, RecorderState

__all__ = ["LiveRecording"]

_RECORDING = RecorderState.RECORDING


class LiveRecording:
    """Records a stream whose events are pushed to us (see :meth:`StreamCache.recording`):
    an integration that receives a response by push (the ASGI middleware wraps ``send``)
    adds its events here; it is judged when it ends and stored when the block is left. The
    live stream that identical requests follow is the integration's own (of bytes: see
    :mod:`sse_cache.flight`). It is an async context manager: leaving it (as
    :meth:`StreamCache.recording` does) ends the stream, as cut when an exception leaves."""

    __slots__ = (
        "_began",
        "_key",
        "_notify",
        "_started",
        "_store",
        "_ttl",
        "entry",
        "eol",
        "recorded",
        "recorder",
        "status",
        "stored",
    )

    def __init__(
        self,
        key: str,
        recorder: Recorder,
        ttl: float | None,
        *,
        notify: Notify,
        store: SaveEntry,
        began: float | None = None,
    ) -> None:
        self._notify = notify
        self._store = store
        self._key = key
        self._ttl = ttl
        self._started = time.monotonic()
        # When the request began (time.time()): not stored over an entry created since.
        self._began = began
        self.recorder = recorder
        self.status = (200, "text/event-stream")
        #: The entry judged storable when the stream ended (None before, or if it failed).
        self.entry: Entry | None = None
        self.stored = False
        #: The line ends of the stream's bytes (set by the integration that parses them):
        #: ``"crlf"`` when every line ended with CRLF, so that its replays do too.
        self.eol: EOL = "lf"
        #: What the integration kept of a stream whose bytes were not all in the canonical
        #: form: how many events were, in which line ends, and every byte after them (see
        #: :func:`~sse_cache.events.recorded_wire`); None when they all were.
        self.recorded: KeptStream | None = None

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

    def end(self, *, clean: bool = True) -> None:
        """The stream ended by itself (``clean``), or stopped before its end and cannot go
        on: judge it now (stored when the block is left)."""
        if self.entry is None and self.recorder.state is _RECORDING:
            status, content_type = self.status
            entry = self.recorder.finish(
                clean_end=clean, status=status, content_type=content_type, eol=self.eol
            )
            if entry is not None and self._ttl is not None:
                entry = msgspec.structs.replace(entry, expires_at=time.time() + self._ttl)
            if entry is not None and self.recorded is not None:
                entry = self._with_wire(entry, clean)
            self.recorded = None
            self.entry = entry

    def _with_wire(self, entry: Entry, clean: bool) -> Entry | None:
        # The stream's own bytes, where the canonical form would not give them back; None
        # (not stored) when they cannot be kept: a hit is those bytes or nothing.
        assert self.recorded is not None and entry.events is not None
        head, head_eol, tail, total = self.recorded
        try:
            wire = recorded_wire(
                entry.events, head, head_eol, tail, whole=clean, eol=self.eol, total=total
            )
        except SSEError as exc:
            self.recorder.reason = f"its bytes cannot be kept as they came: {exc}"
            return None
        return entry if wire is None else msgspec.structs.replace(entry, wire=wire)

    @property
    def reason(self) -> str:
        return self.recorder.reason

    async def __aenter__(self) -> LiveRecording:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a recording cut by cancellation is still judged, and a complete one stored.
        with anyio.CancelScope(shield=True):
            await self._finish(clean=exc_type is None)

    async def _finish(self, clean: bool) -> None:
        if not clean:
            self.recorder.fail("the stream was cut before it completed")
        elif self.entry is None:
            self.end()
        if self.entry is None:
            self._notify(Notice(kind="not_stored", key=self._key, detail=self.reason))
            return
        why = await self._store(self._key, self.entry, self._ttl, self._began)
        if why:
            self.recorder.reason = why
        else:
            self.stored = True

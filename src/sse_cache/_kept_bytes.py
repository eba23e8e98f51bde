"""What a recording keeps of a stream's own bytes, for an entry whose replays must give them
back (sans-IO): :class:`KeptBytes`."""

from __future__ import annotations

from typing import NamedTuple

from .events import EOL, SSEParser

__all__ = ["KeptBytes", "KeptStream"]


class KeptStream(NamedTuple):
    """What an entry of a stream not in the canonical form is built from (see
    :func:`~sse_cache.events.recorded_wire`): ``head`` events in the canonical form with
    ``head_eol`` line ends, then the bytes ``tail``; ``total`` events in all."""

    head: int
    head_eol: EOL
    tail: bytes
    total: int


#: How many bytes are kept between two looks at them (a look joins what is kept).
_LOOK_BYTES = 16 * 1024


class KeptBytes:
    """The bytes of a stream being recorded that its events written in the canonical form
    (:func:`~sse_cache.events.serialize_sse`) would not give back.

    Fed every chunk after ``parser`` (the recording's), with the number of events the chunk
    completed. While the stream is in the canonical form only the bytes after its last whole
    event are kept (looked at every 16 KiB, then every time what is kept has doubled: a few
    KiB, or one event arriving in pieces); from its first byte that is not, every byte, up to
    ``limit``. :meth:`add` says False once they pass it (the recording should then give up:
    its entry would be larger than that). :meth:`recorded` gives what an entry needs at the
    stream's end: how many events came before the kept bytes, their line ends, and the kept
    bytes, or None when the stream was in the canonical form throughout."""

    __slots__ = (
        "_chunks",
        "_events",
        "_head",
        "_head_eol",
        "_next_look",
        "_parser",
        "_size",
        "limit",
    )

    def __init__(self, parser: SSEParser, limit: int) -> None:
        self._parser = parser
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._next_look = _LOOK_BYTES
        self._events = 0  # completed by the bytes fed so far
        self._head = 0  # completed before the bytes kept
        self._head_eol: EOL = "lf"

    @property
    def size(self) -> int:
        """How many bytes are kept now."""
        return self._size

    def add(self, chunk: bytes, events: int) -> bool:
        """Keep ``chunk`` (which completed ``events`` events); False once past the limit."""
        self._chunks.append(chunk if chunk.__class__ is bytes else bytes(chunk))
        self._size += len(chunk)
        self._events += events
        if self._size >= self._next_look:
            return self._look()
        return True

    def _look(self) -> bool:
        parser = self._parser
        if not parser.exact:
            self._next_look = self._size + _LOOK_BYTES
            return self._size <= self.limit
        kept = b"".join(self._chunks)
        crlf = parser.crlf
        # In the canonical form a blank line ends an event and nothing else (every other line
        # starts with a field name); a CR at the end may be the first half of a CRLF.
        end = -1 if kept.endswith(b"\r") else kept.rfind(b"\r\n\r\n" if crlf else b"\n\n")
        if end >= 0:
            kept = kept[end + (4 if crlf else 2) :]
            self._head, self._head_eol = self._events, "crlf" if crlf else "lf"
        self._chunks = [kept] if kept else []
        self._size = len(kept)
        self._next_look = max(_LOOK_BYTES, 2 * self._size)
        return True

    def recorded(self, *, between_events: bool) -> KeptStream | None:
        """At the stream's end (after the parser's ``close``): None when the stream was in the
        canonical form, else what :func:`~sse_cache.events.recorded_wire` needs.
        ``between_events``: nothing of the stream's answer follows its last event (the parser
        was idle before its close, or the stream was cut there); else its last bytes are
        fields of no event (``event: done`` without a blank line), which a replay must send.
        """
        if self._parser.exact and between_events:
            return None
        return KeptStream(self._head, self._head_eol, b"".join(self._chunks), self._events)

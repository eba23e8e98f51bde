"""The cache entry: what a backend stores for one answer."""

from __future__ import annotations

import msgspec

from .events import EOL, Event

__all__ = ["ENTRY_FORMAT_VERSION", "PARTIAL_CONTENT", "Entry", "storable_status"]

#: A part of an answer, for the request's ``Range``: never stored, never shared (the identical
#: request without that range would get a part as the whole).
PARTIAL_CONTENT = 206


def storable_status(status: int) -> bool:
    """Whether an upstream's answer with this HTTP status may be stored: a 2xx but a 206."""
    return 200 <= status < 300 and status != PARTIAL_CONTENT


#: Version of the stored format. Bumping it changes every key (see :mod:`sse_cache.keys`)
#: and makes :class:`~sse_cache.codec.MsgpackCodec` reject older envelopes as corrupt.
#: 2: event types stored once per stream, the event column holding indices.
ENTRY_FORMAT_VERSION = 2


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One stored answer: a recorded stream (``events``) or a non-stream body (``body``).

    ``schema`` is the name of the adapter that recorded it, ``status`` the upstream HTTP status
    (always 2xx for what the engine stores), ``content_type`` the upstream's content type,
    ``created_at`` a Unix timestamp, ``meta`` small adapter facts (for instance the OpenAI
    response id, for resume). ``eol`` is the line-end style of a recorded stream's wire
    form: ``"crlf"`` when every line of the upstream's stream ended with CRLF (a replay then
    writes CRLF, byte for byte as recorded), else ``"lf"`` (canonical; a synthesised stream,
    an entry written before this field existed). ``wire`` is the recorded stream's own bytes
    when writing ``events`` in the canonical form (:func:`~sse_cache.events.serialize_sse`
    with ``eol``) would not give them back: fields in another order (an ``id:`` after
    ``data:``), comment lines, ``data:`` without its space, mixed line ends; None otherwise
    (almost always: the providers' streams are in the canonical form). Replays send these
    bytes, and they parse to ``events``. Credentials and request headers are never part of
    an entry.
    """

    schema: str
    created_at: float
    status: int = 200
    content_type: str = "text/event-stream"
    events: tuple[Event, ...] | None = None
    body: bytes | None = None
    meta: dict[str, str] = {}
    expires_at: float | None = None
    version: int = ENTRY_FORMAT_VERSION
    eol: EOL = "lf"
    wire: bytes | None = None

    def __post_init__(self) -> None:
        if (self.events is None) == (self.body is None):
            raise ValueError("an Entry holds either events (a recorded stream) or a body")
        if self.eol not in ("lf", "crlf"):
            raise ValueError(f"eol must be 'lf' or 'crlf', got {self.eol!r}")
        if self.wire is not None and self.events is None:
            raise ValueError("only a recorded stream (events) has wire bytes")

    @property
    def is_stream(self) -> bool:
        """True when the entry holds a recorded event stream (else a non-stream body)."""
        return self.events is not None

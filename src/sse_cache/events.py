"""Server-Sent Events: the :class:`Event` type, an incremental parser and the canonical writer.

The parser follows the WHATWG *event stream interpretation* rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html) and is sans-IO: feed it bytes
in chunks of any size and it returns the events those bytes complete.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import msgspec

from .errors import SSEError

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "EOL",
    "Event",
    "ResumeCut",
    "SSEParser",
    "event_ends",
    "resume_point",
    "serialize_sse",
]

EOL = Literal["lf", "crlf"]
"""The line ends :func:`serialize_sse` writes: ``"lf"`` (canonical) or ``"crlf"``."""

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024

#: UTF-8's byte order mark, which a stream may begin with.
BOM = b"\xef\xbb\xbf"
# The fast paths match bytes, not text: a regular expression runs several times faster over
# bytes than over the str of a non-ASCII stream, and only the matched values are decoded.
_EVENT_BLOCKS = re.compile(rb"event: ([^\n]*)\ndata: ([^\n]*)\n\n")
_DATA_BLOCKS = re.compile(rb"data: ([^\n]*)\n\n")
_utf8 = bytes.decode  # UTF-8, strict
# What SSEParser has seen of the stream's line ends (its ``_eol``): none yet, only CRLF so
# far, only LF so far, or a mix (or a CR on its own): then it stops looking.
_EOL_NONE, _EOL_CRLF, _EOL_LF, _EOL_MIXED = 0, 1, 2, 3


class Event(msgspec.Struct, frozen=True):
    """One dispatched SSE event.

    ``data`` is the event's data lines joined with ``\\n`` (as the SSE spec dispatches it).
    ``event`` and ``id`` are the values of this event's own ``event:`` / ``id:`` fields, or
    ``None`` when the event had none (the spec's *last event ID*, which persists across
    events, is :attr:`SSEParser.last_event_id`). ``retry`` is the reconnection time in ms when
    the event carried a valid ``retry:`` field. ``at`` is the time in seconds since the stream
    started at which the event arrived: it drives paced replay and is not part of the wire form.
    """

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    at: float = 0.0


def unsound_event(event: Event) -> str:
    """Why ``event`` cannot be recorded, or ``""``: one of its fields has a type the adapters
    and the codec cannot read (msgspec does not check a Struct's fields when it is made:
    ``Event(data=b"...")`` is made). The hot loops call it only when a quick look (``data``
    a str) did not settle it."""
    for name, value, wanted in (
        ("data", event.data, (str,)),
        ("event", event.event, (str, type(None))),
        ("id", event.id, (str, type(None))),
        ("retry", event.retry, (int, type(None))),
    ):
        if not isinstance(value, wanted) or value is True or value is False:
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            kinds = " or ".join("None" if t is type(None) else t.__name__ for t in wanted)
            return f"an Event whose {name} is {type(value).__name__} {shown}: it must be {kinds}"
    return ""


class SSEParser:
    """Incremental WHATWG event-stream parser.

    ``feed(chunk)`` returns the events completed by ``chunk``; splitting the same bytes at any
    positions yields the same events. Line ends may be LF, CR or CRLF (a CR that ends one chunk
    and an LF that starts the next are one line end). A leading UTF-8 BOM is skipped, ``:``
    comment lines ignored, one space after a field's colon removed, ``retry`` kept only when it
    is all ASCII digits (at most 18 of them), and blocks without ``data`` lines are not dispatched.

    Invalid UTF-8 raises :class:`SSEError`, as does an event (or a single line) larger than
    ``max_event_bytes``: a hostile upstream cannot make the parser hold unbounded memory.
    ``close()`` ends the stream: per the spec, an event not terminated by a blank line is
    discarded, and :attr:`discarded` then tells that it happened. :attr:`crlf` tells whether
    every line end of the stream so far was CRLF (what :func:`serialize_sse` can reproduce
    with ``eol="crlf"``); :attr:`exact`, whether the bytes so far are exactly what
    :func:`serialize_sse` writes for their events (with those line ends), and :attr:`idle`,
    whether they end where an event ended (nothing of a line or an event is pending).
    """

    __slots__ = (
        "_at_start",
        "_data",
        "_data_size",
        "_eol",
        "_event",
        "_id",
        "_irregular",
        "_max",
        "_pending",
        "_retry",
        "_skip_lf",
        "discarded",
        "last_event_id",
    )

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes <= 0:
            raise ValueError(f"max_event_bytes must be positive, got {max_event_bytes!r}")
        self._max = max_event_bytes
        # The bytes of an unfinished line (never holds CR or LF): a bytearray while a long
        # one grows piece by piece.
        self._pending: bytes | bytearray = b""
        self._at_start = True  # before the first byte: a BOM may follow
        self._skip_lf = False  # the previous chunk ended with CR: drop one leading LF
        self._eol = _EOL_NONE
        # Something of the stream that serialize_sse would not write back (see ``exact``).
        self._irregular = False
        self._data: list[str] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id = ""
        self.discarded = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse ``chunk`` and return the events it completes, in order."""
        if not chunk:
            return []
        if isinstance(chunk, str):  # (the user's mistake, whatever the annotation says)
            raise TypeError("feed() takes bytes (the stream as received), got str")
        if self._at_start:
            buf = b"".join((self._pending, chunk)) if self._pending else chunk
            if len(buf) < 3 and BOM.startswith(buf):
                self._pending = buf  # could still become a BOM: wait for more bytes
                return []
            self._at_start = False
            self._eol = _EOL_NONE  # a new stream (the parser may be reused after close)
            self._irregular = False
            if buf.startswith(BOM):
                buf = buf[3:]
                self._irregular = True  # (a replay does not write it)
            self._pending = b""
            chunk = buf
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
            else:
                self._eol = _EOL_MIXED  # that CR ended a line on its own
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            if self._eol <= _EOL_CRLF:
                # Only CRLF: every LF follows a CR, and every CR precedes an LF (or ends the
                # chunk, and the next chunk must start with its LF).
                pairs = chunk.count(b"\r\n")
                only_crlf = pairs == chunk.count(b"\n") and pairs + self._skip_lf == chunk.count(
                    b"\r"
                )
                self._eol = _EOL_CRLF if only_crlf else _EOL_MIXED
            else:
                self._eol = _EOL_MIXED  # a CR after LF line ends
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        elif self._eol < _EOL_LF and b"\n" in chunk:
            # An LF line end (the LF path pays this once per stream): after CRLFs, a mix.
            self._eol = _EOL_LF if self._eol == _EOL_NONE else _EOL_MIXED
        end = chunk.rfind(b"\n")
        if end < 0:
            pending = self._pending
            if not pending:
                # (Kept as bytes: a caller's bytearray may be reused, and is never grown here.)
                self._pending = chunk if chunk.__class__ is bytes else bytes(chunk)
            else:
                # A long line coming in pieces: grown in place, not copied whole again for
                # each piece (an 8 MiB line in 1 KiB pieces cost a second of CPU; helper-83).
                if pending.__class__ is bytes:
                    pending = self._pending = bytearray(pending)
                pending += chunk
            if len(self._pending) + self._data_size > self._max:
                raise SSEError(f"SSE event exceeds max_event_bytes={self._max}")
            return []
        block = b"".join((self._pending, chunk[: end + 1])) if self._pending else chunk[: end + 1]
        self._pending = chunk[end + 1 :]
        try:
            events = self._blocks(block)
        except UnicodeDecodeError as exc:
            raise SSEError(f"SSE stream is not valid UTF-8: {exc}") from None
        if len(self._pending) + self._data_size > self._max:
            raise SSEError(f"SSE event exceeds max_event_bytes={self._max}")
        return events

    def close(self, *, cut: bool = False) -> list[Event]:
        """End of input. Returns no events (an unterminated event is discarded, as the spec
        says); sets :attr:`discarded` when data was pending. The parser can be reused.
        ``cut``: the input stopped before the stream's end (its reader left): a CR it ended
        with may be the first half of a CRLF, and does not make the line ends mixed."""
        self.discarded = bool(self._data) or bool(self._pending and not self._at_start)
        if self._skip_lf and not cut:
            self._eol = _EOL_MIXED  # the stream ended with a CR on its own
        self._reset_event()
        self._pending = b""
        self._at_start = True
        self._skip_lf = False
        return []

    @property
    def crlf(self) -> bool:
        """Every line end of the stream fed so far was CRLF (and there was at least one); a
        stream with LF or lone CR line ends, or a mix, is False. Kept after :meth:`close`
        until the next stream is fed."""
        return self._eol == _EOL_CRLF

    @property
    def exact(self) -> bool:
        """The bytes fed so far are exactly what :func:`serialize_sse` writes for the events
        they held (with ``eol="crlf"`` when :attr:`crlf`), up to what is pending (see
        :attr:`idle`): every event's fields in the canonical order and form, nothing else. A
        comment, a field after ``data``, ``data:`` without its space, a block that dispatches
        nothing, a BOM or mixed line ends make it False for the rest of the stream: then only
        the bytes themselves give the stream back. Kept after :meth:`close`."""
        return not self._irregular and self._eol != _EOL_MIXED

    @property
    def mid_crlf(self) -> bool:
        """The bytes fed so far end with a CR that ends a line, and the stream's line ends
        so far were all CRLF: its LF is still to come (in the next chunk)."""
        return self._skip_lf and self._eol == _EOL_CRLF

    @property
    def idle(self) -> bool:
        """The bytes fed so far end where an event ended (or before any): no part of a line
        or of an event is pending."""
        return not (
            self._pending
            or self._skip_lf
            or self._data
            or self._event is not None
            or self._id is not None
            or self._retry is not None
        )

    def copy(self) -> SSEParser:
        """A parser in this one's state, fed apart from it from now on."""
        twin = SSEParser.__new__(SSEParser)
        twin.restore(self)
        return twin

    def restore(self, state: SSEParser) -> None:
        """Put this parser back in the state of ``state`` (a :meth:`copy` taken earlier): as
        if what it was fed since had not been."""
        # (Every slot, by hand: copy.copy costs seven times as much, and a recording that judges
        # its stream as it comes copies its parser once a chunk.)
        self._at_start = state._at_start
        self._data = list(state._data)
        self._data_size = state._data_size
        self._eol = state._eol
        self._event = state._event
        self._id = state._id
        self._irregular = state._irregular
        self._max = state._max
        self._pending = bytes(state._pending)  # (a bytearray while a long line grows)
        self._retry = state._retry
        self._skip_lf = state._skip_lf
        self.discarded = state.discarded
        self.last_event_id = state.last_event_id

    def dispatch_end(self, chunk: bytes, count: int) -> int:
        """The offset in ``chunk`` just after the ``count``-th event that feeding it to this
        parser would dispatch (with the LF of a CRLF that ends it), or ``len(chunk)`` if it
        would dispatch fewer: where to cut a chunk after its last event. Only looks: a copy
        of this parser is fed, line by line (a rare path: it costs a feed per line)."""
        probe = self.copy()
        dispatched = start = 0
        for line_end in _LINE_END.finditer(chunk):
            end = line_end.end()
            dispatched += len(probe.feed(chunk[start:end]))
            if dispatched >= count:
                return end
            start = end
        return len(chunk)

    def _reset_event(self) -> None:
        self._data = []
        self._data_size = 0
        self._event = None
        self._id = None
        self._retry = None

    def _blocks(self, block: bytes) -> list[Event]:
        # ``block`` is whole lines, each ending in LF (raises UnicodeDecodeError on invalid
        # UTF-8). The event in progress (if any) is finished line by line up to the first
        # blank line; then everything up to the last blank line is whole event blocks, which
        # take the fast paths; the rest (an event not yet terminated) goes line by line again.
        out: list[Event] = []
        if self._data or self._event is not None or self._id is not None or self._retry is not None:
            first = block.find(b"\n\n")
            if first < 0:
                return self._lines(_utf8(block[:-1]).split("\n"))
            lines = _utf8(block[:first]).split("\n")
            lines.append("")
            out = self._lines(lines)
            block = block[first + 2 :]
        last = block.rfind(b"\n\n") + 2
        if last > 1:
            out += self._whole_blocks(block[:last])
            block = block[last:]
        if block:
            out += self._lines(_utf8(block[:-1]).split("\n"))
        return out

    def _whole_blocks(self, raw: bytes) -> list[Event]:
        # ``raw`` is complete event blocks (each ends with a blank line) and no event is in
        # progress. A stream of one shape — every block "event: X" + one "data: Y" (OpenAI
        # Responses, Anthropic), or every block one "data: Y" (Chat Completions) — is split
        # by one regular expression in C: the separators between matches are all empty
        # exactly when the bytes are nothing but such blocks. Decoding each value on its own
        # checks the same UTF-8 as decoding the whole (the separators are ASCII).
        limit = self._max
        if raw.startswith(b"event: "):
            parts = _EVENT_BLOCKS.split(raw)
            if not any(parts[0::3]):
                data, types = parts[2::3], parts[1::3]
                if max(map(len, data)) + max(map(len, types)) <= limit:
                    return list(map(Event, map(_utf8, data), map(_utf8, types)))
        elif raw.startswith(b"data: "):
            parts = _DATA_BLOCKS.split(raw)
            if not any(parts[0::2]):
                data = parts[1::2]
                if max(map(len, data)) <= limit:
                    return list(map(Event, map(_utf8, data)))
        text = _utf8(raw)
        out: list[Event] = []
        for block in text[:-2].split("\n\n"):
            lines = block.split("\n")
            lines.append("")
            out += self._lines(lines)
        return out

    def _lines(self, lines: list[str]) -> list[Event]:
        # Also judges whether the lines are in serialize_sse's form (``_irregular``): per
        # event, ``event: ``, ``id: ``, ``retry: `` (each at most once, in that order, before
        # any data), then ``data: `` lines, then a blank line that dispatches the event.
        out: list[Event] = []
        data = self._data
        size = self._data_size
        limit = self._max
        regular = not self._irregular
        for line in lines:
            if not line:
                if data:
                    out.append(
                        Event("\n".join(data), self._event, self._id, self._retry)
                        if len(data) > 1
                        else Event(data[0], self._event, self._id, self._retry)
                    )
                    data = []
                    size = 0
                else:
                    regular = False  # a blank line that dispatches nothing
                self._event = self._id = self._retry = None
                continue
            # The hot path: "data: ..." is almost every line of an LLM stream.
            if line.startswith("data"):
                if line.startswith("data: "):
                    value = line[6:]
                elif line == "data" or line[4] == ":":
                    value = line[5:]
                    regular = False
                else:
                    regular = False
                    continue  # a field named like "datax": unknown, ignored
                data.append(value)
                size += len(value) + 1
                if size > limit:
                    raise SSEError(f"SSE event exceeds max_event_bytes={limit}")
                continue
            if line[0] == ":":
                regular = False
                continue
            if len(line) + size > limit:  # any field line counts, not only data
                raise SSEError(f"SSE event exceeds max_event_bytes={limit}")
            name, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            else:
                regular = False  # no space after the colon: written back with one
            if name == "event":
                if data or (self._event, self._id, self._retry) != (None, None, None):
                    regular = False
                self._event = value
            elif name == "id":
                if "\0" in value:
                    regular = False  # the spec ignores ids containing NUL
                else:
                    if data or self._id is not None or self._retry is not None:
                        regular = False
                    self._id = value
                    self.last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 18:
                # (Longer is no reconnection time, ~30 million years, and past what an int
                # converts from a string: ignored, as any invalid value.)
                if data or self._retry is not None or value != str(int(value)):
                    regular = False
                self._retry = int(value)
            else:
                regular = False  # an unknown field, or a retry that is not a number
        self._data = data
        self._data_size = size
        self._irregular = not regular
        return out


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise SSEError(f"SSE {name} field cannot contain a line break: {value!r}")


def serialize_sse(events: Iterable[Event], *, eol: EOL = "lf") -> bytes:
    """Write events in the canonical wire form.

    Per event: ``event: X`` (if any), ``id: X`` (if any), ``retry: N`` (if any), one
    ``data: ...`` line per data line, then a blank line. For input already in that form (what
    OpenAI, Anthropic and most gateways emit) ``serialize_sse(parse(b)) == b``. Lines end with
    LF, or with CRLF when ``eol="crlf"`` (the same form framed with CRLF, as Gemini's API
    sends it: then ``serialize_sse(parse(b), eol="crlf") == b``). Raises
    :class:`SSEError` for values the wire form cannot carry (a CR in ``data``, a line break in
    ``event`` or ``id``, a NUL in ``id``).
    """
    parts: list[str] = []
    append = parts.append
    for ev in events:
        if ev.event is not None:
            _check_field("event", ev.event)
            append(f"event: {ev.event}\n")
        if ev.id is not None:
            _check_field("id", ev.id)
            if "\0" in ev.id:
                raise SSEError(f"SSE id field cannot contain NUL: {ev.id!r}")
            append(f"id: {ev.id}\n")
        if ev.retry is not None:
            if ev.retry < 0:
                raise SSEError(f"SSE retry must be a non-negative integer, got {ev.retry!r}")
            append(f"retry: {ev.retry}\n")
        data = ev.data
        if "\r" in data:
            raise SSEError("SSE data cannot contain a carriage return (CR)")
        if "\n" in data:
            append("data: " + data.replace("\n", "\ndata: ") + "\n\n")
        else:
            append(f"data: {data}\n\n")
    try:
        raw = "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: no UTF-8 for them
        raise SSEError(f"SSE text must be valid Unicode: {exc}") from None
    if eol == "lf":
        return raw
    if eol != "crlf":
        raise ValueError(f"eol must be 'lf' or 'crlf', got {eol!r}")
    # No value holds a CR or LF (checked above): every LF written is a line end.
    return raw.replace(b"\n", b"\r\n")


_LINE_END = re.compile(rb"\r\n|\r|\n")


class ResumeCut:
    """Where a client that reconnects to a stream picks it up, found as the stream's bytes
    arrive from its start (sans-IO).

    ``had(event)`` says, for each whole event, whether the client has it: True (it has this
    event and every one before it), False (it lacks this one and every one after it) or None
    (not known yet: the point is still to come, or the client has nothing of this stream).
    :meth:`feed` returns the bytes to send the client — nothing while the point is not known,
    then the stream's own bytes from just after the last event it had (a partial event
    included), unchanged. :meth:`close` (the stream ended cleanly) returns what was held back:
    all of it when the point never came (the client had nothing of this stream).
    """

    __slots__ = ("_block", "_had", "_line", "_parser", "_pending", "passing")

    def __init__(self, had: Callable[[Event], bool | None]) -> None:
        self._had = had
        self._parser = SSEParser()
        self._pending = bytearray()  # not sent yet, from just after the last event had
        self._block = 0  # where the block being read starts, in _pending
        self._line = 0  # where the line being read starts, in _pending
        self.passing = False  # the point is known: everything goes through

    def feed(self, data: bytes) -> bytes:
        if self.passing:
            return data
        self._pending += data
        return self._seek()

    @property
    def held(self) -> bytes:
        """What is held back so far: the bytes whose place is not known yet (a partial log,
        as :func:`resume_point` reads one: a CR at its end may be half of a CRLF)."""
        return b"" if self.passing else bytes(self._pending)

    def close(self) -> bytes:
        if self.passing:
            return b""
        # The stream ended: a CR at its very end ends a line, and may end its last event,
        # which is judged before anything held back goes out (helper-100: it was not, so a
        # client that had every event of a CR-framed stream got all of it again).
        out = self._seek(ended=True)
        return out if self.passing else out + self._pass()

    def _seek(self, *, ended: bool = False) -> bytes:
        # Scans a copy (a bytearray being scanned cannot shrink): only the bytes whose place
        # is not known yet, a few events at most unless the point is far off.
        data = bytes(self._pending)
        for match in _LINE_END.finditer(data, self._line):
            if match.group() == b"\r" and match.end() == len(data) and not ended:
                break  # a CR that may be the first half of a CRLF still to come
            empty = match.start() == self._line
            self._line = end = match.end()
            if not empty:
                continue
            # A blank line: the block before it is one event (or nothing: comments, no data).
            try:
                events = self._parser.feed(data[self._block : end])
            except SSEError:
                return self._pass()  # bytes no client could have parsed past
            self._block = end
            for event in events:
                had = self._had(event)
                if had is False:
                    return self._pass()
                if had:
                    del self._pending[:end]
                    self._block = self._line = 0
                    return self._seek(ended=ended)
        return b""

    def _pass(self) -> bytes:
        self.passing = True
        out = bytes(self._pending)
        self._pending.clear()
        return out


# A line end, then a blank line (the LF of a CRLF is no line end of its own): each blank line
# that ends a block (one after a line with something on it) ends one match. And the line end
# before a ``data`` field's line. Both start with a character class, which ``re`` scans for
# quickly; a lookbehind first made it try every position (several times slower).
_BLOCK_END = re.compile(rb"[\r\n](?:\r\n|\r(?!\n)|(?<!\r)\n)")
_DATA_LINE = re.compile(rb"[\r\n]data(?=[:\r\n]|\Z)")
_FIRST_DATA_LINE = re.compile(rb"(?:\xef\xbb\xbf)?data(?:[:\r\n]|\Z)")


def event_ends(data: bytes) -> list[int]:
    """The offsets in ``data`` (a whole stream's bytes, as recorded, from its start) just
    after each event it dispatches, in order: where its bytes can be cut between events (a
    paced replay of a stream stored as its bytes, a resume). What precedes an event
    (comments, a BOM) goes with it; what follows the last one is after the last offset.

    An event is dispatched by the blank line that ends a block holding a ``data`` field, as
    :class:`SSEParser` dispatches it. (Blank lines right after another end no block and
    dispatch nothing: they need not be found.)"""
    data_lines = [m.start() for m in _DATA_LINE.finditer(data)]
    if _FIRST_DATA_LINE.match(data):
        data_lines.insert(0, -1)
    ends: list[int] = []
    i, count = 0, len(data_lines)
    for block in _BLOCK_END.finditer(data):
        at = block.start()
        if i < count and data_lines[i] < at:
            ends.append(block.end())
            while i < count and data_lines[i] < at:
                i += 1
    return ends


def recorded_wire(
    events: Sequence[Event],
    head: int,
    head_eol: EOL,
    tail: bytes,
    *,
    whole: bool,
    eol: EOL,
    total: int | None = None,
) -> bytes | None:
    """The bytes of a recorded stream that was not all in the canonical form, rebuilt for its
    stored ``events``: the first ``head`` of them were (written back with ``head_eol``), and
    ``tail`` is every byte received after them. ``whole``: the stream ended by itself (what
    followed its last event, comments say, is kept; else it is not part of the answer).
    ``total``: how many events the stream held in all, if known: when they are all stored
    and the stream is whole, the bytes are taken as they are, without a look at each event.

    None when these bytes are the canonical form with ``eol`` after all (then nothing need be
    kept). Raises :class:`SSEError` when they do not hold ``events`` (not expected: then no
    replay could give the stream back)."""
    if head > len(events) or not tail:
        return None  # every stored event came before the first irregular byte
    wire = serialize_sse(events[:head], eol=head_eol) + tail
    if whole and total == len(events):
        return wire
    ends = event_ends(wire)
    if len(ends) < len(events):
        raise SSEError("the recorded bytes do not hold the stored events")
    if len(ends) > len(events) or not whole:
        wire = wire[: ends[len(events) - 1]] if events else b""
        if wire == serialize_sse(events, eol=eol):  # what was not canonical was cut off
            return None
    return wire


def resume_point(data: bytes, had: Callable[[Event], bool | None]) -> int:
    """The offset in ``data`` (a stream's bytes from its start) just after the last event the
    client had (see :class:`ResumeCut`), 0 when it had none; a partial event at the end is
    never counted as had."""
    cut = ResumeCut(had)
    sent = cut.feed(data)
    return len(data) - len(sent if cut.passing else cut.held)

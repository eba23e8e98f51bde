"""SSEParser and serialize_sse: WHATWG rules, chunking invariance, round trips, and a
differential check against httpx-sse's decoder."""

from __future__ import annotations

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sse_cache import Event, SSEError, SSEParser, serialize_sse
from sse_cache.events import event_ends, recorded_wire
from sse_renderings import renderings


def parse(data: bytes, chunks: list[int] | None = None) -> list[Event]:
    parser = SSEParser()
    if chunks is None:
        events = parser.feed(data)
    else:
        events, pos = [], 0
        for size in chunks:
            events += parser.feed(data[pos : pos + size])
            pos += size
        events += parser.feed(data[pos:])
    return events + parser.close()


def test_canonical_openai_shape() -> None:
    raw = b'event: response.created\ndata: {"type":"response.created"}\n\n'
    assert parse(raw) == [Event('{"type":"response.created"}', "response.created")]
    assert serialize_sse(parse(raw)) == raw


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_line_endings(eol: bytes) -> None:
    raw = eol.join([b"event: x", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    assert parse(raw) == [Event("a\nb", "x"), Event("c")]


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # The LF completing the CRLF must not count as a second (blank) line.
    assert parser.feed(b"\ndata: b\r\n\r\n") == [Event("a\nb")]


def test_comments_fields_and_spaces() -> None:
    raw = b": keep-alive comment\ndata:no-space\ndata:  two-spaces\nunknown: field\ndata\n\n"
    assert parse(raw) == [Event("no-space\n two-spaces\n")]


def test_bom_only_at_start_and_split_across_chunks() -> None:
    raw = b"\xef\xbb\xbfdata: x\n\n"
    assert parse(raw, chunks=[1, 1, 1]) == [Event("x")]
    # A BOM anywhere else is data.
    assert parse(b"data: \xef\xbb\xbfx\n\n") == [Event("\ufeffx")]


def test_retry_only_when_all_ascii_digits() -> None:
    raw = b"retry: 1500\ndata: a\n\nretry: 15x\ndata: b\n\nretry: \xd9\xa1\ndata: c\n\n"
    assert [e.retry for e in parse(raw)] == [1500, None, None]


def test_id_is_per_event_and_last_event_id_persists() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 7\ndata: a\n\ndata: b\n\nid: 8\x00\ndata: c\n\n")
    assert [e.id for e in events] == ["7", None, None]  # an id with NUL is ignored
    assert parser.last_event_id == "7"


def test_block_without_data_is_not_dispatched() -> None:
    assert parse(b"event: ping\n\nid: 3\n\n: comment\n\ndata: x\n\n") == [Event("x")]


def test_unterminated_event_is_discarded_and_reported() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: complete\n\ndata: cut") == [Event("complete")]
    assert parser.close() == []
    assert parser.discarded
    parser.feed(b"data: x\n\n")
    parser.close()
    assert not parser.discarded


def test_invalid_utf8_raises_sse_error() -> None:
    with pytest.raises(SSEError, match="UTF-8"):
        SSEParser().feed(b"data: \xff\xfe\n\n")


def test_multibyte_char_split_across_chunks() -> None:
    raw = "data: 東京🚀\n\n".encode()
    for cut in range(1, len(raw)):
        assert parse(raw, chunks=[cut]) == [Event("東京🚀")]


@pytest.mark.parametrize(
    "raw",
    [
        b"data: " + b"x" * 2000 + b"\n\n",  # one long line, then a terminated event
        b"data: " + b"x" * 600 + b"\ndata: " + b"y" * 600 + b"\n",  # many data lines
        b"data: " + b"x" * 2000,  # a line that never ends
    ],
)
def test_event_size_guard(raw: bytes) -> None:
    parser = SSEParser(max_event_bytes=1024)
    with pytest.raises(SSEError, match="max_event_bytes"):
        for i in range(0, len(raw), 100):
            parser.feed(raw[i : i + 100])


def test_size_guard_allows_many_small_events() -> None:
    parser = SSEParser(max_event_bytes=64)
    assert len(parser.feed(b"data: 0123456789\n\n" * 1000)) == 1000


def test_serialize_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(SSEError, match="event"):
        serialize_sse([Event("x", event="a\nb")])
    with pytest.raises(SSEError, match="carriage return"):
        serialize_sse([Event("a\rb")])
    with pytest.raises(SSEError, match="id"):
        serialize_sse([Event("x", id="a\x00")])


def test_serialize_multiline_and_fields() -> None:
    events = [Event("a\n\nb", event="e", id="1", retry=10), Event("")]
    assert (
        serialize_sse(events)
        == b"event: e\nid: 1\nretry: 10\ndata: a\ndata: \ndata: b\n\ndata: \n\n"
    )
    assert parse(serialize_sse(events)) == events


# -- properties ---------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)
_field = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=12)
events_strategy = st.lists(
    st.builds(
        Event,
        data=st.lists(_text, min_size=1, max_size=3).map("\n".join),
        event=st.none() | _field,
        id=st.none() | _field,
        retry=st.none() | st.integers(0, 10**6),
    ),
    max_size=12,
)

_line = st.one_of(
    st.sampled_from(["", "", ":comment", "data", "data:", "retry: 100", "retry: x", "id"]),
    st.builds(
        lambda f, v: f"{f}:{v}", st.sampled_from(["data", "event", "id", "retry", "x"]), _text
    ),
    st.builds(lambda f, v: f"{f}: {v}", st.sampled_from(["data", "event", "id"]), _text),
)
raw_stream = st.builds(
    lambda lines, eols, bom: (
        (b"\xef\xbb\xbf" if bom else b"")
        + b"".join(line.encode() + eols[i % len(eols)] for i, line in enumerate(lines))
    ),
    st.lists(_line, max_size=25),
    st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=1, max_size=4),
    st.booleans(),
)


@given(raw_stream, st.lists(st.integers(0, 40), max_size=12))
def test_chunking_never_changes_the_events(raw: bytes, cuts: list[int]) -> None:
    assert parse(raw, chunks=cuts) == parse(raw)
    assert parse(raw, chunks=[1] * len(raw)) == parse(raw)


@given(raw_stream, st.lists(st.integers(0, 40), max_size=12))
def test_dispatch_end_is_where_a_chunks_nth_event_ends(raw: bytes, cuts: list[int]) -> None:
    # Where a stream stopped at its answer cuts the chunk that completed it, for the
    # followers (ResponseTee): just after the event, its whole line end with it.
    parser, pos, got = SSEParser(), 0, []
    for cut in [*sorted(c for c in cuts if 0 < c < len(raw)), len(raw)]:
        chunk, pos = raw[pos:cut], cut
        before = parser.copy()
        events = parser.feed(chunk)
        got += events
        for n in range(1, len(events) + 1):
            end = before.dispatch_end(chunk, n)
            head, tail = before.copy(), before.copy()
            assert head.feed(chunk[:end]) == events[:n]
            assert tail.feed(chunk[:end]) + tail.feed(chunk[end:]) == events
            assert not (chunk[end - 1 : end] == b"\r" and chunk[end : end + 1] == b"\n")
            line_end = 2 if chunk[end - 2 : end] == b"\r\n" else 1
            assert len(before.copy().feed(chunk[: end - line_end])) == n - 1
        assert before.dispatch_end(chunk, len(events) + 1) == len(chunk)
        assert before.copy().feed(chunk) == events  # (only looked)
        if len(events) > 1:
            # Put back before the chunk, then fed up to its first event only (a recording
            # that keeps only the answer of a chunk that completed it): the rest follows on.
            fed = parser.copy()
            fed.restore(before)
            end = before.dispatch_end(chunk, 1)
            assert fed.feed(chunk[:end]) == events[:1]
            assert fed.feed(chunk[end:]) == events[1:]
    assert got == parse(raw)


def test_a_copy_of_a_parser_has_every_part_of_its_state() -> None:
    # copy() and restore() name each slot by hand: one added to the parser and not to them
    # would be missing from every copy (an AttributeError here), or shared with it.
    parser = SSEParser()
    parser.feed(b"\xef\xbb\xbfid: 7\r\nevent: e\r\nretry: 5\r\ndata: a\r\ndata: b\r\nda")
    twin = parser.copy()
    for name in SSEParser.__slots__:
        assert getattr(twin, name) == getattr(parser, name), name
    assert twin._data is not parser._data
    assert twin.feed(b"ta: c\r\n\r\n") == parser.feed(b"ta: c\r\n\r\n")


@given(events_strategy)
def test_parse_of_serialize_is_identity(events: list[Event]) -> None:
    assert parse(serialize_sse(events)) == events


@given(events_strategy, st.lists(st.integers(1, 50), max_size=10))
def test_serialize_of_parse_is_identity_on_canonical_bytes(
    events: list[Event], cuts: list[int]
) -> None:
    canonical = serialize_sse(events)
    assert serialize_sse(parse(canonical, chunks=cuts)) == canonical


def _httpx_sse(raw: bytes) -> list[tuple[str, str, str, int | None]]:
    lines_decoder, decoder, out = SSELineDecoder(), SSEDecoder(), []
    for line in [*lines_decoder.decode(raw.decode()), *lines_decoder.flush()]:
        sse = decoder.decode(line)
        if sse is not None:
            out.append((sse.event or "message", sse.data, sse.id, sse.retry))
    return out


@settings(max_examples=200)
@given(events_strategy, st.sampled_from(["\n", "\r\n", "\r"]))
def test_differential_against_httpx_sse(events: list[Event], eol: str) -> None:
    raw = serialize_sse(events).decode().replace("\n", eol).encode()
    ours, last_id = [], ""
    for ev in parse(raw):
        last_id = ev.id if ev.id is not None else last_id
        ours.append((ev.event or "message", ev.data, last_id, ev.retry))
    assert ours == _httpx_sse(raw)


@pytest.mark.parametrize("field", [b"event", b"id", b"retry", b"x-unknown"])
def test_size_guard_counts_every_field_however_the_bytes_are_split(field: bytes) -> None:
    raw = field + b": " + b"v" * 5000 + b"\ndata: x\n\n"
    for cuts in (None, [7], [4000]):
        with pytest.raises(SSEError, match="max_event_bytes"):
            parse_with_limit(raw, 1024, cuts)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_a_long_line_in_many_pieces_is_one_event_and_still_bounded(eol: bytes) -> None:
    # A line without its end is grown in place piece by piece (it was copied whole for each
    # piece: an 8 MiB line in 1 KiB pieces cost a second of CPU; helper-83).
    text = "".join(chr(0x41 + i % 26) for i in range(300_000)) + "日本"
    raw = b"event: long" + eol + b"data: " + text.encode() + eol + eol
    parser = SSEParser()
    events = [ev for i in range(0, len(raw), 1000) for ev in parser.feed(raw[i : i + 1000])]
    assert [(e.event, e.data) for e in events] == [("long", text)]
    with pytest.raises(SSEError, match="max_event_bytes"):
        parse_with_limit(raw, 100_000, list(range(1000, len(raw), 1000)))


def test_a_callers_bytearray_is_neither_kept_nor_changed() -> None:
    # A line without its end was kept as the caller's own object, then grown in place: a
    # caller reusing its buffer changed the line, and found bytes added to it (helper-85).
    parser = SSEParser()
    buffer = bytearray(b"data: hel")
    assert parser.feed(buffer) == []
    buffer[:] = b"XYZ"  # the caller reuses its buffer
    assert parser.feed(bytearray(b"lo")) == []
    assert buffer == b"XYZ"
    assert [e.data for e in parser.feed(b"\n\n")] == ["hello"]


def parse_with_limit(raw: bytes, limit: int, cuts: list[int] | None) -> list[Event]:
    parser = SSEParser(max_event_bytes=limit)
    if cuts is None:
        return parser.feed(raw)
    out, pos = [], 0
    for cut in cuts:
        out += parser.feed(raw[pos:cut])
        pos = cut
    return out + parser.feed(raw[pos:])


# -- line-end style: SSEParser.crlf and serialize_sse(eol="crlf") -----------------------------


def _crlf_of(raw: bytes, cuts: list[int] | None = None) -> bool:
    parser = SSEParser()
    pos = 0
    for size in cuts or []:
        parser.feed(raw[pos : pos + size])
        pos += size
    parser.feed(raw[pos:])
    parser.close()
    return parser.crlf


@given(events_strategy, st.lists(st.integers(0, 50), max_size=10))
def test_crlf_serialisation_round_trips_under_any_chunking(
    events: list[Event], cuts: list[int]
) -> None:
    raw = serialize_sse(events, eol="crlf")
    assert raw == serialize_sse(events).replace(b"\n", b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line end is CRLF
    assert parse(raw, chunks=cuts) == events
    assert serialize_sse(parse(raw, chunks=cuts), eol="crlf") == raw
    has_lines = bool(events)  # no events, no line ends: not CRLF
    assert _crlf_of(raw, cuts) is _crlf_of(raw, [1] * len(raw)) is has_lines
    assert not _crlf_of(serialize_sse(events), cuts)  # LF
    assert not _crlf_of(serialize_sse(events).replace(b"\n", b"\r"), cuts)  # CR only


@given(raw_stream, st.lists(st.integers(0, 40), max_size=12))
def test_crlf_is_true_exactly_when_every_line_end_is_crlf(raw: bytes, cuts: list[int]) -> None:
    lone = raw.replace(b"\r\n", b"")
    expected = b"\r\n" in raw and b"\r" not in lone and b"\n" not in lone
    assert _crlf_of(raw, cuts) is expected
    assert _crlf_of(raw, [1] * len(raw)) is expected


def test_crlf_edge_cases() -> None:
    assert not _crlf_of(b"")  # no line end at all
    assert not _crlf_of(b"data: a\r\n\r\ndata: b\n\n")  # mixed
    assert not _crlf_of(b"data: a\r\n\r\ndata: b\r\n\r")  # ends with a CR on its own
    assert not _crlf_of(b"data: a\r\n\r\ndata: b\r\r\n")  # a lone CR then a CRLF
    assert _crlf_of(b"\xef\xbb\xbfdata: a\r\n\r\n", [1, 1, 1, 8])  # after a BOM
    assert _crlf_of(b"data: a\r\n\r\n", [8, 1, 1])  # CR | LF across chunks
    parser = SSEParser()
    parser.feed(b"data: a\r\n\r\n")
    parser.close()
    assert parser.crlf  # kept after close
    parser.feed(b"data: b\n\n")
    parser.close()
    assert not parser.crlf  # a reused parser judges its new stream


def test_a_stream_cut_between_cr_and_lf_keeps_its_crlf() -> None:
    # Its reader left after the CR of a CRLF (the completing event's blank line, say): that
    # CR is half of a CRLF as far as anyone knows, and the stream's replays keep CRLF.
    parser = SSEParser()
    events = parser.feed(b"data: a\r\n\r\ndata: b\r\n\r")
    assert [e.data for e in events] == ["a", "b"]
    parser.close(cut=True)
    assert parser.crlf and not parser.discarded
    parser.feed(b"data: a\r\n\r\ndata: b\r\n\r")
    parser.close()  # the stream's own end: a CR on its own
    assert not parser.crlf


def test_serialize_rejects_an_unknown_eol() -> None:
    with pytest.raises(ValueError, match="eol"):
        serialize_sse([Event("x")], eol="cr")  # type: ignore[arg-type]


# -- exactness: SSEParser.exact / idle, event_ends, recorded_wire -----------------------------


def _fed(raw: bytes, cuts: list[int]) -> tuple[SSEParser, list[Event], list[bool]]:
    """A parser fed ``raw`` in pieces cut at ``cuts``; the events; ``idle`` after each piece."""
    parser, events, idle, pos = SSEParser(), [], [], 0
    for cut in [*sorted(c for c in cuts if 0 < c < len(raw)), len(raw)]:
        events += parser.feed(raw[pos:cut])
        idle.append(parser.idle)
        pos = cut
    return parser, events, idle


@settings(max_examples=300)
@given(renderings(), st.lists(st.integers(0, 400), max_size=12))
@example(rendering=([b"data: \r\n\r"], b"", [Event("")]), cuts=[])  # ends mid-CRLF
def test_exact_says_whether_serialize_sse_gives_the_bytes_back(
    rendering: tuple[list[bytes], bytes, list[Event]], cuts: list[int]
) -> None:
    pieces, trailer, events = rendering
    raw = b"".join(pieces) + trailer
    parser, got, _ = _fed(raw, cuts)
    assume(got == events)  # (a CR before an empty line's LF makes one CRLF)
    eol = "crlf" if parser.crlf else "lf"
    # exact judges up to what is pending: a CR at the very end of a CRLF stream is half of
    # a line end whose LF is still to come
    pending = b"\n" if parser.mid_crlf else b""
    assert parser.exact is (raw + pending == serialize_sse(events, eol=eol))
    assert _fed(raw, list(range(len(raw))))[0].exact is parser.exact  # byte by byte


@given(events_strategy, st.sampled_from(["lf", "crlf"]), st.lists(st.integers(0, 400), max_size=12))
def test_canonical_streams_are_exact_and_idle_only_between_events(
    events: list[Event], eol: str, cuts: list[int]
) -> None:
    raw = serialize_sse(events, eol=eol)  # type: ignore[arg-type]
    parser, _, idle = _fed(raw, cuts)
    assert parser.exact and idle[-1]
    boundaries = {len(serialize_sse(events[:i], eol=eol)) for i in range(len(events) + 1)}  # type: ignore[arg-type]
    positions = [*sorted(c for c in cuts if 0 < c < len(raw)), len(raw)]
    for pos, was_idle in zip(positions, idle, strict=True):
        assert was_idle is (pos in boundaries)


@pytest.mark.parametrize(
    "raw",
    [
        b"data: a\nid: 1\n\n",  # a field after data (FastAPI's own SSE writes id last)
        b"id: 1\nevent: x\ndata: a\n\n",  # id before event (sse-starlette)
        b"data:a\n\n",  # no space after the colon
        b"event:x\ndata: a\n\n",
        b": ping\n\ndata: a\n\n",  # a comment
        b"data: a\n\n\n",  # a blank line that dispatches nothing
        b"event: x\n\ndata: a\n\n",  # a block without data
        b"\xef\xbb\xbfdata: a\n\n",  # a BOM
        b"data: a\r\n\r\ndata: b\n\n",  # mixed line ends
        b"data: a\rdata: b\r\r",  # CR line ends
        b"retry: 007\ndata: a\n\n",  # a number written otherwise
        b"retry: x\ndata: a\n\n",  # an invalid retry, ignored
        b"id: a\x00b\ndata: a\n\n",  # an id with NUL, ignored
        b"foo: bar\ndata: a\n\n",  # an unknown field
        b"data\n\n",  # a bare field name
        b"event: x\nevent: y\ndata: a\n\n",  # a field twice
    ],
)
def test_what_serialize_sse_does_not_write_back_is_not_exact(raw: bytes) -> None:
    parser = SSEParser()
    events = parser.feed(raw)
    assert events and not parser.exact
    assert parser.idle is not raw.endswith(b"\r")  # (a CR may be half of a CRLF still)


def test_exact_is_judged_anew_for_a_new_stream() -> None:
    parser = SSEParser()
    parser.feed(b": hi\n\ndata: a\n\n")
    parser.close()
    assert not parser.exact  # kept after close
    parser.feed(b"event: x\nid: 1\nretry: 10\ndata: a\ndata: b\n\n")
    assert parser.exact


def test_a_huge_retry_is_ignored_not_an_error() -> None:
    # More digits than an int converts from a string (4,300) raised a bare ValueError out of
    # the parser: a hostile upstream broke the recording.
    for digits in (19, 5000):
        parser = SSEParser()
        events = parser.feed(b"retry: " + b"9" * digits + b"\ndata: a\n\n")
        assert events == [Event("a")] and not parser.exact


@settings(max_examples=200)
@given(renderings())
def test_event_ends_are_where_each_event_ended(
    rendering: tuple[list[bytes], bytes, list[Event]],
) -> None:
    pieces, trailer, events = rendering
    raw = b"".join(pieces) + trailer
    assume(parse(raw) == events)
    ends = [len(b"".join(pieces[: i + 1])) for i in range(len(pieces))]
    assert event_ends(raw) == ends


@settings(max_examples=200)
@given(renderings(), st.data())
def test_recorded_wire_gives_the_bytes_of_the_stored_events(
    rendering: tuple[list[bytes], bytes, list[Event]], data: st.DataObject
) -> None:
    pieces, trailer, events = rendering
    raw = b"".join(pieces) + trailer
    assume(parse(raw) == events)
    parser = SSEParser()
    parser.feed(raw)
    eol = "crlf" if parser.crlf else "lf"
    # The events before the first irregular one, as the recording keeps them.
    head = 0
    while head < len(events) and b"".join(pieces[: head + 1]) == serialize_sse(
        events[: head + 1], eol=eol
    ):
        head += 1
    tail = raw[len(b"".join(pieces[:head])) :]
    stored = data.draw(st.integers(head, len(events)))  # the recorder may stop early
    whole = stored == len(events) and data.draw(st.booleans())
    wire = recorded_wire(events[:stored], head, eol, tail, whole=whole, eol=eol)  # type: ignore[arg-type]
    expected = b"".join(pieces[:stored]) + (trailer if whole else b"")
    if expected == serialize_sse(events[:stored], eol=eol):  # type: ignore[arg-type]
        assert wire is None  # nothing to keep: the canonical form is these bytes
    else:
        assert wire == expected


def test_recorded_wire_refuses_bytes_that_do_not_hold_the_events() -> None:
    with pytest.raises(SSEError, match="do not hold"):
        recorded_wire([Event("a"), Event("b")], 0, "lf", b"data:a\n\n", whole=True, eol="lf")


def test_event_ends_know_a_bom_only_at_the_start() -> None:
    # U+FEFF starting a line later in the stream is part of that line (a field named
    # "\ufeffdata": unknown), as the parser reads it; counting it as a BOM made an entry
    # whose irregular bytes began past the first 16 KiB impossible to store (helper-98).
    bom = "\ufeff".encode()
    assert event_ends(bom + b"data: a\n\n") == [len(bom) + 9]
    raw = b"data: a\n\n" + bom + b"data: b\n\ndata: c\n\n"
    assert parse(raw) == [Event("a"), Event("c")]
    assert event_ends(raw) == [9, len(raw)]
    # The bytes kept from the first irregular one on (the line with U+FEFF) begin there.
    events = [Event("a"), Event("c")]
    assert recorded_wire(events, 1, "lf", raw[9:], whole=True, eol="lf") == raw


# -- resume_point: where a reconnecting client picks a stream up ------------------------------


@given(
    count=st.integers(min_value=1, max_value=12),
    data=st.data(),
    eol=st.sampled_from(["lf", "crlf"]),
)
def test_resume_point_is_the_end_of_the_event_the_client_has(
    count: int, data: st.DataObject, eol: str
) -> None:
    from sse_cache.events import resume_point

    events = [Event(data=f"payload {i}\nline", id=str(i), event="tick") for i in range(count)]
    wire = serialize_sse(events, eol=eol)  # type: ignore[arg-type]
    k = data.draw(st.integers(min_value=0, max_value=count - 1))
    cut = data.draw(st.integers(min_value=0, max_value=len(wire)))

    def had(event: Event) -> bool | None:
        return True if event.id == str(k) else None  # the point is event k, when it comes

    point = resume_point(wire, had)
    # Exactly after event k, whatever the line ends; the rest is the stream's own bytes.
    assert point == len(serialize_sse(events[: k + 1], eol=eol))  # type: ignore[arg-type]
    # On a partial log (cut anywhere), an event not yet whole is never counted as had.
    partial = resume_point(wire[:cut], had)
    assert partial in (0, point)
    assert partial == point or cut < point


def test_resume_point_is_zero_when_the_client_has_nothing_of_this_stream() -> None:
    # had(): True (the client has it and all before), False (it lacks it and all after),
    # None (not known yet).
    from sse_cache.events import resume_point

    wire = b"id: a\ndata: 1\n\n: keep-alive\n\nid: b\ndata: 2\n\n"
    assert resume_point(wire, lambda event: None) == 0  # never found: it gets all
    assert resume_point(wire, lambda event: event.id == "a") == len(b"id: a\ndata: 1\n\n")
    assert resume_point(wire, lambda event: event.id != "b") == len(b"id: a\ndata: 1\n\n")
    # A CR that ends the bytes may be half of a CRLF: the event is not whole yet.
    assert resume_point(b"data: 1\r\n\r", lambda event: True) == 0
    # Bytes no parser could get past end the search (the client cannot have them).
    assert resume_point(b"data: 1\n\ndata: \xff\n\ndata: 3\n\n", lambda event: True) == 9


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
    n=st.integers(min_value=-1, max_value=8),
    eol=st.sampled_from(["lf", "crlf", "cr"]),
)
def test_a_resume_cut_fed_in_any_pieces_sends_exactly_the_bytes_after_the_point(
    sizes: list[int], n: int, eol: str
) -> None:
    # (CR-framed, the stream's last byte is a CR: a client that had the last event got the
    # whole stream again, helper-100.)
    from sse_cache.events import ResumeCut

    def framed(events: list[Event]) -> bytes:
        if eol == "cr":
            return serialize_sse(events).replace(b"\n", b"\r")
        return serialize_sse(events, eol=eol)  # type: ignore[arg-type]

    events = [Event(data=f'{{"seq": {i}}}', event="e") for i in range(8)]
    wire = b": hi\n\n".replace(b"\n", b"\r" if eol == "cr" else b"\n") + framed(events)
    cut = ResumeCut(lambda event: int(event.data[8:-1]) <= n)  # a sequence number: had or not
    out, at = b"", 0
    for size in sizes:
        out += cut.feed(wire[at : at + size])
        at += size
    out += cut.feed(wire[at:]) + cut.close()
    assert out == (wire if n < 0 else framed(events[n + 1 :]))

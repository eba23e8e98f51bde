"""KeptBytes: what a recording keeps of a stream's own bytes stays bounded — a few KiB of a
canonical stream however its chunks fall, at most ``limit`` of any other — and gives back,
with recorded_wire, exactly the bytes that came."""

from __future__ import annotations

import itertools

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sse_cache import Event, SSEParser, serialize_sse
from sse_cache._kept_bytes import KeptBytes
from sse_cache.events import recorded_wire
from sse_renderings import renderings

MiB = 1024 * 1024


def canonical(count: int, eol: str = "lf") -> bytes:
    events = [Event("x" * 200, "response.output_text.delta", id=str(i)) for i in range(count)]
    return serialize_sse(events, eol=eol)  # type: ignore[arg-type]


def feed(
    raw: bytes, cuts: list[int], limit: int = 32 * MiB
) -> tuple[KeptBytes, SSEParser, list[Event], int, bool]:
    """``raw`` fed in pieces cut at ``cuts``: the keeper, the parser, the events, the most
    bytes ever kept, and whether every add stayed within the limit."""
    parser = SSEParser()
    kept = KeptBytes(parser, limit)
    events: list[Event] = []
    most, within = 0, True
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]
    for start, end in itertools.pairwise(bounds):
        done = parser.feed(raw[start:end])
        events += done
        if within:
            within = kept.add(raw[start:end], len(done))
            most = max(most, kept.size)
    return kept, parser, events, most, within


def test_a_canonical_stream_whose_chunks_never_end_with_an_event_keeps_a_few_kib() -> None:
    # Chunks cut one byte before each event's end (TCP and proxies cut anywhere): the bytes
    # were kept whole until the stream ended (helper-98: 332 MiB for a 300 MiB stream).
    for eol in ("lf", "crlf"):
        raw = canonical(20_000, eol)  # ~5 MB
        step = len(canonical(1, eol))
        cuts = list(range(step - 1, len(raw), step))
        kept, parser, events, most, within = feed(raw, cuts)
        assert len(events) == 20_000 and within
        assert most <= 64 * 1024
        parser.close()
        assert kept.recorded(between_events=True) is None


def test_the_bytes_of_a_stream_not_canonical_are_bounded_by_the_limit() -> None:
    # A ping every event: every byte is kept, up to the limit; then add says so (the
    # recording gives up). Before, they were kept to the stream's end, whatever its size.
    raw = (b": ping\n\n" + canonical(1)) * 5_000
    _, _, events, most, within = feed(raw, list(range(0, len(raw), 4096)), limit=MiB)
    assert len(events) == 5_000 and not within
    assert most <= MiB + 16 * 1024 + 4096


@settings(max_examples=150)
@given(
    st.integers(0, 400),
    renderings(),
    st.integers(0, 50),
    st.lists(st.integers(0, 200_000), max_size=30),
)
def test_a_stream_that_turns_irregular_late_is_given_back_whole(
    before: int, rendering: tuple[list[bytes], bytes, list[Event]], after: int, cuts: list[int]
) -> None:
    pieces, trailer, middle = rendering
    head, tail = canonical(before), canonical(after)
    raw = head + b"".join(pieces) + trailer + tail
    kept, parser, events, _, within = feed(raw, cuts)
    parser_idle = parser.idle
    parser.close()
    assume(not parser.discarded and len(events) == before + len(middle) + after)
    assert within
    recorded = kept.recorded(between_events=parser_idle)
    eol = "crlf" if parser.crlf else "lf"
    if recorded is None:
        assert raw == serialize_sse(events, eol=eol)
        return
    count, head_eol, bytes_kept, total = recorded
    assert total == len(events)
    wire = recorded_wire(events, count, head_eol, bytes_kept, whole=True, eol=eol)
    assert wire == raw  # found event by event
    assert (
        recorded_wire(events, count, head_eol, bytes_kept, whole=True, eol=eol, total=total) == raw
    )

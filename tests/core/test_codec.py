"""MsgpackCodec: round trips, compression choices, and corruption detection."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_cache import (
    ConfigError,
    CorruptEntry,
    Entry,
    Event,
    MsgpackCodec,
    UnreadableEntry,
    serialize_sse,
)
from sse_cache.entry import ENTRY_FORMAT_VERSION
from sse_cache.testing import responses_stream

_text = st.text(max_size=40)
# What SSE can carry (the codec also stores the events as SSE): no CR in data, no line
# breaks or NUL in event types and ids.
_data = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=40)
_field = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=20)
_events = st.lists(
    st.builds(
        Event,
        data=_data,
        event=st.none() | _field,
        id=st.none() | _field,
        retry=st.none() | st.integers(0, 2**31),
        at=st.floats(0, 1e5),
    ),
    max_size=20,
).map(tuple)
entries = st.builds(
    lambda payload, **kw: Entry(**payload, **kw),
    st.one_of(
        st.fixed_dictionaries({"events": _events}),
        st.fixed_dictionaries({"body": st.binary(max_size=200)}),
    ),
    schema=st.sampled_from(["generic", "openai-responses"]),
    created_at=st.floats(0, 2e9),
    status=st.integers(200, 299),
    content_type=st.sampled_from(["text/event-stream", "text/event-stream; charset=utf-8"]),
    meta=st.dictionaries(_text, _text, max_size=3),
)

codecs = [
    MsgpackCodec(),
    MsgpackCodec(compression="zlib", min_compress_bytes=0),
    MsgpackCodec(compression="none"),
    MsgpackCodec(compression="zstd", min_compress_bytes=0, secret=b"s3cret"),
]


@pytest.mark.parametrize("codec", codecs, ids=["auto", "zlib", "none", "zstd+mac"])
@given(entry=entries)
def test_round_trip(codec: MsgpackCodec, entry: Entry) -> None:
    assert codec.decode(codec.encode(entry)) == entry


def test_large_stream_is_compressed_and_exact() -> None:
    entry = Entry(schema="generic", created_at=1.0, events=tuple(responses_stream(text_deltas=500)))
    codec = MsgpackCodec()
    data = codec.encode(entry)
    plain = MsgpackCodec(compression="none").encode(entry)
    assert len(data) * 5 < len(plain)
    assert codec.decode(data) == entry
    # Any codec reads any compression: the setting can change on a live cache.
    assert MsgpackCodec(compression="none").decode(data) == entry


_sample = MsgpackCodec(min_compress_bytes=0).encode(
    Entry(schema="generic", created_at=5.0, events=(Event("a", "b", at=0.5), Event("c")))
)


@settings(max_examples=300)
@given(st.integers(0, len(_sample) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_detected(position: int, xor: int) -> None:
    damaged = bytearray(_sample)
    damaged[position] ^= xor
    with pytest.raises(CorruptEntry):
        MsgpackCodec().decode(bytes(damaged))


@given(st.integers(0, len(_sample) - 1))
def test_any_truncation_is_detected(length: int) -> None:
    with pytest.raises(CorruptEntry):
        MsgpackCodec().decode(_sample[:length])


@given(st.binary(max_size=300))
def test_foreign_bytes_never_raise_anything_else(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        MsgpackCodec().decode(data)
    with pytest.raises(CorruptEntry):
        MsgpackCodec().decode(b"SSEC" + bytes((ENTRY_FORMAT_VERSION, 0)) + data)


def test_secret_rejects_entries_written_without_it() -> None:
    entry = Entry(schema="generic", created_at=1.0, body=b"{}")
    forged = MsgpackCodec().encode(entry)
    # (The reason says a secret may be why: an operator changing --secret reads it in the
    # log; helper-164.)
    with pytest.raises(CorruptEntry, match="checksum.*with a secret not given here"):
        MsgpackCodec(secret=b"k").decode(forged)
    assert MsgpackCodec(secret=b"k").decode(MsgpackCodec(secret=b"k").encode(entry)) == entry


def test_decompression_is_bounded() -> None:
    entry = Entry(schema="generic", created_at=1.0, body=b"\0" * 1_000_000)
    data = MsgpackCodec().encode(entry)
    assert len(data) < 10_000
    with pytest.raises(CorruptEntry, match="max_decoded_bytes|over"):
        MsgpackCodec(max_decoded_bytes=100_000).decode(data)


def test_what_another_process_may_read_is_unreadable_not_corrupt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine deletes a CorruptEntry, but leaves an UnreadableEntry for the processes of
    # the cache that can read it.
    import sse_cache.codec

    entry = Entry(schema="generic", created_at=1.0, body=b"x" * 10_000)
    zstd = MsgpackCodec(compression="zstd").encode(entry)
    with pytest.raises(UnreadableEntry, match="max_decoded_bytes"):
        MsgpackCodec(max_decoded_bytes=1000).decode(zstd)
    with pytest.raises(UnreadableEntry, match="max_decoded_bytes"):
        MsgpackCodec(max_decoded_bytes=1000).decode(MsgpackCodec(compression="zlib").encode(entry))
    newer = bytearray(_sample)
    newer[4] = 99
    with pytest.raises(UnreadableEntry, match="version"):
        MsgpackCodec().decode(bytes(newer))
    monkeypatch.setattr(sse_cache.codec, "_zstd", None)
    with pytest.raises(UnreadableEntry, match="install sse-cache"):
        MsgpackCodec().decode(zstd)
    # What no process can trust stays corrupt.
    altered = bytearray(_sample)
    altered[-1] ^= 1
    for data in (bytes(altered), _sample[:-5], b"foreign"):
        with pytest.raises(CorruptEntry) as info:
            MsgpackCodec().decode(data)
        assert not isinstance(info.value, UnreadableEntry)


def test_an_entry_with_a_status_that_is_not_2xx_is_corrupt() -> None:
    # Only 2xx answers are stored; a hit sends the stored status with a body (a 204 or 304
    # with a body is a broken response), so one written by another hand is not served.
    for status in (101, 199, 304, 500):
        data = MsgpackCodec().encode(
            Entry(schema="generic", created_at=1.0, status=status, body=b"{}")
        )
        with pytest.raises(CorruptEntry, match=f"status {status}"):
            MsgpackCodec().decode(data)
        with pytest.raises(CorruptEntry, match=f"status {status}"):
            MsgpackCodec().decode_wire(data)
    assert (
        MsgpackCodec()
        .decode(MsgpackCodec().encode(Entry(schema="g", created_at=1.0, status=203, body=b"{}")))
        .status
        == 203
    )


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="compression"):
        MsgpackCodec(compression="lz4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="secret"):
        MsgpackCodec(secret=b"x" * 65)


def test_entry_holds_events_or_a_body() -> None:
    with pytest.raises(ValueError, match="either"):
        Entry(schema="g", created_at=1.0)
    with pytest.raises(ValueError, match="either"):
        Entry(schema="g", created_at=1.0, events=(), body=b"")


@given(entry=entries)
def test_wire_decode_gives_the_canonical_sse(entry: Entry) -> None:
    codec = MsgpackCodec(min_compress_bytes=0)
    wire = codec.decode_wire(codec.encode(entry))
    if entry.events is None:
        assert wire.sse is None and wire.body == entry.body
    else:
        assert wire.sse == serialize_sse(entry.events) and wire.count == len(entry.events)
        assert wire.body is None
    assert (wire.schema, wire.status, wire.meta) == (entry.schema, entry.status, entry.meta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_timestamps_are_refused_and_detected(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        MsgpackCodec().encode(Entry(schema="g", created_at=bad, body=b"{}"))
    good = MsgpackCodec().encode(Entry(schema="g", created_at=1.0, body=b"{}"))
    # The same envelope with the timestamp replaced (and a valid checksum): still refused.
    import hashlib

    import msgspec

    payload = bytearray(good[21:])
    head = msgspec.msgpack.encode(1.0)
    at = payload.find(head)
    payload[at : at + len(head)] = msgspec.msgpack.encode(bad)
    version = bytes((ENTRY_FORMAT_VERSION,))
    digest = hashlib.blake2b(version, digest_size=16)
    digest.update(bytes(payload))
    forged = b"SSEC" + version + digest.digest() + bytes(payload)
    with pytest.raises(CorruptEntry, match="finite"):
        MsgpackCodec().decode(forged)


def test_streams_with_more_event_types_than_a_byte_indexes_round_trip() -> None:
    # Up to 256 types the type column is one byte per event; past that, a list of ints.
    for kinds in (256, 257, 1000):
        events = tuple(Event(str(i), f"kind-{i % kinds}", at=i / 10) for i in range(1200))
        entry = Entry(schema="generic", created_at=1.0, events=events)
        codec = MsgpackCodec()
        decoded = codec.decode(codec.encode(entry))
        assert decoded == entry
        # Events of one type share one string in memory.
        assert decoded.events is not None
        assert decoded.events[0].event is decoded.events[kinds].event


def _forged_with_columns(columns: list[object]) -> bytes:
    """An envelope with a valid checksum around event columns we choose."""
    import hashlib

    import msgspec

    head = ["generic", 1.0, 200, "text/event-stream", {}, True, 2, 0.0, None]
    payload = msgspec.msgpack.encode(
        [head, b"\x00" + msgspec.msgpack.encode(columns), b"\x00data: x\n\n"]
    )
    version = bytes((ENTRY_FORMAT_VERSION,))
    digest = hashlib.blake2b(version, digest_size=16)
    digest.update(payload)
    return b"SSEC" + version + digest.digest() + payload


def test_event_type_indices_outside_the_table_are_corrupt() -> None:
    good = [["a", "b"], ["t", None], b"\x00\x01", [0.0, 1.0], None, None]
    entry = MsgpackCodec().decode(_forged_with_columns(good))
    assert entry.events == (Event("a", "t", at=0.0), Event("b", None, at=1.0))
    for types in (b"\x00\x02", [0, 5], [-1, 0]):
        with pytest.raises(CorruptEntry, match="types"):
            MsgpackCodec().decode(_forged_with_columns([*good[:2], types, *good[3:]]))
    with pytest.raises(CorruptEntry, match="inconsistent"):
        MsgpackCodec().decode(_forged_with_columns([*good[:2], b"\x00", *good[3:]]))
    with pytest.raises(CorruptEntry, match="inconsistent"):
        MsgpackCodec().decode(_forged_with_columns([*good[:4], ["1"], None]))


def test_a_checksum_refusal_is_told_from_other_corruption() -> None:
    # What sse-cache ls reports as "another secret, or altered" (not as corrupt): only an
    # entry refused for its checksum, never one whose checksum matched but whose contents
    # do not decode (helper-99: those were blamed on a secret too).
    entry = Entry(schema="generic", created_at=1.0, events=(Event("a"),))
    other = MsgpackCodec(secret=b"another").encode(entry)
    mine = MsgpackCodec()
    with pytest.raises(CorruptEntry, match="checksum"):
        mine.decode(other)
    assert mine.checksum_refused(other)
    assert not MsgpackCodec(secret=b"another").checksum_refused(other)  # (it reads it)
    inconsistent = _forged_with_columns([["a", "b"], ["t"], b"\x00", [0.0], None, None])
    with pytest.raises(CorruptEntry, match="inconsistent"):
        mine.decode(inconsistent)
    assert not mine.checksum_refused(inconsistent)  # its checksum matched
    assert not mine.checksum_refused(other[:-1])  # truncated: no sound envelope
    assert not mine.checksum_refused(b"not an entry")


# -- the line-end style (Entry.eol): added after format version 2, last with a default --------

_crlf_entries = st.builds(
    lambda events, **kw: Entry(events=events, **kw),
    _events,
    schema=st.just("generic"),
    created_at=st.floats(0, 2e9),
    eol=st.sampled_from(["lf", "crlf"]),
)


@pytest.mark.parametrize("codec", codecs, ids=["auto", "zlib", "none", "zstd+mac"])
@given(entry=_crlf_entries)
def test_eol_round_trips_and_frames_the_wire_part(codec: MsgpackCodec, entry: Entry) -> None:
    data = codec.encode(entry)
    assert codec.decode(data) == entry
    wire = codec.decode_wire(data)
    assert wire.eol == entry.eol
    assert entry.events is not None
    assert wire.sse == serialize_sse(entry.events, eol=entry.eol)


# Written by the code before Entry.eol existed (a 9-field head): Entry(schema="generic",
# created_at=1.0, events=(Event("a", "t", at=0.5), Event("b\nc", id="7", at=1.0)),
# meta={"k": "v"}), MsgpackCodec(compression="none").
OLD_ENTRY = bytes.fromhex(
    "5353454302a16852871203ee97673e252eef103f409399a767656e65726963cb3ff0000000000000ccc8b174"
    "6578742f6576656e742d73747265616d81a16ba176c302cb3ff0000000000000c0c429009692a161a3620a63"
    "92a174c0c402000192cb3fe0000000000000cb3ff000000000000092c0a137c0c42a006576656e743a20740a"
    "646174613a20610a0a69643a20370a646174613a20620a646174613a20630a0a"
)


def test_entries_written_before_eol_decode_as_lf() -> None:
    codec = MsgpackCodec()
    entry = codec.decode(OLD_ENTRY)
    events = (Event("a", "t", at=0.5), Event("b\nc", id="7", at=1.0))
    assert entry == Entry(schema="generic", created_at=1.0, events=events, meta={"k": "v"})
    assert entry.eol == "lf"
    wire = codec.decode_wire(OLD_ENTRY)
    assert wire.eol == "lf" and wire.sse == serialize_sse(events)
    # And a forged old head (nine fields) with other columns: LF too.
    forged = _forged_with_columns([["x", "y"], [None], b"\x00\x00", [0.0, 1.0], None, None])
    assert codec.decode(forged).eol == codec.decode_wire(forged).eol == "lf"


class _HeadBeforeEol(msgspec.Struct, array_like=True):
    # What the code before Entry.eol reads: the head without its last two fields.
    schema: str
    created_at: float
    status: int
    content_type: str
    meta: dict[str, str]
    stream: bool
    count: int
    duration: float
    expires_at: float | None


class _HeadBeforeVerbatim(_HeadBeforeEol, array_like=True):
    eol: str = "lf"


def test_old_readers_ignore_the_new_head_fields() -> None:
    entry = Entry(
        schema="generic",
        created_at=1.0,
        events=(Event("a", id="1"),),
        eol="crlf",
        wire=b"data: a\r\nid: 1\r\n\r\n",
    )
    data = MsgpackCodec(compression="none").encode(entry)
    for head_type in (_HeadBeforeEol, _HeadBeforeVerbatim):
        head, _, wire = msgspec.msgpack.decode(data[21:], type=tuple[head_type, bytes, bytes])
        assert head.count == 1
        assert wire == b"\x00" + entry.wire  # an old reader's instant replay: these bytes
    assert (
        msgspec.msgpack.decode(data[21:], type=tuple[_HeadBeforeVerbatim, bytes, bytes])[0].eol
        == "crlf"
    )


@pytest.mark.parametrize("compression", ["none", "zlib", "auto"])
def test_a_stream_stored_as_its_bytes_round_trips(compression: str) -> None:
    # A stream that was not in the canonical form keeps the bytes it came in: decode gives
    # them back with the events, and the instant replay's wire part is those bytes.
    events = (Event("a", "t", id="1"), Event("b\nc", at=0.5))
    wire = b": hi\ndata: a\nevent: t\nid: 1\n\ndata:b\ndata: c\n\n"
    entry = Entry(schema="generic", created_at=1.0, events=events, wire=wire)
    codec = MsgpackCodec(compression=compression)  # type: ignore[arg-type]
    data = codec.encode(entry)
    assert codec.decode(data) == entry
    assert codec.decode_wire(data).sse == wire
    canonical = Entry(schema="generic", created_at=1.0, events=events)
    assert codec.decode(codec.encode(canonical)).wire is None
    assert codec.decode_wire(codec.encode(canonical)).sse == serialize_sse(events)


def test_only_a_recorded_stream_has_wire_bytes() -> None:
    with pytest.raises(ValueError, match="wire"):
        Entry(schema="g", created_at=1.0, body=b"{}", wire=b"data: x\n\n")


def test_eol_is_validated() -> None:
    with pytest.raises(ValueError, match="eol"):
        Entry(schema="g", created_at=1.0, events=(), eol="cr")  # type: ignore[arg-type]
    body = Entry(schema="g", created_at=1.0, body=b"{}")
    assert MsgpackCodec().decode_wire(MsgpackCodec().encode(body)).eol == "lf"


def test_a_secret_is_rotated_without_emptying_the_cache() -> None:
    # Entries under a secret the reader does not know fail as corrupt and are deleted: two
    # fleets with different secrets on one backend deleted each other's (helper-89). With
    # accepted_secrets, a reader takes the next (or the previous) secret's entries too, and
    # writes with its own.
    entry = Entry(schema="s", created_at=1.0, body=b'{"a": 1}')
    old, new = b"old-secret", b"new-secret"
    written_old = MsgpackCodec(secret=old).encode(entry)
    step_one = MsgpackCodec(secret=old, accepted_secrets=[new])
    step_two = MsgpackCodec(secret=new, accepted_secrets=[old])
    written_new = step_two.encode(entry)
    assert written_new == MsgpackCodec(secret=new).encode(entry)  # written with its own
    for reader in (step_one, step_two):
        assert reader.decode(written_old) == entry
        assert reader.decode(written_new) == entry
    with pytest.raises(CorruptEntry):
        MsgpackCodec(secret=new).decode(written_old)  # the last step reads only its own
    with pytest.raises(CorruptEntry):
        step_two.decode(MsgpackCodec(secret=b"a third").encode(entry))
    # None stands for no secret: a cache written without one takes one on.
    unkeyed = MsgpackCodec().encode(entry)
    assert MsgpackCodec(secret=new, accepted_secrets=[None]).decode(unkeyed) == entry
    with pytest.raises(CorruptEntry):
        MsgpackCodec(secret=new).decode(unkeyed)
    for bad in (b"new-secret", "s", [b""], ["s"], 7):
        with pytest.raises(ConfigError, match="accepted_secrets"):
            MsgpackCodec(accepted_secrets=bad)  # type: ignore[arg-type]

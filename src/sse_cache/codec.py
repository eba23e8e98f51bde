"""Entry <-> bytes: msgspec MessagePack inside a versioned, checksummed envelope.

Envelope::

    b"SSEC" | format version (u8) | BLAKE2b-128 digest of the rest (16 bytes) | payload

The payload is a MessagePack array ``[head, columns, wire]``:

- ``head``: schema, times, status, content type, meta, event count, line-end style (small,
  uncompressed);
- ``columns``: the events column by column (every ``data``, every type, every ``at``, ...),
  or the non-stream body — what :meth:`MsgpackCodec.decode` needs to rebuild ``Event``\\ s;
- ``wire``: the events already written as SSE bytes — what an HTTP integration sends on an
  instant replay, without building a single ``Event`` (:meth:`decode_wire`): the canonical
  form, or the stream's recorded bytes when it was not in that form (``Entry.wire``; the
  head says which).

Schema evolution (msgspec's rules for array-like structs): a new field goes last, with a
default. Decoding an older payload fills the default in; an older reader ignores trailing
fields it does not know. ``_Head.eol`` came so (an entry without it replays with LF line
ends), and ``_Head.verbatim`` (an older reader sends those bytes on an instant replay, and
writes its paced replays in the canonical form), which is why neither needed a new format
version (a version changes every key).

``columns`` and ``wire`` are compressed separately (zstd or zlib, each tagged by a leading
method byte), so each way of reading decompresses and decodes only its own part: decoding is
what bounds a replay (docs/benchmarks.md). zstd sees the repeated text of a stream's
``*.done`` events inside each part, which keeps an entry ~10-20x smaller than its SSE.

The digest covers everything after it; with ``secret`` it is a keyed BLAKE2b MAC, so entries
written by anyone without the secret (a shared Redis, say) are rejected.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import zlib
from collections.abc import Iterable
from itertools import repeat
from types import ModuleType
from typing import Final, Literal

import msgspec

from ._checks import integer
from .entry import ENTRY_FORMAT_VERSION, Entry
from .errors import ConfigError, CorruptEntry, UnreadableEntry
from .events import EOL, Event, serialize_sse

_zstd: ModuleType | None
try:  # optional: sse-cache[zstd]
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised only without the extra
    _zstd = None

__all__ = ["Compression", "MsgpackCodec", "WireEntry", "zstd_available"]

Compression = Literal["auto", "zstd", "zlib", "none"]

_MAGIC: Final = b"SSEC"
_DIGEST = 16
_HEADER = len(_MAGIC) + 1 + _DIGEST
_NONE, _ZLIB, _ZSTD = 0, 1, 2
_NAMES = {"none": _NONE, "zlib": _ZLIB, "zstd": _ZSTD}


def zstd_available() -> bool:
    """Whether zstd compression can be used (the ``zstandard`` package is installed)."""
    return _zstd is not None


class WireEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An entry as an HTTP integration replays it: the recorded events as SSE bytes (``sse``,
    in the canonical form with the recorded line ends, ``eol``, or the recorded bytes
    themselves, :attr:`Entry.wire`; None for a non-stream entry, whose ``body`` is set
    instead)."""

    schema: str
    created_at: float
    status: int
    content_type: str
    meta: dict[str, str]
    count: int
    duration: float
    sse: bytes | None = None
    body: bytes | None = None
    expires_at: float | None = None
    eol: EOL = "lf"

    @property
    def is_stream(self) -> bool:
        return self.sse is not None


class _Head(msgspec.Struct, array_like=True):
    schema: str
    created_at: float
    status: int
    content_type: str
    meta: dict[str, str]
    stream: bool
    count: int
    duration: float
    expires_at: float | None
    # Added after format version 2 shipped: last, with a default (see the module docstring).
    eol: EOL = "lf"
    # The wire part is the stream's recorded bytes (Entry.wire), not the canonical form.
    verbatim: bool = False


class _Columns(msgspec.Struct, array_like=True):
    # Event types are few and repeat (a stream is mostly "...delta" events): each is stored
    # once in ``type_names`` and the column holds indices into it, one byte each while a
    # stream has at most 256 types. Decoding a string per event cost more than the
    # indices, and every event of a type now shares one string in memory.
    # ids/retries are None when no event has one: the common case, and a column of nils
    # would cost decode time for nothing.
    data: list[str]
    type_names: list[str | None]
    types: bytes | list[int]
    at: list[float]
    ids: list[str | None] | None
    retries: list[int | None] | None


_encoder = msgspec.msgpack.Encoder()
_parts_decoder = msgspec.msgpack.Decoder(tuple[_Head, bytes, bytes])
_columns_decoder = msgspec.msgpack.Decoder(_Columns)


def _digest(version: bytes, payload: bytes | memoryview, key: bytes) -> bytes:
    h = hashlib.blake2b(version, digest_size=_DIGEST, key=key)
    h.update(payload)
    return h.digest()


def _check_secret(name: str, secret: object) -> None:
    if not isinstance(secret, bytes | bytearray):
        # (a str failed at the first encode: nothing was ever stored)
        raise ConfigError(f"{name} must be bytes, got {type(secret).__name__}")
    if not 1 <= len(secret) <= 64:
        raise ConfigError(f"{name} must be 1 to 64 bytes long")


class MsgpackCodec:
    """The default :class:`~sse_cache.protocols.EventCodec` (also a
    :class:`~sse_cache.protocols.WireCodec`).

    ``compression``: ``"auto"`` (zstd when installed, else zlib), ``"zstd"``, ``"zlib"`` or
    ``"none"``; parts under ``min_compress_bytes`` are stored uncompressed. Decoding reads
    whatever compression an entry says it has, so the setting can change on a live cache.
    ``max_decoded_bytes`` bounds decompression (a hostile entry cannot expand without limit).
    ``secret`` turns the checksum into a MAC. ``accepted_secrets``: more secrets whose
    entries are read (never written), to change the secret without emptying the cache —
    entries under a secret the reader does not know fail as corrupt and are deleted, so two
    fleets with different secrets on one backend delete each other's (helper-89). Rotate in
    three steps: every process gets ``accepted_secrets=[new]``; then ``secret=new,
    accepted_secrets=[old]``; then ``secret=new`` alone (``None`` in the list stands for no
    secret: to add one to a cache written without). ``decode``/``decode_wire`` raise
    :class:`CorruptEntry` for any input they cannot trust, and never return another entry than
    the one encoded.
    """

    def __init__(
        self,
        *,
        compression: Compression = "auto",
        level: int = 3,
        min_compress_bytes: int = 1024,
        max_decoded_bytes: int = 256 * 1024 * 1024,
        secret: bytes | None = None,
        accepted_secrets: Iterable[bytes | None] = (),
    ) -> None:
        if compression == "auto":
            compression = "zstd" if _zstd is not None else "zlib"
        if compression not in _NAMES:
            raise ConfigError(
                f"unknown compression {compression!r}; expected auto, zstd, zlib or none"
            )
        if compression == "zstd" and _zstd is None:
            raise ConfigError(
                "compression='zstd' needs the zstandard package: pip install 'sse-cache[zstd]'"
            )
        if secret is not None:
            _check_secret("secret", secret)
        if isinstance(accepted_secrets, bytes | bytearray | str) or not isinstance(
            accepted_secrets, Iterable
        ):
            raise ConfigError(
                f"accepted_secrets must be a list of secrets (bytes), got {accepted_secrets!r}"
            )
        accepted = tuple(accepted_secrets)
        for item in accepted:
            if item is not None:  # (None: entries written without a secret)
                _check_secret("accepted_secrets", item)
        level = integer("level", level, minimum=-(2**31))
        min_compress_bytes = integer("min_compress_bytes", min_compress_bytes, minimum=0)
        max_decoded_bytes = integer("max_decoded_bytes", max_decoded_bytes)
        self.compression: str = compression
        self._method = _NAMES[compression]
        self._level = level
        self._min_compress = min_compress_bytes
        self._max_decoded = max_decoded_bytes
        self._key = secret or b""
        #: Keys an entry's digest may be made with, the written one first.
        self._keys = tuple(dict.fromkeys((self._key, *(bytes(k or b"") for k in accepted))))
        self._zstd_c = _zstd.ZstdCompressor(level=level) if _zstd is not None else None
        self._zstd_d = _zstd.ZstdDecompressor() if _zstd is not None else None

    # -- encode ---------------------------------------------------------------------------

    def encode(self, entry: Entry) -> bytes:
        """Serialise ``entry`` into the envelope described in the module docstring."""
        if entry.version != ENTRY_FORMAT_VERSION:
            raise ValueError(f"cannot encode an entry of format version {entry.version}")
        if not math.isfinite(entry.created_at) or (
            entry.expires_at is not None and not math.isfinite(entry.expires_at)
        ):
            raise ValueError("entry timestamps must be finite numbers")
        events = entry.events
        if events is None:
            if entry.body is None:
                raise ValueError("an entry needs events or a body")
            head = _Head(
                entry.schema,
                entry.created_at,
                entry.status,
                entry.content_type,
                entry.meta,
                False,
                0,
                0.0,
                entry.expires_at,
            )
            columns, wire = self._pack(entry.body), b""
        else:
            ids: list[str | None] | None = [e.id for e in events]
            if all(i is None for i in ids):  # type: ignore[union-attr]
                ids = None
            retries: list[int | None] | None = [e.retry for e in events]
            if all(r is None for r in retries):  # type: ignore[union-attr]
                retries = None
            type_names: dict[str | None, int] = {}
            indices = [type_names.setdefault(e.event, len(type_names)) for e in events]
            cols = _Columns(
                [e.data for e in events],
                list(type_names),
                bytes(indices) if len(type_names) <= 256 else indices,
                [e.at for e in events],
                ids,
                retries,
            )
            head = _Head(
                entry.schema,
                entry.created_at,
                entry.status,
                entry.content_type,
                entry.meta,
                True,
                len(events),
                events[-1].at if events else 0.0,
                entry.expires_at,
                entry.eol,
                entry.wire is not None,
            )
            columns = self._pack(_encoder.encode(cols))
            wire = self._pack(
                entry.wire if entry.wire is not None else serialize_sse(events, eol=entry.eol)
            )
        payload = _encoder.encode((head, columns, wire))
        version = bytes((ENTRY_FORMAT_VERSION,))
        return _MAGIC + version + _digest(version, payload, self._key) + payload

    def _pack(self, raw: bytes) -> bytes:
        method = self._method if len(raw) >= self._min_compress else _NONE
        if method == _ZSTD:
            assert self._zstd_c is not None
            packed: bytes = self._zstd_c.compress(raw)
            return b"\x02" + packed
        if method == _ZLIB:
            return b"\x01" + zlib.compress(raw, min(max(self._level, 1), 9))
        return b"\x00" + raw

    # -- decode ---------------------------------------------------------------------------

    def decode(self, data: bytes) -> Entry:
        """Parse bytes written by :meth:`encode`; :class:`CorruptEntry` on anything else."""
        head, columns, wire = self._open(data)
        body = self._unpack(columns)
        if not head.stream:
            return Entry(
                schema=head.schema,
                created_at=head.created_at,
                status=head.status,
                content_type=head.content_type,
                body=bytes(body),
                meta=head.meta,
                expires_at=head.expires_at,
            )
        try:
            cols = _columns_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise CorruptEntry(f"entry events do not decode: {exc}") from None
        n = len(cols.data)
        names, indices = cols.type_names, cols.types
        if not n == len(indices) == len(cols.at) == head.count:
            raise CorruptEntry("entry event columns are inconsistent")
        if n and not 0 <= min(indices) <= max(indices) < len(names):
            raise CorruptEntry("entry event types are inconsistent")
        ids = cols.ids if cols.ids is not None else repeat(None, n)
        retries = cols.retries if cols.retries is not None else repeat(None, n)
        if (cols.ids is not None and len(cols.ids) != n) or (
            cols.retries is not None and len(cols.retries) != n
        ):
            raise CorruptEntry("entry event columns are inconsistent")
        types = map(names.__getitem__, indices)
        events = tuple(map(Event, cols.data, types, ids, retries, cols.at))
        return Entry(
            schema=head.schema,
            created_at=head.created_at,
            status=head.status,
            content_type=head.content_type,
            events=events,
            meta=head.meta,
            expires_at=head.expires_at,
            eol=head.eol,
            wire=bytes(self._unpack(wire)) if head.verbatim else None,
        )

    def decode_wire(self, data: bytes) -> WireEntry:
        """Like :meth:`decode`, but the events come as their canonical SSE bytes (what an
        instant HTTP replay sends) and are never turned into ``Event`` objects."""
        head, columns, wire = self._open(data)
        if head.stream:
            sse, body = bytes(self._unpack(wire)), None
        else:
            sse, body = None, bytes(self._unpack(columns))
        return WireEntry(
            schema=head.schema,
            created_at=head.created_at,
            status=head.status,
            content_type=head.content_type,
            meta=head.meta,
            count=head.count,
            duration=head.duration,
            sse=sse,
            body=body,
            expires_at=head.expires_at,
            eol=head.eol,
        )

    def _open(self, data: bytes) -> tuple[_Head, bytes, bytes]:
        view = memoryview(data)
        if len(view) < _HEADER or view[:4].tobytes() != _MAGIC:
            raise CorruptEntry("not an sse_cache entry (bad magic or too short)")
        version = view[4]
        if version != ENTRY_FORMAT_VERSION:
            raise UnreadableEntry(f"entry format version {version} is not supported")
        payload = view[_HEADER:]
        found, tag = view[5:_HEADER], bytes((version,))
        if not hmac.compare_digest(_digest(tag, payload, self._key), found) and not any(
            hmac.compare_digest(_digest(tag, payload, key), found) for key in self._keys[1:]
        ):
            # (Or a secret this codec does not know: processes with different secrets on one
            # backend delete each other's entries, and an operator changing it reads this.)
            raise CorruptEntry(
                "entry checksum mismatch (altered, truncated or foreign bytes, or written "
                "with a secret not given here: see accepted_secrets)"
            )
        try:
            parts = _parts_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise CorruptEntry(f"entry payload does not decode: {exc}") from None
        head = parts[0]
        if not math.isfinite(head.created_at) or (
            head.expires_at is not None and not math.isfinite(head.expires_at)
        ):
            raise CorruptEntry("entry timestamps are not finite numbers")
        if not 200 <= head.status < 300:
            # Only 2xx answers are stored; a hit sends this status with a body.
            raise CorruptEntry(f"entry status {head.status} is not a 2xx")
        return parts

    def checksum_refused(self, data: bytes) -> bool:
        """Whether this codec refuses ``data`` for its checksum alone: the envelope and the
        head are sound, and the digest matches none of this codec's secrets — an entry
        written with another secret, or one altered since (the two cannot be told apart).
        For tools that report entries (``sse-cache ls -l``); decoding never relies on it."""
        view = memoryview(data)
        if len(view) < _HEADER or view[:4].tobytes() != _MAGIC:
            return False
        version = view[4]
        if version != ENTRY_FORMAT_VERSION:
            return False
        payload, found, tag = view[_HEADER:], view[5:_HEADER], bytes((version,))
        if any(hmac.compare_digest(_digest(tag, payload, key), found) for key in self._keys):
            return False  # the checksum matched: refused for something else
        try:
            head = _parts_decoder.decode(payload)[0]
        except msgspec.DecodeError:
            return False
        finite = math.isfinite(head.created_at) and (
            head.expires_at is None or math.isfinite(head.expires_at)
        )
        return finite and 200 <= head.status < 300

    def _unpack(self, part: bytes) -> bytes | memoryview:
        if not part:
            raise CorruptEntry("entry part is empty")
        method, view = part[0], memoryview(part)[1:]
        limit = self._max_decoded
        try:
            if method == _NONE:
                return view
            if method == _ZSTD:
                if _zstd is None or self._zstd_d is None:
                    raise UnreadableEntry("entry is zstd-compressed; install sse-cache[zstd]")
                # We always write the content size; a frame without one is not ours.
                size = _zstd.frame_content_size(view)
                if size < 0:
                    raise CorruptEntry("zstd frame without its content size")
                if size > limit:
                    raise UnreadableEntry(f"entry expands past max_decoded_bytes={limit}")
                out: bytes = self._zstd_d.decompress(view)
            elif method == _ZLIB:
                out = zlib.decompressobj().decompress(view, limit + 1)
            else:
                raise CorruptEntry(f"unknown compression method {method}")
        except CorruptEntry:
            raise
        except Exception as exc:  # zlib.error, zstd.ZstdError: both mean damaged bytes
            raise CorruptEntry(f"entry does not decompress: {exc}") from None
        if len(out) > limit:
            raise UnreadableEntry(f"entry expands past max_decoded_bytes={limit}")
        return out

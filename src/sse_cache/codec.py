"""Entry <-> bytes: msgspec MessagePack inside a versioned, checksummed envelope.

Envelope (all integers big-endian)::

    b"SSEC" | format version (u8) | compression (u8) | BLAKE2b-128 digest (16 bytes) | payload

The digest covers the version, compression and payload bytes; with ``secret`` it is a keyed
BLAKE2b MAC, so entries written by anyone without the secret (a shared Redis, say) are
rejected. The payload stores events column by column (all ``data`` strings, then all types,
...), which msgspec decodes several times faster than a list of per-event maps: decode time
is what bounds a replay (``../shared/LIMITS.md``).
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from types import ModuleType
from typing import Any, Final, Literal

import msgspec

from .entry import ENTRY_FORMAT_VERSION, Entry
from .errors import ConfigError, CorruptEntry
from .events import Event

_zstd: ModuleType | None
try:  # optional: sse-cache[zstd]
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised only without the extra
    _zstd = None

__all__ = ["Compression", "MsgpackCodec", "zstd_available"]

Compression = Literal["auto", "zstd", "zlib", "none"]

_MAGIC: Final = b"SSEC"
_HEADER = len(_MAGIC) + 2
_DIGEST = 16
_NONE, _ZLIB, _ZSTD = 0, 1, 2
_NAMES = {"none": _NONE, "zlib": _ZLIB, "zstd": _ZSTD}


def zstd_available() -> bool:
    """Whether zstd compression can be used (the ``zstandard`` package is installed)."""
    return _zstd is not None


class _WireEntry(msgspec.Struct, array_like=True):
    schema: str
    created_at: float
    status: int
    content_type: str
    meta: dict[str, str]
    body: bytes | None
    # Event columns; None when the entry holds a body. ids/retries are None when no event
    # has one, which is the common case and saves decoding a column of nils.
    data: list[str] | None
    types: list[str | None] | None
    at: list[float] | None
    ids: list[str | None] | None
    retries: list[int | None] | None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_WireEntry)


class MsgpackCodec:
    """The default :class:`~sse_cache.protocols.EventCodec`.

    ``compression``: ``"auto"`` (zstd when installed, else zlib), ``"zstd"``, ``"zlib"`` or
    ``"none"``; payloads under ``min_compress_bytes`` are stored uncompressed. Decoding reads
    whatever compression an entry says it has, so the setting can change on a live cache.
    ``max_decoded_bytes`` bounds decompression (a hostile entry cannot expand without limit).
    ``secret`` turns the checksum into a MAC. ``decode`` raises :class:`CorruptEntry` for any
    input it cannot trust, and never returns a different entry than was encoded.
    """

    def __init__(
        self,
        *,
        compression: Compression = "auto",
        level: int = 3,
        min_compress_bytes: int = 1024,
        max_decoded_bytes: int = 256 * 1024 * 1024,
        secret: bytes | None = None,
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
        if secret is not None and not 1 <= len(secret) <= 64:
            raise ConfigError("secret must be 1 to 64 bytes long")
        self.compression: str = compression
        self._method = _NAMES[compression]
        self._level = level
        self._min_compress = min_compress_bytes
        self._max_decoded = max_decoded_bytes
        self._key = secret or b""
        self._zstd_c = _zstd.ZstdCompressor(level=level) if _zstd is not None else None
        self._zstd_d = _zstd.ZstdDecompressor() if _zstd is not None else None

    # -- encode ---------------------------------------------------------------------------

    def encode(self, entry: Entry) -> bytes:
        """Serialise ``entry`` into the envelope described in the module docstring."""
        if entry.version != ENTRY_FORMAT_VERSION:
            raise ValueError(f"cannot encode an entry of format version {entry.version}")
        events = entry.events
        if events is None:
            wire = _WireEntry(
                entry.schema,
                entry.created_at,
                entry.status,
                entry.content_type,
                entry.meta,
                entry.body,
                None,
                None,
                None,
                None,
                None,
            )
        else:
            ids: list[str | None] | None = [e.id for e in events]
            if not any(i is not None for i in ids):  # type: ignore[union-attr]
                ids = None
            retries: list[int | None] | None = [e.retry for e in events]
            if not any(r is not None for r in retries):  # type: ignore[union-attr]
                retries = None
            wire = _WireEntry(
                entry.schema,
                entry.created_at,
                entry.status,
                entry.content_type,
                entry.meta,
                entry.body,
                [e.data for e in events],
                [e.event for e in events],
                [e.at for e in events],
                ids,
                retries,
            )
        payload = _encoder.encode(wire)
        method = self._method if len(payload) >= self._min_compress else _NONE
        if method == _ZSTD:
            assert self._zstd_c is not None
            payload = self._zstd_c.compress(payload)
        elif method == _ZLIB:
            payload = zlib.compress(payload, min(max(self._level, 1), 9))
        head = bytes((ENTRY_FORMAT_VERSION, method))
        return _MAGIC + head + self._digest(head, payload) + payload

    # -- decode ---------------------------------------------------------------------------

    def decode(self, data: bytes) -> Entry:
        """Parse bytes written by :meth:`encode`; :class:`CorruptEntry` on anything else."""
        view = memoryview(data)
        if len(view) < _HEADER + _DIGEST or view[:4].tobytes() != _MAGIC:
            raise CorruptEntry("not an sse_cache entry (bad magic or too short)")
        version, method = view[4], view[5]
        if version != ENTRY_FORMAT_VERSION:
            raise CorruptEntry(f"entry format version {version} is not supported")
        payload = view[_HEADER + _DIGEST :]
        head = bytes(view[4:_HEADER])
        if not hmac.compare_digest(self._digest(head, payload), view[_HEADER : _HEADER + _DIGEST]):
            raise CorruptEntry("entry checksum mismatch (altered, truncated or foreign bytes)")
        raw = self._decompress(method, payload)
        try:
            wire = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise CorruptEntry(f"entry payload does not decode: {exc}") from None
        return _to_entry(wire)

    def _digest(self, head: bytes, payload: Any) -> bytes:
        h = hashlib.blake2b(head, digest_size=_DIGEST, key=self._key)
        h.update(payload)
        return h.digest()

    def _decompress(self, method: int, payload: memoryview) -> bytes | memoryview:
        limit = self._max_decoded
        try:
            if method == _NONE:
                return payload
            if method == _ZSTD:
                if _zstd is None or self._zstd_d is None:
                    raise CorruptEntry("entry is zstd-compressed; install sse-cache[zstd]")
                # We always write the content size; a frame without one is not ours.
                size = _zstd.frame_content_size(payload)
                if size < 0 or size > limit:
                    raise CorruptEntry(f"zstd frame size {size} is unknown or over {limit}")
                out: bytes = self._zstd_d.decompress(payload)
            elif method == _ZLIB:
                out = zlib.decompressobj().decompress(payload, limit + 1)
            else:
                raise CorruptEntry(f"unknown compression method {method}")
        except CorruptEntry:
            raise
        except Exception as exc:  # zlib.error, zstd.ZstdError: both mean damaged bytes
            raise CorruptEntry(f"entry does not decompress: {exc}") from None
        if len(out) > limit:
            raise CorruptEntry(f"entry expands past max_decoded_bytes={limit}")
        return out


def _to_entry(w: _WireEntry) -> Entry:
    events: tuple[Event, ...] | None = None
    if w.data is not None:
        data, types, at = w.data, w.types, w.at
        if types is None or at is None or not len(data) == len(types) == len(at):
            raise CorruptEntry("entry event columns are inconsistent")
        if w.ids is None and w.retries is None:
            events = tuple(map(Event, data, types, _nones(len(data)), _nones(len(data)), at))
        else:
            ids = w.ids if w.ids is not None else _nones(len(data))
            retries = w.retries if w.retries is not None else _nones(len(data))
            if not len(ids) == len(retries) == len(data):
                raise CorruptEntry("entry event columns are inconsistent")
            events = tuple(map(Event, data, types, ids, retries, at))
    elif w.body is None:
        raise CorruptEntry("entry holds neither events nor a body")
    return Entry(
        schema=w.schema,
        created_at=w.created_at,
        status=w.status,
        content_type=w.content_type,
        events=events,
        body=w.body,
        meta=w.meta,
    )


def _nones(n: int) -> list[None]:
    return [None] * n

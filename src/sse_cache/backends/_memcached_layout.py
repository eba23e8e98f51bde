"""How the memcached backend lays a value out in memcached items: keys, flags, the expiry
packed into the flags, and the manifest of a value stored in chunks. Pure: no I/O.

Layout of what is stored for a key; the item's 32-bit memcached ``flags`` say which:

- kind 0 (``flags == 0``, :data:`RAW`): the value as is, no TTL;
- kind 1 (:data:`TIMED`): the value as is, with a TTL: the upper 30 bits of the flags hold the
  expiry time in 1/8 s ticks, modulo 2**30 (see :func:`pack_deadline`). Keeping the expiry
  out of the value means no copy of a large value on either side, which matters: a 400 KB
  copy costs about as much as the whole GET on a small VM;
- kind 2 (:data:`MANIFEST`): a *manifest* for a value larger than the chunk size: magic,
  expiry time, total length, chunk size, number of chunks and a random 16-byte *write id*.
  The chunks are stored under keys derived from the key and that write id, the manifest
  under the key. Two writes therefore never share a chunk key, and a reader fetches the
  chunks named by the manifest it read and checks every chunk's length: it returns the
  complete value of one write or a miss, never a mix or a part. (No hash of the value is
  checked on read: it would cost a third of a chunked GET and guard against nothing a write
  id does not — integrity against a memory fault or a deliberate writer is the codec's
  digest, checked on every entry.)
  A backend remembers the write ids of chunked values it read or wrote lately
  (:class:`WriteHints`) and asks for the manifest and those chunks in one round trip; it uses
  the chunks only when the manifest still names that write id, and fetches the right ones
  otherwise.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
from collections import OrderedDict
from typing import Final, NamedTuple

from ._common import check_key

__all__ = [
    "MANIFEST",
    "MAX_CHUNKS",
    "MIN_CHUNK_SIZE",
    "RAW",
    "TIMED",
    "Manifest",
    "WriteHints",
    "chunk_keys",
    "flags_for",
    "is_expired",
    "item_key",
    "kind",
    "pack_deadline",
    "server_expiry",
]

RAW, TIMED, MANIFEST = 0, 1, 2
_KIND_MASK: Final = 0b11
_TICKS_PER_SECOND: Final = 8
_TICK_MODULO: Final = 1 << 30
# A deadline is "ahead" when it is less than half the modulo (about 2.1 years) in the future;
# longer TTLs are left to memcached's own expiry.
_MAX_CLIENT_TTL: Final = (_TICK_MODULO // 2 - 2) / _TICKS_PER_SECOND
_MANIFEST_MAGIC: Final = b"SSEM\x02"
_MANIFEST_BODY = struct.Struct(">dQII16s")  # deadline, total, chunk size, count, write id
_MAX_KEY: Final = 250
_THIRTY_DAYS: Final = 30 * 24 * 3600
# memcached reads ``exptime`` as a signed 32-bit number: a Unix time past January 2038 would
# be an item that expired already.
_LAST_UNIX_TIME: Final = 2**31 - 1
#: The most chunks a value is stored in (32 GiB at the default chunk size; 32 MiB, the
#: engine's default max_entry_bytes, at the smallest): a manifest naming more is not ours.
#: (Without a bound, a manifest written by anyone who can reach memcached could make one read
#: build and fetch millions of keys.)
MAX_CHUNKS: Final = 32768
#: The smallest ``chunk_size`` a backend takes; a manifest with smaller chunks is not ours.
MIN_CHUNK_SIZE: Final = 1024


def kind(flags: int) -> int:
    """Which layout an item's flags say it has (:data:`RAW`, :data:`TIMED`, :data:`MANIFEST`
    or another number: not written by this backend)."""
    return flags & _KIND_MASK


def flags_for(now: float, deadline: float | None) -> int:
    """The flags of a value stored as one item: :data:`RAW` without a deadline (or one too far
    ahead to pack), else the packed deadline."""
    if deadline is None or deadline - now > _MAX_CLIENT_TTL:
        return RAW
    return pack_deadline(deadline)


def pack_deadline(deadline: float) -> int:
    """Flags of a kind-1 item: the deadline in 1/8 s ticks modulo 2**30, rounded *up* (an
    entry may live up to 1/8 s longer than asked, never shorter), shifted past the kind."""
    ticks = math.ceil(deadline * _TICKS_PER_SECOND) % _TICK_MODULO
    return (ticks << 2) | TIMED


def is_expired(flags: int, now: float) -> bool:
    """Whether the deadline packed in a kind-1 item's ``flags`` has passed at ``now``."""
    ticks = flags >> 2
    now_ticks = math.floor(now * _TICKS_PER_SECOND) % _TICK_MODULO
    # Modular distance from now to the deadline: a deadline in the past wraps to a large one.
    ahead = (ticks - now_ticks) % _TICK_MODULO
    return ahead == 0 or ahead >= _TICK_MODULO // 2


def server_expiry(now: float, deadline: float | None) -> int:
    """memcached's ``exptime`` for an item that this backend treats as expired at
    ``deadline`` (0: never)."""
    if deadline is None:
        return 0
    # memcached counts whole seconds and reads values over 30 days as a Unix time; one
    # second of slack so the server never drops an item before our own check would.
    seconds = math.ceil(deadline - now) + 1
    if seconds <= _THIRTY_DAYS:
        return seconds
    # Past 2038, the last time memcached can be given: the item may go earlier than asked
    # (as any cached item may), never later.
    return min(math.ceil(deadline) + 1, _LAST_UNIX_TIME)


def item_key(prefix: str, key: str) -> str:
    """The memcached key of the item stored for ``key``: ``{prefix}e:{key}``, or
    ``{prefix}h:{blake2b}`` for a key memcached would not take as it is."""
    # A str that UTF-8 can encode, as every backend wants (a lone surrogate: ValueError).
    check_key(key)
    plain = prefix + "e:" + key
    # Leave room for nothing else: chunk keys are derived from a hash, not from this.
    if len(plain) <= _MAX_KEY and all(0x21 <= ord(c) <= 0x7E for c in plain):
        return plain
    digest = hashlib.blake2b(key.encode(), digest_size=20)
    return prefix + "h:" + digest.hexdigest()


def chunk_keys(prefix: str, item_key: str, write_id: bytes, count: int) -> list[str]:
    """The keys of the ``count`` chunks of the write ``write_id`` to ``item_key``."""
    # Chunks are keyed by the item key and the write's random id: two writes never
    # overwrite each other's chunks, so a manifest always names chunks of its own value.
    name = hashlib.blake2b(item_key.encode() + write_id, digest_size=16).hexdigest()
    return [f"{prefix}c:{name}:{i}" for i in range(count)]


class Manifest(NamedTuple):
    """What a kind-2 item says about a value stored in chunks."""

    deadline: float | None
    total: int
    chunk_size: int
    chunk_count: int
    write_id: bytes

    def pack(self) -> bytes:
        deadline = math.nan if self.deadline is None else self.deadline
        return _MANIFEST_MAGIC + _MANIFEST_BODY.pack(
            deadline, self.total, self.chunk_size, self.chunk_count, self.write_id
        )

    @classmethod
    def parse(cls, data: bytes) -> Manifest | None:
        """The manifest in ``data``, or None when it is not one of ours."""
        if len(data) != len(_MANIFEST_MAGIC) + _MANIFEST_BODY.size or not data.startswith(
            _MANIFEST_MAGIC
        ):
            return None
        deadline, total, size, count, write_id = _MANIFEST_BODY.unpack_from(
            data, len(_MANIFEST_MAGIC)
        )
        return cls(None if math.isnan(deadline) else deadline, total, size, count, write_id)

    def is_consistent(self) -> bool:
        """Whether the chunk count fits the total length and chunk size, and both are
        within what this backend writes."""
        return (
            self.chunk_size >= MIN_CHUNK_SIZE
            and self.chunk_count <= MAX_CHUNKS
            and self.chunk_count == -(-self.total // self.chunk_size)
        )


class WriteHints:
    """The write id and chunk count of chunked values read or written lately, by item key: a
    small thread-safe LRU map (the backend's calls run in several worker threads)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bytes, int] | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, value: tuple[bytes, int]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self._size:
                self._items.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

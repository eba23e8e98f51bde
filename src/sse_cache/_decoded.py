"""Recently decoded entries, so that a hot entry is not decoded again on every hit.

Decoding is what bounds a replay (docs/benchmarks.md): rebuilding the events of a
2,000-event stream costs several times more than iterating over them. A hit first reads the
entry's bytes from the backend as usual (so deletes, overwrites and expiry are seen at once),
then reuses the decoded form when those bytes equal the bytes it was decoded from: equal
bytes decode to an equal entry, so nothing is trusted that was not checked when it was first
decoded. The comparison is an identity check for the memory backend and one ``memcmp`` for
the others, both far cheaper than a decode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ._lru import SizedLRU
from .errors import ConfigError

__all__ = ["DecodedEntries"]

_T = TypeVar("_T")
# Memory per event of a decoded stream besides its data text (the Event object, the float of
# its time, a tuple slot; event-type strings are shared since entry format 2, so this errs
# high), measured with tracemalloc.
DECODED_EVENT_BYTES = 200


class DecodedEntries(Generic[_T]):
    """A least-recently-used map ``name -> (bytes, decoded)``, bounded by ``max_bytes`` (the
    stored bytes plus an estimate of the decoded size). ``max_bytes=0`` keeps nothing. It is
    what the ``decoded_cache_bytes`` option of the caches builds, hence the error's name."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ConfigError(f"decoded_cache_bytes must be >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._items: SizedLRU[tuple[bytes, _T]] = SizedLRU(max_bytes)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        return self._items.size

    def get(self, name: str, raw: bytes) -> _T | None:
        """The value decoded from ``raw`` under ``name``, or None when none is kept or it was
        decoded from other bytes (the entry was replaced since)."""
        item = self._items.peek(name)
        if item is None:
            return None
        if item[0] is not raw:
            if item[0] != raw:
                self._items.discard(name)
                return None
            # The same bytes in another object (the backend read them again): keep this one,
            # so the next hit is an identity check again, not a comparison of every byte.
            self._items.swap(name, (raw, item[1]))
            return item[1]
        self._items.touch(name)
        return item[1]

    def put(self, name: str, raw: bytes, value: _T, size_of: Callable[[_T], int]) -> None:
        """Keep ``value`` (decoded from ``raw``; about ``size_of(value)`` bytes in memory)."""
        if len(raw) > self.max_bytes:
            self._items.discard(name)
            return  # (without sizing the value: that costs a pass over a decoded stream)
        self._items.put(name, (raw, value), len(raw) + size_of(value))

    def discard(self, name: str) -> None:
        self._items.discard(name)

    def clear(self) -> None:
        self._items.clear()

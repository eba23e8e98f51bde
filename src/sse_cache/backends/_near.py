"""A near cache: the hot values of a shared backend, kept in this process and served without a
round trip for as long as the backend says that nothing has changed.

It holds bytes exactly as the backend returned them and trusts them only under one *version*
of the store, a token the backend reads cheaply (SQLite's ``PRAGMA data_version``): a value
is put under the version read *before* the value itself was read, and the whole cache is
emptied as soon as the backend sees another version. So a write by any connection or process
that committed before a lookup is never hidden by a value kept from before it: the worst a
write costs is a round trip for every hot key afterwards. Expiry is checked on every use
against the deadline the backend stored. (Redis drops keys one by one as the server reports
them instead, with one constant version: :mod:`~sse_cache.backends._redis_near`.)
"""

from __future__ import annotations

from .._lru import SizedLRU
from ..errors import ConfigError

__all__ = ["NearCache"]

# What a kept value costs besides its bytes (its key, the tuple, the dictionary slot).
_ITEM_OVERHEAD = 200


class NearCache:
    """Values by key, least recently used dropped first, at most ``max_bytes`` in all (values
    plus a per-item estimate); ``max_bytes=0`` keeps nothing. Not thread-safe: one thread
    (the event loop's) uses it."""

    def __init__(self, max_bytes: int, *, option: str = "near_cache") -> None:
        if max_bytes < 0:
            raise ConfigError(f"{option} must be >= 0 bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        #: The version of the store the kept values belong to (None: none kept yet).
        self.version: object = None
        self._items: SizedLRU[tuple[bytes, float | None]] = SizedLRU(max_bytes)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    @property
    def size(self) -> int:
        return self._items.size

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str, now: float) -> bytes | None:
        """The value kept for ``key`` if it has not expired at ``now`` (the backend's clock).
        The caller has checked that the store's version is still :attr:`version`."""
        item = self._items.peek(key)
        if item is None:
            return None
        value, deadline = item
        if deadline is not None and deadline <= now:
            self._items.discard(key)
            return None
        self._items.touch(key)
        return value

    def put(self, key: str, value: bytes, deadline: float | None, version: object) -> None:
        """Keep ``value`` (read under ``version``, expiring at ``deadline``). A value read
        under another version than the one kept so far replaces everything: the values kept
        under the old one cannot be trusted next to it."""
        if version is None:
            return
        if version != self.version:
            self.clear()
            self.version = version
        self._items.put(key, (value, deadline), len(value) + _ITEM_OVERHEAD)

    def check(self, version: object) -> bool:
        """Whether ``version`` (just read from the store) is the one the kept values belong
        to; if not, they are all dropped."""
        if version is not None and version == self.version:
            return True
        self.clear()
        return False

    def discard(self, key: str) -> None:
        self._items.discard(key)

    def clear(self) -> None:
        self._items.clear()
        self.version = None

"""A least-recently-used map bounded by a budget of bytes: what the decoded-entry cache and
the backends' near cache both keep their items in."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["SizedLRU"]

_V = TypeVar("_V")


class SizedLRU(Generic[_V]):
    """Values by key, each with the size it is counted at; the least recently used are
    dropped first so that the sizes add up to at most ``max_bytes``. A value larger than the
    whole budget is not kept. Not thread-safe: one thread (the event loop's) uses it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[str, tuple[_V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def peek(self, key: str) -> _V | None:
        """The value kept for ``key``, without counting it as used."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def touch(self, key: str) -> None:
        """Count ``key`` (kept) as just used."""
        self._items.move_to_end(key)

    def swap(self, key: str, value: _V) -> None:
        """Keep ``value`` under ``key`` (kept) in place of its value, at the same size, as
        just used."""
        _, size = self._items[key]
        self._items[key] = (value, size)
        self._items.move_to_end(key)

    def put(self, key: str, value: _V, size: int) -> None:
        """Keep ``value`` under ``key`` (replacing what was kept), counted as ``size`` bytes."""
        self.discard(key)
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.size += size
        while self.size > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.size -= dropped

    def discard(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.size -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self.size = 0

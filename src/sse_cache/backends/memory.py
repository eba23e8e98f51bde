"""In-process backend: an LRU dictionary with a byte budget and per-entry TTL."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import ConfigError, ValueTooLarge
from ._common import Options, check_key, check_open, expires_at, to_bytes

__all__ = ["MemoryBackend", "from_url"]

_DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class MemoryBackend:
    """Entries in this process's memory, least recently used evicted first.

    Guarantees: every operation is atomic (it runs without yielding to the event loop, so a
    reader sees either the old or the new value); ``get`` never returns an expired entry (TTL
    is checked against ``clock``, monotonic by default, so it is exact to the clock's
    resolution); the values held never total more than ``max_bytes`` and, when given, never
    number more than ``max_entries``: a ``set`` evicts least-recently-*used* entries (``get``
    counts as a use) until the new value fits. A single value larger than ``max_bytes`` is not
    stored: ``set`` removes any previous value of the key and raises
    :class:`~sse_cache.errors.ValueTooLarge`. Nothing is shared between processes or between two
    ``MemoryBackend`` instances; works under asyncio and trio (no I/O at all).

    Capabilities: :class:`~sse_cache.protocols.ScanningBackend`,
    :class:`~sse_cache.protocols.StatsBackend`, :class:`~sse_cache.protocols.NearCachingBackend`.
    """

    def __init__(
        self,
        *,
        max_bytes: int | None = _DEFAULT_MAX_BYTES,
        max_entries: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._clock = clock
        self._bytes = 0
        self._closed = False
        self._hits = self._misses = self._evictions = 0

    def __repr__(self) -> str:
        return f"MemoryBackend(max_bytes={self._max_bytes}, max_entries={self._max_entries})"

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when missing or expired."""
        check_open(self._closed, "MemoryBackend")
        check_key(key)  # (refused as by every backend: a key UTF-8 cannot encode)
        return self._lookup(key)

    def cached(self, key: str) -> bytes | None:
        """What :meth:`get` returns, without awaiting (every value here is near:
        :class:`~sse_cache.protocols.NearCachingBackend`); None once closed. A key it does
        not find is not counted as a miss: the caller asks :meth:`get` next."""
        if self._closed:
            return None
        return self._lookup(key, count_miss=False)

    def _lookup(self, key: str, *, count_miss: bool = True) -> bytes | None:
        item = self._data.get(key)
        if item is not None:
            value, deadline = item
            if deadline is None or deadline > self._clock():
                self._data.move_to_end(key)
                self._hits += 1
                return value
            self._remove(key)
        self._misses += count_miss
        return None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: until evicted)."""
        check_open(self._closed, "MemoryBackend")
        check_key(key)
        value = to_bytes(value)
        deadline = expires_at(self._clock(), ttl)
        self._remove(key)
        if self._max_bytes is not None and len(value) > self._max_bytes:
            raise ValueTooLarge(
                f"value of {len(value)} bytes is larger than max_bytes={self._max_bytes}"
            )
        if deadline is not None and deadline <= self._clock():
            return  # a non-positive TTL: already expired, so nothing to keep
        self._evict_for(len(value))
        self._data[key] = (value, deadline)
        self._bytes += len(value)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        check_open(self._closed, "MemoryBackend")
        check_key(key)
        self._remove(key)

    async def aclose(self) -> None:
        """Drop every entry; later operations raise BackendUnavailable."""
        self._closed = True
        self._data.clear()
        self._bytes = 0

    # -- capabilities ---------------------------------------------------------------------

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Every live key starting with ``prefix`` (a snapshot taken when iteration starts)."""
        check_open(self._closed, "MemoryBackend")
        check_key(prefix, "prefix")
        now = self._clock()
        keys = [
            k
            for k, (_, deadline) in self._data.items()
            if k.startswith(prefix) and (deadline is None or deadline > now)
        ]
        for key in keys:
            yield key

    async def clear(self) -> int:
        """Delete every entry; return how many there were."""
        check_open(self._closed, "MemoryBackend")
        count = len(self._data)
        self._data.clear()
        self._bytes = 0
        return count

    async def stats(self) -> dict[str, int]:
        """``entries``, ``bytes`` (values only), ``max_bytes`` (0: unbounded), ``hits``,
        ``misses``, ``evictions`` (since creation)."""
        check_open(self._closed, "MemoryBackend")
        return {
            "entries": len(self._data),
            "bytes": self._bytes,
            "max_bytes": self._max_bytes or 0,
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
        }

    # -- internals ------------------------------------------------------------------------

    def _remove(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._bytes -= len(item[0])

    def _evict_for(self, size: int) -> None:
        # Expired entries go first: evicting a live entry while a dead one holds memory
        # would waste the budget.
        if self._over_budget(size):
            now = self._clock()
            for key in [k for k, (_, d) in self._data.items() if d is not None and d <= now]:
                self._remove(key)
        while self._data and self._over_budget(size):
            _, (value, _) = self._data.popitem(last=False)
            self._bytes -= len(value)
            self._evictions += 1

    def _over_budget(self, size: int) -> bool:
        if self._max_bytes is not None and self._bytes + size > self._max_bytes:
            return True
        return self._max_entries is not None and len(self._data) + 1 > self._max_entries


def from_url(url: str, **options: Any) -> MemoryBackend:
    """``memory://[?max_bytes=256MiB&max_entries=N]`` -> a new, empty :class:`MemoryBackend`.

    ``max_bytes`` accepts ``none`` for no byte budget.
    """
    opts = Options(url, options)
    max_bytes = opts.take_size("max_bytes", _DEFAULT_MAX_BYTES)
    max_entries = opts.take_opt_int("max_entries")
    clock = opts.take_raw("clock")  # keyword-only in practice: tests pass a fake clock
    opts.finish()
    if clock is not None and not callable(clock):
        raise ConfigError(f"memory:// option 'clock': expected a callable, got {clock!r}")
    return MemoryBackend(
        max_bytes=max_bytes, max_entries=max_entries, clock=clock or time.monotonic
    )

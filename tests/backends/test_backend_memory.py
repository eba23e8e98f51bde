"""MemoryBackend beyond the conformance suite: byte budget, entry cap, LRU order, TTL."""

from __future__ import annotations

import pytest

from sse_cache.backends.memory import MemoryBackend
from sse_cache.errors import BackendError

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_byte_budget_evicts_least_recently_used() -> None:
    backend = MemoryBackend(max_bytes=1_000)
    for name in "abcd":
        await backend.set(name, name.encode() * 250, None)
    assert await backend.get("a") is not None  # a becomes the most recently used
    await backend.set("e", b"e" * 250, None)
    assert await backend.get("b") is None
    assert [k async for k in backend.scan()] == ["c", "d", "a", "e"]
    stats = await backend.stats()
    assert stats["bytes"] == 1_000 and stats["entries"] == 4 and stats["evictions"] == 1


async def test_overwrite_does_not_double_count() -> None:
    backend = MemoryBackend(max_bytes=1_000)
    for _ in range(10):
        await backend.set("k", b"x" * 900, None)
    assert (await backend.stats())["bytes"] == 900
    await backend.set("other", b"y" * 100, None)
    assert await backend.get("k") is not None


async def test_entry_cap() -> None:
    backend = MemoryBackend(max_entries=3)
    for i in range(5):
        await backend.set(f"k{i}", b"v", None)
    assert sorted([k async for k in backend.scan()]) == ["k2", "k3", "k4"]


async def test_value_larger_than_the_budget() -> None:
    backend = MemoryBackend(max_bytes=100)
    await backend.set("k", b"small", None)
    with pytest.raises(BackendError, match="max_bytes"):
        await backend.set("k", b"x" * 101, None)
    assert await backend.get("k") is None


async def test_ttl_follows_the_clock_and_expired_go_first() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_bytes=300, clock=clock)
    await backend.set("live", b"l" * 100, None)
    await backend.set("short", b"s" * 100, 10)
    clock.now = 9.999
    assert await backend.get("short") is not None
    clock.now = 10.0
    await backend.set("new1", b"n" * 100, None)
    await backend.set("new2", b"m" * 100, None)  # over budget: the expired one goes first
    assert await backend.get("live") is not None
    assert await backend.get("short") is None
    assert (await backend.stats())["evictions"] == 0


async def test_clear() -> None:
    backend = MemoryBackend()
    for i in range(4):
        await backend.set(f"k{i}", b"v", None)
    assert await backend.clear() == 4
    assert (await backend.stats())["bytes"] == 0

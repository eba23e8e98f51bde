"""MemcachedBackend beyond the conformance suite: chunking, manifests, verification."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from pymemcache.client.base import Client  # type: ignore[import-untyped]

from sse_cache.backends import from_url
from sse_cache.backends.memcached import (
    MemcachedBackend,
    _digest,
    _expired,
    _pack_deadline,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def url(memcached_server: Any) -> str:
    return f"memcached://{memcached_server.address}?prefix=mc{os.urandom(4).hex()}:"


@pytest.fixture
def raw(memcached_server: Any) -> Iterator[Client]:
    client = Client(("127.0.0.1", memcached_server.port))
    yield client
    client.close()


def chunk_keys(backend: MemcachedBackend, key: str, value: bytes) -> list[str]:
    digest = _digest(value)
    count = -(-len(value) // backend._chunk_size)
    return backend._chunk_keys(backend._item_key(key), digest, count)


async def test_small_chunks_many_writers_never_mix(url: str) -> None:
    # 1 KiB chunks and 60 KB values: each write is 59 items, so concurrent writers
    # interleave at the item level. Every read must still be one complete write.
    backend = from_url(url, chunk_size=1024)
    values = [os.urandom(60_000) for _ in range(8)]
    seen: list[bytes | None] = []

    async def writer(value: bytes) -> None:
        for _ in range(3):
            await backend.set("k", value, None)

    async def reader() -> None:
        for _ in range(30):
            seen.append(await backend.get("k"))

    async with anyio.create_task_group() as tg:
        for value in values:
            tg.start_soon(writer, value)
        for _ in range(3):
            tg.start_soon(reader)
    assert await backend.get("k") in values
    assert all(v is None or v in values for v in seen)
    assert any(v is not None for v in seen)
    await backend.aclose()


async def test_missing_chunk_reads_as_miss(url: str, raw: Client) -> None:
    backend: Any = from_url(url, chunk_size=4096)
    value = os.urandom(50_000)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k", value)
    assert len(keys) == 13 and all(raw.get(k) is not None for k in keys)
    raw.delete(keys[5])  # as if memcached had evicted one chunk
    assert await backend.get("k") is None
    await backend.aclose()


async def test_altered_chunk_reads_as_miss(url: str, raw: Client) -> None:
    backend: Any = from_url(url, chunk_size=4096)
    value = os.urandom(20_000)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k", value)
    raw.set(keys[1], b"\x00" * 4096, noreply=False)  # same length, different bytes
    assert await backend.get("k") is None
    await backend.aclose()


async def test_foreign_item_reads_as_miss(url: str, raw: Client) -> None:
    backend: Any = from_url(url)
    raw.set(backend._item_key("k"), b"written by someone else", flags=7, noreply=False)
    assert await backend.get("k") is None
    raw.set(backend._item_key("k"), b"short", flags=2, noreply=False)  # a bogus manifest
    assert await backend.get("k") is None
    await backend.aclose()


async def test_delete_removes_the_chunks(url: str, raw: Client) -> None:
    backend: Any = from_url(url, chunk_size=4096)
    value = os.urandom(30_000)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k", value)
    await backend.delete("k")
    assert await backend.get("k") is None
    assert all(raw.get(k) is None for k in keys)
    await backend.aclose()


async def test_items_respect_the_server_limit(url: str, raw: Client) -> None:
    # Default chunk size stays under memcached's default 1 MiB item limit.
    backend: Any = from_url(url)
    value = os.urandom(3 * 1024 * 1024)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k", value)
    assert len(keys) == 4
    sizes = [len(raw.get(k)) for k in keys]
    assert max(sizes) <= 1024 * 1024 - 1024
    assert await backend.get("k") == value
    await backend.aclose()


async def test_long_and_odd_keys_are_hashed(url: str) -> None:
    backend: Any = from_url(url)
    assert backend._item_key("abc").endswith("e:abc")
    for key in ("x" * 300, "has space", "ünï", "ctl\x01"):
        item = backend._item_key(key)
        assert len(item) <= 250 and " " not in item and item.isascii()
        assert ":h:" in item
    await backend.aclose()


async def test_server_stats(url: str) -> None:
    backend: Any = from_url(url)
    stats = await backend.stats()
    assert stats["servers"] == 1 and stats["limit_maxbytes"] > 0
    await backend.aclose()


@pytest.mark.parametrize("now", [0.0, 1_700_000_000.3, 134_217_727.9, 134_217_728.0, 2**40 + 0.5])
def test_deadline_in_flags(now: float) -> None:
    # Expiry lives in the item flags, in 1/8 s ticks modulo 2**30 (wrapping every 4.25
    # years): never early, at most one tick late, and correct across the wrap.
    for ttl in (0.001, 0.1, 0.5, 1.0, 3600.0, 86400.0 * 365 * 2):
        flags = _pack_deadline(now + ttl)
        assert flags < 2**32 and flags & 0b11 == 1
        assert not _expired(flags, now), ttl
        assert not _expired(flags, now + ttl - 0.001), ttl
        assert _expired(flags, now + ttl + 0.126), ttl
        assert _expired(flags, now + ttl + 86400.0 * 365), ttl

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
    _MANIFEST,
    _MANIFEST_BODY,
    _MANIFEST_MAGIC,
    MemcachedBackend,
    _expired,
    _pack_deadline,
)
from sse_cache.codec import MsgpackCodec
from sse_cache.entry import Entry
from sse_cache.errors import BackendError, CorruptEntry
from sse_cache.events import Event

pytestmark = pytest.mark.anyio


@pytest.fixture
def url(memcached_server: Any) -> str:
    return f"memcached://{memcached_server.address}?prefix=mc{os.urandom(4).hex()}:"


@pytest.fixture
def raw(memcached_server: Any) -> Iterator[Client]:
    client = Client(("127.0.0.1", memcached_server.port))
    yield client
    client.close()


def chunk_keys(backend: MemcachedBackend, key: str) -> list[str]:
    """The chunk keys named by the manifest stored under ``key``."""
    item_key = backend._item_key(key)
    found = backend._client.get(item_key)
    assert found is not None and found[1] == _MANIFEST, "not a manifest"
    _, _, _, count, write_id = _MANIFEST_BODY.unpack_from(found[0], len(_MANIFEST_MAGIC))
    return backend._chunk_keys(item_key, write_id, count)


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
    keys = chunk_keys(backend, "k")
    assert len(keys) == 13 and all(raw.get(k) is not None for k in keys)
    raw.delete(keys[5])  # as if memcached had evicted one chunk
    assert await backend.get("k") is None
    await backend.aclose()


async def test_altered_chunk_reads_as_miss(url: str, raw: Client) -> None:
    # A chunk of another length (truncated, or someone else's bytes) reads as a miss. One of
    # the same length but other bytes comes only from a memory fault or a deliberate writer:
    # the backend does not hash every value again for that, the codec's digest rejects it.
    backend: Any = from_url(url, chunk_size=4096)
    events = tuple(Event(os.urandom(30).hex(), event="delta") for _ in range(600))
    entry = Entry(schema="generic", created_at=1.0, status=200,
                  content_type="text/event-stream", events=events)  # fmt: skip
    value = MsgpackCodec(compression="none").encode(entry)
    assert len(value) > 3 * 4096
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    raw.set(keys[1], b"\x00" * 4000, noreply=False)  # shorter
    assert await backend.get("k") is None

    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    raw.set(keys[1], b"\x00" * 4096, noreply=False)  # same length, other bytes
    with pytest.raises(CorruptEntry):
        MsgpackCodec().decode(await backend.get("k"))
    await backend.aclose()


async def test_a_write_cut_before_its_manifest_leaves_the_previous_value(url: str) -> None:
    # The chunks of a new value are written, then the write fails before its manifest:
    # readers still get the previous value whole, never the new chunks.
    backend: Any = from_url(url, chunk_size=4096)
    old, new = os.urandom(50_000), os.urandom(50_000)
    await backend.set("k", old, None)
    real_set = backend._client.set

    def fail_on_manifest(key: str, value: bytes, **kw: Any) -> bool:
        if kw.get("flags") == _MANIFEST:
            raise ConnectionError("server went away")
        return bool(real_set(key, value, **kw))

    backend._client.set = fail_on_manifest
    with pytest.raises(BackendError):
        await backend.set("k", new, None)
    backend._client.set = real_set
    assert await backend.get("k") == old
    await backend.set("k", new, None)
    assert await backend.get("k") == new
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
    keys = chunk_keys(backend, "k")
    await backend.delete("k")
    assert await backend.get("k") is None
    assert all(raw.get(k) is None for k in keys)
    await backend.aclose()


async def test_items_respect_the_server_limit(url: str, raw: Client) -> None:
    # Default chunk size stays under memcached's default 1 MiB item limit.
    backend: Any = from_url(url)
    value = os.urandom(3 * 1024 * 1024)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
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


async def test_a_known_chunked_value_is_read_in_one_round_trip_and_changes_are_seen(
    url: str,
) -> None:
    # The backend remembers the chunks of values it read or wrote, and asks for the manifest
    # and those chunks together; another process's overwrite, a small value or a delete in
    # between must still be seen, never the remembered chunks.
    reader: Any = from_url(url, chunk_size=4096)
    other: Any = from_url(url, chunk_size=4096)
    first, second = os.urandom(20_000), os.urandom(30_000)
    await other.set("k", first, None)
    assert await reader.get("k") == first  # learns the chunks: two round trips

    calls: list[str] = []
    client = reader._client
    real_get, real_get_many = client.get, client.get_many
    client.get = lambda *a, **kw: calls.append("get") or real_get(*a, **kw)
    client.get_many = lambda *a, **kw: calls.append("get_many") or real_get_many(*a, **kw)
    assert await reader.get("k") == first
    assert calls == ["get_many"]

    await other.set("k", second, None)  # new chunks, new manifest
    assert await reader.get("k") == second
    await other.set("k", b"small now", None)  # one plain item
    assert await reader.get("k") == b"small now"
    await other.set("k", first, None)
    assert await reader.get("k") == first
    await other.delete("k")
    assert await reader.get("k") is None
    await reader.aclose()
    await other.aclose()

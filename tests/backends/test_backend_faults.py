"""Storage faults: a server stopped or hung mid-test makes operations raise BackendError
quickly (the engine turns that into a miss), and the same backend object recovers when the
server is back. SQLite: corrupt and locked files."""

from __future__ import annotations

import inspect
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from sse_cache import Event, Notice, StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.backends import from_url
from sse_cache.backends.sqlite import SQLiteBackend
from sse_cache.errors import BackendError, BackendTimeout, BackendUnavailable, CorruptEntry
from sse_cache.protocols import Backend

pytestmark = pytest.mark.anyio

TIMEOUT = 0.3
# A deadlock guard, 100 times the configured timeout: only an operation that hangs (rather
# than failing after its own timeout) trips it. How fast a failure is: the benchmarks.
GUARD = 30.0


async def fails_promptly(
    op: Callable[[], Awaitable[Any]], expected: type[BaseException] = BackendError
) -> BaseException:
    """``op()`` raises ``expected`` (the backend gives up by itself) instead of hanging."""
    with anyio.fail_after(GUARD):
        with pytest.raises(expected) as info:
            await op()
    return info.value


async def roundtrip(backend: Backend, key: str = "k", value: bytes = b"value") -> None:
    await backend.set(key, value, None)
    assert await backend.get(key) == value


# -- Redis (asyncio only) -----------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_stopped_then_restarted(spawn_redis: Callable[[], Any]) -> None:
    server = spawn_redis()
    backend = from_url(server.url, timeout=TIMEOUT)
    try:
        await roundtrip(backend)
        server.stop()
        await fails_promptly(lambda: backend.get("k"), BackendUnavailable)
        await fails_promptly(lambda: backend.set("k", b"v", None), BackendUnavailable)
        await fails_promptly(lambda: backend.delete("k"), BackendUnavailable)
        server.start()  # same port, empty (no persistence)
        assert await backend.get("k") is None
        await roundtrip(backend, value=b"after restart")
    finally:
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_hung_costs_a_timeout(spawn_redis: Callable[[], Any]) -> None:
    server = spawn_redis()
    backend = from_url(server.url, timeout=TIMEOUT)
    try:
        await roundtrip(backend)
        server.pause()
        await fails_promptly(lambda: backend.get("k"), BackendTimeout)
        await fails_promptly(lambda: backend.set("k", b"x" * 100_000, 60), BackendTimeout)
        server.resume()
        await roundtrip(backend, value=b"recovered")
    finally:
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_that_never_answers_is_asked_once_per_operation() -> None:
    # A connection error is tried again at once, on a new connection (after a restart the
    # pooled ones are dead); a timeout was too, and an operation on a hung server cost twice
    # its timeout (helper-81: a miss took 2 s on a stopped Redis with the default 0.5 s).
    connections = 0

    async def silent(client: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with client:
            async for _ in client:  # reads every command, answers none
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, silent)
        backend = from_url(f"redis://127.0.0.1:{port}/0?near_cache=0", timeout=TIMEOUT)
        try:
            for n, op in enumerate((lambda: backend.get("k"), lambda: backend.delete("k"))):
                await fails_promptly(op, BackendTimeout)
                assert connections == n + 1  # one try each: no second connection
        finally:
            await backend.aclose()
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_nothing_listening() -> None:
    backend = from_url("redis://127.0.0.1:1/0", timeout=TIMEOUT)
    await fails_promptly(lambda: backend.get("k"), BackendUnavailable)
    await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_redis_under_trio_says_asyncio_only() -> None:
    backend = from_url("redis://127.0.0.1:1/0")
    error = await fails_promptly(lambda: backend.get("k"), BackendUnavailable)
    assert "asyncio" in str(error)
    await backend.aclose()


# -- memcached (asyncio and trio) ---------------------------------------------------------


async def test_memcached_stopped_then_restarted(spawn_memcached: Callable[[], Any]) -> None:
    server = spawn_memcached()
    backend = from_url(f"memcached://{server.address}", timeout=TIMEOUT)
    big = bytes(range(256)) * 10_000  # chunked
    try:
        await roundtrip(backend)
        await roundtrip(backend, "big", big)
        server.stop()
        await fails_promptly(lambda: backend.get("k"), BackendUnavailable)
        await fails_promptly(lambda: backend.set("big", big, None), BackendUnavailable)
        await fails_promptly(lambda: backend.delete("k"), BackendUnavailable)
        server.start()
        assert await backend.get("big") is None
        await roundtrip(backend, "big", big)
    finally:
        await backend.aclose()


async def test_memcached_hung_costs_a_timeout(spawn_memcached: Callable[[], Any]) -> None:
    server = spawn_memcached()
    backend = from_url(f"memcached://{server.address}", timeout=TIMEOUT)
    try:
        await roundtrip(backend)
        server.pause()
        await fails_promptly(lambda: backend.get("k"), BackendTimeout)
        server.resume()
        await roundtrip(backend, value=b"recovered")
    finally:
        await backend.aclose()


async def test_memcached_pool_survives_one_server(spawn_memcached: Callable[[], Any]) -> None:
    first, second = spawn_memcached(), spawn_memcached()
    url = f"memcached://{first.address},{second.address}?dead_timeout=0.5"
    backend = from_url(url, timeout=TIMEOUT)
    keys = [f"key-{i}" for i in range(20)]
    try:
        for key in keys:
            await roundtrip(backend, key, key.encode())
        second.stop()
        # Keys on the stopped server fail fast (or read as misses once it is out of the
        # ring); keys on the other one keep working. Nothing hangs, nothing is wrong.
        ok = 0
        with anyio.fail_after(GUARD):
            for key in keys:
                try:
                    value = await backend.get(key)
                except BackendError:
                    continue
                assert value in (None, key.encode())
                ok += value is not None
        assert 0 < ok < len(keys)
        # With the dead server out of the ring, writes all land on the live one.
        for key in keys:
            await backend.set(key, b"during", None)
            assert await backend.get(key) == b"during"
        second.start()
        await anyio.sleep(0.7)  # dead_timeout: the server rejoins the ring
        for key in keys:
            await roundtrip(backend, key, b"after")
    finally:
        await backend.aclose()


# -- SQLite -------------------------------------------------------------------------------


async def test_sqlite_corrupt_file_costs_errors_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    path.write_bytes(b"definitely not SQLite " * 500)
    backend = from_url(f"sqlite:///{path}")
    try:
        await fails_promptly(lambda: backend.get("k"))
        await fails_promptly(lambda: backend.set("k", b"v", None))
        await fails_promptly(lambda: backend.delete("k"))
        path.unlink()  # the operator removes the bad file: the same object recovers
        await roundtrip(backend)
    finally:
        await backend.aclose()


async def test_sqlite_file_corrupted_while_open(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    backend = from_url(f"sqlite:///{path}")
    try:
        for i in range(20):
            await backend.set(f"k{i}", bytes([i]) * 20_000, None)
        await backend.aclose()
        backend = from_url(f"sqlite:///{path}")
        with path.open("r+b") as f:  # scribble over the b-tree pages
            f.seek(4096)
            f.write(b"\xff" * 16384)
        for i in range(20):
            try:
                value = await backend.get(f"k{i}")
            except BackendError:
                continue
            assert value in (None, bytes([i]) * 20_000)
    finally:
        await backend.aclose()


async def test_sqlite_missing_directory(tmp_path: Path) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    await fails_promptly(lambda: backend.get("k"), BackendUnavailable)
    (tmp_path / "no" / "such").mkdir(parents=True)
    await roundtrip(backend)
    await backend.aclose()


async def test_sqlite_writer_lock_held_too_long(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    backend = from_url(f"sqlite:///{path}?timeout=0.3&read_timeout=0.2")
    try:
        await roundtrip(backend)
        # Another writer (a process stuck mid-transaction) holds the write lock.
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            await fails_promptly(lambda: backend.set("k", b"v2", None), BackendTimeout)
            # WAL: readers are not blocked by a writer.
            assert await backend.get("k") == b"value"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await roundtrip(backend, value=b"unlocked")
    finally:
        await backend.aclose()


async def test_sqlite_exclusively_locked_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    first = from_url(f"sqlite:///{path}")
    await roundtrip(first)
    await first.aclose()
    # A connection in exclusive locking mode keeps every other one out, readers included.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    backend = from_url(f"sqlite:///{path}?timeout=0.3&read_timeout=0.2")
    try:
        await fails_promptly(lambda: backend.get("k"), BackendTimeout)
        await fails_promptly(lambda: backend.set("k", b"v2", None), BackendTimeout)
        holder.execute("ROLLBACK")
        holder.close()
        assert await backend.get("k") == b"value"  # the same object recovers
        await roundtrip(backend, value=b"unlocked")
    finally:
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_burst_beyond_the_pool_waits_for_a_connection(redis_server: Any) -> None:
    backend = from_url(f"{redis_server.url}?max_connections=2&prefix=burst:", timeout=2.0)
    try:
        await backend.set("k", b"v" * 100_000, None)
        results: list[bytes | None] = []

        async def read() -> None:
            results.append(await backend.get("k"))

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(read)
        assert results == [b"v" * 100_000] * 40
    finally:
        await backend.aclose()


async def test_a_locked_sqlite_file_costs_a_store_its_write_timeout(tmp_path: Path) -> None:
    # Another process holds the write lock for longer than anyone waits: the store fails
    # (fail-open) after the SQLite write timeout (1.5 s by default, under the engine's 2 s
    # backend_timeout, which cannot interrupt a call already running in its worker thread),
    # so a response held until stored is not stalled any longer than that.
    path = tmp_path / "cache.db"
    backend = from_url(f"sqlite:///{path}")  # the default timeout
    await roundtrip(backend)
    failures: list[Notice] = []

    def hook(notice: Notice) -> None:
        if notice.kind == "store_failed":
            failures.append(notice)

    cache = StreamCache(backend, GenericSSE(), hooks=[hook])

    async def upstream() -> AsyncIterator[Event]:
        yield Event("one")

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with anyio.fail_after(GUARD):  # (noticed only after the thread: a guard, no more)
            async with cache.stream(cache.request({"q": 1}, shared=True), upstream) as stream:
                assert [e.data async for e in stream] == ["one"]
        assert time.monotonic() - started >= 1.0  # it did wait for the lock
        assert not stream.stored
        # The store gave up by SQLite's own write timeout (its BackendTimeout "locked").
        assert [n.key for n in failures] == [stream.key]
        assert "BackendTimeout(" in failures[0].detail and "locked" in failures[0].detail
        # How long the stall lasts is timing (the benchmarks'); what bounds it is this: the
        # SQLite write timeout is below the engine's backend_timeout, which cannot cut it short.
        write_timeout = _default(SQLiteBackend, "timeout")
        assert 1.0 <= write_timeout < _default(StreamCache, "backend_timeout")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The lock is gone: the same objects store again.
    async with cache.stream(cache.request({"q": 2}, shared=True), upstream) as stream:
        [e async for e in stream]
    assert stream.stored
    await backend.aclose()


def _default(cls: type, parameter: str) -> float:
    value = inspect.signature(cls).parameters[parameter].default
    assert isinstance(value, int | float), (cls, parameter, value)
    return float(value)


# -- another program's value at one of our keys -------------------------------------------


async def foreign_value_is_a_miss_deleted(
    backend: Backend, make_foreign: Callable[[str], Awaitable[None]]
) -> None:
    """Through the engine: a value of another type at an entry's key (another program's
    SQLite text column, Redis list) is a miss and deleted, however often it is looked up,
    and the breaker stays closed for the other keys."""
    cache = StreamCache(backend, GenericSSE())
    good = cache.key(cache.request({"input": "good"}, shared=True))
    bad = cache.key(cache.request({"input": "bad"}, shared=True))
    await backend.set(good, b"not looked at", None)
    for _ in range(3 * cache.breaker.failures):
        await backend.set(bad, b"ours", None)
        await make_foreign(bad)
        with pytest.raises(CorruptEntry, match="another type|holds"):
            await backend.get(bad)
        assert await cache.lookup(bad) is None
        assert await backend.get(bad) is None  # deleted
    assert cache.breaker.state.value == "closed"


async def test_sqlite_row_of_other_types_is_a_deleted_miss(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    backend = from_url(f"sqlite:///{path}")

    async def make_foreign(key: str) -> None:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE sse_cache_entries SET value = 'text' WHERE key = ?", (key,))

    try:
        await foreign_value_is_a_miss_deleted(backend, make_foreign)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_value_of_another_type_is_a_deleted_miss(redis_server: Any) -> None:
    import redis.asyncio as aioredis

    backend = from_url(redis_server.url + "?prefix=foreign-type:")
    raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)

    async def make_foreign(key: str) -> None:
        (name,) = [n for n in await raw.keys("foreign-type:*") if n.endswith(key.encode())]
        await raw.delete(name)
        await raw.rpush(name, b"a", b"list")

    try:
        await foreign_value_is_a_miss_deleted(backend, make_foreign)
    finally:
        await raw.aclose()
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_stats_count_on_past_a_key_of_another_type(redis_server: Any) -> None:
    # `sse-cache stats` failed outright (WRONGTYPE) while such a key was under the prefix,
    # which `ls` shows as a corrupt entry (helper-81).
    import redis.asyncio as aioredis

    backend = from_url(redis_server.url + "?prefix=stats-foreign:")
    raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        await backend.set("good", b"abc", None)
        await raw.rpush("stats-foreign:e:listkey", b"a")
        assert await backend.stats() == {"entries": 1, "bytes": 3, "servers": 1}
    finally:
        await raw.aclose()
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_redis_refuses_an_empty_prefix() -> None:
    # Its entries were at e:{key}, among other applications' keys: `ls` listed theirs as
    # corrupt entries and `purge` deleted them (helper-81).
    import redis.asyncio as aioredis

    from sse_cache import ConfigError
    from sse_cache.backends.redis import RedisBackend

    with pytest.raises(ConfigError, match="prefix must be a non-empty string"):
        from_url("redis://127.0.0.1:1/0?prefix=")
    client = aioredis.Redis(port=1)
    try:
        with pytest.raises(ConfigError, match="prefix must be a non-empty string"):
            RedisBackend(client, prefix="")
    finally:
        await client.aclose()

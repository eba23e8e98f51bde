"""Near caches: hot values answered from this process's memory without a round trip
(:class:`~sse_cache.protocols.NearCachingBackend`), and never once another connection or
process has replaced or deleted them.

SQLite's near cache trusts a value while ``PRAGMA data_version`` is unchanged: the writers
here are other connections and real OS processes (a script, ``sse-cache purge``), and each
lookup comes right after the writer returned, with nothing to wait for."""

from __future__ import annotations

import os
import sqlite3
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sse_cache import StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.backends._near import NearCache
from sse_cache.backends.memory import MemoryBackend
from sse_cache.backends.sqlite import SQLiteBackend, from_url
from sse_cache.errors import ConfigError
from sse_cache.events import Event
from sse_cache.protocols import NearCachingBackend

pytestmark = pytest.mark.anyio

# Another process writing the same file: set KEY VALUE, or delete KEY, then exit.
WRITER = textwrap.dedent(
    """
    import sys, anyio
    from sse_cache.backends.sqlite import SQLiteBackend

    async def main(path, op, key, value=None):
        backend = SQLiteBackend(path)
        if op == "set":
            await backend.set(key, value.encode(), None)
        else:
            await backend.delete(key)
        await backend.aclose()

    anyio.run(main, *sys.argv[1:])
    """
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def other_process(path: Path, *args: str) -> None:
    await anyio.run_process([sys.executable, "-c", WRITER, str(path), *args])


async def purge(url: str, *keys: str) -> None:
    """``sse-cache purge`` in a process of its own."""
    await anyio.run_process(
        [sys.executable, "-m", "sse_cache", "purge", "--backend", url, "-y", *keys]
    )


class Threads:
    """Counts the lookups that went to a worker thread (the round trip the near cache
    saves)."""

    def __init__(self, backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        real = backend._call

        async def counting(func: Any, *args: Any, read: bool) -> Any:
            if func == backend._table.read:
                self.reads += 1
            return await real(func, *args, read=read)

        monkeypatch.setattr(backend, "_call", counting)


async def test_hot_values_skip_the_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SQLiteBackend(tmp_path / "c.db")
    assert isinstance(backend, NearCachingBackend)
    await backend.set("k", b"v" * 5000, None)
    threads = Threads(backend, monkeypatch)
    assert backend.cached("k") is None  # not read yet: not known
    assert await backend.get("k") == b"v" * 5000
    assert threads.reads == 1
    for _ in range(20):
        assert await backend.get("k") == b"v" * 5000
    assert backend.cached("k") == b"v" * 5000
    assert threads.reads == 1
    assert await backend.get("missing") is None  # a missing key is always asked
    assert threads.reads == 2
    await backend.aclose()
    assert backend.cached("k") is None  # closed: nothing is known


async def test_a_write_by_another_process_is_seen_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path)
    await backend.set("k", b"old", None)
    await backend.set("other", b"kept", None)
    assert await backend.get("k") == b"old"
    assert await backend.get("other") == b"kept"
    assert backend.cached("k") == b"old"
    threads = Threads(backend, monkeypatch)

    await other_process(path, "set", "k", "new")
    assert backend.cached("k") is None  # a commit since: not trusted
    assert await backend.get("k") == b"new"
    # Any commit empties the near cache (the key it changed is not known to this process):
    # "other" is read again, and is kept again afterwards.
    assert await backend.get("other") == b"kept"
    assert threads.reads == 2
    assert await backend.get("other") == b"kept"
    assert threads.reads == 2

    await other_process(path, "delete", "k")
    assert await backend.get("k") is None
    await backend.aclose()


async def test_sse_cache_purge_in_another_process_is_seen_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    url = f"sqlite:///{path}"
    backend = from_url(url)
    await backend.set("a", b"1", None)
    await backend.set("b", b"2", None)
    assert await backend.get("a") == b"1" and await backend.get("b") == b"2"
    await purge(url, "a")
    assert await backend.get("a") is None
    assert await backend.get("b") == b"2"
    await purge(url)
    assert await backend.get("b") is None
    await backend.aclose()


async def test_a_write_on_another_connection_is_seen_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    first, second = SQLiteBackend(path), SQLiteBackend(path)
    await first.set("k", b"one", None)
    assert await first.get("k") == b"one"
    assert await second.get("k") == b"one"
    await second.set("k", b"two", None)
    assert await first.get("k") == b"two"
    await second.delete("k")
    assert await first.get("k") is None
    await first.set("k", b"three", None)
    assert await second.get("k") == b"three"
    await second.clear()
    assert await first.get("k") is None
    for backend in (first, second):
        await backend.aclose()


async def test_this_backends_own_writes_are_seen(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "c.db")
    await backend.set("k", b"one", None)
    assert await backend.get("k") == b"one"
    await backend.set("k", b"two", None)
    assert await backend.get("k") == b"two"
    await backend.set("k", b"gone", 0)  # a non-positive ttl deletes
    assert await backend.get("k") is None
    await backend.aclose()


async def test_a_kept_value_expires_on_time(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SQLiteBackend(tmp_path / "c.db", clock=clock)
    await backend.set("k", b"v", 10)
    assert await backend.get("k") == b"v"
    clock.now += 9.5
    assert backend.cached("k") == b"v"
    clock.now += 1
    assert backend.cached("k") is None
    assert await backend.get("k") is None
    await backend.aclose()


async def test_a_file_replaced_at_the_path_is_not_answered_from_the_old_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, check_interval=0)
    await backend.set("k", b"old file", None)
    assert await backend.get("k") == b"old file"
    # Another cache file renamed over the path (a restore from backup, say).
    staged = tmp_path / "staged.db"
    other = SQLiteBackend(staged)
    await other.set("k", b"new file", None)
    await other.aclose()
    os.replace(staged, path)
    assert backend.cached("k") is None
    assert await backend.get("k") == b"new file"
    await backend.aclose()


async def test_a_version_that_cannot_be_read_at_once_means_a_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SQLiteBackend(tmp_path / "c.db")
    await backend.set("k", b"v", None)
    assert await backend.get("k") == b"v"
    assert backend.cached("k") == b"v"
    threads = Threads(backend, monkeypatch)

    class Busy:
        def execute(self, sql: str) -> Any:
            raise sqlite3.OperationalError("database is locked")

        def close(self) -> None:
            pass

    backend._probe.connection = Busy()  # type: ignore[assignment]
    assert backend.cached("k") is None
    assert await backend.get("k") == b"v"  # from the worker thread, and kept again
    assert threads.reads == 1
    assert backend.cached("k") == b"v"
    await backend.aclose()


async def test_the_near_cache_is_bounded_and_can_be_turned_off(tmp_path: Path) -> None:
    off = from_url(f"sqlite:///{tmp_path / 'off.db'}?near_cache=0")
    await off.set("k", b"v", None)
    assert await off.get("k") == b"v"
    assert off.cached("k") is None
    await off.aclose()

    small = from_url(f"sqlite:///{tmp_path / 'small.db'}?near_cache=8KiB")
    for i in range(4):
        await small.set(f"k{i}", bytes(3000), None)
    for i in range(4):
        assert await small.get(f"k{i}") == bytes(3000)
    kept = [i for i in range(4) if small.cached(f"k{i}") is not None]
    assert kept == [2, 3]  # the least recently read went first
    await small.aclose()

    memory_db = SQLiteBackend(":memory:")  # private to its connection: nothing to watch
    await memory_db.set("k", b"v", None)
    assert await memory_db.get("k") == b"v"
    assert memory_db.cached("k") is None
    await memory_db.aclose()


def test_bad_near_cache_options_are_errors_naming_them() -> None:
    with pytest.raises(ConfigError, match="near_cache"):
        from_url("sqlite:///x.db?near_cache=lots")
    with pytest.raises(ConfigError, match="near_cache_bytes"):
        SQLiteBackend("x.db", near_cache_bytes=-1)


def test_near_cache_keeps_values_of_one_version_only() -> None:
    near = NearCache(10_000)
    near.put("a", b"1", None, version=(1, 5))
    assert near.check((1, 5)) and near.get("a", 0.0) == b"1"
    near.put("b", b"2", None, version=(1, 6))  # read under a newer version: "a" is dropped
    assert near.get("a", 0.0) is None and near.get("b", 0.0) == b"2"
    assert not near.check((1, 7))
    assert len(near) == 0
    near.put("c", b"3", deadline=5.0, version=(1, 7))
    assert near.get("c", 4.9) == b"3" and near.get("c", 5.0) is None


async def test_the_memory_backend_is_near_and_counts_each_lookup_once() -> None:
    backend = MemoryBackend()
    assert isinstance(backend, NearCachingBackend)
    await backend.set("k", b"v", None)
    assert backend.cached("k") == b"v"
    assert backend.cached("missing") is None
    assert await backend.get("missing") is None
    stats = await backend.stats()
    assert (stats["hits"], stats["misses"]) == (1, 1)
    await backend.aclose()
    assert backend.cached("k") is None


async def test_the_engine_misses_after_a_purge_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    url = f"sqlite:///{path}"
    events = [Event(data="hello"), Event(data="world")]

    async def upstream() -> AsyncIterator[Event]:
        for event in events:
            yield event

    async with StreamCache(url, GenericSSE()) as cache:
        for expected in ("miss", "hit", "hit"):
            async with cache.stream("same request", upstream) as stream:
                assert stream.status == expected
                assert [e.data async for e in stream] == ["hello", "world"]
        await purge(url)
        async with cache.stream("same request", upstream) as stream:
            assert stream.status == "miss"
            assert [e.data async for e in stream] == ["hello", "world"]


async def test_a_moved_probe_is_reopened_on_the_current_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe only ever vouches for the file the worker threads' connection has open:
    # while that connection is still on the old file, nothing is kept.
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, check_interval=3600)
    await backend.set("k", b"v", None)
    assert await backend.get("k") == b"v"
    monkeypatch.setattr(backend._db, "opened", (0, 0))  # as if the connection were on another file
    backend._probe.close()
    assert await backend.get("k") == b"v"
    assert backend.cached("k") is None
    await backend.aclose()


class HeldRead:
    """Holds the worker thread inside the read of one key, after its row was read, until
    released: the backend's one connection stays busy meanwhile."""

    def __init__(self, backend: SQLiteBackend, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read_done = threading.Event()
        self.release = threading.Event()
        real = backend._table.read

        def held(conn: Any, k: str, began: Any = None) -> Any:
            row = real(conn, k, began)
            if k == key and not self.read_done.is_set():
                self.read_done.set()
                self.release.wait(30)  # (a bound so that a broken test fails, not hangs)
            return row

        monkeypatch.setattr(backend._table, "read", held)

    async def until_read(self) -> None:
        await anyio.to_thread.run_sync(self.read_done.wait)


async def test_hits_after_a_commit_share_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit by anyone empties the near cache; the hot key's hits that then arrive together
    # wait for one read (two at most: the first may begin before the rest arrive), not one
    # each on the backend's single connection.
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path)
    await backend.set("k", b"v" * 5000, None)
    assert await backend.get("k") == b"v" * 5000
    await other_process(path, "set", "another key", "x")
    threads = Threads(backend, monkeypatch)
    results: list[bytes | None] = []

    async def look() -> None:
        results.append(await backend.get("k"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(look)
    assert results == [b"v" * 5000] * 50
    assert 1 <= threads.reads <= 2
    assert backend.cached("k") == b"v" * 5000  # kept again
    await backend.aclose()


async def test_a_lookup_after_a_read_began_reads_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The read under way had its row before another process's commit completed: a lookup
    # arriving after that commit must not share it.
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path)
    await backend.set("k", b"old", None)
    held = HeldRead(backend, "k", monkeypatch)
    results: dict[str, bytes | None] = {}

    async def look(name: str) -> None:
        results[name] = await backend.get("k")

    async with anyio.create_task_group() as tg:
        tg.start_soon(look, "before the commit")
        await held.until_read()
        await other_process(path, "set", "k", "new")
        tg.start_soon(look, "after the commit")
        await anyio.wait_all_tasks_blocked()  # it waits for the connection
        held.release.set()
    assert results == {"before the commit": b"old", "after the commit": b"new"}
    assert await backend.get("k") == b"new"
    await backend.aclose()


async def test_a_cancelled_lookup_does_not_strand_those_sharing_its_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled while its read waits for the connection (a client gone): the lookups that
    # joined it read for themselves.
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path)
    await backend.set("busy", b"b", None)
    await backend.set("k", b"v", None)
    held = HeldRead(backend, "busy", monkeypatch)
    threads = Threads(backend, monkeypatch)
    results: dict[str, bytes | None] = {}

    async def look(name: str, key: str) -> None:
        results[name] = await backend.get(key)

    async with anyio.create_task_group() as tg:
        tg.start_soon(look, "busy", "busy")
        await held.until_read()  # the connection is taken
        with anyio.CancelScope() as first:
            async with anyio.create_task_group() as inner:
                inner.start_soon(look, "first", "k")
                await anyio.wait_all_tasks_blocked()  # "first" owns the read of "k"
                tg.start_soon(look, "joined", "k")
                await anyio.wait_all_tasks_blocked()
                assert len(backend._reads) == 1  # "joined" shares the read of "first"
                first.cancel()
        held.release.set()
    assert results == {"busy": b"b", "joined": b"v"}
    assert threads.reads == 3  # busy, first (cancelled while queued), joined
    await backend.aclose()

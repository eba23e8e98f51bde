"""SQLiteBackend beyond the conformance suite: size budget and LRU eviction, expiry purge,
lazy open, schema, and several real processes writing one file at once."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from sse_cache.backends.sqlite import SQLiteBackend, from_url
from sse_cache.errors import BackendError

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows(path: Path) -> dict[str, tuple[int, float | None]]:
    with sqlite3.connect(path) as conn:
        return {
            k: (size, exp)
            for k, size, exp in conn.execute("SELECT key, size, expires_at FROM sse_cache_entries")
        }


async def test_lazy_open(tmp_path: Path) -> None:
    path = tmp_path / "lazy.db"
    backend = from_url(f"sqlite:///{path}")
    assert not path.exists()  # nothing happens until the first operation
    assert await backend.get("k") is None
    assert path.exists()
    await backend.aclose()


async def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    backend = from_url(f"sqlite:///{path}")
    await backend.set("k", b"v", None)
    await backend.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    # A second backend on the same file reads what the first wrote.
    again = from_url(f"sqlite:///{path}")
    assert await again.get("k") == b"v"
    await again.aclose()


async def test_foreign_schema_version_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    backend = from_url(f"sqlite:///{path}")
    with pytest.raises(BackendError, match="schema version 99"):
        await backend.get("k")
    await backend.aclose()


async def test_size_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, max_bytes=10_000, clock=clock)
    for name in "abcd":
        clock.now += 1
        await backend.set(name, name.encode() * 2_000, None)
    clock.now += 1
    assert await backend.get("a") is not None  # "a" is now the most recently used
    clock.now += 1
    await backend.set("e", b"e" * 3_000, None)  # 8,000 + 3,000 > 10,000: evict "b"
    assert await backend.get("b") is None
    for name in "acde":
        assert await backend.get(name) is not None, name
    stats = await backend.stats()
    assert stats["bytes"] == 9_000 and stats["entries"] == 4
    assert set(rows(path)) == {"a", "c", "d", "e"}
    await backend.aclose()


async def test_eviction_prefers_expired_entries(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SQLiteBackend(tmp_path / "c.db", max_bytes=10_000, clock=clock)
    await backend.set("old-but-live", b"x" * 4_000, None)
    clock.now += 1
    await backend.set("expiring", b"y" * 4_000, 5)
    clock.now += 10  # "expiring" is dead now
    await backend.set("new", b"z" * 4_000, None)
    assert await backend.get("old-but-live") == b"x" * 4_000
    assert await backend.get("new") == b"z" * 4_000
    assert (await backend.stats())["entries"] == 2
    await backend.aclose()


async def test_value_over_the_budget(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "c.db", max_bytes=1_000)
    await backend.set("k", b"small", None)
    with pytest.raises(BackendError, match="larger than max_bytes"):
        await backend.set("k", b"x" * 1_001, None)
    assert await backend.get("k") is None  # the stale value did not survive the failed set
    await backend.aclose()


async def test_expired_rows_are_purged_periodically(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, purge_interval=60, clock=clock)
    for i in range(10):
        await backend.set(f"t{i}", b"v", 30)
    assert len(rows(path)) == 10
    clock.now += 31
    assert await backend.get("t0") is None  # expired on read at once...
    await backend.set("trigger", b"v", None)
    assert len(rows(path)) == 11  # ...but rows stay until the next purge is due
    clock.now += 30
    await backend.set("trigger", b"v", None)
    assert set(rows(path)) == {"trigger"}
    await backend.aclose()


async def test_totals_match_the_table(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, max_bytes=50_000)
    for i in range(60):
        await backend.set(f"k{i % 25}", b"x" * (100 * i), None if i % 3 else 100)
        if i % 7 == 0:
            await backend.delete(f"k{i % 11}")
    stats = await backend.stats()
    table = rows(path)
    assert stats["entries"] == len(table)
    assert stats["bytes"] == sum(size for size, _ in table.values()) <= 50_000
    assert stats["file_bytes"] > 0
    await backend.aclose()


async def test_access_times_are_written_with_the_next_write(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "c.db"
    backend = SQLiteBackend(path, clock=clock)
    await backend.set("a", b"1", None)
    clock.now += 100
    await backend.get("a")

    def accessed() -> float:
        with sqlite3.connect(path) as conn:
            return float(
                conn.execute("SELECT accessed_at FROM sse_cache_entries WHERE key='a'").fetchone()[
                    0
                ]
            )

    assert accessed() == 1_000_000.0  # a read writes nothing
    await backend.set("b", b"2", None)
    assert accessed() == 1_000_100.0
    await backend.aclose()


WORKER = """
import sys, anyio
from sse_cache.backends import from_url

async def main(path, worker, count):
    backend = from_url(f"sqlite:///{path}?timeout=30")
    for i in range(count):
        key = f"w{worker}-{i}"
        value = (key.encode() + b"|") * (500 + 997 * i % 20_000)
        await backend.set(key, value, None)
        # Read someone else's key while writing: readers must never see a torn value.
        other = await backend.get(f"w{(worker + 1) % 4}-{i // 2}")
        if other is not None and not other.startswith(f"w{(worker + 1) % 4}-".encode()):
            raise SystemExit(f"torn read: {other[:40]!r}")
    await backend.aclose()

anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


def run_workers(script: Path, path: Path, workers: int, count: int) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), str(worker), str(count)],
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        for worker in range(workers)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()


def test_several_processes_write_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    count = 40
    run_workers(script, path, 4, count)

    async def check() -> None:
        backend = from_url(f"sqlite:///{path}")
        for worker in range(4):
            for i in range(count):
                key = f"w{worker}-{i}"
                expected = (key.encode() + b"|") * (500 + 997 * i % 20_000)
                assert await backend.get(key) == expected, key
        stats = await backend.stats()
        assert stats["entries"] == 4 * count == len(rows(path))
        await backend.aclose()

    anyio.run(check)


def test_several_processes_share_a_budget(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER).replace("?timeout=30", "?timeout=30&max_bytes=2MiB"))
    run_workers(script, path, 3, 30)
    table = rows(path)
    total = sum(size for size, _ in table.values())
    assert 0 < total <= 2 * 1024 * 1024

    async def check() -> None:
        backend = from_url(f"sqlite:///{path}")
        stats = await backend.stats()
        assert stats["bytes"] == total and stats["entries"] == len(table)
        await backend.aclose()

    anyio.run(check)

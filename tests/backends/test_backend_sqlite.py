"""SQLiteBackend beyond the conformance suite: size budget and LRU eviction, expiry purge,
lazy open, schema, several real processes writing one file at once, and the file deleted,
replaced or moved while open."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from servers import in_ci
from sse_cache import Event, StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.backends import _sqlite_file as sqlite_file_module
from sse_cache.backends.sqlite import SQLiteBackend, from_url
from sse_cache.errors import BackendCorrupt, BackendError, BackendUnavailable, ConfigError

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


FOREIGN_FILES = {
    # An application's own database, given as the cache's file by mistake.
    "another program's tables": (
        [
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO users VALUES (1, 'a')",
        ],
        "it holds users",
    ),
    "another user_version": (["PRAGMA user_version = 99"], "user_version 99"),
    "our user_version without our table": (
        ["PRAGMA user_version = 1", "CREATE TABLE notes (body TEXT)"],
        "user_version 1 but no sse_cache_entries table",
    ),
}


@pytest.mark.parametrize("kind", FOREIGN_FILES)
async def test_another_programs_file_is_refused_and_left_as_it_is(
    tmp_path: Path, kind: str
) -> None:
    # With the default create=true too: the file was switched to WAL and given our tables
    # (or switched, then every call failed) before.
    path = tmp_path / "app.db"
    statements, why = FOREIGN_FILES[kind]
    with closing(sqlite3.connect(path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)
    before = path.read_bytes()
    backend = from_url(f"sqlite:///{path}")
    for _ in range(2):  # and again: nothing was changed by the first attempt
        with pytest.raises(BackendError, match=f"is not an sse_cache database \\({why}"):
            await backend.set("k", b"v", None)
    await backend.aclose()
    assert path.read_bytes() == before  # not switched to WAL, no tables added
    assert sorted(os.listdir(tmp_path)) == ["app.db"]  # no -wal, no -shm


async def test_urls_name_files_as_sqlalchemy_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    relative = from_url("sqlite:///rel.db")  # three slashes: in the working directory
    absolute = from_url(f"sqlite:////{str(tmp_path / 'abs.db').lstrip('/')}")  # four
    monkeypatch.chdir(elsewhere)  # resolved when created: a later chdir does not move it
    for backend in (relative, absolute):
        await backend.set("k", b"v", None)
        await backend.aclose()
    assert (work / "rel.db").is_file() and (tmp_path / "abs.db").is_file()
    assert os.listdir(elsewhere) == []


async def test_create_false_opens_an_existing_cache_only(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    missing = from_url(f"sqlite:///{path}?create=false")
    with pytest.raises(BackendUnavailable, match=f"{path}' does not exist.*create=false"):
        await missing.get("k")
    assert os.listdir(tmp_path) == []  # no file, no -wal, no -shm
    await missing.aclose()

    writer = from_url(f"sqlite:///{path}")
    await writer.set("k", b"v", None)
    await writer.aclose()
    reader = from_url(f"sqlite:///{path}", create=False, check_interval=0)
    assert await reader.get("k") == b"v"
    path.unlink()  # deleted under an open-existing-only reader: not recreated
    with pytest.raises(BackendUnavailable, match="does not exist"):
        await reader.get("k")
    assert not path.exists()
    await reader.aclose()


@pytest.mark.parametrize("kind", ["foreign", "empty"])
async def test_create_false_leaves_other_files_untouched(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "other.db"
    if kind == "foreign":
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
    else:
        path.touch()
    before = path.read_bytes()
    backend = from_url(f"sqlite:///{path}?create=false")
    with pytest.raises(BackendError, match="is not an sse_cache database"):
        await backend.stats()
    await backend.aclose()
    assert path.read_bytes() == before  # not switched to WAL, no tables added


async def test_a_relative_url_whose_absolute_twin_exists_is_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The URL an old absolute spelling (three slashes) leaves: sqlite:///<tmp>/cache.db now
    # names <cwd>/<tmp>/cache.db. The file it used to name exists: the log says how to reach it.
    twin = tmp_path / "cache.db"
    twin.write_bytes(b"")
    relative = str(twin).lstrip("/")
    cwd = tmp_path / "cwd"
    (cwd / relative).parent.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    backend = from_url(f"sqlite:///{relative}")
    with caplog.at_level("WARNING", logger="sse_cache"):
        await backend.set("k", b"v", None)
    await backend.aclose()
    assert (cwd / relative).is_file()
    [record] = [r for r in caplog.records if r.name.startswith("sse_cache")]
    assert f"created a new cache file {cwd / relative}" in record.getMessage()
    assert f"write sqlite:///{twin} (four slashes)" in record.getMessage()
    # Opening an existing file, or a relative path without such a twin, says nothing.
    caplog.clear()
    for url in (f"sqlite:///{relative}", "sqlite:///no-twin.db"):
        backend = from_url(url)
        with caplog.at_level("WARNING", logger="sse_cache"):
            await backend.get("k")
        await backend.aclose()
    assert caplog.records == []


async def test_one_connection_one_thread_when_the_limiter_admits_too_many(
    tmp_path: Path,
) -> None:
    # anyio's CapacityLimiter on asyncio can admit one borrower more than it has tokens
    # (anyio#1170, fixed in 4.14): two threads then shared the one connection and mixed
    # their transactions. The connection is guarded on the thread side; here the limiter
    # admits sixteen at once, and every write and read must still be whole.
    backend: Any = SQLiteBackend(str(tmp_path / "c.db"), near_cache_bytes=0)
    backend._queue._turns = anyio.CapacityLimiter(16)
    backend._queue._threads = anyio.CapacityLimiter(16)
    values = {f"k{i}": os.urandom(5_000) for i in range(16)}
    read: dict[str, bytes | None] = {}

    async def write_then_read(key: str) -> None:
        for _ in range(5):
            await backend.set(key, values[key], None)
            read[key] = await backend.get(key)

    async with anyio.create_task_group() as tg:
        for key in values:
            tg.start_soon(write_then_read, key)
    assert read == values
    await backend.aclose()
    with closing(sqlite3.connect(tmp_path / "c.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


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


# -- the file deleted, replaced or moved while open ---------------------------------------

INTERVAL = 0.05  # check_interval in these tests: small, so that waiting it out is cheap


async def wait_out(interval: float = INTERVAL) -> None:
    """Until the next call is due to look at the path again (with room for clock rounding)."""
    await anyio.sleep(interval * 2)


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def fill(backend: SQLiteBackend, prefix: str, count: int = 30) -> None:
    # Enough transactions that the WAL holds pages of every kind (schema, index, overflow):
    # read as part of another file, they would show up in it or corrupt it.
    for i in range(count):
        await backend.set(f"{prefix}{i}", prefix.encode() * 4_000, None)


async def assert_holds(backend: SQLiteBackend, prefix: str, count: int = 30) -> None:
    for i in range(count):
        assert await backend.get(f"{prefix}{i}") == prefix.encode() * 4_000, f"{prefix}{i}"


async def assert_lacks(backend: SQLiteBackend, prefix: str, count: int = 30) -> None:
    for i in range(count):
        assert await backend.get(f"{prefix}{i}") is None, f"{prefix}{i}"


@pytest.mark.parametrize("sidecars", [False, True], ids=["rm-db", "rm-db-wal-shm"])
async def test_deleted_file_is_noticed_and_recreated(tmp_path: Path, sidecars: bool) -> None:
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path, check_interval=INTERVAL)
    await fill(backend, "old")
    path.unlink()  # `rm cache.db`: the -wal and -shm stay, still in use
    if sidecars:
        for suffix in ("-wal", "-shm"):
            os.unlink(f"{path}{suffix}")
    await wait_out()
    await backend.set("new", b"v", None)
    assert path.exists()
    other = SQLiteBackend(path)  # another process, `sse-cache ls`, a second proxy
    try:
        assert await other.get("new") == b"v"
        await assert_lacks(other, "old")
        await other.set("from-other", b"w", None)
        assert await backend.get("from-other") == b"w"  # one cache again
        await assert_lacks(backend, "old")
    finally:
        await other.aclose()
        await backend.aclose()
    assert integrity(path) == "ok"
    assert set(rows(path)) == {"new", "from-other"}


async def test_a_new_opener_ignores_the_deleted_files_wal(tmp_path: Path) -> None:
    # `rm cache.db` and at once `sse-cache ls` (or a second proxy starting), before the
    # running backend noticed: the new file must not be read through the old -wal and -shm.
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path, check_interval=INTERVAL)
    await fill(backend, "old")
    path.unlink()
    newcomer = SQLiteBackend(path)
    try:
        await assert_lacks(newcomer, "old")
        await fill(newcomer, "new")
        await wait_out()
        await assert_holds(backend, "new")
        await assert_lacks(backend, "old")
        await backend.set("late", b"v", None)
        assert await newcomer.get("late") == b"v"
    finally:
        await newcomer.aclose()
        await backend.aclose()
    assert integrity(path) == "ok"


async def test_values_read_from_a_replacing_file_are_never_kept_under_the_old_ones_version(
    tmp_path: Path,
) -> None:
    # The file is replaced at the path. The worker threads' connection looks at the path
    # (on its own check_interval) before the near cache's probe does, and reads K from the
    # new file: kept under the old file's data_version, which nothing changes any more, K
    # was served from memory after another process overwrote it, until the probe's own look
    # (helper-72: 9 of 9 lookups, up to check_interval). The probe's look is made never due
    # here: the worker's coming first is the interleaving.
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path, check_interval=INTERVAL)
    other = SQLiteBackend(path)
    try:
        await backend.set("other", b"x", None)
        assert await backend.get("other") == b"x"  # the probe has the old file open
        backend._probe._next_check = math.inf
        replacement = tmp_path / "replacement.db"
        writer = SQLiteBackend(replacement)
        await writer.set("K", b"v1", None)
        await writer.aclose()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        os.replace(replacement, path)
        await wait_out()  # the worker's look at the path is due
        assert await backend.get("K") == b"v1"  # read from the new file
        assert await backend.get("K") == b"v1"
        await other.set("K", b"v2", None)  # another process, on the new file
        assert await backend.get("K") == b"v2"
    finally:
        await other.aclose()
        await backend.aclose()


@pytest.mark.parametrize("noticed_by", ["a call", "aclose"])
async def test_replaced_file_is_noticed(tmp_path: Path, noticed_by: str) -> None:
    path = tmp_path / "cache.db"
    # Two backends (two proxies) have the old file open, with pages in its WAL.
    first = SQLiteBackend(path, check_interval=INTERVAL)
    second = SQLiteBackend(path, check_interval=INTERVAL)
    await fill(first, "mine")
    await assert_holds(second, "mine")
    replacement = tmp_path / "replacement.db"
    writer = SQLiteBackend(replacement)
    await fill(writer, "theirs")
    await writer.aclose()
    os.replace(replacement, path)
    if noticed_by == "aclose":
        await first.aclose()
        await second.aclose()
        # Nothing of the old file is left at the path to be read as part of the new one.
        assert integrity(path) == "ok"
        first = SQLiteBackend(path, check_interval=INTERVAL)
        second = SQLiteBackend(path, check_interval=INTERVAL)
    else:
        await wait_out()
    try:
        await assert_holds(first, "theirs")
        await assert_lacks(first, "mine")
        await first.set("after", b"v", None)
        assert await second.get("after") == b"v"
        await assert_holds(second, "theirs")
        await assert_lacks(second, "mine")
    finally:
        await first.aclose()
        await second.aclose()
    assert integrity(path) == "ok"
    reader = SQLiteBackend(path)
    await assert_holds(reader, "theirs")
    assert await reader.get("after") == b"v"
    await reader.aclose()


async def test_moved_file_is_noticed_and_kept_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.db"
    moved = tmp_path / "kept.db"
    backend = from_url(f"sqlite:///{path}?check_interval=0")  # 0: look before every call
    await fill(backend, "old")
    assert not caplog.records
    os.rename(path, moved)  # without its -wal: what the WAL held is copied into it
    with caplog.at_level(logging.WARNING, logger="sse_cache.backends.sqlite"):
        await backend.set("new", b"v", None)
    # The operator sees that the swap was noticed, once, naming the path.
    noticed = [r.getMessage() for r in caplog.records if "moved while open" in r.getMessage()]
    assert noticed == [
        f"sse_cache: the SQLite file at {path} was deleted, replaced or moved while open: "
        "closed it, and the next call opens the file at that path"
    ]
    assert set(rows(path)) == {"new"}
    await backend.aclose()
    assert integrity(path) == integrity(moved) == "ok"
    elsewhere = SQLiteBackend(moved)
    await assert_holds(elsewhere, "old")
    assert await elsewhere.get("new") is None
    await elsewhere.aclose()


def make_read_only(path: Path, how: str) -> Callable[[], None]:
    """Make the database at ``path`` read-only; return what undoes it."""
    if how == "header":
        # A write version above 2 in the header: SQLite opens the file read-only.
        with path.open("r+b") as f:
            f.seek(18)
            f.write(b"\x03")
        return lambda: None
    path.chmod(0o444)
    if os.geteuid() != 0:
        return lambda: None
    # root writes to a 0444 file anyway: make it immutable instead, where that is possible
    # (skipped elsewhere where it is not; under CI a failure, never a skip).
    cannot = pytest.fail if in_ci() else pytest.skip
    if shutil.which("chattr") is None:
        cannot("running as root without chattr: cannot make a file read-only")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        cannot(f"chattr +i: {done.stderr.decode().strip()}")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("how", ["file-mode", "header"])
async def test_read_only_replacement_fails_open(tmp_path: Path, how: str) -> None:
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path, check_interval=INTERVAL)
    await fill(backend, "mine", 5)
    replacement = tmp_path / "replacement.db"
    writer = SQLiteBackend(replacement)
    await writer.set("theirs", b"t", None)
    await writer.aclose()
    os.replace(replacement, path)
    undo = make_read_only(path, how)
    try:
        await wait_out()
        for _ in range(3):
            with pytest.raises(BackendError):
                await backend.set("k", b"v", None)
            with pytest.raises(BackendError):
                await backend.delete("theirs")
            try:
                assert await backend.get("theirs") in (b"t", None)
                assert await backend.get("mine0") is None
            except BackendError:
                pass
        # Through the engine: the stream is served whole, the store is skipped.
        cache = StreamCache(backend, GenericSSE())

        async def upstream() -> AsyncIterator[Event]:
            yield Event("one")

        async with cache.stream(cache.request({"q": 1}, shared=True), upstream) as stream:
            assert [e.data async for e in stream] == ["one"]
        assert not stream.stored
    finally:
        undo()
    path.unlink()  # the operator removes the read-only file: the same object recovers
    await wait_out()
    await backend.set("k", b"v", None)
    assert await backend.get("k") == b"v"
    await backend.aclose()
    assert integrity(path) == "ok"


_AS_ANOTHER_USER = textwrap.dedent(
    """
    import json, os, sys, anyio
    from sse_cache import StreamCache
    from sse_cache.adapters import GenericSSE
    from sse_cache.backends import from_url
    from sse_cache.backends._sqlite_file import DatabaseFile
    from sse_cache.entry import Entry
    from sse_cache.events import Event
    import email.parser, queue  # (what is imported lazily, before the user is dropped)

    opened = []  # (how many times the file was opened: not once per refused store)
    real_open = DatabaseFile._open
    DatabaseFile._open = lambda self: (opened.append(1), real_open(self))[1]

    async def main(url):
        said = []
        backend = from_url(url)
        await backend.aclose()
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)  # nobody: the file and its directory are root's
        backend = from_url(url)
        for call in (lambda: backend.get("held"), lambda: backend.set("new", b"n", None)):
            try:
                said.append(["ok", await call()])
            except Exception as exc:
                said.append([type(exc).__name__, str(exc)])
        cache = StreamCache(backend, GenericSSE())
        entry = Entry(schema="generic", created_at=0.0, events=(Event("x"),))
        for i in range(15):
            await cache.store(f"entry-{i}", entry)
        said.append(["breaker", cache.breaker.state.value, opened])
        await backend.aclose()
        print(json.dumps(said, default=lambda b: b.decode()))

    anyio.run(main, sys.argv[1])
    """
)


@pytest.mark.parametrize("directory", ["writable", "read-only"])
@pytest.mark.parametrize("query", ["", "&readonly=true"])
def test_a_file_this_process_may_not_write_serves_what_it_holds(directory: str, query: str) -> None:
    # A proxy running as another user than the file's owner (a file copied in by a deploy,
    # a shared volume): SQLite opens it read-only. Its stores failed as errors, counted by
    # the breaker, which then sent every stored answer upstream for its cooldown; now the
    # stores are refused (BackendReadOnly) and the hits served. Where the directory is not
    # writable either, SQLite cannot open a WAL file at all (it writes -wal and -shm beside
    # it): that is said, naming ?readonly=true, which serves it.
    import json
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="sse-cache-ro-"))  # (tmp_path: only root may enter)
    try:
        path = where / "cache.db"
        with closing(sqlite3.connect(path)):
            pass
        anyio.run(_hold_one, path)
        path.chmod(0o444)
        where.chmod(0o777 if directory == "writable" else 0o555)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _AS_ANOTHER_USER,
                f"sqlite:///{path}?check_interval=3600{query}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        got, put, (_, state, opened) = json.loads(done.stdout)
        if directory == "read-only" and not query:
            assert got[0] == put[0] == "BackendUnavailable"
            assert "cannot be opened by this process" in got[1] and "?readonly=true" in got[1]
            return
        assert got == ["ok", "kept"]
        assert put[0] == "BackendReadOnly"
        assert state == "closed"
        assert len(opened) == 1  # (once per check interval, an hour here)
    finally:
        where.chmod(0o700)
        shutil.rmtree(where)


async def _hold_one(path: Path) -> None:
    backend = SQLiteBackend(path)
    await backend.set("held", b"kept", None)
    await backend.aclose()


async def test_the_path_is_looked_at_once_per_check_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path, check_interval=3600)
    await backend.set("k", b"v", None)
    assert await backend.get("k") == b"v"  # (opens the near cache's probe: looks once)
    looks: list[str] = []
    real = sqlite_file_module.file_id

    def counting(name: str) -> tuple[int, int] | None:
        looks.append(name)
        return real(name)

    monkeypatch.setattr(sqlite_file_module, "file_id", counting)
    for _ in range(50):
        assert await backend.get("k") == b"v"
    assert looks == []  # not a stat per call: once per interval
    path.unlink()
    assert await backend.get("k") == b"v"  # not noticed before the interval is over
    await backend.aclose()


async def test_memory_databases_are_not_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    looks: list[str] = []
    real = sqlite_file_module.file_id

    def counting(name: str) -> tuple[int, int] | None:
        looks.append(name)
        return real(name)

    monkeypatch.setattr(sqlite_file_module, "file_id", counting)
    backend = from_url("sqlite:///:memory:?check_interval=0")
    for i in range(20):
        await backend.set(f"k{i}", b"v", None)
        assert await backend.get(f"k{i}") == b"v"
    assert (await backend.stats())["entries"] == 20
    await backend.aclose()
    assert looks == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_check_interval_option_is_validated(value: str) -> None:
    with pytest.raises(ConfigError, match="check_interval"):
        from_url(f"sqlite:///x.db?check_interval={value}")
    with pytest.raises(ConfigError, match="check_interval"):
        SQLiteBackend("x.db", check_interval=float(value) if value != "soon" else -2)


async def test_deleted_under_concurrent_use(tmp_path: Path) -> None:
    # Tasks keep reading and writing while the file goes: no call fails, none reads a value
    # it did not write, and what they write once the deletion was noticed is in the new file.
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path, check_interval=INTERVAL)
    halfway = anyio.Event()
    deleted = anyio.Event()

    async def worker(n: int) -> None:
        for i in range(20):
            value = f"{n}-{i}".encode() * 500
            await backend.set(f"w{n}-{i}", value, None)
            assert await backend.get(f"w{n}-{i}") in (value, None)
            if i == 10:
                halfway.set()
                await deleted.wait()

    async def delete() -> None:
        await halfway.wait()
        path.unlink()
        deleted.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(delete)
        for n in range(8):
            tg.start_soon(worker, n)
    await wait_out()
    for n in range(8):
        await backend.set(f"final{n}", b"f", None)
    reader = SQLiteBackend(path)
    for n in range(8):
        assert await reader.get(f"final{n}") == b"f"
    await reader.aclose()
    await backend.aclose()
    assert integrity(path) == "ok"


async def test_replacing_the_file_with_its_wal_removed_first(tmp_path: Path) -> None:
    # The procedure docs/backends.md gives for replacing a cache in use: whatever opens the
    # path next reads the new file alone, even before the running backend noticed.
    path = tmp_path / "cache.db"
    running = SQLiteBackend(path, check_interval=INTERVAL)
    await fill(running, "mine")
    replacement = tmp_path / "replacement.db"
    writer = SQLiteBackend(replacement)
    await fill(writer, "theirs")
    await writer.aclose()
    for suffix in ("-wal", "-shm"):
        os.unlink(f"{path}{suffix}")
    os.replace(replacement, path)
    newcomer = SQLiteBackend(path)
    try:
        await assert_holds(newcomer, "theirs")
        await assert_lacks(newcomer, "mine")
        await newcomer.set("new", b"v", None)
        await wait_out()
        assert await running.get("new") == b"v"
        await assert_holds(running, "theirs")
    finally:
        await newcomer.aclose()
        await running.aclose()
    assert integrity(path) == "ok"


async def test_readonly_reads_and_refuses_writes_changing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    writer = SQLiteBackend(path)
    await writer.set("k", b"v", None)
    await writer.aclose()
    before = files(tmp_path)
    reader = from_url(f"sqlite:///{path}?readonly=true")
    assert await reader.get("k") == b"v"
    assert [key async for key in reader.scan()] == ["k"]
    for write in (reader.set("k", b"w", None), reader.delete("k"), reader.clear()):
        with pytest.raises(BackendError, match="opened read-only"):
            await write
    await reader.aclose()  # (nothing to flush: the read is not recorded)
    assert files(tmp_path) == before


async def test_a_readonly_reader_sees_what_a_writer_stored_since(tmp_path: Path) -> None:
    # Opened while no process had the file (no -wal beside it), it is read as immutable:
    # such a reader never saw a row written after it opened, not even once the writer had
    # closed and checkpointed (helper-99). It reads the file again once a writer has it.
    path = tmp_path / "cache.db"
    writer = SQLiteBackend(path)
    await writer.set("a", b"old", None)
    await writer.aclose()
    reader = from_url(f"sqlite:///{path}?readonly=true")
    try:
        assert await reader.get("a") == b"old"
        writer = SQLiteBackend(path)
        await writer.set("b", b"new", None)
        await writer.set("a", b"changed", None)
        assert (await reader.get("b"), await reader.get("a")) == (b"new", b"changed")
        await writer.set("c", b"later", None)
        await writer.aclose()
        assert [await reader.get(k) for k in "abc"] == [b"changed", b"new", b"later"]
    finally:
        await reader.aclose()


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# -- rows another program wrote, or that a bit flipped on disk changed ------------------------


def flip_on_disk(path: Path, find: bytes, change: Callable[[bytearray, int], None]) -> None:
    """Apply ``change`` to the bytes of the closed (checkpointed) file at ``path``, at each
    place ``find`` occurs: what one bit gone wrong on the disk does, which ``PRAGMA
    integrity_check`` does not see when it leaves the row's record well formed."""
    raw = bytearray(path.read_bytes())
    at = raw.find(find)
    assert at >= 0, find
    while at >= 0:
        change(raw, at)
        at = raw.find(find, at + 1)
    path.write_bytes(raw)
    assert not Path(f"{path}-wal").exists()  # (all of it in the file itself)
    assert integrity(path) == "ok"


def value_made_text(path: Path, key: str, how: str) -> None:
    """Make the value of ``key`` a TEXT one, as ``how`` says."""
    if how == "bit flipped on disk":
        # The record's header ends with the value's serial type (a BLOB's is even, a TEXT's
        # odd, with the same length): its last byte comes right before the key's bytes, the
        # first of the row's body. (The key index's records hold the key too, not the value.)
        def flip(raw: bytearray, at: int) -> None:
            if b"VALUE" in raw[at : at + 64]:
                raw[at - 1] ^= 1

        flip_on_disk(path, key.encode(), flip)
        return
    text = {"not UTF-8": "CAST(X'56414c5545ff' AS TEXT)", "UTF-8": "'VALUE as text'"}[how]
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"UPDATE sse_cache_entries SET value = {text} WHERE key = ?", (key,))


@pytest.mark.parametrize("how", ["bit flipped on disk", "not UTF-8", "UTF-8"])
async def test_a_value_made_text_is_corrupt_deleted_and_not_counted_by_the_breaker(
    tmp_path: Path, how: str
) -> None:
    # A value that is TEXT and not UTF-8 (one bit flipped on disk makes a BLOB's serial type
    # TEXT's; integrity_check says ok) failed every read of its key with a BackendError from
    # sqlite3's decoding, before the check that raises CorruptEntry: never deleted, and
    # counted by the breaker, five lookups of it turned the cache off for every key
    # (helper-148). As documented: CorruptEntry, the engine deletes it, the breaker stays
    # closed.
    from sse_cache.entry import Entry
    from sse_cache.errors import CorruptEntry

    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path)
    await backend.set("sound", b"VALUE of a sound row", None)
    await backend.set("turned", b"VALUE\xff that turns text", None)
    await backend.aclose()  # (the last connection: its WAL is copied into the file)
    value_made_text(path, "turned", how)

    backend = SQLiteBackend(path)
    with pytest.raises(CorruptEntry, match="holds str"):
        await backend.get("turned")
    assert await backend.get("sound") == b"VALUE of a sound row"  # the connection goes on
    await backend.aclose()

    cache = StreamCache(f"sqlite:///{path}", GenericSSE())
    try:
        entry = Entry(schema="generic", created_at=0.0, events=(Event("one"),))
        await cache.store("entry", entry)
        for _ in range(8):
            assert await cache.lookup("turned") is None
        assert cache.breaker.state.value == "closed"
        assert await cache.lookup("entry") is not None  # served: the cache is still on
    finally:
        await cache.aclose()
    assert "turned" not in rows(path)  # deleted by the engine, at the first lookup
    assert "sound" in rows(path)


# b"0a1b2\xe3": the key 0a1b2c with one bit flipped (it still sorts where it did: the key
# index stays in order), as the backend reads it.
BAD_KEY = "0a1b2\udce3"


def key_made_not_utf8(path: Path, how: str) -> None:
    """Turn the key ``0a1b2c`` into one that is not UTF-8 (``BAD_KEY``), as ``how`` says."""
    if how == "bit flipped on disk":

        def flip(raw: bytearray, at: int) -> None:
            raw[at + 5] ^= 0x80  # in the row and in the key index alike: 'c' -> 0xe3

        flip_on_disk(path, b"0a1b2c", flip)
        return
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "UPDATE sse_cache_entries SET key = CAST(X'3061316232e3' AS TEXT) WHERE key = '0a1b2c'"
        )


def raw_keys(path: Path) -> list[bytes]:
    with closing(sqlite3.connect(path)) as conn:
        return [k for (k,) in conn.execute("SELECT CAST(key AS BLOB) FROM sse_cache_entries")]


@pytest.mark.parametrize("how", ["bit flipped on disk", "written by another program"])
async def test_a_key_that_is_not_utf8_is_listed_and_evicted_when_the_file_is_full(
    tmp_path: Path, how: str
) -> None:
    # A key that is not UTF-8 stopped eviction (sqlite3 could not decode the victims' keys):
    # once the file was full, every store failed with a BackendError the breaker counts, and
    # every scan failed as a whole (`sse-cache ls` and `stats`; helper-148). Now it is listed,
    # its bytes as lone surrogates as Redis' scan gives them, and evicted like any row.
    path = tmp_path / "cache.db"
    backend = from_url(f"sqlite:///{path}?max_bytes=10KiB")
    await backend.set("0a1b2c", b"x" * 1000, None)  # the least recently used
    for i in range(5):
        await backend.set(f"k{i}", b"y" * 1000, None)
    await backend.aclose()
    key_made_not_utf8(path, how)
    assert b"0a1b2\xe3" in raw_keys(path)

    backend = from_url(f"sqlite:///{path}?max_bytes=10KiB")
    try:
        assert [key async for key in backend.scan()] == [BAD_KEY, *(f"k{i}" for i in range(5))]
        assert [key async for key in backend.scan("k")] == [f"k{i}" for i in range(5)]
        for i in range(5, 12):  # past the budget: the oldest rows go, that one first
            await backend.set(f"k{i}", b"z" * 1000, None)
        assert b"0a1b2\xe3" not in raw_keys(path)
        assert await backend.get("k11") == b"z" * 1000
        assert (await backend.stats())["bytes"] <= 10 * 1024
    finally:
        await backend.aclose()
    assert integrity(path) == "ok"


async def test_a_scan_goes_on_past_a_page_that_ends_with_a_key_that_is_not_utf8(
    tmp_path: Path,
) -> None:
    # The next page is asked for after the last key of this one, bound to the statement: a
    # key with lone surrogates cannot be bound as a str (UnicodeEncodeError).
    path = tmp_path / "cache.db"
    backend = SQLiteBackend(path)
    await backend.set("b", b"v", None)
    await backend.aclose()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO sse_cache_entries VALUES (?, 1, 0, 0, NULL, X'00')",
            [(f"a{i:03}",) for i in range(499)],
        )
        # After every a000..a498 (0xff sorts above any digit): the 500th key, the page's last.
        conn.execute(
            "INSERT INTO sse_cache_entries VALUES (CAST(X'61ff' AS TEXT), 1, 0, 0, NULL, X'00')"
        )
    backend = SQLiteBackend(path)
    try:
        listed = [key async for key in backend.scan()]
    finally:
        await backend.aclose()
    assert listed == [*(f"a{i:03}" for i in range(499)), "a\udcff", "b"]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("query", ["", "?create=false"])
async def test_a_path_that_is_not_a_regular_file_is_said_at_once(
    tmp_path: Path, kind: str, query: str
) -> None:
    # A FIFO at the path (a mistake, or a file swapped for one): SQLite said "disk I/O
    # error", and a read-only open (sse-cache ls) waited for a writer for ever (helper-148;
    # see test_cli_inspect for that one, in a process of its own).
    path = tmp_path / "cache.db"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    backend = from_url(f"sqlite:///{path}{query}")
    what = "a FIFO (named pipe)" if kind == "fifo" else "a directory"
    try:
        for _ in range(2):
            with pytest.raises(BackendUnavailable) as raised:
                await backend.get("k")
            assert f"SQLite file {str(path)!r} is not a regular file: it is {what}" in str(
                raised.value
            )
    finally:
        await backend.aclose()


async def _a_key_led_to_anothers_row(path: Path) -> Path:
    """A cache file at ``path`` whose key index leads "tenant-a:key" to the row of
    "tenant-b:key" (answers "A's answer" and "B's answer")."""
    backend = from_url(f"sqlite:///{path}")
    await backend.set("first", b"(rowid 1, its cell's integer stored in no byte)", ttl=None)
    await backend.set("tenant-a:key", b"A's answer", ttl=None)
    await backend.set("tenant-b:key", b"B's answer", ttl=None)
    await backend.aclose()
    with closing(sqlite3.connect(path)) as conn:
        [(b_row,)] = conn.execute("SELECT rowid FROM sse_cache_entries WHERE key = 'tenant-b:key'")
    _point_index_at(path, "tenant-a:key", b_row)
    return path


def _point_index_at(path: Path, key: str, rowid: int) -> None:
    """Corrupt one byte of ``path``'s key index: the cell of ``key`` leads to ``rowid``."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [(own,)] = conn.execute("SELECT rowid FROM sse_cache_entries WHERE key = ?", (key,))
    assert 1 < own < 128 and 1 < rowid < 128 and len(key) < 57  # (one-byte fields)
    # An index cell's record: its header (its size; the key's TEXT type; a one-byte integer),
    # the key, the rowid.
    cell = bytes([3, 2 * len(key) + 13, 1]) + key.encode() + bytes([own])
    data = bytearray(path.read_bytes())
    at = data.find(cell)
    assert at > 0 and data.find(cell, at + 1) < 0
    data[at + len(cell) - 1] = rowid
    path.write_bytes(bytes(data))


async def test_a_corrupt_key_index_never_answers_one_key_with_anothers_value(
    tmp_path: Path,
) -> None:
    # One byte of the key index's cell for "tenant-a:key" made it lead to the row of
    # "tenant-b:key": a whole entry, its checksum sound, so tenant B's answer was tenant A's
    # hit (helper-164). The row's own key is read with it now: the read fails (a miss, the
    # engine fails open), and so do a write and a delete by that key, which would change the
    # other's row. The other key is read as it was.
    path = await _a_key_led_to_anothers_row(tmp_path / "c.db")
    backend = from_url(f"sqlite:///{path}")
    try:
        with pytest.raises(BackendCorrupt, match="key index is corrupt.*REINDEX"):
            await backend.get("tenant-a:key")
        with pytest.raises(BackendCorrupt, match="key index is corrupt"):
            await backend.set("tenant-a:key", b"A's answer again", ttl=None)
        with pytest.raises(BackendCorrupt, match="key index is corrupt"):
            await backend.delete("tenant-a:key")
        assert await backend.get("tenant-b:key") == b"B's answer"
    finally:
        await backend.aclose()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("REINDEX sse_cache_entries")  # as the error says: each key its own again
        conn.commit()
    backend = from_url(f"sqlite:///{path}")
    try:
        assert await backend.get("tenant-a:key") == b"A's answer"
        assert await backend.get("tenant-b:key") == b"B's answer"
    finally:
        await backend.aclose()


async def test_a_file_on_a_read_only_mount_says_to_open_it_read_only(tmp_path: Path) -> None:
    # A read-only mount: SQLite says SQLITE_CANTOPEN ("unable to open database file"), not
    # SQLITE_READONLY, and the error said nothing more; every request was a miss, the way
    # out (?readonly=true) unsaid (helper-164). A real bind mount, read-only.
    cannot = pytest.fail if in_ci() else pytest.skip
    source, mounted = tmp_path / "source", tmp_path / "mounted"
    source.mkdir()
    mounted.mkdir()
    writer = from_url(f"sqlite:///{source / 'c.db'}")
    await writer.set("k", b"kept", ttl=None)
    await writer.aclose()
    if shutil.which("mount") is None:
        cannot("no mount command: cannot make a read-only mount")
    done = await anyio.run_process(["mount", "--bind", str(source), str(mounted)], check=False)
    if done.returncode != 0:
        cannot(f"mount --bind: {done.stderr.decode().strip()}")
    try:
        await anyio.run_process(["mount", "-o", "remount,bind,ro", str(mounted)])
        backend = from_url(f"sqlite:///{mounted / 'c.db'}")
        try:
            with pytest.raises(
                BackendUnavailable, match=r"read-only mount\? open it with \?readonly=true"
            ):
                await backend.get("k")
        finally:
            await backend.aclose()
        reader = from_url(f"sqlite:///{mounted / 'c.db'}?readonly=true")
        try:
            assert await reader.get("k") == b"kept"
        finally:
            await reader.aclose()
    finally:
        await anyio.run_process(["umount", str(mounted)])


async def test_a_corrupt_key_index_does_not_turn_the_whole_cache_off(tmp_path: Path) -> None:
    # Each lookup of the one damaged key failed the backend for the breaker: five of them
    # opened it, and every other key was skipped (misses) for its cooldown, again each time
    # that key was asked for (helper-167). The backend answered: the rest of it reads.
    from sse_cache.adapters import OpenAIChat

    path = await _a_key_led_to_anothers_row(tmp_path / "c.db")
    cache = StreamCache(f"sqlite:///{path}", OpenAIChat())
    try:
        for _ in range(8):
            assert await cache.lookup("tenant-a:key") is None
        assert cache.breaker.state == "closed"
    finally:
        await cache.aclose()

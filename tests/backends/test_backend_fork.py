"""A backend object used before ``fork()`` (built and warmed at import, then gunicorn
``--preload`` or multiprocessing workers forked from that process): in the child it opens
afresh, so that neither process reads the other's replies, no near cache trusts
invalidations only the parent hears, and nothing the child stores is lost when the parent
closes (docs/backends.md, "Forked processes")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sse_cache.backends import from_url

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork() is POSIX")

ROUNDS = 200  # alternating writes and reads per process, at once in both
CHILD_ENTRIES = 20
DEADLINE = 30.0  # seconds: a deadlock guard, reached only when a change is never seen


async def own_values(backend: Any, who: str) -> list[str]:
    """Write and read back keys of one's own, ``ROUNDS`` times: what came back wrong (a
    reply meant for the other process, on a socket both hold, would)."""
    wrong = []
    for i in range(ROUNDS):
        value = f"{who}-{i}".encode()
        await backend.set(f"{who}:{i % 7}", value, None)
        got = await backend.get(f"{who}:{i % 7}")
        if got != value:
            wrong.append(f"{who}:{i % 7} = {got!r}, not {value!r}")
    return wrong


async def seen_eventually(backend: Any, key: str, expected: bytes | None) -> bool:
    # The other client's write reaches a near cache by Redis's invalidation (~150 µs) or
    # SQLite's data_version (at once): polled, with a deadline only a stale value reaches.
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while loop.time() < end:
        if await backend.get(key) == expected:
            return True
        await asyncio.sleep(0.01)
    return False


def in_child(backend: Any, url: str, parent_closed: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        other = from_url(url)  # another client: another process's writes
        try:
            await other.set("k", b"new", None)
            changed = await seen_eventually(backend, "k", b"new")
            await other.delete("k")
            deleted = await seen_eventually(backend, "k", None)
        finally:
            await other.aclose()
        wrong = await own_values(backend, "child")
        # Stored once the parent has closed its backend, and never closed here (a worker
        # ends without closing what it uses): a SQLite connection carried across the fork
        # let the parent's close delete the WAL the child then wrote to.
        os.read(parent_closed, 1)
        for i in range(CHILD_ENTRIES):
            await backend.set(f"stored-by-child:{i}", b"kept", None)
        return {"changed": changed, "deleted": deleted, "wrong": wrong}

    return asyncio.run(run())


@pytest.mark.parametrize(
    "backend_kind", ["sqlite", "redis", "redis-cluster", "memcached", "memcached-pool"]
)
def test_a_backend_used_before_a_fork_starts_afresh_in_the_child(backend_url: str) -> None:
    backend: Any = from_url(backend_url)
    loop = asyncio.new_event_loop()

    async def warm() -> None:
        # Open its connections and, where there is one, fill its near cache: what the
        # child inherits.
        await backend.set("k", b"old", None)
        assert await seen_eventually(backend, "k", b"old")
        cached = getattr(backend, "cached", None)
        if cached is not None and "+cluster" not in backend_url:  # (a cluster has none)
            loop_time = asyncio.get_running_loop().time
            end = loop_time() + DEADLINE
            while cached("k") != b"old" and loop_time() < end:
                await backend.get("k")
                await asyncio.sleep(0.01)
            assert cached("k") == b"old"

    # The loop is left as it is, its tasks (Redis's invalidation listener) pending: the
    # parent goes on using it after the fork.
    loop.run_until_complete(warm())
    reader, writer = os.pipe()
    closed_reader, closed_writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(reader)
        os.close(closed_writer)
        code = 1
        try:
            report = in_child(backend, backend_url, closed_reader)
            os.write(writer, json.dumps(report).encode())
            code = 0
        except BaseException as exc:
            os.write(writer, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(writer)
    os.close(closed_reader)
    try:
        # Meanwhile the parent uses the same backend object, as a worker's sibling would.
        parent_wrong = loop.run_until_complete(own_values(backend, "parent"))
        loop.run_until_complete(backend.aclose())
    finally:
        with contextlib.suppress(BrokenPipeError):  # (a child that failed early: its report)
            os.write(closed_writer, b"x")
        os.close(closed_writer)
        chunks = []
        while chunk := os.read(reader, 65536):
            chunks.append(chunk)
        os.close(reader)
        _, status = os.waitpid(pid, 0)
        loop.close()
    report = json.loads(b"".join(chunks) or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert parent_wrong == [] and report["wrong"] == []
    assert report["changed"], "the child kept answering the parent's value after a write"
    assert report["deleted"], "the child kept answering a deleted value"

    async def stored() -> tuple[int, list[bytes | None]]:
        fresh = from_url(backend_url)
        try:
            by_child = [await fresh.get(f"stored-by-child:{i}") for i in range(CHILD_ENTRIES)]
            # Each process's last write of each of its keys (ROUNDS - 7 .. ROUNDS - 1).
            last = [
                await fresh.get(f"{who}:{i % 7}")
                for who in ("parent", "child")
                for i in range(ROUNDS - 7, ROUNDS)
            ]
        finally:
            await fresh.aclose()
        return by_child.count(b"kept"), last

    kept, last = asyncio.run(stored())
    # Nothing either process stored is lost: neither closing its backend (the child first,
    # or the parent first) takes the other's writes with it.
    assert kept == CHILD_ENTRIES
    assert last == [
        f"{who}-{i}".encode() for who in ("parent", "child") for i in range(ROUNDS - 7, ROUNDS)
    ]


def test_a_fork_while_a_sqlite_query_runs_in_another_thread_does_not_hang_the_child(
    tmp_path: Path,
) -> None:
    # A worker thread of the parent is inside SQLite (a statement that takes its time) when
    # another thread forks: in the child, SQLite's mutex of that connection is held for
    # ever. Closing the inherited connection there would wait on it for ever; the child must
    # start, and use the cache on a connection of its own.
    backend: Any = from_url(f"sqlite:///{tmp_path / 'busy.db'}")
    asyncio.run(backend.set("k", b"v", None))
    db = backend._db  # the one connection's owner (_sqlite_file.DatabaseFile)
    running, release = threading.Event(), threading.Event()
    results: list[object] = []

    def thinking() -> int:
        # Inside SQLite (its connection's mutex held, in a statement's step) until released.
        # (A long recursive query allocates as it runs, under SQLite's global allocator
        # mutex when SQLite counts its memory, as by default: a fork at such a moment can
        # hang any child's first use of SQLite, in any program, which is not this test's
        # point; the test hung once in a loaded run.)
        running.set()
        release.wait(DEADLINE)
        return 1

    def long_query(conn: sqlite3.Connection) -> None:
        conn.create_function("thinking", 0, thinking)
        results.append(conn.execute("SELECT thinking()").fetchone()[0])

    def worker() -> None:
        try:
            db.run(long_query, read=True)
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert running.wait(DEADLINE)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            code = 0 if asyncio.run(backend.get("k")) == b"v" else 2
        finally:
            os._exit(code)
    try:
        end = time.monotonic() + DEADLINE  # a deadlock guard: a hung child never exits
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < end:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child hung at the fork (closing a connection in use)")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        release.set()  # the parent's long query ends
        thread.join(DEADLINE)
        asyncio.run(backend.aclose())
    assert results == [1]  # the parent's query, undisturbed by the fork

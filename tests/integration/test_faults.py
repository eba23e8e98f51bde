"""Faults with real servers, through the caching proxy over loopback HTTP: every client gets a
complete, correct answer or a visible failure (an aborted response, an error status), never a
clean ``200`` holding part of an answer, and nothing wrong is stored.

- Storage faults while requests stream (Redis hung with SIGSTOP then resumed, Redis and
  memcached killed then restarted, the SQLite file deleted, replaced, or replaced by a
  read-only one): the clients never see them (fail open), and the cache is used again once
  the backend is back.
- Upstream faults (cut, silent, invalid bytes) through the ``sse-cache proxy`` command on a
  SQLite file, mixed with good requests: what was stored is read back from the file.
- Hostile requests (bodies the cache cannot key, invalid control headers): forwarded
  uncached byte for byte, or refused with ``400`` naming the header; one log line each, no
  traceback.

Covered elsewhere and not repeated: the breaker opening on a hung Redis and skipping it
(test_proxy_breaker.py), each backend's own faults (tests/backends/test_backend_faults.py,
test_backend_sqlite.py), every reader of one live stream failing when its upstream is cut,
goes silent or sends bad bytes (test_live_streams.py), a body 600 levels deep (test_proxy.py).
How long a request waits while the breaker is open is measured in benchmarks/bench_load.py,
not asserted here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache import Breaker, Entry, Event, Notice, StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.backends import from_url
from sse_cache.backends.redis import RedisBackend
from sse_cache.breaker import BreakerState
from sse_cache.errors import BackendBusy
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import MockUpstream, NoticeLog

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _servers import server

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-faults"}
CLI = [sys.executable, "-m", "sse_cache"]
#: The breaker's cooldown in these tests: short, so that waiting for the cache to come back is
#: cheap (the default is 10 s).
COOLDOWN = 1.0
#: Request headers for an answer paced at 10 ms per event (~0.6 s in all), so that a fault
#: made once every such response has begun lands mid-stream.
SLOW = {"x-mock-first-ms": "10", "x-mock-delay-ms": "10"}
#: How long a test waits for the cache to be used again after a fault is repaired (a bound on
#: "comes back", with room for a loaded CI machine; not a timing assertion).
RECOVERY = 30.0


def slow(_: str) -> dict[str, str]:
    return SLOW


def payload(prompt: str) -> dict[str, Any]:
    return {"model": "gpt-mock", "input": prompt, "stream": True}


@dataclass
class Reply:
    prompt: str
    status: int = 0
    cache: str = ""  # x-sse-cache
    key: str = ""  # x-sse-cache-key
    body: bytes = b""
    error: str = ""  # the exception that ended the response early (a visible failure)


class Client:
    """Streamed requests to the proxy, checked against the upstream's own answers."""

    def __init__(self, proxy: str, upstream: str) -> None:
        self.http = httpx2.AsyncClient(base_url=proxy, timeout=60)
        self.direct = httpx2.AsyncClient(base_url=upstream, timeout=60)
        self._expected: dict[tuple[str, str], bytes] = {}

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.direct.aclose()

    async def expected(self, prompt: str, headers: dict[str, str] | None = None) -> bytes:
        """The upstream's answer to the same request, asked directly (it is deterministic; its
        pace does not change its bytes, so it is asked to answer at once)."""
        memo = (prompt, json.dumps(headers, sort_keys=True))
        if memo not in self._expected:
            at_once = {"x-mock-first-ms": "0", "x-mock-delay-ms": "0"}
            r = await self.direct.post(
                "/v1/responses", json=payload(prompt), headers={**KEY, **at_once, **(headers or {})}
            )
            self._expected[memo] = r.content
        return self._expected[memo]

    async def _one(
        self, reply: Reply, headers: dict[str, str], begun: Callable[[], None] | None = None
    ) -> None:
        told = False
        parts: list[bytes] = []
        try:
            async with self.http.stream(
                "POST", "/v1/responses", json=payload(reply.prompt), headers={**KEY, **headers}
            ) as r:
                reply.status = r.status_code
                reply.cache = r.headers.get("x-sse-cache", "")
                reply.key = r.headers.get("x-sse-cache-key", "")
                async for chunk in r.aiter_raw():
                    parts.append(chunk)
                    if not told and begun is not None:
                        told = True
                        begun()
        except httpx2.HTTPError as exc:
            reply.error = repr(exc)
        finally:
            reply.body = b"".join(parts)
            if not told and begun is not None:
                begun()

    async def ask(self, prompt: str, **headers: str) -> Reply:
        reply = Reply(prompt)
        await self._one(reply, headers)
        return reply

    async def herd(
        self,
        prompts: list[str],
        *,
        during: Callable[[], object] | None = None,
        headers: Callable[[str], dict[str, str]] = lambda _: {},
    ) -> list[Reply]:
        """One streamed request per prompt, all released together. ``during`` is called once
        every response has its first body bytes (or has failed): while they stream on."""
        replies = [Reply(p) for p in prompts]
        go, streaming = anyio.Event(), anyio.Event()
        begun = ended = 0

        def one_begun() -> None:
            nonlocal begun
            begun += 1
            if begun == len(replies):
                streaming.set()

        async def one(reply: Reply) -> None:
            nonlocal ended
            await go.wait()
            await self._one(reply, headers(reply.prompt), one_begun)
            ended += 1

        async with anyio.create_task_group() as tg:
            for reply in replies:
                tg.start_soon(one, reply)
            go.set()
            if during is not None:
                await streaming.wait()
                assert ended == 0, "a response ended before the fault: it is not mid-stream"
                during()
        return replies

    async def assert_answered(self, replies: list[Reply]) -> None:
        """Every reply complete, 200 and byte-identical to the upstream's answer."""
        for reply in replies:
            assert reply.error == "" and reply.status == 200, reply
            assert reply.body == await self.expected(reply.prompt), reply.prompt

    async def store(self, prompts: list[str]) -> list[str]:
        """Ask each prompt until the cache replays it (stored)."""
        for prompt in prompts:
            assert (await self.ask(prompt)).cache == "miss"
            await self.until_hit(prompt)
        return prompts

    async def until_hit(self, prompt: str) -> Reply:
        """Ask ``prompt`` until it is a hit; every answer on the way must be right."""
        with anyio.fail_after(RECOVERY):
            while True:
                reply = await self.ask(prompt)
                await self.assert_answered([reply])
                if reply.cache == "hit":
                    return reply
                await anyio.sleep(0.05)

    async def assert_nothing_wrong_stored(self, prompts: list[str]) -> None:
        """Whatever the cache holds for ``prompts`` replays exactly (a stored entry is a hit,
        compared byte for byte)."""
        replies = await self.herd(prompts)
        assert {r.cache for r in replies} <= {"hit", "miss"}, replies
        await self.assert_answered(replies)

    async def health(self) -> tuple[int, dict[str, Any]]:
        r = await self.http.get("/_sse_cache/health")
        return r.status_code, r.json()

    async def metrics(self) -> Counter[str]:
        samples: Counter[str] = Counter()
        for line in (await self.http.get("/_sse_cache/metrics")).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


@asynccontextmanager
async def proxied(serve: Any, backend: str, **options: Any) -> AsyncIterator[Client]:
    """The mock upstream (answering quickly unless asked for :data:`SLOW`) and the caching
    proxy on ``backend``, both served on loopback."""
    upstream_app = MockUpstream(delay=0.001, first_delay=0.001)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, backend, **options)
        async with serve(app) as base:
            client = Client(base, upstream)
            try:
                yield client
            finally:
                await client.aclose()
                await app.aclose()


def transitions_logged(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    found: Counter[str] = Counter()
    for record in caplog.records:
        match = re.search(r"backend circuit (\S+) \(", record.getMessage())
        if match:
            found[match.group(1)] += 1
    return found


def transitions_counted(metrics: Counter[str]) -> Counter[str]:
    name = "sse_cache_backend_breaker_transitions_total"
    return Counter(
        {s: int(metrics[f'{name}{{state="{s}"}}']) for s in ("open", "half-open", "closed")}
    )


# -- Redis hung (SIGSTOP), then resumed ---------------------------------------------------------


async def test_a_hung_redis_costs_no_answer_and_its_cache_comes_back(
    serve: Any, spawn_redis: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sse_cache")
    redis = spawn_redis()
    backend = f"{redis.url}?timeout=0.2"
    options = {"backend_timeout": 0.5, "breaker_failures": 2, "breaker_cooldown": COOLDOWN}
    async with proxied(serve, backend, **options) as c:
        stored = await c.store(["stored 0", "stored 1", "stored 2"])
        try:
            # Six misses streaming when Redis stops: each is answered whole (its store fails).
            in_flight = [f"in flight {i}" for i in range(6)]
            await c.assert_answered(await c.herd(in_flight, during=redis.pause, headers=slow))
            # While it hangs, stored and new prompts released together: answered whole by the
            # upstream, the cache skipped.
            hung = await c.herd([*stored, "while hung 0", "while hung 1"])
            await c.assert_answered(hung)
            assert {r.cache for r in hung[len(stored) :]} == {"miss"}
            # A stored answer may still be a hit from the near cache until its tracking
            # connection's PING goes unanswered (within PING_INTERVAL + timeout): what it
            # holds is what Redis held when it stopped, and nothing can change a stopped
            # Redis. (Operations give up after one timeout, not two, since helper-81: this
            # herd now comes before the PING does.)
            assert {r.cache for r in hung[: len(stored)]} <= {"miss", "hit"}
            status, health = await c.health()
            assert status == 503 and health["breaker"] != "closed", health
        finally:
            redis.resume()
        # After the cooldown one request probes Redis; it answers, the breaker closes and the
        # stored answers are replayed again.
        await c.until_hit(stored[0])
        status, health = await c.health()
        assert status == 200 and health["breaker"] == "closed", health
        again = await c.herd(stored)
        await c.assert_answered(again)
        assert {r.cache for r in again} == {"hit"}
        # A store sent while Redis hung either failed or landed whole once it resumed.
        await c.assert_nothing_wrong_stored([*in_flight, "while hung 0", "while hung 1"])
        counted = transitions_counted(await c.metrics())
    # One log line per transition of the breaker, none per skipped request.
    assert counted["open"] >= 1 and counted["closed"] >= 1, counted
    assert transitions_logged(caplog) == counted


# -- Redis's connection pool exhausted ---------------------------------------------------------


async def test_an_exhausted_redis_pool_is_reported_as_such(redis_server: Any) -> None:
    # Under a burst larger than the pool (the load benchmark: 200 connections, a pool of 64,
    # a busy event loop), operations wait for a pooled connection until their timeout. That is
    # a timeout, and says so: not "Redis is unreachable", which sent operators to a healthy
    # server.
    url = f"{redis_server.url}?max_connections=1&timeout=0.2&prefix=pool-{os.getpid()}:"
    backend = from_url(url)
    assert isinstance(backend, RedisBackend)
    try:
        await backend.set("k", b"v", None)
        pool = backend.client.connection_pool
        busy = await pool.get_connection()  # the only connection, held by someone else
        try:
            with pytest.raises(BackendBusy, match="no pooled Redis connection came free"):
                await backend.get("k")
        finally:
            await pool.release(busy)
        assert await backend.get("k") == b"v"
    finally:
        await backend.aclose()


async def test_a_busy_redis_pool_does_not_open_the_breaker(redis_server: Any) -> None:
    # A burst larger than this process's pool is not a failing backend: were it counted, the
    # breaker would skip a healthy Redis for its cooldown and send every stored answer to the
    # (paid) upstream, under load. Each busy lookup is a miss; the breaker stays closed and
    # the entry is found again once the pool has room. A dead server still opens it
    # (tests/engine/test_breaker.py).
    url = f"{redis_server.url}?max_connections=1&timeout=0.2&prefix=busy-{os.getpid()}:"
    notices: list[Notice] = []
    breaker = Breaker(failures=2, cooldown=3600)
    cache = StreamCache(url, GenericSSE(), breaker=breaker, hooks=[notices.append])
    try:
        entry = Entry(schema="generic", created_at=1.0, status=200,
                      content_type="text/event-stream", events=(Event("x"),))  # fmt: skip
        assert await cache.store("k", entry)
        backend = cache.backend
        assert isinstance(backend, RedisBackend)
        pool = backend.client.connection_pool
        held = await pool.get_connection()  # the only connection, held by someone else
        try:
            for _ in range(4):  # twice the breaker's threshold
                assert await cache.lookup("k") is None
        finally:
            await pool.release(held)
        assert breaker.state is BreakerState.CLOSED
        assert [n.kind for n in notices if n.kind == "read_failed"] == ["read_failed"] * 4
        assert not [n for n in notices if n.kind == "breaker"]
        found = await cache.lookup("k")
        assert found is not None and found.events == entry.events
    finally:
        await cache.aclose()


async def test_a_busy_sqlite_connection_does_not_open_the_breaker(tmp_path: Path) -> None:
    # SQLite serves one call at a time per process. A write waiting on another process's lock
    # holds the connection (within its own bound, ``timeout``); the lookups queued behind it
    # give up after ``queue_timeout`` as busy, not as failures: each is a miss, the breaker
    # stays closed, and the entry is found once the connection is free. (Before, such waits
    # ran into the engine's backend_timeout and counted: a burst of stores on a healthy SQLite
    # turned the cache off.)
    path = tmp_path / "cache.db"
    backend = from_url(f"sqlite:///{path}?timeout=30&queue_timeout=0.2&near_cache=0")
    notices: list[Notice] = []
    breaker = Breaker(failures=2, cooldown=3600)
    cache = StreamCache(backend, GenericSSE(), breaker=breaker, hooks=[notices.append])
    entry = Entry(schema="generic", created_at=1.0, status=200,
                  content_type="text/event-stream", events=(Event("x"),))  # fmt: skip
    try:
        assert await cache.store("k", entry)
        holder = sqlite3.connect(path, isolation_level=None)  # another process, mid-write
        holder.execute("BEGIN IMMEDIATE")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(backend.set, "other", b"v", None)  # waits for the lock
                await anyio.wait_all_tasks_blocked()
                for _ in range(4):  # twice the breaker's threshold
                    assert await cache.lookup("k") is None
                holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert breaker.state is BreakerState.CLOSED
        failed = [n for n in notices if n.kind == "read_failed"]
        assert len(failed) == 4 and all("BackendBusy" in n.detail for n in failed), failed
        assert not [n for n in notices if n.kind == "breaker"]
        found = await cache.lookup("k")
        assert found is not None and found.events == entry.events
        assert await backend.get("other") == b"v"  # the write that held it went through
    finally:
        await cache.aclose()


async def test_a_slow_memcached_holding_every_pooled_connection_is_busy(
    spawn_memcached: Callable[[], Any],
) -> None:
    # memcached paused (SIGSTOP) for less than a call's own timeout: the call holding the
    # pool's only connection is waiting within its bound, so one queued behind it is busy
    # (not counted by the breaker), as with Redis's pool; the held call completes once the
    # server goes on.
    server = spawn_memcached()
    url = f"memcached://{server.address}?max_pool_size=1&timeout=30&queue_timeout=0.2"
    backend = from_url(url)
    try:
        await backend.set("k", b"v", None)
        results: list[bytes | None] = []

        async def held_get() -> None:
            results.append(await backend.get("k"))

        server.pause()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(held_get)
                await anyio.wait_all_tasks_blocked()  # it waits for the paused server
                with pytest.raises(BackendBusy, match="pooled memcached connections"):
                    await backend.get("k")
                server.resume()
        finally:
            if server.paused:
                server.resume()
        assert results == [b"v"]
        assert await backend.get("k") == b"v"
    finally:
        await backend.aclose()


# -- Redis and memcached killed, then restarted -----------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "memcached"])
async def test_a_killed_backend_costs_no_answer_and_a_restarted_one_is_used_again(
    serve: Any,
    spawn_redis: Callable[..., Any],
    spawn_memcached: Callable[[], Any],
    kind: str,
) -> None:
    if kind == "redis":
        backend_server = spawn_redis()
        backend = f"{backend_server.url}?timeout=0.2"
    else:
        backend_server = spawn_memcached()
        backend = f"memcached://{backend_server.address}?timeout=0.2"
    options = {"backend_timeout": 0.5, "breaker_failures": 2, "breaker_cooldown": COOLDOWN}
    async with proxied(serve, backend, **options) as c:
        stored = await c.store(["stored 0", "stored 1"])
        in_flight = [f"in flight {i}" for i in range(6)]
        # SIGKILL while six misses stream: their stores fail, their clients see nothing.
        await c.assert_answered(await c.herd(in_flight, during=backend_server.stop, headers=slow))
        down = await c.herd([*stored, "while down"])
        await c.assert_answered(down)
        assert {r.cache for r in down} == {"miss"}
        status, _ = await c.health()
        assert status == 503
        backend_server.start()  # the same port, empty (no persistence)
        # Once the breaker lets a request through again, answers are stored and replayed.
        await c.until_hit("after the restart")
        await c.until_hit(stored[0])
        status, health = await c.health()
        assert status == 200 and health["breaker"] == "closed", health
        await c.assert_nothing_wrong_stored([*stored, *in_flight, "while down"])


# -- the SQLite file deleted, replaced, or replaced by a read-only one --------------------------


def entry_keys(path: Path) -> set[str]:
    """The entry keys (not the index rows) in the SQLite file at ``path``, read by another
    process: the ``sse-cache ls`` command (which never creates a file: none there, no keys)."""
    if not path.exists():
        return set()
    done = subprocess.run(
        [*CLI, "ls", "--backend", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def make_read_only(path: Path) -> None:
    """A write version above 2 in the database header: SQLite opens the file read-only (what
    a read-only mount or file mode does, without needing either)."""
    with path.open("r+b") as f:
        f.seek(18)
        f.write(b"\x03")


def raw_keys(path: Path) -> set[str]:
    """Every key in the file, read without writing to it."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {k for (k,) in conn.execute("SELECT key FROM sse_cache_entries")}


@pytest.mark.parametrize("fault", ["deleted", "replaced", "replaced-read-only"])
async def test_the_sqlite_file_changing_under_a_running_proxy(
    serve: Any, tmp_path: Path, fault: str
) -> None:
    path = tmp_path / "cache.db"
    other = tmp_path / "other.db"
    # Another cache, prepared by another proxy: it holds one answer, "theirs".
    async with proxied(serve, f"sqlite:///{other}") as c:
        theirs = (await c.store(["theirs"]))[0]
    theirs_keys = raw_keys(other)

    def change_the_file() -> None:
        if fault == "deleted":
            path.unlink()  # `rm cache.db`; its -wal and -shm stay
            return
        if fault == "replaced-read-only":
            make_read_only(other)
        os.replace(other, path)

    notices = NoticeLog()
    options = {"breaker_cooldown": COOLDOWN, "hooks": [notices]}
    async with proxied(serve, f"sqlite:///{path}", **options) as c:
        mine = await c.store(["mine 0", "mine 1"])
        in_flight = [f"in flight {i}" for i in range(6)]
        await c.assert_answered(await c.herd(in_flight, during=change_the_file, headers=slow))
        # Answered right while the proxy has not noticed yet, or has.
        await c.assert_answered(await c.herd([mine[1], theirs, "after 0", "after 1"]))

        if fault == "replaced-read-only":
            # Once the proxy has opened the new file (within its check interval, 1 s), which
            # SQLite opens read-only, nothing can be stored (BackendReadOnly, not counted by
            # the breaker): new answers come from the upstream, and the file is left as it
            # was. The health check says the backend reads (the file's own answers are
            # served: another upstream's here, so no hit of this proxy's).
            def refused() -> bool:
                return any(n.kind == "not_stored" and "read-only" in n.detail for n in notices.seen)

            with anyio.fail_after(RECOVERY):
                for probe in itertools.count():
                    await c.assert_answered([await c.ask(f"probe {probe}")])
                    if refused():
                        break
            twice = [await c.ask("while read-only") for _ in range(2)]
            await c.assert_answered(twice)
            assert [r.cache for r in twice] == ["miss", "miss"]
            assert (await c.health())[0] == 200
            assert raw_keys(path) == theirs_keys
            # The operator removes the read-only file: the proxy creates a new one and uses it.
            path.unlink()
            await c.until_hit("after the repair")
            assert (await c.ask("after the repair")).key in entry_keys(path)
            await c.assert_nothing_wrong_stored([*mine, theirs, *in_flight])
            return

        # Within its check interval (1 s) the proxy reopens the path: what it stores from then
        # on is in the file there, where `sse-cache ls` and other processes look.
        noticed = await c.until_hit("noticed 0")
        with anyio.fail_after(RECOVERY):
            for attempt in itertools.count(1):
                if noticed.key in entry_keys(path):
                    break
                noticed = await c.until_hit(f"noticed {attempt}")
        if fault == "replaced":
            assert (await c.ask(theirs)).cache == "hit"  # read from the new file
        old = await c.ask(mine[0])
        await c.assert_answered([old])
        assert old.cache == "miss"  # the old file is gone for everyone
        await c.assert_nothing_wrong_stored([*mine, theirs, *in_flight, "after 0", "after 1"])


# -- the upstream cut, silent or sending invalid bytes, through `sse-cache proxy` --------------

FAULTS = {
    "cut": {"x-mock-error": "cut"},
    # The first event at once, then nothing for a minute, the connection left open.
    "silent": {"x-mock-first-ms": "0", "x-mock-delay-ms": "60000"},
    "bad-sse": {"x-mock-error": "bad-sse"},
}


@asynccontextmanager
async def proxy_command(serve: Any, tmp_path: Path) -> AsyncIterator[tuple[Client, Path, Path]]:
    """``sse-cache proxy`` as an OS process on a SQLite file, in front of the mock upstream
    (served here), with ``--upstream-timeout 1``: (client, the file, the proxy's log)."""
    db, log = tmp_path / "cache.db", tmp_path / "proxy.log"
    upstream_app = MockUpstream(delay=0.005, first_delay=0.005)
    async with serve(upstream_app) as upstream:
        proxy_cmd = [*CLI, "proxy", "--upstream", upstream, "--backend", f"sqlite:///{db}"]
        proxy_cmd += ["--port", "{port}", "--upstream-timeout", "1", "--log-level", "info"]
        with server(*proxy_cmd, log=log) as proxy:
            client = Client(proxy.url, upstream)
            try:
                yield client, db, log
            finally:
                await client.aclose()


@pytest.mark.parametrize("mode", sorted(FAULTS))
async def test_upstream_faults_mixed_with_good_requests_through_the_proxy_command(
    serve: Any, tmp_path: Path, mode: str
) -> None:
    good = [f"good {i}" for i in range(4)]
    bad = [f"bad {i}" for i in range(4)]

    def headers(prompt: str) -> dict[str, str]:
        return FAULTS[mode] if prompt in bad else {}

    async with proxy_command(serve, tmp_path) as (c, db, log):
        # Good and faulty requests released together.
        replies = await c.herd(good + bad, headers=headers)
        by_prompt = {r.prompt: r for r in replies}
        await c.assert_answered([by_prompt[p] for p in good])
        for prompt in bad:
            reply = by_prompt[prompt]
            if mode == "bad-sse":
                # The upstream ended cleanly after bytes that are not SSE: the client gets
                # exactly those bytes, as the upstream sent them.
                assert reply.error == "" and reply.status == 200, reply
                assert reply.body == await c.expected(prompt, FAULTS[mode])
            else:
                # Never a clean end: the response is aborted.
                assert reply.error != "", reply
                assert reply.body != await c.expected(prompt)
        # Stored: exactly the good answers, each replayed byte for byte.
        assert entry_keys(db) == {by_prompt[p].key for p in good}
        for prompt in good:
            assert (await c.ask(prompt)).cache == "hit"
        for prompt in bad:  # not stored: asked again, each goes upstream
            again = await c.ask(prompt)
            await c.assert_answered([again])
            assert again.cache == "miss"
    # What the operator reads: the access line says why the answer was not stored.
    text = log.read_text(errors="replace")
    assert text.count('stored=no reason="') >= len(bad), text[-3000:]
    if mode == "bad-sse":
        assert "Traceback" not in text


@pytest.mark.parametrize("mode", ["cut", "silent"])
async def test_a_cut_or_silent_upstream_is_logged_without_a_traceback(
    serve: Any, tmp_path: Path, mode: str
) -> None:
    async with proxy_command(serve, tmp_path) as (c, _, log):
        reply = await c.ask(f"{mode} alone", **FAULTS[mode])
        assert reply.error != ""
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "sse_cache: POST /v1/responses: response aborted: " in text  # one line says why


# -- hostile requests ---------------------------------------------------------------------------


class EchoOr:
    """Requests with an ``x-echo`` header get one SSE event naming the SHA-256 and length of
    the body that arrived (proof that it was forwarded byte for byte, whatever it is); the
    others go to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not any(k == b"x-echo" for k, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        self.calls += 1
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        start = {"type": "http.response.start", "status": 200}
        start["headers"] = [(b"content-type", b"text/event-stream")]
        await send(start)
        await send({"type": "http.response.body", "body": echo(b"".join(parts))})


def echo(body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return b'event: echo\ndata: {"sha256": "%s", "length": %d}\n\n' % (digest.encode(), len(body))


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b'{"a":' * depth + leaf + b"}" * depth


def prompt_with(value: bytes) -> bytes:
    return b'{"model": "gpt-mock", "input": ' + value + b', "stream": true}'


#: Bodies the cache cannot key: (body, extra headers, whether its reason is logged). Each is
#: forwarded uncached (``bypass``), byte for byte.
BODIES: dict[str, tuple[bytes, dict[str, str], bool]] = {
    "objects 65 deep": (prompt_with(nested(65)), {}, True),
    "arrays 100,000 deep": (prompt_with(b"[" * 100_000 + b"]" * 100_000), {}, True),
    "5 MiB (over max_body_bytes)": (prompt_with(b'"' + b"x" * (5 << 20) + b'"'), {}, True),
    "not UTF-8": (b"\xff\xfe" + prompt_with(b'"x"'), {}, True),
    "invalid UTF-8 in a string": (prompt_with(b'"a\xc3\x28b"'), {}, True),
    "truncated JSON": (prompt_with(b'"x"')[:-1], {}, True),
    "a lone surrogate": (prompt_with(b'"\\ud800"'), {}, True),
    "NaN": (prompt_with(b"NaN"), {}, True),
    "an array": (b"[" + prompt_with(b'"x"') + b"]", {}, True),
    "empty": (b"", {}, True),
    "gzip": (zlib.compress(prompt_with(b'"x"')), {"content-encoding": "gzip"}, True),
}

#: Invalid control headers: each is refused with 400 naming it, and never reaches the upstream.
CONTROLS: list[tuple[str, bytes]] = [
    ("x-sse-cache-ttl", b"nan"),
    ("x-sse-cache-ttl", b"inf"),
    ("x-sse-cache-ttl", b"-1"),
    ("x-sse-cache-ttl", b"1e999"),
    ("x-sse-cache-variants", b"-1"),
    ("x-sse-cache-variants", b"0"),
    ("x-sse-cache-variants", b"65"),
    ("x-sse-cache-variants", b"1.5"),
    ("x-sse-cache-max-age", b"nan"),
    ("x-sse-cache-namespace", b"a" * 100_000),  # a huge header
    ("x-sse-cache-namespace", b"\xff\xfe"),
    ("x-sse-cache-replay", b"nanx"),
    ("x-sse-cache-ignore-fields", b"a b"),
    ("x-sse-cache-refresh", b"maybe"),
]


async def test_hostile_requests_are_forwarded_uncached_or_refused(
    serve: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="sse_cache")
    db = tmp_path / "cache.db"
    upstream_app = EchoOr(MockUpstream(delay=0.001))
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{db}")
        results: dict[str, httpx2.Response] = {}
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=60) as http:

            async def send(name: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
                await go.wait()
                results[name] = await http.post("/v1/responses", content=body, headers=headers)

            base_headers = [(b"authorization", b"Bearer sk-hostile")]
            good_headers = [(b"authorization", b"Bearer " + b"k" * 12_000)]  # a 12 KB key
            go = anyio.Event()
            async with anyio.create_task_group() as tg:
                for name, (body, extra, _) in BODIES.items():
                    headers = [*base_headers, (b"x-echo", b"1")]
                    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
                    tg.start_soon(send, name, body, headers)
                for i, (header, value) in enumerate(CONTROLS):
                    headers = [*base_headers, (b"x-echo", b"1"), (header.encode(), value)]
                    tg.start_soon(send, f"control {i}", prompt_with(b'"x"'), headers)
                for i in range(2):  # good requests among them, one with a huge credential
                    body = prompt_with(b'"good %d"' % i)
                    tg.start_soon(send, f"good {i}", body, good_headers)
                go.set()
            good_again = [
                await http.post(
                    "/v1/responses", content=prompt_with(b'"good %d"' % i), headers=good_headers
                )
                for i in range(2)
            ]
        await app.aclose()

    for name, (body, _, _) in BODIES.items():
        r = results[name]
        assert (r.status_code, r.headers.get("x-sse-cache")) == (200, "bypass"), name
        assert r.content == echo(body), name  # the exact bytes reached the upstream
    for i, (header, _) in enumerate(CONTROLS):
        r = results[f"control {i}"]
        assert r.status_code == 400 and header in r.json()["error"]["message"], (header, r)
        assert len(r.content) < 1024, header  # a huge bad value is not echoed back whole
    assert upstream_app.calls == len(BODIES)  # the refused ones never went upstream
    for i in range(2):
        first, again = results[f"good {i}"], good_again[i]
        assert (first.headers["x-sse-cache"], again.headers["x-sse-cache"]) == ("miss", "hit")
        assert first.content == again.content and b"response.completed" in first.content
    # Stored: the good answers and nothing else.
    assert entry_keys(db) == {results[f"good {i}"].headers["x-sse-cache-key"] for i in range(2)}
    # One concise line per request the cache could not key; no traceback, no error.
    bypass_lines = [r for r in caplog.records if "forwarded uncached" in r.getMessage()]
    assert len(bypass_lines) == sum(logged for _, _, logged in BODIES.values())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


async def test_a_superscript_digit_in_a_control_header_is_a_400(serve: Any) -> None:
    async with proxied(serve, "memory://") as c:
        r = await c.http.post(
            "/v1/responses",
            json=payload("superscript"),
            headers=[(b"authorization", b"Bearer sk-x"), (b"x-sse-cache-variants", b"\xb2")],
        )
    assert r.status_code == 400 and "x-sse-cache-variants" in r.json()["error"]["message"]

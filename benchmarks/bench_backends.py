"""Backend overhead: sse_cache backends vs the raw client doing the same GET/SET.

For a 400 KB value, the median latency of ``get`` and ``set`` through each backend, and the
ratio to the raw client doing the same operation on the same bytes in the same run:

- Redis: redis-py asyncio ``GET`` / ``SET ... EX`` on the same server;
- SQLite: stdlib ``sqlite3`` ``SELECT`` / ``INSERT ... ON CONFLICT`` on a WAL file with the
  same pragmas — both called directly (blocking the loop) and in a worker thread (how an
  async program must call a blocking client);
- memcached: pymemcache ``get`` / ``set`` (directly and in a worker thread); the value is
  measured once as one item and once chunked (``chunk_size=128KiB``: 4 chunks).

Targets: <= 1.2x raw for Redis and SQLite, <= 1.5x raw for chunked memcached. The script
starts its own redis-server and memcached on loopback ports (skipping what is not installed).
Operations alternate between the backend and the raw client, so machine noise hits both.

    .venv/bin/python benchmarks/bench_backends.py [--rounds 300] [--size 400000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import MemcachedServer, RedisServer, ServerMissing, find_binary
from sse_cache.backends import from_url

TTL = 3600
Op = Callable[[], Awaitable[Any]]


async def median_pair(ours: Op, raw: Op, rounds: int) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``raw``, run alternately after a warm-up."""
    for _ in range(10):
        await ours()
        await raw()
    a: list[float] = []
    b: list[float] = []
    clock = time.perf_counter
    for i in range(rounds):
        # Alternate which goes first so neither always runs on a warmer cache.
        first, second, fa, fb = (ours, raw, a, b) if i % 2 == 0 else (raw, ours, b, a)
        t0 = clock()
        await first()
        t1 = clock()
        await second()
        t2 = clock()
        fa.append(t1 - t0)
        fb.append(t2 - t1)
    return statistics.median(a), statistics.median(b)


Row = tuple[str, str, float, float | None, str]


def row(name: str, op: str, ours: float, raw: float | None, baseline: str) -> Row:
    return (name, op, ours, raw, baseline)


async def bench_memory(value: bytes, rounds: int) -> list[Row]:
    backend = from_url("memory://")
    await backend.set("k", value, TTL)

    async def get() -> None:
        await backend.get("k")

    async def set_() -> None:
        await backend.set("k", value, TTL)

    async def noop() -> None:
        pass

    g, _ = await median_pair(get, noop, rounds)
    s, _ = await median_pair(set_, noop, rounds)
    await backend.aclose()
    return [row("memory", "get", g, None, "-"), row("memory", "set", s, None, "-")]


async def bench_sqlite(value: bytes, rounds: int, tmp: Path) -> list[Row]:
    backend = from_url(f"sqlite:///{tmp / 'bench.db'}")
    await backend.set("k", value, TTL)

    raw = sqlite3.connect(tmp / "raw.db", isolation_level=None, check_same_thread=False)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("PRAGMA synchronous = NORMAL")
    raw.execute("CREATE TABLE t (key TEXT PRIMARY KEY, expires_at REAL, value BLOB)")
    insert = (
        "INSERT INTO t VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
        "expires_at = excluded.expires_at, value = excluded.value"
    )
    raw.execute(insert, ("k", time.time() + TTL, value))
    limiter = anyio.CapacityLimiter(1)

    def raw_get() -> bytes:
        return bytes(raw.execute("SELECT value FROM t WHERE key = ?", ("k",)).fetchone()[0])

    def raw_set() -> None:
        raw.execute(insert, ("k", time.time() + TTL, value))

    async def get() -> None:
        await backend.get("k")

    async def set_() -> None:
        await backend.set("k", value, TTL)

    async def raw_get_direct() -> None:
        raw_get()

    async def raw_set_direct() -> None:
        raw_set()

    async def raw_get_thread() -> None:
        await anyio.to_thread.run_sync(raw_get, limiter=limiter)

    async def raw_set_thread() -> None:
        await anyio.to_thread.run_sync(raw_set, limiter=limiter)

    rows = []
    for op, ours, direct, threaded in (
        ("get", get, raw_get_direct, raw_get_thread),
        ("set", set_, raw_set_direct, raw_set_thread),
    ):
        o1, r1 = await median_pair(ours, threaded, rounds)
        o2, r2 = await median_pair(ours, direct, rounds)
        rows.append(row("sqlite", op, o1, r1, "sqlite3 in a worker thread"))
        rows.append(row("sqlite", op, o2, r2, "sqlite3 called directly"))
    await backend.aclose()
    raw.close()
    return rows


async def bench_redis(value: bytes, rounds: int, server: RedisServer) -> list[Row]:
    import redis.asyncio as aioredis

    backend = from_url(server.url)
    raw = aioredis.Redis(host="127.0.0.1", port=server.port)
    await backend.set("k", value, TTL)
    await raw.set("raw-k", value, ex=TTL)

    async def get() -> None:
        await backend.get("k")

    async def set_() -> None:
        await backend.set("k", value, TTL)

    async def raw_get() -> None:
        await raw.get("raw-k")

    async def raw_set() -> None:
        await raw.set("raw-k", value, ex=TTL)

    g = await median_pair(get, raw_get, rounds)
    s = await median_pair(set_, raw_set, rounds)
    await backend.aclose()
    await raw.aclose()
    return [
        row("redis", "get", g[0], g[1], "redis-py asyncio GET"),
        row("redis", "set", s[0], s[1], "redis-py asyncio SET EX"),
    ]


async def bench_memcached(value: bytes, rounds: int, server: MemcachedServer) -> list[Row]:
    from pymemcache.client.base import Client  # type: ignore[import-untyped]

    raw = Client(("127.0.0.1", server.port), no_delay=True, default_noreply=False)
    raw.set("raw-k", value, expire=TTL)
    limiter = anyio.CapacityLimiter(1)

    def raw_get_sync() -> None:
        raw.get("raw-k")

    def raw_set_sync() -> None:
        raw.set("raw-k", value, expire=TTL)

    async def raw_get_direct() -> None:
        raw_get_sync()

    async def raw_set_direct() -> None:
        raw_set_sync()

    async def raw_get_thread() -> None:
        await anyio.to_thread.run_sync(raw_get_sync, limiter=limiter)

    async def raw_set_thread() -> None:
        await anyio.to_thread.run_sync(raw_set_sync, limiter=limiter)

    rows = []
    for label, query in (("memcached", ""), ("memcached chunked", "?chunk_size=128KiB")):
        backend = from_url(f"memcached://{server.address}{query}")
        await backend.set("k", value, TTL)

        async def get(b: Any = backend) -> None:
            assert await b.get("k") is not None

        async def set_(b: Any = backend) -> None:
            await b.set("k", value, TTL)

        for op, ours, direct, threaded in (
            ("get", get, raw_get_direct, raw_get_thread),
            ("set", set_, raw_set_direct, raw_set_thread),
        ):
            o1, r1 = await median_pair(ours, threaded, rounds)
            o2, r2 = await median_pair(ours, direct, rounds)
            rows.append(row(label, op, o1, r1, "pymemcache in a worker thread"))
            rows.append(row(label, op, o2, r2, "pymemcache called directly"))
        await backend.aclose()
    raw.close()
    return rows


def print_table(rows: list[Row], size: int) -> None:
    print(f"\nvalue size: {size:,} bytes; medians; ratio = backend / raw (same run)\n")
    print(f"{'backend':<18} {'op':<4} {'backend ms':>10} {'raw ms':>8} {'ratio':>6}  raw client")
    print("-" * 86)
    for name, op, ours, raw, baseline in rows:
        raw_ms = f"{raw * 1000:8.3f}" if raw is not None else f"{'-':>8}"
        ratio = f"{ours / raw:5.2f}x" if raw else f"{'-':>6}"
        print(f"{name:<18} {op:<4} {ours * 1000:10.3f} {raw_ms} {ratio}  {baseline}")


async def main(rounds: int, size: int) -> None:
    value = os.urandom(size)  # incompressible, like an already-compressed entry
    rows: list[Row] = []
    rows += await bench_memory(value, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        rows += await bench_sqlite(value, rounds, Path(tmp))
    try:
        redis = RedisServer(find_binary("redis-server", "redis-server"))
    except ServerMissing as exc:
        print(f"skipping Redis: {exc}")
    else:
        redis.start()
        try:
            rows += await bench_redis(value, rounds, redis)
        finally:
            redis.cleanup()
    try:
        memcached = MemcachedServer(find_binary("memcached", "memcached"))
    except ServerMissing as exc:
        print(f"skipping memcached: {exc}")
    else:
        memcached.start()
        try:
            rows += await bench_memcached(value, rounds, memcached)
        finally:
            memcached.cleanup()
    print_table(rows, size)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--size", type=int, default=400_000)
    options = parser.parse_args()
    anyio.run(main, options.rounds, options.size)

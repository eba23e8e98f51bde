"""RedisBackend against real servers: URL features (password, database, unix socket,
prefix) and a new cluster client under a burst of concurrent first operations."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from sse_cache.backends import from_url
from sse_cache.errors import BackendUnavailable, ConfigError

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def test_password_and_database(spawn_redis: Callable[..., Any]) -> None:
    server = spawn_redis(password="s3cret")
    backend = from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3?prefix=app:")
    await backend.set("k", b"v", None)
    assert await backend.get("k") == b"v"
    await backend.aclose()
    raw = aioredis.Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
    assert await raw.get("app:e:k") == b"v"  # the documented layout: {prefix}e:{key}
    assert await raw.ttl("app:e:k") == -1
    await raw.aclose()
    # Refused credentials say so: they were "Redis is unreachable" (helper-97).
    for url in (f"redis://:wrong@127.0.0.1:{server.port}/3", f"redis://127.0.0.1:{server.port}"):
        wrong = from_url(url)
        with pytest.raises(BackendUnavailable, match="Redis refused the credentials") as caught:
            await wrong.get("k")
        assert "unreachable" not in str(caught.value)
        await wrong.aclose()


async def test_unix_socket(spawn_redis: Callable[..., Any]) -> None:
    server = spawn_redis(unix_socket=True)
    backend = from_url(f"unix://{server.socket_path}?db=2&prefix=sock:")
    await backend.set("k", b"over a socket", 30)
    assert await backend.get("k") == b"over a socket"
    await backend.aclose()
    raw = aioredis.Redis(unix_socket_path=str(server.socket_path), db=2)
    assert 0 < await raw.pttl("sock:e:k") <= 30_000
    await raw.aclose()


async def test_prefixes_isolate_applications(redis_server: Any) -> None:
    one = from_url(f"{redis_server.url}?prefix=one:")
    two = from_url(f"{redis_server.url}?prefix=two:")
    await one.set("k", b"1", None)
    await two.set("k", b"2", None)
    assert await one.get("k") == b"1" and await two.get("k") == b"2"
    assert await one.clear() == 1  # type: ignore[attr-defined]
    assert await two.get("k") == b"2"
    await two.clear()  # type: ignore[attr-defined]
    await one.aclose()
    await two.aclose()


async def test_a_ttl_longer_than_redis_counts_is_stored(redis_server: Any) -> None:
    # Redis refuses a PX past 2**63 ms from now ("value is not an integer or out of range"):
    # a `--ttl 1e16` made every store fail.
    backend = from_url(f"{redis_server.url}?prefix=long-ttl:")
    await backend.set("k", b"kept", 1e16)
    assert await backend.get("k") == b"kept"
    await backend.aclose()


async def _burst(backend: Any, size: int) -> list[BaseException]:
    """``size`` concurrent GETs and SETs; the exceptions they raised."""
    failures: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            if i % 2:
                await backend.set(f"k{i}", b"v%d" % i, None)
            else:
                await backend.get(f"k{i}")
        except Exception as exc:  # collected: the assertion names them all
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(size):
            tg.start_soon(one, i)
    return failures


async def test_new_cluster_backend_survives_a_burst_of_first_operations(
    redis_cluster: Any,
) -> None:
    # A gateway starting under load sends many requests at once through a backend that has
    # not talked to the cluster yet. redis-py's cluster client resolved routing for each of
    # them before learning the topology and dropped live connections on the way ("Connection
    # closed by server"): every one of 20 such bursts of 32 failed before the backend
    # learned the topology first.
    for round_ in range(5):
        backend = from_url(f"{redis_cluster.url}?prefix=burst{round_}:")
        assert await _burst(backend, 32) == []
        assert await backend.get("k31") == b"v31"
        await backend.clear()
        await backend.aclose()


@pytest.mark.parametrize("ttl", [math.inf, 1e300, 1e16])
async def test_a_lock_ttl_longer_than_redis_counts_is_clamped(
    redis_server: Any, ttl: float
) -> None:
    # The engine passes cross_process_lease as the lock ttl: inf made math.ceil raise
    # OverflowError (not a BackendError) and 1e300 a PX Redis refuses ("value is not an
    # integer or out of range"). Clamped to 2**53 ms as SET's PX is, both take the lock.
    prefix = f"lk{uuid.uuid4().hex[:8]}:"
    backend: Any = from_url(f"{redis_server.url}?prefix={prefix}")
    raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        assert await backend.acquire("job", "tok", ttl) is True
        assert await raw.pttl(f"{prefix}l:job") > 10**15  # (about 285,000 years)
        assert await backend.acquire("job", "other", ttl) is False  # held
        assert await backend.renew("job", "tok", ttl) is True
        assert await raw.pttl(f"{prefix}l:job") > 10**15
        assert await backend.renew("job", "other", ttl) is False
        assert await backend.holder("job") == "tok"
        await backend.release("job", "tok")
        assert await backend.holder("job") is None
    finally:
        await raw.delete(f"{prefix}l:job")
        await raw.aclose()
        await backend.aclose()


@pytest.mark.parametrize("ttl", [0, -1, math.nan, "5", None])
async def test_a_bad_lock_ttl_is_named(redis_server: Any, ttl: Any) -> None:
    backend: Any = from_url(f"{redis_server.url}?prefix=lk-bad:")
    try:
        with pytest.raises(ConfigError, match="lock ttl must be a number of seconds > 0"):
            await backend.acquire("job", "tok", ttl)
        with pytest.raises(ConfigError, match="lock ttl must be a number of seconds > 0"):
            await backend.renew("job", "tok", ttl)
    finally:
        await backend.aclose()


async def test_a_fanout_ttl_or_block_of_inf_works(redis_server: Any) -> None:
    # The stream's expiry and the reader's wait take inf as the lock does (math.ceil(inf)
    # raised OverflowError in publish and in read).
    backend: Any = from_url(f"{redis_server.url}?prefix=fan-inf{uuid.uuid4().hex[:6]}:")
    try:
        await backend.publish("ch", b"one", ttl=math.inf)
        await backend.finish("ch", ttl=1e300)
        got = [message async for message in backend.read("ch", block=math.inf)]
        assert got == [b"one"]
    finally:
        await backend.aclose()


async def test_a_backend_dropped_unclosed_stops_its_tasks_and_closes_its_connections(
    redis_server: Any,
) -> None:
    # Its near cache's two tasks (the invalidation listener, the TOUCH rounds) hold the
    # client, not the backend: each backend dropped without aclose() (an async transport
    # made per call) left both tasks and their connections for the life of the loop
    # (helper-131: 20 dropped, 40 sockets). They go once the backend is collected.
    import asyncio
    import gc
    import time

    raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        before = len(await raw.client_list())
        for i in range(10):
            backend: Any = from_url(f"{redis_server.url}?prefix=dropped{i}:")
            await backend.set("k", b"v", None)
            assert await backend.get("k") == b"v"
            assert await backend.get("k") == b"v"  # (from the near cache: its tasks run)
            del backend  # never closed
        names = ("sse-cache redis touches", "sse-cache redis invalidations")
        deadline = time.monotonic() + 30  # a deadlock guard: before, never
        while True:
            gc.collect()
            left = [t for t in asyncio.all_tasks() if t.get_name() in names]
            connected = len(await raw.client_list())
            if not left and connected <= before:
                break
            assert time.monotonic() < deadline, (left, connected, before)
            await asyncio.sleep(0.02)  # (a condition polled: the closing runs on its own)
    finally:
        await raw.aclose()


async def test_a_backend_used_from_one_event_loop_after_another_serves_on_each(
    redis_server: Any,
) -> None:
    # Its pooled connections belong to the loop they were opened on: on the next loop (an
    # asyncio.run once more; a sync transport's next portal) the first command took one of
    # the ended loop's and failed, "Event loop is closed" — every other loop's lookups were
    # misses and its writes failed (helper-134). (In a process of its own: each loop ends
    # with the backend's connections open, the pattern under test, and asyncio warns of
    # their transports as they are collected.)
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import asyncio, sys
        from sse_cache.backends import from_url
        backend = from_url(sys.argv[1] + "?prefix=loops:")

        async def use(i):
            await backend.set(f"k{i}", b"v", None)
            return await backend.get(f"k{i}"), await backend.get("k0")

        print([asyncio.run(use(i)) for i in range(4)])  # each loop ends before the next
        asyncio.run(backend.aclose())
        """
    )
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", script, redis_server.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([(b"v", b"v")] * 4), done.stderr

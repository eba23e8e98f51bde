"""RedisBackend against real servers: URL features (password, database, unix socket,
prefix) and a new cluster client under a burst of concurrent first operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from sse_cache.backends import from_url
from sse_cache.errors import BackendUnavailable

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
    wrong = from_url(f"redis://:wrong@127.0.0.1:{server.port}/3")
    with pytest.raises(BackendUnavailable):
        await wrong.get("k")
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

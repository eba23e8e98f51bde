"""RedisBackend URL features against real servers: password, database, unix socket, prefix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

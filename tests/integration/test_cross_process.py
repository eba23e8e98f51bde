"""Cross-process single-flight: two proxies (as two worker processes would be) on one Redis,
in front of one upstream, over real loopback HTTP."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache import ConfigError
from sse_cache.asgi import CacheMiddleware
from sse_cache.mock_upstream import MockUpstream
from sse_cache.proxy import create_proxy_app

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

HEADERS = {"authorization": "Bearer sk-cross"}


async def two_proxies_race(
    serve: Any, redis_url: str, headers: dict[str, str]
) -> tuple[list[httpx2.Response], MockUpstream]:
    upstream_app = MockUpstream(delay=0.01, first_delay=0.02)
    url = f"{redis_url}?prefix=x{uuid.uuid4().hex[:8]}:"
    body = {"model": "gpt-mock", "input": "one upstream call for two workers", "stream": True}
    results: dict[int, httpx2.Response] = {}
    async with serve(upstream_app) as upstream:
        first = create_proxy_app(upstream, url, cross_process=True, cross_process_lease=3)
        second = create_proxy_app(upstream, url, cross_process=True, cross_process_lease=3)
        async with (
            serve(first) as p1,
            serve(second) as p2,
            httpx2.AsyncClient(timeout=30) as client,
        ):

            async def send(n: int, base: str, delay: float) -> None:
                await anyio.sleep(delay)
                results[n] = await client.post(base + "/v1/responses", json=body, headers=headers)

            async with anyio.create_task_group() as tg:
                tg.start_soon(send, 0, p1, 0)
                tg.start_soon(send, 1, p2, 0.15)  # while the first is still streaming
        await first.aclose()
        await second.aclose()
    return [results[0], results[1]], upstream_app


@pytest.mark.anyio
@asyncio_only
async def test_a_second_worker_follows_the_first_ones_live_stream(
    serve: Any, redis_server: Any
) -> None:
    (a, b), upstream = await two_proxies_race(serve, redis_server.url, HEADERS)
    assert (a.headers["x-sse-cache"], b.headers["x-sse-cache"]) == ("miss", "shared")
    assert a.content == b.content and a.content.count(b"\n\n") > 20
    assert upstream.stats()["total"] == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_failed_leader_sends_its_followers_upstream(serve: Any, redis_server: Any) -> None:
    (a, b), upstream = await two_proxies_race(
        serve, redis_server.url, {**HEADERS, "x-mock-error": "500"}
    )
    assert a.status_code == 500 and b.status_code == 500
    assert b.headers["x-sse-cache"] == "miss"  # it asked the upstream itself
    assert upstream.stats()["total"] == 2


def test_cross_process_needs_a_backend_with_locks_and_fan_out() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ConfigError, match="cross_process"):
        CacheMiddleware(app, "memory://", cross_process=True)


@pytest.mark.anyio
@asyncio_only
async def test_transports_in_two_processes_share_one_upstream_stream(
    serve: Any, redis_server: Any
) -> None:
    from sse_cache.httpx2 import AsyncCacheTransport

    upstream_app = MockUpstream(delay=0.01, first_delay=0.02)
    url = f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:8]}:"
    body = {"model": "gpt-mock", "input": "two SDK processes", "stream": True}
    seen: dict[int, tuple[str, bytes]] = {}
    async with serve(upstream_app) as upstream:

        async def one(n: int, delay: float) -> None:
            await anyio.sleep(delay)
            transport = AsyncCacheTransport(url, cross_process=True, cross_process_lease=3)
            async with httpx2.AsyncClient(transport=transport, base_url=upstream) as client:
                r = await client.post("/v1/responses", json=body, headers=HEADERS)
                seen[n] = (r.headers["x-sse-cache"], r.content)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0, 0)
            tg.start_soon(one, 1, 0.15)
    assert (seen[0][0], seen[1][0]) == ("miss", "shared")
    assert seen[0][1] == seen[1][1]
    assert upstream_app.stats()["total"] == 1

"""The proxy's connections to its upstream: no limit by default, so a gateway's 101st live
miss is not left waiting behind the HTTP client's default pool of 100 with nothing sent to
its client; a limit when one is asked for (``--upstream-connections``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache.errors import ConfigError
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, responses_stream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the proxy's forwarder (httpx2) and uvicorn run on asyncio


DEADLOCK_GUARD = 60  # seconds: only a hung test ever reaches it
KEY = {"authorization": "Bearer sk-upstream-connections"}


@asynccontextmanager
async def proxy(serve: Any, upstream: Any, **options: Any) -> AsyncIterator[str]:
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, "memory://", access_log=False, **options)
        try:
            async with serve(app) as base:
                yield base
        finally:
            await app.aclose()


async def ask(client: httpx2.AsyncClient, n: int, bodies: dict[int, bytes]) -> None:
    payload = {"model": "gpt-mock", "input": f"question {n}", "stream": True}
    async with client.stream("POST", "/v1/responses", json=payload, headers=KEY) as response:
        assert response.status_code == 200
        assert response.headers["x-sse-cache"] == "miss"
        bodies[n] = await response.aread()


class Arrivals:
    """The upstream app, telling when ``expected`` requests have reached it."""

    def __init__(self, app: GatedUpstream, expected: int) -> None:
        self.app, self.expected, self.count = app, expected, 0
        self.all_arrived = anyio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.count += 1
            if self.count == self.expected:
                self.all_arrived.set()
        await self.app(scope, receive, send)


@pytest.mark.anyio
async def test_more_live_misses_than_the_client_pools_default_all_reach_the_upstream(
    serve: Any,
) -> None:
    # 120 different questions at once, each answer held by the upstream after its first
    # event: every one of them must be at the upstream before any answer ends.
    upstream = GatedUpstream(responses_stream("answer", text_deltas=5), hold_after=1)
    count = 120
    arrivals = Arrivals(upstream, count)
    bodies: dict[int, bytes] = {}
    unlimited = httpx2.Limits(max_connections=None)
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, arrivals) as base,
            httpx2.AsyncClient(base_url=base, timeout=60, limits=unlimited) as client,
            anyio.create_task_group() as tg,
        ):
            for n in range(count):
                tg.start_soon(ask, client, n, bodies)
            await arrivals.all_arrived.wait()
            assert not bodies  # all held: no answer could end before every call arrived
            upstream.gate.set()
    assert len(bodies) == count and all(body == upstream.body for body in bodies.values())
    asked = {json.loads(body)["input"] for body in upstream.bodies}
    assert asked == {f"question {n}" for n in range(count)}


@pytest.mark.anyio
async def test_a_limit_queues_requests_past_it_and_answers_them_all(serve: Any) -> None:
    upstream = GatedUpstream(responses_stream("answer", text_deltas=5), hold_after=1)
    arrivals = Arrivals(upstream, 2)
    bodies: dict[int, bytes] = {}
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, arrivals, upstream_connections=2) as base,
            httpx2.AsyncClient(base_url=base, timeout=60) as client,
            anyio.create_task_group() as tg,
        ):
            for n in range(5):
                tg.start_soon(ask, client, n, bodies)
            await arrivals.all_arrived.wait()
            upstream.gate.set()
    assert upstream.calls == 5
    assert len(bodies) == 5 and all(body == upstream.body for body in bodies.values())


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_connections must be None or >= 1, got 0"):
        create_proxy_app("http://127.0.0.1:9", "memory://", upstream_connections=0)

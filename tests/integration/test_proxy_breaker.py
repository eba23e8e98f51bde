"""The backend breaker through the proxy: a hung Redis (SIGSTOP) is skipped once the breaker
opens — requests are still answered, the health endpoint and the metrics say so."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from sse_cache.proxy import create_proxy_app
from sse_cache.testing import MockUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-breaker"}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the metrics")


@pytest.mark.parametrize("cross_process", [False, True])
async def test_a_hung_redis_opens_the_breaker_and_requests_skip_it(
    serve: Any, spawn_redis: Callable[..., Any], cross_process: bool
) -> None:
    # With cross-process single-flight, the lease's lock is skipped too while the breaker
    # is open (helper-68: every miss waited for a lock call's timeout on the hung Redis,
    # ~1 s, with the breaker open).
    server = spawn_redis()
    upstream_app = MockUpstream(delay=0)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(
            upstream,
            f"redis://127.0.0.1:{server.port}?timeout=0.2",
            backend_timeout=0.3,
            breaker_failures=2,
            breaker_cooldown=3600,
            cross_process=cross_process,
        )
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as http:
            body = {"model": "gpt-mock", "input": "breaker", "stream": True}
            assert (await http.get("/_sse_cache/health")).json()["breaker"] == "closed"
            server.pause()
            try:
                for i in range(5):
                    r = await http.post("/v1/responses", json={**body, "n": i}, headers=KEY)
                    assert r.status_code == 200 and r.headers["x-sse-cache"] == "miss"
                health = await http.get("/_sse_cache/health")
                assert health.status_code == 503 and health.json()["breaker"] == "open"
                text = (await http.get("/_sse_cache/metrics")).text
                assert metric(text, 'sse_cache_backend_breaker_state{state="open"}') == 1
                failures = metric(text, "sse_cache_read_failures_total")
                locks = 'sse_cache_backend_operation_seconds_count{operation="lock"}'
                lock_calls = metric(text, locks)
                r = await http.post("/v1/responses", json=body, headers=KEY)
                assert r.status_code == 200 and b"response.completed" in r.content
                text = (await http.get("/_sse_cache/metrics")).text
                # Skipped, not tried: no new backend failure for this request, no lock call.
                assert metric(text, "sse_cache_read_failures_total") == failures
                assert metric(text, locks) == lock_calls
            finally:
                server.resume()
        await app.aclose()


async def test_the_health_check_probes_a_backend_back_after_an_outage(
    serve: Any, spawn_redis: Callable[..., Any]
) -> None:
    # With no traffic, only the health check asks the backend: once the cooldown has passed,
    # it is the breaker's probe. (It said 503 until a cached request came, and a readiness
    # probe on it kept an idle instance out of rotation for good.)
    import anyio

    server = spawn_redis()
    cooldown = 0.5
    async with serve(MockUpstream(delay=0)) as upstream:
        app = create_proxy_app(
            upstream,
            f"redis://127.0.0.1:{server.port}?timeout=0.2",
            backend_timeout=0.3,
            breaker_failures=2,
            breaker_cooldown=cooldown,
        )
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as http:
            body = {"model": "gpt-mock", "input": "back after an outage", "stream": True}
            server.pause()
            try:
                for i in range(3):
                    await http.post("/v1/responses", json={**body, "n": i}, headers=KEY)
                assert (await http.get("/_sse_cache/health")).json()["breaker"] == "open"
            finally:
                server.resume()
            health = await http.get("/_sse_cache/health")  # cooling down: not asked yet
            assert health.status_code == 503 and health.json()["breaker"] == "open"
            await anyio.sleep(cooldown)  # (the breaker's own clock: it waits out the cooldown)
            health = await http.get("/_sse_cache/health")
            assert health.status_code == 200, health.json()
            assert health.json()["breaker"] == "closed"
        await app.aclose()

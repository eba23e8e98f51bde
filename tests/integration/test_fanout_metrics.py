"""The Redis calls of cross-process single-flight in ``sse_cache_backend_operation_seconds``:
two middlewares (as two workers) on one redis-server, over real HTTP. A miss led across them
is timed as ``lock`` and ``publish``, a hit as neither, and a follower's wait for the
producer's stream is not counted as Redis latency."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache.asgi import CacheMiddleware
from sse_cache.metrics import Metrics
from sse_cache.testing import GatedUpstream, metric_value, responses_stream

# Redis' client runs on asyncio only.
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

HEADERS = {"authorization": "Bearer sk-fanout-metrics"}
PAYLOAD = {"model": "gpt-mock", "input": "timed across processes", "stream": True}
LEASE = 1.5  # heartbeats and renewals every 0.5 s while the producer is held
HELD = 1.5  # seconds the upstream is held while a follower in the other worker waits
HISTOGRAM = "sse_cache_backend_operation_seconds"
FANOUT_OPERATIONS = ("lock", "publish")


def observed(metrics: Metrics, operation: str) -> tuple[float, float]:
    """How many calls of ``operation`` ``metrics`` timed, and their seconds in all."""
    text = metrics.render()
    return (
        metric_value(text, HISTOGRAM + "_count", operation=operation),
        metric_value(text, HISTOGRAM + "_sum", operation=operation),
    )


def test_lock_and_publish_are_in_the_histogram_from_the_start() -> None:
    # A dashboard of a proxy that has not led a stream yet sees zeros, not gaps.
    text = Metrics().render()
    for operation in ("get", "set", "delete", *FANOUT_OPERATIONS):
        assert metric_value(text, HISTOGRAM + "_count", operation=operation) == 0, operation
        assert metric_value(text, HISTOGRAM + "_bucket", operation=operation, le="+Inf") == 0


@asynccontextmanager
async def two_workers(
    serve: Any, redis_url: str, upstream_app: GatedUpstream
) -> AsyncIterator[tuple[tuple[str, Metrics], tuple[str, Metrics]]]:
    """Two cross-process middlewares in front of ``upstream_app`` on one Redis (a fresh
    prefix), each served over loopback HTTP with metrics of its own: yields each one's URL
    and metrics."""
    backend = f"{redis_url}?prefix=m{uuid.uuid4().hex[:8]}:"
    metrics = (Metrics(), Metrics())
    workers = [
        CacheMiddleware(
            upstream_app, backend, cross_process=True, cross_process_lease=LEASE, hooks=[m]
        )
        for m in metrics
    ]
    try:
        async with serve(workers[0]) as one, serve(workers[1]) as two:
            yield (one, metrics[0]), (two, metrics[1])
    finally:
        for worker in workers:
            await worker.aclose()


@pytest.mark.anyio
@asyncio_only
async def test_a_miss_led_across_processes_times_the_lock_and_the_publishes_a_hit_neither(
    serve: Any, redis_server: Any
) -> None:
    upstream_app = GatedUpstream(responses_stream("led", text_deltas=5), hold_after=1)
    async with (
        two_workers(serve, redis_server.url, upstream_app) as ((a, leader), (b, follower)),
        httpx2.AsyncClient(timeout=30) as http,
    ):
        url = "/v1/responses"
        async with (
            http.stream("POST", a + url, json=PAYLOAD, headers=HEADERS) as led,
            http.stream("POST", b + url, json=PAYLOAD, headers=HEADERS) as shared,
        ):
            # B answered `shared` once A's first bytes reached A's channel.
            assert (led.headers["x-sse-cache"], shared.headers["x-sse-cache"]) == (
                "miss",
                "shared",
            )
            upstream_app.gate.set()
            bodies = [await led.aread(), await shared.aread()]
        assert bodies[0] == bodies[1] == upstream_app.body
        # The leader took, renewed (perhaps) and released its lease, and published the head,
        # the bytes and the end; the follower asked for the lease and who held it, and
        # published nothing.
        lead_lock, _ = observed(leader, "lock")
        lead_publish, _ = observed(leader, "publish")
        follow_lock, _ = observed(follower, "lock")
        assert lead_lock >= 2 and lead_publish >= 2
        assert follow_lock >= 2 and observed(follower, "publish")[0] == 0
        # The answer was stored before either response ended: a hit in each worker now.
        before = [[observed(m, op)[0] for op in FANOUT_OPERATIONS] for m in (leader, follower)]
        for base in (a, b):
            hit = await http.post(base + url, json=PAYLOAD, headers=HEADERS)
            assert hit.headers["x-sse-cache"] == "hit" and hit.content == upstream_app.body
        after = [[observed(m, op)[0] for op in FANOUT_OPERATIONS] for m in (leader, follower)]
    assert after == before
    assert upstream_app.calls == 1
    # The entry calls are still in their own series.
    assert observed(leader, "get")[0] >= 1 and observed(leader, "set")[0] >= 1


@pytest.mark.anyio
@asyncio_only
async def test_a_followers_wait_for_the_producer_is_not_counted_as_redis_latency(
    serve: Any, redis_server: Any
) -> None:
    # The follower in worker B reads A's channel, one blocking read after another, for the
    # whole time A's upstream is held: were those reads timed, B's fan-out seconds would add
    # up to at least the time held. The lock and publish calls take microseconds.
    upstream_app = GatedUpstream(responses_stream("held", text_deltas=5), hold_after=1)
    async with (
        two_workers(serve, redis_server.url, upstream_app) as ((a, leader), (b, follower)),
        httpx2.AsyncClient(timeout=30) as http,
    ):
        url = "/v1/responses"
        async with (
            http.stream("POST", a + url, json=PAYLOAD, headers=HEADERS) as led,
            http.stream("POST", b + url, json=PAYLOAD, headers=HEADERS) as shared,
        ):
            assert shared.headers["x-sse-cache"] == "shared"
            started = time.monotonic()
            await anyio.sleep(HELD)  # the scenario: a producer whose upstream is slow
            held = time.monotonic() - started
            upstream_app.gate.set()
            bodies = [await led.aread(), await shared.aread()]
    assert bodies[0] == bodies[1] == upstream_app.body
    assert held >= HELD
    for metrics in (leader, follower):
        seconds = sum(observed(metrics, op)[1] for op in FANOUT_OPERATIONS)
        assert seconds < held, (seconds, held)
    # The leader renewed its lease and sent heartbeats while held: those are timed.
    assert observed(leader, "lock")[0] >= 3

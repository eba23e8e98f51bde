"""Metrics over real HTTP: streams through the proxy move the counters and histograms, a herd
shows up in the live-stream gauges while it is in flight, and an application that registers
the metrics in its own prometheus_client registry serves them from its one endpoint."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest

from sse_cache.asgi import CacheMiddleware
from sse_cache.events import serialize_sse
from sse_cache.metrics import CONTENT_TYPE, Metrics
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, MockUpstream, metric_value, responses_stream

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-metrics"}
FIRST = 0.25  # the upstream's time to first byte
EVENTS = responses_stream("metrics", text_deltas=20)


def body(text: str) -> dict[str, Any]:
    return {"model": "gpt-mock", "input": text, "stream": True}


async def test_streams_through_the_proxy_move_counters_and_histograms(
    serve: Any, tmp_path: Any
) -> None:
    upstream_app = MockUpstream(first_delay=FIRST, delay=0.002)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'metrics.db'}")
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as http:
            sent = {}
            for status, extra in (
                ("miss", {}),
                ("hit", {}),
                ("bypass", {"cache-control": "no-cache"}),
                ("refresh", {"x-sse-cache-refresh": "1"}),
            ):
                r = await http.post("/v1/responses", json=body("counted"), headers={**KEY, **extra})
                assert r.headers["x-sse-cache"] == status
                assert r.content.rstrip().endswith(b"}")  # the whole stream
                sent[status] = len(r.content)
            scraped = await http.get("/_sse_cache/metrics")
        await app.aclose()
    assert scraped.headers["content-type"] == CONTENT_TYPE
    text = scraped.text
    for status in ("miss", "hit", "bypass", "refresh"):
        assert metric_value(text, "sse_cache_requests_total", status=status) == 1, status
    assert metric_value(text, "sse_cache_requests_total", status="shared") == 0
    ttfb = "sse_cache_time_to_first_byte_seconds"
    for status in ("miss", "hit", "bypass", "refresh"):
        assert metric_value(text, ttfb + "_count", status=status) == 1, status
    for status in ("miss", "bypass", "refresh"):  # these waited for the upstream
        assert metric_value(text, ttfb + "_sum", status=status) >= FIRST, status
        assert metric_value(text, ttfb + "_bucket", status=status, le="0.1") == 0, status
    assert metric_value(text, ttfb + "_count", status="shared") == 0
    backend = "sse_cache_backend_operation_seconds_count"
    # Looked up: the miss and the hit (no-cache and refresh skip the lookup); read again
    # before a store (is a newer entry stored?): the miss's and the refresh's — the
    # no-cache request's read was answered by SQLite's near cache, which the hit filled and
    # no write had changed since. Written: the answer and its response-id alias (for
    # resuming), by the miss, no-cache and refresh.
    assert metric_value(text, backend, operation="get") == 4
    assert metric_value(text, backend, operation="set") == 6
    assert metric_value(text, "sse_cache_stores_total") == 3
    assert metric_value(text, "sse_cache_replayed_bytes_total") == sent["hit"]
    assert metric_value(text, "sse_cache_live_streams") == 0
    assert upstream_app.stats()["total"] == 3


async def test_gauges_show_a_herd_on_one_live_stream_while_it_is_in_flight(serve: Any) -> None:
    followers = 5
    # The first event at once, the rest only once every follower has joined.
    upstream_app = GatedUpstream(EVENTS, hold_after=1)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, "memory://")
        limits = httpx2.Limits(max_connections=50)
        async with (
            serve(app) as base,
            httpx2.AsyncClient(base_url=base, timeout=30, limits=limits) as http,
        ):
            go = anyio.Event()
            reading = 0
            everyone_reads = anyio.Event()
            answers: list[tuple[str, bytes]] = []

            async def one() -> None:
                nonlocal reading
                await go.wait()
                payload = body("herd")
                async with http.stream("POST", "/v1/responses", json=payload, headers=KEY) as r:
                    content = b""
                    async for chunk in r.aiter_raw():
                        if not content:
                            # A follower is sent bytes only once it has joined the stream.
                            reading += 1
                            if reading == followers + 1:
                                everyone_reads.set()
                        content += chunk
                answers.append((r.headers["x-sse-cache"], content))

            async with anyio.create_task_group() as tg:
                for _ in range(followers + 1):
                    tg.start_soon(one)
                go.set()  # released together
                await everyone_reads.wait()
                during = (await http.get("/_sse_cache/metrics")).text
                upstream_app.gate.set()
            # A request is counted until its handler returns, a moment after its client read
            # the end: the gauge falls to 0 then (an answer late is the guard's to catch).
            with anyio.fail_after(30):
                while metric_value(  # noqa: ASYNC110 - a gauge the server sets
                    after := (await http.get("/_sse_cache/metrics")).text,
                    "sse_cache_requests_in_progress",
                ):
                    await anyio.sleep(0.01)
        await app.aclose()
    assert upstream_app.calls == 1
    assert sorted(status for status, _ in answers) == ["miss"] + ["shared"] * followers
    assert {content for _, content in answers} == {serialize_sse(EVENTS)}
    assert metric_value(during, "sse_cache_live_streams") == 1
    assert metric_value(during, "sse_cache_live_stream_followers") == followers
    # Every request of the herd is being served (the scrapes are not counted).
    assert metric_value(during, "sse_cache_requests_in_progress") == followers + 1
    assert metric_value(after, "sse_cache_live_streams") == 0
    assert metric_value(after, "sse_cache_live_stream_followers") == 0
    ttfb = "sse_cache_time_to_first_byte_seconds_count"
    assert metric_value(after, ttfb, status="miss") == 1
    assert metric_value(after, ttfb, status="shared") == followers


async def test_an_application_serves_our_metrics_from_its_own_registry(serve: Any) -> None:
    registry = CollectorRegistry()
    handled = Counter("gateway_requests", "Requests the gateway handled.", registry=registry)
    metrics = Metrics(registry=registry)
    app = FastAPI()

    @app.post("/v1/responses")
    async def responses() -> StreamingResponse:
        handled.inc()

        async def stream() -> Any:
            for event in EVENTS:
                yield serialize_sse([event])

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    app.add_middleware(CacheMiddleware, backend="memory://", hooks=[metrics])
    async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as http:
        statuses = [
            (await http.post("/v1/responses", json=body("app"), headers=KEY)).headers["x-sse-cache"]
            for _ in range(2)
        ]
        text = (await http.get("/metrics")).text
    assert statuses == ["miss", "hit"]
    # One endpoint: the application's own metric and ours, from one registry.
    assert metric_value(text, "gateway_requests_total") == 1  # the hit never reached the app
    assert metric_value(text, "sse_cache_requests_total", status="miss") == 1
    assert metric_value(text, "sse_cache_requests_total", status="hit") == 1
    ttfb = "sse_cache_time_to_first_byte_seconds_count"
    assert metric_value(text, ttfb, status="miss") == 1
    assert metric_value(text, ttfb, status="hit") == 1
    assert metric_value(text, "sse_cache_live_streams") == 0

"""Proxy benchmark over real loopback HTTP (uvicorn), as ratios to baselines of the same run.

(a) hit: time to the last byte of a 2,000-delta OpenAI Responses stream replayed through the
    caching proxy, vs uvicorn serving the same bytes from a trivial ASGI app (the ceiling)
                                                          (target <= 1.5x)
(b) miss: time to the first byte through the proxy vs straight from the mock upstream
                                                          (target <= 1.1x + 2 ms)

Run: ``.venv/bin/python benchmarks/bench_proxy.py [--repeat N] [--backend URL]``. Medians;
the baseline and the measured path alternate within each repetition.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2

from sse_cache._uvicorn import serve
from sse_cache.mock_upstream import MockUpstream
from sse_cache.proxy import create_proxy_app

HEADERS = {"authorization": "Bearer sk-bench", "x-mock-deltas": "2000"}


class Static:
    """The ceiling: the same bytes from a trivial ASGI app, in one body message."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


async def timed(
    client: httpx2.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, float, bytes, str]:
    """(time to first byte, time to last byte, body, x-sse-cache)."""
    start = time.perf_counter()
    first = 0.0
    parts: list[bytes] = []
    async with client.stream("POST", url, json=body, headers=headers) as response:
        async for chunk in response.aiter_raw():
            if not parts:
                first = time.perf_counter() - start
            parts.append(chunk)
        status = response.headers.get("x-sse-cache", "")
    return first, time.perf_counter() - start, b"".join(parts), status


async def main(repeat: int, backend: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = backend or f"sqlite:///{Path(tmp) / 'bench.db'}"
        upstream_app = MockUpstream(delay=0.0, first_delay=0.0)
        async with serve(upstream_app) as upstream:
            proxy_app = create_proxy_app(upstream, url)
            async with serve(proxy_app) as proxy, httpx2.AsyncClient(timeout=60) as client:
                body = {"model": "gpt-mock", "input": "benchmark", "stream": True}
                _, _, original, status = await timed(client, proxy + "/v1/responses", body, HEADERS)
                assert status == "miss"
                async with serve(Static(original)) as static:
                    hit_last, ceiling_last = [], []
                    miss_first, direct_first = [], []
                    for i in range(repeat):
                        _, last, data, status = await timed(
                            client, proxy + "/v1/responses", body, HEADERS
                        )
                        assert status == "hit" and data == original, status
                        hit_last.append(last)
                        _, last, data, _ = await timed(client, static + "/", body, HEADERS)
                        assert data == original
                        ceiling_last.append(last)
                        # A new prompt each time: a miss through the proxy vs the same request
                        # (a different prompt, so the same work) straight to the upstream.
                        fresh = {**body, "input": f"miss {i}"}
                        first, _, _, status = await timed(
                            client, proxy + "/v1/responses", fresh, HEADERS
                        )
                        assert status == "miss"
                        miss_first.append(first)
                        direct = {**body, "input": f"direct {i}"}
                        first, _, _, _ = await timed(
                            client, upstream + "/v1/responses", direct, HEADERS
                        )
                        direct_first.append(first)
            await proxy_app.aclose()
    med = statistics.median
    events = original.count(b"\n\n")
    kind = url.split(":")[0]
    print(f"stream: {events} events, {len(original) / 1024:.0f} KiB; backend {kind}; {repeat} runs")
    ratio = med(hit_last) / med(ceiling_last)
    print(
        f"(a) hit, last byte      {med(hit_last) * 1e3:7.2f} ms   "
        f"ceiling {med(ceiling_last) * 1e3:7.2f} ms   "
        f"ratio {ratio:4.2f}x (target <= 1.5x) {'ok' if ratio <= 1.5 else 'ABOVE TARGET'}"
    )
    budget = med(direct_first) * 1.1 + 0.002
    print(
        f"(b) miss, first byte    {med(miss_first) * 1e3:7.2f} ms   "
        f"direct  {med(direct_first) * 1e3:7.2f} ms   "
        f"ratio {med(miss_first) / med(direct_first):4.2f}x (target <= 1.1x + 2 ms = "
        f"{budget * 1e3:.2f} ms) {'ok' if med(miss_first) <= budget else 'ABOVE TARGET'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    anyio.run(main, args.repeat, args.backend)

"""Proxy benchmark over real loopback HTTP (uvicorn), as ratios to baselines of the same run.

(a) hit: time to the last byte of a 2,000-delta OpenAI Responses stream replayed through the
    caching proxy, vs uvicorn serving the same bytes from a trivial ASGI app (the ceiling)
                                                          (target <= 1.5x)
(b) miss: time to the first byte through the proxy vs straight from the mock upstream
                                                          (target <= 1.1x + 2 ms)

The mock upstream, the proxy and the ceiling's server each run in their own process, as they
would in production (``sse-cache proxy`` / ``mock-upstream``), not on the client's event loop.

Run: ``.venv/bin/python benchmarks/bench_proxy.py [--repeat N] [--backend URL]``. Medians;
the baseline and the measured path alternate within each repetition.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
from _servers import BARE_FORWARDER, server
from bench_scale import STATIC_APP  # the ceiling, as bench_scale and bench_server run it

HEADERS = {"authorization": "Bearer sk-bench", "x-mock-deltas": "2000"}


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
    cli = [sys.executable, "-m", "sse_cache"]
    with tempfile.TemporaryDirectory() as tmp:
        url = backend or f"sqlite:///{Path(tmp) / 'bench.db'}"
        mock = [*cli, "mock-upstream", "--port", "{port}", "--delay-ms", "0", "--first-ms", "0"]
        with server(*mock) as upstream_server:
            upstream = upstream_server.url
            proxy_cmd = [*cli, "proxy", "--upstream", upstream, "--backend", url]
            proxy_cmd += ["--port", "{port}", "--log-level", "warning"]
            with server(*proxy_cmd) as proxy_server:
                proxy = proxy_server.url
                async with httpx2.AsyncClient(timeout=60) as client:
                    body = {"model": "gpt-mock", "input": "benchmark", "stream": True}
                    url_p = proxy + "/v1/responses"
                    _, _, original, status = await timed(client, url_p, body, HEADERS)
                    assert status == "miss"
                    static_body = Path(tmp) / "body.sse"
                    static_body.write_bytes(original)
                    static_cmd = [sys.executable, "-c", STATIC_APP, "{port}"]
                    bare_cmd = [sys.executable, "-c", BARE_FORWARDER, upstream, "{port}"]
                    ceiling_env = {"BENCH_BODY": str(static_body)}
                    with (
                        server(*static_cmd, env=ceiling_env) as static_server,
                        server(*bare_cmd) as bare_server,
                    ):
                        static, bare = static_server.url, bare_server.url
                        hit_last, ceiling_last = [], []
                        miss_first, direct_first, bare_first = [], [], []
                        for i in range(repeat):
                            _, last, data, status = await timed(client, url_p, body, HEADERS)
                            assert status == "hit" and data == original, status
                            hit_last.append(last)
                            _, last, data, _ = await timed(client, static + "/", body, HEADERS)
                            assert data == original
                            ceiling_last.append(last)
                            # A new prompt each time: a miss through the proxy vs the same
                            # request (another prompt, so the same work) straight upstream.
                            fresh = {**body, "input": f"miss {i}"}
                            first, _, _, status = await timed(client, url_p, fresh, HEADERS)
                            assert status == "miss"
                            miss_first.append(first)
                            direct = {**body, "input": f"direct {i}"}
                            first, _, _, _ = await timed(
                                client, upstream + "/v1/responses", direct, HEADERS
                            )
                            direct_first.append(first)
                            bare_req = {**body, "input": f"bare {i}"}
                            first, _, _, _ = await timed(
                                client, bare + "/v1/responses", bare_req, HEADERS
                            )
                            bare_first.append(first)
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
    print(
        f"    floor: the forwarder alone (no cache) {med(bare_first) * 1e3:7.2f} ms   "
        f"ratio {med(bare_first) / med(direct_first):4.2f}x; the cache's own share "
        f"{(med(miss_first) - med(bare_first)) * 1e3:+.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    anyio.run(main, args.repeat, args.backend)

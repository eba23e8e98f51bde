"""``sse-cache demo``: the same streamed request twice through the caching proxy — a miss that
records, a hit that replays — with timings, and a check that the replay equals the original.

The HTTP demo starts the mock upstream and the proxy on free loopback ports and talks to the
proxy with the official ``openai`` SDK (raw httpx2 when the SDK is not installed). Without
uvicorn/httpx2 (``sse-cache[proxy]``) it runs the same scenario in process, on the engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from ..adapters import OpenAIResponses
from ..engine import StreamCache
from ..errors import ConfigError
from ..events import Event, SSEParser, serialize_sse
from ..testing import MockUpstream, paced, responses_stream
from ._options import Refused, check_backend
from .mock import milliseconds

__all__ = ["register", "run_engine_demo", "run_http_demo"]

PROMPT = "What does sse-cache do?"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help="stream a mock answer through the caching proxy twice: miss, then hit",
        description=(
            "Starts a mock OpenAI-compatible upstream and the caching proxy on loopback, "
            "sends the same streamed Responses request twice and compares the two streams."
        ),
    )
    parser.add_argument(
        "--backend", default=None, help="backend URL (default: SQLite in a temporary directory)"
    )
    parser.add_argument("--deltas", type=int, default=120, help="text deltas (default 120)")
    parser.add_argument(
        "--delay-ms",
        type=milliseconds,
        default=8.0,
        help="upstream gap between events (default 8)",
    )
    parser.add_argument(
        "--first-ms",
        type=milliseconds,
        default=250.0,
        help="upstream time to first event (default 250)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="skip HTTP: run the engine in process"
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.deltas < 1:
        raise Refused("sse-cache demo: --deltas must be >= 1")
    if args.backend is not None:
        # Said before any server starts, not as a traceback from inside them.
        try:
            check_backend(args.backend)
        except ConfigError as exc:
            print(f"sse-cache demo: --backend: {exc}", file=sys.stderr)
            return 2
    # The HTTP demo needs the proxy extra: uvicorn, httpx2 and prometheus_client (metrics).
    http = not args.in_process and all(
        importlib.util.find_spec(name) is not None
        for name in ("uvicorn", "httpx2", "prometheus_client")
    )
    with tempfile.TemporaryDirectory(prefix="sse-cache-demo-") as tmp:
        url = args.backend or f"sqlite:///{Path(tmp) / 'demo.db'}"
        delay, first = args.delay_ms / 1000, args.first_ms / 1000
        if http:
            ok: bool = anyio.run(run_http_demo, url, args.deltas, delay, first)
        else:
            if not args.in_process:
                print("(sse-cache[proxy] not installed: running the engine demo in process)")
            ok = anyio.run(run_engine_demo, url, args.deltas, delay, first)
    return 0 if ok else 1


class _Run:
    def __init__(self, status: str, events: list[str], first: float, total: float) -> None:
        self.status = status
        self.events = events
        self.first = first
        self.total = total


async def run_http_demo(backend_url: str, deltas: int, delay: float, first: float) -> bool:
    """The HTTP demo; True when the second request was a hit equal to the first (a miss)."""
    from .._uvicorn import serve
    from ..proxy import create_proxy_app

    use_sdk = importlib.util.find_spec("openai") is not None
    upstream_app = MockUpstream(delay=delay, first_delay=first)
    async with serve(upstream_app) as upstream:
        proxy_app = create_proxy_app(upstream, backend_url)
        try:
            async with serve(proxy_app) as proxy:
                print("sse-cache demo: the same streamed OpenAI Responses request, twice")
                print(
                    f"  upstream {upstream}  (mock: {first * 1000:.0f} ms to first event, "
                    f"{delay * 1000:.0f} ms between events)"
                )
                print(f"  proxy    {proxy}  (backend {backend_url})")
                print(
                    f"  client   {'openai SDK' if use_sdk else 'httpx2 (openai SDK not installed)'}"
                )
                # A fresh namespace per run: the first request is a miss even on a warm cache.
                headers = {
                    "x-sse-cache-namespace": f"demo-{uuid.uuid4().hex[:12]}",
                    "x-mock-deltas": str(deltas),
                }
                run_one = _sdk_run if use_sdk else _raw_run
                # Warm up (connections, the SDK's lazy model building, the cache file) with a
                # short request of its own, so that the timings are the cache's and upstream's.
                warm = {"x-sse-cache-namespace": "demo-warm-up", "x-mock-deltas": "1"}
                await run_one(proxy, {**warm, "x-mock-first-ms": "0", "cache-control": "no-store"})
                before = await _upstream_calls(upstream)
                runs = []
                for attempt in (1, 2):
                    run = await run_one(proxy, headers)
                    print(
                        f"  request {attempt}: x-sse-cache: {run.status:<5} first event "
                        f"{_ms(run.first)}  total {_ms(run.total)}  {len(run.events)} events"
                    )
                    runs.append(run)
                calls = await _upstream_calls(upstream) - before
        finally:
            await proxy_app.aclose()
    print(f"  requests that reached the upstream: {calls}")
    return _verdict([r.status for r in runs], runs[0].events, runs[1].events)


async def _sdk_run(proxy: str, headers: dict[str, str]) -> _Run:
    import openai

    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="sk-demo") as client:
        start = time.perf_counter()
        raw = await client.responses.with_raw_response.create(
            model="gpt-mock-1", input=PROMPT, stream=True, extra_headers=headers
        )
        stream = raw.parse()
        events: list[str] = []
        first = 0.0
        async for event in stream:
            if not events:
                first = time.perf_counter() - start
            events.append(event.model_dump_json())
        return _Run(raw.headers.get("x-sse-cache", "?"), events, first, time.perf_counter() - start)


async def _raw_run(proxy: str, headers: dict[str, str]) -> _Run:
    import httpx2

    body = {"model": "gpt-mock-1", "input": PROMPT, "stream": True}
    auth = {"authorization": "Bearer sk-demo", **headers}
    async with httpx2.AsyncClient(base_url=proxy, timeout=60) as client:
        start = time.perf_counter()
        parser, first = SSEParser(), 0.0
        events: list[str] = []
        async with client.stream("POST", "/v1/responses", json=body, headers=auth) as response:
            async for chunk in response.aiter_raw():
                for event in parser.feed(chunk):
                    if not events:
                        first = time.perf_counter() - start
                    events.append(serialize_sse([event]).decode())
            status = response.headers.get("x-sse-cache", "?")
        return _Run(status, events, first, time.perf_counter() - start)


async def _upstream_calls(upstream: str) -> int:
    import httpx2

    async with httpx2.AsyncClient(base_url=upstream) as client:
        stats = (await client.get("/_mock/stats")).json()
    return int(stats["requests"].get("POST /v1/responses", 0))


async def run_engine_demo(backend_url: str, deltas: int, delay: float, first: float) -> bool:
    """The in-process demo (engine + backend, no HTTP)."""
    original = responses_stream(PROMPT, text_deltas=deltas, summaries=3)
    print("sse-cache demo (in process): one OpenAI Responses stream, requested twice")
    print(f"  backend  {backend_url}")
    async with StreamCache(backend_url, OpenAIResponses()) as cache:
        request = cache.request(
            {"model": "gpt-mock-1", "input": PROMPT, "stream": True},
            route="POST /v1/responses",
            namespace=f"demo-{uuid.uuid4().hex}",
            shared=True,
        )
        statuses: list[str] = []
        runs: list[list[str]] = []

        def upstream() -> AsyncIterator[Event]:
            return paced(original, delay=delay, first_delay=first)

        for attempt in (1, 2):
            start = time.perf_counter()
            first_at = 0.0
            got: list[Event] = []
            async with cache.stream(request, upstream) as stream:
                async for event in stream:
                    if not got:
                        first_at = time.perf_counter() - start
                    got.append(event)
            total = time.perf_counter() - start
            print(
                f"  request {attempt}: {stream.status.value:<5} first event {_ms(first_at)}  "
                f"total {_ms(total)}  {len(got)} events"
            )
            statuses.append(stream.status.value)
            runs.append([serialize_sse([e]).decode() for e in got])
    same_as_upstream = runs[1] == [serialize_sse([e]).decode() for e in original]
    return _verdict(statuses, runs[0], runs[1]) and same_as_upstream


def _verdict(statuses: list[str], first: list[str], second: list[str]) -> bool:
    same = first == second and len(first) > 0
    print(
        "  replay identical to the original: "
        + ("yes" if same else "NO — the replay differs from the original")
        + f" ({len(second)} events)"
    )
    if statuses != ["miss", "hit"]:
        print(f"  expected a miss then a hit, got {statuses}")
        return False
    return same


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"

"""Time to first byte from the httpx2 / httpx transports, async and sync, over real loopback
HTTP: each response on a cached route reports one ``first_byte`` notice with its key and
cache status (as the ASGI middleware does), measured up to its first bytes reaching the
client — a response held by the upstream reports at least the time it was held, one closed
before any byte reports none — and the ``Metrics`` hook shows it in its histogram.

The upstream is a :class:`~sse_cache.testing.GatedUpstream` served by uvicorn on an event
loop in a thread of its own (a blocking portal): the sync transports block the test's
thread while they read, and the test opens the upstream's gate through the portal.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import httpx2
import pytest
from openai import AsyncOpenAI

import sse_cache.httpx
import sse_cache.httpx2
from sse_cache._uvicorn import serve
from sse_cache.engine import Notice
from sse_cache.metrics import Metrics
from sse_cache.testing import GatedUpstream, metric_value, responses_stream

EVENTS = responses_stream("first byte", text_deltas=8, summaries=1)
KEY = {"authorization": "Bearer sk-first-byte"}
BODY = {"model": "gpt-mock-1", "input": "first byte", "stream": True}
HOLD = 0.2  # seconds the gated tests keep the upstream's first event back
TTFB = "sse_cache_time_to_first_byte_seconds"


@dataclass(frozen=True)
class Lib:
    """An HTTP library and the cache transports built on it."""

    http: ModuleType
    cache: ModuleType

    def __str__(self) -> str:
        return str(self.http.__name__)


LIBS = [Lib(httpx2, sse_cache.httpx2), Lib(httpx, sse_cache.httpx)]


@pytest.fixture(params=LIBS, ids=str)
def lib(request: pytest.FixtureRequest) -> Lib:
    return request.param  # type: ignore[no-any-return]


class Upstreams:
    """GatedUpstreams served by uvicorn from the portal's event loop, until the test ends."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, stack: ExitStack) -> None:
        self.portal = portal
        self._stack = stack

    def start(self, **options: Any) -> tuple[GatedUpstream, str]:
        """A new upstream (``GatedUpstream(EVENTS, **options)``) and its base URL."""
        upstream = self.portal.call(partial(GatedUpstream, EVENTS, **options))
        base = self._stack.enter_context(self.portal.wrap_async_context_manager(serve(upstream)))
        return upstream, base

    def open_gate(self, upstream: GatedUpstream) -> None:
        self.portal.call(upstream.gate.set)  # an anyio.Event of the serving loop


@pytest.fixture(scope="module")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        yield portal


@pytest.fixture
def upstreams(portal: anyio.from_thread.BlockingPortal) -> Iterator[Upstreams]:
    with ExitStack() as stack:
        yield Upstreams(portal, stack)


def first_bytes(seen: list[Notice]) -> list[Notice]:
    return [n for n in seen if n.kind == "first_byte"]


async def read(client: Any, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    """POST the streamed request; its response headers and whole body."""
    sent = KEY if headers is None else headers
    async with client.stream("POST", "/v1/responses", json=BODY, headers=sent) as response:
        return response.headers, await response.aread()


def read_sync(client: Any, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    sent = KEY if headers is None else headers
    with client.stream("POST", "/v1/responses", json=BODY, headers=sent) as response:
        return response.headers, response.read()


def async_client(lib: Lib, base: str, hooks: list[Callable[[Notice], None]]) -> Any:
    transport = lib.cache.AsyncCacheTransport("memory://", hooks=hooks)
    return lib.http.AsyncClient(base_url=base, transport=transport, timeout=30)


def sync_client(lib: Lib, base: str, hooks: list[Callable[[Notice], None]]) -> Any:
    transport = lib.cache.CacheTransport("memory://", hooks=hooks)
    return lib.http.Client(base_url=base, transport=transport, timeout=30)


def assert_miss_then_hit(seen: list[Notice], got: list[tuple[Any, bytes]], body: bytes) -> None:
    assert [headers["x-sse-cache"] for headers, _ in got] == ["miss", "hit"]
    assert [content for _, content in got] == [body, body]
    key = got[0][0]["x-sse-cache-key"]
    assert got[1][0]["x-sse-cache-key"] == key != ""
    ttfb = first_bytes(seen)
    assert [(n.detail, n.key) for n in ttfb] == [("miss", key), ("hit", key)]
    assert all(n.seconds > 0 for n in ttfb)


# -- a miss, then a hit -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_miss_then_a_hit_each_report_one_first_byte(lib: Lib, upstreams: Upstreams) -> None:
    upstream, base = upstreams.start()
    seen: list[Notice] = []
    async with async_client(lib, base, [seen.append]) as client:
        got = [await read(client) for _ in range(2)]
    assert_miss_then_hit(seen, got, upstream.body)
    assert upstream.calls == 1


def test_sync_a_miss_then_a_hit_each_report_one_first_byte(lib: Lib, upstreams: Upstreams) -> None:
    upstream, base = upstreams.start()
    seen: list[Notice] = []
    with sync_client(lib, base, [seen.append]) as client:
        got = [read_sync(client) for _ in range(2)]
    assert_miss_then_hit(seen, got, upstream.body)
    assert upstream.calls == 1


# -- held by the upstream ---------------------------------------------------------------


def assert_held(seen: list[Notice], key: str, held: float) -> None:
    ttfb = first_bytes(seen)
    assert sorted((n.detail, n.key) for n in ttfb) == [("miss", key), ("shared", key)]
    for notice in ttfb:  # a lower bound only: the bytes came after the gate opened
        assert notice.seconds >= held, notice


@pytest.mark.anyio
async def test_a_held_miss_and_its_follower_wait_at_least_the_hold(
    lib: Lib, upstreams: Upstreams
) -> None:
    # The response heads go out at once, the first event only when the test opens the gate.
    upstream, base = upstreams.start(hold_after=0)
    seen: list[Notice] = []
    async with async_client(lib, base, [seen.append]) as client, AsyncExitStack() as stack:
        # Both requests have started (each has its response head) before the hold is timed.
        producer = await stack.enter_async_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        follower = await stack.enter_async_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        since = time.monotonic()
        await anyio.sleep(HOLD)
        held = time.monotonic() - since
        await anyio.to_thread.run_sync(upstreams.open_gate, upstream)
        bodies = [await producer.aread(), await follower.aread()]
    assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == ["miss", "shared"]
    assert bodies == [upstream.body, upstream.body] and upstream.calls == 1
    assert_held(seen, producer.headers["x-sse-cache-key"], held)


def test_sync_a_held_miss_and_its_follower_wait_at_least_the_hold(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start(hold_after=0)
    seen: list[Notice] = []
    with sync_client(lib, base, [seen.append]) as client, ExitStack() as stack:
        producer = stack.enter_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        follower = stack.enter_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        since = time.monotonic()
        time.sleep(HOLD)
        held = time.monotonic() - since
        upstreams.open_gate(upstream)
        bodies = [producer.read(), follower.read()]
    assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == ["miss", "shared"]
    assert bodies == [upstream.body, upstream.body] and upstream.calls == 1
    assert_held(seen, producer.headers["x-sse-cache-key"], held)


# -- closed before any byte -------------------------------------------------------------


def assert_only_the_read_response_reported(seen: list[Notice], key: str) -> None:
    # Three exchanges ran (a miss closed unread, a miss read, a hit closed unread); one
    # response had bytes.
    assert [n.kind for n in seen if n.kind in ("miss", "hit")] == ["miss", "miss", "hit"]
    assert [(n.detail, n.key) for n in first_bytes(seen)] == [("miss", key)]


@pytest.mark.anyio
async def test_a_response_closed_before_any_byte_reports_none(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start(hold_after=0)
    seen: list[Notice] = []
    async with async_client(lib, base, [seen.append]) as client:
        async with client.stream("POST", "/v1/responses", json=BODY, headers=KEY) as r:
            assert r.headers["x-sse-cache"] == "miss"  # closed with its first event held
        await anyio.to_thread.run_sync(upstreams.open_gate, upstream)
        headers, content = await read(client)
        assert headers["x-sse-cache"] == "miss" and content == upstream.body
        async with client.stream("POST", "/v1/responses", json=BODY, headers=KEY) as r:
            assert r.headers["x-sse-cache"] == "hit"  # closed unread
    assert_only_the_read_response_reported(seen, headers["x-sse-cache-key"])


def test_sync_a_response_closed_before_any_byte_reports_none(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start(hold_after=0)
    seen: list[Notice] = []
    with sync_client(lib, base, [seen.append]) as client:
        with client.stream("POST", "/v1/responses", json=BODY, headers=KEY) as r:
            assert r.headers["x-sse-cache"] == "miss"
        upstreams.open_gate(upstream)
        headers, content = read_sync(client)
        assert headers["x-sse-cache"] == "miss" and content == upstream.body
        with client.stream("POST", "/v1/responses", json=BODY, headers=KEY) as r:
            assert r.headers["x-sse-cache"] == "hit"
    assert_only_the_read_response_reported(seen, headers["x-sse-cache-key"])


@pytest.mark.anyio
# The follower's stream ends at the answer's completing event and the upstream is closed
# then, before its body's end: under trio, httpx2 (httpx) leaves httpcore2's (httpcore's)
# body iterator to the garbage collector, which warns (see _ABANDONED in
# tests/integration/test_transports.py).
@pytest.mark.filterwarnings(
    "ignore:Async generator 'httpcore2?[.].*garbage collected before it had been exhausted"
    ":ResourceWarning"
)
async def test_a_producer_closed_before_any_byte_reports_none_while_its_follower_reads_on(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start(hold_after=0)
    seen: list[Notice] = []
    async with async_client(lib, base, [seen.append]) as client, AsyncExitStack() as stack:
        producer = await stack.enter_async_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        follower = await stack.enter_async_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        await producer.aclose()  # its upstream is handed over to the follower
        await anyio.to_thread.run_sync(upstreams.open_gate, upstream)
        assert await follower.aread() == upstream.body
    assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == ["miss", "shared"]
    key = follower.headers["x-sse-cache-key"]
    assert [(n.detail, n.key) for n in first_bytes(seen)] == [("shared", key)]


def test_sync_a_producer_closed_before_any_byte_reports_none_while_its_follower_reads_on(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start(hold_after=0)
    seen: list[Notice] = []
    with sync_client(lib, base, [seen.append]) as client, ExitStack() as stack:
        producer = stack.enter_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        follower = stack.enter_context(
            client.stream("POST", "/v1/responses", json=BODY, headers=KEY)
        )
        producer.close()  # a thread of the transport reads its upstream on for the follower
        upstreams.open_gate(upstream)
        assert follower.read() == upstream.body
    assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == ["miss", "shared"]
    key = follower.headers["x-sse-cache-key"]
    assert [(n.detail, n.key) for n in first_bytes(seen)] == [("shared", key)]


# -- the Metrics hook -------------------------------------------------------------------

# Request headers by the status they get: a request without a credential is not cached at
# all (bypass, no key) and its body passes through untouched, as does any other bypass.
REQUESTS = [
    ("miss", KEY),
    ("hit", KEY),
    ("bypass", {**KEY, "cache-control": "no-cache"}),
    ("refresh", {**KEY, "x-sse-cache-refresh": "1"}),
    ("bypass", {}),
]


def assert_counted(
    metrics: Metrics, seen: list[Notice], got: list[tuple[Any, bytes]], body: bytes
) -> None:
    assert [headers["x-sse-cache"] for headers, _ in got] == [s for s, _ in REQUESTS]
    assert "x-sse-cache-key" not in got[-1][0]
    assert [content for _, content in got] == [body] * len(REQUESTS)
    ttfb = first_bytes(seen)
    assert [n.detail for n in ttfb] == [s for s, _ in REQUESTS]
    assert ttfb[-1].key == ""  # as the ASGI middleware reports it
    text = metrics.render()
    expected = {"miss": 1, "hit": 1, "bypass": 2, "refresh": 1, "shared": 0}
    for status, count in expected.items():
        assert metric_value(text, TTFB + "_count", status=status) == count, status
    total = sum(n.seconds for n in ttfb)
    sums = sum(metric_value(text, TTFB + "_sum", status=s) for s in expected)
    assert sums == pytest.approx(total)


@pytest.mark.anyio
async def test_metrics_given_to_the_transport_count_its_first_bytes(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start()
    metrics = Metrics()
    seen: list[Notice] = []
    async with async_client(lib, base, [metrics, seen.append]) as client:
        got = [await read(client, headers) for _, headers in REQUESTS]
    assert_counted(metrics, seen, got, upstream.body)


def test_sync_metrics_given_to_the_transport_count_its_first_bytes(
    lib: Lib, upstreams: Upstreams
) -> None:
    upstream, base = upstreams.start()
    metrics = Metrics()
    seen: list[Notice] = []
    with sync_client(lib, base, [metrics, seen.append]) as client:
        got = [read_sync(client, headers) for _, headers in REQUESTS]
    assert_counted(metrics, seen, got, upstream.body)


# -- the official SDK -------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_openai_sdk_hit_reports_its_first_byte(upstreams: Upstreams) -> None:
    upstream, base = upstreams.start()
    seen: list[Notice] = []
    transport = sse_cache.httpx2.AsyncCacheTransport("memory://", hooks=[seen.append])
    client = AsyncOpenAI(
        base_url=f"{base}/v1",
        api_key="sk-first-byte",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport),
    )
    runs: list[tuple[str, str, list[Any]]] = []
    async with client:
        for _ in range(2):
            raw = await client.responses.with_raw_response.create(
                model="gpt-mock-1", input="first byte", stream=True
            )
            async with raw.parse() as stream:
                events = [event async for event in stream]
            runs.append((raw.headers["x-sse-cache"], raw.headers["x-sse-cache-key"], events))
    assert [status for status, _, _ in runs] == ["miss", "hit"]
    assert [e.model_dump() for e in runs[1][2]] == [e.model_dump() for e in runs[0][2]]
    assert len(runs[0][2]) == len(EVENTS) and upstream.calls == 1
    key = runs[1][1]
    assert [(n.detail, n.key) for n in first_bytes(seen)] == [("miss", key), ("hit", key)]


# -- docs -------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "httpx.md"


def test_the_docs_metrics_example_shows_the_hit_and_the_miss(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    # The block of docs/httpx.md marked ``<!-- test: metrics -->``, against our upstream.
    (block,) = DOCS.read_text().split("<!-- test: metrics -->\n```python\n")[1:]
    code = block.split("\n```", 1)[0]
    upstream, base = upstreams.start()
    env = {"PATH": "/usr/bin:/bin", "OPENAI_BASE_URL": f"{base}/v1", "OPENAI_API_KEY": "sk-docs"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = set(result.stdout.splitlines())
    assert f'{TTFB}_count{{status="hit"}} 1.0' in printed, result.stdout
    assert f'{TTFB}_count{{status="miss"}} 1.0' in printed, result.stdout
    assert upstream.calls == 1 and (tmp_path / "cache.db").is_file()

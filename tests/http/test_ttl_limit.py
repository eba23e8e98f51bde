"""Entry lifetimes are bounded (``MAX_TTL``, one year): the ``x-sse-cache-ttl`` header past
it is a ``400`` naming the header and the limit, the ``ttl`` option past it a ConfigError. A
TTL of ``1e308`` was stored, and each hit then carried a 309-digit ``x-sse-cache-ttl``."""

from __future__ import annotations

import math
import re
from typing import Any

import httpx2
import pytest

from sse_cache import CacheOptions, ConfigError, Event
from sse_cache.adapters import GenericSSE, OpenAIResponses
from sse_cache.asgi import CacheMiddleware
from sse_cache.engine import StreamCache
from sse_cache.http.policy import MAX_TTL
from sse_cache.httpx2 import AsyncCacheTransport
from sse_cache.testing import GatedUpstream

EVENTS = [Event(f"chunk {i}", event="tick") for i in range(3)]
LIMIT = "at most 31536000 seconds (one year)"


def client(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app),
        base_url="http://t",
        headers={"authorization": "Bearer sk-test"},
    )


@pytest.mark.anyio
async def test_a_ttl_header_past_a_year_is_a_400_naming_it_and_the_limit() -> None:
    upstream = GatedUpstream(EVENTS)
    header = "x-sse-cache-ttl"
    async with client(CacheMiddleware(upstream, "memory://", routes={"/e": GenericSSE})) as c:
        for value in ("1e308", "inf", str(MAX_TTL + 1)):
            answer = await c.post("/e", json={"q": 1}, headers={header: value})
            assert answer.status_code == 400, value
            assert answer.headers["content-type"] == "application/json"
            message = answer.json()["error"]["message"]
            assert message == f"{header} must be {LIMIT}, got {value!r}"
    assert upstream.calls == 0  # never forwarded


@pytest.mark.anyio
async def test_a_hit_of_a_year_long_entry_says_its_ttl_in_whole_seconds() -> None:
    upstream = GatedUpstream(EVENTS)
    async with client(CacheMiddleware(upstream, "memory://", routes={"/e": GenericSSE})) as c:
        year = {"x-sse-cache-ttl": str(MAX_TTL), "x-sse-cache-max-age": str(MAX_TTL)}
        first = await c.post("/e", json={"q": 2}, headers=year)
        hit = await c.post("/e", json={"q": 2}, headers=year)
    assert (first.headers["x-sse-cache"], hit.headers["x-sse-cache"]) == ("miss", "hit")
    assert MAX_TTL - 5 <= int(hit.headers["x-sse-cache-ttl"]) <= MAX_TTL


@pytest.mark.parametrize("ttl", [1e308, math.inf, MAX_TTL + 0.5])
def test_the_ttl_option_past_a_year_is_refused_naming_the_limit(ttl: float) -> None:
    expected = "^" + re.escape(f"ttl must be {LIMIT} or None")
    for build in (
        lambda: CacheOptions(ttl=ttl),
        lambda: CacheMiddleware(GatedUpstream(EVENTS), "memory://", ttl=ttl),
        lambda: AsyncCacheTransport("memory://", ttl=ttl),
        lambda: StreamCache("memory://", OpenAIResponses(), ttl=ttl),
    ):
        with pytest.raises(ConfigError, match=expected):
            build()
    assert CacheOptions(ttl=MAX_TTL).ttl == MAX_TTL


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stream_asked_to_live_past_a_year_is_refused_before_the_upstream_is_called(
    anyio_backend: str,
) -> None:
    calls = 0

    async def upstream() -> Any:  # pragma: no cover - must not be reached
        nonlocal calls
        calls += 1
        raise AssertionError("the upstream was called")

    async with StreamCache("memory://", OpenAIResponses()) as cache:
        with pytest.raises(ConfigError, match="^" + re.escape(f"ttl must be {LIMIT} or None")):
            async with cache.stream("a request", upstream, ttl=1e308):
                pass
    assert calls == 0

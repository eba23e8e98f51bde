"""The httpx2 / httpx cache transports under the official SDKs, over real loopback HTTP.

The upstream is :class:`sse_cache.testing.MockUpstream` served by uvicorn in a thread
on a free 127.0.0.1 port; its request counters show which requests reached it. Every test
uses its own cache file and its own prompt, so counts are per test. Async tests run on
asyncio and trio (the sync transport's portal runs asyncio whatever the test).
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import httpx2
import openai
import pytest
import uvicorn
from anthropic import Anthropic, AsyncAnthropic
from openai import AsyncOpenAI, BadRequestError, OpenAI

import sse_cache.httpx
import sse_cache.httpx2
from flights_seen import FlightsSeen
from forked import forked, received
from sse_cache.backends import from_url
from sse_cache.events import serialize_sse
from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport
from sse_cache.testing import MockUpstream, metric_value, responses_stream

RESPONSES = "POST /v1/responses"
CHAT = "POST /v1/chat/completions"
MESSAGES = "POST /v1/messages"
MODEL = "gpt-mock-1"
CLAUDE = "claude-mock-1"


# -- the upstream -------------------------------------------------------------------------


class Upstream:
    """A MockUpstream served over loopback HTTP by uvicorn in a background thread."""

    def __init__(self, app: Any = None) -> None:
        self.app = MockUpstream(delay=0.0) if app is None else app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", ws="none", http="h11"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._sock = sock

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()

    def count(self, route: str) -> int:
        """Requests the upstream received on ``route`` (``"POST /v1/responses"``)."""
        return int(self.app.stats()["requests"].get(route, 0))

    def http_stats(self) -> dict[str, Any]:
        """The same counters through the mock's own HTTP endpoint."""
        stats: dict[str, Any] = httpx2.get(f"{self.url}/_mock/stats").json()
        return stats


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cache_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cache.db'}"


@pytest.fixture
def prompt(request: pytest.FixtureRequest) -> str:
    """A prompt unique to the test (and its loop), so upstream counts are per test."""
    return f"{request.node.name} {uuid.uuid4().hex[:8]}"


def _openai_async(upstream: Upstream, cache_url: str, key: str = "sk-test-a") -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=f"{upstream.url}/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=AsyncCacheTransport(cache_url)),
    )


def _openai_sync(upstream: Upstream, cache_url: str, key: str = "sk-test-a") -> OpenAI:
    return OpenAI(
        base_url=f"{upstream.url}/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx2.Client(transport=CacheTransport(cache_url)),
    )


# Under trio, an async generator collected before its end warns. The SDKs and httpx2 leave
# theirs so whenever a stream is not read to its end (a `break`; the openai SDK's stop at
# chat's `[DONE]`; httpx2 never closes httpcore2's body iterator on an early close), with or
# without a cache transport: such tests ignore those warnings and collect garbage at once.
_ABANDONED = (
    "ignore:Async generator '(openai|httpx2|httpcore2)[.]"
    ".*garbage collected before it had been exhausted:ResourceWarning"
)


def _dump(events: list[Any]) -> list[dict[str, Any]]:
    return [e.model_dump() for e in events]


# -- OpenAI Responses, async --------------------------------------------------------------


@pytest.mark.anyio
async def test_responses_stream_twice_second_from_cache(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        runs: list[list[Any]] = []
        statuses: list[str] = []
        for _ in range(2):
            raw = await client.responses.with_raw_response.create(
                model=MODEL,
                input=prompt,
                stream=True,
                stream_options={"include_obfuscation": False},
            )
            statuses.append(raw.headers["x-sse-cache"])
            async with raw.parse() as stream:
                runs.append([event async for event in stream])
            assert runs[-1][-1].type == "response.completed"
        assert statuses == ["miss", "hit"]
        assert _dump(runs[1]) == _dump(runs[0])
        assert len(runs[0]) > 20


@pytest.mark.anyio
async def test_second_stream_sends_no_request_upstream(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.http_stats()["requests"].get(RESPONSES, 0)
        first = [
            e async for e in await client.responses.create(model=MODEL, input=prompt, stream=True)
        ]
        assert upstream.count(RESPONSES) == before + 1
        second = [
            e async for e in await client.responses.create(model=MODEL, input=prompt, stream=True)
        ]
        # The hit never reached the upstream (its own stats endpoint says so).
        assert upstream.http_stats()["requests"][RESPONSES] == before + 1
        assert _dump(second) == _dump(first)
        assert [e.sequence_number for e in second] == list(range(len(second)))


@pytest.mark.anyio
async def test_stream_helper_gives_the_same_final_response(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        recorded = [
            e async for e in await client.responses.create(model=MODEL, input=prompt, stream=True)
        ]
        completed = recorded[-1]
        assert completed.type == "response.completed"
        finals = []
        for _ in range(2):
            async with client.responses.stream(model=MODEL, input=prompt) as stream:
                async for _event in stream:
                    pass
                finals.append(await stream.get_final_response())
        assert upstream.count(RESPONSES) == before + 1
        assert finals[0].model_dump() == finals[1].model_dump()
        assert finals[0].id == completed.response.id
        assert finals[0].output_text == completed.response.output_text != ""


@pytest.mark.anyio
async def test_non_stream_request_is_answered_from_a_recorded_stream(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        recorded = [
            e async for e in await client.responses.create(model=MODEL, input=prompt, stream=True)
        ]
        raw = await client.responses.with_raw_response.create(model=MODEL, input=prompt)
        assert upstream.count(RESPONSES) == before + 1
        assert raw.headers["x-sse-cache"] == "hit"
        assert raw.headers["content-type"].startswith("application/json")
        response = raw.parse()
        assert response.model_dump() == recorded[-1].response.model_dump()


@pytest.mark.anyio
@pytest.mark.filterwarnings(_ABANDONED)
async def test_early_break_stores_nothing(upstream: Upstream, cache_url: str, prompt: str) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        # Paced, so that the client leaves long before the completing event arrives.
        stream = await client.responses.create(
            model=MODEL, input=prompt, stream=True, extra_headers={"x-mock-delay-ms": "10"}
        )
        async with stream:
            async for event in stream:
                assert event.type == "response.created"
                break
        gc.collect()  # finalise what was abandoned now, under this test's warning filter
        raw = await client.responses.with_raw_response.create(
            model=MODEL, input=prompt, stream=True
        )
        assert raw.headers["x-sse-cache"] == "miss"
        async with raw.parse() as again:
            events = [e async for e in again]
        assert events[-1].type == "response.completed"
        assert upstream.count(RESPONSES) == before + 2
        # ... and that complete stream was stored.
        raw = await client.responses.with_raw_response.create(
            model=MODEL, input=prompt, stream=True
        )
        assert raw.headers["x-sse-cache"] == "hit"
        async with raw.parse() as replay:
            assert _dump([e async for e in replay]) == _dump(events)
        assert upstream.count(RESPONSES) == before + 2


@pytest.mark.anyio
@pytest.mark.filterwarnings(_ABANDONED)
async def test_closing_a_hit_early_keeps_the_entry(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        recorded = [
            e async for e in await client.responses.create(model=MODEL, input=prompt, stream=True)
        ]
        for _ in range(2):
            stream = await client.responses.create(model=MODEL, input=prompt, stream=True)
            async with stream:
                async for event in stream:
                    assert event.model_dump() == recorded[0].model_dump()
                    break
            gc.collect()
        replay = [
            e async for e in await client.responses.create(model=MODEL, input=prompt, stream=True)
        ]
        assert _dump(replay) == _dump(recorded)
        assert upstream.count(RESPONSES) == before + 1


@pytest.mark.anyio
async def test_tenants_never_share_entries(upstream: Upstream, cache_url: str, prompt: str) -> None:
    before = upstream.count(RESPONSES)
    keys = []
    for api_key in ("sk-tenant-one", "sk-tenant-two", "sk-tenant-one"):
        async with _openai_async(upstream, cache_url, key=api_key) as client:
            raw = await client.responses.with_raw_response.create(
                model=MODEL, input=prompt, stream=True
            )
            async with raw.parse() as stream:
                [e async for e in stream]
            keys.append((raw.headers["x-sse-cache"], raw.headers["x-sse-cache-key"]))
    assert [status for status, _ in keys] == ["miss", "miss", "hit"]
    assert keys[0][1] != keys[1][1]
    assert keys[0][1] == keys[2][1]
    assert upstream.count(RESPONSES) == before + 2


@pytest.mark.anyio
async def test_identical_concurrent_streams_share_one_upstream_request(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        results: dict[str, tuple[str, list[Any]]] = {}
        go = anyio.Event()

        async def read(name: str) -> None:
            await go.wait()  # released together
            raw = await client.responses.with_raw_response.create(
                model=MODEL, input=prompt, stream=True, extra_headers={"x-mock-delay-ms": "2"}
            )
            async with raw.parse() as stream:
                events = [event async for event in stream]
            results[name] = (raw.headers["x-sse-cache"], events)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read, "first")
            tg.start_soon(read, "second")
            go.set()
        assert sorted(status for status, _ in results.values()) == ["miss", "shared"]
        assert _dump(results["second"][1]) == _dump(results["first"][1])
        assert upstream.count(RESPONSES) == before + 1


# -- Chat Completions and Anthropic Messages, async ----------------------------------------


@pytest.mark.anyio
@pytest.mark.filterwarnings(_ABANDONED)
async def test_chat_completions_stream_cached(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        before = upstream.count(CHAT)
        runs = []
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with raw.parse() as stream:
                runs.append((raw.headers["x-sse-cache"], [c async for c in stream]))
        assert [status for status, _ in runs] == ["miss", "hit"]
        assert _dump(runs[1][1]) == _dump(runs[0][1])
        assert runs[0][1][-1].usage is not None
        assert upstream.count(CHAT) == before + 1
    gc.collect()


@pytest.mark.anyio
@pytest.mark.filterwarnings(_ABANDONED)
async def test_a_chat_stream_has_a_usage_chunk_only_for_a_request_asking_for_it(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # A stream that asked for usage ends with a chunk of no choices: replayed to a request
    # that did not ask, the usual `chunk.choices[0]` loop raised IndexError; and a stream
    # that did not ask has no usage to give a non-streamed request, whose body always has
    # it. Each gets what the API would send it.
    async with _openai_async(upstream, cache_url) as client:

        async def ask(usage: bool | None, content: str = prompt) -> tuple[str, list[Any]]:
            extra: dict[str, Any] = {}
            if usage is not None:
                extra = {"stream": True}
                if usage:
                    extra["stream_options"] = {"include_usage": True}
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": content}], **extra
            )
            if usage is None:
                return raw.headers["x-sse-cache"], [raw.parse()]
            async with raw.parse() as stream:
                return raw.headers["x-sse-cache"], [c async for c in stream]

        statuses = []
        for usage in (True, False, False, True):
            status, chunks = await ask(usage)
            statuses.append(status)
            assert (chunks[-1].usage is not None) is usage
            assert all(c.choices for c in chunks[:-1])
            assert bool(chunks[-1].choices) is not usage
        assert statuses == ["miss", "miss", "hit", "hit"]
        # A non-streamed request is answered from the stream that carried usage, with it.
        status, (completion,) = await ask(None)
        assert status == "hit" and completion.usage is not None
        # Stored as a non-streamed answer, then asked for as streams: with usage, from it.
        other = prompt + " (non-streamed first)"
        status, (completion,) = await ask(None, other)
        assert status == "miss"
        status, chunks = await ask(True, other)
        assert status == "hit" and chunks[-1].usage == completion.usage
        assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == (
            completion.choices[0].message.content
        )
        assert (await ask(False, other))[0] == "miss"
    gc.collect()


@pytest.mark.anyio
async def test_anthropic_messages_stream_cached(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    client = AsyncAnthropic(
        base_url=upstream.url,
        api_key="sk-ant-test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=AsyncCacheTransport(cache_url)),
    )
    async with client:
        before = upstream.count(MESSAGES)
        runs = []
        for _ in range(2):
            async with client.messages.stream(
                model=CLAUDE, max_tokens=256, messages=[{"role": "user", "content": prompt}]
            ) as stream:
                events = [e async for e in stream]
                final = await stream.get_final_message()
            runs.append((events, final))
        assert upstream.count(MESSAGES) == before + 1
        assert _dump(runs[1][0]) == _dump(runs[0][0])
        assert runs[1][1].model_dump() == runs[0][1].model_dump()
        assert runs[0][1].stop_reason == "end_turn"
        # The non-stream form of the same request is answered from the recorded stream.
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE, max_tokens=256, messages=[{"role": "user", "content": prompt}]
        )
        assert raw.headers["x-sse-cache"] == "hit"
        assert (await raw.parse()).model_dump() == runs[0][1].model_dump()
        assert upstream.count(MESSAGES) == before + 1


# -- controls, errors, pass-through --------------------------------------------------------


def _raw_client(upstream: Upstream, cache_url: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        base_url=upstream.url,
        headers={"authorization": "Bearer sk-raw"},
        transport=AsyncCacheTransport(cache_url),
    )


async def _post(
    client: httpx2.AsyncClient, body: dict[str, Any], **headers: str
) -> tuple[httpx2.Response, bytes]:
    async with client.stream("POST", "/v1/responses", json=body, headers=headers) as response:
        return response, await response.aread()


@pytest.mark.anyio
async def test_request_controls_and_headers(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    body = {"model": MODEL, "input": prompt, "stream": True}
    async with _raw_client(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        first, data = await _post(client, body, **{"x-sse-cache-ttl": "60"})
        assert first.headers["x-sse-cache"] == "miss"
        assert first.headers["content-type"].startswith("text/event-stream")
        # Our controls are not forwarded; the upstream is asked for an uncompressed body.
        recent = upstream.app.stats()["recent"][-1]
        assert not [h for h in recent["headers"] if h.startswith("x-sse-cache")]
        hit, replay = await _post(client, body)
        assert hit.headers["x-sse-cache"] == "hit"
        assert replay == data  # byte for byte
        assert int(hit.headers["age"]) >= 0
        assert 0 <= int(hit.headers["x-sse-cache-ttl"]) <= 60
        assert hit.headers["x-sse-cache-key"] == first.headers["x-sse-cache-key"]
        fresh, _ = await _post(client, body, **{"cache-control": "no-cache"})
        assert fresh.headers["x-sse-cache"] == "bypass"
        refreshed, _ = await _post(client, body, **{"x-sse-cache-refresh": "1"})
        assert refreshed.headers["x-sse-cache"] == "refresh"
        other, _ = await _post(client, body, **{"x-sse-cache-namespace": "elsewhere"})
        assert other.headers["x-sse-cache"] == "miss"
        assert upstream.count(RESPONSES) == before + 4
        bad, text = await _post(client, body, **{"x-sse-cache-ttl": "soon"})
        assert bad.status_code == 400
        assert b"x-sse-cache-ttl" in text
        assert upstream.count(RESPONSES) == before + 4  # answered without the upstream


@pytest.mark.anyio
async def test_controls_never_reach_the_upstream_on_routes_not_cached() -> None:
    # Set for every request (an SDK's default_headers), the controls reached the provider on
    # every request the cache passes through: an embeddings call, a resume it cannot answer
    # (an x-sse-cache-namespace holding a user id; helper-160).
    seen: list[dict[str, str]] = []

    def upstream(request: httpx2.Request) -> httpx2.Response:
        seen.append(dict(request.headers))
        return httpx2.Response(200, json={"object": "list", "data": []})

    headers = {"authorization": "Bearer sk-k", "x-sse-cache-namespace": "user-4711"}
    transport = AsyncCacheTransport("memory://", httpx2.MockTransport(upstream))
    async with httpx2.AsyncClient(
        base_url="http://up.test", headers=headers, transport=transport
    ) as client:
        await client.post("/v1/embeddings", json={"input": "x"})
        await client.get("/v1/responses/resp_unknown", params={"stream": "true"})
    sync = CacheTransport("memory://", httpx2.MockTransport(upstream))
    with httpx2.Client(base_url="http://up.test", headers=headers, transport=sync) as client:
        client.post("/v1/embeddings", json={"input": "x"})
        client.get("/v1/responses/resp_unknown", params={"stream": "true"})
    assert len(seen) == 4 and all(h["authorization"] == "Bearer sk-k" for h in seen)
    assert not [name for h in seen for name in h if name.startswith("x-sse-cache")], seen


@pytest.mark.anyio
async def test_a_host_header_of_its_own_keys_apart() -> None:
    # Two virtual hosts behind one address: the same URL, another Host header, another
    # server's answer; they shared one entry (helper-160). The Host the client sets from the
    # URL keys as before (the URL's server).
    calls: list[str] = []
    stream = serialize_sse(responses_stream(text_deltas=3))

    def upstream(request: httpx2.Request) -> httpx2.Response:
        calls.append(request.headers["host"])
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=stream)

    body = {"model": MODEL, "input": "virtual hosts", "stream": True}
    transport = AsyncCacheTransport("memory://", httpx2.MockTransport(upstream))
    async with httpx2.AsyncClient(
        base_url="http://10.0.0.7:8080", headers={"authorization": "Bearer k"}, transport=transport
    ) as client:
        statuses = []
        hosts = (None, "staging.internal", "prod.internal", "staging.internal", "10.0.0.7:8080")
        for host in hosts:
            headers = {} if host is None else {"host": host}
            response = await client.post("/v1/responses", json=body, headers=headers)
            assert response.content == stream
            statuses.append(response.headers["x-sse-cache"])
        # A Host holding a path is no other request's path (helper-161: "b.example/openai"
        # asking /v1/responses was answered from b.example's /openai/v1/responses).
        for host, path in (
            ("b.example", "/openai/v1/responses"),
            ("b.example/openai", "/v1/responses"),
        ):
            response = await client.post(path, json=body, headers={"host": host})
            statuses.append(response.headers["x-sse-cache"])
    assert statuses == ["miss", "miss", "miss", "hit", "hit", "miss", "miss"]
    assert calls == [
        "10.0.0.7:8080",
        "staging.internal",
        "prod.internal",
        "b.example",
        "b.example/openai",
    ]


@pytest.mark.anyio
async def test_invalid_control_header_is_a_400_for_the_sdk(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    async with _openai_async(upstream, cache_url) as client:
        with pytest.raises(BadRequestError, match="x-sse-cache-variants"):
            await client.responses.create(
                model=MODEL, input=prompt, extra_headers={"x-sse-cache-variants": "0"}
            )


@pytest.mark.anyio
async def test_failed_and_cut_streams_are_not_stored(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    body = {"model": MODEL, "input": prompt, "stream": True}
    async with _raw_client(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        error, _ = await _post(client, body, **{"x-mock-error": "500"})
        assert error.status_code == 500
        assert error.headers["x-sse-cache"] == "miss"
        _, data = await _post(client, body, **{"x-mock-error": "fail-mid-stream"})
        assert b"response.failed" in data
        with pytest.raises(httpx2.RemoteProtocolError):
            await _post(client, body, **{"x-mock-error": "cut"})
        bad, _ = await _post(client, body, **{"x-mock-error": "bad-sse"})
        assert bad.status_code == 200
        good, _ = await _post(client, body)
        assert good.headers["x-sse-cache"] == "miss"  # none of the above was stored
        assert upstream.count(RESPONSES) == before + 5
        again, _ = await _post(client, body)
        assert again.headers["x-sse-cache"] == "hit"
        assert upstream.count(RESPONSES) == before + 5


@pytest.mark.anyio
async def test_other_routes_pass_through_untouched(upstream: Upstream, cache_url: str) -> None:
    async with _openai_async(upstream, cache_url) as client:
        raw = await client.models.with_raw_response.list()
        assert "x-sse-cache" not in raw.headers
        assert [m.id for m in raw.parse().data] == ["gpt-mock-1", "gpt-mock-1-mini"]


@pytest.mark.anyio
async def test_httpx_transport_caches_too(upstream: Upstream, cache_url: str, prompt: str) -> None:
    body = {"model": MODEL, "input": prompt, "stream": True}
    before = upstream.count(RESPONSES)
    seen = []
    for _ in range(2):
        transport = sse_cache.httpx.AsyncCacheTransport(cache_url)
        assert isinstance(transport, httpx.AsyncBaseTransport)
        async with httpx.AsyncClient(base_url=upstream.url, transport=transport) as client:
            async with client.stream(
                "POST", "/v1/responses", json=body, headers={"authorization": "Bearer sk-x"}
            ) as response:
                seen.append((response.headers["x-sse-cache"], await response.aread()))
    assert [status for status, _ in seen] == ["miss", "hit"]
    assert seen[0][1] == seen[1][1]
    assert upstream.count(RESPONSES) == before + 1


# -- sync clients ---------------------------------------------------------------------------


def test_sync_openai_responses(upstream: Upstream, cache_url: str, prompt: str) -> None:
    with _openai_sync(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        runs = []
        for _ in range(2):
            raw = client.responses.with_raw_response.create(model=MODEL, input=prompt, stream=True)
            with raw.parse() as stream:
                runs.append((raw.headers["x-sse-cache"], list(stream)))
        assert [status for status, _ in runs] == ["miss", "hit"]
        assert _dump(runs[1][1]) == _dump(runs[0][1])
        with client.responses.stream(model=MODEL, input=prompt) as helper:
            final = helper.get_final_response()
        unary = client.responses.create(model=MODEL, input=prompt)
        recorded = runs[0][1][-1].response
        assert unary.model_dump() == recorded.model_dump()
        assert final.id == recorded.id
        assert final.output_text == recorded.output_text != ""
        assert upstream.count(RESPONSES) == before + 1


def test_sync_early_break_stores_nothing(upstream: Upstream, cache_url: str, prompt: str) -> None:
    with _openai_sync(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        with client.responses.create(
            model=MODEL, input=prompt, stream=True, extra_headers={"x-mock-delay-ms": "10"}
        ) as stream:
            for _event in stream:
                break
        raw = client.responses.with_raw_response.create(model=MODEL, input=prompt, stream=True)
        with raw.parse() as again:
            list(again)
        assert raw.headers["x-sse-cache"] == "miss"
        assert upstream.count(RESPONSES) == before + 2


def test_sync_chat_completions_stored_although_the_sdk_stops_at_done(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # The sync openai SDK closes the response at `data: [DONE]` without reading to the end.
    with _openai_sync(upstream, cache_url) as client:
        before = upstream.count(CHAT)
        runs = []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
            )
            with raw.parse() as stream:
                runs.append((raw.headers["x-sse-cache"], list(stream)))
        assert [status for status, _ in runs] == ["miss", "hit"]
        assert _dump(runs[1][1]) == _dump(runs[0][1])
        assert upstream.count(CHAT) == before + 1


def test_sync_anthropic_messages_stream(upstream: Upstream, cache_url: str, prompt: str) -> None:
    client = Anthropic(
        base_url=upstream.url,
        api_key="sk-ant-test",
        max_retries=0,
        http_client=httpx2.Client(transport=CacheTransport(cache_url)),
    )
    with client:
        before = upstream.count(MESSAGES)
        finals = []
        for _ in range(2):
            with client.messages.stream(
                model=CLAUDE, max_tokens=256, messages=[{"role": "user", "content": prompt}]
            ) as stream:
                text = "".join(stream.text_stream)
                finals.append((text, stream.get_final_message()))
        assert upstream.count(MESSAGES) == before + 1
        assert finals[0][0] == finals[1][0] != ""
        assert finals[0][1].model_dump() == finals[1][1].model_dump()


def test_sync_httpx_client(upstream: Upstream, cache_url: str, prompt: str) -> None:
    body = {"model": MODEL, "input": prompt, "stream": True}
    transport = sse_cache.httpx.CacheTransport(cache_url)
    with httpx.Client(base_url=upstream.url, transport=transport) as client:
        seen = []
        for _ in range(2):
            with client.stream(
                "POST", "/v1/responses", json=body, headers={"authorization": "Bearer sk-x"}
            ) as response:
                seen.append((response.headers["x-sse-cache"], response.read()))
    assert [status for status, _ in seen] == ["miss", "hit"]
    assert seen[0][1] == seen[1][1]


def test_sync_identical_concurrent_streams_share_one_upstream_request(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    with _openai_sync(upstream, cache_url) as client:
        before = upstream.count(RESPONSES)
        results: dict[str, tuple[str, list[Any]]] = {}
        go = threading.Barrier(2)

        def read(name: str) -> None:
            go.wait(10)  # released together
            raw = client.responses.with_raw_response.create(
                model=MODEL, input=prompt, stream=True, extra_headers={"x-mock-delay-ms": "2"}
            )
            with raw.parse() as stream:
                events = list(stream)
            results[name] = (raw.headers["x-sse-cache"], events)

        threads = [threading.Thread(target=read, args=(name,)) for name in ("first", "second")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(status for status, _ in results.values()) == ["miss", "shared"]
        assert _dump(results["second"][1]) == _dump(results["first"][1])
        assert upstream.count(RESPONSES) == before + 1


def test_sync_transport_on_a_trio_portal(upstream: Upstream, cache_url: str, prompt: str) -> None:
    transport = CacheTransport(cache_url, portal_backend="trio")
    client = OpenAI(
        base_url=f"{upstream.url}/v1",
        api_key="sk-trio",
        http_client=httpx2.Client(transport=transport),
    )
    with client:
        runs = []
        for _ in range(2):
            raw = client.responses.with_raw_response.create(model=MODEL, input=prompt, stream=True)
            with raw.parse() as stream:
                runs.append((raw.headers["x-sse-cache"], _dump(list(stream))))
    assert [status for status, _ in runs] == ["miss", "hit"]
    assert runs[0][1] == runs[1][1]


def test_two_servers_asked_the_same_never_share_an_entry(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # One cache, two local servers that take any key ("EMPTY"): the second server's caller
    # gets the second server's answer, not the first's.
    other = Upstream()
    other.start()
    try:
        statuses = []
        for server in (upstream, other, upstream, other):
            client = _openai_sync(server, cache_url, key="EMPTY")
            with client:
                raw = client.responses.with_raw_response.create(
                    model=MODEL, input=prompt, stream=True
                )
                with raw.parse() as stream:
                    list(stream)
                statuses.append(raw.headers["x-sse-cache"])
        assert statuses == ["miss", "miss", "hit", "hit"]
        assert other.count(RESPONSES) == 1
        # Replicas of one service share entries when the transport names them as one.
        statuses = []
        for server in (upstream, other):
            transport = CacheTransport(cache_url, origin="https://replicas.example")
            with OpenAI(
                base_url=f"{server.url}/v1",
                api_key="EMPTY",
                max_retries=0,
                http_client=httpx2.Client(transport=transport),
            ) as client:
                raw = client.responses.with_raw_response.create(
                    model=MODEL, input=prompt, stream=True
                )
                with raw.parse() as stream:
                    list(stream)
                statuses.append(raw.headers["x-sse-cache"])
        assert statuses == ["miss", "hit"]
    finally:
        other.stop()


def test_a_path_with_escapes_is_never_answered_from_the_path_it_decodes_to(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # httpx sends the path as written: the server is asked another request, whose answer
    # the entry of the decoded path is not.
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers = {"authorization": "Bearer sk-escapes"}
    with httpx2.Client(transport=CacheTransport(cache_url), base_url=upstream.url) as client:
        assert (
            client.post("/v1/responses", json=body, headers=headers).headers["x-sse-cache"]
            == "miss"
        )
        for escaped in (b"/v1%2Fresponses", b"/v1/respons%65s"):
            url = httpx2.URL(upstream.url).copy_with(raw_path=escaped)
            response = client.post(url, json=body, headers=headers)
            assert response.headers.get("x-sse-cache") != "hit", escaped


def test_sync_transport_runs_its_portal_only_while_open(cache_url: str) -> None:
    def portal_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "sse-cache-portal"]

    before = len(portal_threads())
    unused = CacheTransport(cache_url)
    assert len(portal_threads()) == before  # started lazily
    unused.close()
    transport = CacheTransport(
        cache_url, httpx2.MockTransport(lambda request: httpx2.Response(200, json={}))
    )
    with httpx2.Client(transport=transport, base_url="http://upstream") as client:
        client.post("/v1/responses", json={"model": MODEL, "input": "x"})
        assert len(portal_threads()) == before + 1
    deadline = time.monotonic() + 5
    while len(portal_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(portal_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        transport.handle_request(httpx2.Request("POST", "http://upstream/v1/responses", json={}))


@pytest.mark.anyio
async def test_an_async_transport_closed_with_its_backend_says_so(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # `async with AsyncClient(transport=t)` in each handler closes `t` at the first
    # handler's end, and with it the backend it opened from its URL. It served on before,
    # every request an uncached miss with at most a logged warning; now it says why.
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers = {"authorization": "Bearer sk-test-a"}
    transport = AsyncCacheTransport(cache_url)
    before = upstream.count(RESPONSES)
    async with httpx2.AsyncClient(transport=transport, base_url=upstream.url) as client:
        first = await client.post("/v1/responses", json=body, headers=headers)
        assert first.headers["x-sse-cache"] == "miss"
    async with httpx2.AsyncClient(transport=transport, base_url=upstream.url) as client:
        with pytest.raises(RuntimeError, match="AsyncCacheTransport is closed, and the backend"):
            await client.post("/v1/responses", json=body, headers=headers)
    assert upstream.count(RESPONSES) == before + 1
    # A backend given as an object is the caller's: the transport closes only its wrapped
    # transport, and serves on, from the same cache.
    backend = from_url(cache_url)
    transport = AsyncCacheTransport(backend)
    for _ in range(2):
        async with httpx2.AsyncClient(transport=transport, base_url=upstream.url) as client:
            again = await client.post("/v1/responses", json=body, headers=headers)
            assert again.headers["x-sse-cache"] == "hit"
            assert again.content == first.content
    await backend.aclose()


# -- docs ---------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "httpx.md"


def _doc_examples() -> list[str]:
    """The ```python blocks of docs/httpx.md preceded by ``<!-- test: run -->``."""
    blocks = DOCS.read_text().split("<!-- test: run -->\n```python\n")[1:]
    return [block.split("\n```", 1)[0] for block in blocks]


@pytest.mark.parametrize("code", _doc_examples(), ids=lambda code: code.splitlines()[-1][:40])
def test_docs_examples_run(upstream: Upstream, tmp_path: Path, code: str) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENAI_BASE_URL": f"{upstream.url}/v1",
        "OPENAI_API_KEY": "sk-docs",
        "ANTHROPIC_BASE_URL": upstream.url,
        "ANTHROPIC_API_KEY": "sk-ant-docs",
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "hit" in result.stdout, result.stdout
    # sqlite:///cache.db, three slashes: cache.db in the directory the program ran in.
    assert (tmp_path / "cache.db").is_file()


def test_docs_have_runnable_examples() -> None:
    assert len(_doc_examples()) == 4


# -- packaging --------------------------------------------------------------------------------


def test_importing_sse_cache_imports_neither_http_library() -> None:
    code = (
        "import sys, sse_cache; print(sorted(m for m in ('httpx', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", [sse_cache.httpx, sse_cache.httpx2])
def test_public_modules(module: Any) -> None:
    assert module.__all__ == ["AsyncCacheTransport", "CacheTransport"]
    lib: Callable[..., Any] = module.AsyncCacheTransport._lib
    assert isinstance(module.AsyncCacheTransport("memory://"), lib.AsyncBaseTransport)
    sync = module.CacheTransport("memory://")
    assert isinstance(sync, lib.BaseTransport)
    sync.close()


# -- a producer's thread interrupted around a hop ----------------------------------------------


class Interrupted(Exception):
    """What a signal handler raises in the thread reading a response (a timeout decorator's
    ``SIGALRM``, ``KeyboardInterrupt`` from Ctrl-C)."""


@pytest.mark.parametrize("when", ["after the hop began", "before the hop"])
def test_a_producer_interrupted_around_a_hop_never_stores_a_torn_answer(
    upstream: Upstream, cache_url: str, prompt: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The producer's thread reads chunk after chunk; each goes to the followers and into the
    # recording in one hop to the portal. An interruption while the thread waits for that
    # hop (the hop runs on regardless) or just before it must not leave the recording with a
    # chunk doubled or missing, to be completed by the followers' reads and stored: every
    # later hit would replay a different answer.
    # Chat: its adapter cannot tell a chunk doubled or missing (Responses events carry
    # sequence numbers, and such an answer would not be stored).
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": "Bearer sk-test-a", "x-mock-delay-ms": "1", "x-mock-deltas": "60"}
    url = "/v1/chat/completions"
    expected = httpx2.post(upstream.url + url, json=body, headers=headers).content
    producer = threading.current_thread()
    hops = 0
    real_call = anyio.from_thread.BlockingPortal.call

    def call(portal: Any, func: Any, *args: Any) -> Any:
        nonlocal hops
        if threading.current_thread() is producer and getattr(func, "__name__", "") == "_pass":
            hops += 1
            if hops == 5:
                if when == "after the hop began":
                    portal.start_task_soon(func, *args)  # runs on, as after a real interrupt
                raise Interrupted
        return real_call(portal, func, *args)

    monkeypatch.setattr(anyio.from_thread.BlockingPortal, "call", call)
    follower: dict[str, Any] = {}
    joined = threading.Event()
    with httpx2.Client(transport=CacheTransport(cache_url), base_url=upstream.url) as client:
        with client.stream("POST", url, json=body, headers=headers) as response:
            assert response.headers["x-sse-cache"] == "miss"

            def follow() -> None:
                try:
                    with client.stream("POST", url, json=body, headers=headers) as r:
                        follower["status"] = r.headers["x-sse-cache"]
                        joined.set()
                        follower["body"] = r.read()
                except httpx2.TransportError as exc:
                    follower["error"] = exc

            thread = threading.Thread(target=follow)
            thread.start()
            with pytest.raises(Interrupted):
                for _ in response.iter_raw():
                    # The follower joins at the first chunk, and reads on after the
                    # producer's client leaves.
                    assert joined.wait(30)
            thread.join(30)
        monkeypatch.undo()
        assert follower["status"] == "shared"
        # The follower was cut (a visible failure) or got the whole answer, never less.
        assert "error" in follower or follower["body"] == expected
        again = client.post(url, json=body, headers=headers)
    assert again.content == expected  # a miss or a hit, the answer whole either way


class _LookupHeld:
    """A memory backend whose first read waits until :attr:`release` is set (in the cache's
    loop): a slow lookup. :attr:`reading` is set once it waits."""

    def __init__(self) -> None:
        from sse_cache.backends import MemoryBackend

        self.backend = MemoryBackend()
        self.reading = threading.Event()
        self.release: anyio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    async def get(self, key: str) -> bytes | None:
        if self.release is None:
            self.release = anyio.Event()
            self.reading.set()
            await self.release.wait()
        return await self.backend.get(key)


def test_a_request_interrupted_during_its_lookup_leaves_no_producer_behind(
    upstream: Upstream, prompt: str
) -> None:
    # Ctrl-C while a sync request waits for its lookup: the exchange was entered in the
    # cache's loop regardless, became its key's producer and waited for good; every identical
    # request followed it and waited twice its join_timeout (helper-108).
    import signal

    body = {"model": MODEL, "input": prompt, "stream": True}
    headers = {"authorization": "Bearer sk-test-a"}
    expected = httpx2.post(upstream.url + "/v1/responses", json=body, headers=headers).content
    asked = upstream.count("POST /v1/responses")
    backend = _LookupHeld()
    transport = CacheTransport(backend, join_timeout=3600)  # type: ignore[arg-type]
    main = threading.get_ident()

    def interrupt() -> None:
        assert backend.reading.wait(30)
        signal.pthread_kill(main, signal.SIGINT)  # a real Ctrl-C

    with httpx2.Client(transport=transport, base_url=upstream.url) as client:
        interrupter = threading.Thread(target=interrupt)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            client.post("/v1/responses", json=body, headers=headers)
        interrupter.join()
        assert backend.release is not None
        transport.portal.call(backend.release.set)
        answers: list[httpx2.Response] = []
        again = threading.Thread(
            target=lambda: answers.append(client.post("/v1/responses", json=body, headers=headers))
        )
        again.start()
        again.join(30)
        assert not again.is_alive(), "the request follows a producer that never answers"
    assert answers[0].headers["x-sse-cache"] == "miss" and answers[0].content == expected
    assert upstream.count("POST /v1/responses") == asked + 1  # that one alone


def test_followers_of_an_error_retry_as_the_upstream_told_the_sdk(prompt: str) -> None:
    # The upstream answers 500 with `x-should-retry: false`, which the openai SDK obeys
    # before the status: without the cache each caller makes one attempt. The followers got
    # the 500 without that header, and each retried twice (helper-108).
    gate = threading.Event()
    calls = 0

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        if scope["type"] != "http":
            return
        calls += 1
        await anyio.to_thread.run_sync(gate.wait)
        head = [(b"content-type", b"application/json"), (b"x-should-retry", b"false")]
        await send({"type": "http.response.start", "status": 500, "headers": head})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "down"}}'})

    server = Upstream(failing)
    server.start()
    seen = FlightsSeen()
    transport = CacheTransport("memory://", hooks=[seen])
    client = OpenAI(
        base_url=f"{server.url}/v1",
        api_key="sk-test-a",
        max_retries=2,
        http_client=httpx2.Client(transport=transport),
    )
    errors: list[openai.APIStatusError] = []

    def ask() -> None:
        with pytest.raises(openai.InternalServerError) as caught:
            client.responses.create(model=MODEL, input=prompt, stream=True)
        errors.append(caught.value)

    try:
        threads = [threading.Thread(target=ask) for _ in range(4)]
        threads[0].start()
        deadline = time.monotonic() + 30  # a deadlock guard
        while calls < 1:  # (the upstream's count: its request arrived)
            assert time.monotonic() < deadline, "the first request never reached the upstream"
            time.sleep(0.01)
        for thread in threads[1:]:
            thread.start()
        while seen.followers() < 3:
            assert time.monotonic() < deadline, "the followers never joined"
            time.sleep(0.01)
        gate.set()
        for thread in threads:
            thread.join(60)
    finally:
        gate.set()
        client.close()
        server.stop()
    assert len(errors) == 4
    assert sorted(e.response.headers["x-sse-cache"] for e in errors) == ["miss"] + ["shared"] * 3
    assert all(e.response.headers["x-should-retry"] == "false" for e in errors)
    assert calls == 1


@pytest.mark.parametrize("round_", range(5))
def test_threads_closing_one_transport_at_once_all_return(upstream: Upstream, round_: int) -> None:
    # Closing twice is a no-op; two threads closing at once (a shutdown hook and a `with`
    # leaving) raised "this CacheTransport is closed" in one of them (helper-108: 19 times in
    # 30). Rounds: a race each.
    transport = CacheTransport("memory://")
    together = threading.Barrier(4)
    errors: list[BaseException] = []

    def close() -> None:
        together.wait()
        try:
            transport.close()
        except BaseException as exc:
            errors.append(exc)

    with httpx2.Client(transport=transport, base_url=upstream.url) as client:
        client.get("/_mock/stats")  # (not cached: the portal is started all the same)
        threads = [threading.Thread(target=close) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert not any(t.name == "sse-cache-portal" and t.is_alive() for t in threading.enumerate())


# -- a process forked after the transport was used ------------------------------------------


def _in_forked_child(client: httpx2.Client, requests: list[dict[str, Any]]) -> list[Any]:
    """What each request gives in a child forked from this process: (cache status, body) or
    the error's type and message; then what closing the client there gives ("closed", "")
    or the error (a worker closes its client as it stops). A child that hangs fails the
    test."""

    def child(conn: Any) -> None:
        results: list[Any] = []
        for body in requests:
            try:
                r = client.post("/v1/responses", json=body, headers={"authorization": "Bearer k"})
                results.append((r.headers["x-sse-cache"], r.content))
            except Exception as exc:
                results.append((type(exc).__name__, str(exc)))
        try:
            client.close()
            results.append(("closed", ""))
        except Exception as exc:
            results.append((type(exc).__name__, str(exc)))
        conn.send(results)

    with forked(child) as conn:
        return list(received(conn))


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: threads
def test_a_process_forked_after_the_sync_transport_was_used_caches_on(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # A client built at import, warmed up, then forked workers (gunicorn, Celery): the
    # portal thread and the backend's connections stay in the parent; the child's requests
    # waited for ever on them.
    stored = {"model": MODEL, "input": prompt, "stream": True}
    other = {"model": MODEL, "input": prompt + " other", "stream": True}
    headers = {"authorization": "Bearer k"}
    with httpx2.Client(transport=CacheTransport(cache_url), base_url=upstream.url) as client:
        first = client.post("/v1/responses", json=stored, headers=headers)
        assert first.headers["x-sse-cache"] == "miss"
        results = _in_forked_child(client, [stored, other])
        assert results[0] == ("hit", first.content)  # the same file, opened anew
        assert results[1][0] == "miss" and results[1][1].endswith(b"\n\n")
        assert b"response.completed" in results[1][1]
        assert results[2] == ("closed", "")
        # The parent's own transport is untouched by its child.
        assert (
            client.post("/v1/responses", json=stored, headers=headers).headers["x-sse-cache"]
            == "hit"
        )


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_of_a_transport_given_a_backend_object_says_so(
    upstream: Upstream, tmp_path: Path, prompt: str
) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'object.db'}")
    body = {"model": MODEL, "input": prompt, "stream": True}
    transport = CacheTransport(backend)
    with httpx2.Client(transport=transport, base_url=upstream.url) as client:
        client.post("/v1/responses", json=body, headers={"authorization": "Bearer k"})
        [(error, message), closed] = _in_forked_child(client, [body])
        assert error == "ConfigError" and "used before the process forked" in message
        # Closed all the same (leaving `with client:` does): the parent's backend and portal
        # are left alone (helper-108: close raised the ConfigError too).
        assert closed == ("closed", "")
        again = client.post("/v1/responses", json=body, headers={"authorization": "Bearer k"})
        assert again.headers["x-sse-cache"] == "hit"
        transport.portal.call(backend.aclose)  # the caller's: the transport leaves it open


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_child_forked_while_a_drain_thread_reads_on_closes_its_client(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # The parent's producer left early and its drain thread reads the upstream on for a
    # follower when a worker forks: closing the client in the child settled the parent's
    # drain through the parent's portal, which has no thread there — it waited for ever
    # (helper-108).
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers = {**PACED, "x-mock-deltas": "20"}  # (4 s of answer: read on at the fork)
    seen = FlightsSeen()
    transport = CacheTransport(cache_url, hooks=[seen])
    with httpx2.Client(transport=transport, base_url=upstream.url, timeout=30) as client:
        follower: list[bytes] = []

        def follow() -> None:
            follower.append(client.post("/v1/responses", json=body, headers=headers).content)

        thread = threading.Thread(target=follow)
        with client.stream("POST", "/v1/responses", json=body, headers=headers) as producer:
            chunks = producer.iter_raw()  # (kept: a generator dropped would close it)
            next(chunks)
            thread.start()
            deadline = time.monotonic() + 30  # a deadlock guard
            while seen.followers() < 1:
                assert time.monotonic() < deadline, "the follower never joined"
                time.sleep(0.01)
        # The producer's client left; a drain thread reads on for the follower.
        assert any(t.name == "sse-cache-drain" for t in threading.enumerate())
        assert _in_forked_child(client, []) == [("closed", "")]
        thread.join(30)
    assert follower and b"response.completed" in follower[0]


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_child_forked_while_a_stream_is_held_for_its_resume_window_has_its_own_places(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # The parent holds a stream its client left for the resume window when a worker forks:
    # the child kept the parent's count of such streams for good — its own next one was
    # refused (max_background=1) — and its metrics reported the parent's streams
    # (helper-172).
    from sse_cache.metrics import Metrics

    metrics = Metrics()
    transport = CacheTransport(cache_url, resume_window=30, max_background=1, hooks=[metrics])
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers = {**PACED, "x-mock-deltas": "20"}  # (4 s of answer: held at the fork)
    with httpx2.Client(transport=transport, base_url=upstream.url, timeout=30) as client:
        with client.stream("POST", "/v1/responses", json=body, headers=headers) as producer:
            next(producer.iter_raw())
        deadline = time.monotonic() + 30  # a deadlock guard
        while transport._holds.taken < 1:  # (held once its client has left)
            assert time.monotonic() < deadline, "the stream was never held"
            time.sleep(0.01)
        gauges = ("sse_cache_background_streams", "sse_cache_live_streams")
        assert [metric_value(metrics.render(), g) for g in gauges] == [1, 1]

        def child(conn: Any) -> None:
            conn.send(
                [transport._holds.taken, *(metric_value(metrics.render(), g) for g in gauges)]
            )

        with forked(child) as conn:
            assert received(conn) == [0, 0, 0]


# -- a follower's own read timeout ------------------------------------------------------------

#: A short answer with gaps of 200 ms between its events.
PACED = {
    "authorization": "Bearer k",
    "x-mock-delay-ms": "200",
    "x-mock-deltas": "1",
    "x-mock-summaries": "0",
}


def test_a_follower_keeps_its_own_read_timeout(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # A follower reads the producer's upstream through the cache, not a socket of its own:
    # its read timeout must still hold between chunks, as it would reading the upstream.
    # The producer (a long timeout) is not disturbed, and its answer is stored.
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers, patient, hasty = PACED, httpx2.Timeout(30), httpx2.Timeout(30, read=0.05)
    with httpx2.Client(transport=CacheTransport(cache_url), base_url=upstream.url) as client:
        with client.stream(
            "POST", "/v1/responses", json=body, headers=headers, timeout=patient
        ) as producer:
            chunks = producer.iter_raw()
            received = next(chunks)
            with client.stream(
                "POST", "/v1/responses", json=body, headers=headers, timeout=hasty
            ) as follower:
                assert follower.headers["x-sse-cache"] == "shared"
                with pytest.raises(httpx2.ReadTimeout, match="read timeout"):
                    for _ in follower.iter_raw():
                        pass
            received += b"".join(chunks)
        again = client.post("/v1/responses", json=body, headers=headers)
    assert again.headers["x-sse-cache"] == "hit" and again.content == received


@pytest.mark.anyio
async def test_an_async_follower_keeps_its_own_read_timeout(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers, patient, hasty = PACED, httpx2.Timeout(30), httpx2.Timeout(30, read=0.05)
    transport = AsyncCacheTransport(cache_url)
    async with httpx2.AsyncClient(transport=transport, base_url=upstream.url) as client:
        request = client.build_request(
            "POST", "/v1/responses", json=body, headers=headers, timeout=patient
        )
        producer = await client.send(request, stream=True)
        chunks = producer.aiter_raw()
        received = await chunks.__anext__()
        request = client.build_request(
            "POST", "/v1/responses", json=body, headers=headers, timeout=hasty
        )
        follower = await client.send(request, stream=True)
        assert follower.headers["x-sse-cache"] == "shared"
        with pytest.raises(httpx2.ReadTimeout, match="read timeout"):
            async for _ in follower.aiter_raw():
                pass
        await follower.aclose()
        async for chunk in chunks:
            received += chunk
        await producer.aclose()
        again = await client.post("/v1/responses", json=body, headers=headers)
    assert again.headers["x-sse-cache"] == "hit" and again.content == received


def test_one_thread_reading_the_follower_before_its_producer_is_not_stuck(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # Two identical streams opened by one thread (two samples of one prompt), the second
    # read first: it follows the first, which only this same thread would read. It ends
    # with a ReadTimeout after the client's read timeout (not the cache's join timeout of
    # minutes), and the first still reads to its end.
    body = {"model": MODEL, "input": prompt, "stream": True}
    headers = {"authorization": "Bearer k", "x-mock-delay-ms": "1"}
    timeout = httpx2.Timeout(30, read=0.2)
    with httpx2.Client(
        transport=CacheTransport(cache_url), base_url=upstream.url, timeout=timeout
    ) as client:
        with client.stream("POST", "/v1/responses", json=body, headers=headers) as first:
            with client.stream("POST", "/v1/responses", json=body, headers=headers) as second:
                assert (first.headers["x-sse-cache"], second.headers["x-sse-cache"]) == (
                    "miss",
                    "shared",
                )
                with pytest.raises(httpx2.ReadTimeout):
                    second.read()
            assert b"response.completed" in first.read()


class _FirstAnswerStalls:
    """A ``MockTransport`` handler: its first answer's body is ``stalled`` (a stream that
    stalls midway), every later one is ``raw`` whole; :attr:`calls` counts the requests."""

    def __init__(self, raw: bytes, stalled: Any) -> None:
        self.raw, self.stalled, self.calls = raw, stalled, 0

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        headers = {"content-type": "text/event-stream"}
        if self.calls == 1:
            return httpx2.Response(200, headers=headers, stream=self.stalled)
        return httpx2.Response(200, headers=headers, content=self.raw)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_async_miss_dropped_unclosed_does_not_keep_its_key_live(
    anyio_backend: str,
) -> None:
    # A program drops a streamed miss without closing it (an SDK stream left by ``break``
    # outside ``async with``). Once the response is collected its exchange is left: its
    # flight closes, and the next identical request asks the upstream itself, where it
    # followed a producer that would never feed it (then failed at its read timeout).
    import asyncio
    import gc

    from sse_cache.events import serialize_sse
    from sse_cache.testing import responses_stream

    raw = serialize_sse(responses_stream("dropped", text_deltas=4))
    never = anyio.Event()

    class Stalls(httpx2.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield raw[:40]
            await never.wait()

    upstream = _FirstAnswerStalls(raw, Stalls())
    seen = FlightsSeen()
    transport = AsyncCacheTransport("memory://", httpx2.MockTransport(upstream), hooks=[seen])
    body = {"model": MODEL, "input": "dropped", "stream": True}
    headers = {"authorization": "Bearer sk-dropped"}
    async with httpx2.AsyncClient(base_url="http://up", transport=transport, timeout=30) as client:
        request = client.build_request("POST", "/v1/responses", json=body, headers=headers)
        dropped = await client.send(request, stream=True)
        assert dropped.headers["x-sse-cache"] == "miss"
        del dropped, request
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            while sum(len(list(flights)) for flights in seen.flights):
                gc.collect()  # (the loop's finalizer closes what was collected, in a task)
                await asyncio.sleep(0.01)
        async with client.stream("POST", "/v1/responses", json=body, headers=headers) as again:
            assert again.headers["x-sse-cache"] == "miss"
            assert await again.aread() == raw
    assert upstream.calls == 2


def test_a_sync_miss_dropped_unclosed_does_not_keep_its_key_live() -> None:
    # The same through the sync transport: nothing there is an async generator the loop
    # would finalize; the tee body's finalizer leaves the exchange (from a thread of its
    # own) once the response is collected.
    import gc

    from sse_cache.events import serialize_sse
    from sse_cache.testing import responses_stream

    raw = serialize_sse(responses_stream("dropped", text_deltas=4))
    never = threading.Event()

    class Stalls(httpx2.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield raw[:40]
            never.wait(30)

    upstream = _FirstAnswerStalls(raw, Stalls())
    seen = FlightsSeen()
    transport = CacheTransport("memory://", httpx2.MockTransport(upstream), hooks=[seen])
    body = {"model": MODEL, "input": "dropped", "stream": True}
    headers = {"authorization": "Bearer sk-dropped"}
    try:
        with httpx2.Client(base_url="http://up", transport=transport, timeout=30) as client:
            request = client.build_request("POST", "/v1/responses", json=body, headers=headers)
            dropped = client.send(request, stream=True)
            assert dropped.headers["x-sse-cache"] == "miss"
            del dropped, request
            gc.collect()
            deadline = time.monotonic() + 30  # a deadlock guard, not a timing bound
            while sum(len(list(flights)) for flights in seen.flights):
                assert time.monotonic() < deadline, "the dropped response's flight stayed live"
                time.sleep(0.01)
            with client.stream("POST", "/v1/responses", json=body, headers=headers) as again:
                assert again.headers["x-sse-cache"] == "miss"
                assert again.read() == raw
    finally:
        never.set()
    assert upstream.calls == 2


# -- a sync transport closed while other threads read -----------------------------------------


@pytest.mark.parametrize("portal", ["asyncio", "trio"])
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_closing_a_sync_transport_while_followers_wait_for_the_head_raises_transport_errors(
    serve: Any, portal: str, anyio_backend: str
) -> None:
    # Followers wait for their producer's response head (its upstream has not answered)
    # when another thread closes the client. Each must get the HTTP library's ReadError: the
    # portal's own cancellation (asyncio's CancelledError, trio's Cancelled) is no Exception,
    # and reached the callers' threads, killing them past every ``except Exception`` (the
    # SDKs neither convert nor retry it).
    head = anyio.Event()

    async def slow_to_answer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        with anyio.move_on_after(30):
            await head.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    seen = FlightsSeen()
    followers = 4
    async with serve(slow_to_answer) as url:
        client = httpx2.Client(
            transport=CacheTransport("memory://", portal_backend=portal, hooks=[seen]),
            base_url=url,
            timeout=30,
        )
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        outcome: dict[int, BaseException | str] = {}

        def ask(i: int) -> None:
            try:
                with client.stream(
                    "POST", "/v1/chat/completions", json=body, headers={"authorization": "Bearer k"}
                ) as response:
                    response.read()
                outcome[i] = "ended"
            except BaseException as exc:  # (what reaches the thread is the point)
                outcome[i] = exc

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(followers + 1)]
        for thread in threads:
            thread.start()
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            while seen.followers() < followers:  # noqa: ASYNC110 - a count in other threads
                await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(client.close)
        head.set()
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join)
    errors = list(outcome.values())
    assert len(errors) == followers + 1
    for error in errors:  # (the producer's: whatever its closed connection pool raised)
        assert isinstance(error, Exception), error
    closed = [
        e
        for e in errors
        if isinstance(e, httpx2.ReadError) and "CacheTransport was closed" in str(e)
    ]
    assert len(closed) >= followers, errors  # the followers, and maybe the producer


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_closing_a_sync_transport_ends_the_streams_read_in_other_threads_as_transport_errors(
    serve: Any, tmp_path: Path, anyio_backend: str
) -> None:
    # A worker shuts its client down (``client.close()``) while other threads still read
    # streams through it: a producer and a follower of its live stream. Each gets the HTTP
    # library's own error for a connection closed under it (the SDK's APIConnectionError),
    # not the portal's bare "RuntimeError: This portal is not running"; nothing of the cut
    # answer is stored.
    from sse_cache.testing import GatedUpstream, responses_stream

    events = responses_stream("closed under its readers", text_deltas=5)
    gated = GatedUpstream(events, hold_after=1)
    cache = f"sqlite:///{tmp_path / 'closed.db'}"
    async with serve(gated) as url:
        transport = CacheTransport(cache)
        client = OpenAI(
            api_key="sk-closed",
            base_url=url + "/v1",
            http_client=httpx2.Client(transport=transport),
            max_retries=0,
        )
        arrived = {"producer": threading.Event(), "follower": threading.Event()}
        outcome: dict[str, Any] = {}

        def read(name: str) -> None:
            try:
                with client.responses.create(model=MODEL, input="closed", stream=True) as stream:
                    outcome[name + " status"] = stream.response.headers["x-sse-cache"]
                    for _ in stream:
                        arrived[name].set()
                outcome[name] = "ended"
            except Exception as exc:
                outcome[name] = exc
            finally:
                arrived[name].set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, read, "producer")
            await anyio.to_thread.run_sync(arrived["producer"].wait)
            tg.start_soon(anyio.to_thread.run_sync, read, "follower")
            await anyio.to_thread.run_sync(arrived["follower"].wait)
            await anyio.to_thread.run_sync(client.close)
            gated.gate.set()
        for name, status in (("producer", "miss"), ("follower", "shared")):
            assert outcome[name + " status"] == status
            error = outcome[name]
            assert isinstance(error, openai.APIConnectionError), (name, error)
            assert isinstance(error.__cause__, httpx2.TransportError), (name, error.__cause__)
        follower_error = outcome["follower"].__cause__
        assert isinstance(follower_error, httpx2.ReadError)
        assert "CacheTransport was closed while this response was read" in str(follower_error)

        # Nothing of the cut answer was stored: the next client asks the upstream again.
        def ask_again() -> httpx2.Response:
            with httpx2.Client(transport=CacheTransport(cache), base_url=url) as again:
                return again.post(
                    "/v1/responses",
                    json={"model": MODEL, "input": "closed", "stream": True},
                    headers={"authorization": "Bearer sk-closed"},
                )

        answer = await anyio.to_thread.run_sync(ask_again)
        assert answer.headers["x-sse-cache"] == "miss"
        assert gated.calls == 2


# -- an async follower of a producer whose upstream is cut ------------------------------------


@pytest.mark.anyio
@pytest.mark.filterwarnings(_ABANDONED)
@pytest.mark.parametrize("client_kind", ["httpx2", "openai"])
async def test_an_async_follower_of_a_cut_stream_gets_an_error_never_a_clean_end(
    upstream: Upstream, cache_url: str, prompt: str, client_kind: str
) -> None:
    # The async twin of the sync producer's torn-answer test: the producer's upstream drops
    # the connection mid-answer while a follower reads the same live stream. The follower
    # must see the failure as its HTTP library's error for a response cut short (the SDK's
    # APIConnectionError), as reading the upstream itself would: a clean end would hand it a
    # truncated answer as if it were whole. Nothing of it is stored.
    body = {"model": MODEL, "input": prompt, "stream": True}
    cut = {
        "authorization": "Bearer sk-test-a",
        "x-mock-delay-ms": "1",
        "x-mock-error": "cut",
        "x-mock-error-after": "6",
    }
    transport = AsyncCacheTransport(cache_url)
    async with httpx2.AsyncClient(transport=transport, base_url=upstream.url) as client:
        sdk = AsyncOpenAI(
            base_url=f"{upstream.url}/v1", api_key="sk-test-a", max_retries=0, http_client=client
        )

        async def open_stream() -> tuple[str, Any]:
            if client_kind == "httpx2":
                request = client.build_request("POST", "/v1/responses", json=body, headers=cut)
                response = await client.send(request, stream=True)
                return response.headers["x-sse-cache"], response
            raw = await sdk.responses.with_raw_response.create(
                model=MODEL, input=prompt, stream=True, extra_headers=cut
            )
            return raw.headers["x-sse-cache"], raw.parse()

        def items(stream: Any) -> Any:
            return stream.aiter_raw() if client_kind == "httpx2" else stream.__aiter__()

        failure = (
            httpx2.RemoteProtocolError if client_kind == "httpx2" else openai.APIConnectionError
        )

        status, producer = await open_stream()
        assert status == "miss"
        produced = items(producer)
        received = [await produced.__anext__()]
        # The producer streams: the follower joins now (one task: no race on who is first).
        status, follower = await open_stream()
        assert status == "shared"
        with pytest.raises(failure):
            async for item in produced:
                received.append(item)
        got = []
        with pytest.raises(failure) as raised:
            async for item in items(follower):
                got.append(item)
        await producer.aclose()
        await follower.aclose()
        if client_kind == "httpx2":
            assert b"".join(got) == b"".join(received)  # every byte up to the cut, then the error
            assert "sse-cache" in str(raised.value)
        else:
            assert _dump(got) == _dump(received)
            assert isinstance(raised.value.__cause__, httpx2.RemoteProtocolError)
        # The cut answer was not stored: the same request, not cut, asks the upstream again.
        headers = {"authorization": "Bearer sk-test-a"}
        again = await client.post("/v1/responses", json=body, headers=headers)
        assert again.headers["x-sse-cache"] == "miss"
    gc.collect()


# -- an async client that closes right after chat's terminal event -----------------------------


@pytest.mark.anyio
@pytest.mark.filterwarnings(_ABANDONED)
async def test_an_async_client_closing_right_after_done_still_has_the_answer_stored(
    upstream: Upstream, cache_url: str, prompt: str
) -> None:
    # A client that stops at chat's `data: [DONE]` and closes the response without reading
    # the body's end (the openai SDK does so over HTTP/2): the chunk with `[DONE]` reached
    # the client but is recorded only when the next one is asked for, which never happens.
    # Closing must record it, so the complete answer is stored and replayed byte for byte.
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = {"authorization": "Bearer sk-test-a"}
    url = "/v1/chat/completions"
    transport = AsyncCacheTransport(cache_url)
    async with httpx2.AsyncClient(transport=transport, base_url=upstream.url) as client:
        before = upstream.count(CHAT)
        received = b""
        async with client.stream("POST", url, json=body, headers=headers) as first:
            assert first.headers["x-sse-cache"] == "miss"
            async for chunk in first.aiter_raw():
                received += chunk
                if received.endswith(b"data: [DONE]\n\n"):
                    break
        assert received.endswith(b"data: [DONE]\n\n")
        again = await client.post(url, json=body, headers=headers)
        assert again.headers["x-sse-cache"] == "hit"
        assert again.content == received
        assert upstream.count(CHAT) == before + 1
    gc.collect()


# -- a producer whose client stops reading, without closing its response ----------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize(
    ("stopped", "then"),
    [
        ("at the answer", "reads on"),
        ("at the answer", "closes"),
        ("mid-answer", "reads on"),
        ("mid-answer", "closes"),
        ("mid-answer", "reads on alone"),
    ],
)
@pytest.mark.filterwarnings(_ABANDONED)
async def test_followers_take_over_from_a_producer_that_stopped_reading(
    serve: Any, anyio_backend: str, stopped: str, then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # google-genai stops a stream (at its finishReason chunk, or on an error chunk) without
    # closing the response, and keeps it until a collection finds it: the followers, which
    # held the whole answer, waited out their read timeout, and so did every identical
    # request after them, for minutes (helper-115). A follower that waited a while
    # (STALL_LOOK) for a producer that asked for nothing takes the upstream over: the
    # followers read on, the answer is stored. The producer, if it reads again, gets
    # exactly the upstream's answer: past a stored answer, the rest of the upstream's body
    # as it comes; mid-answer, from where it was in the live stream. ("reads on alone": its
    # followers left before the end; the last of them closed the upstream — the producer's
    # place does not keep a stream no one may ever read, a dropped response's upstream
    # open — and the producer reading again gets an error, never a clean end of part.)
    import sse_cache.flight
    from sse_cache.testing import GatedUpstream

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 0.05)
    whole = b"".join(_CHAT_PIECES)
    gated = GatedUpstream(
        _CHAT_PIECES, hold_after=len(_CHAT_PIECES) if stopped == "at the answer" else 1
    )
    seen = FlightsSeen()
    followers = 1 if then == "reads on alone" else 2
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://", hooks=[seen])
        headers = {"authorization": "Bearer sk-stopped"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            response = await client.send(request, stream=True)
            assert response.headers["x-sse-cache"] == "miss"
            produced = response.aiter_raw()
            received = await produced.__anext__()
            while stopped == "at the answer" and not received.endswith(b"data: [DONE]\n\n"):
                received += await produced.__anext__()
            # The producer asks for nothing more from here on (until told otherwise).
            answers: list[tuple[str, bytes]] = []

            async def follow() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    if then == "reads on alone":
                        got = b""
                        with leaves:  # (cancelled once the upstream was taken over)
                            async for chunk in r.aiter_raw():
                                got += chunk
                        answers.append((r.headers["x-sse-cache"], got))
                    else:
                        answers.append((r.headers["x-sse-cache"], await r.aread()))

            leaves = anyio.CancelScope()
            async with anyio.create_task_group() as tg:
                for _ in range(followers):
                    tg.start_soon(follow)
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    while seen.followers() < followers:  # noqa: ASYNC110 - a count in the cache
                        await anyio.sleep(0.01)
                    if then == "reads on alone":
                        while not seen.taken_over():  # noqa: ASYNC110 - a state in the cache
                            await anyio.sleep(0.01)
                        leaves.cancel()  # the follower's client leaves mid-answer
                if stopped == "mid-answer" and then != "reads on alone":
                    gated.gate.set()
            if then == "reads on alone":
                assert answers == [("shared", received)]
                gated.gate.set()
            else:
                assert answers == [("shared", whole)] * followers
                again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
                assert again.headers["x-sse-cache"] == "hit" and again.content == whole
            if then == "closes":
                await response.aclose()
            else:
                # Its reads on pass the upstream's body on as it comes (at the answer: past
                # it, the body's end, which the upstream holds till now), or read on from
                # the live stream (mid-answer).
                gated.gate.set()
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    if then == "reads on alone":
                        with pytest.raises(httpx2.RemoteProtocolError, match="sse-cache"):
                            async for chunk in produced:
                                received += chunk
                        assert whole.startswith(received) and received != whole
                        return
                    async for chunk in produced:
                        received += chunk
                assert received == whole
                again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
                assert again.headers["x-sse-cache"] == "hit" and again.content == whole
        gated.gate.set()
    assert gated.calls == 1


# -- a miss whose program drops it, unclosed ----------------------------------------------------


_DROPPED = [
    # (how the program drops it, what it had read, the cache, its followers)
    *[
        (dropped, answer, backend, 2)
        for dropped in ("with its generator, finalized first", "with its generator, finalized last")
        for answer in ("whole", "part")
        for backend in ("memory", "sqlite")
    ],
    *[
        (dropped, "part", "memory", followers)
        for dropped in ("in a cycle", "at once")
        for followers in (0, 2)
    ],
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize(("dropped", "answer", "backend", "followers"), _DROPPED)
@pytest.mark.filterwarnings(_ABANDONED)
async def test_a_miss_dropped_unclosed_goes_on_as_if_its_program_had_closed_it(
    serve: Any,
    anyio_backend: str,
    dropped: str,
    answer: str,
    backend: str,
    followers: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A program drops a streamed miss without closing it (``break`` out of an SDK stream
    # outside ``async with``), having read its whole answer or part of it; it is collected
    # at once, or by a collection. Its followers read the upstream on and get the whole
    # answer, stored once — also mid-answer (the upstream was collected with the response,
    # and the followers failed: helper-116's D11), never a clean end of part of it; with no
    # follower, the upstream is closed and nothing is stored: the next request is a miss.
    # google-genai reads a stream in a generator of its own whose ``finally`` closes the
    # response, and drops both in reference cycles: when the collector finds them, the loop
    # closes that generator and the transport's own watch of the response, in two tasks at
    # once. Both left the exchange: with the transport's first, on memory:// the followers
    # of a whole answer failed and nothing was stored; on SQLite asyncio logged "anext():
    # asynchronous generator is already running" (helper-115). Which finalizer runs first:
    # the collector finalizes the older objects first, and a collection now makes what
    # exists already older than what comes after. No look at a stalled producer rescues
    # the followers here (STALL_LOOK): the collection alone does.
    import asyncio

    import sse_cache.flight
    from sse_cache.testing import GatedUpstream

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 3600.0)
    whole = b"".join(_CHAT_PIECES)
    gated = GatedUpstream(_CHAT_PIECES, hold_after=len(_CHAT_PIECES) if answer == "whole" else 1)
    url_of_cache = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'c.db'}"
    seen = FlightsSeen()
    logged: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context))
    async with serve(gated) as url:
        transport = AsyncCacheTransport(url_of_cache, hooks=[seen])
        headers = {"authorization": "Bearer sk-dropped"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:

            async def program() -> AsyncIterator[bytes]:
                response = yield b""  # (the response to read, sent in)
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()

            stream = program() if dropped.startswith("with its generator") else None
            if dropped.endswith("finalized first"):
                assert stream is not None
                await stream.__anext__()
                gc.collect()
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            response = await client.send(request, stream=True)
            assert response.headers["x-sse-cache"] == "miss"
            if dropped.endswith("finalized last"):
                assert stream is not None
                gc.collect()
                await stream.__anext__()
            chunks = response.aiter_raw() if stream is None else stream
            received = await (chunks.__anext__() if stream is None else stream.asend(response))
            while answer == "whole" and not received.endswith(b"data: [DONE]\n\n"):
                received += await chunks.__anext__()
            assert whole.startswith(received)
            outcomes: list[bytes] = []

            async def follow() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    assert r.headers["x-sse-cache"] == "shared"
                    outcomes.append(await r.aread())

            async with anyio.create_task_group() as tg:
                for _ in range(followers):
                    tg.start_soon(follow)
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    while seen.followers() < followers:  # noqa: ASYNC110 - a count in the cache
                        await anyio.sleep(0.01)
                if dropped != "at once":
                    cycle: list[Any] = [chunks, response]
                    cycle.append(cycle)
                    del cycle
                del chunks, stream, response, request
                gc.collect()
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    # (With no follower: until the stream was left, not offered any more.)
                    while followers == 0 and seen.live():  # noqa: ASYNC110 - a state
                        await anyio.sleep(0.01)
                gated.gate.set()
            assert outcomes == [whole] * followers
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
            assert again.content == whole
            assert again.headers["x-sse-cache"] == ("hit" if followers else "miss")
            assert gated.calls == (1 if followers else 2)
    gc.collect()
    # (httpcore's own finalizers may race each other over the connection the program left
    # open — an error logged from its frames alone, as without the cache.)
    ours = [c for c in logged if "sse_cache" in "".join(_traceback_of(c.get("exception")))]
    assert ours == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_a_closed_miss_lets_go_of_its_body_without_a_collection(
    serve: Any, anyio_backend: str
) -> None:
    # A miss read to its end and closed frees its body (its recording, its exchange, its
    # upstream's stream) at once: the watch of the client's side held it in a cycle, and
    # every miss's body waited for the next collection (helper-121: 20 misses of 75 KB
    # held 3.9 MB with the collector off).
    import weakref

    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES)
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://")
        headers = {"authorization": "Bearer sk-freed"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:
            bodies: list[weakref.ref[Any]] = []
            gc.collect()
            gc.disable()
            try:
                for n in range(3):
                    body = {**_CHAT_BODY, "messages": [{"role": "user", "content": f"hi {n}"}]}
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        assert r.headers["x-sse-cache"] == "miss"
                        bodies.append(weakref.ref(r.stream._stream._body))  # type: ignore[attr-defined]
                        assert await r.aread() == b"".join(_CHAT_PIECES)
                    del r
                assert [ref() for ref in bodies] == [None] * 3
            finally:
                gc.enable()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize("lib", ["httpx", "httpx2"])
@pytest.mark.parametrize("read", ["part", "nothing"])
async def test_a_follower_dropped_unclosed_as_the_last_reader_leaves_quietly(
    serve: Any, anyio_backend: str, lib: str, read: str
) -> None:
    # A program drops a follower's response, unclosed, in a reference cycle (httpx's async
    # responses always are in one) after the producer's client closed: the follower was the
    # last reader, and leaving abandons the upstream. The answer's iterators, collected
    # together, were async generators, each closed by the loop in a task of its own at once:
    # the second found the first closing it and asyncio logged "aclose(): asynchronous
    # generator is already running" (helper-121). The upstream is closed, nothing is
    # stored (the next request is a miss), and nothing is logged.
    import asyncio

    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=1)
    seen = FlightsSeen()
    logged: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context))
    transports = {"httpx": sse_cache.httpx.AsyncCacheTransport, "httpx2": AsyncCacheTransport}
    clients = {"httpx": httpx.AsyncClient, "httpx2": httpx2.AsyncClient}
    async with serve(gated) as url:
        transport = transports[lib]("memory://", hooks=[seen])
        headers = {"authorization": "Bearer sk-follower-dropped"}
        async with clients[lib](transport=transport, base_url=url, headers=headers) as client:
            produced = await client.send(
                client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY), stream=True
            )
            assert produced.headers["x-sse-cache"] == "miss"
            assert await produced.aiter_raw().__anext__() == _CHAT_PIECES[0]
            followed = await client.send(
                client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY), stream=True
            )
            assert followed.headers["x-sse-cache"] == "shared"
            chunks = followed.aiter_raw()
            if read == "part":
                assert await chunks.__anext__() == _CHAT_PIECES[0]
            await produced.aclose()  # (the follower reads the upstream on now)
            cycle: list[Any] = [chunks, followed]
            cycle.append(cycle)
            del cycle, chunks, followed
            gc.collect()
            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                while seen.live() or gated.disconnects == 0:  # noqa: ASYNC110 - a state
                    await anyio.sleep(0.01)
            gated.gate.set()
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
            assert again.headers["x-sse-cache"] == "miss"
            assert again.content == b"".join(_CHAT_PIECES)
    gc.collect()
    assert gated.calls == 2
    ours = [c for c in logged if "sse_cache" in "".join(_traceback_of(c.get("exception")))]
    assert ours == []


def _traceback_of(exc: BaseException | None) -> list[str]:
    import traceback

    return [] if exc is None else traceback.format_exception(exc)


# -- a miss whose read is cancelled, or cut after its completing event -------------------------


def _chat_chunk(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


_CHAT_PIECES = [_chat_chunk("Hel"), _chat_chunk("lo"), _chat_chunk("", "stop"), b"data: [DONE]\n\n"]
_CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize(("followers", "followed_read"), [(0, False), (3, False), (3, True)])
async def test_a_miss_whose_read_is_cancelled_after_done_is_stored_and_ends_its_followers(
    serve: Any, anyio_backend: str, followers: int, followed_read: bool
) -> None:
    # The openai SDK drains a chat stream's body after `data: [DONE]` for 0.1 s at most
    # (over HTTP/1.1), by cancelling its read: an upstream slower than that to end its body
    # had the complete answer treated as an upstream failure — not stored, and every
    # follower of the stream aborted. The read is cancelled here while the upstream holds
    # its body's end back, the followers having joined — before that read began
    # (``followed_read``: then it runs in a task of its own, which a cancelled read mid-answer
    # hands over; after the completing event it must not: the followers would wait for the
    # body's end — helper-66, 10 of 10 timed out — instead of ending at once).
    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=len(_CHAT_PIECES))
    seen = FlightsSeen()
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://", hooks=[seen])
        headers = {"authorization": "Bearer sk-cancel"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:
            done, read_on = anyio.Event(), anyio.Event()
            answers: list[tuple[str, bytes]] = []

            async def produce(scope: anyio.CancelScope) -> None:
                with scope:
                    async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                        assert r.headers["x-sse-cache"] == "miss"
                        received = b""
                        async for chunk in r.aiter_raw():
                            received += chunk
                            if received.endswith(b"data: [DONE]\n\n"):
                                done.set()  # and read on, for the body's end
                                if followed_read:
                                    await read_on.wait()
                assert scope.cancelled_caught

            async def follow() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    answers.append((r.headers["x-sse-cache"], await r.aread()))

            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()
                tg.start_soon(produce, scope)
                await done.wait()
                for _ in range(followers):
                    tg.start_soon(follow)
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    while seen.followers() < followers:  # noqa: ASYNC110 - a count in the cache
                        await anyio.sleep(0.01)
                read_on.set()
                await anyio.wait_all_tasks_blocked()  # (the producer reads on)
                scope.cancel()
                with anyio.fail_after(30):  # a deadlock guard: the body's end is held
                    while len(answers) < followers:  # noqa: ASYNC110 - the followers' answers
                        await anyio.sleep(0.01)
            whole = b"".join(_CHAT_PIECES)
            assert answers == [("shared", whole)] * followers
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == whole
        gated.gate.set()
    assert gated.calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize("answer", ["whole", "no finish_reason"])
async def test_a_producer_closing_after_done_ends_its_followers_with_the_answer(
    serve: Any, anyio_backend: str, answer: str
) -> None:
    # The usual client stops at the completing event (`break` after chat's `[DONE]`) and
    # closes the response while the upstream has not ended its body. The answer is complete:
    # it is stored and the followers' streams end now, with it — handed the upstream over,
    # they waited for the body's end (helper-67: 140 of 140 waited out the upstream's hold),
    # as a cancelled read after that event already does not. Unless the stream is no answer
    # (``"no finish_reason"``: an upstream cut that still sent [DONE], not stored): then
    # its followers still get every byte the upstream sends and a clean end — not an error
    # because the answer they would have ended with does not exist (helper-69).
    from sse_cache.testing import GatedUpstream

    whole = answer == "whole"
    pieces = _CHAT_PIECES if whole else [_chat_chunk("Hel"), _chat_chunk("lo"), _CHAT_PIECES[-1]]
    gated = GatedUpstream(pieces, hold_after=len(pieces))  # complete, its end held back
    seen = FlightsSeen()
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://", hooks=[seen])
        headers = {"authorization": f"Bearer sk-close-after-done-{whole}"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:
            answers: list[tuple[str, bytes]] = []

            async def follow() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    answers.append((r.headers["x-sse-cache"], await r.aread()))

            async with anyio.create_task_group() as tg:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    assert r.headers["x-sse-cache"] == "miss"
                    received = b""
                    async for chunk in r.aiter_raw():
                        received += chunk
                        if received.endswith(b"data: [DONE]\n\n"):
                            break
                        if not seen.followers():
                            for _ in range(3):  # joined mid-answer
                                tg.start_soon(follow)
                            with anyio.fail_after(30):  # a deadlock guard
                                while seen.followers() < 3:  # noqa: ASYNC110 - a count in the cache
                                    await anyio.sleep(0.01)
                if whole:
                    with anyio.fail_after(30):  # a deadlock guard: the body's end is held
                        while len(answers) < 3:  # noqa: ASYNC110 - the followers' answers
                            await anyio.sleep(0.01)
                gated.gate.set()  # the upstream ends its body
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
    assert answers == [("shared", b"".join(pieces))] * 3
    assert again.headers["x-sse-cache"] == ("hit" if whole else "miss")
    assert gated.calls == (1 if whole else 2)


class _DoneLater:
    """A chat upstream that sends its answer up to the finish_reason chunk, then ``[DONE]``
    once :attr:`done` is set (followed in the same piece by ``after``), then ends its body
    once :attr:`end` is set."""

    def __init__(self, after: bytes = b"") -> None:
        self.after = after
        self.done, self.end = anyio.Event(), anyio.Event()
        self.calls = self.disconnects = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for piece in _CHAT_PIECES[:-1]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await self.done.wait()
        last = _CHAT_PIECES[-1] + self.after
        await send({"type": "http.response.body", "body": last, "more_body": True})
        with anyio.CancelScope() as scope_:
            async with anyio.create_task_group() as tg:

                async def gone() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.disconnects += 1
                    scope_.cancel()

                tg.start_soon(gone)
                await self.end.wait()
                await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("after", [b"", b": keep-alive\n\n: keep-al", b'data: {"x'])
@pytest.mark.parametrize("stop_at", ["finish", "done"])
async def test_followers_read_on_end_with_the_completing_event_not_the_body(
    serve: Any, anyio_backend: str, sync: bool, after: bytes, stop_at: str
) -> None:
    # The producer's client stops at the finish_reason chunk (an SDK user breaking there),
    # before `[DONE]` arrived: the followers read on. `[DONE]` completes the answer: their
    # streams end with it, stored, and the upstream is closed — not when the upstream ends
    # its body, which here it does not (helper-69: they ended only then, 3 s later). What
    # came after it in the same piece (``after``) is no part of the answer: the followers
    # got it, and the entry did not hold it (helper-105). Or the client reads on to `[DONE]`
    # and stops there (``stop_at="done"``, as the SDKs do), the followers having joined
    # before it came: the same (helper-111: they got ``after``, which no hit replays).
    upstream = _DoneLater(after)
    seen = FlightsSeen()
    whole = b"".join(_CHAT_PIECES)
    headers = {"authorization": f"Bearer sk-done-later-{sync}-{len(after)}"}
    answers: list[tuple[str, bytes]] = []
    async with serve(upstream) as url:
        if sync:
            sync_client = httpx2.Client(
                transport=CacheTransport("memory://", hooks=[seen]), base_url=url, timeout=30
            )

            def post() -> httpx2.Response:
                return sync_client.post("/v1/chat/completions", json=_CHAT_BODY, headers=headers)

            async def follow() -> None:
                r = await anyio.to_thread.run_sync(post)
                answers.append((r.headers["x-sse-cache"], r.content))

            def stop_at_finish() -> None:
                with sync_client.stream(
                    "POST", "/v1/chat/completions", json=_CHAT_BODY, headers=headers
                ) as r:
                    received = b""
                    for chunk in r.iter_raw():
                        received += chunk
                        if received.endswith(_CHAT_PIECES[2]):
                            anyio.from_thread.run(joined)
                            if stop_at == "finish":
                                break
                        elif b"data: [DONE]\n\n" in received:
                            break

            async def produce() -> None:
                await anyio.to_thread.run_sync(stop_at_finish)

        else:
            transport = AsyncCacheTransport("memory://", hooks=[seen])
            client = httpx2.AsyncClient(transport=transport, base_url=url, headers=headers)

            async def follow() -> None:
                r = await client.post("/v1/chat/completions", json=_CHAT_BODY)
                answers.append((r.headers["x-sse-cache"], r.content))

            async def produce() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    received = b""
                    async for chunk in r.aiter_raw():
                        received += chunk
                        if received.endswith(_CHAT_PIECES[2]):
                            await joined()
                            if stop_at == "finish":
                                break
                        elif b"data: [DONE]\n\n" in received:
                            break

        try:
            async with anyio.create_task_group() as tg:

                async def joined() -> None:
                    for _ in range(3):
                        tg.start_soon(follow)
                    with anyio.fail_after(30):  # a deadlock guard
                        while seen.followers() < 3:  # noqa: ASYNC110 - a count in the cache
                            await anyio.sleep(0.01)
                    if stop_at == "done":
                        upstream.done.set()  # the client reads on to it

                await produce()  # its client left at the finish_reason chunk, or [DONE]
                upstream.done.set()
                with anyio.fail_after(30):  # a deadlock guard: the body's end never comes
                    while len(answers) < 3:  # noqa: ASYNC110 - the followers' answers
                        await anyio.sleep(0.01)
                    while not upstream.disconnects:  # noqa: ASYNC110 - the upstream's count
                        await anyio.sleep(0.01)
            await follow()  # stored: a hit
        finally:
            upstream.end.set()
            if sync:
                await anyio.to_thread.run_sync(sync_client.close)
            else:
                await client.aclose()
    assert answers == [("shared", whole)] * 3 + [("hit", whole)]
    assert upstream.calls == 1


@asynccontextmanager
async def _gated_chat(
    serve: Any, token: str, **options: Any
) -> AsyncIterator[tuple[httpx2.AsyncClient, Any, FlightsSeen]]:
    """A client (credential ``token``) of an :class:`AsyncCacheTransport` on ``memory://``
    with ``options``, in front of a chat upstream that holds its answer after the second
    piece until ``gated.gate`` is set; ``seen`` counts the followers."""
    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=2)
    seen = FlightsSeen()
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://", hooks=[seen], **options)
        headers = {"authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:
            yield client, gated, seen


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_miss_whose_read_is_cancelled_before_its_completing_event_fails_its_followers(
    serve: Any, anyio_backend: str
) -> None:
    # The other side of the test above: cancelled mid-answer, in a read begun before anyone
    # followed the stream (the producer's own read, in its own task), the upstream is closed
    # for good by the HTTP library. A follower must see an error, never a clean end of part
    # of the answer, and nothing is stored.
    async with _gated_chat(serve, "sk-cancel") as (client, gated, seen):
        started = anyio.Event()
        outcome: list[BaseException] = []

        async def produce(scope: anyio.CancelScope) -> None:
            with scope:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    async for _ in r.aiter_raw():
                        started.set()

        async def follow() -> None:
            try:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    await r.aread()
            except httpx2.HTTPError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(produce, scope)
            await started.wait()
            tg.start_soon(follow)
            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                while seen.followers() < 1:  # noqa: ASYNC110 - a count in the cache
                    await anyio.sleep(0.01)
            scope.cancel()
        assert len(outcome) == 1 and isinstance(outcome[0], httpx2.RemoteProtocolError)
        gated.gate.set()
        again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
        assert again.headers["x-sse-cache"] == "miss"
    assert gated.calls == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("window", "follower_leaves"), [(None, False), (30.0, False), (None, True)]
)
async def test_a_followed_miss_whose_read_is_cancelled_midway_hands_the_upstream_over(
    serve: Any, anyio_backend: str, window: float | None, follower_leaves: bool
) -> None:
    # A gateway cancels the producer's read mid-answer (its client went away, a timeout
    # around the read) while another request follows the stream. The read, begun once the
    # stream was followed, runs in a task of its own: the follower reads the upstream on to
    # its end and gets the whole answer, which is stored (it used to be aborted with the
    # producer: the HTTP library closes the upstream under a cancelled read). The same with
    # a resume window. If the follower leaves too, with that read still running, the
    # upstream is closed and nothing is stored.
    async with _gated_chat(serve, "sk-cancel-followed", resume_window=window) as (
        client,
        gated,
        seen,
    ):
        reading = anyio.Event()
        answers: list[tuple[str, bytes]] = []

        async def produce(scope: anyio.CancelScope) -> None:
            with scope:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    chunks = r.aiter_raw()
                    await chunks.__anext__()
                    with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                        while seen.followers() < 1:  # noqa: ASYNC110 - a count in the cache
                            await anyio.sleep(0.01)
                    reading.set()
                    async for _ in chunks:  # held at the gate, until cancelled
                        pass
            assert scope.cancelled_caught

        async def follow(scope: anyio.CancelScope) -> None:
            with scope:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    answers.append((r.headers["x-sse-cache"], await r.aread()))

        async with anyio.create_task_group() as tg:
            producer, follower = anyio.CancelScope(), anyio.CancelScope()
            tg.start_soon(produce, producer)
            tg.start_soon(follow, follower)
            await reading.wait()
            await gated.wait_sent(2)
            producer.cancel()
            await anyio.wait_all_tasks_blocked()
            if follower_leaves:
                follower.cancel()
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    while gated.disconnects < 1:  # noqa: ASYNC110 - the upstream's count
                        await anyio.sleep(0.01)
            gated.gate.set()
        whole = b"".join(_CHAT_PIECES)
        again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
        if follower_leaves:
            assert answers == [] and again.headers["x-sse-cache"] == "miss"
        else:
            assert answers == [("shared", whole)]
            assert again.headers["x-sse-cache"] == "hit" and again.content == whole
    assert gated.calls == 1 + follower_leaves


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("cancelled", [0, 1])
async def test_a_follower_cancelled_by_asyncio_while_it_pulls_does_not_abort_the_others(
    serve: Any, anyio_backend: str, cancelled: int
) -> None:
    # The producer's client leaves early; two followers read the upstream on, in turn. One
    # of them is cancelled by asyncio itself (``task.cancel()``, as ``asyncio.timeout``
    # does) while the upstream holds its next piece: whichever was pulling must finish that
    # pull for the other, who gets the whole answer, stored (helper-67: the other was
    # aborted in 10 of 10 trials — anyio's shield does not stop asyncio's cancellation).
    # Each follower is cancelled in one of the cases: one of them is the one pulling.
    import asyncio

    async with _gated_chat(serve, "sk-cancel-asyncio") as (client, gated, _):
        producer = await client.send(
            client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY),
            stream=True,
        )
        assert producer.headers["x-sse-cache"] == "miss"
        followers = [
            await client.send(
                client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY),
                stream=True,
            )
            for _ in range(2)
        ]
        assert [f.headers["x-sse-cache"] for f in followers] == ["shared", "shared"]
        reads = [asyncio.ensure_future(f.aread()) for f in followers]
        await gated.wait_sent(2)
        await producer.aclose()  # the followers read the upstream on, in turn
        await anyio.wait_all_tasks_blocked()
        reads[cancelled].cancel()
        gated.gate.set()
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            whole = await reads[1 - cancelled]
            with pytest.raises(asyncio.CancelledError):
                await reads[cancelled]
        for follower in followers:
            await follower.aclose()
        again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
    assert whole == b"".join(_CHAT_PIECES)
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole
    assert gated.calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("window", [None, 30])
async def test_closing_the_transport_under_a_pulling_follower_fails_it_with_an_http_error(
    anyio_backend: str, window: float | None
) -> None:
    # The producer's client left: its follower reads the upstream on, held at its gate, and
    # the program closes its client. The stream ends failed (the transport's close ends what
    # it reads on for others), and the follower's read raises the library's error. On
    # asyncio it raised a CancelledError no one asked of it (helper-144), which an
    # asyncio.TaskGroup takes for a cancelled child, ending quietly on part of the answer;
    # on trio the close itself raised ("asynchronous generator is already running"), the
    # wrapped transport left open (helper-145).
    server = Upstream(_OpenableGate(_CHAT_PIECES, hold_after=2))
    server.start()
    seen = FlightsSeen()
    options = {} if window is None else {"resume_window": window}
    transport = AsyncCacheTransport("memory://", hooks=[seen], **options)
    headers = {"authorization": f"Bearer sk-close-under-a-pull-{anyio_backend}"}
    outcome: dict[str, Any] = {}
    try:
        client = httpx2.AsyncClient(
            transport=transport, base_url=server.url, headers=headers, timeout=30
        )
        producer, follower = await _miss_and_follower(client)
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            async with anyio.create_task_group() as tg:
                tg.start_soon(_aread_into, outcome, "follower", follower)
                await producer.aclose()  # the follower reads the upstream on
                while not any(live.pulling for live in seen.live()):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                await client.aclose()
        assert isinstance(outcome["follower"], httpx2.HTTPError), outcome
    finally:
        await _open_gate(server)
        server.stop()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["task.cancel", "anyio"])
async def test_a_follower_joining_a_pull_begun_alone_survives_the_puller_leaving(
    serve: Any, anyio_backend: str, how: str
) -> None:
    # The producer's client leaves: follower A reads the upstream on, alone, and waits in
    # that pull while the upstream holds its next piece. B joins then. A is cancelled: the
    # pull, begun alone, must go on for B, who gets the whole answer (helper-70: B was
    # aborted every time, "the read of the upstream was cancelled").
    import asyncio

    async with _gated_chat(serve, "sk-join-a-lone-pull") as (client, gated, _):

        async def send() -> httpx2.Response:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            return await client.send(request, stream=True)

        producer = await send()
        a = await send()
        assert [producer.headers["x-sse-cache"], a.headers["x-sse-cache"]] == [
            "miss",
            "shared",
        ]
        async with anyio.create_task_group() as tg:
            a_scope = anyio.CancelScope()

            async def read_a() -> None:
                with a_scope:
                    await a.aread()

            a_reading = asyncio.ensure_future(read_a())
            await gated.wait_sent(2)
            await producer.aclose()  # A reads on, alone, held at the upstream's gate
            await anyio.wait_all_tasks_blocked()
            b = await send()
            assert b.headers["x-sse-cache"] == "shared"
            b_answer: list[bytes] = []

            async def read_b() -> None:
                b_answer.append(await b.aread())

            tg.start_soon(read_b)
            await anyio.wait_all_tasks_blocked()
            if how == "anyio":
                a_scope.cancel()
                await a_reading
            else:
                a_reading.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await a_reading
            gated.gate.set()
        for response in (a, b):
            await response.aclose()
        again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
    assert b_answer == [b"".join(_CHAT_PIECES)]
    assert again.headers["x-sse-cache"] == "hit" and again.content == b_answer[0]
    assert gated.calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("sync", [False, True])
async def test_a_client_leaving_after_done_with_a_line_begun_after_it_has_the_answer_stored(
    serve: Any, anyio_backend: str, sync: bool
) -> None:
    # The chunk that brings `data: [DONE]` also brings the start of a keep-alive comment
    # whose end comes later; the client stops at [DONE] and closes. The answer is complete:
    # what follows its completing event is no part of it (the recording refused it as "ended
    # inside an event").
    from sse_cache.testing import GatedUpstream

    pieces = [*_CHAT_PIECES[:-1], b"data: [DONE]\n\n: keep", b"-alive\n\n"]
    gated = GatedUpstream(pieces, hold_after=len(pieces) - 1)
    headers = {"authorization": "Bearer sk-comment"}
    whole = b"".join(_CHAT_PIECES)

    def read_to_done(client: Any) -> bytes:
        received = b""
        with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
            assert r.headers["x-sse-cache"] == "miss"
            for chunk in r.iter_raw():
                received += chunk
                if b"data: [DONE]\n\n" in received:
                    break
        return received

    async with serve(gated) as url:
        if sync:
            with httpx2.Client(
                transport=CacheTransport("memory://"), base_url=url, headers=headers
            ) as client:
                received = await anyio.to_thread.run_sync(read_to_done, client)
                again = await anyio.to_thread.run_sync(
                    lambda: client.post("/v1/chat/completions", json=_CHAT_BODY)
                )
        else:
            transport = AsyncCacheTransport("memory://")
            async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as ac:
                received = b""
                async with ac.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    async for chunk in r.aiter_raw():
                        received += chunk
                        if b"data: [DONE]\n\n" in received:
                            break
                again = await ac.post("/v1/chat/completions", json=_CHAT_BODY)
        gated.gate.set()
    assert received.startswith(whole)
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole
    assert gated.calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_every_reader_leaving_after_done_has_the_answer_stored(
    serve: Any, anyio_backend: str
) -> None:
    # The producer's client and its followers each stop at chat's `data: [DONE]` and close
    # (as the SDKs do) while the upstream has not ended its body: the last to leave abandons
    # the upstream. What they all had is the complete answer: stored, as it is for a client
    # alone (it was "every reader left before the stream ended": nothing stored).
    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=len(_CHAT_PIECES))
    whole = b"".join(_CHAT_PIECES)
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://")
        headers = {"authorization": "Bearer sk-leave"}
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:

            async def read_to_done(response: Any) -> bytes:
                received = b""
                async for chunk in response.aiter_raw():
                    received += chunk
                    if received.endswith(b"data: [DONE]\n\n"):
                        break
                await response.aclose()
                return received

            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            producer = await client.send(request, stream=True)
            assert producer.headers["x-sse-cache"] == "miss"
            follower = await client.send(request, stream=True)
            assert follower.headers["x-sse-cache"] == "shared"
            assert await read_to_done(producer) == whole  # then hands its upstream over
            assert await read_to_done(follower) == whole  # the last reader leaves
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == whole
        gated.gate.set()
    assert gated.calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_a_sync_transport_closed_right_after_every_reader_left_stores_the_answer(
    serve: Any, anyio_backend: str, tmp_path: Path
) -> None:
    # Threads each read a shared chat stream up to `data: [DONE]` and close it (as the SDKs
    # do), and the program closes its client at once. The upstream's body has not ended:
    # a drain thread still reads it on for them, and closing the transport cut it. What
    # they all had is the complete answer: stored before the backend closes.
    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=len(_CHAT_PIECES))
    whole = b"".join(_CHAT_PIECES)
    cache = f"sqlite:///{tmp_path / 'closed.db'}"
    headers = {"authorization": "Bearer sk-close"}

    def read_to_done(response: Any) -> bytes:
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.endswith(b"data: [DONE]\n\n"):
                break
        response.close()
        return received

    def run(url: str) -> list[tuple[str, bytes]]:
        with httpx2.Client(
            transport=CacheTransport(cache), base_url=url, headers=headers
        ) as client:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            producer = client.send(request, stream=True)
            follower = client.send(request, stream=True)  # joins the producer's stream
            read = [read_to_done(producer), read_to_done(follower)]  # the last reader left
            statuses = [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]]
        # (closed: a new transport on the same file)
        with httpx2.Client(
            transport=CacheTransport(cache), base_url=url, headers=headers
        ) as client:
            again = client.post("/v1/chat/completions", json=_CHAT_BODY)
        return [*zip(statuses, read, strict=True), (again.headers["x-sse-cache"], again.content)]

    async with serve(gated) as url:
        outcome = await anyio.to_thread.run_sync(run, url)
        gated.gate.set()
    assert outcome == [("miss", whole), ("shared", whole), ("hit", whole)]
    assert gated.calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_a_crlf_answer_left_between_cr_and_lf_replays_in_crlf(
    serve: Any, anyio_backend: str
) -> None:
    # The chunk with `data: [DONE]` ends with the CR of its blank line's CRLF, and the
    # client leaves there. That CR is half of a CRLF: the stream was CRLF throughout, and a
    # hit replays it so, byte for byte (it was taken for a lone CR: mixed, replayed in LF).
    from sse_cache.testing import GatedUpstream

    whole = b"".join(_CHAT_PIECES).replace(b"\n", b"\r\n")
    pieces = [whole[:-1], whole[-1:]]  # ... "data: [DONE]\r\n\r" | "\n"
    gated = GatedUpstream(pieces, hold_after=1)
    headers = {"authorization": "Bearer sk-crlf"}
    async with serve(gated) as url:
        transport = AsyncCacheTransport("memory://")
        async with httpx2.AsyncClient(transport=transport, base_url=url, headers=headers) as client:
            received = b""
            async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                async for chunk in r.aiter_raw():
                    received += chunk
                    if received.endswith(b"data: [DONE]\r\n\r"):
                        break
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
        gated.gate.set()
    assert received == whole[:-1]
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole


def _read_into(outcome: dict[str, Any], name: str, response: Any) -> None:
    """Read a sync streamed ``response`` to its end: ``outcome[name]`` is its bytes, or the
    library's error that ended it."""
    got = b""
    try:
        for chunk in response.iter_raw():
            got += chunk
        outcome[name] = got
    except httpx2.HTTPError as exc:
        outcome[name] = exc


async def _aread_into(outcome: dict[str, Any], name: str, response: httpx2.Response) -> None:
    """:func:`_read_into` for an async response."""
    got = b""
    try:
        async for chunk in response.aiter_raw():
            got += chunk
        outcome[name] = got
    except httpx2.HTTPError as exc:
        outcome[name] = exc


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("followed", [True, False], ids=["followed", "alone"])
async def test_a_response_closed_by_another_task_while_it_is_read(
    serve: Any, anyio_backend: str, followed: bool
) -> None:
    # A "stop generation" handler closes a streamed response from another task while its
    # reader waits for the next chunk. Followed: the pending read's chunk went both to the
    # followers' puller and to the reader, which relayed it too, and a follower got an event
    # twice in an answer that ended cleanly (helper-91). Alone: close() raised the async
    # generator's RuntimeError, the reader got a clean end of part of the answer and the
    # upstream connection was never closed. Now, as without the cache: the reader gets the
    # library's ReadError, close() returns, the followers get exactly the upstream's bytes.
    async with _gated_chat(serve, f"sk-close-{followed}") as (client, gated, seen):
        joined = anyio.Event()
        producer_got: list[bytes] = []
        outcome: list[BaseException | str] = []
        follower_got: list[bytes] = []
        request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
        producer = await client.send(request, stream=True)
        assert producer.headers["x-sse-cache"] == "miss"

        async def read_producer() -> None:
            try:
                async for chunk in producer.aiter_raw():
                    producer_got.append(chunk)
                    await joined.wait()  # (its next read begins once the stream is followed)
                outcome.append("clean end")
            except httpx2.HTTPError as exc:
                outcome.append(exc)

        async def follow() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                assert r.headers["x-sse-cache"] == "shared"
                follower_got.append(await r.aread())

        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_producer)
                if followed:
                    tg.start_soon(follow)
                    while seen.followers() < 1:  # noqa: ASYNC110 - a count in the cache
                        await anyio.sleep(0.01)
                joined.set()
                await anyio.wait_all_tasks_blocked()  # the reader waits at the gate
                await producer.aclose()  # from this task: it returns
                gated.gate.set()
        (error,) = outcome
        assert isinstance(error, httpx2.ReadError), error
        assert b"".join(producer_got) == b"".join(_CHAT_PIECES[:2])
        if followed:
            assert follower_got == [b"".join(_CHAT_PIECES)]  # every byte, once
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == follower_got[0]
        else:
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
            assert again.headers["x-sse-cache"] == "miss"  # nothing of it was stored


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_a_hit_or_a_follower_closed_by_another_task_while_it_is_read(
    serve: Any, anyio_backend: str
) -> None:
    # The same stop handler on a hit (a paced replay, waiting for its next event) and on a
    # follower of a live stream (waiting for the producer's next chunk): close() raised the
    # generator's RuntimeError, and the reader got a clean end of part of the answer
    # (helper-91). The reader gets the library's ReadError; the producer's answer is whole.
    async with _gated_chat(serve, f"sk-close-answer-{anyio_backend}") as (client, gated, _):
        outcomes: dict[str, Any] = {}
        body = b"".join(_CHAT_PIECES)

        read = partial(_aread_into, outcomes)

        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                producer = await client.send(
                    client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY),
                    stream=True,
                )
                follower = await client.send(
                    client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY),
                    stream=True,
                )
                assert follower.headers["x-sse-cache"] == "shared"
                tg.start_soon(read, "producer", producer)
                tg.start_soon(read, "follower", follower)
                await anyio.wait_all_tasks_blocked()  # both wait at the gate
                await follower.aclose()  # from this task: it returns
                gated.gate.set()
            assert outcomes["producer"] == body
            assert isinstance(outcomes["follower"], httpx2.ReadError), outcomes
            paced = {"x-sse-cache-replay": "1000ms"}  # a second between two events
            hit = await client.send(
                client.build_request(
                    "POST", "/v1/chat/completions", json=_CHAT_BODY, headers=paced
                ),
                stream=True,
            )
            assert hit.headers["x-sse-cache"] == "hit"
            async with anyio.create_task_group() as tg:
                tg.start_soon(read, "hit", hit)
                await anyio.wait_all_tasks_blocked()  # waiting for its next event
                await hit.aclose()
            assert isinstance(outcomes["hit"], httpx2.ReadError), outcomes
        again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
        assert again.headers["x-sse-cache"] == "hit" and again.content == body


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
@pytest.mark.parametrize("followed", [True, False], ids=["followed", "alone"])
async def test_a_sync_response_closed_by_another_thread_while_it_is_read(
    serve: Any, anyio_backend: str, followed: bool
) -> None:
    # A stop handler in another thread closes a sync streamed response while its reader
    # thread waits in a read. Followed: the drain thread that reads on for the followers
    # read the upstream's generator at once ("generator already executing") and every
    # follower was aborted (helper-91). Now, as without the cache: the reader gets the
    # library's ReadError, the followers the whole answer, which is stored.
    import threading
    import time

    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=2)
    whole = b"".join(_CHAT_PIECES)
    headers = {"authorization": f"Bearer sk-sync-close-{followed}"}

    def run(url: str) -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        with httpx2.Client(
            transport=CacheTransport("memory://"), base_url=url, headers=headers, timeout=30
        ) as client:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            producer = client.send(request, stream=True)
            follower = client.send(request, stream=True) if followed else None

            readers = [threading.Thread(target=_read_into, args=(outcome, "producer", producer))]
            if follower is not None:
                readers.append(
                    threading.Thread(target=_read_into, args=(outcome, "follower", follower))
                )
            for thread in readers:
                thread.start()
            deadline = time.monotonic() + 30  # a deadlock guard
            while not producer.stream._stream._body._reading.locked():  # its reader is in a read
                assert time.monotonic() < deadline
                time.sleep(0.01)
            producer.close()  # from this thread: it returns
            outcome["closed"] = True
            anyio.from_thread.run_sync(gated.gate.set)  # (in the loop serving it)
            for thread in readers:
                thread.join(30)
            outcome["again"] = client.post("/v1/chat/completions", json=_CHAT_BODY)
        return outcome

    async with serve(gated) as url:
        outcome = await anyio.to_thread.run_sync(run, url)
    assert isinstance(outcome["producer"], httpx2.ReadError), outcome
    again = outcome["again"]
    if followed:
        assert outcome["follower"] == whole  # every byte, once
        assert again.headers["x-sse-cache"] == "hit" and again.content == whole
    else:
        assert again.headers["x-sse-cache"] == "miss"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_a_sync_hit_or_follower_closed_by_another_thread_while_it_is_read(
    serve: Any, anyio_backend: str
) -> None:
    # The sync twin of the async test: close() raised the generator's RuntimeError and the
    # reader got a clean end of part of the answer (helper-91).
    import threading
    import time

    from sse_cache.testing import GatedUpstream

    gated = GatedUpstream(_CHAT_PIECES, hold_after=2)
    whole = b"".join(_CHAT_PIECES)
    headers = {"authorization": "Bearer sk-sync-close-answer"}

    def close_while_read(outcome: dict[str, Any], name: str, response: Any) -> None:
        reader = threading.Thread(target=_read_into, args=(outcome, name, response))
        reader.start()
        deadline = time.monotonic() + 30  # a deadlock guard
        while response.stream._stream._scope is None:  # its reader is in a read
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response.close()  # from this thread: it returns
        reader.join(30)

    def run(url: str) -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        with httpx2.Client(
            transport=CacheTransport("memory://"), base_url=url, headers=headers, timeout=30
        ) as client:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            producer = client.send(request, stream=True)
            follower = client.send(request, stream=True)
            outcome["statuses"] = (producer.headers["x-sse-cache"], follower.headers["x-sse-cache"])
            producer_reader = threading.Thread(
                target=_read_into, args=(outcome, "producer", producer)
            )
            producer_reader.start()
            close_while_read(outcome, "follower", follower)
            anyio.from_thread.run_sync(gated.gate.set)  # (in the loop serving it)
            producer_reader.join(30)
            paced = client.build_request(
                "POST",
                "/v1/chat/completions",
                json=_CHAT_BODY,
                headers={"x-sse-cache-replay": "1000ms"},
            )
            hit = client.send(paced, stream=True)
            outcome["hit status"] = hit.headers["x-sse-cache"]
            close_while_read(outcome, "hit", hit)
            outcome["again"] = client.post("/v1/chat/completions", json=_CHAT_BODY)
        return outcome

    async with serve(gated) as url:
        outcome = await anyio.to_thread.run_sync(run, url)
    assert outcome["statuses"] == ("miss", "shared")
    assert outcome["producer"] == whole
    assert isinstance(outcome["follower"], httpx2.ReadError), outcome
    assert outcome["hit status"] == "hit"
    assert isinstance(outcome["hit"], httpx2.ReadError), outcome
    again = outcome["again"]
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole


class _OpenableGate:
    """A GatedUpstream(``*args``, ``**options``) whose gate a client opens with ``POST
    /_open``: made and opened in the loop serving it (an upstream in a thread of its own, for
    a test under trio, whose events that loop could not use)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        self.args, self.options = args, options
        self.gated: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from sse_cache.testing import GatedUpstream

        if self.gated is None:
            self.gated = GatedUpstream(*self.args, **self.options)
        if scope["type"] == "http" and scope["path"] == "/_open":
            self.gated.gate.set()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.gated(scope, receive, send)


# On trio, httpcore's own generator under the upstream response's stream, left suspended
# when the answer is complete before the body's end (the stream and its connection are
# closed: _finish), is reported unexhausted when collected: httpcore's, as for any httpx
# response closed early on trio.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_miss_closed_while_its_read_begun_before_anyone_followed_is_under_way(
    anyio_backend: str,
) -> None:
    # The producer's read began inline (no one followed yet; on trio always), a follower
    # joined, and another task closed the producer while that read waited. The read's chunk
    # was dropped (a follower's answer missed it, ended cleanly and was stored so), or the
    # followers' puller read the iterator under it (the generator's RuntimeError, the
    # upstream's connection left checked out) (helper-92). The chunk is passed on: the
    # follower gets every byte once, the answer is stored, the reader gets ReadError.
    server = Upstream(_OpenableGate(_CHAT_PIECES, hold_after=1))
    server.start()
    seen = FlightsSeen()
    transport = AsyncCacheTransport("memory://", hooks=[seen])
    headers = {"authorization": f"Bearer sk-inline-{anyio_backend}"}
    outcome: dict[str, Any] = {}
    try:
        async with httpx2.AsyncClient(
            transport=transport, base_url=server.url, headers=headers, timeout=30
        ) as client:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            producer = await client.send(request, stream=True)

            read = partial(_aread_into, outcome)

            with anyio.fail_after(30):  # a deadlock guard
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read, "producer", producer)
                    await anyio.wait_all_tasks_blocked()  # its read waits at the gate
                    follower = await client.send(request, stream=True)
                    assert follower.headers["x-sse-cache"] == "shared"
                    tg.start_soon(read, "follower", follower)
                    await anyio.wait_all_tasks_blocked()
                    await producer.aclose()  # from this task, under the producer's read
                    await _open_gate(server)
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
    finally:
        server.stop()
    whole = b"".join(_CHAT_PIECES)
    assert isinstance(outcome["producer"], httpx2.ReadError), outcome
    assert outcome["follower"] == whole  # every byte, once
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the upstream runs in this loop)
async def test_a_reader_cancelled_after_its_followed_response_was_closed_is_cancelled(
    serve: Any, anyio_backend: str
) -> None:
    # A stop handler closes a followed response and cancels the reading task: the
    # cancellation was turned into a ReadError, the task went on after its cancel, and the
    # followers' read was stopped (helper-92). The task is cancelled; the followers read on.
    async with _gated_chat(serve, "sk-cancel-close") as (client, gated, _):
        got: list[BaseException | str] = []
        request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
        producer = await client.send(request, stream=True)
        follower = await client.send(request, stream=True)

        async def read(scope: anyio.CancelScope) -> None:
            with scope:
                try:
                    async for _ in producer.aiter_raw():
                        pass
                    got.append("clean end")
                except httpx2.HTTPError as exc:
                    got.append(exc)
            got.append("cancelled" if scope.cancelled_caught else "not cancelled")

        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()
                tg.start_soon(read, scope)
                await anyio.wait_all_tasks_blocked()  # the reader waits at the gate
                await producer.aclose()
                scope.cancel()
            gated.gate.set()
            assert await follower.aread() == b"".join(_CHAT_PIECES)
            await follower.aclose()
        assert got == ["cancelled"], got


class _HeldChat:
    """A chat upstream: a first piece, then, once :attr:`gate` is set, ``rest`` (in one
    piece, or one piece each after :attr:`after_each` is set), then its body's end once
    :attr:`end` is set. Threading events: the test sets them from its own threads."""

    def __init__(self, rest: list[bytes]) -> None:
        self.rest = rest
        self.gate, self.end = threading.Event(), threading.Event()
        self.after_each: list[threading.Event] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": _CHAT_PIECES[0], "more_body": True})
        await anyio.to_thread.run_sync(self.gate.wait)
        for i, piece in enumerate(self.rest):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            if i < len(self.after_each):
                # (a deadlock guard: the test fails, not hangs, if it never comes)
                await anyio.to_thread.run_sync(self.after_each[i].wait, 30)
        await anyio.to_thread.run_sync(self.end.wait, 60)
        await send({"type": "http.response.body", "body": b""})


def test_a_read_under_way_when_another_thread_closes_the_stream_reaches_the_followers_at_once(
    prompt: str,
) -> None:
    # A stop handler closes the producer's response while its reader waits for the upstream;
    # a follower reads on. The chunk that read brings completes the answer, a comment after
    # it: the follower got it only when the upstream sent more (here, never: it waited for
    # the body's end), and whole, where the entry ends at [DONE] (helper-110).
    answer = b"".join(_CHAT_PIECES)
    upstream = _HeldChat([b"".join(_CHAT_PIECES[1:]) + b": keep-al"])
    server = Upstream(upstream)
    server.start()
    seen = FlightsSeen()
    client = httpx2.Client(
        transport=CacheTransport("memory://", hooks=[seen]),
        base_url=server.url,
        headers={"authorization": "Bearer sk-closed-mid-read"},
        timeout=30,
    )
    body = {**_CHAT_BODY, "messages": [{"role": "user", "content": prompt}]}
    follower: dict[str, Any] = {}

    def follow() -> None:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            follower["status"] = r.headers["x-sse-cache"]
            follower["body"] = r.read()

    try:
        request = client.build_request("POST", "/v1/chat/completions", json=body)
        producer = client.send(request, stream=True)
        chunks = producer.iter_raw()
        next(chunks)
        following = threading.Thread(target=follow)
        following.start()
        deadline = time.monotonic() + 30  # a deadlock guard
        while seen.followers() < 1:
            assert time.monotonic() < deadline, "the follower never joined"
            time.sleep(0.01)
        reader = threading.Thread(target=lambda: next(chunks, None))
        reader.start()
        transport_body = producer.stream._stream._body  # type: ignore[attr-defined]
        while not transport_body._reading.locked():  # its read waits for the upstream
            assert time.monotonic() < deadline, "the reader never read"
            time.sleep(0.01)
        producer.close()  # (from this thread)
        upstream.gate.set()
        following.join(30)
        assert not following.is_alive(), "the follower waits for the upstream's end"
        upstream.end.set()
        reader.join(30)
        assert follower == {"status": "shared", "body": answer}
        again = client.post("/v1/chat/completions", json=body)
        assert again.headers["x-sse-cache"] == "hit" and again.content == answer
    finally:
        upstream.gate.set()
        upstream.end.set()
        client.close()
        server.stop()


def test_a_sync_producer_reading_on_publishes_each_chunk_as_it_comes(
    redis_server: Any, prompt: str
) -> None:
    # Two sync transports on one Redis (two processes' clients). The producer's client
    # leaves; its drain thread reads on for the follower in the other one. Each chunk
    # reached it only when the upstream sent the next (helper-110: seconds late, behind a
    # model's pause): here the upstream sends the next only once the follower has this one.
    upstream = _HeldChat(_CHAT_PIECES[1:])
    upstream.after_each = [threading.Event() for _ in _CHAT_PIECES[1:-1]]
    server = Upstream(upstream)
    server.start()
    backend = f"{redis_server.url}?prefix=lag{uuid.uuid4().hex[:8]}:"
    ours, theirs = (
        httpx2.Client(
            transport=CacheTransport(backend, cross_process=True),
            base_url=server.url,
            headers={"authorization": "Bearer sk-reading-on"},
            timeout=30,
        )
        for _ in range(2)
    )
    body = {**_CHAT_BODY, "messages": [{"role": "user", "content": prompt}]}
    follower: dict[str, Any] = {"chunks": b""}
    joined = threading.Event()

    def follow() -> None:
        with theirs.stream("POST", "/v1/chat/completions", json=body) as r:
            follower["status"] = r.headers["x-sse-cache"]
            for chunk in r.iter_raw():
                follower["chunks"] += chunk
                joined.set()
                for i, piece in enumerate(_CHAT_PIECES[1:-1]):
                    if follower["chunks"].endswith(piece):
                        upstream.after_each[i].set()  # it has this one: the next may come

    try:
        with ours.stream("POST", "/v1/chat/completions", json=body) as producer:
            chunks = producer.iter_raw()
            next(chunks)
            following = threading.Thread(target=follow)
            following.start()
            assert joined.wait(30)  # it has the first piece, from the other transport
        upstream.gate.set()  # the producer's client has left: its drain reads on
        following.join(60)
        upstream.end.set()
        assert all(event.is_set() for event in upstream.after_each)
        assert follower == {"status": "shared", "chunks": b"".join(_CHAT_PIECES)}
    finally:
        for event in (upstream.gate, upstream.end, *upstream.after_each):
            event.set()
        ours.close()
        theirs.close()
        server.stop()


class _OlderWatch(httpx.AsyncHTTPTransport):
    """httpx's transport, with a full collection as the first request is forwarded: the
    exchange's watch, made as it was entered, is older from then on than the client's side of
    the miss's body (its shell) and the response holding it, made after the upstream answered
    — as when the collector ran while the upstream was asked (it allocates plenty)."""

    def __init__(self) -> None:
        super().__init__()
        self.forwarded = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.forwarded += 1
        if self.forwarded == 1:
            gc.collect()
        return await super().handle_async_request(request)


@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_miss_dropped_in_a_cycle_a_young_collection_found_first_is_read_on(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A program reads part of a streamed miss and drops it unclosed, in a reference cycle with
    # its httpx ``aiter_raw()`` generator. A young collection finds the cycle (the client's
    # side of the body, its shell, is young) but not the exchange's watch, older: the shell's
    # weakref dies then — weakrefs to cyclic garbage die before finalizers run — while the
    # loop's finalizer of the program's generator brings the whole cycle back, watch
    # included, unfinalized. The body was held only for as long as that weakref lived: the
    # next collection found it, with httpx's and httpcore's generators under its upstream, in
    # the same garbage as the watch, and the loop closed those generators too; the
    # followers, handed the upstream by the watch, read its closed iterator: a clean end
    # (StopAsyncIteration) of part of the answer (helper-124: trio, httpx, 3 herds in 5,000
    # of the soak). The body is held until the watch itself is collected: they read it all.
    import sse_cache.flight
    from sse_cache.httpx import AsyncCacheTransport as HttpxCacheTransport

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 3600.0)  # (the collections alone)
    server = Upstream(_OpenableGate(_CHAT_PIECES, hold_after=1))
    server.start()
    seen = FlightsSeen()
    transport = HttpxCacheTransport("memory://", hooks=[seen], transport=_OlderWatch())
    headers = {"authorization": f"Bearer sk-young-{anyio_backend}"}
    outcome: dict[str, Any] = {}
    whole = b"".join(_CHAT_PIECES)
    gc.collect()
    gc.disable()  # (no collection but the test's: which objects are young is the test's)
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url=server.url, headers=headers, timeout=30
        ) as client:
            request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
            response = await client.send(request, stream=True)
            assert response.headers["x-sse-cache"] == "miss"
            chunks = response.aiter_raw()
            received = await chunks.__anext__()
            assert whole.startswith(received) and received != whole

            async def follow() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=_CHAT_BODY) as r:
                    assert r.headers["x-sse-cache"] == "shared"
                    outcome["follower"] = await r.aread()

            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow)
                    while seen.followers() < 1:  # noqa: ASYNC110 - a count in the cache
                        await anyio.sleep(0.01)
                    await anyio.wait_all_tasks_blocked()
                    cycle: list[Any] = [chunks, response]
                    cycle.append(cycle)
                    del cycle, chunks, response, request
                    gc.collect(1)  # young: the cycle, not the watch
                    await anyio.wait_all_tasks_blocked()  # (the program's generators closed)
                    gc.collect()  # the watch: the followers take the upstream over
                    await anyio.wait_all_tasks_blocked()
                    async with httpx.AsyncClient() as opener:
                        await opener.post(server.url + "/_open")
            again = await client.post("/v1/chat/completions", json=_CHAT_BODY)
    finally:
        gc.enable()
        server.stop()
    assert outcome["follower"] == whole  # never a clean end of part of it
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("lib", ["httpx2", "httpx"])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_generic_body_that_ends_as_its_connection_closes_is_not_stored(
    lib: str, sync: bool
) -> None:
    # As through the proxy (test_proxy_forwarding): an HTTP/1 body with no length and no
    # chunks ends as the upstream closes its connection, as a cut does; a generic stream
    # (no completing event) cut there was stored as a whole answer (helper-132).
    from test_proxy_forwarding import CUT_GENERIC, RawUpstream, raw_upstream

    from sse_cache.adapters import GenericSSE

    module: Any = sse_cache.httpx2 if lib == "httpx2" else sse_cache.httpx
    client_lib: Any = httpx2 if lib == "httpx2" else httpx
    upstream = RawUpstream(CUT_GENERIC, "close")
    routes = {"/v1/generate": GenericSSE}
    ask, key = {"prompt": "cut", "stream": True}, {"authorization": "Bearer sk-cut"}
    async with raw_upstream(upstream) as url:
        if sync:
            transport = module.CacheTransport("memory://", routes=routes)

            def twice() -> list[str]:
                with client_lib.Client(transport=transport, base_url=url) as client:
                    return [
                        client.post("/v1/generate", json=ask, headers=key).headers["x-sse-cache"]
                        for _ in range(2)
                    ]

            said = await anyio.to_thread.run_sync(twice)
        else:
            transport = module.AsyncCacheTransport("memory://", routes=routes)
            async with client_lib.AsyncClient(transport=transport, base_url=url) as client:
                said = [
                    (await client.post("/v1/generate", json=ask, headers=key)).headers[
                        "x-sse-cache"
                    ]
                    for _ in range(2)
                ]
    assert said == ["miss", "miss"]
    assert upstream.calls == 2


class _HeldStore:
    """The SQLite backend's first store held until :attr:`stored` is set (:attr:`storing`
    says it began); ``order`` notes each store done and each close of a backend."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from sse_cache.backends.sqlite import SQLiteBackend

        self.storing, self.stored = anyio.Event(), anyio.Event()
        self.order: list[str] = []
        real_set, real_close = SQLiteBackend.set, SQLiteBackend.aclose

        async def held_set(backend: Any, key: str, value: bytes, ttl: float | None = None) -> None:
            if not self.storing.is_set():
                self.storing.set()
                await self.stored.wait()
            await real_set(backend, key, value, ttl)
            self.order.append("stored")

        async def close(backend: Any) -> None:
            self.order.append("closed")
            await real_close(backend)

        monkeypatch.setattr(SQLiteBackend, "set", held_set)
        monkeypatch.setattr(SQLiteBackend, "aclose", close)


async def _open_gate(server: Upstream) -> None:
    """Let an :class:`_OpenableGate` upstream go on past its gate."""
    async with httpx2.AsyncClient() as opener:
        await opener.post(server.url + "/_open")


async def _assert_stored(url: str, server: Upstream, headers: dict[str, str]) -> None:
    """A new transport on the cache at ``url`` answers :data:`_CHAT_BODY` from its entry,
    whole."""
    async with httpx2.AsyncClient(
        transport=AsyncCacheTransport(url), base_url=server.url, headers=headers
    ) as client:
        hit = await client.post("/v1/chat/completions", json=_CHAT_BODY)
    assert hit.headers["x-sse-cache"] == "hit"
    assert hit.content == b"".join(_CHAT_PIECES)


async def _miss_and_follower(
    client: httpx2.AsyncClient,
) -> tuple[httpx2.Response, httpx2.Response]:
    """A producer's response to :data:`_CHAT_BODY` and a follower's, both streamed."""
    request = client.build_request("POST", "/v1/chat/completions", json=_CHAT_BODY)
    producer = await client.send(request, stream=True)
    follower = await client.send(request, stream=True)
    assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == [
        "miss",
        "shared",
    ]
    return producer, follower


# (On trio, httpcore's generator left suspended when the answer is complete before the
# body's end: see the test above.)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_closing_the_transport_while_a_follower_stores_the_answer_waits_for_the_store(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The producer's client left: its follower read the upstream on to its end, and that
    # pull now stores the answer (the backend slow to take it) as the program closes its
    # client. The close waits for the store, then closes the backend: the answer is kept.
    # It closed the backend under the store (the flight had ended, so the close skipped it).
    held = _HeldStore(monkeypatch)
    server = Upstream(_OpenableGate(_CHAT_PIECES, hold_after=2))
    server.start()
    url = f"sqlite:///{tmp_path / 'closing.db'}"
    headers = {"authorization": f"Bearer sk-close-while-storing-{anyio_backend}"}
    outcome: dict[str, Any] = {}
    try:
        client = httpx2.AsyncClient(
            transport=AsyncCacheTransport(url), base_url=server.url, headers=headers, timeout=30
        )
        producer, follower = await _miss_and_follower(client)
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            async with anyio.create_task_group() as tg:
                tg.start_soon(_aread_into, outcome, "follower", follower)
                await producer.aclose()  # the follower reads the upstream on
                await _open_gate(server)
                await held.storing.wait()  # the follower's pull stores the answer
                tg.start_soon(client.aclose)
                await anyio.wait_all_tasks_blocked()
                held.stored.set()
        assert outcome["follower"] == b"".join(_CHAT_PIECES)
        assert held.order == ["stored", "closed"]
        await _assert_stored(url, server, headers)
    finally:
        server.stop()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (trio: the pull is the reader's)
async def test_the_last_follower_leaving_while_its_pull_stores_the_answer_keeps_the_store(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The producer's client left: its follower read the upstream on to the answer's end, and
    # that pull (a task of its own) now stores it, the backend slow to take it. The
    # follower's read is cancelled then (its caller's timeout) and it leaves, the last
    # reader: the stream is whole, so the store goes on (the pull was stopped mid-store, and
    # nothing was stored).
    held = _HeldStore(monkeypatch)
    server = Upstream(_OpenableGate(_CHAT_PIECES, hold_after=2))
    server.start()
    url = f"sqlite:///{tmp_path / 'leaving.db'}"
    headers = {"authorization": "Bearer sk-leave-while-storing"}
    seen = FlightsSeen()
    try:
        async with httpx2.AsyncClient(
            transport=AsyncCacheTransport(url, hooks=[seen]),
            base_url=server.url,
            headers=headers,
            timeout=30,
        ) as client:
            producer, follower = await _miss_and_follower(client)
            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                async with anyio.create_task_group() as tg:
                    reading = anyio.CancelScope()

                    async def read() -> None:
                        with reading:
                            async for _ in follower.aiter_raw():
                                pass

                    tg.start_soon(read)
                    await producer.aclose()  # the follower reads the upstream on
                    await _open_gate(server)
                    await held.storing.wait()  # its pull stores the answer
                    reading.cancel()
                await follower.aclose()  # the last reader leaves
                held.stored.set()
                while seen.live():  # (the pull stores, then ends the stream)  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        await _assert_stored(url, server, headers)
    finally:
        server.stop()

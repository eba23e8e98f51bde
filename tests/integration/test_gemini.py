"""Google Gemini end to end: the official google-genai SDK through ``sse-cache proxy`` (real
loopback HTTP) and through our httpx2 transport, real recorded Gemini streams through the
proxy, the ASGI middleware's completion rules, and the mock upstream's Gemini routes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx2
import pytest
from google import genai
from google.genai import types
from google.genai.models import _GenerateContentResponse_from_mldev as _from_mldev
from google.genai.models import _GenerateContentResponse_from_vertex as _from_vertex

from asgi_calls import body_then
from servers import require_dir
from sse_cache import SSEParser
from sse_cache.adapters import GeminiGenerateContent
from sse_cache.asgi import CacheMiddleware
from sse_cache.httpx2 import AsyncCacheTransport
from sse_cache.proxy import ProxyApp, create_proxy_app
from sse_cache.testing import GatedUpstream, MockUpstream

Serve = Any  # the `serve` fixture (tests/integration/conftest.py)

SECRET = "AIza-secret-tenant-a"
OTHER_SECRET = "AIza-secret-tenant-b"
MODEL = "gemini-mock-1"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"
UNARY = f"/v1beta/models/{MODEL}:generateContent"

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def request_body(prompt: str, **config: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    if config:
        body["generationConfig"] = config
    return body


def summary(responses: Sequence[types.GenerateContentResponse]) -> dict[str, Any]:
    """What a client accumulates from SDK responses (chunks of a stream, or one answer):
    per candidate the answer and thought texts, signatures, function calls and finish reason;
    the last usage, model version and response id."""
    out: dict[str, Any] = {"candidates": {}}
    for response in responses:
        if response.usage_metadata is not None:
            out["usage"] = response.usage_metadata.model_dump(mode="json")
        out["model"] = response.model_version or out.get("model")
        out["id"] = response.response_id or out.get("id")
        for position, cand in enumerate(response.candidates or []):
            index = cand.index if cand.index is not None else position
            acc = out["candidates"].setdefault(
                index, {"text": "", "thoughts": "", "signatures": [], "calls": [], "finish": None}
            )
            acc["finish"] = cand.finish_reason or acc["finish"]
            for part in (cand.content.parts if cand.content else None) or []:
                if part.thought_signature:
                    acc["signatures"].append(part.thought_signature)
                if part.function_call is not None:
                    acc["calls"].append((part.function_call.name, part.function_call.args))
                elif part.text is not None:
                    acc["thoughts" if part.thought else "text"] += part.text
    return out


def _config(**options: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(**options)


THOUGHTS = {"thinking_config": types.ThinkingConfig(include_thoughts=True)}
WEATHER = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            parameters=types.Schema(
                type=types.Type.OBJECT,
                properties={"city": types.Schema(type=types.Type.STRING)},
                required=["city"],
            ),
        )
    ]
)


# -- the SDK through `sse-cache proxy` -------------------------------------------------------


class Stack:
    def __init__(self, upstream: str, proxy: str, app: ProxyApp, db: Path) -> None:
        self.upstream = upstream
        self.proxy = proxy
        self.app = app
        self.db = db
        self.http = httpx2.AsyncClient(base_url=proxy, timeout=30)
        self.clients: list[genai.Client] = []

    def sdk(self, key: str = SECRET) -> genai.Client:
        options = types.HttpOptions(base_url=self.proxy, api_version="v1beta", timeout=30_000)
        client = genai.Client(api_key=key, http_options=options)
        self.clients.append(client)
        return client

    async def upstream_calls(self) -> int:
        async with httpx2.AsyncClient(base_url=self.upstream) as c:
            return int((await c.get("/_mock/stats")).json()["total"])

    async def aclose(self) -> None:
        await self.http.aclose()
        for client in self.clients:
            await client.aio.aclose()


@pytest.fixture
async def stack(serve: Serve, tmp_path: Path) -> AsyncIterator[Stack]:
    upstream_app = MockUpstream(delay=0.001, first_delay=0.005)
    db = tmp_path / "cache.db"
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{db}", ttl=600)
        async with serve(app) as proxy:
            s = Stack(upstream, proxy, app, db)
            try:
                yield s
            finally:
                await s.aclose()
                await app.aclose()


async def stream_chunks(
    client: genai.Client, prompt: str, config: types.GenerateContentConfig | None = None
) -> list[types.GenerateContentResponse]:
    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents=prompt, config=config
    )
    return [chunk async for chunk in stream]


def cache_status(response: types.GenerateContentResponse) -> str | None:
    assert response.sdk_http_response is not None
    headers = response.sdk_http_response.headers or {}
    return headers.get("x-sse-cache")


@pytest.mark.anyio
@asyncio_only
async def test_sdk_stream_miss_then_hit_with_the_same_chunks(stack: Stack) -> None:
    client = stack.sdk()
    config = _config(**THOUGHTS)
    first = await stream_chunks(client, "stream twice", config)
    second = await stream_chunks(client, "stream twice", config)
    assert cache_status(first[0]) == "miss" and cache_status(second[0]) == "hit"
    dump = [c.model_dump(mode="json", exclude={"sdk_http_response"}) for c in first]
    assert dump == [c.model_dump(mode="json", exclude={"sdk_http_response"}) for c in second]
    view = summary(first)
    assert view["candidates"][0]["thoughts"] and view["candidates"][0]["text"]
    assert view["candidates"][0]["signatures"] and view["candidates"][0]["finish"] == "STOP"
    assert await stack.upstream_calls() == 1


@pytest.mark.anyio
@asyncio_only
async def test_raw_http_miss_then_byte_identical_hit(stack: Stack) -> None:
    body = request_body("raw bytes")
    headers = {"x-goog-api-key": SECRET}
    first = await stack.http.post(STREAM + "?alt=sse", json=body, headers=headers)
    second = await stack.http.post(STREAM + "?alt=sse", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-sse-cache"] == "miss" and second.headers["x-sse-cache"] == "hit"
    assert first.headers["x-sse-cache-key"] == second.headers["x-sse-cache-key"]
    assert second.headers["content-type"].startswith("text/event-stream")
    assert first.content == second.content and first.content.count(b"\n\n") > 10
    assert await stack.upstream_calls() == 1


@pytest.mark.anyio
@asyncio_only
async def test_cross_mode_both_ways(stack: Stack) -> None:
    client = stack.sdk()
    # A non-stream request answered from the recorded stream.
    chunks = await stream_chunks(client, "stream first")
    answer = await client.aio.models.generate_content(model=MODEL, contents="stream first")
    assert cache_status(answer) == "hit"
    assert summary([answer]) == summary(chunks)
    assert answer.text == "".join(c.text or "" for c in chunks)
    assert await stack.upstream_calls() == 1
    # A stream synthesised from a stored non-stream answer.
    config = _config(**THOUGHTS)
    stored = await client.aio.models.generate_content(
        model=MODEL, contents="json first", config=config
    )
    assert cache_status(stored) == "miss"
    replayed = await stream_chunks(client, "json first", config)
    assert cache_status(replayed[0]) == "hit" and len(replayed) > 3
    assert summary(replayed) == summary([stored])
    assert await stack.upstream_calls() == 2


@pytest.mark.anyio
@asyncio_only
async def test_function_call_with_thought_signature(stack: Stack) -> None:
    client = stack.sdk()
    config = _config(tools=[WEATHER], **THOUGHTS)
    first = await stream_chunks(client, "weather in Paris?", config)
    calls = [c for chunk in first for c in chunk.function_calls or []]
    assert [c.name for c in calls] == ["get_weather"] and "city" in (calls[0].args or {})
    view = summary(first)
    assert view["candidates"][0]["thoughts"] and view["candidates"][0]["signatures"]
    again = await stream_chunks(client, "weather in Paris?", config)
    assert cache_status(again[0]) == "hit" and summary(again) == view
    answer = await client.aio.models.generate_content(
        model=MODEL, contents="weather in Paris?", config=config
    )
    assert cache_status(answer) == "hit" and summary([answer]) == view
    # The tool's answer: a new request (new contents), so a new answer: text this time.
    contents = [
        types.Content(role="user", parts=[types.Part(text="weather in Paris?")]),
        types.Content(role="model", parts=[types.Part(function_call=calls[0])]),
        types.Content(
            role="user",
            parts=[types.Part.from_function_response(name="get_weather", response={"t": 21})],
        ),
    ]
    final = await client.aio.models.generate_content(model=MODEL, contents=contents, config=config)
    assert cache_status(final) == "miss" and final.text
    assert await stack.upstream_calls() == 2


@pytest.mark.anyio
@asyncio_only
async def test_max_tokens_answers_are_stored(stack: Stack) -> None:
    client = stack.sdk()
    config = _config(max_output_tokens=3)
    first = await stream_chunks(client, "short", config)
    assert first[-1].candidates and first[-1].candidates[0].finish_reason == "MAX_TOKENS"
    second = await stream_chunks(client, "short", config)
    assert cache_status(second[0]) == "hit"


@pytest.mark.anyio
@asyncio_only
async def test_the_query_key_scopes_the_tenant_and_is_never_kept(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    body = request_body("query key")
    caplog.set_level(logging.DEBUG)
    by_query = await stack.http.post(STREAM, params={"alt": "sse", "key": SECRET}, json=body)
    by_header = await stack.http.post(
        STREAM, params={"alt": "sse"}, json=body, headers={"x-goog-api-key": SECRET}
    )
    other = await stack.http.post(STREAM, params={"key": OTHER_SECRET, "alt": "sse"}, json=body)
    unary = await stack.http.post(UNARY, params={"key": SECRET}, json=body)
    assert by_query.headers["x-sse-cache"] == "miss"
    assert by_header.headers["x-sse-cache"] == "hit"  # the same key, as a header: same tenant
    assert other.headers["x-sse-cache"] == "miss"  # another key: another tenant
    assert unary.headers["x-sse-cache"] == "hit"  # cross-mode, same tenant
    assert by_query.headers["x-sse-cache-key"] == by_header.headers["x-sse-cache-key"]
    assert other.headers["x-sse-cache-key"] != by_query.headers["x-sse-cache-key"]
    assert await stack.upstream_calls() == 2
    metrics = await stack.http.get("/_sse_cache/metrics")
    # Our logs (and the servers'); the HTTP clients' own debug logs print their URLs.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("sse_cache", "uvicorn"))]
    for secret in (SECRET, OTHER_SECRET):
        assert not [line for line in ours if secret in line]
        for response in (by_query, other, unary, metrics):
            assert secret not in str(response.headers) and secret.encode() not in response.content
        for path in stack.db.parent.iterdir():  # the SQLite file and its journals
            assert secret.encode() not in path.read_bytes()


@pytest.mark.anyio
@asyncio_only
async def test_stream_without_alt_sse_passes_through_uncached(stack: Stack) -> None:
    body = request_body("json array")
    headers = {"x-goog-api-key": SECRET}
    for _ in range(2):
        response = await stack.http.post(STREAM, json=body, headers=headers)
        assert response.status_code == 200 and response.headers["x-sse-cache"] == "bypass"
        assert response.headers["content-type"].startswith("application/json")
        chunks = response.json()
        assert isinstance(chunks, list) and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert await stack.upstream_calls() == 2


# -- real recorded Gemini streams through the proxy ---------------------------------------

_BESIDE = Path(__file__).resolve().parents[3] / "shared" / "real-streams-gemini"
REAL = Path(os.environ.get("SSE_CACHE_REAL_STREAMS_GEMINI", str(_BESIDE)))


def real_dir() -> Path:
    """The recordings; skipped when absent, except under CI: a failure."""
    return require_dir(REAL, "the real Gemini streams directory")


def recorded(raw: bytes) -> GatedUpstream:
    """An upstream that answers every request with one recorded stream, as it was, in pieces
    of 100 bytes (cut anywhere)."""
    return GatedUpstream([raw[start : start + 100] for start in range(0, len(raw), 100)])


@pytest.mark.anyio
@asyncio_only
@pytest.mark.real_streams
@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("gemini_tool-call-streamed-arguments_gemini-3.1-pro.sse", True),  # CRLF framing
        ("gemini_text-thought-signature_gemini-3-pro.sse", True),
        ("gemini_no-args-tool-call.sse", True),
        ("gemini_prompt-blocked_gemini-3.7-flash.sse", False),
    ],
)
async def test_real_recordings_through_the_proxy(
    serve: Serve, tmp_path: Path, name: str, stored: bool
) -> None:
    raw = (real_dir() / name).read_bytes()
    upstream = recorded(raw)
    async with serve(upstream) as base:
        app = create_proxy_app(base, f"sqlite:///{tmp_path / 'c.db'}")
        try:
            async with serve(app) as proxy:
                options = types.HttpOptions(base_url=proxy, api_version="v1beta", timeout=30_000)
                client = genai.Client(api_key=SECRET, http_options=options)
                async with httpx2.AsyncClient(base_url=proxy) as http:
                    headers = {"x-goog-api-key": SECRET}
                    url = STREAM + "?alt=sse"
                    first = await http.post(url, json=request_body(name), headers=headers)
                    assert first.content == raw  # a miss passes the bytes through untouched
                    again = await stream_chunks(client, name)
                await client.aio.aclose()
        finally:
            await app.aclose()
    if stored:
        assert cache_status(again[0]) == "hit" and upstream.calls == 1
        # The replay is the same events (in canonical LF framing): the SDK reads the same.
        assert summary(again) == summary(parse_recording(raw))
    else:
        assert cache_status(again[0]) == "miss" and upstream.calls == 2  # not stored
        assert again[0].prompt_feedback is not None
        assert again[0].prompt_feedback.block_reason == "PROHIBITED_CONTENT"


def parse_recording(raw: bytes) -> list[types.GenerateContentResponse]:
    """The recorded chunks as the SDK builds them (its own converters, lenient parsing)."""
    out = []
    for event in SSEParser().feed(raw):
        payload = json.loads(event.data)
        vertex = "createTime" in payload
        convert = _from_vertex if vertex else _from_mldev
        response = convert(payload, None, None)
        out.append(types.GenerateContentResponse._from_response(response=response, kwargs={}))
    return out


# -- the SDK through our httpx2 transport (asyncio and trio) --------------------------------


@pytest.mark.anyio
async def test_sdk_through_the_httpx2_transport() -> None:
    mock = MockUpstream(delay=0.0)
    transport = AsyncCacheTransport("memory://", transport=httpx2.ASGITransport(mock))
    async with httpx2.AsyncClient(transport=transport) as http:
        options = types.HttpOptions(base_url="http://gemini.test", httpx_async_client=http)
        client = genai.Client(api_key=SECRET, http_options=options)
        first = await stream_chunks(client, "transport")
        second = await stream_chunks(client, "transport")
        answer = await client.aio.models.generate_content(model=MODEL, contents="transport")
        assert [cache_status(r) for r in (first[0], second[0], answer)] == ["miss", "hit", "hit"]
        assert summary(second) == summary(first) == summary([answer])
        other = genai.Client(api_key=OTHER_SECRET, http_options=options)
        assert cache_status((await stream_chunks(other, "transport"))[0]) == "miss"
    assert mock.stats()["total"] == 2


# -- completion rules through the ASGI middleware (asyncio and trio) ------------------------


def chunks_upstream(*chunks: dict[str, Any]) -> GatedUpstream:
    """An upstream answering with the given chunks as an SSE stream (CRLF-framed, as Gemini's)."""
    return GatedUpstream(b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks))


def _text(value: str, **extra: Any) -> dict[str, Any]:
    cand = {"content": {"parts": [{"text": value}], "role": "model"}, "index": 0, **extra}
    return {"candidates": [cand]}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("chunks", "stored", "stored_blocked"),
    [
        ([_text("Hi"), _text("!", finishReason="STOP")], True, True),
        ([_text("Hi"), _text("", finishReason="SAFETY")], False, True),
        ([_text("Hi"), _text("", finishReason="RECITATION")], False, True),
        ([_text("Hi"), _text("", finishReason="OTHER")], False, False),
        ([_text("Hi")], False, False),  # no finishReason: the stream did not complete
        ([{"promptFeedback": {"blockReason": "SAFETY"}}], False, True),
        ([_text("Hi"), {"error": {"code": 500, "status": "INTERNAL"}}], False, False),
    ],
)
async def test_what_the_middleware_stores(
    chunks: list[dict[str, Any]], stored: bool, stored_blocked: bool
) -> None:
    for adapter, expected in (
        (GeminiGenerateContent(), stored),
        (GeminiGenerateContent(store_blocked=True), stored_blocked),
    ):
        upstream = chunks_upstream(*chunks)
        routes = {
            "/models/{model}:generateContent": adapter,
            "/models/{model}:streamGenerateContent": adapter,
        }
        app = CacheMiddleware(upstream, "memory://", routes=routes)
        transport = httpx2.ASGITransport(app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://t") as http:
            responses = [
                await http.post(
                    STREAM + "?alt=sse", json=request_body("x"), headers={"x-goog-api-key": "k"}
                )
                for _ in range(2)
            ]
        assert upstream.calls == (1 if expected else 2), adapter.store_blocked
        assert responses[0].content == upstream.body  # a miss: passed through as it came
        statuses = [r.headers["x-sse-cache"] for r in responses]
        assert statuses == (["miss", "hit"] if expected else ["miss", "miss"])
        # A hit: the same events, in canonical (LF) framing.
        assert SSEParser().feed(responses[1].content) == SSEParser().feed(upstream.body)


# -- the mock upstream's Gemini routes ---------------------------------------------------------


async def _post(app: MockUpstream, path: str, body: Any, **headers: str) -> httpx2.Response:
    transport = httpx2.ASGITransport(app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://mock") as http:
        return await http.post(path, json=body, headers=headers)


@pytest.mark.anyio
async def test_mock_upstream_streams_paced_gemini_chunks() -> None:
    app = MockUpstream(delay=0.0, deltas=5, summaries=2)
    messages: list[dict[str, Any]] = []
    body = json.dumps(request_body("paced", thinkingConfig={"includeThoughts": True})).encode()
    receive = body_then(body)

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": STREAM,
        "query_string": b"alt=sse",
        "headers": [(b"content-type", b"application/json")],
    }
    await app(scope, receive, send)
    bodies = [m["body"] for m in messages if m["type"] == "http.response.body" and m["body"]]
    # One chunk per body message, as a model streams: each its own SSE event.
    assert all(b.endswith(b"\n\n") and b.count(b"\n\n") == 1 for b in bodies)
    events = SSEParser().feed(b"".join(bodies))
    payloads = [json.loads(e.data) for e in events]
    parts = [p["candidates"][0]["content"]["parts"][0] for p in payloads]
    assert any(p.get("thought") for p in parts) and parts[-1].get("thoughtSignature")
    assert payloads[-1]["candidates"][0]["finishReason"] == "STOP"
    assert len(bodies) == len(events) > 5


@pytest.mark.anyio
async def test_mock_upstream_gemini_answers() -> None:
    app = MockUpstream(delay=0.0, deltas=6)
    adapter = GeminiGenerateContent()
    config = {"thinkingConfig": {"includeThoughts": True}, "candidateCount": 2}
    body = request_body("both forms", **config)
    streamed = await _post(app, STREAM + "?alt=sse", body)
    unary = await _post(app, UNARY, body)
    array = await _post(app, STREAM, body)
    events = SSEParser().feed(streamed.content)
    assert adapter.verify(events).value == "complete"
    assert json.loads(adapter.final_body(events) or b"") == unary.json()
    assert [json.loads(e.data) for e in events] == array.json()
    assert len(unary.json()["candidates"]) == 2
    # Deterministic; the model (in the path) and the prompt change the answer.
    assert (await _post(app, STREAM + "?alt=sse", body)).content == streamed.content
    other_model = await _post(app, STREAM.replace(MODEL, "gemini-other") + "?alt=sse", body)
    assert other_model.content != streamed.content
    # The proto field names (as the SDK sends nested fields) are read too.
    snake = request_body("both forms")
    snake["generation_config"] = {
        "thinking_config": {"include_thoughts": True},
        "candidate_count": 2,
    }
    snake_answer = (await _post(app, UNARY, snake)).json()
    assert len(snake_answer["candidates"]) == 2
    assert snake_answer["candidates"][0]["content"]["parts"][0]["thought"] is True
    vertex = "/v1/projects/p/locations/l/publishers/google/models/gemini-x:generateContent"
    assert (await _post(app, vertex, body)).json()["modelVersion"] == "gemini-x"


@pytest.mark.anyio
async def test_mock_upstream_gemini_errors() -> None:
    app = MockUpstream(delay=0.0)
    body = request_body("errors")
    limited = await _post(app, UNARY, body, **{"x-mock-error": "429"})
    assert limited.status_code == 429
    assert limited.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    failing = await _post(app, STREAM + "?alt=sse", body, **{"x-mock-error": "fail-mid-stream"})
    events = SSEParser().feed(failing.content)
    assert json.loads(events[-1].data)["error"]["code"] == 500
    assert GeminiGenerateContent().verify(events).value == "fail"
    bad = await _post(app, UNARY, {"contents": []}, **{"x-mock-delay-ms": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"

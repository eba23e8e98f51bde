"""CacheMiddleware and the caching proxy over real loopback HTTP (uvicorn), with raw HTTP and
the official openai / anthropic SDKs as clients, against the deterministic mock upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx2
import openai
import pytest

from sse_cache import SSEParser, serialize_sse
from sse_cache.adapters import GenericSSE, OpenAIResponses
from sse_cache.proxy import ProxyApp, create_proxy_app
from sse_cache.testing import (
    GatedUpstream,
    MockUpstream,
    NoticeLog,
    metric_value,
    responses_stream,
)

Serve = Any  # the `serve` fixture (tests/integration/conftest.py)

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY_A = {"authorization": "Bearer sk-tenant-a"}
KEY_B = {"authorization": "Bearer sk-tenant-b"}


DEADLOCK_GUARD = 30  # seconds: only a hung test ever reaches it


class Stack:
    def __init__(
        self,
        upstream: str,
        proxy: str,
        app: ProxyApp,
        upstream_app: MockUpstream,
        notices: NoticeLog,
    ) -> None:
        self.upstream = upstream
        self.proxy = proxy
        self.app = app
        self.upstream_app = upstream_app
        self.notices = notices
        self.http = httpx2.AsyncClient(base_url=proxy, timeout=30)
        self.clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []

    async def upstream_calls(self) -> int:
        async with httpx2.AsyncClient(base_url=self.upstream) as c:
            stats = (await c.get("/_mock/stats")).json()
        return int(stats["total"])

    async def post(self, path: str, body: dict[str, Any], **headers: str) -> httpx2.Response:
        return await self.http.post(path, json=body, headers={**KEY_A, **headers})

    def openai(self, key: str = "sk-tenant-a") -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.proxy + "/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    def anthropic(self, key: str = "sk-tenant-a") -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=self.proxy, api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    async def aclose(self) -> None:
        await self.http.aclose()
        for client in self.clients:
            await client.close()


@pytest.fixture
async def stack(serve: Serve, tmp_path: Path) -> AsyncIterator[Stack]:
    upstream_app = MockUpstream(delay=0.001, first_delay=0.005)
    async with serve(upstream_app) as upstream:
        notices = NoticeLog()
        app = create_proxy_app(
            upstream, f"sqlite:///{tmp_path / 'cache.db'}", ttl=600, hooks=[notices]
        )
        async with serve(app) as proxy:
            s = Stack(upstream, proxy, app, upstream_app, notices)
            try:
                yield s
            finally:
                await s.aclose()
                await app.aclose()


def responses_body(prompt: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "gpt-mock", "input": prompt, "stream": stream}


async def test_seed_scenario_raw_http_miss_then_hit_same_bytes(stack: Stack) -> None:
    first = await stack.post("/v1/responses", responses_body("seed"))
    second = await stack.post("/v1/responses", responses_body("seed"))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-sse-cache"] == "miss" and second.headers["x-sse-cache"] == "hit"
    assert first.headers["x-sse-cache-key"] == second.headers["x-sse-cache-key"]
    assert second.headers["content-type"].startswith("text/event-stream")
    assert int(second.headers["age"]) >= 0 and 0 < int(second.headers["x-sse-cache-ttl"]) <= 600
    assert first.content == second.content and first.content.count(b"\n\n") > 10
    assert await stack.upstream_calls() == 1


async def test_openai_sdk_stream_twice_and_cross_mode(stack: Stack) -> None:
    client = stack.openai()
    runs = []
    for _ in range(2):
        stream = await client.responses.create(model="gpt-mock", input="sdk", stream=True)
        runs.append([event.model_dump_json() async for event in stream])
    assert runs[0] == runs[1] and len(runs[0]) > 10
    assert await stack.upstream_calls() == 1
    # A non-stream request is answered from the recorded stream, and validates as a Response.
    response = await client.responses.create(model="gpt-mock", input="sdk")
    completed = json.loads(runs[0][-1])
    assert completed["type"] == "response.completed"
    assert response.model_dump(mode="json") == completed["response"]
    assert await stack.upstream_calls() == 1
    # The SDK's stream helper accumulates the replay to the same final response.
    async with client.responses.stream(model="gpt-mock", input="sdk") as helper:
        final = await helper.get_final_response()
    assert final.output_text == response.output_text and final.id == response.id


async def test_stream_answered_from_a_stored_non_stream_answer(stack: Stack) -> None:
    client = stack.openai()
    response = await client.responses.create(model="gpt-mock", input="json first")
    raw = await stack.post("/v1/responses", responses_body("json first"))
    assert raw.headers["x-sse-cache"] == "hit"
    events = SSEParser().feed(raw.content)
    sequence = [json.loads(e.data)["sequence_number"] for e in events]
    assert sequence == list(range(len(events)))
    async with client.responses.stream(model="gpt-mock", input="json first") as helper:
        final = await helper.get_final_response()
    assert final.output_text == response.output_text
    assert await stack.upstream_calls() == 1


async def test_chat_completions_and_anthropic_sdks(stack: Stack) -> None:
    chat = stack.openai().chat.completions
    messages: Any = [{"role": "user", "content": "hello chat"}]
    runs = []
    usage: Any = {"include_usage": True}  # (a stream with usage answers non-streamed requests)
    for _ in range(2):
        stream = await chat.create(
            model="gpt-mock", messages=messages, stream=True, stream_options=usage
        )
        runs.append([chunk.model_dump_json() async for chunk in stream])
    assert runs[0] == runs[1]
    whole = await chat.create(model="gpt-mock", messages=messages)
    assert whole.usage is not None
    text = "".join(
        json.loads(c)["choices"][0]["delta"].get("content") or ""
        for c in runs[0]
        if json.loads(c)["choices"]
    )
    assert whole.choices[0].message.content == text

    client = stack.anthropic()
    finals = []
    for _ in range(2):
        async with client.messages.stream(
            model="claude-mock", max_tokens=256, messages=[{"role": "user", "content": "hi"}]
        ) as helper:
            finals.append(await helper.get_final_message())
    assert finals[0] == finals[1]
    assert await stack.upstream_calls() == 2  # one chat, one anthropic


async def test_request_controls(stack: Stack) -> None:
    body = responses_body("controls")
    assert (await stack.post("/v1/responses", body, **{"cache-control": "no-store"})).headers[
        "x-sse-cache"
    ] == "miss"
    assert (await stack.post("/v1/responses", body)).headers["x-sse-cache"] == "miss"  # not stored
    assert (await stack.post("/v1/responses", body)).headers["x-sse-cache"] == "hit"
    bypass = await stack.post("/v1/responses", body, **{"cache-control": "no-cache"})
    assert bypass.headers["x-sse-cache"] == "bypass"
    refresh = await stack.post("/v1/responses", body, **{"x-sse-cache-refresh": "1"})
    assert refresh.headers["x-sse-cache"] == "refresh"
    other = await stack.post("/v1/responses", body, **{"x-sse-cache-namespace": "team-b"})
    assert other.headers["x-sse-cache"] == "miss"
    assert other.headers["x-sse-cache-key"] != refresh.headers["x-sse-cache-key"]
    await stack.post(
        "/v1/responses", body, **{"x-sse-cache-namespace": "ttl", "x-sse-cache-ttl": "30"}
    )
    hit = await stack.post("/v1/responses", body, **{"x-sse-cache-namespace": "ttl"})
    assert hit.headers["x-sse-cache"] == "hit" and int(hit.headers["x-sse-cache-ttl"]) <= 30
    stale = await stack.post(
        "/v1/responses", body, **{"x-sse-cache-namespace": "ttl", "x-sse-cache-max-age": "0"}
    )
    assert stale.headers["x-sse-cache"] == "miss"
    bad = await stack.post("/v1/responses", body, **{"x-sse-cache-ttl": "soon"})
    assert bad.status_code == 400 and "x-sse-cache-ttl" in bad.json()["error"]["message"]
    # A client asks at most the operator's ttl (600 s here): a year overrode it, and outlived
    # a revoked key by as much (helper-156).
    await stack.post(
        "/v1/responses", body, **{"x-sse-cache-namespace": "long", "x-sse-cache-ttl": "31536000"}
    )
    hit = await stack.post("/v1/responses", body, **{"x-sse-cache-namespace": "long"})
    assert hit.headers["x-sse-cache"] == "hit" and int(hit.headers["x-sse-cache-ttl"]) <= 600
    # ... and a replay at most a second between events (99999999ms held it open for days).
    for slow in ("1001ms", "99999999ms", "0.05x"):
        bad = await stack.post("/v1/responses", body, **{"x-sse-cache-replay": slow})
        assert bad.status_code == 400, slow
        assert "x-sse-cache-replay" in bad.json()["error"]["message"]
    paced = await stack.post("/v1/responses", body, **{"x-sse-cache-replay": "1ms"})
    assert paced.headers["x-sse-cache"] == "hit"
    # no-store, the miss after it, no-cache, refresh, team-b, ttl, max-age=0, long: 8 calls
    assert await stack.upstream_calls() == 8


async def test_two_tenants_never_share_an_entry(stack: Stack) -> None:
    body = responses_body("tenants")
    assert (await stack.post("/v1/responses", body)).headers["x-sse-cache"] == "miss"
    b = await stack.http.post("/v1/responses", json=body, headers=KEY_B)
    assert b.headers["x-sse-cache"] == "miss"
    # No credential: the caller cannot be told apart, so nothing is cached for it.
    anonymous = await stack.http.post("/v1/responses", json=body)
    assert anonymous.headers["x-sse-cache"] == "bypass"
    assert (await stack.post("/v1/responses", body)).headers["x-sse-cache"] == "hit"
    assert await stack.upstream_calls() == 3


async def test_proxies_of_two_upstreams_on_one_cache_never_share_an_entry(
    serve: Serve, tmp_path: Path
) -> None:
    # One cache file, two upstreams, the same request and key (local servers take any):
    # each upstream's answer is its own, and so is the stream a response id resumes (the
    # two give out the same ids: the mock is deterministic).
    backend = f"sqlite:///{tmp_path / 'shared.db'}"
    body = responses_body("two upstreams")
    async with serve(MockUpstream()) as first, serve(MockUpstream()) as second:
        statuses: list[str] = []
        keys: dict[str, str] = {}
        for upstream in (first, second, first, second):
            app = create_proxy_app(upstream, backend)
            try:
                async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy) as client:
                    response = await client.post("/v1/responses", json=body, headers=KEY_A)
                    statuses.append(response.headers["x-sse-cache"])
                    keys.setdefault(upstream, response.headers["x-sse-cache-key"])
                    created = json.loads(SSEParser().feed(response.content)[0].data)
                    resume = f"/v1/responses/{created['response']['id']}?stream=true"
                    resumed = await client.get(resume, headers=KEY_A)
                    assert resumed.headers["x-sse-cache-key"] == keys[upstream]
            finally:
                await app.aclose()
    assert statuses == ["miss", "miss", "hit", "hit"]
    assert keys[first] != keys[second]


async def test_a_hit_answers_with_the_status_the_upstream_gave(
    serve: Serve, tmp_path: Path
) -> None:
    # Any 2xx answer is stored; a hit gives its own status back, not a 200.
    mock = MockUpstream()

    async def non_authoritative(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "status": 203}
            await send(message)

        await mock(scope, receive, sending)

    async with serve(non_authoritative) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'cache.db'}")
        try:
            async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy) as client:
                answers = [
                    await client.post("/v1/responses", json=responses_body("203"), headers=KEY_A)
                    for _ in range(2)
                ]
        finally:
            await app.aclose()
    assert [(a.status_code, a.headers["x-sse-cache"]) for a in answers] == [
        (203, "miss"),
        (203, "hit"),
    ]
    assert answers[0].content == answers[1].content


async def test_one_date_and_one_server_header_per_response(stack: Stack) -> None:
    # The upstream's server writes both, and so does the proxy's: one of each goes out.
    miss = await stack.post("/v1/responses", responses_body("one date"))
    hit = await stack.post("/v1/responses", responses_body("one date"))
    other = await stack.http.get("/_mock/stats")  # passed through
    for response in (miss, hit, other):
        assert len(response.headers.get_list("date")) == 1, response.headers
        assert len(response.headers.get_list("server")) == 1, response.headers


async def _raw_post(proxy: str, body: dict[str, Any], version: str) -> tuple[bytes, bytes]:
    """POST over a raw socket (``version``: ``1.0`` or ``1.1``, closing): the response's head
    and everything after it until the server closed the connection."""
    host, port = proxy.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/responses HTTP/{version}\r\nhost: {host}\r\n"
        f"authorization: {KEY_A['authorization']}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode()
    async with await anyio.connect_tcp(host, int(port)) as sock:
        await sock.send(head + payload)
        raw = b""
        while True:
            try:
                raw += await sock.receive()
            except anyio.EndOfStream:
                break
    response_head, _, rest = raw.partition(b"\r\n\r\n")
    return response_head.lower(), rest


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_hit_says_its_length_so_a_cut_answer_can_be_told_from_a_whole_one(
    stack: Stack, version: str
) -> None:
    # A hit's body is known in full before it is sent: its length goes in the head, and no
    # chunk framing. An HTTP/1.0 client (no chunked encoding: the end of the body is the end
    # of the connection) can then tell a hit cut short from a whole one.
    miss = await stack.post("/v1/responses", responses_body("say the length"))
    head, body = await _raw_post(stack.proxy, responses_body("say the length"), version)
    assert b"\r\nx-sse-cache: hit" in head, head
    assert f"\r\ncontent-length: {len(miss.content)}".encode() in head, head
    assert b"transfer-encoding" not in head, head
    assert body == miss.content


async def test_a_path_with_escapes_is_never_answered_from_the_path_it_decodes_to(
    stack: Stack,
) -> None:
    # The upstream is asked the path as it was sent; an entry of the decoded path is another
    # request's answer.
    body = responses_body("escaped paths")
    assert (await stack.post("/v1/responses", body)).headers["x-sse-cache"] == "miss"
    for escaped in ("/v1%2Fresponses", "/v1/responses%3Fx=1", "/v1/respons%65s"):
        response = await stack.http.post(
            httpx2.URL(stack.proxy).copy_with(raw_path=escaped.encode()), json=body, headers=KEY_A
        )
        assert response.headers.get("x-sse-cache") != "hit", escaped
    assert await stack.upstream_calls() == 4


async def test_client_disconnect_mid_stream_stores_nothing(stack: Stack) -> None:
    body = responses_body("disconnect")
    headers = {**KEY_A, "x-mock-delay-ms": "20"}
    async with stack.http.stream("POST", "/v1/responses", json=body, headers=headers) as r:
        assert r.headers["x-sse-cache"] == "miss"
        key = r.headers["x-sse-cache-key"]
        async for _ in r.aiter_raw():
            break  # leave after the first chunk: the connection is closed
    with anyio.fail_after(DEADLOCK_GUARD):
        # The proxy noticed and gave up the recording (its exchange is over: the flight
        # failed), and stopped its upstream call: observable, no time to guess.
        notice = await stack.notices.wait("not_stored", key)
        while stack.upstream_app.stats()["disconnects"] < 1:  # noqa: ASYNC110
            await anyio.sleep(0.01)  # the upstream's own view: there is no event to wait on
    assert notice.detail
    again = await stack.post("/v1/responses", body)
    assert again.headers["x-sse-cache"] == "miss"


def _anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def test_an_error_after_message_stop_reaches_every_follower_as_the_providers_error(
    serve: Serve,
) -> None:
    # The upstream sends a whole message, then an `event: error` (its body not ended yet).
    # The producer's SDK raises the provider's error and closes its response; its followers'
    # SDKs must raise the same error, not a broken connection (helper-162: the proxy failed
    # their streams at message_stop, without the error event), and nothing is stored.
    message = {
        "id": "msg_01after",
        "type": "message",
        "role": "assistant",
        "model": "claude-mock-1",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
    pieces = [
        _anthropic_event("message_start", {"type": "message_start", "message": message}),
        _anthropic_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _anthropic_event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi"},
            },
        ),
        _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + _anthropic_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 1},
            },
        )
        + _anthropic_event("message_stop", {"type": "message_stop"}),
        _anthropic_event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ),
    ]
    gate = anyio.Event()  # the error waits until the producer's client has message_stop
    calls = 0

    async def upstream_app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        if scope["type"] != "http":
            return
        calls += 1
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for piece in pieces[:-1]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": pieces[-1], "more_body": True})
        while (await receive())["type"] != "http.disconnect":  # the body is never ended
            pass

    request = {
        "model": "claude-mock-1",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": "x"}],
    }
    outcomes: list[str] = []
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, "memory://")
        try:
            async with serve(app) as proxy:
                client = anthropic.AsyncAnthropic(base_url=proxy, api_key="sk-a", max_retries=0)

                async def read(follow: Any = None) -> None:
                    stream = await client.messages.create(**request, stream=True)
                    try:
                        async with stream:
                            async for event in stream:
                                if follow is not None:
                                    await follow()
                                    follow = None
                                if event.type == "message_stop" and follow is None:
                                    gate.set()
                    except anthropic.APIStatusError as exc:
                        outcomes.append(f"provider's error: {exc.body}")
                    except anthropic.APIError as exc:
                        outcomes.append(f"other: {exc!r}")

                with anyio.fail_after(DEADLOCK_GUARD):
                    async with anyio.create_task_group() as tg:

                        async def join() -> None:  # once the stream is live, three follow
                            for _ in range(3):
                                tg.start_soon(read)
                            await anyio.wait_all_tasks_blocked()

                        await read(join)
                again = await client.messages.create(**request, stream=True)
                async with again:
                    cached = again.response.headers["x-sse-cache"]
                await client.close()
        finally:
            await app.aclose()
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert outcomes == [f"provider's error: {error}"] * 4
    assert cached == "miss" and calls == 2


@pytest.mark.parametrize("mode", ["500", "429", "fail-mid-stream", "bad-sse"])
async def test_upstream_failures_reach_the_client_and_are_not_stored(
    stack: Stack, mode: str
) -> None:
    body = responses_body(f"failure {mode}")
    failed = await stack.post("/v1/responses", body, **{"x-mock-error": mode})
    async with httpx2.AsyncClient(base_url=stack.upstream) as upstream:
        direct = await upstream.post(
            "/v1/responses", json=body, headers={**KEY_A, "x-mock-error": mode}
        )
    assert failed.status_code == direct.status_code
    assert failed.content == direct.content  # passed through unchanged
    again = await stack.post("/v1/responses", body)
    assert again.headers["x-sse-cache"] == "miss"


async def test_cut_upstream_cuts_the_client_and_is_not_stored(stack: Stack) -> None:
    body = responses_body("cut")
    with pytest.raises(httpx2.HTTPError):
        await stack.post("/v1/responses", body, **{"x-mock-error": "cut"})
    again = await stack.post("/v1/responses", body)
    assert again.headers["x-sse-cache"] == "miss"


async def test_identical_concurrent_requests_share_one_upstream_stream(stack: Stack) -> None:
    body = responses_body("together")
    results: list[httpx2.Response] = []
    go = anyio.Event()

    async def one() -> None:
        await go.wait()  # released together
        results.append(await stack.post("/v1/responses", body, **{"x-mock-delay-ms": "10"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
        go.set()
    assert sorted(r.headers["x-sse-cache"] for r in results) == ["miss", "shared"]
    assert results[0].content == results[1].content
    assert await stack.upstream_calls() == 1


async def test_other_routes_pass_through(stack: Stack) -> None:
    models = await stack.http.get("/v1/models", headers=KEY_A)
    assert models.status_code == 200 and "x-sse-cache" not in models.headers
    missing = await stack.http.post("/v1/unknown", json={}, headers=KEY_A)
    assert missing.status_code == 404


async def test_health_and_metrics(stack: Stack) -> None:
    await stack.post("/v1/responses", responses_body("metrics"))
    await stack.post("/v1/responses", responses_body("metrics"))
    health = await stack.http.get("/_sse_cache/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = (await stack.http.get("/_sse_cache/metrics")).text
    assert 'sse_cache_requests_total{status="hit"} 1' in text
    assert 'sse_cache_requests_total{status="miss"} 1' in text
    assert "sse_cache_stores_total 1" in text
    bad = await stack.post("/v1/responses", responses_body("metrics"), **{"x-sse-cache-ttl": "x"})
    assert bad.status_code == 400
    text = (await stack.http.get("/_sse_cache/metrics")).text
    assert "sse_cache_invalid_requests_total 1" in text
    replayed = next(
        line for line in text.splitlines() if line.startswith("sse_cache_replayed_bytes_total")
    )
    assert float(replayed.split()[1]) > 1000


async def test_unreachable_upstream_is_a_502(serve: Serve, tmp_path: Path) -> None:
    app = create_proxy_app("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'c.db'}")
    async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy) as client:
        r = await client.post("/v1/responses", json=responses_body("down"), headers=KEY_A)
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    await app.aclose()


async def test_resume_a_responses_stream_from_the_cache(stack: Stack) -> None:
    first = await stack.post("/v1/responses", responses_body("resume me"))
    events = SSEParser().feed(first.content)
    response_id = json.loads(events[0].data)["response"]["id"]
    url = f"/v1/responses/{response_id}?stream=true&starting_after=5"
    resumed = await stack.http.get(url, headers=KEY_A)
    assert resumed.status_code == 200 and resumed.headers["x-sse-cache"] == "hit"
    assert int(resumed.headers["age"]) >= 0 and int(resumed.headers["x-sse-cache-ttl"]) <= 600
    assert resumed.headers["content-length"] == str(len(resumed.content))  # all in memory
    tail = SSEParser().feed(resumed.content)
    assert [json.loads(e.data)["sequence_number"] for e in tail] == list(range(6, len(events)))
    assert [e.data for e in tail] == [e.data for e in events[6:]]
    # Another tenant cannot resume it from the cache: the request goes upstream.
    other = await stack.http.get(url, headers=KEY_B)
    assert "x-sse-cache" not in other.headers
    assert await stack.upstream_calls() == 2
    # Counted as a resume, as one from the live stream is: not as a request on a cached
    # route (it was a hit there, and no resume).
    text = (await stack.http.get("/_sse_cache/metrics")).text
    assert metric_value(text, "sse_cache_resumes_total") == 1
    assert metric_value(text, "sse_cache_requests_total", status="hit") == 0
    assert metric_value(text, "sse_cache_requests_total", status="miss") == 1


async def test_finish_on_disconnect_fills_the_cache_in_the_background(
    serve: Serve, tmp_path: Path
) -> None:
    upstream_app = MockUpstream(delay=0.005, first_delay=0.005)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, "memory://", finish_on_disconnect=True)
        async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy) as client:
            body = responses_body("leave early")
            async with client.stream("POST", "/v1/responses", json=body, headers=KEY_A) as r:
                assert r.headers["x-sse-cache"] == "miss"
                async for _ in r.aiter_raw():
                    break  # the client leaves after the first chunk
            status = "miss"
            with anyio.fail_after(10):
                while status != "hit":  # the proxy finishes the stream without the client
                    await anyio.sleep(0.05)
                    r = await client.post(
                        "/v1/responses", json=body, headers={**KEY_A, "x-sse-cache-max-age": "60"}
                    )
                    status = r.headers["x-sse-cache"]
                    assert status in ("hit", "shared"), status
            assert SSEParser().feed(r.content)[-1].event == "response.completed"
        await app.aclose()
    assert upstream_app.stats()["total"] == 1


@pytest.mark.parametrize("depth", [100, 600])
async def test_a_deeply_nested_body_is_forwarded_uncached_not_a_500(
    stack: Stack, depth: int, capfd: pytest.CaptureFixture[str]
) -> None:
    # A small body nested deeper than the cache keys: the upstream answers it as it would
    # (here the mock's own answer), marked bypass; no 500, no traceback from the cache.
    body = ('{"model": "gpt-mock", "input": ' + "[" * depth + "]" * depth + "}").encode()
    headers = {**KEY_A, "content-type": "application/json"}
    proxied = await stack.http.post("/v1/responses", content=body, headers=headers)
    async with httpx2.AsyncClient(base_url=stack.upstream) as upstream:
        direct = await upstream.post("/v1/responses", content=body, headers=headers)
    assert (proxied.status_code, proxied.content) == (direct.status_code, direct.content)
    assert proxied.headers["x-sse-cache"] == "bypass"
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("route", ["/v1/responses", "/v1/generic"])
@pytest.mark.parametrize(
    "tail",
    [b"", b'data: {"type":"keepalive"}', b'data: {"type":"keepalive"}\n'],
    ids=["terminated", "no-line-end", "no-blank-line"],
)
async def test_a_stream_that_ends_inside_an_event_is_passed_on_but_never_stored(
    serve: Serve, tmp_path: Path, route: str, tail: bytes
) -> None:
    # (Mutation audit T3.) A complete Responses stream — response.completed included — and
    # then the start of one more event that the body ends inside (no blank line after it).
    # Per WHATWG that last event is never dispatched: the stream did not end cleanly, so
    # neither the schema-aware route nor the generic one (complete at a clean end) stores it.
    # The client still gets every byte. ("terminated": the same stream without that tail,
    # stored on both routes: the setup itself stores.)
    pieces = [serialize_sse(responses_stream("ends inside an event", text_deltas=4))]
    if tail:
        pieces.append(tail)
    upstream_app = GatedUpstream(pieces)
    routes = {"/v1/responses": OpenAIResponses(), "/v1/generic": GenericSSE()}
    body = responses_body(f"ends inside an event {route}")
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'c.db'}", routes=routes)
        try:
            async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy) as client:
                first = await client.post(route, json=body, headers=KEY_A)
                again = await client.post(route, json=body, headers=KEY_A)
        finally:
            await app.aclose()
    assert first.headers["x-sse-cache"] == "miss" and first.content == upstream_app.body
    assert again.content == upstream_app.body
    assert again.headers["x-sse-cache"] == ("miss" if tail else "hit")
    assert upstream_app.calls == (2 if tail else 1)


@pytest.mark.parametrize("processes", ["one proxy", "two proxies"])
async def test_a_refresh_is_not_undone_by_an_older_identical_answer_still_streaming(
    serve: Serve, tmp_path: Path, processes: str
) -> None:
    # An operator refreshes an entry (x-sse-cache-refresh) to evict a bad answer; a request
    # begun before the refresh and still streaming stored its answer over the refreshed one
    # when it ended (helper-89). Its own client still gets all of it; the entry stays the
    # refresh's — also when the refresh went through another proxy on the same cache.
    old = GatedUpstream(responses_stream("from the bad minute", text_deltas=4), hold_after=2)
    new = GatedUpstream(responses_stream("refreshed", text_deltas=4))
    calls: list[Any] = []

    async def upstream_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append(scope["path"])
        await (old if len(calls) <= 1 else new)(scope, receive, send)

    backend = f"sqlite:///{tmp_path / 'shared.db'}"
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, backend)
        other = create_proxy_app(upstream, backend) if processes == "two proxies" else app
        try:
            async with (
                serve(app) as proxy,
                serve(other) as other_proxy,
                httpx2.AsyncClient(base_url=proxy, timeout=30) as c,
                httpx2.AsyncClient(base_url=other_proxy, timeout=30) as refreshing,
            ):
                body = responses_body("refresh me")
                async with c.stream("POST", "/v1/responses", json=body, headers=KEY_A) as older:
                    assert older.headers["x-sse-cache"] == "miss"
                    await old.wait_sent(2)
                    refreshed = await refreshing.post(
                        "/v1/responses",
                        json=body,
                        headers={**KEY_A, "x-sse-cache-refresh": "1"},
                    )
                    assert refreshed.headers["x-sse-cache"] == "refresh"
                    assert refreshed.content == b"".join(new.pieces)
                    old.gate.set()
                    held = await older.aread()
                assert held == b"".join(old.pieces)  # its own client got all of its answer
                later = await c.post("/v1/responses", json=body, headers=KEY_A)
                assert later.headers["x-sse-cache"] == "hit"
                assert later.content == refreshed.content
        finally:
            await app.aclose()
            await other.aclose()
    assert len(calls) == 2


async def test_a_proxy_app_served_again_forwards_and_caches_again(
    serve: Serve, tmp_path: Path
) -> None:
    # The lifespan's shutdown closes the app's upstream client and the backend it opened.
    # Served again (a test client per test on one app, a server restarted in process), its
    # cache was reopened but its upstream client was not: every request that went upstream
    # failed with a 500 ("the client has been closed").
    from sse_cache._uvicorn import serve as serve_with

    upstream_app = MockUpstream(delay=0.001, first_delay=0.005)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'cache.db'}")
        seen = []
        for prompt in ("first serving", "second serving"):
            async with (
                serve_with(app, lifespan="on") as proxy,
                httpx2.AsyncClient(base_url=proxy, timeout=30) as http,
            ):
                models = await http.get("/v1/models", headers=KEY_A)
                assert models.status_code == 200, models.text
                for _ in range(2):
                    answer = await http.post(
                        "/v1/responses", json=responses_body(prompt), headers=KEY_A
                    )
                    assert answer.status_code == 200, answer.text
                    seen.append(answer.headers["x-sse-cache"])
    assert seen == ["miss", "hit", "miss", "hit"]


async def test_a_proxys_followers_are_as_patient_as_its_upstream_reads() -> None:
    # Followers gave up at 300 s of silence while the request they followed, reading its
    # upstream, would wait --upstream-timeout (600 s by default): a reasoning model that
    # thought for 5 to 10 minutes without an event aborted every follower (helper-102).
    def patience(app: ProxyApp) -> float:
        service = app.cached.service
        matched = service.policy.match("POST", "/v1/responses")
        assert matched is not None
        return service.cache_for(matched[1]).join_timeout

    defaults = create_proxy_app("http://127.0.0.1:9", "memory://")
    longer = create_proxy_app("http://127.0.0.1:9", "memory://", upstream_timeout=1800)
    chosen = create_proxy_app("http://127.0.0.1:9", "memory://", join_timeout=30)
    try:
        assert (patience(defaults), patience(longer), patience(chosen)) == (600, 1800, 30)
    finally:
        for app in (defaults, longer, chosen):
            await app.aclose()

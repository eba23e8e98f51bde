"""``sse_cache.testing.MockUpstream`` and ``sse-cache mock-upstream``, with the official
``openai`` and ``anthropic`` SDKs as the oracle: every event and answer must validate as the
SDK's own types, and each SDK's stream helpers must rebuild exactly the non-stream answer.

Most tests talk to the app in-process (httpx2's ``ASGITransport``, or direct ASGI calls where
the timing of each ``send`` matters); one runs it under uvicorn on a loopback port.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anthropic
import anyio
import httpx2
import openai
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from sse_cache.cli import mock as mock_cli
from sse_cache.errors import SSEError
from sse_cache.events import Event, SSEParser
from sse_cache.testing import ERROR_MODES, MockUpstream, UpstreamCut

pytestmark = pytest.mark.anyio

# The SDKs stop reading a stream at `[DONE]` or an error and leave their async generators to the
# garbage collector; trio reports that as a ResourceWarning, which `filterwarnings = error` turns
# into a failure. Tests that iterate SDK streams therefore run on asyncio only.
sdk_streams = pytest.mark.parametrize("anyio_backend", ["asyncio"])

# A deadlock guard only: what it guards takes milliseconds, what a bug would cost is an hour
# (the apps of those tests wait an hour between events).
GUARD = 30.0
HOUR = 3600.0

RESPONSE_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
ANTHROPIC_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RawMessageStreamEvent)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
]
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER, "strict": True},
    }
]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]
USER = [{"role": "user", "content": "What is sse-cache?"}]
ROUTES = {
    "responses": ("/v1/responses", {"model": "gpt-mock-1", "input": "What is sse-cache?"}),
    "chat": ("/v1/chat/completions", {"model": "gpt-mock-1", "messages": USER}),
    "anthropic": (
        "/v1/messages",
        {"model": "claude-mock-1", "max_tokens": 1024, "messages": USER},
    ),
}


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def app() -> MockUpstream:
    return MockUpstream(delay=0, seed=7)


def http_client(app: MockUpstream, **kwargs: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://mock", **kwargs)


@asynccontextmanager
async def openai_client(app: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with http_client(app) as http:
        yield openai.AsyncOpenAI(
            base_url="http://mock/v1", api_key="x", http_client=http, max_retries=0
        )


@asynccontextmanager
async def anthropic_client(app: MockUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with http_client(app) as http:
        yield anthropic.AsyncAnthropic(
            base_url="http://mock", api_key="x", http_client=http, max_retries=0
        )


def parse(raw: bytes) -> list[Event]:
    parser = SSEParser()
    events = parser.feed(raw)
    parser.close()
    assert not parser.discarded, "the stream ended inside an event"
    return events


async def post(
    app: MockUpstream, path: str, body: Mapping[str, Any], **headers: str
) -> httpx2.Response:
    async with http_client(app) as http:
        return await http.post(path, json=dict(body), headers=headers)


Sent = list[tuple[float, dict[str, Any]]]


async def call(
    app: MockUpstream,
    path: str,
    body: Mapping[str, Any] | None = None,
    *,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    leave: anyio.Event | None = None,
    on_send: Callable[[dict[str, Any]], None] | None = None,
) -> Sent:
    """One direct ASGI call: every message the app sends, with its time since the call.
    ``leave``: the client disconnects once it is set (else once the body is complete);
    ``on_send`` sees each message as it is sent."""
    sent: Sent = []
    finished = anyio.Event()
    payload = json.dumps(body).encode() if body is not None else b""
    delivered = False
    start = time.perf_counter()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await (finished if leave is None else leave).wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append((time.perf_counter() - start, dict(message)))
        if on_send is not None:
            on_send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            finished.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1234),
        "server": ("mock", 80),
    }
    try:
        await app(scope, receive, send)
    finally:
        finished.set()
    return sent


def body_of(sent: Sent) -> bytes:
    return b"".join(m.get("body", b"") for _, m in sent if m["type"] == "http.response.body")


def body_times(sent: Sent) -> list[float]:
    return [t for t, m in sent if m["type"] == "http.response.body" and m.get("body")]


# -- OpenAI Responses ---------------------------------------------------------------------


@sdk_streams
async def test_responses_stream_validates_and_rebuilds_the_non_stream_answer(
    app: MockUpstream,
) -> None:
    async with openai_client(app) as client:
        stream = await client.responses.create(
            model="gpt-mock-1", input="What is sse-cache?", stream=True
        )
        events = [event async for event in stream]
        plain = await client.responses.create(model="gpt-mock-1", input="What is sse-cache?")
        async with client.responses.stream(
            model="gpt-mock-1", input="What is sse-cache?"
        ) as helper:
            final = await helper.get_final_response()

    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Several reasoning summary parts, each streamed by summary_index.
    indexes = {e.summary_index for e in events if e.type == "response.reasoning_summary_text.delta"}
    assert indexes == {0, 1, 2}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert kinds.count("response.output_text.delta") == 24
    completed = events[-1]
    assert completed.type == "response.completed"
    assert isinstance(plain, Response)
    assert completed.response.model_dump() == plain.model_dump()
    assert plain.output_text == text
    assert final.output_text == text
    assert final.id == plain.id
    assert final.usage == plain.usage
    reasoning = [item for item in plain.output if item.type == "reasoning"]
    assert [len(item.summary) for item in reasoning] == [3]


async def test_responses_raw_events_validate_as_sdk_types(app: MockUpstream) -> None:
    body = {**ROUTES["responses"][1], "stream": True}
    response = await post(app, "/v1/responses", body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["x-request-id"].startswith("req_")
    events = parse(response.content)
    for event in events:
        model = RESPONSE_EVENT.validate_json(event.data)
        assert event.event == model.type  # event: line and payload type agree
    # The canonical wire form: event line + one compact JSON data line.
    assert response.content.startswith(b'event: response.created\ndata: {"type":')
    plain = await post(app, "/v1/responses", ROUTES["responses"][1])
    assert plain.headers["content-type"] == "application/json"
    Response.model_validate_json(plain.content)
    completed = json.loads(events[-1].data)["response"]
    assert json.dumps(completed).encode() == json.dumps(plain.json()).encode()
    assert events[-1].data.encode() == (
        b'{"type":"response.completed","sequence_number":%d,"response":%s}'
        % (len(events) - 1, plain.content)
    )


@sdk_streams
async def test_responses_function_call_then_tool_result(app: MockUpstream) -> None:
    async with openai_client(app) as client:
        stream = await client.responses.create(
            model="gpt-mock-1",
            input="Weather in Paris?",
            tools=RESPONSES_TOOLS,
            stream=True,
        )
        events = [event async for event in stream]
        async with client.responses.stream(
            model="gpt-mock-1",
            input="Weather in Paris?",
            tools=RESPONSES_TOOLS,
        ) as helper:
            final = await helper.get_final_response()
        call_item = next(item for item in final.output if item.type == "function_call")
        follow_up = await client.responses.create(
            model="gpt-mock-1",
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": call_item.call_id,
                    "name": call_item.name,
                    "arguments": call_item.arguments,
                },
                {"type": "function_call_output", "call_id": call_item.call_id, "output": "sun"},
            ],
            tools=RESPONSES_TOOLS,
        )

    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.output_text.delta" not in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == done.arguments
    args = json.loads(done.arguments)
    assert set(args) == {"city", "days", "unit"}
    assert isinstance(args["days"], int) and args["unit"] in ("celsius", "fahrenheit")
    assert call_item.name == "get_weather" and call_item.call_id.startswith("call_")
    assert json.loads(call_item.arguments) == args
    # The tool answered: the next turn is text, not another call.
    assert follow_up.output_text
    assert [item.type for item in follow_up.output] == ["reasoning", "message"]


async def test_responses_structured_output_follows_the_schema(app: MockUpstream) -> None:
    class Weather(pydantic.BaseModel):
        city: str
        days: int
        tags: list[str]

    async with openai_client(app) as client:
        parsed = await client.responses.parse(
            model="gpt-mock-1", input="weather as JSON", text_format=Weather
        )
    assert isinstance(parsed.output_parsed, Weather)


async def test_responses_length_and_summaries_are_configurable(app: MockUpstream) -> None:
    body = {**ROUTES["responses"][1], "stream": True}

    async def kinds(extra: Mapping[str, Any], **headers: str) -> list[str]:
        response = await post(app, "/v1/responses", {**body, **extra}, **headers)
        return [e.event or "" for e in parse(response.content)]

    five = await kinds({}, **{"x-mock-deltas": "5", "x-mock-summaries": "0"})
    assert five.count("response.output_text.delta") == 5
    assert "response.reasoning_summary_part.added" not in five
    capped = await kinds({"max_output_tokens": 3})
    assert capped.count("response.output_text.delta") == 3
    assert capped[-1] == "response.completed"  # a cap, not a truncation
    no_summary = await kinds({"reasoning": {"effort": "low", "summary": None}})
    assert "response.reasoning_summary_part.added" not in no_summary
    four = await kinds({}, **{"x-mock-summaries": "4"})
    assert four.count("response.reasoning_summary_part.added") == 4
    # Encrypted reasoning is returned when asked for, as the API does.
    asked = await post(app, "/v1/responses", {**body, "include": ["reasoning.encrypted_content"]})
    item = json.loads(parse(asked.content)[-1].data)["response"]["output"][0]
    assert item["type"] == "reasoning" and item["encrypted_content"].startswith("gAAAAAB")


# -- OpenAI Chat Completions --------------------------------------------------------------


@sdk_streams
async def test_chat_stream_validates_and_rebuilds_the_non_stream_answer(
    app: MockUpstream,
) -> None:
    async with openai_client(app) as client:
        stream = await client.chat.completions.create(
            model="gpt-mock-1",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        plain = await client.chat.completions.create(
            model="gpt-mock-1",
            messages=USER,
        )
        async with client.chat.completions.stream(
            model="gpt-mock-1",
            messages=USER,
            stream_options={"include_usage": True},
        ) as helper:
            final = await helper.get_final_completion()

    assert isinstance(plain, ChatCompletion)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert final.id == plain.id and final.created == plain.created
    assert final.usage == plain.usage
    assert final.choices[0].message.content == plain.choices[0].message.content
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"


async def test_chat_raw_stream_wire_form(app: MockUpstream) -> None:
    path, body = ROUTES["chat"]
    response = await post(app, path, {**body, "stream": True, "n": 2})
    events = parse(response.content)
    assert all(e.event is None for e in events)
    assert events[-1].data == "[DONE]"
    assert response.content.endswith(b"data: [DONE]\n\n")
    chunks = [ChatCompletionChunk.model_validate_json(e.data) for e in events[:-1]]
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    # n=2: the two choices interleaved, each with its own text and finish_reason.
    assert [c.choices[0].index for c in chunks[:4]] == [0, 1, 0, 1]
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        for i in (0, 1)
    ]
    assert texts[0] != texts[1]
    plain = ChatCompletion.model_validate_json((await post(app, path, {**body, "n": 2})).content)
    assert [c.message.content for c in plain.choices] == texts


@sdk_streams
async def test_chat_tool_calls(app: MockUpstream) -> None:
    async with openai_client(app) as client:
        async with client.chat.completions.stream(
            model="gpt-mock-1",
            messages=USER,
            tools=CHAT_TOOLS,
        ) as helper:
            final = await helper.get_final_completion()
        plain = await client.chat.completions.create(
            model="gpt-mock-1",
            messages=USER,
            tools=CHAT_TOOLS,
        )
        call_ = plain.choices[0].message.tool_calls[0]
        follow_up = await client.chat.completions.create(
            model="gpt-mock-1",
            messages=[
                *USER,
                {"role": "assistant", "tool_calls": [call_.model_dump()]},
                {"role": "tool", "tool_call_id": call_.id, "content": "sun"},
            ],
            tools=CHAT_TOOLS,
        )
    assert plain.choices[0].finish_reason == final.choices[0].finish_reason == "tool_calls"
    streamed = final.choices[0].message.tool_calls[0]
    assert streamed.id == call_.id
    assert streamed.function.arguments == call_.function.arguments
    assert set(json.loads(call_.function.arguments)) == {"city", "days", "unit"}
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.choices[0].message.content


async def test_chat_structured_output(app: MockUpstream) -> None:
    class City(pydantic.BaseModel):
        name: str
        population: int

    async with openai_client(app) as client:
        parsed = await client.chat.completions.parse(
            model="gpt-mock-1",
            messages=USER,
            response_format=City,
        )
    assert isinstance(parsed.choices[0].message.parsed, City)


# -- Anthropic Messages -------------------------------------------------------------------


@sdk_streams
async def test_anthropic_stream_with_thinking_and_tools(app: MockUpstream) -> None:
    request: dict[str, Any] = {
        "model": "claude-mock-1",
        "max_tokens": 2048,
        "messages": USER,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": ANTHROPIC_TOOLS,
    }
    async with anthropic_client(app) as client:
        async with client.messages.stream(**request) as helper:
            kinds = [event.type async for event in helper]
            final = await helper.get_final_message()
        plain = await client.messages.create(**request)

    assert isinstance(plain, Message)
    assert final.model_dump() == plain.model_dump()
    assert [b.type for b in plain.content] == ["thinking", "text", "tool_use"]
    assert plain.stop_reason == "tool_use"
    thinking, _, tool = plain.content
    assert thinking.type == "thinking" and thinking.signature and thinking.thinking
    assert tool.type == "tool_use" and tool.name == "get_weather"
    assert set(tool.input) == {"city", "days", "unit"}
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"

    raw = await post(app, "/v1/messages", {**request, "stream": True})
    events = parse(raw.content)
    for event in events:
        if event.event != "ping":  # not a RawMessageStreamEvent: the SDK skips it
            assert event.event == ANTHROPIC_EVENT.validate_json(event.data).type
    names = [e.event for e in events]
    assert names.count("ping") == 1
    deltas = [
        json.loads(e.data)["delta"]["type"] for e in events if e.event == "content_block_delta"
    ]
    assert {"thinking_delta", "signature_delta", "text_delta", "input_json_delta"} <= set(deltas)
    assert raw.headers["request-id"].startswith("req_")


@sdk_streams
async def test_anthropic_plain_text_and_tool_result(app: MockUpstream) -> None:
    async with anthropic_client(app) as client:
        async with client.messages.stream(
            model="claude-mock-1",
            max_tokens=5,
            messages=USER,
        ) as helper:
            text = await helper.get_final_text()
        plain = await client.messages.create(
            model="claude-mock-1",
            max_tokens=1024,
            tools=ANTHROPIC_TOOLS,
            messages=[
                *USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}],
                },
            ],
        )
    assert len(text.split(" ")) == 5  # max_tokens caps the answer
    assert [b.type for b in plain.content] == ["text"]
    assert plain.stop_reason == "end_turn"


# -- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("stream", [True, False])
async def test_same_request_same_bytes(app: MockUpstream, route: str, stream: bool) -> None:
    path, body = ROUTES[route]
    body = {**body, "stream": stream}
    first = await post(app, path, body)
    again = await post(app, path, body)
    other_app = await post(MockUpstream(delay=0, seed=7), path, body)
    assert first.status_code == 200
    assert first.content == again.content == other_app.content
    different_prompt = await post(app, path, {**body, **_prompt(route, "something else")})
    different_seed = await post(MockUpstream(delay=0, seed=8), path, body)
    assert different_prompt.content != first.content
    assert different_seed.content != first.content


def _prompt(route: str, text: str) -> dict[str, Any]:
    if route == "responses":
        return {"input": text}
    return {"messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_stream_and_non_stream_carry_the_same_answer(app: MockUpstream, route: str) -> None:
    path, body = ROUTES[route]
    # Transport and bookkeeping fields change neither the streamed nor the plain answer.
    streamed = await post(app, path, {**body, "stream": True, "metadata": {"a": "b"}})
    plain = await post(app, path, {**body, "stream": False})
    events = parse(streamed.content)
    answer = plain.json()
    ident = answer["id"]
    assert ident in events[0].data
    if route == "responses":
        assert json.loads(events[-1].data)["response"]["output"] == answer["output"]
    elif route == "chat":
        text = "".join(
            json.loads(e.data)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
        )
        assert text == answer["choices"][0]["message"]["content"]
    else:
        text = "".join(
            json.loads(e.data)["delta"].get("text", "")
            for e in events
            if e.event == "content_block_delta"
        )
        assert text == answer["content"][0]["text"]


# -- pacing -------------------------------------------------------------------------------


async def test_pacing_first_delay_then_delay() -> None:
    # Lower bounds only: a sleep never ends early, and how much later it ends is the machine's.
    first_delay = 0.3
    app = MockUpstream(delay=0.004, first_delay=first_delay)
    path, body = ROUTES["chat"]
    sent = await call(app, path, {**body, "stream": True}, headers={"x-mock-deltas": "6"})
    times = body_times(sent)
    assert sent[0][1]["type"] == "http.response.start"
    assert times[0] >= first_delay - 0.005
    assert len(times) == 9  # role chunk, 6 deltas, finish chunk, [DONE]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.003


async def test_headers_go_out_at_once_and_delays_can_be_turned_off() -> None:
    # The first event an hour away: the headers arrive anyway (not with the first event),
    # and then the client leaves.
    app = MockUpstream(delay=0, first_delay=HOUR)
    path, body = ROUTES["chat"]
    leave = anyio.Event()

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            leave.set()

    with anyio.fail_after(GUARD):
        sent = await call(app, path, {**body, "stream": True}, leave=leave, on_send=on_send)
    assert [m["type"] for _, m in sent] == ["http.response.start"]
    assert sent[0][1]["status"] == 200
    # Per-request override: no delays at all (not even the hour before the first event).
    with anyio.fail_after(GUARD):
        fast = await call(app, path, {**body, "stream": True}, headers={"x-mock-delay-ms": "0"})
    assert body_of(fast).endswith(b"data: [DONE]\n\n")
    assert fast[-1][1].get("more_body") is False


async def test_non_stream_answer_takes_the_generation_time() -> None:
    app = MockUpstream(delay=0.002, first_delay=0.05)
    path, body = ROUTES["responses"]
    sent = await call(app, path, body, headers={"x-mock-deltas": "10", "x-mock-summaries": "0"})
    assert sent[0][0] >= 0.05 + 0.002 * 10
    assert json.loads(body_of(sent))["status"] == "completed"


# -- error modes --------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("status", [500, 429])
async def test_http_errors_are_provider_shaped(app: MockUpstream, route: str, status: int) -> None:
    path, body = ROUTES[route]
    response = await post(
        app,
        path,
        {**body, "stream": True},
        **{"x-mock-error": str(status), "x-mock-retry-after": "3"},
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    if route == "anthropic":
        assert error["type"] == "error"
        assert error["error"]["type"] == ("rate_limit_error" if status == 429 else "api_error")
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"}
    if status == 429:
        assert response.headers["retry-after"] == "3"


async def test_http_errors_through_the_sdks(app: MockUpstream) -> None:
    async with openai_client(app) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.responses.create(
                model="m", input="x", extra_headers={"x-mock-error": "429"}
            )
        assert limited.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="m",
                messages=USER,
                extra_headers={"x-mock-error": "500"},
            )
    async with anthropic_client(app) as aclient:
        with pytest.raises(anthropic.RateLimitError):
            await aclient.messages.create(
                model="m",
                max_tokens=10,
                messages=USER,
                extra_headers={"x-mock-error": "429"},
            )


@sdk_streams
async def test_fail_mid_stream_responses(app: MockUpstream) -> None:
    path, body = ROUTES["responses"]
    response = await post(
        app,
        path,
        {**body, "stream": True},
        **{"x-mock-error": "fail-mid-stream", "x-mock-error-after": "5"},
    )
    events = parse(response.content)
    assert len(events) == 6
    assert events[-1].event == "response.failed"
    failed = RESPONSE_EVENT.validate_json(events[-1].data)
    assert failed.sequence_number == 5  # the sequence goes on without a gap
    assert failed.response.status == "failed" and failed.response.error.code == "server_error"
    async with openai_client(app) as client:
        stream = await client.responses.create(
            model="gpt-mock-1",
            input="What is sse-cache?",
            stream=True,
            extra_headers={"x-mock-error": "fail-mid-stream"},
        )
        kinds = [event.type async for event in stream]
        plain = await client.responses.create(
            model="gpt-mock-1",
            input="What is sse-cache?",
            extra_headers={"x-mock-error": "fail-mid-stream"},
        )
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    assert plain.status == "failed"


@sdk_streams
async def test_fail_mid_stream_chat_and_anthropic(app: MockUpstream) -> None:
    path, body = ROUTES["chat"]
    raw = await post(app, path, {**body, "stream": True}, **{"x-mock-error": "fail-mid-stream"})
    events = parse(raw.content)
    assert "[DONE]" not in [e.data for e in events]
    assert json.loads(events[-1].data)["error"]["type"] == "server_error"

    path, body = ROUTES["anthropic"]
    raw = await post(app, path, {**body, "stream": True}, **{"x-mock-error": "fail-mid-stream"})
    events = parse(raw.content)
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["error"]["type"] == "overloaded_error"
    assert "message_stop" not in [e.event for e in events]

    async with openai_client(app) as client:
        stream = await client.chat.completions.create(
            model="gpt-mock-1",
            messages=USER,
            stream=True,
            extra_headers={"x-mock-error": "fail-mid-stream"},
        )
        with pytest.raises(openai.APIError, match="x-mock-error"):
            async for _ in stream:
                pass
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-mock-1",
                messages=USER,
                extra_headers={"x-mock-error": "fail-mid-stream"},
            )
    async with anthropic_client(app) as aclient:
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            async with aclient.messages.stream(
                model="claude-mock-1",
                max_tokens=100,
                messages=USER,
                extra_headers={"x-mock-error": "fail-mid-stream"},
            ) as helper:
                await helper.get_final_message()


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_cut_raises_after_part_of_the_stream(app: MockUpstream, route: str) -> None:
    path, body = ROUTES[route]
    full = parse((await post(app, path, {**body, "stream": True})).content)
    # `call` returns nothing when the app raises: record the messages through a wrapper.
    messages: list[dict[str, Any]] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def tap(message: Any) -> None:
            messages.append(dict(message))
            await send(message)

        await app(scope, receive, tap)

    with pytest.raises(UpstreamCut):
        await call(recording, path, {**body, "stream": True}, headers={"x-mock-error": "cut"})
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    assert all(m["more_body"] for m in bodies)  # the response was never completed
    got = parse(b"".join(m["body"] for m in bodies))
    assert len(got) == len(full) // 2
    assert got == full[: len(got)]
    # Through httpx2's ASGI transport the client sees the cut as the app's exception.
    with pytest.raises(UpstreamCut):
        await post(app, path, {**body, "stream": True}, **{"x-mock-error": "cut"})
    with pytest.raises(UpstreamCut):
        await post(app, path, body, **{"x-mock-error": "cut"})


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_bad_sse(app: MockUpstream, route: str) -> None:
    path, body = ROUTES[route]
    raw = await post(app, path, {**body, "stream": True}, **{"x-mock-error": "bad-sse"})
    assert raw.status_code == 200
    with pytest.raises(SSEError, match="UTF-8"):
        SSEParser().feed(raw.content)
    assert raw.content.endswith(b"\n\n") and b"\xff" in raw.content
    plain = await post(app, path, body, **{"x-mock-error": "bad-sse"})
    assert plain.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.content)


async def test_bad_control_headers_and_bodies(app: MockUpstream) -> None:
    path, body = ROUTES["responses"]
    wrong = await post(app, path, body, **{"x-mock-error": "explode"})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["param"] == "x-mock-error"
    assert "fail-mid-stream" in wrong.json()["error"]["message"]
    assert (await post(app, path, body, **{"x-mock-deltas": "many"})).status_code == 400
    async with http_client(app) as http:
        not_json = await http.post(path, content=b"{not json")
        assert not_json.status_code == 400
        array = await http.post("/v1/messages", content=b"[]")
        assert array.status_code == 400 and array.json()["type"] == "error"
        deep = b'{"input":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
        too_deep = await http.post(path, content=deep)  # deeper than the decoder follows
        assert too_deep.status_code == 400 and "nested" in too_deep.json()["error"]["message"]
    small = MockUpstream(delay=0, max_body_bytes=10)
    assert (await post(small, path, body)).status_code == 413
    assert {"fail-mid-stream", "cut", "bad-sse", "500", "429"} == ERROR_MODES


# -- routes, counters, disconnects --------------------------------------------------------


async def test_models_and_unknown_paths(app: MockUpstream) -> None:
    async with openai_client(app) as client:
        models = [m.id async for m in client.models.list()]
    assert "gpt-mock-1" in models
    async with anthropic_client(app) as aclient:
        page = await aclient.models.list()
    assert [m.id for m in page.data] == ["claude-mock-1"]
    async with http_client(app) as http:
        missing = await http.get("/v2/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "invalid_request_error"
        wrong_method = await http.get("/v1/responses")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        prefixed = await http.post("/openai/v1/chat/completions", json=ROUTES["chat"][1])
        assert prefixed.status_code == 200
        assert prefixed.json()["object"] == "chat.completion"


async def test_counters_and_reset(app: MockUpstream) -> None:
    async with http_client(app) as http:
        for _ in range(2):
            await http.post("/v1/responses", json={**ROUTES["responses"][1], "stream": True})
        await http.post("/v1/messages", json=ROUTES["anthropic"][1])
        await http.post(
            "/v1/chat/completions", json=ROUTES["chat"][1], headers={"x-mock-error": "500"}
        )
        await http.get("/nope")
        stats = (await http.get("/_mock/stats")).json()
        assert stats == app.stats()
        assert stats["total"] == 5
        assert stats["requests"] == {
            "POST /v1/responses": 2,
            "POST /v1/messages": 1,
            "POST /v1/chat/completions": 1,
            "GET /nope": 1,
        }
        assert stats["streams"] == 2
        assert stats["in_flight"] == 0 and stats["max_in_flight"] == 1
        recent = stats["recent"]
        assert [r["route"] for r in recent] == [
            "POST /v1/responses",
            "POST /v1/responses",
            "POST /v1/messages",
            "POST /v1/chat/completions",
        ]
        assert recent[0]["body_sha256"] == recent[1]["body_sha256"] != recent[2]["body_sha256"]
        assert recent[3]["error"] == "500"
        assert "authorization" not in recent[0]["headers"]
        reset = await http.post("/_mock/reset")
        assert reset.json()["total"] == 0
        assert (await http.get("/_mock/stats")).json()["requests"] == {}
        assert (await http.get("/_mock/other")).status_code == 404
        assert app.stats()["total"] == 0  # /_mock/* is never counted


async def test_in_flight_and_disconnects() -> None:
    # An hour between events: every answer stays in flight until its client leaves, or asks
    # for no delays (``x-mock-delay-ms: 0``). A call that returns at all was stopped.
    app = MockUpstream(delay=HOUR, first_delay=0)
    path, body = ROUTES["chat"]
    stream = {**body, "stream": True}
    leave = anyio.Event()
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(partial(call, app, path, stream, leave=leave))
            while app.stats()["in_flight"] < 3:  # noqa: ASYNC110 - a counter, no event
                await anyio.sleep(0.005)
            assert app.stats()["in_flight"] == 3
            leave.set()
    assert app.stats()["in_flight"] == 0
    assert app.stats()["max_in_flight"] == 3
    assert app.stats()["disconnects"] == 3

    # A client that stays to the end is no disconnect.
    await call(app, path, stream, headers={"x-mock-delay-ms": "0"})
    assert app.stats()["disconnects"] == 3
    # One that leaves after the first event stops the stream (the next is an hour away).
    left = anyio.Event()

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            left.set()

    with anyio.fail_after(GUARD):
        sent = await call(app, path, stream, leave=left, on_send=on_send)
    assert [m.get("more_body") for _, m in sent[1:]] == [True]  # one event, then nothing
    assert app.stats()["disconnects"] == 4
    assert app.stats()["in_flight"] == 0
    gone = anyio.Event()
    gone.set()
    with anyio.fail_after(GUARD):  # non-stream: nothing is sent
        sent = await call(app, path, body, leave=gone)
    assert sent == []
    assert app.stats()["disconnects"] == 5


async def test_lifespan(app: MockUpstream) -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(ValueError, match="HTTP only"):
        await app({"type": "websocket"}, receive, send)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="delay"):
        MockUpstream(delay=-1)
    with pytest.raises(ValueError, match="deltas"):
        MockUpstream(deltas=0)


# -- real HTTP ----------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio
async def test_over_loopback_http_with_uvicorn(anyio_backend: str, serve: Any) -> None:
    app = MockUpstream(delay=0.005, first_delay=0.15)
    async with serve(app) as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            # Delivered as it is generated: the first event long before the last.
            body = {**ROUTES["responses"][1], "stream": True}
            start = time.perf_counter()
            arrivals: list[float] = []
            chunks: list[bytes] = []
            async with http.stream("POST", "/v1/responses", json=body) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for chunk in response.aiter_raw():
                    arrivals.append(time.perf_counter() - start)
                    chunks.append(chunk)
            events = parse(b"".join(chunks))
            assert events[-1].event == "response.completed"
            assert arrivals[0] >= 0.14
            assert arrivals[-1] - arrivals[0] >= 0.005 * (len(events) - 1) * 0.8
            again = await http.post("/v1/responses", json=body)
            assert again.content == b"".join(chunks)

            async with httpx2.AsyncClient(base_url=base) as sdk_http:
                client = openai.AsyncOpenAI(
                    base_url=f"{base}/v1", api_key="x", http_client=sdk_http, max_retries=0
                )
                async with client.responses.stream(
                    model="gpt-mock-1",
                    input="What is sse-cache?",
                    extra_headers={"x-mock-delay-ms": "0"},
                ) as helper:
                    final = await helper.get_final_response()
                assert final.status == "completed" and final.output_text
                # cut: the server drops the connection mid-body.
                stream = await client.responses.create(
                    model="gpt-mock-1",
                    input="What is sse-cache?",
                    stream=True,
                    extra_headers={"x-mock-error": "cut", "x-mock-delay-ms": "0"},
                )
                seen: list[str] = []
                with pytest.raises(openai.APIConnectionError):
                    async for event in stream:
                        seen.append(event.type)
                assert seen and "response.completed" not in seen
            stats = (await http.get("/_mock/stats")).json()
            assert stats["requests"] == {"POST /v1/responses": 4}


# -- command line -------------------------------------------------------------------------


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sse-cache")
    sub = parser.add_subparsers(dest="command", required=True)
    mock_cli.register(sub)
    return parser.parse_args(["mock-upstream", *argv])


def test_cli_defaults_bind_loopback() -> None:
    args = parse_cli()
    assert (args.host, args.port, args.delay_ms, args.first_ms, args.seed) == (
        "127.0.0.1",
        8001,
        20.0,
        None,
        0,
    )


def test_cli_serves_the_configured_app(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    calls: list[tuple[Any, tuple[str, int]]] = []

    def run(server: uvicorn.Server, sockets: Any = None) -> None:
        (listener,) = sockets  # served on the socket bound before the banner
        calls.append((server.config, listener.getsockname()))
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    args = parse_cli("--port", "0", "--delay-ms", "5", "--first-ms", "300", "--seed", "3")
    assert args.run(args) == 0
    [(config, (host, port))] = calls
    app = config.app
    assert isinstance(app, MockUpstream)
    assert (app.delay, app.first_delay, app.seed) == (0.005, 0.3, 3)
    assert host == "127.0.0.1" and port != 0
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().out


def test_cli_without_uvicorn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    args = parse_cli()
    assert args.run(args) == 2
    assert "pip install 'sse-cache[proxy]'" in capsys.readouterr().err


def test_cli_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    # A usage error naming the flag, when the flags are parsed (before anything starts).
    with pytest.raises(SystemExit) as exit_info:
        parse_cli("--delay-ms", "-1")
    assert exit_info.value.code == 2 and "--delay-ms" in capsys.readouterr().err

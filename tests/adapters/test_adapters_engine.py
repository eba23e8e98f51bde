"""Record -> store (every backend) -> replay, through the engine, for every schema: the replay
is event-for-event identical (same ``event``, same ``data`` bytes) and the SDK accumulates it
to the same final answer. Cross-mode answers come from the same entry."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from adapter_oracles import sdk_anthropic_final, sdk_chat_final, sdk_responses_final
from adapter_strategies import (
    anthropic_streams,
    chat_events,
    chat_streams,
    responses_streams,
    to_events,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from real_streams import EXPECTED, Recording

from sse_cache import Event, Outcome
from sse_cache.adapters import AnthropicMessages, OpenAIChat, OpenAIResponses
from sse_cache.engine import CacheStatus, StreamCache
from sse_cache.protocols import Backend, StreamAdapter

pytestmark = pytest.mark.anyio

ROUTES = {
    "openai-responses": "POST /v1/responses",
    "openai-chat": "POST /v1/chat/completions",
    "anthropic-messages": "POST /v1/messages",
}

SCHEMAS = {
    "openai-responses": (
        OpenAIResponses,
        responses_streams(max_items=3).map(to_events),
        sdk_responses_final,
    ),
    "openai-chat": (OpenAIChat, chat_streams().map(chat_events), sdk_chat_final),
    "anthropic-messages": (
        AnthropicMessages,
        anthropic_streams().map(lambda p: to_events(p, pad=True)),
        sdk_anthropic_final,
    ),
}


def wire(events: Sequence[Event]) -> list[tuple[str, str | None, str | None, int | None]]:
    return [(e.data, e.event, e.id, e.retry) for e in events]


def upstream_of(events: Sequence[Event]) -> tuple[list[int], object]:
    calls = [0]

    def open_stream() -> AsyncIterator[Event]:
        calls[0] += 1
        return _gen(events)

    return calls, open_stream


async def _gen(events: Sequence[Event]) -> AsyncIterator[Event]:
    for ev in events:
        yield ev


async def through(cache: StreamCache, body: dict[str, object], upstream: object):
    req = cache.request(body, route=ROUTES[cache.adapter.name], shared=True)
    async with cache.stream(req, upstream) as s:  # type: ignore[arg-type]
        got = [ev async for ev in s]
    return s, got


# Drawn by @given, before the event loop runs, never with ``data.draw`` in the test: a draw
# that hypothesis ends early (an input grown too large: ~10 % of these streams) raises its
# StopTest, no Exception, which killed anyio's runner task and the async ``backend`` fixture
# it holds, failing every later example (CI, at one seed in eight).
_SCHEMA_AND_EVENTS = st.sampled_from(sorted(SCHEMAS)).flatmap(
    lambda schema: st.tuples(st.just(schema), SCHEMAS[schema][1])
)


@settings(
    max_examples=24,  # ~8 of each schema
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=_SCHEMA_AND_EVENTS)
async def test_record_store_replay_on_every_backend(
    backend: Backend, case: tuple[str, list[Event]]
) -> None:
    schema, events = case
    make, _, sdk_final = SCHEMAS[schema]
    adapter: StreamAdapter = make()
    cache = StreamCache(backend, adapter)
    # (Asking for usage: a Chat stream that did not shares no entry with a non-streamed
    # request, whose body has usage. Anthropic and Gemini have no stream_options.)
    usage = {"include_usage": True}
    body = {"model": "m", "input": uuid.uuid4().hex, "stream": True}
    if schema.startswith("openai"):
        body["stream_options"] = usage
    calls, upstream = upstream_of(events)

    first, delivered = await through(cache, body, upstream)
    assert first.status == CacheStatus.MISS
    assert wire(delivered) == wire(events)  # pass-through untouched
    assert first.stored, first.reason

    second, replayed = await through(cache, body, upstream)
    assert second.status == CacheStatus.HIT
    assert calls[0] == 1
    assert wire(replayed) == wire(events)
    assert sdk_final(replayed) == sdk_final(events)

    # Cross-mode: a non-stream request for the same answer (same key without `stream`).
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    assert cache.key(cache.request(plain, route=ROUTES[schema], shared=True)) == second.key
    entry = await cache.lookup(second.key)
    assert entry is not None
    answer = cache.body_of(entry)
    assert answer is not None
    assert json.loads(answer) == json.loads(adapter.final_body(events) or b"")


@pytest.mark.real_streams
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_real_streams_record_and_replay(backend: Backend, name: str):
    rec = Recording(name)
    cache = StreamCache(backend, rec.adapter)
    body = {"model": "m", "input": name, "stream": True}
    calls, upstream = upstream_of(rec.events)
    first, delivered = await through(cache, body, upstream)
    assert first.status == CacheStatus.MISS
    assert wire(delivered) == wire(rec.events)
    # Stored when the events complete it and the whole-stream check (verify) agrees.
    completes = EXPECTED[name] == (Outcome.COMPLETE, Outcome.COMPLETE)
    assert first.stored is completes, first.reason
    second, replayed = await through(cache, body, upstream)
    if completes:
        assert second.status == CacheStatus.HIT
        assert calls[0] == 1
        assert wire(replayed) == wire(rec.events)
    else:
        assert second.status == CacheStatus.MISS  # a failed stream is never stored
        assert calls[0] == 2


async def test_stream_request_answered_from_a_stored_body(backend: Backend):
    # The other direction: a stored non-stream answer replayed as a synthesised stream.
    rec_body = {
        "id": "resp_x",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "gpt-5",
        "output": [
            {
                "id": "rs_1",
                "type": "reasoning",
                "summary": [
                    {"type": "summary_text", "text": "a b"},
                    {"type": "summary_text", "text": "c"},
                ],
            },
            {
                "id": "msg_1",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "annotations": [], "logprobs": [], "text": "Hi there"}
                ],
            },
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    from sse_cache import Entry

    adapter = OpenAIResponses()
    cache = StreamCache(backend, adapter)
    raw = json.dumps(rec_body).encode()
    assert adapter.body_outcome(raw) is Outcome.COMPLETE
    req = cache.request(
        {"model": "gpt-5", "input": "q", "stream": True},
        route=ROUTES[adapter.name],
        shared=True,
    )
    key = cache.key(req)
    stored = Entry(schema=adapter.name, created_at=1.0, content_type="application/json", body=raw)
    assert await cache.store(key, stored)

    def never() -> AsyncIterator[Event]:
        raise AssertionError("the upstream must not be called on a hit")

    async with cache.stream(req, never) as s:
        events = [ev async for ev in s]
    assert s.status == CacheStatus.HIT
    kinds = [e.event for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.reasoning_summary_part.added") == 2
    assert json.loads(adapter.final_body(events) or b"") == rec_body

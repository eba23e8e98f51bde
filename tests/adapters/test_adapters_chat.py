"""OpenAI Chat Completions adapter: fidelity properties with the openai SDK as the oracle."""

from __future__ import annotations

import json

import pytest
from adapter_oracles import check_lenient, normalize_chat, sdk_chat_final, validate_chat
from adapter_strategies import chat_events, chat_streams, json_values, malformed_events
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_cache import Event, Outcome
from sse_cache.adapters import OpenAIChat

ADAPTER = OpenAIChat()
SETTINGS = settings(max_examples=60, deadline=None)
delta_sizes = st.sampled_from([None, 1, 3, 16])


@SETTINGS
@given(chat_streams(), st.booleans())
def test_generated_streams_are_valid(chunks, ascii):
    events = chat_events(chunks, ascii=ascii)
    validate_chat(events)
    sdk_chat_final(events)  # the SDK accumulates it without complaint


@SETTINGS
@given(chat_streams())
def test_outcome_completes_at_done(chunks):
    events = chat_events(chunks)
    outcomes = [ADAPTER.outcome(ev) for ev in events]
    assert outcomes == [Outcome.CONTINUE] * (len(events) - 1) + [Outcome.COMPLETE]
    assert ADAPTER.verify(events) is Outcome.COMPLETE
    assert ADAPTER.verify(events[:-1]) is Outcome.FAIL  # no [DONE]
    assert ADAPTER.end_outcome() is Outcome.FAIL


@SETTINGS
@given(chat_streams(), st.booleans())
def test_final_body_is_the_sdk_accumulated_completion(chunks, ascii):
    events = chat_events(chunks, ascii=ascii)
    body = ADAPTER.final_body(events)
    assert body is not None
    assert json.loads(body)["object"] == "chat.completion"
    assert normalize_chat(json.loads(body)) == sdk_chat_final(events)
    assert ADAPTER.body_outcome(body) is Outcome.COMPLETE
    assert ADAPTER.meta(events) == {"completion_id": chunks[0]["id"], "model": chunks[0]["model"]}


@SETTINGS
@given(chat_streams(), delta_sizes)
def test_synthesize_of_final_body_is_a_faithful_stream(chunks, delta_chars):
    original = chat_events(chunks)
    adapter = OpenAIChat(delta_chars=delta_chars)
    body = adapter.final_body(original)
    assert body is not None
    synthesized = adapter.synthesize(body)
    assert synthesized is not None
    validate_chat(synthesized)
    assert sdk_chat_final(synthesized) == sdk_chat_final(original)
    assert adapter.verify(synthesized) is Outcome.COMPLETE
    for chunk in map(json.loads, (e.data for e in synthesized[:-1])):
        assert chunk["object"] == "chat.completion.chunk"
        assert len(chunk["choices"]) <= 1


@SETTINGS
@given(chat_streams(), delta_sizes)
def test_final_body_of_synthesize_is_the_body(chunks, delta_chars):
    body = ADAPTER.final_body(chat_events(chunks))
    assert body is not None
    adapter = OpenAIChat(delta_chars=delta_chars)
    events = adapter.synthesize(body)
    assert events is not None
    again = adapter.final_body(events)
    assert again is not None
    assert json.loads(again) == json.loads(body)


def test_usage_chunk_can_be_left_out():
    body = _completion("hi", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    with_usage = OpenAIChat().synthesize(body)
    without = OpenAIChat(usage_chunk=False).synthesize(body)
    assert with_usage is not None and without is not None
    assert json.loads(with_usage[-2].data)["choices"] == []
    assert len(without) == len(with_usage) - 1
    assert all(json.loads(e.data)["choices"] for e in without[:-1])


def test_a_streamed_request_not_asking_for_usage_keys_apart():
    # A stream without usage cannot answer a non-streamed request (whose body always has
    # usage), nor a stream that asked for it; a stream that asked can answer both.
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    usage = {**base, "stream": True, "stream_options": {"include_usage": True}}
    assert ADAPTER.key_fields(usage) == ADAPTER.key_fields(base)
    # stream_options on a request that does not stream: OpenAI refuses it (400), so it keys
    # apart, and the upstream answers it (helper-88: it was a 200 hit of the valid request).
    assert ADAPTER.key_fields({**usage, "stream": False}) != ADAPTER.key_fields(base)
    plain = ADAPTER.key_fields({**base, "stream": True})
    assert plain != ADAPTER.key_fields(base)
    assert ADAPTER.key_fields({**base, "stream": True, "stream_options": {}}) == plain
    off = {"include_usage": False, "include_obfuscation": True}
    assert ADAPTER.key_fields({**base, "stream": True, "stream_options": off}) == plain


@pytest.mark.parametrize("stream", [False, None])
@pytest.mark.parametrize("options", [{"include_usage": False}, {}])
def test_a_request_not_streaming_never_shares_the_key_of_a_stream_without_usage(
    stream: bool | None, options: dict[str, bool]
) -> None:
    # A non-streamed request sending stream_options (OpenAI refuses it: 400) kept them in its
    # key, and the key of a stream without usage was its stream_options set to {"include_usage":
    # false}: the same. It was answered 200 from such a stream's entry, without the usage a
    # non-streamed body always has (helper-147).
    base: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    refused = {**base, "stream_options": options}
    if stream is not None:
        refused["stream"] = stream
    without_usage = ADAPTER.key_fields({**base, "stream": True})
    assert ADAPTER.key_fields(refused) != without_usage
    assert ADAPTER.key_fields(refused) != ADAPTER.key_fields(base)


def test_n_choices_are_interleaved_and_each_finishes():
    body = json.loads(_completion("one two three"))
    body["choices"].append({**body["choices"][0], "index": 1})
    events = ADAPTER.synthesize(json.dumps(body).encode())
    assert events is not None
    order = [json.loads(e.data)["choices"][0]["index"] for e in events[:-1] if e.data != "[DONE]"]
    assert order[:4] == [0, 1, 0, 1]
    final = ADAPTER.final_body(events)
    assert final is not None
    assert [c["finish_reason"] for c in json.loads(final)["choices"]] == ["stop", "stop"]


def test_compatible_servers_repeating_identity_fields():
    # Some OpenAI-compatible servers resend role / tool call id / name in every chunk.
    call = {"index": 0, "id": "call_1", "type": "function"}
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {
            "id": "c",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "tool_calls": [{**call, "function": {"name": "f", "arguments": '{"a"'}}],
                    },
                }
            ],
        },
        {
            "id": "c",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "tool_calls": [
                            {**call, "id": "", "function": {"name": "f", "arguments": ":1}"}}
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
        },
    ]
    events = [Event(json.dumps(c)) for c in chunks] + [Event("[DONE]")]
    body = ADAPTER.final_body(events)
    assert body is not None
    message = json.loads(body)["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]


def test_provider_extensions_accumulate():
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"reasoning_content": "thin"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"reasoning_content": "king"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]},
    ]
    events = [Event(json.dumps(c)) for c in chunks] + [Event("[DONE]")]
    body = ADAPTER.final_body(events)
    assert body is not None
    message = json.loads(body)["choices"][0]["message"]
    assert message["reasoning_content"] == "thinking"
    assert message["content"] == "ok"
    again = ADAPTER.synthesize(body)
    assert again is not None
    assert json.loads(ADAPTER.final_body(again) or b"") == json.loads(body)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event('{"choices":[{"index":0,"delta":{"content":"x"}}]}'), Outcome.CONTINUE),
        (Event("[DONE]"), Outcome.COMPLETE),
        (Event('{"error":{"message":"overloaded","type":"server_error"}}'), Outcome.FAIL),
        (Event('{"error": {"message":"x"}}'), Outcome.FAIL),
        (Event('{"id":"c","error":null,"choices":[]}'), Outcome.CONTINUE),
        (Event('{"choices":[{"delta":{"content":"the \\"error\\" word"}}]}'), Outcome.CONTINUE),
        (Event('{"message":"x"}', "error"), Outcome.FAIL),
        (Event("not json"), Outcome.CONTINUE),
        (Event(""), Outcome.CONTINUE),
    ],
)
def test_outcome_of_single_events(event, expected):
    assert ADAPTER.outcome(event) is expected


def test_verify_needs_a_finish_reason_for_every_choice():
    first = {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
    second = {
        "id": "c",
        "choices": [{"index": 1, "delta": {"content": "b"}, "finish_reason": None}],
    }
    end0 = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    done = Event("[DONE]")
    as_events = lambda *cs: [Event(json.dumps(c)) for c in cs] + [done]  # noqa: E731
    assert ADAPTER.verify(as_events(first, end0)) is Outcome.COMPLETE
    assert ADAPTER.verify(as_events(first)) is Outcome.FAIL  # [DONE] without finish_reason
    assert ADAPTER.verify(as_events(first, second, end0)) is Outcome.FAIL  # choice 1 open
    assert ADAPTER.verify([done]) is Outcome.FAIL


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"object":"chat.completion","choices":[{"index":0,"finish_reason":"stop"}]}',
            Outcome.COMPLETE,
        ),
        (
            b'{"object":"chat.completion","choices":[{"index":0,"finish_reason":null}]}',
            Outcome.FAIL,
        ),
        (b'{"object":"chat.completion","choices":[]}', Outcome.FAIL),
        (b'{"error":{"message":"x"}}', Outcome.FAIL),
        (b"garbage", Outcome.FAIL),
    ],
)
def test_body_outcome(body, expected):
    assert ADAPTER.body_outcome(body) is expected


@settings(max_examples=150, deadline=None)
@given(st.lists(malformed_events, max_size=12), chat_streams(), st.data())
def test_malformed_events_never_crash(garbage, chunks, data):
    events = chat_events(chunks)
    check_lenient(ADAPTER, events, garbage, data)


@settings(max_examples=100, deadline=None)
@given(json_values, json_values)
def test_synthesize_survives_wrong_shapes(message, choice_extra):
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    if isinstance(choice_extra, dict):
        choice.update(choice_extra)
    body = json.dumps({"id": "c", "choices": [choice, message]}).encode()
    out = ADAPTER.synthesize(body)
    assert out is not None
    assert ADAPTER.final_body(out) is not None


def _completion(text, usage=None):
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    ).encode()


def _call(position: int, own_index: int | None) -> dict[str, object]:
    call: dict[str, object] = {
        "id": f"call_{position}",
        "type": "function",
        "function": {"name": f"f{position}", "arguments": f'{{"n": {position}}}'},
    }
    if own_index is not None:
        call["index"] = own_index  # (some OpenAI-compatible servers keep it)
    return call


@pytest.mark.parametrize("indexes", [(None, None), (0, 0), (1, 2)])
def test_tool_calls_stream_under_their_position_whatever_their_own_index(indexes):
    body = json.loads(_completion("x"))
    message = body["choices"][0]["message"]
    message["content"] = None
    message["tool_calls"] = [_call(0, indexes[0]), _call(1, indexes[1])]
    events = ADAPTER.synthesize(json.dumps(body).encode())
    assert events is not None
    calls = sdk_chat_final(events)["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", '{"n": 0}'),
        ("call_1", '{"n": 1}'),
    ]


def test_a_tool_call_delta_whose_index_is_not_a_number_never_raises():
    # A server's null `index` beside integer ones: the stream is stored; a non-streamed
    # request answered from it gets a body (the calls in some order), not a 500.
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, object], finish: str | None = None) -> Event:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return Event(json.dumps({**base, "choices": [choice]}))

    head = {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}
    other = {
        "index": None,
        "id": "b",
        "type": "function",
        "function": {"name": "g", "arguments": "{}"},
    }
    events = [
        chunk({"role": "assistant", "content": None, "tool_calls": [head]}),
        chunk({"tool_calls": [other]}),
        chunk({}, "tool_calls"),
        Event("[DONE]"),
    ]
    body = ADAPTER.final_body(events)
    assert body is not None
    ids = {c["id"] for c in json.loads(body)["choices"][0]["message"]["tool_calls"]}
    assert ids == {"a", "b"}


@pytest.mark.parametrize("store", [True, False, None])
def test_metadata_keys_what_may_change_the_answer(store: bool | None) -> None:
    # With store: true the completion is kept upstream with its metadata (listed, filtered
    # by): a hit handed bob the id of a completion tagged end_user: alice (helper-88). A
    # gateway routes on its tags (LiteLLM's metadata.tags picks the deployment: a "paid"
    # request was answered from the "free" one's entry; helper-147). The rest is a gateway's
    # bookkeeping (a trace id per request): left out, or no such request would ever hit.
    base: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if store is not None:
        base["store"] = store

    def key(**metadata: object) -> str:
        return json.dumps(ADAPTER.key_fields({**base, "metadata": metadata}), sort_keys=True)

    assert key(tags=["free"]) != key(tags=["paid"])
    assert key(tags=["free"]) != json.dumps(ADAPTER.key_fields(base), sort_keys=True)
    traced = key(tags=["free"], trace_id="t1") == key(tags=["free"], trace_id="t2")
    assert traced is (store is not True)
    untagged = key(trace_id="t1") == json.dumps(ADAPTER.key_fields(base), sort_keys=True)
    assert untagged is (store is not True)
    # ignore_fields still leaves it out.
    ignoring = OpenAIChat(ignore_fields=["metadata"])
    tagged = {**base, "metadata": {"tags": ["a"]}}
    assert ignoring.key_fields(tagged) == ignoring.key_fields(base)


def test_no_annotations_are_an_empty_list_in_a_body_and_absent_from_a_stream():
    # OpenAI's non-stream message always carries annotations ([] without web search); its
    # stream sends them only when there are. A body built from a stream had null (code
    # iterating message.annotations failed), and a stream built from a body sent [] in its
    # first delta (helper-91).
    body = json.loads(_completion("hi"))
    body["choices"][0]["message"]["annotations"] = []
    events = ADAPTER.synthesize(json.dumps(body).encode())
    assert events is not None
    first = json.loads(events[0].data)["choices"][0]["delta"]
    assert "annotations" not in first
    rebuilt = ADAPTER.final_body(events)
    assert rebuilt is not None
    assert json.loads(rebuilt)["choices"][0]["message"]["annotations"] == []
    cited = [{"type": "url_citation", "url_citation": {"url": "https://x", "title": "x"}}]
    body["choices"][0]["message"]["annotations"] = cited
    events = ADAPTER.synthesize(json.dumps(body).encode())
    assert events is not None
    assert json.loads(events[0].data)["choices"][0]["delta"]["annotations"] == cited


@pytest.mark.parametrize(
    "reason", ["error", "abort", "cancelled", "Error", "insufficient_system_resource"]
)
@pytest.mark.parametrize("store_blocked", [False, True])
def test_a_generation_that_failed_midway_is_never_stored(reason, store_blocked):
    # Mistral ends a generation that failed midway with finish_reason "error", vLLM an
    # aborted one with "abort", then both send [DONE]: stored, the part was replayed as the
    # answer (helper-165). Not a filter: store_blocked does not store it either.
    adapter = OpenAIChat(store_blocked=store_blocked)
    start = {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
    cut = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
    stream = [Event(json.dumps(start)), Event(json.dumps(cut)), Event("[DONE]")]
    body = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": reason}]}
    assert adapter.verify(stream) is Outcome.FAIL
    assert adapter.body_outcome(json.dumps(body).encode()) is Outcome.FAIL
    for whole in ("stop", "length", "tool_calls", "eos"):
        finished = json.dumps(cut).replace(reason, whole)
        assert adapter.verify([stream[0], Event(finished), stream[2]]) is Outcome.COMPLETE


@pytest.mark.parametrize("store_blocked", [False, True])
def test_an_answer_a_content_filter_cut_is_stored_only_if_asked(store_blocked):
    # Azure OpenAI's content filter ends a choice with finish_reason "content_filter": an
    # answer cut off, which may pass when asked again. Stored, it was replayed for the
    # entry's lifetime; Gemini's SAFETY never was (helper-109).
    adapter = OpenAIChat(store_blocked=store_blocked)
    start = {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
    cut = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}
    stream = [Event(json.dumps(start)), Event(json.dumps(cut)), Event("[DONE]")]
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "content_filter"}],
    }
    expected = Outcome.COMPLETE if store_blocked else Outcome.FAIL
    assert adapter.verify(stream) is expected
    assert adapter.body_outcome(json.dumps(body).encode()) is expected
    assert (
        adapter.verify([*stream[:1], Event(json.dumps(start).replace("null", '"stop"')), stream[2]])
        is Outcome.COMPLETE
    )

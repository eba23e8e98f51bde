"""Anthropic Messages adapter: fidelity properties with the anthropic SDK as the oracle."""

from __future__ import annotations

import json

import pytest
from adapter_oracles import (
    check_lenient,
    normalize_message,
    sdk_anthropic_final,
    validate_anthropic,
)
from adapter_strategies import anthropic_streams, json_values, malformed_events, to_events
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_cache import Event, Outcome, SSEParser, serialize_sse
from sse_cache.adapters import AnthropicMessages
from sse_cache.recorder import Recorder

ADAPTER = AnthropicMessages()
SETTINGS = settings(max_examples=60, deadline=None)
delta_sizes = st.sampled_from([None, 1, 3, 16])


@SETTINGS
@given(anthropic_streams(), st.booleans(), st.booleans())
def test_generated_streams_are_valid(payloads, ascii, pad):
    events = to_events(payloads, ascii=ascii, pad=pad)
    validate_anthropic(events)
    sdk_anthropic_final(events)


@SETTINGS
@given(anthropic_streams(), st.booleans())
def test_outcome_completes_at_message_stop(payloads, pad):
    events = to_events(payloads, pad=pad)
    outcomes = [ADAPTER.outcome(ev) for ev in events]
    assert outcomes == [Outcome.CONTINUE] * (len(events) - 1) + [Outcome.COMPLETE]
    assert ADAPTER.verify(events) is Outcome.COMPLETE
    assert ADAPTER.end_outcome() is Outcome.FAIL
    # Without `event:` lines the SDK ignores every event: such a stream never completes.
    bare = to_events(payloads, named=False)
    assert {ADAPTER.outcome(ev) for ev in bare} == {Outcome.CONTINUE}


@SETTINGS
@given(anthropic_streams(), st.booleans(), st.booleans())
def test_final_body_is_the_sdk_accumulated_message(payloads, ascii, pad):
    events = to_events(payloads, ascii=ascii, pad=pad)
    body = ADAPTER.final_body(events)
    assert body is not None
    assert normalize_message(json.loads(body)) == sdk_anthropic_final(events)
    assert ADAPTER.body_outcome(body) is Outcome.COMPLETE
    start = payloads[0][1]["message"]
    assert ADAPTER.meta(events) == {"message_id": start["id"], "model": start["model"]}


@SETTINGS
@given(anthropic_streams(), delta_sizes)
def test_synthesize_of_final_body_is_a_faithful_stream(payloads, delta_chars):
    original = to_events(payloads)
    adapter = AnthropicMessages(delta_chars=delta_chars)
    body = adapter.final_body(original)
    assert body is not None
    synthesized = adapter.synthesize(body)
    assert synthesized is not None
    validate_anthropic(synthesized)
    assert sdk_anthropic_final(synthesized) == sdk_anthropic_final(original)
    assert adapter.verify(synthesized) is Outcome.COMPLETE
    assert SSEParser().feed(serialize_sse(synthesized)) == synthesized
    kinds = [e.event for e in synthesized]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    # Blocks are opened and closed in order, never interleaved.
    opened = [json.loads(e.data)["index"] for e in synthesized if e.event == "content_block_start"]
    closed = [json.loads(e.data)["index"] for e in synthesized if e.event == "content_block_stop"]
    assert opened == closed == list(range(len(json.loads(body)["content"])))


@SETTINGS
@given(anthropic_streams(), delta_sizes)
def test_final_body_of_synthesize_is_the_body(payloads, delta_chars):
    body = ADAPTER.final_body(to_events(payloads))
    assert body is not None
    adapter = AnthropicMessages(delta_chars=delta_chars)
    events = adapter.synthesize(body)
    assert events is not None
    again = adapter.final_body(events)
    assert again is not None
    assert json.loads(again) == json.loads(body)


def test_thinking_signature_and_tool_input_are_streamed():
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "Let me think about it.", "signature": "sig=="},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 20},
    }
    events = ADAPTER.synthesize(json.dumps(body).encode())
    assert events is not None
    deltas = [json.loads(e.data)["delta"] for e in events if e.event == "content_block_delta"]
    kinds = [d["type"] for d in deltas]
    assert kinds.count("thinking_delta") > 1
    assert kinds.count("signature_delta") == 1
    partial = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris"}
    # Empty input: one empty partial_json, as the API sends it.
    assert deltas[-1] == {"type": "input_json_delta", "partial_json": ""}
    start = json.loads(events[0].data)["message"]
    assert start["usage"]["output_tokens"] == 1
    end = json.loads(events[-2].data)
    assert end["usage"]["output_tokens"] == 20
    assert end["delta"]["stop_reason"] == "tool_use"
    assert [e.event for e in events].count("ping") == 1
    assert AnthropicMessages(ping=False).synthesize(json.dumps(body).encode()) == [
        e for e in events if e.event != "ping"
    ]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event('{"type":"content_block_delta"}', "content_block_delta"), Outcome.CONTINUE),
        (Event('{"type": "ping"}', "ping"), Outcome.CONTINUE),
        (Event('{"type":"message_stop"}', "message_stop"), Outcome.COMPLETE),
        (Event('{"type":"message_stop"         }', "message_stop"), Outcome.COMPLETE),
        (Event("{", "message_stop"), Outcome.FAIL),
        (Event('{"type":"message_delta"}', "message_stop"), Outcome.FAIL),
        (Event('{"type":"message_stop"}'), Outcome.CONTINUE),  # no event line: SDK ignores it
        (Event('{"type":"error","error":{"type":"overloaded_error"}}', "error"), Outcome.FAIL),
        (Event("not json", "error"), Outcome.FAIL),
        (Event('{"type":"error","error":{"type":"x"}}'), Outcome.FAIL),
        (Event('{"type":"future_event"}', "future_event"), Outcome.CONTINUE),
        (Event("junk", "future_event"), Outcome.CONTINUE),
    ],
)
def test_outcome_of_single_events(event, expected):
    assert ADAPTER.outcome(event) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"type":"message","stop_reason":"end_turn","content":[]}', Outcome.COMPLETE),
        (b'{"type":"message","stop_reason":null,"content":[]}', Outcome.FAIL),
        (b'{"type":"error","error":{"type":"overloaded_error"}}', Outcome.FAIL),
        (b"[]", Outcome.FAIL),
    ],
)
def test_body_outcome(body, expected):
    assert ADAPTER.body_outcome(body) is expected


def test_unknown_delta_kinds_accumulate_by_field_name():
    events = [
        Event(
            '{"type":"message_start","message":{"id":"m","content":[],"usage":{}}}', "message_start"
        ),
        Event(
            '{"type":"content_block_start","index":0,"content_block":{"type":"x","note":"a"}}',
            "content_block_start",
        ),
        Event(
            '{"type":"content_block_delta","index":0,"delta":{"type":"note_delta","note":"b"}}',
            "content_block_delta",
        ),
        Event(
            '{"type":"content_block_delta","index":0,"delta":{"type":"n","count":3}}',
            "content_block_delta",
        ),
        Event('{"type":"message_stop"}', "message_stop"),
    ]
    body = ADAPTER.final_body(events)
    assert body is not None
    assert json.loads(body)["content"] == [{"type": "x", "note": "ab", "count": 3}]


@settings(max_examples=150, deadline=None)
@given(st.lists(malformed_events, max_size=12), anthropic_streams(), st.data())
def test_malformed_events_never_crash(garbage, payloads, data):
    events = to_events(payloads)
    check_lenient(ADAPTER, events, garbage, data)


@settings(max_examples=100, deadline=None)
@given(st.lists(json_values, max_size=4), json_values)
def test_synthesize_survives_wrong_shapes(content, usage):
    body = {"id": "m", "type": "message", "content": content, "usage": usage}
    out = ADAPTER.synthesize(json.dumps(body).encode())
    assert out is not None
    assert ADAPTER.final_body(out) is not None


# A truthy `error` object fails the stream whatever the event is named: a gateway or a future
# API version may report a failure on an event that is not `event: error`, and an answer that
# says it failed must never be stored (a falsy `error` is no failure).
_ERROR = '"error":{"type":"overloaded_error","message":"Overloaded"}'


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # Named like the completing event: without the check it would *complete* the stream.
        (Event('{"type":"message_stop",' + _ERROR + "}", "message_stop"), Outcome.FAIL),
        (Event('{"type":"future_event",' + _ERROR + "}", "future_event"), Outcome.FAIL),
        (Event('{"type":"future_event",' + _ERROR + "}"), Outcome.FAIL),
        (Event('{"type":"message_stop","error":null}', "message_stop"), Outcome.COMPLETE),
        (Event('{"type":"future_event","error":false}', "future_event"), Outcome.CONTINUE),
    ],
)
def test_an_error_object_fails_whatever_the_event_name(event, expected):
    assert ADAPTER.outcome(event) is expected


def _named(payload):
    return Event(json.dumps(payload), payload["type"])


_START = {
    "type": "message_start",
    "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": []},
}
_DELTAS = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}},
]
_STOP = {"type": "message_stop"}


@pytest.mark.parametrize(
    "payloads",
    [
        [_STOP],
        [*_DELTAS, _STOP],
        # The start must come before the completing event, not after it.
        [*_DELTAS, _STOP, _START],
    ],
    ids=["stop-only", "deltas-and-stop", "start-after-stop"],
)
def test_a_stream_without_message_start_before_its_stop_is_not_verified(payloads):
    # A stream whose head was lost (a gateway that dropped it, a resumed read) has no
    # message: replayed, the SDK would fail on it. It completes event by event, so only the
    # whole-stream check keeps it out of the cache.
    events = [_named(p) for p in payloads]
    assert ADAPTER.verify(events) is Outcome.FAIL
    recorder = Recorder(ADAPTER)
    for ev in events:
        recorder.add(ev, 0.0)
    assert recorder.finish(clean_end=True) is None
    assert "whole-stream" in recorder.reason
    # The same stream with its head is stored.
    whole = [_named(p) for p in [_START, *_DELTAS, _STOP]]
    assert ADAPTER.verify(whole) is Outcome.COMPLETE
    recorder = Recorder(ADAPTER)
    for ev in whole:
        recorder.add(ev, 0.0)
    assert recorder.finish(clean_end=True) is not None


@pytest.mark.parametrize("store_blocked", [False, True])
def test_an_answer_the_classifiers_stopped_is_stored_only_if_asked(store_blocked):
    # Claude's streaming classifiers stop an answer midway with stop_reason "refusal": cut
    # off, and it may pass when asked again. Stored, it was replayed for the entry's
    # lifetime; Gemini's SAFETY never was (helper-109).
    adapter = AnthropicMessages(store_blocked=store_blocked)
    refused = {"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {}}
    events = [_named(p) for p in (_START, *_DELTAS[:3], refused, _STOP)]
    body = {"type": "message", "role": "assistant", "content": [], "stop_reason": "refusal"}
    expected = Outcome.COMPLETE if store_blocked else Outcome.FAIL
    assert adapter.verify(events) is expected
    assert adapter.body_outcome(json.dumps(body).encode()) is expected
    assert adapter.verify([_named(p) for p in (_START, *_DELTAS, _STOP)]) is Outcome.COMPLETE


@pytest.mark.parametrize(
    "payloads",
    [
        [_START, _DELTAS[0], _DELTAS[1], _STOP],  # cut inside a block
        [_START, *_DELTAS[:3], _STOP],  # no stop reason
        [_START, _DELTAS[0], _DELTAS[1], _DELTAS[3], _STOP],  # a block never stopped
        [_START, *_DELTAS[:2], {**_DELTAS[0], "index": 1}, _DELTAS[2], _DELTAS[3], _STOP],
        [_START, *_DELTAS[:3], {**_DELTAS[3], "delta": {"stop_reason": None}}, _STOP],
    ],
    ids=["cut-in-a-block", "no-stop-reason", "block-open", "second-block-open", "null-reason"],
)
def test_a_message_stopped_before_its_answer_ended_is_not_stored(payloads):
    # A translating gateway whose own upstream broke off midway ends the message all the
    # same: message_stop after part of a block, with no stop reason. Stored, the part was
    # replayed as the answer, stop_reason None (helper-165).
    assert ADAPTER.verify([_named(p) for p in payloads]) is Outcome.FAIL
    # The whole message, its blocks in any order of stopping, is stored.
    two = [*_DELTAS[:2], {**_DELTAS[0], "index": 1}, {**_DELTAS[2], "index": 1}, _DELTAS[2]]
    assert (
        ADAPTER.verify([_named(p) for p in (_START, *two, _DELTAS[3], _STOP)]) is Outcome.COMPLETE
    )

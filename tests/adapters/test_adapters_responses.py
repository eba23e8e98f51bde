"""OpenAI Responses adapter: fidelity properties with the openai SDK as the oracle."""

from __future__ import annotations

import json

import pytest
from adapter_oracles import (
    check_lenient,
    check_responses_consistency,
    normalize_response,
    sdk_responses_final,
    validate_responses,
)
from adapter_strategies import malformed_events, responses_streams, to_events
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_cache import Event, Outcome, SSEParser, serialize_sse
from sse_cache.adapters import OpenAIResponses

ADAPTER = OpenAIResponses()
SETTINGS = settings(max_examples=60, deadline=None)
delta_sizes = st.sampled_from([None, 1, 3, 16, 64])


def _final(payloads):
    return payloads[-1][1]["response"]


@SETTINGS
@given(responses_streams(), st.booleans())
def test_generated_streams_are_valid_sdk_streams(payloads, ascii):
    # (1) The strategy itself: every event validates, the SDK accumulates the stream, and
    # the stream is internally consistent (the judge of the properties below).
    events = to_events(payloads, ascii=ascii)
    validate_responses(events)
    assert sdk_responses_final(events) == normalize_response(_final(payloads))
    check_responses_consistency(events)


@SETTINGS
@given(responses_streams(), st.booleans())
def test_outcome_completes_only_at_response_completed(payloads, named):
    events = to_events(payloads, named=named)
    outcomes = [ADAPTER.outcome(ev) for ev in events]
    assert outcomes[:-1] == [Outcome.CONTINUE] * (len(events) - 1)
    assert outcomes[-1] is Outcome.COMPLETE
    assert ADAPTER.verify(events) is Outcome.COMPLETE
    assert ADAPTER.end_outcome() is Outcome.FAIL


@SETTINGS
@given(responses_streams(), st.booleans())
def test_final_body_is_the_sdk_final_response(payloads, ascii):
    events = to_events(payloads, ascii=ascii)
    body = ADAPTER.final_body(events)
    assert body is not None
    # Byte-exact: the `response` text of response.completed, never re-encoded.
    data = events[-1].data
    assert body.decode() in data
    assert normalize_response(json.loads(body)) == sdk_responses_final(events)
    assert ADAPTER.body_outcome(body) is Outcome.COMPLETE
    assert ADAPTER.meta(events)["response_id"] == _final(payloads)["id"]


@SETTINGS
@given(responses_streams(), delta_sizes)
def test_synthesize_of_final_body_is_a_faithful_stream(payloads, delta_chars):
    # (3) synthesize(final_body(stream)): SDK-valid event by event, accumulates (SDK) to the
    # same final response, contiguous sequence numbers, consistent indexes and texts.
    original = to_events(payloads)
    adapter = OpenAIResponses(delta_chars=delta_chars)
    body = adapter.final_body(original)
    assert body is not None
    synthesized = adapter.synthesize(body)
    assert synthesized is not None
    validate_responses(synthesized)
    assert sdk_responses_final(synthesized) == sdk_responses_final(original)
    check_responses_consistency(synthesized)
    # Same shape of item events per output item as the API's own stream.
    assert _item_event_kinds(synthesized) == _item_event_kinds(original)
    # Wire form: event line = payload type, one compact data line, SSE round trip exact.
    wire = serialize_sse(synthesized)
    assert SSEParser().feed(wire) == synthesized
    assert all("\n" not in ev.data for ev in synthesized)
    outcomes = [adapter.outcome(ev) for ev in synthesized]
    assert outcomes[-1] is Outcome.COMPLETE
    assert set(outcomes[:-1]) <= {Outcome.CONTINUE}


def _item_event_kinds(events):
    """Per output item, the event types (deltas collapsed) in order."""
    kinds: dict[int, list[str]] = {}
    for ev in events:
        p = json.loads(ev.data)
        if "output_index" in p:
            seq = kinds.setdefault(p["output_index"], [])
            kind = p["type"]
            if not (seq and seq[-1] == kind and kind.endswith(".delta")):
                seq.append(kind)
    return kinds


@SETTINGS
@given(responses_streams(), delta_sizes)
def test_final_body_of_synthesize_is_the_body(payloads, delta_chars):
    # (4) final_body(synthesize(body)) == body.
    body = json.dumps(_final(payloads)).encode()
    adapter = OpenAIResponses(delta_chars=delta_chars)
    events = adapter.synthesize(body)
    assert events is not None
    again = adapter.final_body(events)
    assert again is not None
    assert json.loads(again) == json.loads(body)


def test_synthesized_deltas_are_small_unless_configured():
    text = "word " * 200
    body = _body([_msg_item(text)])
    events = OpenAIResponses().synthesize(body)
    assert events is not None
    deltas = [
        json.loads(e.data)["delta"] for e in events if e.event == "response.output_text.delta"
    ]
    assert len(deltas) >= 200
    assert max(map(len, deltas)) <= 16
    assert "".join(deltas) == text
    one = OpenAIResponses(delta_chars=None).synthesize(body)
    assert one is not None
    assert [e.event for e in one].count("response.output_text.delta") == 1


def test_reasoning_summary_indexes_are_per_part():
    item = {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": f"part {i}"} for i in range(4)],
    }
    events = OpenAIResponses().synthesize(_body([item, _msg_item("hi")]))
    assert events is not None
    added = [
        json.loads(e.data) for e in events if e.event == "response.reasoning_summary_part.added"
    ]
    assert [p["summary_index"] for p in added] == [0, 1, 2, 3]
    done = [json.loads(e.data) for e in events if e.event == "response.reasoning_summary_text.done"]
    assert [(p["summary_index"], p["text"]) for p in done] == [(i, f"part {i}") for i in range(4)]
    assert all(p["output_index"] == 0 and p["item_id"] == "rs_1" for p in added)


def test_logprob_tokens_drive_deltas_when_they_spell_the_text():
    logprobs = [
        {"token": t, "logprob": -0.1, "bytes": list(t.encode()), "top_logprobs": []}
        for t in ["Hel", "lo", "!"]
    ]
    part = {"type": "output_text", "annotations": [], "logprobs": logprobs, "text": "Hello!"}
    item = {"id": "m", "type": "message", "status": "completed", "role": "assistant"}
    events = OpenAIResponses().synthesize(_body([{**item, "content": [part]}]))
    assert events is not None
    deltas = [json.loads(e.data) for e in events if e.event == "response.output_text.delta"]
    assert [(d["delta"], d["logprobs"]) for d in deltas] == [(t["token"], [t]) for t in logprobs]
    validate_responses(events)


# -- outcomes of hand-written and malformed events -------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event('{"type":"response.output_text.delta","delta":"x"}'), Outcome.CONTINUE),
        (Event("not json at all", "response.output_text.delta"), Outcome.CONTINUE),
        (Event("not json", None), Outcome.CONTINUE),
        (Event('{"type":"response.future_thing"}', "response.future_thing"), Outcome.CONTINUE),
        (Event('{"type":"response.completed","response":{}}'), Outcome.COMPLETE),
        (
            Event('{"type":"response.completed","response":{}}', "response.completed"),
            Outcome.COMPLETE,
        ),
        # A completing event we cannot trust is a failure, never a completion.
        (Event("{", "response.completed"), Outcome.FAIL),
        (Event('{"type":"response.completed","response":"x"}', "response.completed"), Outcome.FAIL),
        (Event('{"type":"response.completed"}', "response.completed"), Outcome.FAIL),
        (Event('{"type":"response.delta"}', "response.completed"), Outcome.FAIL),
        (Event('{"type":"response.failed","response":{}}'), Outcome.FAIL),
        (Event('{"type":"response.incomplete","response":{}}'), Outcome.FAIL),
        (Event('{"type":"error","error":{"code":"x","message":"m"}}', "error"), Outcome.FAIL),
        (Event('{"type":"error","code":"x","message":"m"}'), Outcome.FAIL),
        (Event("garbage", "error"), Outcome.FAIL),
        (Event('{"type":"whatever","error":{"message":"boom"}}'), Outcome.FAIL),
        (Event('{"type":"whatever","error":null}'), Outcome.CONTINUE),
        # The SDK raises on a truthy `error` whatever the event is named.
        (
            Event(
                '{"type":"response.output_text.delta","error":{"message":"boom"}}',
                "response.output_text.delta",
            ),
            Outcome.FAIL,
        ),
        (
            Event(
                '{"type":"response.output_text.delta","delta":"an \\"error\\""}',
                "response.output_text.delta",
            ),
            Outcome.CONTINUE,
        ),
        (Event("[DONE]"), Outcome.CONTINUE),
    ],
)
def test_outcome_of_single_events(event, expected):
    assert ADAPTER.outcome(event) is expected


@pytest.mark.parametrize("status", ["in_progress", "failed", "incomplete", "cancelled", "queued"])
@pytest.mark.parametrize("store_incomplete", [False, True])
def test_a_completing_event_whose_response_is_not_completed_is_not_stored(status, store_incomplete):
    # A cut stream closed by a response.completed whose response is still in_progress, its
    # output empty: stored, a stream=false request was answered `in_progress`, no output
    # (helper-165). Only a response that says it completed completes the stream (or, with
    # store_incomplete, a response.incomplete that says it is incomplete).
    adapter = OpenAIResponses(store_incomplete=store_incomplete)

    def ending(kind: str, said: str | None) -> Event:
        response = {"id": "r", "output": [], **({} if said is None else {"status": said})}
        return Event(json.dumps({"type": kind, "response": response}), kind)

    created = Event('{"type":"response.created","response":{"id":"r"}}', "response.created")
    assert adapter.verify([created, ending("response.completed", status)]) is Outcome.FAIL
    assert adapter.verify([created, ending("response.completed", "completed")]) is Outcome.COMPLETE
    assert adapter.verify([created, ending("response.completed", None)]) is Outcome.COMPLETE
    if store_incomplete:
        assert adapter.verify([created, ending("response.incomplete", "incomplete")]) is (
            Outcome.COMPLETE
        )
        assert adapter.verify([created, ending("response.incomplete", "completed")]) is (
            Outcome.FAIL
        )


def test_store_incomplete_is_an_explicit_option():
    ev = Event(
        '{"type":"response.incomplete","response":{"id":"r","output":[]}}', "response.incomplete"
    )
    assert OpenAIResponses().outcome(ev) is Outcome.FAIL
    keep = OpenAIResponses(store_incomplete=True)
    assert keep.outcome(ev) is Outcome.COMPLETE
    assert json.loads(keep.final_body([ev]) or b"") == {"id": "r", "output": []}
    assert OpenAIResponses().final_body([ev]) is None
    incomplete = _body([_msg_item("cut sh")], status="incomplete")
    assert OpenAIResponses().body_outcome(incomplete) is Outcome.FAIL
    assert keep.body_outcome(incomplete) is Outcome.COMPLETE
    events = keep.synthesize(incomplete)
    assert events is not None
    assert events[-1].event == "response.incomplete"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"status":"completed","output":[]}', Outcome.COMPLETE),
        (b'{"status":"failed","output":[]}', Outcome.FAIL),
        (b'{"status":"queued","output":[]}', Outcome.FAIL),
        (b'{"status":"in_progress","output":[]}', Outcome.FAIL),
        (b'{"status":"completed","output":[],"error":{"code":"x"}}', Outcome.FAIL),
        (b'{"status":"completed"}', Outcome.FAIL),
        (b'{"error":{"message":"bad key"}}', Outcome.FAIL),
        (b"not json", Outcome.FAIL),
        (b"[]", Outcome.FAIL),
    ],
)
def test_body_outcome(body, expected):
    assert ADAPTER.body_outcome(body) is expected


def test_verify_rejects_sequence_gaps_and_failures():
    ok = [
        Event('{"type":"response.created","sequence_number":0,"response":{}}', "response.created"),
        Event(
            '{"type":"response.completed","sequence_number":1,"response":{}}', "response.completed"
        ),
    ]
    assert ADAPTER.verify(ok) is Outcome.COMPLETE
    gap = [ok[0], Event(ok[1].data.replace(":1,", ":2,"), "response.completed")]
    assert ADAPTER.verify(gap) is Outcome.FAIL
    # A stream that begins with its response.created is whole wherever it counts from (a
    # hand-made one may count from 1); one that begins elsewhere, not at 0, lost its first.
    late = [Event(e.data.replace(f":{i},", f":{i + 3},"), e.event) for i, e in enumerate(ok)]
    assert '"sequence_number":3' in late[0].data and ADAPTER.verify(late) is Outcome.COMPLETE
    assert ADAPTER.verify(late[1:]) is Outcome.FAIL  # (no response.created: events lost)
    assert ADAPTER.verify(ok[:1]) is Outcome.FAIL
    failed = [ok[0], Event('{"type":"error","error":{}}', "error"), ok[1]]
    assert ADAPTER.verify(failed) is Outcome.FAIL


def test_final_body_rebuilds_a_missing_output_from_item_events():
    item = {"id": "m", "type": "message", "status": "completed", "role": "assistant", "content": []}
    events = [
        Event(json.dumps({"type": "response.output_item.done", "output_index": 0, "item": item})),
        Event('{"type":"response.completed","response":{"id":"r","status":"completed"}}'),
    ]
    body = ADAPTER.final_body(events)
    assert body is not None
    assert json.loads(body) == {"id": "r", "status": "completed", "output": [item]}


def test_synthesize_refuses_what_is_not_a_finished_response():
    assert ADAPTER.synthesize(b"not json") is None
    assert ADAPTER.synthesize(b'{"status":"completed"}') is None
    assert ADAPTER.synthesize(b'{"status":"queued","output":[]}') is None
    assert ADAPTER.synthesize(b'{"status":"failed","output":[]}') is None


def test_background_response_streams_queued_first():
    events = ADAPTER.synthesize(_body([_msg_item("ok")], background=True))
    assert events is not None
    assert [e.event for e in events[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert json.loads(events[0].data)["response"]["status"] == "queued"
    validate_responses(events)


@settings(max_examples=150, deadline=None)
@given(st.lists(malformed_events, max_size=12), responses_streams(max_items=2), st.data())
def test_malformed_events_never_crash(garbage, payloads, data):
    # (6) Unknown or broken events pass through; a stream is never completed by one.
    events = to_events(payloads)
    check_lenient(ADAPTER, events, garbage, data)
    # Unknown types between valid events do not stop the stream from completing.
    unknown = Event('{"type":"response.brand_new.delta","delta":"?"}', "response.brand_new.delta")
    assert ADAPTER.verify([*events[:-1], unknown, events[-1]]) is Outcome.COMPLETE


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "type",
                        "output",
                        "content",
                        "summary",
                        "status",
                        "id",
                        "text",
                        "arguments",
                        "logprobs",
                        "annotations",
                        "code",
                        "operation",
                        "error",
                        "background",
                    ]
                ),
                c,
                max_size=5,
            )
        ),
        max_leaves=30,
    )
)
def test_synthesize_survives_wrong_shapes(body):
    if isinstance(body, dict):
        body.setdefault("output", [])
        body["status"] = "completed"
    out = ADAPTER.synthesize(json.dumps(body).encode())
    assert out is None or all(isinstance(e, Event) for e in out)


# -- helpers -------------------------------------------------------------------------------


def _msg_item(text):
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    return {
        "id": "msg_1",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }


def _body(output, status="completed", background=False):
    return json.dumps(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": status,
            "background": background,
            "model": "gpt-5",
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 1,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": 1,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 2,
            },
        }
    ).encode()

"""The adapters on real recorded API streams: classification, pass-through, final body (the
SDK's own accumulation as the judge) and synthesis round trips."""

from __future__ import annotations

import json

import pytest
from adapter_oracles import (
    check_responses_consistency,
    normalize_chat,
    normalize_message,
    normalize_response,
    sdk_anthropic_final,
    sdk_chat_final,
    sdk_responses_final,
)
from real_streams import EXPECTED, Recording, require_dir

from sse_cache import Outcome, SSEParser, serialize_sse
from sse_cache.recorder import RecorderState

pytestmark = pytest.mark.real_streams

FILES = sorted(EXPECTED)
COMPLETED = [f for f in FILES if EXPECTED[f][0] is Outcome.COMPLETE]


def test_every_recording_is_classified():
    present = {p.name for p in require_dir().iterdir() if p.suffix in (".sse", ".jsonl")}
    assert present == set(EXPECTED), "classify new recordings in real_streams.EXPECTED"


@pytest.mark.parametrize("name", FILES)
def test_classification(name):
    expected, verified = EXPECTED[name]
    rec = Recording(name)
    # The library's own Recorder judges (a later failure overrides a completion), not a
    # re-implementation of its rule that could drift from it.
    assert rec.verdict() is expected
    assert rec.adapter.verify(rec.events) is verified  # type: ignore[attr-defined]
    # With the whole-stream check too: stored exactly when both verdicts say COMPLETE.
    recorder = rec.record()
    stored = expected is Outcome.COMPLETE and verified is Outcome.COMPLETE
    assert (recorder.state is RecorderState.COMPLETE) is stored, recorder.reason
    if name.endswith(".jsonl") and name.startswith("openai-responses"):
        # Without `event:` lines (a gateway that drops them) the payload type decides.
        bare = Recording(name, named=False)
        assert bare.verdict() is expected
    assert rec.discarded is (name == "anthropic_tool-use_sdk-fixture.sse")


@pytest.mark.parametrize("name", [f for f in FILES if f.endswith(".sse")])
def test_pass_through_is_byte_exact(name):
    rec = Recording(name)
    wire = serialize_sse(rec.events)
    if rec.discarded:
        assert rec.raw.startswith(wire)  # all but the unterminated last event
    else:
        assert wire == rec.raw
    # Splitting the bytes anywhere gives the same events.
    parser = SSEParser()
    pieces = [rec.raw[i : i + 7] for i in range(0, len(rec.raw), 7)]
    assert [ev for piece in pieces for ev in parser.feed(piece)] == rec.events


@pytest.mark.parametrize("name", COMPLETED)
def test_final_body_matches_the_sdk(name):
    rec = Recording(name)
    body = rec.adapter.final_body(rec.events)
    assert body is not None
    assert rec.adapter.body_outcome(body) is Outcome.COMPLETE
    assert rec.adapter.meta(rec.events)
    parsed = json.loads(body)
    if name.startswith("openai-responses"):
        # Byte-exact: the `response` text of the completing event as received.
        assert any(body.decode() in ev.data for ev in rec.events)
        if json.loads(rec.events[0].data)["type"] == "response.created":
            assert _lenient(parsed) == sdk_responses_final(rec.events, strict=False)
        else:
            # The SDK cannot accumulate a resumed stream (no response.created): compare ids.
            assert parsed["id"] == rec.adapter.meta(rec.events)["response_id"]
    elif name.startswith("openai-chat"):
        assert normalize_chat(parsed) == sdk_chat_final(rec.events, strict=False)
    else:
        assert _lenient_message(parsed) == sdk_anthropic_final(rec.events, strict=False)


@pytest.mark.parametrize("name", COMPLETED)
def test_synthesize_round_trip(name):
    rec = Recording(name)
    adapter = rec.adapter
    body = adapter.final_body(rec.events)
    assert body is not None
    events = adapter.synthesize(body)
    assert events is not None
    again = adapter.final_body(events)
    assert again is not None
    assert json.loads(again) == json.loads(body)
    assert adapter.verify(events) is Outcome.COMPLETE  # type: ignore[attr-defined]
    if name.startswith("openai-responses"):
        check_responses_consistency(events)
        assert sdk_responses_final(events, strict=False) == _lenient(json.loads(body))
    elif name.startswith("openai-chat"):
        assert sdk_chat_final(events, strict=False) == sdk_chat_final(rec.events, strict=False)
    else:
        assert sdk_anthropic_final(events, strict=False) == sdk_anthropic_final(
            rec.events, strict=False
        )


def test_error_then_failed_fails_at_the_error_event():
    rec = Recording("openai-responses_error-then-failed_gpt-5-nano.jsonl")
    outcomes = [rec.adapter.outcome(ev) for ev in rec.events]
    assert outcomes == [Outcome.CONTINUE, Outcome.CONTINUE, Outcome.FAIL, Outcome.FAIL]
    assert rec.adapter.final_body(rec.events) is None


def test_reasoning_summaries_keep_their_index():
    rec = Recording("openai-responses_reasoning-4-summaries_o3-mini.sse")
    body = rec.adapter.final_body(rec.events)
    assert body is not None
    events = rec.adapter.synthesize(body)
    assert events is not None
    indexes = [
        json.loads(e.data)["summary_index"]
        for e in events
        if e.event == "response.reasoning_summary_part.added"
    ]
    assert indexes == [0, 1, 2, 3]


def _lenient(response):
    return normalize_response(response, strict=False)


def _lenient_message(message):
    return normalize_message(message, strict=False)

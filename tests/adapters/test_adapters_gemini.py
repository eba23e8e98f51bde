"""Google Gemini adapter: fidelity properties with the google-genai SDK as the oracle, the
completion rules, the HTTP policy for Gemini routes (key, tenant, ``alt=sse``), real recorded
streams from ``../shared/real-streams-gemini`` and record/replay on every backend."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from adapter_oracles import (
    check_lenient,
    gemini_parse,
    sdk_gemini_body_view,
    sdk_gemini_view,
    validate_gemini,
)
from adapter_strategies import (
    gemini_events,
    gemini_malformed_events,
    gemini_streams,
    gemini_wire,
    json_values,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sse_cache.adapters
from servers import require_dir
from sse_cache import Event, Outcome, SSEParser, serialize_sse
from sse_cache.adapters import GeminiGenerateContent, by_name, for_path
from sse_cache.adapters.gemini import BLOCKED_FINISH_REASONS, HttpRoute
from sse_cache.engine import CacheStatus, StreamCache
from sse_cache.http.policy import CachePolicy
from sse_cache.keys import CacheRequest, DefaultKeyer
from sse_cache.protocols import Backend, StreamAdapter, VerifyingAdapter

ADAPTER = GeminiGenerateContent()
SETTINGS = settings(max_examples=60, deadline=None)
delta_sizes = st.sampled_from([None, 1, 3, 16])
C, F, K = Outcome.COMPLETE, Outcome.FAIL, Outcome.CONTINUE


def chunk(*candidates: dict[str, object], **top: object) -> Event:
    return Event(json.dumps({"candidates": list(candidates), **top}, ensure_ascii=False))


def text(value: str, **extra: object) -> dict[str, object]:
    return {"content": {"parts": [{"text": value}], "role": "model"}, **extra}


# -- the adapter ------------------------------------------------------------------------------


def test_registry_and_protocol():
    assert "GeminiGenerateContent" in sse_cache.adapters.__all__
    assert isinstance(ADAPTER, StreamAdapter) and isinstance(ADAPTER, VerifyingAdapter)
    assert by_name("gemini").name == "gemini"
    assert isinstance(by_name("gemini", store_blocked=True), GeminiGenerateContent)
    for path in (
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        "/v1/models/gemini-2.5-flash:generateContent?alt=json",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro"
        ":streamGenerateContent",
    ):
        assert isinstance(for_path(path), GeminiGenerateContent), path
    assert for_path("/v1beta/models/gemini-2.5-flash:countTokens") is None
    assert ADAPTER.end_outcome() is F
    assert ADAPTER.is_streaming({"contents": [], "stream": True}) is False  # the path says
    with pytest.raises(TypeError, match="finish_reasons"):
        GeminiGenerateContent(finish_reasons="STOP")


def test_key_fields_keep_everything_that_defines_the_answer():
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "tools": [{"functionDeclarations": [{"name": "f"}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
        "generationConfig": {"temperature": 0.2, "thinkingConfig": {"includeThoughts": True}},
        "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}],
        "cachedContent": "cachedContents/abc",
        "some_future_field": 1,
        "labels": {"team": "a"},
        # No fields of this API (it streams by its path): it refuses them (400 "Unknown
        # name"), so they key apart, never answered from a valid request's entry (helper-147).
        "stream": True,
        "timeout": 30,
    }
    fields = ADAPTER.key_fields(body)
    assert set(fields) == set(body) - {"labels"}
    assert set(GeminiGenerateContent(ignore_fields=["cachedContent"]).key_fields(body)) == (
        set(body) - {"labels", "cachedContent"}
    )
    keyer = DefaultKeyer()

    def key(b: dict[str, object]) -> str:
        return keyer.key(CacheRequest(schema="gemini", route="r", fields=ADAPTER.key_fields(b)))

    reordered = dict(reversed(list(body.items())))
    reordered["generationConfig"] = {
        "thinkingConfig": {"includeThoughts": True},
        "temperature": 0.2,
    }
    assert key(reordered) == key(body)  # canonical JSON: key order does not matter
    assert key({**body, "generationConfig": {"temperature": 0.3}}) != key(body)


@SETTINGS
@given(gemini_streams(), st.booleans())
def test_generated_streams_are_valid(chunks, ascii):
    events = gemini_events(chunks, ascii=ascii)
    validate_gemini(events)
    sdk_gemini_view(events)


@SETTINGS
@given(gemini_streams())
def test_outcome_completes_at_the_last_chunk(chunks):
    events = gemini_events(chunks)
    outcomes = [ADAPTER.outcome(ev) for ev in events]
    assert outcomes == [K] * (len(events) - 1) + [C]
    assert ADAPTER.verify(events) is C
    # Without its last chunk (no finishReason) a stream is never stored.
    assert {ADAPTER.outcome(ev) for ev in events[:-1]} <= {K}
    assert ADAPTER.verify(events[:-1]) is F


@SETTINGS
@given(gemini_streams(), st.booleans())
def test_final_body_is_what_the_sdk_accumulates(chunks, ascii):
    events = gemini_events(chunks, ascii=ascii)
    body = ADAPTER.final_body(events)
    assert body is not None
    assert sdk_gemini_body_view(body) == sdk_gemini_view(events)
    assert ADAPTER.body_outcome(body) is C
    parsed = json.loads(body)
    assert parsed["usageMetadata"] == chunks[-1]["usageMetadata"]  # the last one counts
    assert ADAPTER.meta(events) == {
        "model": chunks[-1]["modelVersion"],
        "gemini_response_id": chunks[-1]["responseId"],
    }
    for cand in parsed["candidates"]:
        for part in cand.get("content", {}).get("parts", []):
            call = part.get("functionCall")
            if call is not None:  # assembled: nothing of the streaming is left
                assert "partialArgs" not in call and "willContinue" not in call


@SETTINGS
@given(gemini_streams(), delta_sizes)
def test_synthesize_of_final_body_is_a_faithful_stream(chunks, delta_chars):
    original = gemini_events(chunks)
    adapter = GeminiGenerateContent(delta_chars=delta_chars)
    body = adapter.final_body(original)
    assert body is not None
    synthesized = adapter.synthesize(body)
    assert synthesized is not None
    validate_gemini(synthesized)
    assert sdk_gemini_view(synthesized) == sdk_gemini_view(original)
    assert adapter.verify(synthesized) is C
    outcomes = [adapter.outcome(ev) for ev in synthesized]
    assert outcomes == [K] * (len(synthesized) - 1) + [C]
    assert SSEParser().feed(serialize_sse(synthesized)) == synthesized
    # Identity fields on every chunk; usage once, at the end.
    payloads = [json.loads(e.data) for e in synthesized]
    assert all(p["responseId"] == chunks[-1]["responseId"] for p in payloads)
    assert ["usageMetadata" in p for p in payloads] == [False] * (len(payloads) - 1) + [True]


@SETTINGS
@given(gemini_streams(), delta_sizes)
def test_final_body_of_synthesize_is_the_body(chunks, delta_chars):
    body = ADAPTER.final_body(gemini_events(chunks))
    assert body is not None
    adapter = GeminiGenerateContent(delta_chars=delta_chars)
    events = adapter.synthesize(body)
    assert events is not None
    again = adapter.final_body(events)
    assert again is not None
    assert json.loads(again) == json.loads(body)


@settings(max_examples=40, deadline=None)
@given(gemini_streams(), st.sampled_from([b"\n", b"\r\n"]), st.data())
def test_framing_and_chunk_splits_never_change_the_events(chunks, newline, data):
    events = gemini_events(chunks)
    wire = gemini_wire(events, newline)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(wire) - 1)), max_size=12)))
    parser = SSEParser()
    got: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += parser.feed(wire[a:b])
    parser.close()
    assert got == events
    assert serialize_sse(got) == gemini_wire(events)  # the canonical (LF) form
    assert ADAPTER.final_body(got) == ADAPTER.final_body(events)


def test_unicode_line_separators_inside_json_strings_are_data():
    answer = "one\u2028two\u2029three\u0085four"
    events = [
        chunk(text(answer[:5], index=0)),
        chunk(text(answer[5:], index=0, finishReason="STOP")),
    ]
    for newline in (b"\n", b"\r\n"):
        wire = gemini_wire(events, newline)
        assert "\u2028".encode() in wire and "\u0085".encode() in wire  # raw, not escaped
        parsed = SSEParser().feed(wire)
        assert parsed == events
    body = ADAPTER.final_body(events)
    assert body is not None
    assert json.loads(body)["candidates"][0]["content"]["parts"] == [{"text": answer}]
    synthesized = ADAPTER.synthesize(body)
    assert synthesized is not None
    assert (
        "".join(
            json.loads(e.data)["candidates"][0]["content"]["parts"][0]["text"] for e in synthesized
        )
        == answer
    )
    assert SSEParser().feed(serialize_sse(synthesized)) == synthesized
    assert gemini_parse(json.loads(body)).text == answer


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (chunk(text("Hi", index=0)), K),
        (chunk(text("Hi", index=0, finishReason="STOP")), C),
        (chunk(text("", finishReason="MAX_TOKENS")), C),
        (chunk({"finishReason": "SAFETY", "index": 0}), F),
        (chunk({"finishReason": "RECITATION"}), F),
        (chunk({"finishReason": "OTHER"}), F),
        (chunk({"finishReason": "MALFORMED_FUNCTION_CALL"}), F),
        (chunk({"finishReason": "CONTINUATION"}), F),
        (chunk({"finishReason": "SOME_FUTURE_REASON"}), F),
        (chunk({"finishReason": ""}), K),
        # candidateCount > 1: each needs its reason; one bad reason fails the stream.
        (chunk({"index": 0, "finishReason": "STOP"}, {"index": 1, "finishReason": "STOP"}), C),
        (chunk({"index": 0, "finishReason": "STOP"}, text("x", index=1)), K),
        (chunk({"index": 0, "finishReason": "STOP"}, {"index": 1, "finishReason": "SAFETY"}), F),
        (Event('{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"}}'), F),
        (Event('{"promptFeedback":{"safetyRatings":[]},"candidates":[]}'), K),
        (Event('{"error":{"code":500,"message":"x","status":"INTERNAL"}}'), F),
        (Event('{"error":null,"candidates":[]}'), K),
        (Event('{"candidates":[{"finishReason":5}]}'), F),  # unreadable: never a completion
        (Event('{"candidates":[{"finishReason":{"x":1},"index":"0"}]}'), F),
        (Event('{"candidates":[{"finishReason":"STOP","index":"0"}],"modelVersion":5}'), C),
        (Event('{"candidates":[7]}'), K),  # not a candidate: passed through
        (Event('{"candidates":[{"finishReason":"STOP"}'), F),
        (Event("not json"), K),
        (Event("[DONE]"), K),
        (Event('{"candidates":[]}', "error"), F),
        (Event('{"candidates":[{"finishRe\\u0061son":"SAFETY"}]}'), F),  # escapes are read
    ],
)
def test_outcome_of_single_chunks(event, expected):
    assert ADAPTER.outcome(event) is expected


def test_store_blocked_and_finish_reasons_options():
    blocked = Event('{"promptFeedback":{"blockReason":"SAFETY"},"modelVersion":"m"}')
    safety = chunk({"finishReason": "SAFETY", "index": 0})
    lenient = GeminiGenerateContent(store_blocked=True)
    assert lenient.outcome(blocked) is C and lenient.verify([blocked]) is C
    assert ADAPTER.verify([blocked]) is F
    for reason in sorted(BLOCKED_FINISH_REASONS):
        event = chunk({"finishReason": reason})
        assert ADAPTER.outcome(event) is F and lenient.outcome(event) is C
    assert lenient.outcome(chunk({"finishReason": "OTHER"})) is F
    assert lenient.body_outcome(blocked.data.encode()) is C
    assert lenient.synthesize(blocked.data.encode()) == [
        Event(json.dumps(json.loads(blocked.data), separators=(",", ":")))
    ]
    assert lenient.final_body([blocked]) is not None
    only_stop = GeminiGenerateContent(finish_reasons=["STOP"])
    assert only_stop.outcome(chunk({"finishReason": "MAX_TOKENS"})) is F
    assert only_stop.outcome(safety) is F


def test_every_candidate_needs_its_own_finish_reason():
    a_done = chunk(text("a", index=0, finishReason="STOP"))
    b_going = chunk(text("b", index=1))
    b_done = chunk({"index": 1, "finishReason": "MAX_TOKENS"})
    start = chunk(text("a", index=0), text("b", index=1))
    assert ADAPTER.outcome(a_done) is C  # alone in its chunk: complete for now...
    assert ADAPTER.verify([start, a_done, b_going]) is F  # ...but candidate 1 never finished
    assert ADAPTER.verify([start, a_done, b_going, b_done]) is C
    body = ADAPTER.final_body([start, a_done, b_going, b_done])
    assert body is not None
    candidates = json.loads(body)["candidates"]
    assert [c["content"]["parts"] for c in candidates] == [[{"text": "aa"}], [{"text": "bb"}]]
    assert [c["finishReason"] for c in candidates] == ["STOP", "MAX_TOKENS"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"candidates":[{"content":{"parts":[]},"finishReason":"STOP"}]}', C),
        (b'{"candidates":[{"finishReason":"STOP"},{"finishReason":"MAX_TOKENS","index":1}]}', C),
        (b'{"candidates":[{"finishReason":"STOP"},{"index":1}]}', F),
        (b'{"candidates":[{"finishReason":"SAFETY"}]}', F),
        (b'{"candidates":[{"content":{"parts":[{"text":"x"}]}}]}', F),
        (b'{"candidates":[]}', F),
        (b'{"promptFeedback":{"blockReason":"OTHER"}}', F),
        (b'{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}', F),
        (b'[{"candidates":[{"finishReason":"STOP"}]}]', F),  # the JSON array (no alt=sse)
        (b"", F),
    ],
)
def test_body_outcome(body, expected):
    assert ADAPTER.body_outcome(body) is expected


def test_streamed_function_call_arguments_are_assembled():
    def part(call: dict[str, object], **extra: object) -> Event:
        return chunk({"content": {"role": "model", "parts": [{"functionCall": call, **extra}]}})

    events = [
        part({"name": "book", "willContinue": True}, thoughtSignature="c2ln"),
        part(
            {
                "partialArgs": [
                    {"jsonPath": "$.city", "stringValue": "San ", "willContinue": True}
                ],
                "willContinue": True,
            }
        ),
        part(
            {
                "partialArgs": [{"jsonPath": "$.city", "stringValue": "Francisco"}],
                "willContinue": True,
            }
        ),
        part(
            {
                "partialArgs": [{"jsonPath": "$.when.days[1]", "numberValue": 2}],
                "willContinue": True,
            }
        ),
        part(
            {
                "partialArgs": [
                    {"jsonPath": "$['odd key']", "boolValue": True},
                    {"jsonPath": "$.none", "nullValue": "NULL_VALUE"},
                ],
                "willContinue": True,
            }
        ),
        part({}),
        chunk(
            {
                "content": {"role": "model", "parts": [{"functionCall": {"name": "noop"}}]},
                "finishReason": "STOP",
            }
        ),
    ]
    body = ADAPTER.final_body(events)
    assert body is not None
    parts = json.loads(body)["candidates"][0]["content"]["parts"]
    assert parts == [
        {
            "functionCall": {
                "name": "book",
                "args": {
                    "city": "San Francisco",
                    "when": {"days": [None, 2]},
                    "odd key": True,
                    "none": None,
                },
            },
            "thoughtSignature": "c2ln",
        },
        {"functionCall": {"name": "noop"}},
    ]
    # A JSON path we cannot place: no non-stream answer rather than a wrong one.
    bad = part({"partialArgs": [{"jsonPath": "$..x", "stringValue": "a"}], "willContinue": True})
    assert ADAPTER.final_body([events[0], bad, *events[5:]]) is None


def test_text_parts_join_by_kind_and_signature():
    def parts(*ps: dict[str, object]) -> Event:
        return chunk({"content": {"role": "model", "parts": list(ps)}})

    events = [
        parts({"text": "Let me ", "thought": True}, {"text": "think.", "thought": True}),
        parts({"text": "The answer"}),
        parts({"text": " is 4."}),
        parts({"text": "", "thoughtSignature": "c2ln"}),
        parts({"text": " More."}),
        chunk({"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP"}),
    ]
    body = ADAPTER.final_body(events)
    assert body is not None
    assert json.loads(body)["candidates"][0]["content"]["parts"] == [
        {"text": "Let me think.", "thought": True},
        {"text": "The answer is 4.", "thoughtSignature": "c2ln"},
        {"text": " More."},
    ]


@settings(max_examples=150, deadline=None)
@given(st.lists(gemini_malformed_events, max_size=12), gemini_streams(max_candidates=2), st.data())
def test_malformed_chunks_never_crash(garbage, chunks, data):
    check_lenient(ADAPTER, gemini_events(chunks), garbage, data)
    for ev in garbage:
        GeminiGenerateContent(store_blocked=True).outcome(ev)


@settings(max_examples=100, deadline=None)
@given(st.lists(json_values, max_size=4), json_values)
def test_synthesize_survives_wrong_shapes(candidates, usage):
    body = {"candidates": candidates, "usageMetadata": usage}
    out = ADAPTER.synthesize(json.dumps(body).encode())
    assert out is not None
    assert ADAPTER.final_body(out) is not None


# -- the HTTP policy for Gemini routes ------------------------------------------------------

BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
API_KEY = {"x-goog-api-key": "AIza-secret-a"}
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
UNARY = "/v1beta/models/gemini-2.5-flash:generateContent"
VERTEX = (
    "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-pro"
    ":streamGenerateContent"
)


def test_gemini_routes_are_cached_by_default():
    policy = CachePolicy()
    for path in (STREAM, UNARY, VERTEX, "/v1/models/gemini-2.5-flash:generateContent"):
        matched = policy.match("POST", path)
        assert matched is not None and isinstance(matched[1], GeminiGenerateContent), path
    # Both Gemini routes share one adapter (one cache: cross-mode answers come from it).
    assert policy.match("POST", STREAM)[1] is policy.match("POST", UNARY)[1]  # type: ignore[index]
    for path in (
        "/v1beta/models/gemini-2.5-flash:countTokens",
        "/v1beta/models/gemini-2.5-flash:embedContent",
        "/v1beta/models:generateContent",
        "/v1beta/models/a/b:generateContent",
    ):
        assert policy.match("POST", path) is None, path
    assert policy.match("GET", STREAM) is None


def test_stream_and_non_stream_share_a_key_and_the_model_is_part_of_it():
    policy = CachePolicy()
    stream = policy.decide("POST", STREAM, API_KEY, BODY, "alt=sse")
    unary = policy.decide("POST", UNARY, API_KEY, BODY)
    assert stream.cacheable and stream.streaming
    assert unary.cacheable and not unary.streaming
    assert stream.route == unary.route == "POST " + UNARY
    assert policy.decide("POST", UNARY, API_KEY, BODY, "alt=json").route == unary.route
    other_model = policy.decide("POST", UNARY.replace("2.5-flash", "2.5-pro"), API_KEY, BODY)
    assert other_model.route != unary.route
    vertex = policy.decide("POST", VERTEX, {"authorization": "Bearer ya29"}, BODY, "alt=sse")
    assert vertex.cacheable and vertex.streaming
    assert vertex.route == "POST " + VERTEX.replace(":streamGenerateContent", ":generateContent")


def test_stream_without_alt_sse_passes_through(caplog: pytest.LogCaptureFixture):
    policy = CachePolicy()
    with caplog.at_level(logging.INFO, logger="sse_cache"):
        decision = policy.decide("POST", STREAM, API_KEY, BODY, "key=AIza-secret-q")
    assert not decision.cacheable and "alt=sse" in decision.reason
    assert decision.route == "POST " + STREAM  # logged as asked, less its key
    assert "AIza-secret-q" not in caplog.text and "AIza-secret-q" not in decision.route
    assert not policy.decide("POST", UNARY, API_KEY, BODY, "alt=sse").cacheable
    assert not policy.decide("POST", STREAM, API_KEY, BODY, "alt=json").cacheable
    assert policy.decide("POST", STREAM, API_KEY, BODY, "%24alt=sse").streaming  # $alt


def test_the_key_query_parameter_is_a_credential_never_a_route():
    policy = CachePolicy()
    by_query = policy.decide("POST", STREAM, {}, BODY, "alt=sse&key=AIza-secret-a")
    by_header = policy.decide("POST", STREAM, API_KEY, BODY, "alt=sse")
    other = policy.decide("POST", STREAM, {}, BODY, "key=AIza-secret-b&alt=sse")
    assert by_query.cacheable and by_query.tenant
    assert by_query.route == by_header.route == other.route
    assert "secret" not in by_query.route
    assert by_query.tenant == by_header.tenant  # the same key, header or query: one tenant
    assert other.tenant != by_query.tenant
    # A header and a query key that differ: both count (never one tenant's entry for another).
    both = policy.decide("POST", STREAM, API_KEY, BODY, "alt=sse&key=AIza-secret-b")
    assert both.tenant not in (by_header.tenant, other.tenant)
    assert policy.tenant_of({}, "key=AIza-secret-a") == by_header.tenant
    # Also on other routes: a key in the query never reaches a route.
    chat = policy.decide(
        "POST", "/v1/chat/completions", {}, b'{"messages":[]}', "api-version=1&key=k"
    )
    assert chat.route == "POST /v1/chat/completions?api-version=1" and chat.cacheable
    # A tenant callable sees the query key as the x-goog-api-key header.
    seen: list[dict[str, str]] = []
    custom = CachePolicy(tenant=lambda h: seen.append(dict(h)) or h.get("x-goog-api-key", ""))
    assert custom.decide("POST", STREAM, {}, BODY, "alt=sse&key=K").tenant == "c:K"
    assert seen[-1]["x-goog-api-key"] == "K"


def test_an_unusual_route_streams_with_alt_sse():
    policy = CachePolicy({"/gemini": GeminiGenerateContent})
    assert policy.decide("POST", "/gemini", API_KEY, BODY, "alt=sse").streaming
    assert not policy.decide("POST", "/gemini", API_KEY, BODY).streaming
    assert ADAPTER.http_route("/gemini", [("alt", "sse"), ("x", "1")]) == HttpRoute(
        "/gemini", (("x", "1"),), True
    )


# -- real recorded streams (../shared/real-streams-gemini, never copied here) ------------------

_BESIDE = Path(__file__).resolve().parents[3] / "shared" / "real-streams-gemini"
REAL = Path(os.environ.get("SSE_CACHE_REAL_STREAMS_GEMINI", str(_BESIDE)))

#: file -> (stored by default, stored with store_blocked=True, framed with CRLF)
RECORDINGS = {
    "gemini_no-args-tool-call.sse": (True, True, False),
    "gemini_prompt-blocked_gemini-3.7-flash.sse": (False, True, False),
    "gemini_text-thought-signature_gemini-3-pro.sse": (True, True, False),
    "gemini_tool-call-streamed-arguments_gemini-3.1-pro.sse": (True, True, True),
}


def real_dir() -> Path:
    """The recordings; skipped when absent, except under CI: a failure."""
    return require_dir(REAL, "the real Gemini streams directory")


def recording(name: str) -> tuple[bytes, list[Event]]:
    path = real_dir() / name
    if not path.exists():
        pytest.fail(f"{path} is missing from the real Gemini streams directory")
    raw = path.read_bytes()
    parser = SSEParser()
    events = parser.feed(raw)
    parser.close()
    assert not parser.discarded
    return raw, events


@pytest.mark.real_streams
def test_every_gemini_recording_is_classified():
    present = {p.name for p in real_dir().iterdir() if p.suffix == ".sse"}
    assert present == set(RECORDINGS), "classify new recordings in RECORDINGS"


@pytest.mark.real_streams
@pytest.mark.parametrize("name", sorted(RECORDINGS))
def test_real_recording_classification_and_pass_through(name):
    stored, stored_blocked, crlf = RECORDINGS[name]
    raw, events = recording(name)
    assert (b"\r\n" in raw) is crlf
    verdict = ADAPTER.verify(events)
    assert verdict is (C if stored else F)
    assert GeminiGenerateContent(store_blocked=True).verify(events) is (C if stored_blocked else F)
    # The events are the bytes: canonical LF framing re-frames a CRLF stream, nothing else.
    assert serialize_sse(events) == raw.replace(b"\r\n", b"\n")
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    parser = SSEParser()
    assert [ev for piece in pieces for ev in parser.feed(piece)] == events
    validate_gemini(events, strict=False)


@pytest.mark.real_streams
@pytest.mark.parametrize("name", sorted(RECORDINGS))
def test_real_recording_final_body_and_synthesis(name):
    _, events = recording(name)
    adapter = GeminiGenerateContent(store_blocked=True)
    body = adapter.final_body(events)
    assert body is not None
    assert adapter.body_outcome(body) is C
    assert sdk_gemini_body_view(body, strict=False) == sdk_gemini_view(events, strict=False)
    assert adapter.meta(events)["gemini_response_id"]
    synthesized = adapter.synthesize(body)
    assert synthesized is not None
    assert json.loads(adapter.final_body(synthesized) or b"") == json.loads(body)
    assert adapter.verify(synthesized) is C
    assert sdk_gemini_view(synthesized, strict=False) == sdk_gemini_view(events, strict=False)


@pytest.mark.real_streams
def test_real_streamed_arguments_and_thought_signature():
    _, events = recording("gemini_tool-call-streamed-arguments_gemini-3.1-pro.sse")
    parts = json.loads(ADAPTER.final_body(events) or b"")["candidates"][0]["content"]["parts"]
    calls = [p["functionCall"] for p in parts]
    assert calls == [
        {"name": "getWeather", "args": {"location": "Boston"}},
        {"name": "getWeather", "args": {"location": "San Francisco"}},
    ]
    assert "thoughtSignature" in parts[0] and "thoughtSignature" not in parts[1]
    _, events = recording("gemini_text-thought-signature_gemini-3-pro.sse")
    parts = json.loads(ADAPTER.final_body(events) or b"")["candidates"][0]["content"]["parts"]
    assert len(parts) == 1 and parts[0]["text"].startswith("There are **3**")
    assert parts[0]["thoughtSignature"].startswith("EqsF")


# -- record -> store (every backend) -> replay, through the engine -------------------------

ROUTE = "POST " + UNARY


def _upstream(events: Sequence[Event]) -> tuple[list[int], object]:
    calls = [0]

    async def gen() -> AsyncIterator[Event]:
        for ev in events:
            yield ev

    def open_stream() -> AsyncIterator[Event]:
        calls[0] += 1
        return gen()

    return calls, open_stream


async def _through(cache: StreamCache, body: dict[str, object], upstream: object):
    req = cache.request(body, route=ROUTE, shared=True)
    async with cache.stream(req, upstream) as s:  # type: ignore[arg-type]
        got = [ev async for ev in s]
    return s, got


def _wire(events: Sequence[Event]) -> list[tuple[str, str | None]]:
    return [(e.data, e.event) for e in events]


@pytest.mark.anyio
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=gemini_streams())  # (drawn before the loop runs: see test_adapters_engine.py)
async def test_record_store_replay_on_every_backend(
    backend: Backend, stream: list[dict[str, object]]
) -> None:
    events = gemini_events(stream)
    cache = StreamCache(backend, ADAPTER)
    body = {"contents": [{"role": "user", "parts": [{"text": uuid.uuid4().hex}]}]}
    calls, upstream = _upstream(events)
    first, delivered = await _through(cache, body, upstream)
    assert first.status == CacheStatus.MISS and first.stored, first.reason
    assert _wire(delivered) == _wire(events)
    second, replayed = await _through(cache, body, upstream)
    assert second.status == CacheStatus.HIT and calls[0] == 1
    assert _wire(replayed) == _wire(events)
    entry = await cache.lookup(second.key)
    assert entry is not None
    answer = cache.body_of(entry)
    assert answer is not None
    assert sdk_gemini_body_view(answer) == sdk_gemini_view(replayed)


@pytest.mark.anyio
@pytest.mark.real_streams
@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_real_recordings_record_and_replay(backend: Backend, name: str):
    _, events = recording(name)
    cache = StreamCache(backend, ADAPTER)
    body = {"contents": [{"role": "user", "parts": [{"text": name + uuid.uuid4().hex}]}]}
    calls, upstream = _upstream(events)
    first, delivered = await _through(cache, body, upstream)
    assert _wire(delivered) == _wire(events)
    assert first.stored is RECORDINGS[name][0], first.reason
    second, replayed = await _through(cache, body, upstream)
    if RECORDINGS[name][0]:
        assert second.status == CacheStatus.HIT and calls[0] == 1
        assert _wire(replayed) == _wire(events)
    else:
        assert second.status == CacheStatus.MISS and calls[0] == 2  # a refusal: not stored


def test_tuned_model_routes_can_be_added():
    adapter = GeminiGenerateContent()
    policy = CachePolicy(
        {
            "/tunedModels/{model}:streamGenerateContent": adapter,
            "/tunedModels/{model}:generateContent": adapter,
        }
    )
    stream = policy.decide(
        "POST", "/v1beta/tunedModels/t1:streamGenerateContent", API_KEY, BODY, "alt=sse"
    )
    unary = policy.decide("POST", "/v1beta/tunedModels/t1:generateContent", API_KEY, BODY)
    assert stream.streaming and not unary.streaming
    assert stream.route == unary.route == "POST /v1beta/tunedModels/t1:generateContent"
    assert policy.match("POST", UNARY) is None  # only the routes given

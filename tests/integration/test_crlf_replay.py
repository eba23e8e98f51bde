"""Byte-exact replay of CRLF-framed streams (Gemini's API frames SSE with CRLF): a stream whose
every line ended with CRLF is recorded as such and replayed with CRLF on every replay path
(the instant wire path, paced replays, Last-Event-ID suffixes, OpenAI resume); LF streams
as before; CR-only and mixed streams as they came (stored as their bytes: see
test_verbatim_replay.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from servers import require_dir
from sse_cache import Event, serialize_sse
from sse_cache.adapters import GeminiGenerateContent
from sse_cache.asgi import CacheMiddleware
from sse_cache.testing import responses_stream
from sse_renderings import client, parse, replays, upstream_cut_at
from sse_renderings import events as _events

_BESIDE = Path(__file__).resolve().parents[3] / "shared" / "real-streams-gemini"
REAL = Path(os.environ.get("SSE_CACHE_REAL_STREAMS_GEMINI", str(_BESIDE)))
CRLF_RECORDING = "gemini_tool-call-streamed-arguments_gemini-3.1-pro.sse"
STREAM = "/v1beta/models/gemini-mock-1:streamGenerateContent?alt=sse"
AUTH = {"authorization": "Bearer sk-test"}


def real_dir() -> Path:
    """The recordings; skipped when absent, except under CI: a failure."""
    return require_dir(REAL, "the real Gemini streams directory")


# -- the real CRLF recording, through the middleware on a byte-storing backend ---------------


@pytest.mark.anyio
@pytest.mark.real_streams
@pytest.mark.parametrize("pieces", [100, 1, 7])
async def test_real_crlf_recording_hits_are_byte_identical(tmp_path: Path, pieces: int) -> None:
    raw = (real_dir() / CRLF_RECORDING).read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n")  # the recording is CRLF throughout
    upstream = upstream_cut_at(raw, list(range(pieces, len(raw), pieces)))
    adapter = GeminiGenerateContent()
    routes = {
        "/models/{model}:generateContent": adapter,
        "/models/{model}:streamGenerateContent": adapter,
    }
    app = CacheMiddleware(upstream, f"sqlite:///{tmp_path / 'c.db'}", routes=routes)
    body = {"contents": [{"role": "user", "parts": [{"text": "crlf"}]}]}
    headers = {"x-goog-api-key": "AIza-k"}
    async with client(app) as http:
        miss = await http.post(STREAM, json=body, headers=headers)
        hit = await http.post(STREAM, json=body, headers=headers)
        paced = await http.post(STREAM, json=body, headers={**headers, "x-sse-cache-replay": "0ms"})
    assert miss.headers["x-sse-cache"] == "miss" and miss.content == raw
    assert hit.headers["x-sse-cache"] == "hit" and hit.content == raw  # the wire path
    assert paced.headers["x-sse-cache"] == "hit" and paced.content == raw  # the event path
    assert upstream.calls == 1


# -- property: random CRLF streams, random chunk splits ---------------------------------------


async def miss_hit_and_suffix(
    raw: bytes, cuts: list[int], last_id: str | None
) -> tuple[bytes, bytes, bytes, bytes | None]:
    miss, hit, paced, suffix = await replays(raw, cuts, last_id, AUTH)
    assert miss == raw
    return miss, hit, paced, suffix


def _suffix_after(events: list[Event], last_id: str) -> list[Event]:
    for i, event in enumerate(events):
        if event.id == last_id:
            return events[i + 1 :]
    return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_events, st.lists(st.integers(1, 400), max_size=12), st.data())
def test_crlf_streams_replay_byte_identical(
    events: list[Event], cuts: list[int], data: st.DataObject
) -> None:
    raw = serialize_sse(events, eol="crlf")
    ids = [e.id for e in events if e.id is not None]
    last_id = data.draw(st.sampled_from(ids)) if ids else None
    _, hit, paced, suffix = anyio.run(miss_hit_and_suffix, raw, cuts, last_id)
    assert hit == raw and paced == raw
    if last_id is not None:
        assert suffix == serialize_sse(_suffix_after(events, last_id), eol="crlf")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_events, st.lists(st.integers(1, 400), max_size=12))
def test_lf_streams_replay_as_before(events: list[Event], cuts: list[int]) -> None:
    raw = serialize_sse(events)
    _, hit, paced, _ = anyio.run(miss_hit_and_suffix, raw, cuts, None)
    assert hit == raw and paced == raw


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_events, st.lists(st.integers(1, 400), max_size=12), st.data())
def test_mixed_and_cr_streams_replay_as_they_came(
    events: list[Event], cuts: list[int], data: st.DataObject
) -> None:
    lf = serialize_sse(events)
    # Each line end LF, CR or CRLF, with at least two different kinds (or CR alone).
    ends = data.draw(
        st.lists(
            st.sampled_from([b"\n", b"\r", b"\r\n"]),
            min_size=lf.count(b"\n"),
            max_size=lf.count(b"\n"),
        ).filter(lambda e: len(set(e)) > 1 or e[0] == b"\r")
    )
    lines = lf.split(b"\n")
    raw = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    assume(parse(raw) == events)  # a CR then an LF across an empty line would be one CRLF
    _, hit, paced, _ = anyio.run(miss_hit_and_suffix, raw, cuts, None)
    assert hit == raw and paced == raw  # (before: written back with LF line ends)


# -- OpenAI resume (GET /v1/responses/{id}?stream=true&starting_after=N) ----------------------


@pytest.mark.anyio
async def test_openai_resume_of_a_crlf_stream_is_crlf() -> None:
    events = responses_stream("crlf", text_deltas=5)
    raw = serialize_sse(events, eol="crlf")
    upstream = upstream_cut_at(raw, [3, 50, 51])
    app = CacheMiddleware(upstream, "memory://")
    body = {"model": "gpt-mock-1", "input": "crlf", "stream": True}
    async with client(app) as http:
        miss = await http.post("/v1/responses", json=body, headers=AUTH)
        hit = await http.post("/v1/responses", json=body, headers=AUTH)
        response_id = json.loads(events[0].data)["response"]["id"]
        resumed = await http.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": "2"},
            headers=AUTH,
        )
    assert miss.content == raw and hit.headers["x-sse-cache"] == "hit" and hit.content == raw
    assert resumed.headers["x-sse-cache"] == "hit"
    after = [e for e in events if json.loads(e.data)["sequence_number"] > 2]
    assert resumed.content == serialize_sse(after, eol="crlf")
    assert upstream.calls == 1

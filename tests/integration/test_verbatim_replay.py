"""A hit gives back the bytes the upstream sent, whatever form its SSE took: fields in another
order than the canonical one (FastAPI's own SSE writes ``id:`` after ``data:``,
sse-starlette ``id:`` before ``event:``), comments (keep-alive pings), ``data:`` without its
space, extra blank lines, a BOM, mixed line ends. Such a stream is stored as its bytes
(``Entry.wire``) and every replay path sends them: the instant hit, paced replays,
``Last-Event-ID`` suffixes, OpenAI's resume, the transports."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx2
import msgspec
import pytest
from fastapi import FastAPI
from fastapi.sse import EventSourceResponse, ServerSentEvent
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sse_cache import Event, MsgpackCodec, serialize_sse
from sse_cache.adapters import GenericSSE
from sse_cache.asgi import CacheMiddleware
from sse_cache.backends import MemoryBackend
from sse_cache.httpx2 import AsyncCacheTransport
from sse_cache.testing import GatedUpstream, NoticeLog, responses_stream
from sse_renderings import client, parse, renderings, replays, upstream_cut_at

AUTH = {"authorization": "Bearer sk-test"}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(renderings(), st.lists(st.integers(1, 400), max_size=12), st.data())
def test_every_replay_is_the_bytes_that_came(
    rendering: tuple[list[bytes], bytes, list[Event]], cuts: list[int], data: st.DataObject
) -> None:
    pieces, trailer, events = rendering
    raw = b"".join(pieces) + trailer
    assume(parse(raw) == events)
    with_ids = [i for i, event in enumerate(events) if event.id is not None]
    index = data.draw(st.sampled_from(with_ids)) if with_ids else None
    last_id = events[index].id if index is not None else None
    if last_id is not None:
        index = next(i for i, event in enumerate(events) if event.id == last_id)  # the first
    miss, hit, paced, suffix = anyio.run(replays, raw, cuts, last_id, AUTH)
    assert miss == raw and hit == raw and paced == raw
    if index is not None:
        # What came after that event, as it came: what precedes an event goes with it, and
        # what follows the last one comes last (also to a client that had the last event,
        # as the resumes by id and from the live stream send it).
        assert suffix == b"".join(pieces[index + 1 :]) + trailer


@pytest.mark.anyio
async def test_a_canonical_stream_is_stored_as_events_only() -> None:
    # Nothing more is kept for the streams the providers send (their SSE is canonical).
    events = responses_stream("plain", text_deltas=4)
    raw = serialize_sse(events)
    backend = MemoryBackend()
    upstream = upstream_cut_at(raw, [7, 100, 101])
    app = CacheMiddleware(upstream, backend, routes={"/events": GenericSSE})
    async with client(app) as http:
        miss = await http.post("/events", json={"q": 1}, headers=AUTH)
        data = await backend.get(miss.headers["x-sse-cache-key"])
    assert miss.content == raw and data is not None
    stored = MsgpackCodec().decode(data)
    assert stored.wire is None and stored.events is not None
    assert [e.data for e in stored.events] == [e.data for e in events]


# -- FastAPI's own SSE (fastapi.sse), with ids: data first, id last --------------------------


def fastapi_upstream(events: list[Event]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/responses", response_class=EventSourceResponse)
    async def responses() -> Any:
        for index, event in enumerate(events):
            yield ServerSentEvent(raw_data=event.data, event=event.event, id=str(index))

    return app


@pytest.mark.anyio
async def test_fastapi_sse_with_ids_replays_and_resumes_byte_identical() -> None:
    events = responses_stream("fastapi", text_deltas=5)
    upstream = fastapi_upstream(events)
    app = CacheMiddleware(upstream, "memory://")
    body = {"model": "gpt-mock-1", "input": "fastapi", "stream": True}
    async with client(app) as http:
        miss = await http.post("/v1/responses", json=body, headers=AUTH)
        hit = await http.post("/v1/responses", json=body, headers=AUTH)
        paced = await http.post(
            "/v1/responses", json=body, headers={**AUTH, "x-sse-cache-replay": "0ms"}
        )
        response_id = json.loads(events[0].data)["response"]["id"]
        resumed = await http.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": "2"},
            headers=AUTH,
        )
        by_id = await http.post("/v1/responses", json=body, headers={**AUTH, "last-event-id": "3"})
    raw = miss.content
    first = raw.split(b"\n\n")[0]
    assert first.startswith(b"event: response.created\ndata: ") and first.endswith(b"\nid: 0")
    assert miss.headers["x-sse-cache"] == "miss"
    assert hit.headers["x-sse-cache"] == "hit" and hit.content == raw
    assert paced.headers["x-sse-cache"] == "hit" and paced.content == raw
    blocks = [block + b"\n\n" for block in raw.split(b"\n\n")[:-1]]
    assert len(blocks) == len(events)
    after = [i for i, e in enumerate(events) if json.loads(e.data)["sequence_number"] > 2]
    assert resumed.headers["x-sse-cache"] == "hit"
    assert resumed.content == b"".join(blocks[after[0] :])
    assert by_id.headers["x-sse-cache"] == "hit" and by_id.content == b"".join(blocks[4:])


# -- sse-starlette's framing: CRLF, id before event, pings as comments ------------------------


def starlette_framed(events: list[Event]) -> list[bytes]:
    """Each event as sse-starlette writes it (``id``, ``event``, ``data``, CRLF), a ping
    comment before every third."""
    out = []
    for index, event in enumerate(events):
        ping = b": ping - 2026-12-06 00:00:00.000000+00:00\r\n\r\n" if index % 3 == 2 else b""
        head = f"id: {index}\r\nevent: {event.event}\r\n".encode()
        out.append(ping + head + b"data: " + event.data.encode() + b"\r\n\r\n")
    return out


@pytest.mark.anyio
async def test_sse_starlette_framing_with_pings_replays_byte_identical() -> None:
    events = responses_stream("starlette", text_deltas=6)
    pieces = starlette_framed(events)
    upstream = GatedUpstream(pieces)
    app = CacheMiddleware(upstream, "memory://")
    body = {"model": "gpt-mock-1", "input": "starlette", "stream": True}
    async with client(app) as http:
        miss = await http.post("/v1/responses", json=body, headers=AUTH)
        hit = await http.post("/v1/responses", json=body, headers=AUTH)
        paced = await http.post(
            "/v1/responses", json=body, headers={**AUTH, "x-sse-cache-replay": "0ms"}
        )
    raw = b"".join(pieces)
    assert miss.content == raw and hit.content == raw and paced.content == raw
    assert hit.headers["x-sse-cache"] == "hit" and upstream.calls == 1


@pytest.mark.anyio
async def test_the_transport_replays_the_bytes_that_came() -> None:
    events = responses_stream("transport", text_deltas=4)
    raw = b"".join(starlette_framed(events))
    upstream = upstream_cut_at(raw, [5, 40, 41, 300])
    transport = AsyncCacheTransport("memory://", transport=httpx2.ASGITransport(upstream))
    body = {"model": "gpt-mock-1", "input": "transport", "stream": True}
    async with httpx2.AsyncClient(transport=transport, base_url="http://t") as http:
        miss = await http.post("/v1/responses", json=body, headers=AUTH)
        hit = await http.post("/v1/responses", json=body, headers=AUTH)
    assert miss.content == raw and hit.content == raw
    assert hit.headers["x-sse-cache"] == "hit" and upstream.calls == 1


# -- bounds and edges (helper-98) -------------------------------------------------------------


@pytest.mark.anyio
async def test_kept_bytes_past_max_entry_bytes_are_not_stored_but_all_delivered() -> None:
    # Two events and 256 KiB of comments: the events alone fit the limit, the bytes a replay
    # would need do not. The bytes were kept (and stored) whatever their size.
    pings = b": ping\n\n" * (256 * 1024 // 8)
    raw = b"data: a\n\n" + pings + b"data: b\n\n"
    upstream = upstream_cut_at(raw, list(range(4096, len(raw), 4096)))
    notices = NoticeLog()
    app = CacheMiddleware(
        upstream,
        "memory://",
        routes={"/events": GenericSSE},
        max_entry_bytes=64 * 1024,
        hooks=[notices],
    )
    async with client(app) as http:
        miss = await http.post("/events", json={"q": 1}, headers=AUTH)
        again = await http.post("/events", json={"q": 1}, headers=AUTH)
    assert miss.content == raw and again.content == raw
    assert [miss.headers["x-sse-cache"], again.headers["x-sse-cache"]] == ["miss", "miss"]
    assert "max_entry_bytes=65536" in (await notices.wait("not_stored")).detail


@pytest.mark.anyio
@pytest.mark.parametrize("last", [b"event: done\n", b"id: 9\n", b"retry: 5000\n", b": bye\n"])
async def test_fields_after_the_last_event_are_replayed(last: bytes) -> None:
    # A stream ending with a field line and no blank line: no event, but bytes the first
    # client got. The canonical form dropped them from every hit. A client that had the
    # last event gets them too, as from a resume by id or from the live stream (it got
    # nothing: helper-100).
    raw = b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n" + last
    upstream = upstream_cut_at(raw, [])
    app = CacheMiddleware(upstream, "memory://", routes={"/events": GenericSSE})
    async with client(app) as http:
        miss = await http.post("/events", json={"q": 1}, headers=AUTH)
        hit = await http.post("/events", json={"q": 1}, headers=AUTH)
        paced = await http.post(
            "/events", json={"q": 1}, headers={**AUTH, "x-sse-cache-replay": "0ms"}
        )
        resumed = await http.post("/events", json={"q": 1}, headers={**AUTH, "last-event-id": "2"})
    assert hit.headers["x-sse-cache"] == resumed.headers["x-sse-cache"] == "hit"
    assert miss.content == hit.content == paced.content == raw
    assert resumed.content == last


@pytest.mark.anyio
async def test_a_paced_replay_keeps_a_leading_bom_before_its_keep_alives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A paced replay waiting for its first event sends keep-alive comments; a BOM the stream
    # started with then came after one, inside a line: the client lost the first event.
    import sse_cache.http._answers as answers

    monkeypatch.setattr(answers, "PACED_KEEPALIVE_SECONDS", 0.01)
    bom = b"\xef\xbb\xbf"
    raw = bom + b"data: first\n\ndata: second\n\n"
    entry_events = (Event("first", at=0.2), Event("second", at=0.25))
    backend = MemoryBackend()
    app = CacheMiddleware(upstream_cut_at(raw, []), backend, routes={"/events": GenericSSE})
    async with client(app) as http:
        miss = await http.post("/events", json={"q": 1}, headers=AUTH)
        key = miss.headers["x-sse-cache-key"]
        stored = MsgpackCodec().decode(await backend.get(key) or b"")
        assert stored.wire == raw
        # The same entry with its first event late (a reasoning model's first token).
        late = msgspec.structs.replace(stored, events=entry_events)
        await backend.set(key, MsgpackCodec().encode(late), None)
        paced = await http.post(
            "/events", json={"q": 1}, headers={**AUTH, "x-sse-cache-replay": "original"}
        )
    assert paced.headers["x-sse-cache"] == "hit"
    assert paced.content.startswith(bom) and b": keep-alive" in paced.content
    assert [e.data for e in parse(paced.content)] == ["first", "second"]

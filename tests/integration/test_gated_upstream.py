"""``sse_cache.testing.GatedUpstream``: the small SSE upstream the tests put a cache in front
of. It serves the stream it is given, counts calls, holds responses at a gate the test opens,
cuts them, and ends a response whose client left — under uvicorn and as a bare ASGI app."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache import Event, SSEParser, serialize_sse
from sse_cache.testing import GatedUpstream, UpstreamCut, responses_stream

EVENTS = responses_stream("gated", text_deltas=6, summaries=1)

pytestmark = pytest.mark.anyio


class Exchange:
    """One request driven by hand: ``receive`` gives the request body, then waits until
    :attr:`client_leaves` is set to report the client gone; ``send`` keeps every message."""

    def __init__(self, body: bytes = b"{}") -> None:
        self.body = body
        self.sent: list[dict[str, Any]] = []
        self.client_leaves = anyio.Event()
        self._asked = 0
        self.scope = {"type": "http", "method": "POST", "path": "/v1/responses", "headers": []}

    async def receive(self) -> dict[str, Any]:
        self._asked += 1
        if self._asked == 1:
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.client_leaves.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))

    def pieces(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]

    def ended(self) -> bool:
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent
        )


def client(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://t")


async def test_serves_events_bytes_and_pieces_and_counts_calls() -> None:
    upstream = GatedUpstream(EVENTS)
    async with client(upstream) as http:
        first = await http.post("/v1/responses", json={"n": 1})
        second = await http.post("/anything", content=b"raw body")
    assert first.status_code == 200 and first.headers["content-type"] == "text/event-stream"
    assert first.content == second.content == serialize_sse(EVENTS) == upstream.body
    assert SSEParser().feed(first.content) == EVENTS
    assert upstream.calls == 2 and upstream.bodies == [b'{"n":1}', b"raw body"]

    # Bytes are one piece; a list of bytes is sent piece by piece, as given.
    raw = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for stream in (raw, [raw[:3], raw[3:14], raw[14:]]):
        exchange = Exchange()
        upstream = GatedUpstream(stream, status=500, content_type="application/json")
        await upstream(exchange.scope, exchange.receive, exchange.send)
        assert exchange.sent[0]["status"] == 500
        assert exchange.sent[0]["headers"] == [(b"content-type", b"application/json")]
        pieces = exchange.pieces()
        assert pieces[:-1] == ([raw] if stream is raw else stream) and pieces[-1] == b""
        assert exchange.ended()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_holds_every_response_at_the_gate_until_the_test_opens_it(serve: Any) -> None:
    upstream = GatedUpstream(EVENTS, hold_after=2)
    async with serve(upstream) as base, httpx2.AsyncClient(base_url=base, timeout=30) as http:
        got: list[bytes] = []

        async def read() -> None:
            async with http.stream("POST", "/v1/responses", json={}) as response:
                got.append(await response.aread())

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(read)
            await upstream.wait_sent(2)
            # Held: nothing past the gate goes out, however long it waits.
            with anyio.move_on_after(0.3) as waited:
                await upstream.wait_sent(3)
            assert waited.cancelled_caught and got == []
            upstream.gate.set()
        assert got == [upstream.body] * 2
        # An open gate lets later responses through at once.
        assert (await http.post("/v1/responses", json={})).content == upstream.body
    assert upstream.calls == 3 and upstream.disconnects == 0


async def test_held_after_the_last_piece_the_body_is_complete_but_not_ended() -> None:
    upstream = GatedUpstream(EVENTS, hold_after=len(EVENTS))
    exchange = Exchange()
    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream, exchange.scope, exchange.receive, exchange.send)
        await upstream.wait_sent(len(EVENTS))
        assert b"".join(exchange.pieces()) == upstream.body and not exchange.ended()
        upstream.gate.set()
    assert exchange.ended()


async def test_a_client_leaving_while_held_ends_its_response() -> None:
    upstream = GatedUpstream(EVENTS, hold_after=1)
    exchange = Exchange()
    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream, exchange.scope, exchange.receive, exchange.send)
        await upstream.wait_sent(1)
        exchange.client_leaves.set()
    # The app returned without the gate being opened: the response was left, not ended.
    assert exchange.pieces() == [serialize_sse(EVENTS[:1])] and not exchange.ended()
    assert upstream.disconnects == 1 and not upstream.gate.is_set()


async def test_cut_after_sends_part_of_the_stream_then_raises() -> None:
    upstream = GatedUpstream(EVENTS, cut_after=3)
    exchange = Exchange()
    with pytest.raises(UpstreamCut, match="after 3 pieces"):
        await upstream(exchange.scope, exchange.receive, exchange.send)
    assert exchange.pieces() == [serialize_sse([e]) for e in EVENTS[:3]]
    assert not exchange.ended()
    async with client(upstream) as http:
        with pytest.raises(UpstreamCut):
            await http.post("/v1/responses", json={})


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cut_stream_reaches_an_http_client_without_its_end(serve: Any) -> None:
    upstream = GatedUpstream(EVENTS, cut_after=4)
    async with serve(upstream) as base, httpx2.AsyncClient(base_url=base, timeout=30) as http:
        got = b""
        with pytest.raises(httpx2.RemoteProtocolError):
            async with http.stream("POST", "/v1/responses", json={}) as response:
                async for chunk in response.aiter_raw():
                    got += chunk
    assert got == serialize_sse(EVENTS[:4])


async def test_delay_spaces_the_pieces() -> None:
    upstream = GatedUpstream([Event(str(i)) for i in range(4)], delay=0.05)
    exchange = Exchange()
    start = time.perf_counter()
    await upstream(exchange.scope, exchange.receive, exchange.send)
    assert time.perf_counter() - start >= 3 * 0.05  # three gaps between four pieces
    assert len(exchange.pieces()) == 5


@pytest.mark.parametrize(
    ("stream", "options", "error", "message"),
    [
        ("data: x\n\n", {}, TypeError, "not str"),
        ([b"data: x\n\n", 7], {}, TypeError, "bytes or an Event, not int"),
        (EVENTS, {"hold_after": len(EVENTS) + 1}, ValueError, "hold_after must be an int in"),
        (EVENTS, {"cut_after": -1}, ValueError, "cut_after must be an int in"),
        (EVENTS, {"hold_after": True}, ValueError, "hold_after"),
        (EVENTS, {"hold_after": 3, "cut_after": 2}, ValueError, "must not come after"),
        (EVENTS, {"delay": -0.1}, ValueError, "delay must be >= 0"),
        (EVENTS, {"delay": float("nan")}, ValueError, "delay must be >= 0"),
        (EVENTS, {"status": 99}, ValueError, "status must be an HTTP status"),
    ],
)
def test_bad_arguments_are_named(stream: Any, options: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        GatedUpstream(stream, **options)

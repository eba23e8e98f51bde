"""The proxy forwards a miss in as few writes as the upstream allows (issue 17): what arrived
from the upstream while the last write went out goes out as one ASGI message, and yet an
event is never held back waiting for the next one.

The upstream here is a raw HTTP/1.1 server on a loopback socket that writes its answer, one
HTTP chunk per event, in the pieces a test asks for (a burst of 2,000 events in one write, or
one event at a time when the test says so); the proxy runs under uvicorn, and a wrapper
around it counts the body messages it sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest

from sse_cache import SSEParser
from sse_cache.asgi import CacheMiddleware
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import responses_text_pieces

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-batching"}
PAYLOAD = {"model": "gpt-mock", "input": "forwarded in few writes", "stream": True}
DEADLOCK_GUARD = 30  # seconds: only a hung test ever reaches it


def answer(deltas: int) -> list[bytes]:
    """A complete Responses stream with ``deltas`` text deltas, one ``bytes`` per event."""
    return responses_text_pieces(deltas, lambda i: f"w{i} ", response_id="resp_batch")


def _chunked(events: Sequence[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)


class RawUpstream:
    """An HTTP/1.1 upstream on a raw socket. Every request is answered with ``writes``: the
    response head and the chunked body, one HTTP chunk per event, each ``writes[i]`` (a list
    of events) written to the socket at once. Between two writes it waits for
    :meth:`release`. ``end=False``: the connection closes after the last write, without the
    body's end (an upstream that broke off)."""

    def __init__(self, writes: Sequence[Sequence[bytes]], *, end: bool = True) -> None:
        self.writes = [list(w) for w in writes]
        self.end = end
        self.body = b"".join(b"".join(w) for w in self.writes)
        self.events = sum(len(w) for w in self.writes)
        self.calls = 0
        self._release, self._released = anyio.create_memory_object_stream[None](1000)

    def release(self) -> None:
        """Let the next write go."""
        self._release.send_nowait(None)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with self._release, self._released, listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._answer)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                tg.cancel_scope.cancel()

    async def _answer(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += await stream.receive()
            self.calls += 1
            start = (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            )
            for i, events in enumerate(self.writes):
                if i:
                    await self._released.receive()
                last = i == len(self.writes) - 1
                tail = b"0\r\n\r\n" if last and self.end else b""
                await stream.send((start if i == 0 else b"") + _chunked(events) + tail)


class Counted:
    """The proxy app, counting the response body messages it sends that carry bytes."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.messages = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting(message: Any) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.messages += 1
            await send(message)

        await self.app(scope, receive, counting)


@asynccontextmanager
async def proxy(serve: Any, upstream: RawUpstream) -> AsyncIterator[tuple[str, Counted]]:
    async with upstream.running() as upstream_url:
        app = create_proxy_app(upstream_url, "memory://")
        counted = Counted(app)
        try:
            async with serve(counted) as base:
                yield base, counted
        finally:
            await app.aclose()


async def test_a_burst_of_events_goes_out_in_far_fewer_messages_than_it_came_in(
    serve: Any,
) -> None:
    # 2,002 events (2,002 HTTP chunks) in one write: the proxy reads them 64 KiB at a time
    # and sends what each read brought as one message, not one message per chunk.
    upstream = RawUpstream([answer(2000)])
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream) as (base, counted),
            httpx2.AsyncClient(base_url=base, timeout=30) as client,
        ):
            miss = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert miss.headers["x-sse-cache"] == "miss"
            assert miss.content == upstream.body
            assert 1 <= counted.messages <= upstream.events // 10
            # What was stored is the upstream's answer, byte for byte, event for event.
            hit = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert hit.headers["x-sse-cache"] == "hit"
            assert hit.content == upstream.body
    assert upstream.calls == 1
    parser = SSEParser()
    assert len(parser.feed(hit.content)) == upstream.events


async def test_each_event_goes_out_before_the_upstream_sends_the_next(serve: Any) -> None:
    # The upstream sends its next event only once the client has the previous one, through
    # the proxy: a proxy that held an event back until more arrived would never finish
    # (the deadlock guard).
    events = answer(30)
    upstream = RawUpstream([[event] for event in events])
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream) as (base, _),
            httpx2.AsyncClient(base_url=base, timeout=30) as client,
        ):
            async with client.stream(
                "POST", "/v1/responses", json=PAYLOAD, headers=KEY
            ) as response:
                assert response.headers["x-sse-cache"] == "miss"
                received = b""
                chunks = response.aiter_raw()
                for i in range(len(events)):
                    expected = b"".join(events[: i + 1])
                    while len(received) < len(expected):
                        received += await anext(chunks)
                    assert received == expected  # this event and nothing after it
                    if i + 1 < len(events):
                        upstream.release()
                assert b"".join([chunk async for chunk in chunks]) == b""
            hit = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert hit.headers["x-sse-cache"] == "hit" and hit.content == upstream.body
    assert upstream.calls == 1


async def test_followers_get_every_byte_of_a_burst(serve: Any) -> None:
    # The first event, then (once every follower has joined) 2,001 more in one write.
    events = answer(2000)
    upstream = RawUpstream([events[:1], events[1:]])
    followers = 4
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream) as (base, _),
            httpx2.AsyncClient(base_url=base, timeout=30) as client,
        ):
            results: list[tuple[str, bytes]] = []
            heads = 0

            async def one() -> None:
                nonlocal heads
                async with client.stream(
                    "POST", "/v1/responses", json=PAYLOAD, headers=KEY
                ) as response:
                    heads += 1
                    if heads == followers + 1:
                        upstream.release()  # all have joined the live stream
                    results.append((response.headers["x-sse-cache"], await response.aread()))

            async with anyio.create_task_group() as tg:
                for _ in range(followers + 1):
                    tg.start_soon(one)
            assert sorted(status for status, _ in results) == ["miss"] + ["shared"] * followers
            assert all(body == upstream.body for _, body in results)
            hit = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert hit.headers["x-sse-cache"] == "hit" and hit.content == upstream.body
    assert upstream.calls == 1


async def test_an_upstream_that_breaks_off_after_a_burst_gets_its_bytes_through_then_the_cut(
    serve: Any,
) -> None:
    # 501 events in one write, then the connection closes without the body's end: the client
    # gets every byte that came before the break, then an aborted response; nothing is stored.
    events = answer(1000)[:501]
    upstream = RawUpstream([events], end=False)
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream) as (base, _),
            httpx2.AsyncClient(base_url=base, timeout=30) as client,
        ):
            received = b""
            with pytest.raises(httpx2.RemoteProtocolError):
                async with client.stream(
                    "POST", "/v1/responses", json=PAYLOAD, headers=KEY
                ) as response:
                    assert response.headers["x-sse-cache"] == "miss"
                    async for chunk in response.aiter_raw():
                        received += chunk
            assert received == upstream.body
            upstream.writes, upstream.end = [answer(3)], True  # now a whole answer
            again = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert again.headers["x-sse-cache"] == "miss"
    assert upstream.calls == 2


async def test_the_middleware_joins_what_an_app_sent_faster_than_its_client_took_it(
    serve: Any,
) -> None:
    # An app behind CacheMiddleware (not the proxy) that hands over 2,002 body messages
    # without waiting in between, as a gateway relaying chunks it has already read does:
    # they queue for the client's own sending task and go out joined, not one write each.
    events = answer(2000)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body", False):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = CacheMiddleware(app, "memory://")
    counted = Counted(middleware)
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            serve(counted) as base,
            httpx2.AsyncClient(base_url=base, timeout=30) as client,
        ):
            miss = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert miss.headers["x-sse-cache"] == "miss"
            assert miss.content == b"".join(events)
            assert 1 <= counted.messages <= len(events) // 10
            hit = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert hit.headers["x-sse-cache"] == "hit" and hit.content == miss.content
    await middleware.aclose()

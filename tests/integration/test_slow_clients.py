"""A client that reads slowly, through the real proxy (uvicorn + forwarder): it never delays
the other clients of the same live stream, and what waits for it in the proxy is bounded.

The slow client is a plain socket with a small receive buffer that stops reading after the
first bytes, so the proxy's writes to it block once the kernel's buffers are full (a few MB
here): the answers are larger than that. Before the proxy sent to each client from a task of
its own, the app producing the stream waited on that socket, and with it the upstream and
every follower — the first test then never finishes (its deadlock guard fails it).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import h11
import httpx2
import pytest

from sse_cache.asgi import CacheMiddleware
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, responses_stream, responses_text_pieces

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-slow-clients"}
PAYLOAD = {"model": "gpt-mock", "input": "a long answer", "stream": True}
TEXT = "x" * 8192  # one delta's text
DEADLOCK_GUARD = 30  # seconds: only a hung test ever reaches it


def answer(deltas: int) -> list[bytes]:
    """A Responses stream of ``deltas`` 8 KiB text deltas, one chunk per event."""
    return responses_text_pieces(deltas, TEXT, response_id="resp_slow")


class SlowClient:
    """One streamed request on a blocking socket with a small receive buffer (in a worker
    thread): it reads the head and the first bytes, sets :attr:`started`, and reads nothing
    more until :attr:`read_on` is set; then it reads to the end of the connection."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.started = threading.Event()
        self.read_on = threading.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False  # the response ended cleanly (its last chunk arrived)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    async def __aenter__(self) -> SlowClient:
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        # Abandoned on cancellation (the deadlock guard): __aexit__ then unblocks the thread.
        self._tasks.start_soon(lambda: anyio.to_thread.run_sync(self.run, abandon_on_cancel=True))
        await _wait(self.started)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._tasks.__aexit__(*exc_info)
        finally:
            self.read_on.set()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connecting
        sock.connect(self.address)
        try:
            conn = h11.Connection(h11.CLIENT)
            data = json.dumps(PAYLOAD).encode()
            headers = [
                ("host", f"{self.address[0]}:{self.address[1]}"),
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
                *KEY.items(),
            ]
            sock.sendall(
                conn.send(h11.Request(method="POST", target="/v1/responses", headers=headers))
            )
            sock.sendall(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if body and not self.started.is_set():
                        self.started.set()
                        self.read_on.wait()
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    self.status = event.status_code
                    self.headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    break
                else:  # the connection closed: h11 raises for an unfinished body
                    break
        except h11.RemoteProtocolError:
            pass  # the connection closed in the middle of the body: not complete
        finally:
            self.body = bytes(body)
            self.started.set()
            sock.close()


@asynccontextmanager
async def proxy(serve: Any, upstream: GatedUpstream, **options: Any) -> AsyncIterator[str]:
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, "memory://", **options)
        try:
            async with serve(app) as base:
                yield base
        finally:
            await app.aclose()


async def _wait(event: threading.Event) -> None:
    await anyio.to_thread.run_sync(event.wait, abandon_on_cancel=True)


async def follow(client: httpx2.AsyncClient, n: int, headed: anyio.Event | None) -> list[Any]:
    """``n`` identical requests released together; ``headed`` (an upstream's gate) is set once
    all have their response heads: they have joined the live stream."""
    go = anyio.Event()
    heads = 0
    results: list[Any] = []

    async def one() -> None:
        nonlocal heads
        await go.wait()
        async with client.stream("POST", "/v1/responses", json=PAYLOAD, headers=KEY) as r:
            heads += 1
            if heads == n:
                assert headed is not None
                headed.set()
            try:
                results.append((r.headers["x-sse-cache"], await r.aread()))
            except httpx2.HTTPError as exc:
                results.append(("error", exc))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
        go.set()
    return results


async def test_followers_are_not_delayed_by_a_producer_client_that_stops_reading(
    serve: Any,
) -> None:
    # 12 MB, held open before its last event: with the producer's client not reading, the
    # followers can only have it all if the proxy reads the upstream on without that client.
    events = answer(1500)
    upstream = GatedUpstream(events, hold_after=len(events) - 1)  # held before its last event
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream) as base,
            httpx2.AsyncClient(base_url=base, timeout=60) as client,
        ):
            async with SlowClient(base) as slow:
                # The upstream sends its last event once every follower has joined.
                followers = await follow(client, 5, upstream.gate)
                # Every follower has the whole answer while the producer's client still has
                # read only its first bytes.
                assert not slow.read_on.is_set()
                assert [status for status, _ in followers] == ["shared"] * 5
                assert all(content == upstream.body for _, content in followers)
                slow.read_on.set()
            # The slow client then gets all of it too, cleanly, and the answer was stored.
            assert slow.status == 200 and slow.headers["x-sse-cache"] == "miss"
            assert slow.complete and slow.body == upstream.body
            again = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == upstream.body
    assert upstream.calls == 1


async def test_a_producer_client_too_far_behind_its_followers_is_cut_visibly(
    serve: Any,
) -> None:
    # 30 MB with a 6 MiB bound on how far a reader may fall behind: the client that stops
    # reading falls behind (about 4 MB in the kernel's buffers, then 6 MiB waiting for it in
    # the proxy) and is cut off; the followers, which read on, get every byte.
    upstream = GatedUpstream(answer(3700), hold_after=1)  # held after its first event
    bound = 6 * 1024 * 1024
    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream, max_entry_bytes=bound) as base,
            httpx2.AsyncClient(base_url=base, timeout=60) as client,
        ):
            async with SlowClient(base) as slow:
                # The upstream sends the rest once every follower has joined.
                followers = await follow(client, 3, upstream.gate)
                assert [status for status, _ in followers] == ["shared"] * 3
                assert all(content == upstream.body for _, content in followers)
                slow.read_on.set()
            # The slow client's response is aborted: a part of the answer, never a clean end.
            assert slow.status == 200
            assert not slow.complete
            assert upstream.body.startswith(slow.body) and len(slow.body) < len(upstream.body)
    assert upstream.calls == 1


async def test_a_lone_slow_client_paces_its_upstream_and_gets_the_whole_answer(
    serve: Any,
) -> None:
    # Alone, a client further behind than the bound is not cut: the proxy waits for it
    # (nobody else is delayed), holding at most the bound for it. The client reads on only
    # once the upstream has sent as much as the bound: more than the kernel's buffers on
    # both sides hold, so the proxy must hold the difference for it (before the proxy sent
    # from a task of its own, the upstream could never send that much: the deadlock guard).
    bound = 16 * 1024 * 1024
    upstream = GatedUpstream(answer(3000))
    with anyio.fail_after(DEADLOCK_GUARD):
        async with proxy(serve, upstream, max_entry_bytes=bound) as base:
            async with SlowClient(base) as slow:
                await upstream.wait_sent(bound // len(TEXT))
                slow.read_on.set()
            assert slow.complete and slow.body == upstream.body
    assert upstream.calls == 1


# A client in a process of its own (as in production: in the test's process, its thread and
# the server share the GIL, and the server never got ahead of it): it sends the request,
# reads the first bytes, and closes with unread bytes in its buffer (the kernel resets).
_LEAVING_CLIENT = """
import socket, sys
host, port, body, key = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
head = (
    f"POST /v1/responses HTTP/1.1\\r\\nhost: {host}\\r\\ncontent-type: application/json\\r\\n"
    f"content-length: {len(body)}\\r\\nauthorization: {key}\\r\\n\\r\\n"
).encode()
with socket.create_connection((host, port)) as sock:
    sock.sendall(head + body)
    got = b""
    while len(got) < 1000:
        got += sock.recv(65536)
"""


async def test_a_client_that_leaves_a_large_hit_is_no_longer_written_to(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # An instant hit larger than a slice goes out slice by slice. When its client left
    # after the first bytes, each slice still went to the dead transport before uvicorn
    # heard of it: asyncio logged "socket.send() raised exception." for every one past its
    # fifth (helper-95: 15 a dropped 5 MB hit). Between slices the server now hears of it.
    upstream = GatedUpstream(responses_stream("large", text_deltas=20000))  # ~5 MB
    async with serve(CacheMiddleware(upstream, "memory://")) as base:
        async with httpx2.AsyncClient(base_url=base) as client:
            miss = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
            assert miss.headers["x-sse-cache"] == "miss"
        host, port = base.removeprefix("http://").split(":")
        body, key = json.dumps(PAYLOAD), KEY["authorization"]
        for _ in range(3):
            await anyio.run_process([sys.executable, "-c", _LEAVING_CLIENT, host, port, body, key])
        async with httpx2.AsyncClient(base_url=base) as client:  # the server went on
            hit = await client.post("/v1/responses", json=PAYLOAD, headers=KEY)
    assert hit.headers["x-sse-cache"] == "hit" and hit.content == miss.content
    lost = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert lost == []

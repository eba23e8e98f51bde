"""What a follower of a live stream costs the proxy in memory does not grow with the answer.

Followers read one shared log; what each one holds of its own is the piece being sent to its
client. A follower that joins late catches up on everything the stream has sent so far: it
gets that in slices of ``flight.MAX_JOINED_BYTES``, each written to its socket (and drained,
for a client that reads slowly) before the next is made. Before, each follower joined the
whole catch-up into one copy of the log, and uvicorn's h11 framed it into a second one: a
few late followers of a long answer held several times the answer each.

Measured with tracemalloc in the proxy's process (uvicorn serving the real proxy app on
127.0.0.1), from the moment the log is built: the followers are HTTP clients in processes of
their own (their buffers are not the proxy's), with small receive buffers, released together.
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from sse_cache.flight import MAX_JOINED_BYTES, joined
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, responses_text_pieces

KEY = {"authorization": "Bearer sk-follower-memory"}
PAYLOAD = {"model": "gpt-mock", "input": "a long answer to follow", "stream": True}
TEXT = "y" * 4096  # one delta's text
FOLLOWERS = 4
#: What one follower may add to the proxy's traced memory at its peak, catch-up included: its
#: request and response (~30 KB), a slice being framed and the transport's buffer. The log it
#: catches up on is 8 MB.
PER_FOLLOWER = 1024 * 1024
DEADLOCK_GUARD = 60

# A follower in a process of its own: the request on a raw socket with a small receive buffer
# (h11), a line once it has `argv[3]` body bytes (caught up), then the rest; a JSON line with
# its status, x-sse-cache, the body's length and whether it ended cleanly, and the body itself
# on stdout after that line.
CLIENT = r"""
import json, socket, sys, h11
host, port, caught_up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = sys.argv[4].encode()
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
sock.connect((host, port))
conn = h11.Connection(h11.CLIENT)
headers = [("host", f"{host}:{port}"), ("content-type", "application/json"),
           ("content-length", str(len(payload))), ("authorization", sys.argv[5])]
sock.sendall(conn.send(h11.Request(method="POST", target="/v1/responses", headers=headers))
             + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
status, cache, body, said, complete = 0, "", bytearray(), False, False
while True:
    event = conn.next_event()
    if event is h11.NEED_DATA:
        data = sock.recv(16384)
        conn.receive_data(data)
        if not data:
            break
    elif isinstance(event, h11.Response):
        status = event.status_code
        cache = dict(event.headers).get(b"x-sse-cache", b"").decode()
    elif isinstance(event, h11.Data):
        body += event.data
        if not said and len(body) >= caught_up:
            said = True
            print("caught up", flush=True)
    elif isinstance(event, h11.EndOfMessage):
        complete = True
        break
    else:
        break
out = {"status": status, "cache": cache, "length": len(body), "complete": complete}
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()
sys.stdout.buffer.write(bytes(body))
"""


def answer(deltas: int) -> list[bytes]:
    """A Responses stream of ``deltas`` 4 KiB text deltas, one chunk per event."""
    return responses_text_pieces(deltas, TEXT, response_id="resp_mem")


@asynccontextmanager
async def proxy(serve: Any, upstream: GatedUpstream) -> AsyncIterator[str]:
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, "memory://")
        try:
            async with serve(app) as base:
                yield base
        finally:
            await app.aclose()


async def follow(
    base: str, caught_up: int, on_caught_up: Callable[[], None]
) -> tuple[dict[str, Any], bytes]:
    """One follower in a process of its own: what it got (see ``CLIENT``), and its body.
    ``on_caught_up`` is called once it has ``caught_up`` body bytes."""
    host, port = base.removeprefix("http://").split(":")
    argv = [sys.executable, "-c", CLIENT, host, port, str(caught_up)]
    argv += [json.dumps(PAYLOAD), KEY["authorization"]]
    async with await anyio.open_process(argv) as process:
        assert process.stdout is not None
        out = BufferedByteReceiveStream(process.stdout)
        line = await out.receive_until(b"\n", 1024)
        if line == b"caught up":
            on_caught_up()
            line = await out.receive_until(b"\n", 1024)
        result = json.loads(line)
        body = await out.receive_exactly(result["length"]) if result["length"] else b""
        await process.wait()
    return result, body


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_late_followers_of_a_long_answer_hold_no_copy_of_it(serve: Any) -> None:
    events = answer(2048)  # 8.6 MB, held before its last event
    upstream = GatedUpstream(events, hold_after=len(events) - 1)
    held = sum(len(e) for e in events[:-1])
    results: list[tuple[dict[str, Any], bytes]] = []
    caught_up = 0
    everyone = anyio.Event()

    def one_more() -> None:
        nonlocal caught_up
        caught_up += 1
        if caught_up == FOLLOWERS:
            everyone.set()

    async def one(base: str) -> None:
        results.append(await follow(base, held, one_more))

    with anyio.fail_after(DEADLOCK_GUARD):
        async with (
            proxy(serve, upstream) as base,
            httpx2.AsyncClient(base_url=base, timeout=60) as client,
            client.stream("POST", "/v1/responses", json=PAYLOAD, headers=KEY) as producer,
        ):
            assert producer.headers["x-sse-cache"] == "miss"
            got = bytearray()
            chunks = producer.aiter_bytes()
            while len(got) < held:  # the shared log now holds all but the last event
                got += await anext(chunks)
            # From here on, what the proxy allocates is the followers' (the upstream is held).
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                async with anyio.create_task_group() as tg:
                    for _ in range(FOLLOWERS):
                        tg.start_soon(one, base)
                    await everyone.wait()  # each has caught up on the whole log
                    peak = tracemalloc.get_traced_memory()[1] - before
                    upstream.gate.set()  # the last event, and the end, for everyone
            finally:
                tracemalloc.stop()
            async for chunk in chunks:
                got += chunk
    assert bytes(got) == upstream.body
    assert [r["cache"] for r, _ in results] == ["shared"] * FOLLOWERS
    for result, body in results:
        assert result["status"] == 200 and result["complete"]
        assert body == upstream.body
    assert upstream.calls == 1
    assert peak < FOLLOWERS * PER_FOLLOWER, (
        f"{FOLLOWERS} followers catching up on a {held / 1e6:.1f} MB log added "
        f"{peak / 1e6:.1f} MB to the proxy's memory at its peak"
    )


def test_joined_pieces_are_bounded_and_keep_every_byte_in_order() -> None:
    chunks = [
        bytes([i % 251]) * size for i, size in enumerate([10, 70_000, 5, 5, 30_000, 40_000, 1])
    ]
    pieces = list(joined(chunks, MAX_JOINED_BYTES))
    assert b"".join(pieces) == b"".join(chunks)
    # A chunk over the bound goes alone and is not copied; the others are joined up to it.
    assert pieces[1] is chunks[1]
    assert [len(p) for p in pieces] == [10, 70_000, 30_010, 40_001]
    assert all(len(p) <= MAX_JOINED_BYTES for p in pieces if p is not chunks[1])
    one = [b"x" * 100_000]
    assert next(joined(one, MAX_JOINED_BYTES)) is one[0]

"""A producer whose client stops reading without closing its response (google-genai stops
its streams so), through the async transport: its followers take the upstream over, and
whatever the producer's client does next — reads on, closes, or never reads again — every
reader that ends cleanly has the whole answer, followers exactly what a later hit replays,
and the upstream is asked once. Random chunkings, trailers after the answer, where the
producer stops, what it does then, how many follow and where they leave; the followers look
for a stopped producer every millisecond (``STALL_LOOK``), so takeovers race the producer's
own reads. In process (``httpx2.MockTransport``); tests/integration runs it over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sse_cache.flight
from sse_cache.httpx2 import AsyncCacheTransport

PATH = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
HEADERS = {"authorization": "Bearer sk-takeover"}


def _chat(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return b"data: " + json.dumps({"id": "c1", "choices": [choice]}).encode() + b"\n\n"


ANSWER = _chat("Hel") + _chat("lo") + _chat("", "stop") + b"data: [DONE]\n\n"
AFTER = st.sampled_from([b"", b": keep-alive\n\n", b": keep-al"])


class _Upstream:
    """Sends ``chunks``, one per read, then ends its body — or, with ``ends`` False, holds
    it open until the test is over. Counts its calls."""

    def __init__(self, chunks: list[bytes], ends: bool) -> None:
        self.chunks = chunks
        self.ends = ends
        self.calls = 0
        self.over = anyio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await anyio.lowlevel.checkpoint()
            yield chunk
        if not self.ends:
            await self.over.wait()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=self.body()
        )


Play = tuple[list[bytes], bool, int, str, list[int | None]]


@st.composite
def plays(draw: st.DrawFn) -> Play:
    """The upstream's chunks and whether it ends its body; how many chunks the producer's
    client reads before it stops; what it does then; and for each follower, after how many
    pieces it leaves (None: it reads to its end)."""
    data = ANSWER + draw(AFTER)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=6))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    stop = draw(st.integers(1, len(chunks)))
    then = draw(st.sampled_from(["reads on", "closes", "never reads again"]))
    leaves = draw(st.lists(st.none() | st.integers(0, 3), min_size=1, max_size=3))
    return chunks, draw(st.booleans()), stop, then, leaves


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(play=plays())
async def test_readers_of_a_producer_that_stopped_reading_end_whole_or_not_at_all(
    anyio_backend: str, play: Play
) -> None:
    chunks, ends, stop, then, leaves = play
    upstream = _Upstream(chunks, ends)
    transport = AsyncCacheTransport("memory://", httpx2.MockTransport(upstream))
    followed: list[tuple[str, bytes]] = []  # how each follower ended, and what it had
    produced: bytes | None = b""
    look = sse_cache.flight.STALL_LOOK
    sse_cache.flight.STALL_LOOK = 0.001
    try:
        async with httpx2.AsyncClient(
            base_url="http://up", transport=transport, headers=HEADERS
        ) as client:

            async def follow(leave: int | None) -> None:
                got = b""
                try:
                    async with (
                        client.stream("POST", PATH, json=BODY) as r,
                        aclosing(r.aiter_raw()) as pieces,
                    ):
                        assert r.headers["x-sse-cache"] == "shared"
                        async for piece in pieces:
                            got += piece
                            if leave is not None and len(got) > leave * 20:
                                followed.append(("left", got))  # its client leaves
                                return
                except httpx2.TransportError:
                    followed.append(("failed", got))  # never a clean end
                    return
                followed.append(("ended", got))

            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                request = client.build_request("POST", PATH, json=BODY)
                response = await client.send(request, stream=True)
                assert response.headers["x-sse-cache"] == "miss"
                pieces = response.aiter_raw()  # (closed below)
                try:
                    for _ in range(stop):
                        produced += await pieces.__anext__()
                except StopAsyncIteration:
                    pass
                # The producer's client asks for nothing while they follow.
                async with anyio.create_task_group() as tg:
                    for leave in leaves:
                        tg.start_soon(follow, leave)
                # (With an upstream that never ends its body, it stops at the answer, as
                # the SDKs do.)
                if then == "reads on" and (ends or ANSWER not in produced):
                    try:
                        async for piece in pieces:
                            produced += piece
                            if not ends and ANSWER in produced:
                                break
                    except httpx2.TransportError:
                        produced = None
                await pieces.aclose()
                if then != "never reads again":
                    await response.aclose()
                # (From here on an upstream asked again ends its body.)
                upstream.over.set()
                again = await client.post(PATH, json=BODY)
                if again.headers["x-sse-cache"] == "shared":
                    # It followed the stream the producer still holds open, and read it to
                    # its end: one more follower.
                    followed.append(("ended", again.content))
                    again = await client.post(PATH, json=BODY)
                hit = again.content if again.headers["x-sse-cache"] == "hit" else None
                await response.aclose()
    finally:
        sse_cache.flight.STALL_LOOK = look
        upstream.over.set()
    sent = b"".join(chunks)
    assert upstream.calls == (1 if hit is not None else 2)
    for how, got in followed:
        assert sent.startswith(got), got
        if how == "ended":
            # The whole answer, exactly what the hits replay.
            assert got.startswith(ANSWER), got
            assert got == hit, (got, hit)
    if then == "reads on" and produced is not None:
        # The producer's client read on to its end: the whole answer, as the upstream sent
        # it or as it was stored (read on from the live stream after a takeover).
        assert produced.startswith(ANSWER) and sent.startswith(produced), produced
        assert produced in (sent, hit) or not ends, (produced, hit)
    # (A producer that reads again after its followers took over and then all left finds
    # its upstream closed by the last of them: an error, as for them — produced is None.)
    if any(how == "ended" for how, _ in followed) or (then == "reads on" and produced):
        # A whole answer was read: it is stored — unless it was read to an upstream's end
        # that cut a trailing line short (the stream did not end cleanly).
        assert hit is not None or (ends and not sent.endswith(b"\n")), (followed, produced)


@pytest.mark.anyio
async def test_a_client_closing_from_another_task_as_a_piece_comes_gets_its_close() -> None:
    # The producer's client reads on from its place in the live stream (the followers took
    # the upstream over) and closes its response from another task ("stop generation") in
    # the loop turn a piece comes: the close cancels the read and leaves the place under it,
    # but the read, woken by the piece, gets no cancellation (anyio delivers none to a task
    # whose wait is done) and found its place left: an abort (RemoteProtocolError), where
    # every read under the client's own close ends with the library's ReadError
    # (helper-125). The body's own parts, as _AsyncTeeBody puts them together.
    import httpx

    from sse_cache._async_bodies import NoExchange, _AsyncOpen
    from sse_cache._transport import _stream_types
    from sse_cache.flight import Flight, Head, LiveFlight

    live: LiveFlight[bytes] = LiveFlight(Flight("k"))
    live.respond(Head(200, []))
    live.deliver(b"a")
    place = live.flight.follow_on()  # (the producer's client's kept place)
    assert place is not None
    live.flight.claim(place)  # (it came back to read on)
    opened = _AsyncOpen(NoExchange())
    opened.open = True
    body = _stream_types(httpx)["AsyncAnswerBody"](live.chunks(place, 30.0), opened)
    assert live.flight.follow() is not None  # (a follower: the stream is wanted)
    got: list[bytes | BaseException] = []

    async def read() -> None:
        try:
            got.append(await body.__anext__())
        except httpx.HTTPError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()  # (its read waits for a piece)
        live.deliver(b"b")
        await body.aclose()
        await live.leave(place)
    (outcome,) = got
    assert isinstance(outcome, httpx.ReadError), repr(outcome)


def test_a_sync_client_closing_from_another_thread_as_a_piece_comes_gets_its_close() -> None:
    # The sync twin: the client's read waits in the transport's loop for its next piece; the
    # close from another thread comes in the loop turn the piece does (helper-125).
    import threading

    import httpx

    from sse_cache._async_bodies import NoExchange
    from sse_cache._sync_bodies import _SyncOpen
    from sse_cache._transport import _stream_types
    from sse_cache.flight import Flight, Head, LiveFlight

    with anyio.from_thread.start_blocking_portal() as portal:
        live: LiveFlight[bytes] = portal.call(lambda: LiveFlight(Flight("k")))  # (in its loop)
        portal.call(live.respond, Head(200, []))
        portal.call(live.deliver, b"a")
        place = live.flight.follow_on()  # (the producer's client's kept place)
        assert place is not None
        live.flight.claim(place)  # (it came back to read on)
        assert live.flight.follow() is not None  # (a follower: the stream is wanted)
        opened = _SyncOpen(NoExchange(), portal)
        opened.enter()
        body = _stream_types(httpx)["SyncAnswerBody"](live.chunks(place, 30.0), opened, portal)
        got: list[bytes | BaseException] = []

        def read() -> None:
            try:
                got.append(next(body))
            except httpx.HTTPError as exc:
                got.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 30  # a deadlock guard, not a timing bound
        while body._scope is None:  # (its read waits in the loop for a piece)
            assert time.monotonic() < deadline
            time.sleep(0.001)

        async def one_turn() -> None:
            live.deliver(b"b")
            await body._close()
            await live.leave(place)

        portal.call(one_turn)
        reader.join(30)
    (outcome,) = got
    assert isinstance(outcome, httpx.ReadError), repr(outcome)


def test_waiting_for_a_sync_exchange_to_be_left_waits_for_the_leaving_under_way() -> None:
    # A drain thread leaves its exchange (the answer stored, a lease ended) as the transport
    # closes: the close waits for that leaving before it closes the backend (it stopped the
    # portal under it, and a Redis connection was left unclosed; helper-145 found nothing
    # tested the wait).
    import threading

    from sse_cache._sync_bodies import _SyncOpen

    exiting, exited, waiting = threading.Event(), threading.Event(), threading.Event()

    class SlowToLeave:
        def __init__(self) -> None:
            self.go_on = anyio.Event()

        async def __aenter__(self) -> None:
            return None

        async def __aexit__(self, *exc: object) -> bool:
            exiting.set()
            await self.go_on.wait()
            exited.set()
            return False

    seen_when_left: list[bool] = []

    def wait_left() -> None:
        opened.wait_left()
        seen_when_left.append(exited.is_set())

    waiter = threading.Thread(target=wait_left)

    class Told:
        # The exchange's task, telling when the waiter waits on it.
        def __init__(self, held: Any) -> None:
            self.held = held

        def result(self) -> Any:
            if threading.current_thread() is waiter:
                waiting.set()
            return self.held.result()

    with anyio.from_thread.start_blocking_portal() as portal:
        cm = portal.call(SlowToLeave)  # (its event made in the portal's loop)
        opened = _SyncOpen(cm, portal)
        opened.enter()
        opened._held = Told(opened._held)  # type: ignore[assignment]
        leaver = threading.Thread(target=opened.leave)  # the drain thread's leaving
        leaver.start()
        assert exiting.wait(30)  # (deadlock guards, not timing bounds)
        opened.leave()  # (the closing transport's own: one is under way already)
        waiter.start()
        assert waiting.wait(30), "the close did not wait for the leaving under way"
        portal.call(cm.go_on.set)
        waiter.join(30)
        leaver.join(30)
    assert seen_when_left == [True]

"""The sync transport's followers go on without a producer whose client stopped reading
without closing its response (google-genai's sync client drops every stream it stops), as the
async transport's do; and the followers of a sync miss collected unclosed go on as if its
client had closed it.

The upstream (:class:`sse_cache.testing.GatedUpstream`) is served in the test's event loop;
the sync clients run in threads."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import httpx2
import pytest

import sse_cache.flight
from flights_seen import FlightsSeen
from sse_cache.httpx2 import CacheTransport
from sse_cache.testing import GatedUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

MODEL = "gpt-mock-1"
DONE = b"data: [DONE]\n\n"


def _chat_chunk(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


PIECES = [_chat_chunk("Hel"), _chat_chunk("lo"), _chat_chunk("", "stop"), DONE]
WHOLE = b"".join(PIECES)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
ROUTE = "/v1/chat/completions"
GUARD = 30.0  # seconds: a deadlock guard, never a timing bound


def _until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _follow(client: httpx2.Client, into: list[tuple[str, bytes | str]]) -> threading.Thread:
    def follow() -> None:
        try:
            with client.stream("POST", ROUTE, json=BODY) as response:
                into.append((response.headers["x-sse-cache"], response.read()))
        except httpx2.HTTPError as exc:
            into.append(("error", repr(exc)))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def _joined(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(GUARD)
        assert not thread.is_alive(), "a follower never ended"


def _read_to(produced: Iterator[bytes], stopped: str) -> bytes:
    received = next(produced)
    while stopped == "at the answer" and not received.endswith(DONE):
        received += next(produced)
    return received


@pytest.mark.parametrize(
    ("stopped", "then"),
    [
        ("at the answer", "reads on"),
        ("at the answer", "closes"),
        ("mid-answer", "reads on"),
        ("mid-answer", "closes"),
        ("mid-answer", "reads on alone"),
    ],
)
async def test_sync_followers_take_over_from_a_producer_that_stopped_reading(
    serve: Any, anyio_backend: str, stopped: str, then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The producer's client reads part of the stream (or up to its completing event), then
    # asks for nothing more, its response neither closed nor dropped. The followers, which
    # waited a look's time for a piece from a producer that asked for nothing, go on without
    # it: at the answer, it is stored and their streams end at once; mid-answer, they read
    # the upstream on and the answer is stored. The producer's client, reading again, gets
    # exactly the upstream's bytes: past the stored answer, the rest of the upstream's body;
    # mid-answer, from where it was in the live stream. ("reads on alone": the follower left
    # mid-answer, which closed the upstream — the producer's place keeps no one's stream
    # open — and the producer reading again gets an error, never a clean end of a part.)
    # Without the takeover the followers waited out their read timeout.
    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 0.05)
    gated = GatedUpstream(PIECES, hold_after=len(PIECES) if stopped == "at the answer" else 1)
    seen = FlightsSeen()
    followers = 1 if then == "reads on alone" else 2

    def open_gate() -> None:
        anyio.from_thread.run_sync(gated.gate.set)

    def run(url: str) -> None:
        transport = CacheTransport("memory://", hooks=[seen])
        headers = {"authorization": "Bearer sk-stopped"}
        with httpx2.Client(transport=transport, base_url=url, headers=headers) as client:
            request = client.build_request("POST", ROUTE, json=BODY)
            response = client.send(request, stream=True)
            assert response.headers["x-sse-cache"] == "miss"
            produced = response.iter_raw()
            received = _read_to(produced, stopped)
            # The producer asks for nothing more from here on (until told otherwise).
            answers: list[tuple[str, bytes | str]] = []
            if then == "reads on alone":
                # A follower that leaves mid-answer once the upstream was taken over: its
                # read under way is stopped by a close from this thread.
                following: list[httpx2.Response] = []

                def follow_then_leave() -> None:
                    got = b""
                    with client.stream("POST", ROUTE, json=BODY) as r:
                        following.append(r)
                        try:
                            for chunk in r.iter_raw():
                                got += chunk
                        except (httpx2.HTTPError, httpx2.StreamError):
                            pass  # (closed by the test)
                        answers.append((r.headers["x-sse-cache"], got))

                threads = [threading.Thread(target=follow_then_leave, daemon=True)]
                threads[0].start()
            else:
                threads = [_follow(client, answers) for _ in range(followers)]
            _until(lambda: seen.followers() >= followers, "the followers never joined")
            if then == "reads on alone":
                _until(lambda: seen.taken_over(), "the upstream was never taken over")
                following[0].close()
            if stopped == "mid-answer" and then != "reads on alone":
                open_gate()
            _joined(threads)
            if then == "reads on alone":
                assert answers == [("shared", received)]
                # (The follower left: the last reader, it closed the upstream.)
                _until(lambda: all(f.flight.done for f in seen.live()), "the stream stayed live")
                open_gate()
                with pytest.raises(httpx2.RemoteProtocolError, match="sse-cache"):
                    for chunk in produced:
                        received += chunk
                assert WHOLE.startswith(received) and received != WHOLE
                response.close()
                return
            assert answers == [("shared", WHOLE)] * followers
            again = client.post(ROUTE, json=BODY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == WHOLE
            if then == "closes":
                response.close()
            else:
                # Its reads on pass the upstream's body on as it comes (at the answer: past
                # it, the body's end, which the upstream holds till now), or read on from
                # the live stream (mid-answer).
                open_gate()
                for chunk in produced:
                    received += chunk
                assert received == WHOLE
                response.close()
            again = client.post(ROUTE, json=BODY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == WHOLE

    async with serve(gated) as url:
        with anyio.fail_after(GUARD * 3):  # a deadlock guard, not a timing bound
            await anyio.to_thread.run_sync(run, url)
        gated.gate.set()
    assert gated.calls == 1


async def test_a_producer_closed_by_another_thread_as_it_reads_again_is_told_so(
    serve: Any, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop button: another thread closes the producer's response just as its reader comes
    # back after its followers took over mid-answer — after that read's own look at the
    # close (the close is run at that point here, as a thread switch would). The reader
    # ended cleanly with part of the answer (helper-119: 179 of 536 bytes); it gets the
    # library's error for a response closed under a read, and the follower the whole answer.
    from sse_cache import _sync_bodies

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 0.05)
    gated = GatedUpstream(PIECES, hold_after=1)
    seen = FlightsSeen()
    read_again = _sync_bodies._SyncTeeBody._after_left

    def closed_meanwhile(self: Any) -> bytes:
        closing = threading.Thread(target=self.close)
        closing.start()
        closing.join(GUARD)
        return read_again(self)

    def run(url: str) -> None:
        transport = CacheTransport("memory://", hooks=[seen])
        headers = {"authorization": "Bearer sk-stop-button"}
        with httpx2.Client(transport=transport, base_url=url, headers=headers) as client:
            response = client.send(client.build_request("POST", ROUTE, json=BODY), stream=True)
            produced = response.iter_raw()
            received = _read_to(produced, "mid-answer")
            answers: list[tuple[str, bytes | str]] = []
            threads = [_follow(client, answers)]
            _until(lambda: seen.taken_over(), "the upstream was never taken over")
            monkeypatch.setattr(_sync_bodies._SyncTeeBody, "_after_left", closed_meanwhile)
            with pytest.raises(httpx2.ReadError, match="closed while it was read"):
                for chunk in produced:
                    received += chunk
            anyio.from_thread.run_sync(gated.gate.set)
            _joined(threads)
            assert answers == [("shared", WHOLE)]

    async with serve(gated) as url:
        with anyio.fail_after(GUARD * 3):  # a deadlock guard, not a timing bound
            await anyio.to_thread.run_sync(run, url)
        gated.gate.set()
    assert gated.calls == 1


@pytest.mark.parametrize("answer", ["whole", "part"])
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_sync_miss_dropped_unclosed_is_read_on_by_its_followers(
    serve: Any,
    anyio_backend: str,
    answer: str,
    backend: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A program reads a sync miss up to its completing event (or only its first piece) and
    # drops the response without closing it; the collector finds it while followers wait
    # for the rest. As the async transport does, the followers go on as if the program had
    # closed it: holding the whole answer, it is stored and their streams end with it (the
    # exchange was left failed by the finalizer, before the program's own close: the
    # followers failed, nothing was stored, and the next request asked the upstream again;
    # helper-117); mid-answer, they read the upstream on to its end (they failed: the
    # upstream was collected with the response; helper-116's D11). The next identical
    # request is a hit.
    # (The followers do not look for a stalled producer here: the collection settles it.)
    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 3600.0)
    gated = GatedUpstream(PIECES, hold_after=len(PIECES) if answer == "whole" else 1)
    seen = FlightsSeen()
    cache = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'dropped.db'}"

    def run(url: str) -> None:
        transport = CacheTransport(cache, hooks=[seen])
        headers = {"authorization": "Bearer sk-dropped"}
        with httpx2.Client(transport=transport, base_url=url, headers=headers) as client:
            request = client.build_request("POST", ROUTE, json=BODY)
            response = client.send(request, stream=True)
            assert response.headers["x-sse-cache"] == "miss"
            produced = response.iter_raw()
            if answer == "whole":
                assert _read_to(produced, "at the answer") == WHOLE
            else:
                assert WHOLE.startswith(next(produced))
            answers: list[tuple[str, bytes | str]] = []
            threads = [_follow(client, answers) for _ in range(2)]
            _until(lambda: seen.followers() >= 2, "the followers never joined")
            # Dropped as google-genai drops it: the reading generator, whose ``finally``
            # closes the response, and the response, in a reference cycle (only a
            # collection finds them: the transport's finalizer and the generator's close
            # run at once).
            cycle: list[Any] = [response, produced]
            cycle.append(cycle)
            del response, produced, request, cycle
            gc.collect()
            anyio.from_thread.run_sync(gated.gate.set)  # (in the loop serving it)
            _joined(threads)
            assert answers == [("shared", WHOLE)] * 2
            again = client.post(ROUTE, json=BODY)
            assert again.headers["x-sse-cache"] == "hit" and again.content == WHOLE

    async with serve(gated) as url:
        with anyio.fail_after(GUARD * 3):  # a deadlock guard, not a timing bound
            await anyio.to_thread.run_sync(run, url)
        gated.gate.set()
    assert gated.calls == 1


@pytest.mark.parametrize("read", ["part", "nothing"])
async def test_a_sync_follower_dropped_unclosed_as_the_last_reader_leaves_quietly(
    serve: Any, anyio_backend: str, read: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The sync twin of the async transports' test: a follower's response dropped unclosed
    # in a reference cycle once the producer's client closed, so that it was the last
    # reader: its answer's async generators were closed by the portal's loop in tasks of
    # their own at once, and it logged "aclose(): asynchronous generator is already
    # running" (helper-121). The stream is left, nothing stored, nothing logged.
    gated = GatedUpstream(PIECES, hold_after=1)
    seen = FlightsSeen()

    def run(url: str) -> None:
        transport = CacheTransport("memory://", hooks=[seen])
        headers = {"authorization": "Bearer sk-sync-follower-dropped"}
        with httpx2.Client(transport=transport, base_url=url, headers=headers) as client:
            produced = client.send(client.build_request("POST", ROUTE, json=BODY), stream=True)
            assert produced.headers["x-sse-cache"] == "miss"
            producing = produced.iter_raw()
            assert next(producing) == PIECES[0]
            followed = client.send(client.build_request("POST", ROUTE, json=BODY), stream=True)
            assert followed.headers["x-sse-cache"] == "shared"
            chunks = followed.iter_raw()
            if read == "part":
                assert next(chunks) == PIECES[0]
            produced.close()  # (the follower reads the upstream on now)
            cycle: list[Any] = [chunks, followed]
            cycle.append(cycle)
            del cycle, chunks, followed
            gc.collect()
            _until(lambda: not seen.live(), "the stream was not left")
            # (The drain thread reading the upstream for the followers closes it at its next
            # chunk: a blocking read is not cut from another thread.)
            anyio.from_thread.run_sync(gated.gate.set)  # (in the loop serving it)
            again = client.post(ROUTE, json=BODY)
            assert again.headers["x-sse-cache"] == "miss" and again.content == WHOLE

    with caplog.at_level("ERROR", logger="asyncio"):
        async with serve(gated) as url:
            with anyio.fail_after(GUARD * 3):  # a deadlock guard, not a timing bound
                await anyio.to_thread.run_sync(run, url)
            gated.gate.set()
        gc.collect()
    assert gated.calls == 2
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_a_sync_hit_dropped_unclosed_leaves_its_exchange(
    serve: Any, anyio_backend: str
) -> None:
    # A hit (or a follower's stream) dropped without being closed or read to its end: once
    # collected, its exchange is left — its task no longer waits in the transport's event
    # loop for good (one per dropped response; helper-117).
    import asyncio

    gated = GatedUpstream(PIECES)

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    def run(url: str) -> None:
        transport = CacheTransport("memory://")
        headers = {"authorization": "Bearer sk-hit-dropped"}
        with httpx2.Client(transport=transport, base_url=url, headers=headers) as client:
            assert client.post(ROUTE, json=BODY).content == WHOLE  # stored
            before = transport.portal.call(tasks)
            for _ in range(3):
                request = client.build_request("POST", ROUTE, json=BODY)
                response = client.send(request, stream=True)
                assert response.headers["x-sse-cache"] == "hit"
                cycle: list[Any] = [response]
                cycle.append(cycle)
                del response, request, cycle
            gc.collect()
            _until(lambda: transport.portal.call(tasks) <= before, "a dropped hit stayed open")

    async with serve(gated) as url:
        with anyio.fail_after(GUARD * 3):  # a deadlock guard, not a timing bound
            await anyio.to_thread.run_sync(run, url)
    assert gated.calls == 1

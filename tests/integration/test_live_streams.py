"""Live streams you can trust, over real HTTP: single-flight from the first miss, and never a
silently truncated answer — through the proxy (uvicorn + forwarder), the ASGI middleware in
front of an app, and the httpx2 transports (async and sync).

Requests are released together (one ``anyio.Event`` or a ``threading.Barrier``), never
staggered; the upstream takes 300 ms to its first byte, as an LLM does, so a herd arrives
exactly while the first request waits for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx2
import pytest

from sse_cache import Event
from sse_cache.asgi import CacheMiddleware
from sse_cache.engine import Notice
from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, MockUpstream, metric_value

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-live-streams"}
TTFB = 0.3
LIMITS = httpx2.Limits(max_connections=200, max_keepalive_connections=200)


def body(text: str) -> dict[str, Any]:
    return {"model": "gpt-mock", "input": text, "stream": True}


def complete(content: bytes) -> bool:
    return content.rstrip().split(b"\n\n")[-1].startswith(b"event: response.completed")


async def direct(upstream: str, payload: dict[str, Any], **headers: str) -> bytes:
    """The upstream's own answer (the mock is deterministic): what every client must get."""
    async with httpx2.AsyncClient(base_url=upstream, timeout=30) as client:
        response = await client.post(
            "/v1/responses", json=payload, headers={**KEY, **headers, "x-mock-delay-ms": "0"}
        )
        return response.content


Post = Callable[[dict[str, Any], dict[str, str]], Awaitable[httpx2.Response]]


async def herd(post: Post, n: int, payload: dict[str, Any], **headers: str) -> list[Any]:
    """``n`` identical requests released at once; each result is a response or the error."""
    go = anyio.Event()
    results: list[Any] = []

    async def one() -> None:
        await go.wait()
        try:
            results.append(await post(payload, {**KEY, **headers}))
        except httpx2.HTTPError as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
        go.set()
    return results


# -- the three HTTP ways in, each in front of the same kind of upstream ---------------------


class SlowErrors:
    """The mock upstream, but an error answer also takes the time to first byte (the mock
    sends those at once), as a provider's rate limiter or overloaded backend does."""

    def __init__(self, app: MockUpstream) -> None:
        self.app = app

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and any(k == b"x-mock-error" for k, _ in scope["headers"]):
            await anyio.sleep(TTFB)
        await self.app(scope, receive, send)


class Stack:
    def __init__(self, upstream_app: SlowErrors, upstream: str, post: Post, client: Any) -> None:
        self.upstream_app = upstream_app
        self.upstream = upstream
        self.post = post
        self.client = client  # an httpx2.AsyncClient, or httpx2.Client for the sync transport

    def calls(self) -> int:
        return int(self.upstream_app.stats()["total"])


@asynccontextmanager
async def _served_stack(serve: Any, cached: Callable[[Any, str], Any]) -> AsyncIterator[Stack]:
    # ``cached(upstream_app, upstream_url)``: the app under test, in front of the upstream.
    upstream_app = SlowErrors(MockUpstream(first_delay=TTFB, delay=0.002))
    async with serve(upstream_app) as upstream:
        app = cached(upstream_app, upstream)
        async with (
            serve(app) as base,
            httpx2.AsyncClient(base_url=base, timeout=60, limits=LIMITS) as client,
        ):

            async def post(payload: dict[str, Any], headers: dict[str, str]) -> httpx2.Response:
                return await client.post("/v1/responses", json=payload, headers=headers)

            yield Stack(upstream_app, upstream, post, client)
        await app.aclose()


def proxy_stack(serve: Any, backend: str) -> AbstractAsyncContextManager[Stack]:
    """``sse-cache proxy``'s app (the middleware in front of the forwarder)."""
    return _served_stack(serve, lambda _, upstream: create_proxy_app(upstream, backend))


def middleware_stack(serve: Any, backend: str) -> AbstractAsyncContextManager[Stack]:
    """The middleware in front of the app that answers (no forwarder): the app streams."""
    return _served_stack(serve, lambda app, _: CacheMiddleware(app, backend))


@asynccontextmanager
async def transport_stack(serve: Any, backend: str) -> AsyncIterator[Stack]:
    upstream_app = SlowErrors(MockUpstream(first_delay=TTFB, delay=0.002))
    async with serve(upstream_app) as upstream:
        transport = AsyncCacheTransport(backend, transport=httpx2.AsyncHTTPTransport(limits=LIMITS))
        async with httpx2.AsyncClient(transport=transport, base_url=upstream, timeout=60) as client:

            async def post(payload: dict[str, Any], headers: dict[str, str]) -> httpx2.Response:
                return await client.post("/v1/responses", json=payload, headers=headers)

            yield Stack(upstream_app, upstream, post, client)


@asynccontextmanager
async def sync_transport_stack(serve: Any, backend: str) -> AsyncIterator[Stack]:
    upstream_app = SlowErrors(MockUpstream(first_delay=TTFB, delay=0.002))
    async with serve(upstream_app) as upstream:
        transport = CacheTransport(backend, transport=httpx2.HTTPTransport(limits=LIMITS))
        client = httpx2.Client(transport=transport, base_url=upstream, timeout=60)
        limiter = anyio.CapacityLimiter(200)
        try:

            async def post(payload: dict[str, Any], headers: dict[str, str]) -> httpx2.Response:
                def call() -> httpx2.Response:
                    return client.post("/v1/responses", json=payload, headers=headers)

                return await anyio.to_thread.run_sync(call, limiter=limiter)

            yield Stack(upstream_app, upstream, post, client)
        finally:
            await anyio.to_thread.run_sync(client.close)


STACKS = {
    "proxy": proxy_stack,
    "middleware": middleware_stack,
    "transport": transport_stack,
    "sync-transport": sync_transport_stack,
}


@pytest.fixture(params=list(STACKS))
def stack_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["memory", "sqlite"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'live.db'}"


# -- 1. a same-instant herd is collapsed -----------------------------------------------------


async def test_a_herd_released_at_once_makes_one_upstream_call(
    serve: Any, stack_kind: str, backend_url: str
) -> None:
    async with STACKS[stack_kind](serve, backend_url) as stack:
        payload = body(f"a herd through the {stack_kind}")
        results = await herd(stack.post, 100, payload)
        expected = await direct(stack.upstream, payload)
        assert stack.calls() == 2  # the herd's one call, and ours above
    assert complete(expected)
    assert all(isinstance(r, httpx2.Response) for r in results), results
    statuses = Counter(r.headers["x-sse-cache"] for r in results)
    assert statuses["miss"] == 1 and statuses["miss"] + statuses["shared"] == 100, statuses
    assert {r.status_code for r in results} == {200}
    assert all(r.content == expected for r in results)


async def test_a_herd_shares_an_error_answer_as_the_producer_got_it(
    serve: Any, stack_kind: str
) -> None:
    # A non-2xx answer reaches every follower as it reached the producer (status, headers,
    # body): identical requests get the identical answer, and a failing upstream is asked
    # once, not once per waiting client (their SDKs retry as they would anyway).
    async with STACKS[stack_kind](serve, "memory://") as stack:
        payload = body("a herd meets a 429")
        results = await herd(stack.post, 20, payload, **{"x-mock-error": "429"})
        assert stack.calls() == 1
    assert {r.status_code for r in results} == {429}
    assert len({r.content for r in results}) == 1
    assert sorted(Counter(r.headers["x-sse-cache"] for r in results).items()) == [
        ("miss", 1),
        ("shared", 19),
    ]


# -- 2. the producer's client leaving never ends the stream for the others -------------------


async def test_followers_read_on_when_the_producers_client_leaves(
    serve: Any, stack_kind: str
) -> None:
    async with STACKS[stack_kind](serve, "memory://") as stack:
        payload = body(f"the producer's client leaves ({stack_kind})")
        if stack_kind == "sync-transport":
            got, bodies = await anyio.to_thread.run_sync(_leave_early_sync, stack.client, payload)
        else:
            got, bodies = await _leave_early(stack.client, payload)
        expected = await direct(stack.upstream, payload)
        again = await stack.post(payload, KEY)
        assert stack.calls() == 2  # one shared upstream call, and ours
    assert complete(expected) and expected.startswith(got) and len(got) < len(expected)
    assert all(b == expected for b in bodies)
    # The upstream was read to its end for the followers, so the answer was stored.
    assert again.headers["x-sse-cache"] == "hit" and again.content == expected


async def _leave_early(
    client: httpx2.AsyncClient, payload: dict[str, Any]
) -> tuple[bytes, list[bytes]]:
    def request() -> httpx2.Request:
        return client.build_request("POST", "/v1/responses", json=payload, headers=KEY)

    producer = await client.send(request(), stream=True)
    assert producer.headers["x-sse-cache"] == "miss"
    # Sent once the producer has its response head: they join its live stream.
    followers = [await client.send(request(), stream=True) for _ in range(3)]
    assert [f.headers["x-sse-cache"] for f in followers] == ["shared"] * 3
    got = b""
    async for chunk in producer.aiter_raw():
        got += chunk
        if len(got) >= 256:
            break
    await producer.aclose()  # the producer's client leaves mid-answer
    return got, [await f.aread() for f in followers]


def _leave_early_sync(client: httpx2.Client, payload: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    def request() -> httpx2.Request:
        return client.build_request("POST", "/v1/responses", json=payload, headers=KEY)

    producer = client.send(request(), stream=True)
    assert producer.headers["x-sse-cache"] == "miss"
    followers = [client.send(request(), stream=True) for _ in range(3)]
    assert [f.headers["x-sse-cache"] for f in followers] == ["shared"] * 3
    got = b""
    for chunk in producer.iter_raw():
        got += chunk
        if len(got) >= 256:
            break
    producer.close()
    return got, [f.read() for f in followers]


# -- 3. joining a dying flight -----------------------------------------------------------------


async def test_a_request_after_a_client_left_gets_a_whole_answer(
    serve: Any, stack_kind: str
) -> None:
    # A client reads 256 bytes and leaves; the next identical request, sent at once, is
    # answered in full — by the flight if it joined before the leaving was noticed, or by
    # its own upstream call — never by a clean response holding part of the answer.
    async with STACKS[stack_kind](serve, "memory://") as stack:
        for round_ in range(6):
            payload = body(f"a dying flight, round {round_} ({stack_kind})")
            if stack_kind == "sync-transport":
                response = await anyio.to_thread.run_sync(
                    _read_then_leave_then_ask_sync, stack.client, payload
                )
            else:
                response = await _read_then_leave_then_ask(stack.client, payload)
            expected = await direct(stack.upstream, payload)
            assert response.status_code == 200
            assert response.headers["x-sse-cache"] in ("miss", "shared", "hit")
            assert response.content == expected and complete(expected), round_


async def _read_then_leave_then_ask(
    client: httpx2.AsyncClient, payload: dict[str, Any]
) -> httpx2.Response:
    request = client.build_request("POST", "/v1/responses", json=payload, headers=KEY)
    first = await client.send(request, stream=True)
    got = b""
    async for chunk in first.aiter_raw():
        got += chunk
        if len(got) >= 256:
            break
    await first.aclose()
    return await client.post("/v1/responses", json=payload, headers=KEY)


def _read_then_leave_then_ask_sync(client: httpx2.Client, payload: dict[str, Any]) -> Any:
    request = client.build_request("POST", "/v1/responses", json=payload, headers=KEY)
    first = client.send(request, stream=True)
    got = b""
    for chunk in first.iter_raw():
        got += chunk
        if len(got) >= 256:
            break
    first.close()
    return client.post("/v1/responses", json=payload, headers=KEY)


# -- 4. one bad byte --------------------------------------------------------------------------


async def test_one_bad_byte_reaches_every_reader_and_is_not_stored(
    serve: Any, stack_kind: str
) -> None:
    async with STACKS[stack_kind](serve, "memory://") as stack:
        payload = body(f"a bad byte ({stack_kind})")
        results = await herd(stack.post, 5, payload, **{"x-mock-error": "bad-sse"})
        expected = await direct(stack.upstream, payload, **{"x-mock-error": "bad-sse"})
        again = await stack.post(payload, KEY)
    assert b"\xff" in expected or b"\xfe" in expected or not expected.decode("utf-8", "ignore")
    assert all(r.content == expected for r in results)
    assert again.headers["x-sse-cache"] == "miss"


# -- the upstream cut mid-answer ----------------------------------------------------------------


async def test_a_cut_upstream_fails_every_reader_visibly(serve: Any, stack_kind: str) -> None:
    async with STACKS[stack_kind](serve, "memory://") as stack:
        payload = body(f"cut ({stack_kind})")
        results = await herd(stack.post, 10, payload, **{"x-mock-error": "cut"})
        assert stack.calls() == 1
    # Never a clean response holding part of an answer: every reader gets an error.
    assert all(isinstance(r, httpx2.HTTPError) for r in results), [
        (r.status_code, r.headers.get("x-sse-cache"), len(r.content))
        for r in results
        if isinstance(r, httpx2.Response)
    ]


# -- an upstream that stops sending mid-stream without closing --------------------------------


def goes_silent() -> GatedUpstream:
    """Sends the head and a few events, then nothing, without closing (a hung upstream), until
    its client goes away: its gate is never opened."""
    created = [
        Event(f'{{"type":"response.created","sequence_number":{n}}}', "response.created")
        for n in range(3)
    ]
    return GatedUpstream(created, hold_after=len(created))


async def test_an_upstream_that_goes_silent_fails_every_reader_after_the_idle_timeout(
    serve: Any,
) -> None:
    # --upstream-timeout bounds each read: no byte for that long mid-stream, and every reader
    # of the stream (producer and followers) gets a visible failure; nothing is stored.
    upstream_app = goes_silent()
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, "memory://", upstream_timeout=0.5)
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as client:

            async def post(payload: dict[str, Any], headers: dict[str, str]) -> httpx2.Response:
                return await client.post("/v1/responses", json=payload, headers=headers)

            results = await herd(post, 4, body("silence"))
            assert upstream_app.calls == 1
            assert all(isinstance(r, httpx2.HTTPError) for r in results), results
            # Not stored: the next identical request asks the upstream again (and fails again).
            again = await herd(post, 1, body("silence"))
            assert upstream_app.calls == 2 and isinstance(again[0], httpx2.HTTPError)
        await app.aclose()


# -- regressions found in review ------------------------------------------------------------


@pytest.mark.parametrize("way", ["proxy", "middleware", "transport", "sync-transport"])
async def test_a_producer_leaving_at_its_completing_event_ends_its_followers_with_it(
    serve: Any, way: str
) -> None:
    # The producer's client stops at the completing event (`response.completed`: the SDKs
    # stop reading there) while the upstream has not ended its body yet. The answer is
    # complete: its followers' streams must end now, with the whole of it, and it is stored
    # — not wait for the upstream's body end, read on for them (helper-67: 140 of 140 waited
    # out the upstream's hold).
    from sse_cache.testing import responses_stream

    events = responses_stream("left at the completing event", text_deltas=6)
    gated = GatedUpstream(events, hold_after=len(events))  # complete, its end held back
    whole = gated.body
    payload = body(f"left at the completing event ({way})")
    answers: list[tuple[str, bytes]] = []
    async with AsyncExitStack() as stack:
        if way in ("transport", "sync-transport"):
            base = await stack.enter_async_context(serve(gated))
        else:
            upstream = await stack.enter_async_context(serve(gated))
            app: Any = (
                create_proxy_app(upstream, "memory://")
                if way == "proxy"
                else CacheMiddleware(gated, "memory://")
            )
            stack.push_async_callback(app.aclose)
            base = await stack.enter_async_context(serve(app))
        if way == "sync-transport":
            sync_client = httpx2.Client(
                transport=CacheTransport("memory://"), base_url=base, timeout=30, headers=KEY
            )
            stack.push_async_callback(anyio.to_thread.run_sync, sync_client.close)

            def leave_at_the_end(followers: int) -> None:
                with sync_client.stream("POST", "/v1/responses", json=payload) as r:
                    assert r.headers["x-sse-cache"] == "miss"
                    received = b""
                    for chunk in r.iter_raw():
                        received += chunk
                        if complete(received):
                            break
                        if received and followers:
                            anyio.from_thread.run(join, followers)
                            followers = 0

            def post_sync() -> httpx2.Response:
                return sync_client.post("/v1/responses", json=payload)

            post: Callable[[], Awaitable[httpx2.Response]] = partial(
                anyio.to_thread.run_sync, post_sync
            )
        else:
            transport = AsyncCacheTransport("memory://") if way == "transport" else None
            client = await stack.enter_async_context(
                httpx2.AsyncClient(transport=transport, base_url=base, timeout=30, headers=KEY)
            )

            async def post() -> httpx2.Response:
                return await client.post("/v1/responses", json=payload)

        async def follow() -> None:
            response = await post()
            answers.append((response.headers["x-sse-cache"], response.content))

        async with anyio.create_task_group() as tg:
            joined = anyio.Event()

            async def join(followers: int) -> None:
                for _ in range(followers):
                    tg.start_soon(follow)
                await gated.wait_sent(1)  # (the stream is live: they join it)
                await anyio.wait_all_tasks_blocked()
                joined.set()

            with anyio.fail_after(30):  # a deadlock guard: the upstream's end is held
                if way == "sync-transport":
                    await anyio.to_thread.run_sync(leave_at_the_end, 3)
                else:
                    async with client.stream("POST", "/v1/responses", json=payload) as r:
                        assert r.headers["x-sse-cache"] == "miss"
                        received = b""
                        async for chunk in r.aiter_raw():
                            received += chunk
                            if complete(received):
                                break
                            if not joined.is_set():
                                await join(3)
                while len(answers) < 3:  # noqa: ASYNC110 - the followers' answers
                    await anyio.sleep(0.01)
        again = await post()
        gated.gate.set()
    assert answers == [("shared", whole)] * 3
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole
    assert gated.calls == 1


async def test_a_handed_over_upstream_is_closed_and_its_connection_reused(serve: Any) -> None:
    # One upstream connection in all: after the producer's client left and the follower read
    # the upstream to its end, that connection must be free for the next request.
    upstream_app = MockUpstream(first_delay=0.05, delay=0.002)
    async with serve(upstream_app) as upstream:
        one = httpx2.Limits(max_connections=1)
        transport = AsyncCacheTransport(
            "memory://", transport=httpx2.AsyncHTTPTransport(limits=one)
        )
        timeout = httpx2.Timeout(30, pool=5)
        async with httpx2.AsyncClient(transport=transport, base_url=upstream, timeout=timeout) as c:
            _, bodies = await _leave_early(c, body("one connection"))
            nxt = await c.post("/v1/responses", json=body("the next one"), headers=KEY)
    assert complete(bodies[0]) and nxt.status_code == 200 and complete(nxt.content)


async def test_finish_on_disconnect_fills_the_cache_when_every_reader_of_a_stream_left(
    serve: Any,
) -> None:
    # With finish_on_disconnect, a stream whose client left is finished to fill the cache:
    # also when others followed it and left too (the last of them used to stop the app, so
    # the most asked answers were the ones never stored).
    upstream_app = MockUpstream(first_delay=0.05, delay=0.01)
    stored = anyio.Event()

    def on_notice(notice: Notice) -> None:
        if notice.kind == "store":
            stored.set()

    async with serve(upstream_app) as upstream:
        app = CacheMiddleware(
            upstream_app, "memory://", finish_on_disconnect=True, hooks=[on_notice]
        )
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as client:
            payload = body("everyone leaves")
            request = client.build_request("POST", "/v1/responses", json=payload, headers=KEY)
            producer = await client.send(request, stream=True)
            follower = await client.send(request, stream=True)
            assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == [
                "miss",
                "shared",
            ]
            for response in (producer, follower):
                await response.aiter_raw().__anext__()  # a first chunk, then the client leaves
                await response.aclose()
            with anyio.fail_after(30):
                await stored.wait()
            again = await client.post("/v1/responses", json=payload, headers=KEY)
            expected = await direct(upstream, payload)
        await app.aclose()
    assert again.headers["x-sse-cache"] == "hit" and again.content == expected
    assert upstream_app.stats()["requests"]["POST /v1/responses"] == 2  # ours, and direct()


@pytest.mark.parametrize("way", ["proxy", "middleware"])
async def test_a_stream_finished_in_the_background_after_its_followers_left_can_be_joined(
    serve: Any, way: str
) -> None:
    # The producer's client leaves while another follows; the follower leaves too: the
    # stream is finished in the background for the cache (finish_on_disconnect). Meanwhile
    # an identical request joins it and gets the whole answer, and a resume of its response
    # by id reads it from the cache: one upstream call in all. (The last follower leaving
    # abandoned the flight first, and both went to the upstream, helper-166; when the
    # producer's client had left alone, they joined.)
    import json

    from flights_seen import FlightsSeen
    from sse_cache.testing import responses_stream

    events = responses_stream("finished in the background", text_deltas=6)
    gated = GatedUpstream(events, hold_after=2)
    seen = FlightsSeen()
    payload = body(f"finished in the background ({way})")
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(serve(gated))
        app: Any = (
            create_proxy_app(upstream, "memory://", finish_on_disconnect=True, hooks=[seen])
            if way == "proxy"
            else CacheMiddleware(gated, "memory://", finish_on_disconnect=True, hooks=[seen])
        )
        stack.push_async_callback(app.aclose)
        base = await stack.enter_async_context(serve(app))
        client = await stack.enter_async_context(
            httpx2.AsyncClient(base_url=base, timeout=30, headers=KEY)
        )
        request = client.build_request("POST", "/v1/responses", json=payload)
        with anyio.fail_after(30):  # a deadlock guard
            producer = await client.send(request, stream=True)
            follower = await client.send(request, stream=True)
            assert [producer.headers["x-sse-cache"], follower.headers["x-sse-cache"]] == [
                "miss",
                "shared",
            ]
            first = await producer.aiter_raw().__anext__()
            await producer.aclose()
            while not seen.taken_over():  # noqa: ASYNC110 - the producer's client left
                await anyio.sleep(0.01)
            await follower.aiter_raw().__anext__()
            await follower.aclose()
            while seen.followers():  # noqa: ASYNC110 - the follower left too
                await anyio.sleep(0.01)
            if way == "proxy":  # the operator sees it read on without a client
                scrape = (await client.get("/_sse_cache/metrics")).text
                assert metric_value(scrape, "sse_cache_background_streams") == 1
            async with anyio.create_task_group() as tg:
                answers: list[httpx2.Response] = []

                async def ask() -> None:
                    answers.append(await client.post("/v1/responses", json=payload))

                tg.start_soon(ask)
                while not seen.followers():  # noqa: ASYNC110 - it joined the live stream
                    await anyio.sleep(0.01)
                gated.gate.set()
        response_id = json.loads(first.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"]
        resumed = await client.get(
            f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": "1"}
        )
        if way == "proxy":  # ... until it has ended
            with anyio.fail_after(30):
                while metric_value(  # noqa: ASYNC110 - a gauge the server sets
                    (await client.get("/_sse_cache/metrics")).text,
                    "sse_cache_background_streams",
                ):
                    await anyio.sleep(0.01)
    [again] = answers
    assert again.headers["x-sse-cache"] == "shared" and again.content == gated.body
    assert resumed.status_code == 200 and resumed.headers["x-sse-cache"] == "hit"
    assert gated.calls == 1


async def test_a_stream_finished_in_the_background_after_all_left_before_its_head_can_be_joined(
    serve: Any,
) -> None:
    # As above, before the upstream's head (when clients time out and herds gather): the
    # producer's client leaves while a follower waits, the follower leaves too, and the app
    # finishes the stream for the cache. An identical request joins it: one upstream call.
    # (The flight was abandoned first, and it went to the upstream again; helper-168.)
    from flights_seen import FlightsSeen
    from sse_cache.testing import responses_stream

    gated = GatedUpstream(responses_stream("all left before the head", text_deltas=4))
    head = anyio.Event()

    async def slow_head(scope: Any, receive: Any, send: Any) -> None:
        # Waits for its upstream's head as the proxy's forwarder does, watching its client:
        # told it left, it stops.
        async def send_after_head(message: Any) -> None:
            if message["type"] == "http.response.start":
                told = []
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        told.append((await receive())["type"])
                        tg.cancel_scope.cancel()

                    tg.start_soon(watch)
                    await head.wait()
                    tg.cancel_scope.cancel()
                if told:
                    raise OSError(f"told {told[0]}: stopped")
            await send(message)

        await gated(scope, receive, send_after_head)

    seen = FlightsSeen()
    payload = body("all left before the head")
    app = CacheMiddleware(slow_head, "memory://", finish_on_disconnect=True, hooks=[seen])
    async with (
        serve(app) as base,
        httpx2.AsyncClient(base_url=base, timeout=30, headers=KEY) as client,
    ):
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    await client.post("/v1/responses", json=payload)

                tg.start_soon(ask)
                while not seen.live():  # noqa: ASYNC110 - the producer's flight
                    await anyio.sleep(0.01)
                tg.start_soon(ask)
                while not seen.followers():  # noqa: ASYNC110 - the follower joined
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # both clients leave before the head
            while seen.followers() or not app.slots.taken:  # noqa: ASYNC110
                await anyio.sleep(0.01)  # (the follower left; the app finishes the stream)
            answers: list[httpx2.Response] = []
            async with anyio.create_task_group() as tg:

                async def again() -> None:
                    answers.append(await client.post("/v1/responses", json=payload))

                tg.start_soon(again)
                while not seen.followers():  # noqa: ASYNC110 - it joined the live stream
                    await anyio.sleep(0.01)
                head.set()
    await app.aclose()
    [answer] = answers
    assert answer.headers["x-sse-cache"] == "shared" and answer.content == gated.body
    assert gated.calls == 1


async def test_followers_outlive_a_background_completion_deadline(serve: Any) -> None:
    # finish_on_disconnect bounds how long a stream nobody reads is finished for the cache;
    # a stream that followers read is not cut by that bound.
    upstream_app = MockUpstream(first_delay=0.05, delay=0.01)
    async with serve(upstream_app) as upstream:
        app = CacheMiddleware(
            upstream_app, "memory://", finish_on_disconnect=True, background_timeout=0.2
        )
        async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as client:
            payload = body("followers and a background deadline")
            _got, bodies = await _leave_early(client, payload)
            expected = await direct(upstream, payload)
        await app.aclose()
    assert all(b == expected for b in bodies) and complete(expected)

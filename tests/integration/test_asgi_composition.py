"""The middleware composed with what gateways already run (Starlette's BaseHTTPMiddleware,
GZip), over real HTTP: a partial answer never looks complete to any client, and a follower
never gets bytes its request did not ask for."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from asgi_calls import body_then
from sse_cache._uvicorn import serve as serve_app
from sse_cache.adapters import GenericSSE
from sse_cache.asgi import CacheMiddleware

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = {"authorization": "Bearer sk-compose"}
ROUTES = {"/v1/generate": GenericSSE}  # a clean end is a complete answer


class PassThrough(BaseHTTPMiddleware):
    """An auth or logging layer written the usual Starlette way."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


async def read(response: httpx2.Response) -> tuple[str, bytes]:
    """("ended", body) for a response that ended cleanly, ("cut", body) for one aborted."""
    body = b""
    try:
        async for chunk in response.aiter_raw():
            body += chunk
    except httpx2.TransportError:
        return "cut", body
    return "ended", body


async def test_an_app_failing_after_basehttpmiddleware_ended_its_response_is_cut_for_all(
    serve: Any,
) -> None:
    # BaseHTTPMiddleware answers an app that raised mid-stream with the end of the body
    # (more_body False) and only then re-raises. That end is not the stream's: the producer's
    # client is aborted, a follower must be too, and nothing is stored.
    release = anyio.Event()
    calls = 0

    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"n":1}\n\n'
        await release.wait()
        yield b'data: {"n":2}\n\n'
        raise RuntimeError("the upstream broke off")

    async def generate(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return StreamingResponse(events(), media_type="text/event-stream")

    app = CacheMiddleware(
        Starlette(
            routes=[Route("/v1/generate", generate, methods=["POST"])],
            middleware=[Middleware(PassThrough)],
        ),
        "memory://",
        routes=ROUTES,
    )
    async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=30) as client:
        request = client.build_request("POST", "/v1/generate", json={"q": 1}, headers=KEY)
        producer = await client.send(request, stream=True)
        assert producer.headers["x-sse-cache"] == "miss"
        chunks = producer.aiter_raw()
        assert await chunks.__anext__() == b'data: {"n":1}\n\n'
        follower = await client.send(request, stream=True)
        assert follower.headers["x-sse-cache"] == "shared"
        release.set()
        with pytest.raises(httpx2.TransportError):
            async for _ in chunks:
                pass
        outcome, body = await read(follower)
        assert outcome == "cut", body
        await producer.aclose()
        await follower.aclose()
        again = await client.send(request, stream=True)
        assert again.headers["x-sse-cache"] == "miss"  # nothing was stored
        await again.aclose()
    assert calls == 2


def gzipping(release: anyio.Event) -> GZipMiddleware:
    """An app streaming SSE behind a GZip layer set to compress event streams too: a first
    piece, then the rest once ``release`` is set."""

    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"n":1}\n\n' * 40
        await release.wait()
        yield b'data: {"n":2}\n\n'

    async def generate(request: Request) -> Response:
        return StreamingResponse(events(), media_type="text/event-stream")

    inner = Starlette(routes=[Route("/v1/generate", generate, methods=["POST"])])
    return GZipMiddleware(inner, minimum_size=0, exclude_content_types=())


async def test_a_follower_never_gets_an_encoding_it_did_not_ask_for(serve: Any) -> None:
    # GZip set to compress event streams too: the first request asked for gzip and gets it.
    # An identical request that did not ask must not follow it into gzip bytes: it asks for
    # itself (its own miss), and reads plain SSE. Compressed answers are never stored.
    release = anyio.Event()
    app = CacheMiddleware(gzipping(release), "memory://", routes=ROUTES)
    async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=30) as client:
        gzipped = client.build_request(
            "POST", "/v1/generate", json={}, headers={**KEY, "accept-encoding": "gzip"}
        )
        plain = client.build_request(
            "POST", "/v1/generate", json={}, headers={**KEY, "accept-encoding": "identity"}
        )
        first = await client.send(gzipped, stream=True)
        assert first.headers["content-encoding"] == "gzip"
        chunks = first.aiter_raw()
        head = await chunks.__anext__()  # the stream is live, its head sent
        second = await client.send(plain, stream=True)
        assert "content-encoding" not in second.headers
        assert second.headers["x-sse-cache"] == "miss"
        release.set()
        outcome, body = await read(second)
        assert outcome == "ended" and body.endswith(b'data: {"n":2}\n\n')
        rest = b"".join([chunk async for chunk in chunks])
        assert gzip.decompress(head + rest).endswith(b'data: {"n":2}\n\n')
        await first.aclose()
        await second.aclose()


async def test_a_follower_in_another_process_never_gets_an_encoding_it_did_not_ask_for(
    serve: Any, redis_server: Any
) -> None:
    # Two workers on one Redis with cross-process single-flight: the gzip answer of one is
    # not published to an identical request in the other that did not ask for gzip. It
    # leads its own answer, plain.
    release = anyio.Event()
    url = f"{redis_server.url}?prefix=gzip{uuid.uuid4().hex[:8]}:"
    a, b = (
        CacheMiddleware(gzipping(release), url, routes=ROUTES, cross_process=True) for _ in range(2)
    )
    async with (
        serve(a) as url_a,
        serve(b) as url_b,
        httpx2.AsyncClient(base_url=url_a, timeout=30) as client_a,
        httpx2.AsyncClient(base_url=url_b, timeout=30) as client_b,
    ):
        gzipped = client_a.build_request(
            "POST", "/v1/generate", json={}, headers={**KEY, "accept-encoding": "gzip"}
        )
        first = await client_a.send(gzipped, stream=True)
        assert first.headers["content-encoding"] == "gzip"
        chunks = first.aiter_raw()
        await chunks.__anext__()  # worker A's stream is live, its head sent
        plain = client_b.build_request(
            "POST", "/v1/generate", json={}, headers={**KEY, "accept-encoding": "identity"}
        )
        second = await client_b.send(plain, stream=True)
        assert "content-encoding" not in second.headers
        assert second.headers["x-sse-cache"] == "miss"
        release.set()
        outcome, body = await read(second)
        assert outcome == "ended" and body.endswith(b'data: {"n":2}\n\n')
        async for _ in chunks:
            pass
        await first.aclose()
        await second.aclose()
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("cache", ["inside", "inside, under gzip", "inside, under cors", "outside"])
async def test_the_cache_inside_basehttpmiddleware_warns_that_cut_streams_would_end_cleanly(
    serve: Any, cache: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Behind an outer BaseHTTPMiddleware, an answer the cache aborts (here: the upstream
    # breaks off mid-answer) reaches the client as a clean end of a truncated body: that
    # layer sends the end of the body before it re-raises, whatever the app inside does.
    # The cache cannot undo that; it says so, once, at its first request. Outside it (the
    # cache added after it), the client sees the cut.
    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"n":1}\n\n'
        raise RuntimeError("the upstream broke off")

    async def generate(request: Request) -> Response:
        return StreamingResponse(events(), media_type="text/event-stream")

    endpoint = Starlette(routes=[Route("/v1/generate", generate, methods=["POST"])])
    app: Any
    cached = CacheMiddleware(endpoint, "memory://", routes=ROUTES)
    if cache == "inside":
        app = PassThrough(cached)
    elif cache == "inside, under gzip":  # (a layer between: the send it is given is GZip's)
        app = PassThrough(GZipMiddleware(cached))
    elif cache == "inside, under cors":  # (CORS wraps send in a functools.partial)
        app = PassThrough(CORSMiddleware(cached, allow_origins=["*"]))
    else:
        app = CacheMiddleware(PassThrough(endpoint), "memory://", routes=ROUTES)
    inside = cache != "outside"
    with caplog.at_level("WARNING", logger="sse_cache"):
        async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=30) as client:
            for n in range(2):
                headers = {**KEY, "origin": "https://app.example"}
                request = client.build_request(
                    "POST", "/v1/generate", json={"q": n}, headers=headers
                )
                response = await client.send(request, stream=True)
                outcome, body = await read(response)
                await response.aclose()
                assert body == b'data: {"n":1}\n\n'
                # What the warning is about: a clean end of a cut answer, inside only.
                assert outcome == ("ended" if inside else "cut")
    warnings = [r.getMessage() for r in caplog.records if "BaseHTTPMiddleware" in r.getMessage()]
    if inside:
        assert len(warnings) == 1  # once, not per request
        assert "pure ASGI middleware" in warnings[0]
    else:
        assert warnings == []


def _chat_sse(text: str) -> list[bytes]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    said = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    done = {"index": 0, "delta": {}, "finish_reason": "stop"}
    pieces = [json.dumps({**chunk, "choices": [c]}) for c in (said, done)] + ["[DONE]"]
    return [f"data: {piece}\n\n".encode() for piece in pieces]


def _in_process_scope(method: str, path: str, query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [
            (b"authorization", b"Bearer sk-compose"),
            (b"content-type", b"application/json"),
        ],
    }


async def test_a_background_task_failing_after_a_whole_answer_leaves_its_client_all_of_it() -> None:
    # Starlette runs a response's background task after its last body message. The answer
    # was whole then: stored, and ended for the followers. A task that fails must not take
    # the rest from a client still behind (its sending was cancelled with the app's error:
    # an aborted response for an answer the cache stored; helper-76).
    from starlette.background import BackgroundTask

    pieces = _chat_sse("Hello")
    failing = anyio.Event()

    async def fail() -> None:
        failing.set()
        raise RuntimeError("background task failed")

    async def create(request: Request) -> Response:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return StreamingResponse(
            body(), media_type="text/event-stream", background=BackgroundTask(fail)
        )

    app = Starlette(routes=[Route("/v1/chat/completions", create, methods=["POST"])])
    mw = CacheMiddleware(app, "memory://")
    request = json.dumps({"model": "m", "messages": [], "stream": True}).encode()

    async def ask(slow: bool) -> tuple[bytes, bytes, bool, BaseException | None]:
        head: dict[bytes, bytes] = {}
        got = bytearray()
        ended = False

        async def send(message: dict[str, Any]) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                head.update(message["headers"])
                return
            if slow:
                # The client is behind when the task fails, and still when the app's error
                # has reached the middleware.
                await failing.wait()
                await anyio.wait_all_tasks_blocked()
            got.extend(message.get("body", b""))
            ended = not message.get("more_body", False)

        error = None
        try:
            await mw(_in_process_scope("POST", "/v1/chat/completions"), body_then(request), send)
        except Exception as exc:
            error = exc
        return head[b"x-sse-cache"], bytes(got), ended, error

    with anyio.fail_after(30):  # a deadlock guard
        status, got, ended, error = await ask(slow=True)
    assert (status, got, ended) == (b"miss", b"".join(pieces), True)
    assert isinstance(error, RuntimeError)  # the app's error, raised once the client had it
    status, got, ended, _ = await ask(slow=False)
    assert (status, got, ended) == (b"hit", b"".join(pieces), True)


async def test_a_client_leaving_while_its_whole_answer_is_stored_keeps_its_response_id() -> None:
    # The answer is stored when the app's last body message completes it, inside the app's
    # send. Under Starlette's StreamingResponse (ASGI spec < 2.4) a client leaving then
    # cancels that send: the store's end, indexing the response id, was cut, and
    # GET /v1/responses/{id}?stream=true went to the app for good (helper-76).
    from sse_cache.backends import MemoryBackend
    from sse_cache.events import serialize_sse
    from sse_cache.testing import responses_stream

    events = responses_stream("keep my id", text_deltas=3)
    pieces = [serialize_sse([event]) for event in events]
    response_id = json.loads(events[0].data)["response"]["id"]
    storing, stored = anyio.Event(), anyio.Event()

    class HeldStore(MemoryBackend):
        async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
            storing.set()
            await stored.wait()
            await super().set(key, value, ttl)

    async def create(request: Request) -> Response:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return StreamingResponse(body(), media_type="text/event-stream")

    async def by_id(request: Request) -> Response:
        return Response("reached the app", status_code=404)

    app = Starlette(
        routes=[
            Route("/v1/responses", create, methods=["POST"]),
            Route("/v1/responses/{rid}", by_id, methods=["GET"]),
        ]
    )
    mw = CacheMiddleware(app, HeldStore())
    request = json.dumps({"model": "m", "input": "keep my id", "stream": True}).encode()
    leave = anyio.Event()

    async def ignore(message: dict[str, Any]) -> None:
        pass

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            scope = _in_process_scope("POST", "/v1/responses")
            tg.start_soon(mw, scope, body_then(request, leave.wait), ignore)
            await storing.wait()  # the whole answer is being stored ...
            leave.set()  # ... when its client leaves
            await anyio.wait_all_tasks_blocked()
            stored.set()
    got = bytearray()
    head: dict[str, Any] = {}

    async def keep(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            head.update(status=message["status"], **{k.decode(): v for k, v in message["headers"]})
        else:
            got.extend(message.get("body", b""))

    scope = _in_process_scope("GET", f"/v1/responses/{response_id}", b"stream=true")
    await mw(scope, body_then(b""), keep)
    assert head["status"] == 200 and head["x-sse-cache"] == b"hit", head
    assert bytes(got) == b"".join(pieces)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_an_app_served_again_caches_again(backend: str, tmp_path: Any) -> None:
    # The middleware closes a backend it opened from a URL at the lifespan's shutdown. An
    # app served again (a test client per test on one module-level app, a server restarted
    # in process) found it closed for good: every request a miss, warnings, the breaker
    # open (helper-95). It is opened again at the next startup.
    calls = 0

    async def generate(request: Request) -> StreamingResponse:
        nonlocal calls
        calls += 1
        return StreamingResponse(
            iter([b"data: one\n\n", b"data: two\n\n"]), media_type="text/event-stream"
        )

    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'c.db'}"
    app = Starlette(
        routes=[Route("/v1/generate", generate, methods=["POST"])],
        middleware=[Middleware(CacheMiddleware, backend=url, routes=ROUTES)],
    )
    seen = []
    for _ in range(2):
        async with serve_app(app, lifespan="on") as base, httpx2.AsyncClient(base_url=base) as http:
            for _ in range(2):
                answer = await http.post("/v1/generate", json={"q": 1}, headers=KEY)
                assert answer.content == b"data: one\n\ndata: two\n\n"
                seen.append(answer.headers["x-sse-cache"])
    # memory:// is a new, empty cache each time it is opened; a SQLite file keeps its answers.
    expected = (
        ["miss", "hit", "miss", "hit"] if backend == "memory" else ["miss", "hit", "hit", "hit"]
    )
    assert seen == expected
    assert calls == expected.count("miss")

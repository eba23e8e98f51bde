"""Resuming an answer that is still being produced, through the real proxy (uvicorn +
forwarder): a client loses its connection midway and comes back — by Responses'
``GET /v1/responses/{id}?stream=true&starting_after=N`` or with ``Last-Event-ID`` — and gets
exactly the rest of the producer's bytes, from one upstream call, within the resume window.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache.adapters import GenericSSE
from sse_cache.engine import Notice
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, MockUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}
PAYLOAD = {"model": "gpt-mock", "input": "resume me", "stream": True}
PACE = {"x-mock-delay-ms": "10", "x-mock-deltas": "150"}  # ~1.5 s of answer


class Notices:
    """A hook that lets a test wait for a notice (what the cache did, not when)."""

    def __init__(self) -> None:
        self.seen: list[Notice] = []
        self._changed = anyio.Event()

    def __call__(self, notice: Notice) -> None:
        self.seen.append(notice)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, kind: str) -> Notice:
        while True:
            for notice in self.seen:
                if notice.kind == kind:
                    return notice
            await self._changed.wait()


@asynccontextmanager
async def proxied(
    serve: Any, upstream_app: Any, **options: Any
) -> AsyncIterator[httpx2.AsyncClient]:
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, "memory://", **options)
        try:
            async with serve(app) as base, httpx2.AsyncClient(base_url=base, timeout=30) as client:
                client.upstream = upstream  # type: ignore[attr-defined]
                yield client
        finally:
            await app.aclose()


def blocks(data: bytes) -> list[bytes]:
    """The whole events in ``data`` (each with its blank line); a partial one is left out."""
    out = data.split(b"\n\n")[:-1]
    return [block + b"\n\n" for block in out]


async def read_then_leave(client: httpx2.AsyncClient, events: int, **headers: str) -> bytes:
    """A streamed request whose client reads ``events`` whole events, then drops the
    connection; what it holds: the bytes up to the end of the last whole event."""
    held = b""
    async with client.stream(
        "POST", "/v1/responses", json=PAYLOAD, headers={**ALICE, **PACE, **headers}
    ) as response:
        assert response.headers["x-sse-cache"] == "miss"
        async for chunk in response.aiter_raw():
            held += chunk
            if len(blocks(held)) >= events:
                break
    return b"".join(blocks(held)[:events])


def last_sequence_number(held: bytes) -> tuple[str, int]:
    last = json.loads(blocks(held)[-1].split(b"data: ", 1)[1])
    first = json.loads(blocks(held)[0].split(b"data: ", 1)[1])
    return first["response"]["id"], last["sequence_number"]


async def whole_answer(client: httpx2.AsyncClient) -> bytes:
    """The upstream's own answer to the request (the mock is deterministic)."""
    async with httpx2.AsyncClient(base_url=client.upstream, timeout=30) as direct:  # type: ignore[attr-defined]
        response = await direct.post(
            "/v1/responses", json=PAYLOAD, headers={**ALICE, **PACE, "x-mock-delay-ms": "0"}
        )
        return response.content


async def test_a_client_that_left_resumes_the_rest_of_the_live_answer(serve: Any) -> None:
    upstream_app = MockUpstream()
    async with proxied(serve, upstream_app, resume_window=30) as client:
        held = await read_then_leave(client, 20)
        response_id, n = last_sequence_number(held)
        resumed = await client.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": str(n)},
            headers=ALICE,
        )
        assert resumed.status_code == 200
        assert resumed.headers["x-sse-cache"] == "shared"
        whole = await whole_answer(client)
        # Exactly the producer's bytes after event N, through response.completed.
        assert held + resumed.content == whole
        # The answer completed in the window: it was stored from that one upstream call.
        again = await client.post("/v1/responses", json=PAYLOAD, headers={**ALICE, **PACE})
        assert again.headers["x-sse-cache"] == "hit" and again.content == whole
        metrics = (await client.get("/_sse_cache/metrics")).text
        assert "sse_cache_resumes_total 1.0" in metrics.splitlines()
    assert upstream_app.stats()["total"] == 2  # the one call through the proxy + whole_answer


async def test_another_tenant_cannot_resume_the_stream(serve: Any) -> None:
    upstream_app = MockUpstream()
    async with proxied(serve, upstream_app, resume_window=30) as client:
        held = await read_then_leave(client, 5)
        response_id, n = last_sequence_number(held)
        params = {"stream": "true", "starting_after": str(n)}
        other = await client.get(f"/v1/responses/{response_id}", params=params, headers=BOB)
        # Bob's request went to the upstream (which knows no such stored response).
        assert "x-sse-cache" not in other.headers
        assert b"response.output_text.delta" not in other.content
        mine = await client.get(f"/v1/responses/{response_id}", params=params, headers=ALICE)
        assert mine.headers["x-sse-cache"] == "shared"
        assert held + mine.content == await whole_answer(client)


async def test_tenants_told_apart_by_the_key_parameter_resume_only_their_own(serve: Any) -> None:
    # Behind a gateway's constant Authorization, the ?key= credential tells tenants apart, in
    # a resume as in the POST: Bob's key does not open Alice's stored answer, Alice's does.
    upstream_app = MockUpstream()
    gateway = {"authorization": "Bearer the-gateway's-own", "x-mock-deltas": "20"}
    async with proxied(serve, upstream_app) as client:
        first = await client.post(
            "/v1/responses", params={"key": "alice"}, json=PAYLOAD, headers=gateway
        )
        assert first.headers["x-sse-cache"] == "miss"
        response_id, _ = last_sequence_number(first.content)
        after = {"stream": "true", "starting_after": "2"}
        path = f"/v1/responses/{response_id}"
        bob = await client.get(path, params={**after, "key": "bob"}, headers=gateway)
        assert "x-sse-cache" not in bob.headers  # the upstream's answer, not Alice's
        assert b"response.output_text.delta" not in bob.content
        alice = await client.get(path, params={**after, "key": "alice"}, headers=gateway)
        assert alice.headers["x-sse-cache"] == "hit"
        rest = [
            b
            for b in blocks(first.content)
            if json.loads(b.split(b"data: ", 1)[1])["sequence_number"] > 2
        ]
        assert alice.content == b"".join(rest)


async def test_after_the_window_an_abandoned_answer_is_not_resumed_from_its_partial_log(
    serve: Any,
) -> None:
    upstream_app = MockUpstream()
    notices = Notices()
    slow = {**PACE, "x-mock-delay-ms": "50"}  # ~7.5 s: the window ends long before
    async with proxied(serve, upstream_app, resume_window=0.2, hooks=[notices]) as client:
        held = await read_then_leave(client, 3, **slow)
        response_id, n = last_sequence_number(held)
        # The window passes with no one reading: the upstream call is abandoned, nothing
        # is stored.
        assert (await notices.wait_for("not_stored")).detail
        resumed = await client.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": str(n)},
            headers=ALICE,
        )
        assert "x-sse-cache" not in resumed.headers  # the upstream's own answer
        assert b"response.output_text.delta" not in resumed.content
    assert not any(notice.kind == "resumed" for notice in notices.seen)


def numbered_events(count: int) -> GatedUpstream:
    """An upstream of plain SSE whose events carry ids (``id: 1`` …), paced, CRLF-framed."""
    events = [
        f'id: {i}\r\nevent: tick\r\ndata: {{"n": {i}}}\r\n\r\n'.encode()
        for i in range(1, count + 1)
    ]
    return GatedUpstream(events, delay=0.01)  # the upstream's own pace


async def test_last_event_id_continues_a_live_stream_after_that_event(serve: Any) -> None:
    upstream_app = numbered_events(150)
    whole = upstream_app.body
    routes = {"/v1/ticks": GenericSSE()}
    async with proxied(serve, upstream_app, resume_window=30, routes=routes) as client:
        held = b""
        async with client.stream("POST", "/v1/ticks", json={"stream": True}, headers=ALICE) as r:
            assert r.headers["x-sse-cache"] == "miss"
            async for chunk in r.aiter_raw():
                held += chunk
                if held.count(b"\r\n\r\n") >= 10:
                    break
        got, held = held, b"".join(upstream_app.pieces[:10])
        assert got.startswith(held)  # the client has events 1..10 (and perhaps a part of 11)
        resumed = await client.post(
            "/v1/ticks", json={"stream": True}, headers={**ALICE, "last-event-id": "10"}
        )
        assert resumed.headers["x-sse-cache"] == "shared"
        assert held + resumed.content == whole
        # Another tenant with the same Last-Event-ID gets its own answer from the upstream.
        other = await client.post(
            "/v1/ticks", json={"stream": True}, headers={**BOB, "last-event-id": "10"}
        )
        assert other.headers["x-sse-cache"] == "miss" and other.content == whole
    assert upstream_app.calls == 2


async def test_a_client_resumes_through_another_proxy_process_on_the_same_redis(
    serve: Any, redis_server: Any
) -> None:
    # Two `sse-cache proxy --cross-process` OS processes on one Redis: the answer is produced
    # by the first (its client leaves midway), resumed through the second from the
    # producer's fan-out log, once, and another tenant gets nothing of it there.
    from test_cross_process import two_proxies

    upstream_app = MockUpstream()
    async with (
        two_proxies(serve, redis_server.url, upstream_app) as (_, (one, _p1), (two, _p2)),
        httpx2.AsyncClient(base_url=one, timeout=30) as first,
        httpx2.AsyncClient(base_url=two, timeout=30) as second,
    ):
        held = await read_then_leave(first, 20)
        response_id, n = last_sequence_number(held)
        params = {"stream": "true", "starting_after": str(n)}
        other = await second.get(f"/v1/responses/{response_id}", params=params, headers=BOB)
        assert "x-sse-cache" not in other.headers  # the upstream's own answer
        resumed = await second.get(f"/v1/responses/{response_id}", params=params, headers=ALICE)
        assert resumed.status_code == 200 and resumed.headers["x-sse-cache"] == "shared"
    assert upstream_app.stats()["streams"] == 1  # (and Bob's GET, which was passed on)
    # The mock is deterministic: another instance gives the whole answer to compare with.
    async with serve(MockUpstream()) as reference:
        first.upstream = reference  # type: ignore[attr-defined]
        assert held + resumed.content == await whole_answer(first)


async def test_the_openai_sdk_resumes_an_answer_it_stopped_reading(serve: Any) -> None:
    # The SDK as the oracle: its own Responses.retrieve(id, stream=True, starting_after=N)
    # parses the rest, and the two halves make the whole answer.
    import openai

    upstream_app = MockUpstream()
    async with proxied(serve, upstream_app, resume_window=30) as proxy_client:
        sdk = openai.AsyncOpenAI(
            base_url=str(proxy_client.base_url) + "/v1", api_key="sk-alice", max_retries=0
        )
        text, seen = "", -1
        response_id = ""
        stream = await sdk.responses.create(
            model="gpt-mock", input="resume me", stream=True, extra_headers=PACE
        )
        async for event in stream:
            seen = event.sequence_number
            if event.type == "response.created":
                response_id = event.response.id
            elif event.type == "response.output_text.delta":
                text += event.delta
            if seen >= 20:
                break
        await stream.close()  # the connection drops midway
        rest = await sdk.responses.retrieve(response_id, stream=True, starting_after=seen)
        numbers, final = [], None
        async for event in rest:
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                text += event.delta
            final = event
        assert numbers == list(range(seen + 1, seen + 1 + len(numbers)))
        assert final is not None and final.type == "response.completed"
        completed_text = final.response.output_text
        assert text == completed_text and text
        await sdk.close()
    assert upstream_app.stats()["streams"] == 1


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_transport_resumes_a_stream_its_client_stopped_reading(
    serve: Any, sync: bool
) -> None:
    # The same resume through the httpx2 transports (client-side caching): the program's
    # own call stops reading midway, and its next call gets the rest, from one upstream call.
    import anyio.to_thread

    from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport

    upstream_app = MockUpstream()
    async with serve(upstream_app) as upstream:
        reference = httpx2.AsyncClient(base_url=upstream, timeout=30)
        reference.upstream = upstream  # type: ignore[attr-defined]
        whole = await whole_answer(reference)
        await reference.aclose()
        if sync:
            transport = CacheTransport("memory://", resume_window=30)
            client = httpx2.Client(transport=transport, base_url=upstream, timeout=30)

            def run() -> tuple[bytes, bytes]:
                held = b""
                with client.stream(
                    "POST", "/v1/responses", json=PAYLOAD, headers={**ALICE, **PACE}
                ) as response:
                    for chunk in response.iter_raw():
                        held += chunk
                        if len(blocks(held)) >= 20:
                            break
                held = b"".join(blocks(held)[:20])
                response_id, n = last_sequence_number(held)
                params = {"stream": "true", "starting_after": str(n)}
                rest = client.get(f"/v1/responses/{response_id}", params=params, headers=ALICE)
                assert rest.headers["x-sse-cache"] == "shared"
                return held, rest.content

            try:
                held, rest = await anyio.to_thread.run_sync(run)
            finally:
                await anyio.to_thread.run_sync(client.close)
        else:
            transport_ = AsyncCacheTransport("memory://", resume_window=30)
            async with httpx2.AsyncClient(
                transport=transport_, base_url=upstream, timeout=30
            ) as aclient:
                held = await read_then_leave(aclient, 20)
                response_id, n = last_sequence_number(held)
                params = {"stream": "true", "starting_after": str(n)}
                got = await aclient.get(
                    f"/v1/responses/{response_id}", params=params, headers=ALICE
                )
                assert got.headers["x-sse-cache"] == "shared"
                rest = got.content
    assert held + rest == whole
    assert upstream_app.stats()["streams"] == 2  # the cached call, and the reference


async def test_an_upstream_cut_inside_a_transports_resume_window_is_no_unhandled_task_error(
    serve: Any,
) -> None:
    # The client leaves; the transport's window task reads the upstream on for a resume; the
    # upstream is cut. The flight fails (a resumer is aborted), and that is all: the task's
    # error was left unretrieved, and asyncio logged "Task exception was never retrieved"
    # with a traceback, at ERROR, for every such stream.
    import asyncio
    import gc

    from sse_cache.httpx2 import AsyncCacheTransport

    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    cut = {"x-mock-error": "cut", "x-mock-error-after": "30"}
    upstream_app = MockUpstream()
    try:
        async with serve(upstream_app) as upstream:
            async with httpx2.AsyncClient(
                transport=AsyncCacheTransport("memory://", resume_window=30),
                base_url=upstream,
                timeout=30,
            ) as client:
                await read_then_leave(client, 3, **cut)

                reading_on = [
                    t for t in asyncio.all_tasks() if t.get_name() == "sse-cache resume window"
                ]
                assert reading_on
                with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                    # (asyncio.wait does not retrieve a task's exception: awaiting would)
                    await asyncio.wait(reading_on)
                del reading_on
                gc.collect()
                # The cut stream was not stored: the same request asks the upstream again.
                async with client.stream(
                    "POST", "/v1/responses", json=PAYLOAD, headers={**ALICE, **PACE}
                ) as again:
                    assert again.headers["x-sse-cache"] == "miss"
                    await again.aread()
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []
    assert upstream_app.stats()["streams"] == 2

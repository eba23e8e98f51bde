"""Resuming an answer that is still being produced, through the real proxy (uvicorn +
forwarder): a client loses its connection midway and comes back — by Responses'
``GET /v1/responses/{id}?stream=true&starting_after=N`` or with ``Last-Event-ID`` — and gets
exactly the rest of the producer's bytes, from one upstream call, within the resume window.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest

from sse_cache.adapters import GenericSSE
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import GatedUpstream, MockUpstream, NoticeLog

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}
PAYLOAD = {"model": "gpt-mock", "input": "resume me", "stream": True}
PACE = {"x-mock-delay-ms": "10", "x-mock-deltas": "150"}  # ~1.5 s of answer


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


async def read_then_leave(
    client: httpx2.AsyncClient, events: int, payload: Any = PAYLOAD, **headers: str
) -> bytes:
    """A streamed request whose client reads ``events`` whole events, then drops the
    connection; what it holds: the bytes up to the end of the last whole event."""
    held = b""
    async with client.stream(
        "POST", "/v1/responses", json=payload, headers={**ALICE, **PACE, **headers}
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


async def whole_answer(client: httpx2.AsyncClient | str) -> bytes:
    """The upstream's own answer to the request (the mock is deterministic): the upstream
    of a client of :func:`proxied`, or at that URL."""
    upstream = client if isinstance(client, str) else client.upstream  # type: ignore[attr-defined]
    async with httpx2.AsyncClient(base_url=upstream, timeout=30) as direct:
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


async def test_a_resume_in_another_organisation_project_or_prefix_is_not_answered(
    serve: Any,
) -> None:
    # One API key, answers keyed apart by organisation, project and path prefix (a gateway's
    # /team-a/v1 and /team-b/v1 answer for other accounts): a resume by response id was
    # answered from the other's stream, stored or live, where the upstream answers 404
    # (helper-88). Each resumes only its own.
    upstream_app = MockUpstream()
    org = {"openai-organization": "org-1", "openai-project": "proj-1"}
    async with proxied(serve, upstream_app, resume_window=30) as client:
        held = await read_then_leave(client, 5, **org)  # live: read on for its client
        response_id, n = last_sequence_number(held)
        params = {"stream": "true", "starting_after": str(n)}
        path = f"/v1/responses/{response_id}"
        others = [
            ("/v1", {"openai-organization": "org-2", "openai-project": "proj-1"}),
            ("/v1", {"openai-organization": "org-1", "openai-project": "proj-2"}),
            ("/v1", {}),
            ("/team-b/v1", org),
        ]

        async def nobody_else_resumes() -> None:
            for prefix, headers in others:
                got = await client.get(
                    prefix + path.removeprefix("/v1"), params=params, headers={**ALICE, **headers}
                )
                assert "x-sse-cache" not in got.headers, (prefix, headers)  # the upstream's

        await nobody_else_resumes()
        mine = await client.get(path, params=params, headers={**ALICE, **org})
        assert mine.headers["x-sse-cache"] == "shared"
        # Stored now (the answer completed): the index of the stored entry holds them too.
        stored = await client.get(path, params=params, headers={**ALICE, **org})
        assert stored.headers["x-sse-cache"] == "hit" and stored.content == mine.content
        await nobody_else_resumes()


async def test_a_resume_is_answered_only_under_the_prefix_its_stream_was_asked_under(
    serve: Any,
) -> None:
    # A gateway's prefix may hold "/responses" itself: the resume side cut the prefix it had
    # already cut once more, so a stream asked under /v1 was resumed under
    # /responses-team/v1 (and /responses/v1), and one asked under /responses-team/v1 never
    # resumed at all (helper-123). The root prefix (/responses itself) is a scope of its own.
    from sse_cache.adapters import OpenAIResponses

    upstream_app = MockUpstream()
    prefixes = ["/v1", "/responses-team/v1", "/responses/v1", ""]
    async with proxied(serve, upstream_app, routes={"/responses": OpenAIResponses}) as client:
        for asked in prefixes:
            payload = {**PAYLOAD, "input": f"resume me under {asked!r}"}
            whole = await client.post(
                f"{asked}/responses", json=payload, headers={**ALICE, "x-mock-deltas": "5"}
            )
            assert whole.headers["x-sse-cache"] == "miss"
            response_id, _ = last_sequence_number(whole.content)
            params = {"stream": "true", "starting_after": "3"}
            for resumed in prefixes:
                got = await client.get(
                    f"{resumed}/responses/{response_id}", params=params, headers=ALICE
                )
                if resumed == asked:
                    assert got.headers["x-sse-cache"] == "hit", resumed
                    assert whole.content.endswith(got.content) and got.content
                else:
                    assert "x-sse-cache" not in got.headers, (asked, resumed)  # the upstream's


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
    notices = NoticeLog()
    slow = {**PACE, "x-mock-delay-ms": "50"}  # ~7.5 s: the window ends long before
    async with proxied(serve, upstream_app, resume_window=0.2, hooks=[notices]) as client:
        held = await read_then_leave(client, 3, **slow)
        response_id, n = last_sequence_number(held)
        # The window passes with no one reading: the upstream call is abandoned, nothing
        # is stored.
        assert (await notices.wait("not_stored")).detail
        resumed = await client.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": str(n)},
            headers=ALICE,
        )
        assert "x-sse-cache" not in resumed.headers  # the upstream's own answer
        assert b"response.output_text.delta" not in resumed.content
    assert not any(notice.kind == "resumed" for notice in notices.seen)


@pytest.mark.parametrize("finish", [False, True], ids=["window", "window-and-finish"])
async def test_at_most_max_background_answers_are_read_on_for_their_clients_at_once(
    serve: Any, finish: bool
) -> None:
    # Each answer read on for its client holds an upstream call and up to two copies of
    # max_entry_bytes: there was no bound (helper-83: 20 clients leaving at once passed
    # 1.5 GB). Counted with the background completions, against max_background.
    upstream_app = MockUpstream()
    notices = NoticeLog()
    slow = {"x-mock-delay-ms": "50", "x-mock-deltas": "60"}  # ~3 s: both stream on below
    options = {
        "resume_window": 30,
        "max_background": 1,
        "hooks": [notices],
        "finish_on_disconnect": finish,  # (then each stream asks twice: told once)
    }
    async with proxied(serve, upstream_app, **options) as client:
        held = await read_then_leave(client, 3, **slow)
        other = {**PAYLOAD, "input": "and me"}
        dropped = await read_then_leave(client, 3, other, **slow)
        # One is read on (max_background=1); the other is abandoned at once, as without
        # a window: its upstream call is cut, nothing is stored.
        with anyio.fail_after(30):  # a deadlock guard: both were read on to their end
            assert "cut or abandoned" in (await notices.wait("not_stored")).detail
        answers = []
        for got in (held, dropped):
            response_id, n = last_sequence_number(got)
            answers.append(
                await client.get(
                    f"/v1/responses/{response_id}",
                    params={"stream": "true", "starting_after": str(n)},
                    headers=ALICE,
                )
            )
        assert answers[0].headers["x-sse-cache"] == "shared"
        assert "x-sse-cache" not in answers[1].headers  # the upstream's own answer
        # Told, for the metrics (sse_cache_background_refused_total): the one not read on.
        assert [n.kind for n in notices.seen].count("background_full") == 1


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


async def test_last_event_id_continues_a_stored_stream_and_is_counted_as_a_resume(
    serve: Any,
) -> None:
    # From the entry, as from the live stream: the events after that id, and a `resumed`
    # notice (it was a hit alone: sse_cache_resumes_total missed every resume the cache
    # answered from an entry).
    upstream_app = numbered_events(30)
    notices = NoticeLog()
    routes = {"/v1/ticks": GenericSSE()}
    async with proxied(serve, upstream_app, routes=routes, hooks=[notices]) as client:
        whole = await client.post("/v1/ticks", json={"stream": True}, headers=ALICE)
        assert whole.headers["x-sse-cache"] == "miss" and whole.content == upstream_app.body
        resumed = await client.post(
            "/v1/ticks", json={"stream": True}, headers={**ALICE, "last-event-id": "10"}
        )
    assert resumed.headers["x-sse-cache"] == "hit"
    assert resumed.content == b"".join(upstream_app.pieces[10:])
    assert [n.kind for n in notices.seen if n.kind in ("hit", "resumed")] == ["hit", "resumed"]
    assert upstream_app.calls == 1


async def test_a_non_streamed_request_with_a_last_event_id_is_no_resume(serve: Any) -> None:
    # It gets the whole answer as JSON: a hit, not a resume (helper-104: counted as one).
    notices = NoticeLog()
    async with proxied(serve, MockUpstream(), hooks=[notices]) as client:
        streamed = {**PAYLOAD, "stream": True}
        await client.post("/v1/responses", json=streamed, headers=ALICE)
        whole = await client.post(
            "/v1/responses",
            json={**PAYLOAD, "stream": False},
            headers={**ALICE, "last-event-id": "zzz"},
        )
    assert whole.headers["x-sse-cache"] == "hit"
    assert whole.headers["content-type"].startswith("application/json")
    assert not [n for n in notices.seen if n.kind == "resumed"]


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
        whole = await whole_answer(upstream)
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


@pytest.mark.parametrize("read", ["part", "nothing"])
async def test_a_transport_resume_dropped_unclosed_leaves_its_place(serve: Any, read: str) -> None:
    # A program drops a resumed response without closing it (read in part, or not at all),
    # in a reference cycle: once collected it leaves its place in the live stream (a resume
    # has no exchange: its answer is closed as the response is let go of; one never read
    # held its place until the stream ended), and a later resume gets the rest, whole.
    import gc

    from flights_seen import FlightsSeen
    from sse_cache.httpx2 import AsyncCacheTransport

    seen = FlightsSeen()
    upstream_app = MockUpstream()
    async with serve(upstream_app) as upstream:
        whole = await whole_answer(upstream)
        transport = AsyncCacheTransport("memory://", resume_window=30, hooks=[seen])
        async with httpx2.AsyncClient(transport=transport, base_url=upstream, timeout=30) as client:
            held = await read_then_leave(client, 20)
            response_id, n = last_sequence_number(held)
            params = {"stream": "true", "starting_after": str(n)}
            request = client.build_request(
                "GET", f"/v1/responses/{response_id}", params=params, headers=ALICE
            )
            dropped = await client.send(request, stream=True)
            assert dropped.headers["x-sse-cache"] == "shared"
            chunks = dropped.aiter_raw()
            if read == "part":
                await chunks.__anext__()
            assert seen.followers() == 1
            cycle: list[Any] = [chunks, dropped]
            cycle.append(cycle)
            del cycle, chunks, dropped, request
            gc.collect()
            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                while seen.followers():  # noqa: ASYNC110 - a count in the cache
                    await anyio.sleep(0.01)
            assert seen.live()  # (still produced: the window reads it on)
            got = await client.get(f"/v1/responses/{response_id}", params=params, headers=ALICE)
            assert got.headers["x-sse-cache"] == "shared"
            assert held + got.content == whole
    assert upstream_app.stats()["streams"] == 2  # the cached call, and the reference


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_transport_reads_on_at_most_max_background_streams_for_their_clients(
    serve: Any, sync: bool
) -> None:
    # As the middleware's (helper-83: each held stream holds an upstream call and up to two
    # copies of max_entry_bytes): a program whose clients leave faster than the window
    # passes held without bound. With max_background=1, one stream is read on for its
    # client; a second is abandoned at once; once the first has ended, its place is free.
    import anyio.to_thread

    from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport

    slow = {**ALICE, "x-mock-delay-ms": "20", "x-mock-deltas": "60"}
    payloads = [{**PAYLOAD, "input": f"stream {i}"} for i in range(3)]
    upstream_app = MockUpstream()
    told: list[Any] = []
    async with serve(upstream_app) as upstream:
        if sync:
            transport: Any = CacheTransport(
                "memory://", resume_window=600, max_background=1, hooks=[told.append]
            )
            sync_client = httpx2.Client(transport=transport, base_url=upstream, timeout=30)

            def sync_leave(payload: Any) -> bytes:
                held = b""
                with sync_client.stream("POST", "/v1/responses", json=payload, headers=slow) as r:
                    assert r.headers["x-sse-cache"] == "miss"
                    for chunk in r.iter_raw():
                        held += chunk
                        if len(blocks(held)) >= 3:
                            break
                return b"".join(blocks(held)[:3])

            async def leave(payload: Any) -> bytes:
                return await anyio.to_thread.run_sync(sync_leave, payload)

            async def resume(held: bytes) -> httpx2.Response:
                response_id, n = last_sequence_number(held)
                params = {"stream": "true", "starting_after": str(n)}
                return await anyio.to_thread.run_sync(
                    lambda: sync_client.get(
                        f"/v1/responses/{response_id}", params=params, headers=ALICE
                    )
                )

            holds = lambda: transport.portal.call(lambda: transport._holds.taken)  # noqa: E731
            close: Any = lambda: anyio.to_thread.run_sync(sync_client.close)  # noqa: E731
        else:
            transport = AsyncCacheTransport(
                "memory://", resume_window=600, max_background=1, hooks=[told.append]
            )
            client = httpx2.AsyncClient(transport=transport, base_url=upstream, timeout=30)

            async def leave(payload: Any) -> bytes:
                return await read_then_leave(client, 3, payload, **slow)

            async def resume(held: bytes) -> httpx2.Response:
                response_id, n = last_sequence_number(held)
                params = {"stream": "true", "starting_after": str(n)}
                return await client.get(
                    f"/v1/responses/{response_id}", params=params, headers=ALICE
                )

            holds = lambda: transport._holds.taken  # noqa: E731
            close = client.aclose
        try:
            first = await leave(payloads[0])
            second = await leave(payloads[1])  # past the bound: abandoned at once
            abandoned = await resume(second)
            assert "x-sse-cache" not in abandoned.headers  # the upstream's own answer
            rest = await resume(first)  # read on for its client: the rest of it
            assert rest.headers["x-sse-cache"] == "shared"
            assert b"response.completed" in rest.content
            # A deadlock guard, far inside the window: the stream gives its place back when
            # it ends, not when its window does.
            with anyio.fail_after(60):
                while holds():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            third = await leave(payloads[2])
            again = await resume(third)
            assert again.headers["x-sse-cache"] == "shared"  # held: the place was given back
            assert [n.kind for n in told].count("background_full") == 1  # the second
        finally:
            await close()


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


async def asgi_call(
    app: Any, method: str, path: str, query: bytes, body: bytes
) -> tuple[dict[bytes, bytes], bytes]:
    """One request straight to the ASGI ``app`` as Alice (no HTTP): its response headers
    (and ``b"status"``) and body. Its client never leaves."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [(b"authorization", ALICE["authorization"].encode())],
    }
    asked = anyio.Event()
    head: dict[bytes, bytes] = {}
    got = bytearray()

    async def receive() -> dict[str, Any]:
        if not asked.is_set():
            asked.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError  # (never reached)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            head.update(message["headers"])
            head[b"status"] = str(message["status"]).encode()
        else:
            got.extend(message.get("body", b""))

    with anyio.fail_after(30):  # a deadlock guard, not a timing bound
        await app(scope, receive, send)
    return head, bytes(got)


class _TwoAnswers:
    """A Responses upstream whose every call is a new response (its own id, as a model's):
    the first is cut after six events, the second holds after six until :attr:`gate`."""

    def __init__(self) -> None:
        from sse_cache import serialize_sse
        from sse_cache.testing import responses_stream

        events = responses_stream("two answers", text_deltas=6, summaries=0)
        self.template = serialize_sse(events)
        self.old_id = json.loads(events[0].data)["response"]["id"]
        self.gate = anyio.Event()
        self.calls = 0

    def answer_id(self, call: int) -> str:
        return f"resp_call{call:020d}"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from sse_cache.testing import UpstreamCut

        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.calls += 1
        call = self.calls
        body = self.template.replace(self.old_id.encode(), self.answer_id(call).encode())
        pieces = blocks(body)
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for piece in pieces[:6]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if call == 1:
            raise UpstreamCut("the first answer is cut")
        await self.gate.wait()
        for piece in pieces[6:]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_a_resume_in_another_process_never_gets_the_next_answers_events(
    serve: Any, redis_server: Any
) -> None:
    # Answer R1 is cut upstream (not stored); the same request is asked again, and R2 is live
    # from another producer. A client resuming R1 by its id through another process was
    # answered from whoever held the key's lease: R2's events after N, ending cleanly — R1's
    # start spliced to R2's end, looking whole. It must get R1's own rest, or fail.
    import uuid

    from sse_cache.asgi import CacheMiddleware

    upstream = _TwoAnswers()
    backend = f"{redis_server.url}?prefix=r{uuid.uuid4().hex[:8]}:"
    one = CacheMiddleware(upstream, backend, cross_process=True)
    two = CacheMiddleware(upstream, backend, cross_process=True)
    try:
        async with (
            serve(one) as one_url,
            serve(two) as two_url,
            httpx2.AsyncClient(timeout=30, headers=ALICE) as client,
        ):
            payload = {"model": "m", "input": "two answers", "stream": True}
            with pytest.raises(httpx2.RemoteProtocolError):
                async with client.stream("POST", one_url + "/v1/responses", json=payload) as r:
                    async for _ in r.aiter_raw():
                        pass
            first = upstream.answer_id(1)
            async with client.stream("POST", one_url + "/v1/responses", json=payload) as live:
                held = b""
                async for chunk in live.aiter_raw():
                    held += chunk
                    if len(blocks(held)) >= 3:
                        break  # R2 is live (and named), held upstream after six events
                got = b""
                aborted = False
                url = f"{two_url}/v1/responses/{first}"
                params = {"stream": "true", "starting_after": "2"}
                try:
                    async with client.stream("GET", url, params=params) as resumed:
                        upstream.gate.set()
                        async for chunk in resumed.aiter_raw():
                            got += chunk
                except httpx2.RemoteProtocolError:
                    aborted = True
                upstream.gate.set()
        second = upstream.answer_id(2).encode()
        assert second not in got
        assert aborted or b"response.completed" not in got
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_resume_while_the_answer_is_being_stored_is_answered_not_passed_on() -> None:
    # The stream has ended and its entry is being written: the live stream's index was
    # dropped before the entry's was written, and a resume by id in between found neither —
    # it went to the upstream (which, for a real model, may not know the id yet, or answers
    # again). It is answered from the stream (or its entry) here.
    from sse_cache import serialize_sse
    from sse_cache.asgi import CacheMiddleware
    from sse_cache.backends.memory import MemoryBackend
    from sse_cache.testing import responses_stream

    class StoreHeld(MemoryBackend):
        """Holds its first write (the entry) until :attr:`release`."""

        def __init__(self) -> None:
            super().__init__()
            self.storing = anyio.Event()
            self.release = anyio.Event()

        async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
            if not self.storing.is_set():
                self.storing.set()
                await self.release.wait()
            await super().set(key, value, ttl)

    events = responses_stream("stored meanwhile", text_deltas=6, summaries=0)
    response_id = json.loads(events[0].data)["response"]["id"]
    upstream = GatedUpstream(events)
    backend = StoreHeld()
    mw = CacheMiddleware(upstream, backend)

    request = json.dumps({"model": "m", "input": "stored meanwhile", "stream": True}).encode()
    async with anyio.create_task_group() as tg:
        tg.start_soon(asgi_call, mw, "POST", "/v1/responses", b"", request)
        await backend.storing.wait()  # the stream ended; its entry is being written
        query = b"stream=true&starting_after=4"
        head, got = await asgi_call(mw, "GET", f"/v1/responses/{response_id}", query, b"")
        backend.release.set()
    assert head[b"status"] == b"200" and got == serialize_sse(events[5:])
    assert upstream.calls == 1


class _SpacedKeyer:
    """A custom keyer whose keys hold spaces."""

    def key(self, request: Any) -> str:
        from sse_cache.keys import DefaultKeyer

        return "team one " + DefaultKeyer().key(request)


@pytest.mark.parametrize("keyer", [None, _SpacedKeyer()], ids=["default-keyer", "spaced-keys"])
async def test_a_resume_in_another_process_after_the_producer_let_go_reads_its_channel(
    redis_server: Any, keyer: Any
) -> None:
    # The producer in process A has ended and released the key's lease, and its answer is
    # not indexed as an entry (here its store failed; in the race, not yet). A resume by id
    # in process B asked who held the lease — no one — and went to the upstream. The
    # producer's own channel still holds the whole stream (a minute after its end): B
    # answers from it, through the live alias A wrote ("KEY TOKEN"). That was split at its
    # first space, so a custom keyer's key holding one named another channel, and the
    # resume went upstream (inspection split it at the last); one parse serves both.
    import uuid

    from sse_cache import serialize_sse
    from sse_cache.asgi import CacheMiddleware
    from sse_cache.backends import from_url
    from sse_cache.errors import BackendUnavailable
    from sse_cache.keys import ALIAS_PREFIX
    from sse_cache.testing import responses_stream

    events = responses_stream("after the lease", text_deltas=6, summaries=0)
    response_id = json.loads(events[0].data)["response"]["id"]
    upstream = GatedUpstream(events)
    url = f"{redis_server.url}?prefix=r{uuid.uuid4().hex[:8]}:"
    producing, resuming = from_url(url), from_url(url)
    stored = producing.set

    async def entries_fail(key: str, value: bytes, ttl: float | None = None) -> None:
        if not key.startswith(ALIAS_PREFIX):
            raise BackendUnavailable("this test's entries are never written")
        await stored(key, value, ttl)

    producing.set = entries_fail  # type: ignore[method-assign]
    one = CacheMiddleware(upstream, producing, cross_process=True, keyer=keyer)
    two = CacheMiddleware(upstream, resuming, cross_process=True, keyer=keyer)

    try:
        request = json.dumps({"model": "m", "input": "after the lease", "stream": True}).encode()
        head, got = await asgi_call(one, "POST", "/v1/responses", b"", request)
        assert head[b"x-sse-cache"] == b"miss" and got == serialize_sse(events)
        assert (keyer is None) != head[b"x-sse-cache-key"].startswith(b"team one ")
        query = b"stream=true&starting_after=4"
        head, got = await asgi_call(two, "GET", f"/v1/responses/{response_id}", query, b"")
        assert head[b"status"] == b"200" and head[b"x-sse-cache"] == b"shared"
        assert got == serialize_sse(events[5:])
        assert upstream.calls == 1
    finally:
        await one.aclose()
        await two.aclose()
        await producing.aclose()  # (given as objects: the middleware leaves them open)
        await resuming.aclose()


async def test_a_finished_streams_live_alias_lasts_as_long_as_its_channel(
    redis_server: Any,
) -> None:
    # Across processes a stream is resumable by its id through a live alias, written to last
    # an hour (a stream may be that long). Once the stream is over it points at a channel
    # that lives a minute more: kept for the hour, it was one dead row per answer in Redis.
    import uuid

    import redis.asyncio as aioredis

    from sse_cache.asgi import CacheMiddleware
    from sse_cache.keys import ALIAS_PREFIX
    from sse_cache.testing import responses_stream

    events = responses_stream("alias lifetime", text_deltas=4, summaries=0)
    prefix = f"r{uuid.uuid4().hex[:8]}:"
    mw = CacheMiddleware(
        GatedUpstream(events), f"{redis_server.url}?prefix={prefix}", cross_process=True
    )
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        request = json.dumps({"model": "m", "input": "alias lifetime", "stream": True}).encode()
        head, _ = await asgi_call(mw, "POST", "/v1/responses", b"", request)
        assert head[b"x-sse-cache"] == b"miss"
        live_aliases = []
        async for name in client.scan_iter(match=f"{prefix}*{ALIAS_PREFIX}*"):
            if b" " in (await client.get(name) or b""):  # key and token: a live alias
                live_aliases.append(name)
        assert len(live_aliases) == 1
        assert 0 < await client.ttl(live_aliases[0]) <= 60
    finally:
        await mw.aclose()
        await client.aclose()


@pytest.mark.parametrize("how", ["anyio", "task.cancel"])
async def test_a_follower_cancelled_while_it_pulls_a_held_stream_leaves_it_resumable(
    serve: Any, how: str
) -> None:
    # Through a transport with a resume window: the producer's client leaves (the stream is
    # held for it), a follower reading on is cancelled while it pulls the upstream, alone.
    # Its cancellation must not end the stream for the client that comes back within the
    # window: the resume gets exactly the rest, from the one upstream call (helper-66: 18 of
    # 84 such trials failed the stream, as a pull cancelled midway with no one else reading).
    # Cancelled by anyio, or by asyncio itself (``task.cancel()``, as ``asyncio.timeout``
    # does), which anyio's shield does not stop (helper-67).
    import asyncio

    from sse_cache.httpx2 import AsyncCacheTransport
    from sse_cache.testing import responses_stream

    events = responses_stream("held for the client", text_deltas=6)
    gated = GatedUpstream(events, hold_after=3)
    async with serve(gated) as upstream:
        transport = AsyncCacheTransport("memory://", resume_window=30)
        async with httpx2.AsyncClient(
            transport=transport, base_url=upstream, timeout=30, headers=ALICE
        ) as client:
            producer = await client.send(
                client.build_request("POST", "/v1/responses", json=PAYLOAD), stream=True
            )
            assert producer.headers["x-sse-cache"] == "miss"
            held = b""
            async for chunk in producer.aiter_raw():
                held += chunk
                if len(blocks(held)) >= 2:
                    break
            held = b"".join(blocks(held)[:2])
            follower = await client.send(
                client.build_request("POST", "/v1/responses", json=PAYLOAD), stream=True
            )
            assert follower.headers["x-sse-cache"] == "shared"

            async def leave_while_it_pulls(cancel: Callable[[], object]) -> None:
                await gated.wait_sent(3)
                await producer.aclose()  # held: the follower pulls the upstream now
                await anyio.wait_all_tasks_blocked()
                cancel()
                # (A reader cancelled midway finishes its pull for the others: the next
                # chunk ends it.)
                gated.gate.set()

            if how == "anyio":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follower.aread)  # it reads on, waiting at the gate
                    await leave_while_it_pulls(tg.cancel_scope.cancel)
            else:
                reading = asyncio.ensure_future(follower.aread())
                await leave_while_it_pulls(reading.cancel)
                with pytest.raises(asyncio.CancelledError):
                    await reading
            await follower.aclose()
            response_id, n = last_sequence_number(held)
            params = {"stream": "true", "starting_after": str(n)}
            with anyio.fail_after(30):  # a deadlock guard, not a timing bound
                rest = await client.get(f"/v1/responses/{response_id}", params=params)
    # (Live still, or stored by then: either way, the rest of the one answer.)
    assert rest.status_code == 200 and rest.headers["x-sse-cache"] in ("shared", "hit")
    assert held + rest.content == gated.body
    assert gated.calls == 1


@pytest.mark.parametrize("when", ["live", "stored"])
async def test_a_stream_without_sequence_numbers_is_resumed_by_the_upstream(when: str) -> None:
    # The Responses API's streams before 2025-04 carried no sequence_number: a resume of one
    # by position (any starting_after, or none: all of it) was answered here with an empty
    # stream, as a hit or from the live stream (helper-109, the real 2025-03 recordings).
    # The cache cannot tell where such a client is: the upstream answers.
    from sse_cache import Event
    from sse_cache.asgi import CacheMiddleware
    from sse_cache.testing import responses_stream

    def unnumbered(event: Event) -> Event:
        fields = json.loads(event.data)
        del fields["sequence_number"]
        return Event(json.dumps(fields), event.event)

    events = [unnumbered(e) for e in responses_stream("legacy", text_deltas=6, summaries=0)]
    response_id = json.loads(events[0].data)["response"]["id"]
    live = when == "live"
    upstream = GatedUpstream(events, hold_after=3 if live else None)
    mw = CacheMiddleware(upstream, "memory://")
    request = json.dumps({"model": "m", "input": "legacy", "stream": True}).encode()
    resumes: list[tuple[dict[bytes, bytes], bytes]] = []
    async with anyio.create_task_group() as tg:
        if live:
            tg.start_soon(asgi_call, mw, "POST", "/v1/responses", b"", request)
            await upstream.wait_sent(3)  # (its response.created is recorded: it is indexed)
        else:
            head, _ = await asgi_call(mw, "POST", "/v1/responses", b"", request)
            assert head[b"x-sse-cache"] == b"miss"

        async def resume(query: bytes) -> None:
            resumes.append(await asgi_call(mw, "GET", f"/v1/responses/{response_id}", query, b""))

        for query in (b"stream=true&starting_after=1", b"stream=true"):
            tg.start_soon(resume, query)
        await anyio.wait_all_tasks_blocked()  # (live: the upstream holds their streams too)
        upstream.gate.set()
    for head, got in resumes:
        assert b"x-sse-cache" not in head  # the upstream's answer (here: its one stream)
        assert got == b"".join(upstream.pieces)
    assert upstream.calls == 3

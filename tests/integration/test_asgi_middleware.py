"""CacheMiddleware around small ASGI apps through httpx2's ASGI transport: generic SSE
routes, Last-Event-ID, body limits, custom tenants, and apps that misbehave."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import httpx2
import pytest

from asgi_calls import Answered, body_then, call, start_sse, stopped_when_the_client_leaves
from sse_cache import Event, SSEParser, serialize_sse
from sse_cache._asgi_io import INSTANT_SLICE_BYTES
from sse_cache.adapters import GenericSSE
from sse_cache.asgi import CacheMiddleware
from sse_cache.backends import MemoryBackend
from sse_cache.engine import SharedStreamAborted
from sse_cache.testing import GatedUpstream, NoticeLog, UpstreamCut

pytestmark = pytest.mark.anyio

EVENTS = [Event(f"chunk {i}", event="tick", id=str(i)) for i in range(6)]
SSE_HEAD = [(b"content-type", b"text/event-stream")]
DEADLOCK_GUARD = 30  # seconds: only a hung test reaches it


def events_app(*, status: int = 200, content_type: str = "text/event-stream") -> GatedUpstream:
    """Streams EVENTS as SSE (one body message per event); counts its calls."""
    return GatedUpstream(EVENTS, status=status, content_type=content_type)


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    clients: list[httpx2.AsyncClient] = []

    def make(app: Any) -> httpx2.AsyncClient:
        client = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app),
            base_url="http://t",
            headers={"authorization": "Bearer sk-test"},
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def events_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """A raw ASGI scope for ``POST /events`` from the test client's tenant."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/events",
        "raw_path": b"/events",
        "query_string": b"",
        "headers": [
            (b"authorization", b"Bearer sk-test"),
            (b"content-type", b"application/json"),
            *headers,
        ],
    }


def responses_request(prompt: str) -> tuple[dict[str, Any], bytes]:
    """A raw ASGI scope and body for a streamed ``POST /v1/responses`` of ``prompt`` from the
    test client's tenant (the middleware's default routes)."""
    scope = {**events_scope(), "path": "/v1/responses", "raw_path": b"/v1/responses"}
    return scope, json.dumps({"model": "m", "input": prompt, "stream": True}).encode()


#: A whole chat completion, as an app answers with a content-length.
DECLARED = json.dumps(
    {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ]
    }
).encode()
CHAT_REQUEST = json.dumps({"model": "m", "messages": [], "stream": False}).encode()


def chat_scope() -> dict[str, Any]:
    """:func:`events_scope` on the Chat Completions route."""
    scope = events_scope()
    scope["path"], scope["raw_path"] = "/v1/chat/completions", b"/v1/chat/completions"
    return scope


def declared_app(pieces: list[bytes], *, ends: bool = True, then: Exception | None = None) -> Any:
    """An app answering with :data:`DECLARED`'s content-length and the body ``pieces``, the
    last one ending the response unless not ``ends``; then raising ``then``, if given."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        length = b"%d" % len(DECLARED)
        head = [(b"content-type", b"application/json"), (b"content-length", length)]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for i, piece in enumerate(pieces):
            more = i < len(pieces) - 1 or not ends
            await send({"type": "http.response.body", "body": piece, "more_body": more})
        if then is not None:
            raise then

    return app


async def test_generic_route_and_last_event_id(client_for: Any) -> None:
    app = events_app()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE})
    client = client_for(mw)
    first = await client.post("/events", json={"q": 1})
    assert first.headers["x-sse-cache"] == "miss" and first.content == serialize_sse(EVENTS)
    assert app.bodies[-1] == b'{"q":1}'  # the app got the request body unchanged
    again = await client.post("/events", json={"q": 1})
    assert again.headers["x-sse-cache"] == "hit" and again.content == first.content
    resumed = await client.post("/events", json={"q": 1}, headers={"last-event-id": "3"})
    assert resumed.headers["x-sse-cache"] == "hit"
    assert resumed.content == serialize_sse(EVENTS[4:])
    unknown = await client.post("/events", json={"q": 1}, headers={"last-event-id": "nope"})
    assert unknown.content == serialize_sse(EVENTS)
    assert app.calls == 1


async def test_an_instant_hit_says_its_length_unless_it_may_have_no_body(
    client_for: Any,
) -> None:
    # All in memory, an instant hit says its length (no chunk framing: a cut one shows even
    # to an HTTP/1.0 client); a paced or Last-Event-ID one is sent as it is due, without. A
    # stored 204 says none: it has no body, and a 204 must not carry the header.
    mw = CacheMiddleware(events_app(), "memory://", routes={"/events": GenericSSE})
    client = client_for(mw)
    await client.post("/events", json={"q": 1})
    hit = await client.post("/events", json={"q": 1})
    assert hit.headers["x-sse-cache"] == "hit"
    assert hit.headers.get_list("content-length") == [str(len(hit.content))]
    for controls in ({"last-event-id": "3"}, {"x-sse-cache-replay": "0ms"}):
        later = await client.post("/events", json={"q": 1}, headers=controls)
        assert later.headers["x-sse-cache"] == "hit" and "content-length" not in later.headers
        # Sent over time: a proxy in front (nginx) must not hold it back (helper-101: a
        # paced hit had no x-accel-buffering, where a miss and its followers have it).
        assert later.headers["x-accel-buffering"] == "no"
    empty = CacheMiddleware(
        GatedUpstream(b"", status=204), "memory://", routes={"/events": GenericSSE}
    )
    client = client_for(empty)
    await client.post("/events", json={"q": 1})
    hit = await client.post("/events", json={"q": 1})
    assert (hit.status_code, hit.headers["x-sse-cache"]) == (204, "hit")
    assert "content-length" not in hit.headers


@pytest.mark.parametrize("size", [INSTANT_SLICE_BYTES, 3 * INSTANT_SLICE_BYTES + 5])
async def test_a_large_instant_hit_goes_out_a_slice_at_a_time(size: int) -> None:
    # The server copies each message into the connection's buffer, then waits for it to
    # drain: sent whole, every client that stopped reading held a copy of the answer for as
    # long as it kept its connection (helper-83: 20 of them, 560 MiB for a 30 MB answer).
    data = "x" * (size - len("data: \n\n"))
    mw = CacheMiddleware(GatedUpstream([Event(data)]), "memory://", routes={"/events": GenericSSE})
    body = b'{"q": 1}'
    await call(mw, events_scope(), body_then(body))  # the miss, stored
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await mw(events_scope(), body_then(body), send)
    assert dict(messages[0]["headers"])[b"x-sse-cache"] == b"hit"
    bodies = messages[1:]
    assert b"".join(m["body"] for m in bodies) == serialize_sse([Event(data)])
    assert all(len(m["body"]) <= INSTANT_SLICE_BYTES for m in bodies)
    assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
    assert len(bodies) == -(-size // INSTANT_SLICE_BYTES)  # no more messages than slices


async def test_a_last_event_id_resume_of_a_live_stream_does_not_say_the_whole_length(
    client_for: Any,
) -> None:
    # The upstream says its body's length; a reconnecting client (Last-Event-ID) joins its
    # live stream and is sent only what follows that event: the producer's content-length
    # (the whole body's) would declare bytes that never come (uvicorn's h11 then breaks the
    # response off: "Too little data for declared Content-Length").
    body = serialize_sse(EVENTS)
    held = anyio.Event()
    gate = anyio.Event()
    resumed_joined = anyio.Event()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for i, event in enumerate(EVENTS):
            if i == 3:
                held.set()
                await gate.wait()
            data = serialize_sse([event])
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def hook(notice: Any) -> None:
        if notice.kind == "resumed":
            resumed_joined.set()

    mw = CacheMiddleware(
        upstream, "memory://", routes={"/events": GenericSSE}, hooks=[hook], resume_window=30
    )
    client = client_for(mw)
    answers: dict[str, httpx2.Response] = {}

    async def ask(name: str, **headers: str) -> None:
        answers[name] = await client.post("/events", json={"q": 1}, headers=headers)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "producer")
        await held.wait()
        tg.start_soon(partial(ask, "resumed", **{"last-event-id": "1"}))
        await resumed_joined.wait()
        gate.set()
    producer, resumed = answers["producer"], answers["resumed"]
    assert producer.content == body
    assert resumed.headers["x-sse-cache"] == "shared"
    assert resumed.content == serialize_sse(EVENTS[2:])
    assert resumed.headers.get_list("content-length") in ([], [str(len(resumed.content))])


async def test_a_resume_whose_client_is_gone_before_its_head_leaves_its_place() -> None:
    # A resume by response id (no exchange owns its answer) whose client was gone before its
    # head went: the send raised before the answer's chunks were read, and they were never
    # closed — its place in the live stream stayed taken, and its upstream was read to the
    # end after the resume window (helper-122). Now it leaves at once.
    from flights_seen import FlightsSeen
    from sse_cache.testing import responses_stream

    pieces = responses_stream("resume me", text_deltas=6)
    gated = GatedUpstream(pieces, hold_after=4)
    seen = FlightsSeen()
    mw = CacheMiddleware(gated, "memory://", resume_window=30, hooks=[seen])
    scope, body = responses_request("resume me")
    left = anyio.Event()
    first = pieces[0]
    assert isinstance(first, Event)
    response_id = json.loads(first.data)["response"]["id"]

    async def gone(message: dict[str, Any]) -> None:
        raise OSError("the client is gone")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, scope, body_then(body, left.wait))
        await gated.wait_sent(4)
        left.set()  # (the producer's client leaves: the window reads on)
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            while not seen.live() or seen.live()[0].flight.producer_reading:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        resume = {
            **scope,
            "method": "GET",
            "path": f"/v1/responses/{response_id}",
            "raw_path": f"/v1/responses/{response_id}".encode(),
            "query_string": b"stream=true&starting_after=1",
        }
        with pytest.raises(OSError, match="gone"):
            await mw(resume, body_then(b""), gone)
        assert seen.followers() == 0
        gated.gate.set()


async def test_non_json_and_oversized_bodies_pass_through_as_bypass(client_for: Any) -> None:
    app = events_app()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, max_body_bytes=64)
    client = client_for(mw)
    r = await client.post("/events", content=b"not json")
    assert r.headers["x-sse-cache"] == "bypass" and app.bodies[-1] == b"not json"
    big = json.dumps({"x": "y" * 200}).encode()
    r = await client.post("/events", content=big)
    assert r.headers["x-sse-cache"] == "bypass" and app.bodies[-1] == big
    r = await client.post("/events", content=big)
    assert r.headers["x-sse-cache"] == "bypass" and app.calls == 3


@pytest.mark.parametrize(
    ("status", "content_type"),
    [(500, "text/event-stream"), (200, "text/plain"), (404, "application/json")],
)
async def test_responses_that_are_not_storable_are_passed_through(
    client_for: Any, status: int, content_type: str
) -> None:
    app = events_app(status=status, content_type=content_type)
    client = client_for(CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}))
    for _ in range(2):
        r = await client.post("/events", json={})
        assert r.status_code == status and r.headers["x-sse-cache"] == "miss"
        assert r.content == serialize_sse(EVENTS)
    assert app.calls == 2


async def test_custom_tenant_callable_and_shared_opt_in(client_for: Any) -> None:
    app = events_app()
    by_org = CacheMiddleware(
        app, "memory://", routes={"/events": GenericSSE}, tenant=lambda h: h.get("x-org", "")
    )
    client = client_for(by_org)
    await client.post("/events", json={}, headers={"x-org": "a", "authorization": "Bearer 1"})
    same_org = await client.post(
        "/events", json={}, headers={"x-org": "a", "authorization": "Bearer 2"}
    )
    other_org = await client.post("/events", json={}, headers={"x-org": "b"})
    assert same_org.headers["x-sse-cache"] == "hit" and other_org.headers["x-sse-cache"] == "miss"
    # Callers the callable cannot place (it returns "") do not share one scope: each is
    # answered by the app, never from another's entry.
    for _ in range(2):
        anonymous = await client.post("/events", json={})
        assert anonymous.headers["x-sse-cache"] == "bypass"
    assert app.calls == 4

    routes = {"/events": GenericSSE}
    shared = CacheMiddleware(events_app(), "memory://", routes=routes, tenant="shared")
    client = client_for(shared)
    await client.post("/events", json={}, headers={"authorization": "Bearer 1"})
    r = await client.post("/events", json={}, headers={"authorization": "Bearer 2"})
    assert r.headers["x-sse-cache"] == "hit"


async def test_a_follower_gets_what_describes_the_body_never_the_producers_own_headers() -> None:
    # With tenant="shared", a follower of a live stream is another tenant: it got the whole
    # head the upstream sent the producer's caller (helper-80: its session cookie, its
    # organisation). It now gets what a hit would: the body's own headers.
    head = [
        (b"content-type", b"text/event-stream"),
        (b"set-cookie", b"__session=alice"),
        (b"openai-organization", b"org-alice"),
        (b"x-request-id", b"req-alice"),
        (b"x-accel-buffering", b"no"),
        (b"retry-after", b"20"),  # (what a client acts on: a 429's, shared by its flight too)
    ]
    gate = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    log = NoticeLog()
    mw = CacheMiddleware(
        app, "memory://", routes={"/events": GenericSSE}, tenant="shared", hooks=[log]
    )
    answers: dict[bytes, Answered] = {}

    async def ask(credential: bytes) -> None:
        scope = events_scope()
        scope["headers"] = [(b"authorization", credential)]
        answers[credential] = await call(mw, scope, body_then(b"{}"))

    with anyio.fail_after(30):  # a deadlock guard, not a timing bound
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, b"Bearer alice")
            tg.start_soon(ask, b"Bearer bob")
            await log.wait("shared")  # one follows the other's live stream
            gate.set()
    statuses = {a.headers[b"x-sse-cache"]: a for a in answers.values()}
    producer, follower = statuses[b"miss"], statuses[b"shared"]
    assert producer.body == follower.body == b"data: 1\n\ndata: 2\n\n"
    assert producer.headers[b"set-cookie"] == b"__session=alice"  # its own caller's
    for own in (b"set-cookie", b"openai-organization", b"x-request-id"):
        assert own not in follower.headers
    assert follower.headers[b"content-type"] == b"text/event-stream"
    assert follower.headers[b"x-accel-buffering"] == b"no"
    assert follower.headers[b"retry-after"] == b"20"


@pytest.mark.parametrize("tenant", ["shared", "callable"])
async def test_an_error_to_one_callers_credentials_is_not_shared_under_a_wider_scope(
    tenant: str,
) -> None:
    # Under a scope that is not the credentials, a request sent with a bad key was the
    # producer of its live stream, and every identical request of other callers joining it
    # got its 401 — the upstream's text naming the rejected key (helper-106). They ask for
    # themselves now: one of them leads, the other follows it, and both get their answer.
    gate = anyio.Event()
    callers: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        caller = dict(scope["headers"])[b"authorization"]
        callers.append(caller)
        await gate.wait()
        if caller == b"Bearer sk-bad":
            head = [(b"content-type", b"application/json")]
            body = b'{"error": {"message": "Incorrect API key provided: sk-bad"}}'
            await send({"type": "http.response.start", "status": 401, "headers": head})
            await send({"type": "http.response.body", "body": body})
            return
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"data: answered to " + caller + b"\n\n"})

    log = NoticeLog()
    mw = CacheMiddleware(
        app,
        "memory://",
        routes={"/events": GenericSSE},
        tenant="shared" if tenant == "shared" else (lambda headers: "org-1"),
        hooks=[log],
    )
    answers: dict[bytes, Answered] = {}

    async def ask(caller: bytes) -> None:
        scope = events_scope()
        scope["headers"] = [(b"authorization", caller), (b"content-type", b"application/json")]
        answers[caller] = await call(mw, scope, body_then(b"{}"))

    with anyio.fail_after(30):  # a deadlock guard, not a timing bound
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, b"Bearer sk-bad")
            await log.wait("miss")  # its request is at the upstream
            tg.start_soon(ask, b"Bearer sk-good-1")
            tg.start_soon(ask, b"Bearer sk-good-2")
            await anyio.wait_all_tasks_blocked()  # both wait for its answer
            gate.set()
    assert answers[b"Bearer sk-bad"].status == 401
    good = [answers[b"Bearer sk-good-1"], answers[b"Bearer sk-good-2"]]
    assert [answer.status for answer in good] == [200, 200]
    assert good[0].body == good[1].body and good[0].body.startswith(b"data: answered to ")
    assert sorted(answer.headers[b"x-sse-cache"] for answer in good) == [b"miss", b"shared"]
    assert len(callers) == 2


async def test_a_partial_answer_206_is_neither_shared_nor_stored() -> None:
    # A 206 is the part of an answer a request's Range asked for: the identical request
    # without that Range (Range is not keyed) must get the whole, never the part as a
    # complete 200-like answer, from the live stream or from the cache.
    gate = anyio.Event()
    ranges: list[bytes | None] = []
    whole = b"data: 1\n\ndata: 2\n\ndata: 3\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        asked = dict(scope["headers"]).get(b"range")
        ranges.append(asked)
        await gate.wait()
        head = [(b"content-type", b"text/event-stream")]
        status, body = (206, whole[:9]) if asked else (200, whole)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    log = NoticeLog()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, hooks=[log])
    answers: dict[str, Answered] = {}

    async def ask(name: str, extra: list[tuple[bytes, bytes]]) -> None:
        scope = events_scope()
        scope["headers"] = [(b"authorization", b"Bearer k"), *extra]
        answers[name] = await call(mw, scope, body_then(b"{}"))

    with anyio.fail_after(30):  # a deadlock guard, not a timing bound
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "part", [(b"range", b"bytes=0-8")])
            await log.wait("miss")  # its request is at the upstream
            tg.start_soon(ask, "whole", [])
            await anyio.wait_all_tasks_blocked()  # it waits for the live stream's head
            gate.set()
        await ask("again", [])
    assert (answers["part"].status, answers["part"].body) == (206, whole[:9])
    # The follower was told nothing of the part, and asked for itself.
    assert (answers["whole"].status, answers["whole"].body) == (200, whole)
    assert (answers["again"].status, answers["again"].body) == (200, whole)
    assert answers["again"].headers[b"x-sse-cache"] == b"hit"
    assert ranges == [b"bytes=0-8", None]
    # The part alone, in a cache of its own: answered, never stored.
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, hooks=[log])
    await ask("part alone", [(b"range", b"bytes=0-8")])
    await ask("whole after", [])
    assert answers["part alone"].status == 206
    assert answers["whole after"].headers[b"x-sse-cache"] == b"miss"
    assert answers["whole after"].body == whole


async def test_a_repeated_credential_header_scopes_the_entry_by_every_line() -> None:
    # A request may carry a header line twice (a client's and a gateway's credential): the
    # entry's tenant is all of them, as joined by the request, never the first or the last.
    app = events_app()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE})

    async def ask(*credentials: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        scope = events_scope(*((b"authorization", c) for c in credentials))
        scope["headers"] = scope["headers"][1:]  # only the credentials asked for
        head: dict[bytes, bytes] = {}
        body = bytearray()
        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                head.update(message["headers"])
            else:
                body.extend(message.get("body", b""))

        await mw(scope, body_then(b'{"q": "twice"}', anyio.Event().wait), send)
        return status, head, bytes(body)

    first = await ask(b"Bearer a", b"Bearer b")
    assert first[0] == 200 and first[1][b"x-sse-cache"] == b"miss"
    for others in ((b"Bearer a", b"Bearer c"), (b"Bearer c", b"Bearer b"), (b"Bearer a",)):
        assert (await ask(*others))[1][b"x-sse-cache"] == b"miss", others
    _, head, body = await ask(b"Bearer a", b"Bearer b")
    assert head[b"x-sse-cache"] == b"hit" and body == serialize_sse(EVENTS)
    assert app.calls == 4


async def test_app_failing_mid_stream_stores_nothing(client_for: Any) -> None:
    broken = GatedUpstream(EVENTS, cut_after=2)  # two events, then the app raises
    client = client_for(CacheMiddleware(broken, "memory://", routes={"/events": GenericSSE}))
    for _ in range(2):
        with pytest.raises(UpstreamCut):
            await client.post("/events", json={})
    assert broken.calls == 2


async def test_other_methods_and_paths_are_untouched(client_for: Any) -> None:
    app = events_app()
    client = client_for(CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}))
    r = await client.get("/events")
    assert "x-sse-cache" not in r.headers and app.calls == 1


async def test_requests_without_a_credential_are_not_cached_by_default(client_for: Any) -> None:
    app = events_app()
    client = client_for(CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}))
    del client.headers["authorization"]
    for _ in range(2):
        r = await client.post("/events", json={"q": 1})
        assert r.headers["x-sse-cache"] == "bypass" and "x-sse-cache-key" not in r.headers
    assert app.calls == 2


async def test_ignored_fields_are_part_of_the_key(client_for: Any) -> None:
    app = events_app()
    client = client_for(CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}))
    plain = await client.post("/events", json={"q": 1})
    # Another body that asks to ignore its extra field must not land on (or poison) the
    # entry of the plain request.
    other = await client.post(
        "/events",
        json={"q": 1, "temperature": 1.9},
        headers={"x-sse-cache-ignore-fields": "temperature"},
    )
    assert other.headers["x-sse-cache"] == "miss"
    assert other.headers["x-sse-cache-key"] != plain.headers["x-sse-cache-key"]
    again = await client.post(
        "/events",
        json={"q": 1, "temperature": 0.1},
        headers={"x-sse-cache-ignore-fields": "temperature"},
    )
    assert again.headers["x-sse-cache"] == "hit"


async def test_paced_hit_stops_when_the_client_leaves(client_for: Any) -> None:
    mw = CacheMiddleware(events_app(), "memory://", routes={"/events": GenericSSE})
    first = await client_for(mw).post("/events", json={"q": "paced"})
    assert first.headers["x-sse-cache"] == "miss"

    # The same request, replayed at 200 ms per event, from a client that leaves as soon as
    # the first event arrives.
    left = anyio.Event()
    bodies: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert dict(message["headers"])[b"x-sse-cache"] == b"hit"
        elif message.get("body"):
            bodies.append(message["body"])
            left.set()

    scope = events_scope((b"x-sse-cache-replay", b"200ms"))
    with anyio.fail_after(5):
        await mw(scope, body_then(b'{"q": "paced"}', left.wait), send)
    # Before the fix the replay paced all six events into the closed connection.
    assert 1 <= len(bodies) < len(EVENTS)


async def test_decoded_cache_can_be_sized_or_turned_off(client_for: Any) -> None:
    # Kept: the form an HTTP hit replays (its SSE bytes).
    for size, kept in ((0, 0), (64 * 1024 * 1024, 1)):
        mw = CacheMiddleware(
            events_app(), "memory://", routes={"/events": GenericSSE}, decoded_cache_bytes=size
        )
        client = client_for(mw)
        await client.post("/events", json={"q": "sized"})
        hit = await client.post("/events", json={"q": "sized"})
        assert hit.headers["x-sse-cache"] == "hit" and hit.content == serialize_sse(EVENTS)
        cache = next(iter(mw.service._caches.values()))
        assert len(cache.decoded) == kept


async def test_a_failing_send_during_a_hit_raises_as_itself(client_for: Any) -> None:
    # Servers match on the error type (a reset connection is an OSError): the replay's own
    # machinery must not wrap it.
    mw = CacheMiddleware(events_app(), "memory://", routes={"/events": GenericSSE})
    await client_for(mw).post("/events", json={"q": "reset"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("connection reset by peer")

    with pytest.raises(OSError, match="connection reset"):
        await mw(events_scope(), body_then(b'{"q": "reset"}', anyio.sleep_forever), send)


async def test_a_request_body_that_is_a_buffer_but_not_bytes_is_keyed_as_its_bytes(
    client_for: Any,
) -> None:
    # ASGI says bytes; a server may hand a memoryview or a bytearray. The body is keyed as
    # its bytes: the request is a hit of the same request sent as bytes.
    mw = CacheMiddleware(events_app(), "memory://", routes={"/events": GenericSSE})
    await client_for(mw).post("/events", content=b'{"q": "buffer"}')
    for body in (memoryview(b'{"q": "buffer"}'), bytearray(b'{"q": "buffer"}')):
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        await mw(events_scope(), body_then(body, anyio.sleep_forever), send)  # type: ignore[arg-type]
        start = dict(sent[0]["headers"])
        assert (sent[0]["status"], start[b"x-sse-cache"]) == (200, b"hit"), type(body)
        assert b"".join(m.get("body", b"") for m in sent[1:]) == serialize_sse(EVENTS)


async def test_a_miss_whose_task_group_fails_to_open_ends_its_flight(
    client_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The middleware enters the exchange (a live flight that identical requests join) before
    # it opens the task group a miss runs in. If opening it fails, the exchange must still be
    # left, failed: otherwise the flight never ends and the next identical request waits on
    # it for ever.
    import sse_cache.asgi as asgi_module

    real_task_group = asgi_module.task_group
    failures = [MemoryError("no room for a task group")]

    def task_group() -> Any:
        if failures:
            raise failures.pop()
        return real_task_group()

    monkeypatch.setattr(asgi_module, "task_group", task_group)
    app = events_app()
    client = client_for(CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}))
    with pytest.raises(MemoryError):
        await client.post("/events", json={"q": "flight"})
    with anyio.fail_after(10):  # joined a flight that never ends: a hang, not an answer
        again = await client.post("/events", json={"q": "flight"})
    assert again.headers["x-sse-cache"] == "miss"
    assert again.content == serialize_sse(EVENTS) and app.calls == 1
    third = await client.post("/events", json={"q": "flight"})
    assert third.headers["x-sse-cache"] == "hit" and third.content == again.content


async def test_a_tenant_callable_returning_a_non_string_bypasses_and_is_logged_not_a_400(
    client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A wrong tenant callable is the server's misconfiguration: never answered 400
    # invalid_request_error (which blames the client), but logged, and the request forwarded
    # uncached.
    app = events_app()
    mw = CacheMiddleware(
        app,
        "memory://",
        routes={"/events": GenericSSE},
        tenant=lambda headers: 42,  # type: ignore[arg-type,return-value]
    )
    client = client_for(mw)
    with caplog.at_level("WARNING", logger="sse_cache"):
        first = await client.post("/events", json={"q": "tenant"})
        second = await client.post("/events", json={"q": "tenant"})
    for response in (first, second):
        assert response.status_code == 200, response.text
        assert response.headers["x-sse-cache"] == "bypass"
        assert response.content == serialize_sse(EVENTS)
    assert app.calls == 2  # not cached
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("tenant callable" in w and "returned 42" in w for w in warnings), warnings


def _chat_piece(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + json.dumps({**chunk, "choices": [choice]}).encode() + b"\n\n"


async def test_every_reader_leaving_after_the_completing_event_has_the_answer_stored() -> None:
    # The producer's client and a follower each stop at chat's `data: [DONE]` and leave (as
    # the SDKs do) while the app has not ended its body: the last to leave stops the app.
    # What they both had is the whole answer: stored, as for a client that leaves alone
    # after it (it was failed: "every reader left before the stream ended").
    pieces = [_chat_piece("Hel"), _chat_piece("lo"), _chat_piece("", "stop"), b"data: [DONE]\n\n"]
    whole = b"".join(pieces)
    app = GatedUpstream(pieces, hold_after=len(pieces))
    mw = CacheMiddleware(app, "memory://")
    request = json.dumps({"model": "m", "messages": [], "stream": True}).encode()

    def chat_scope() -> dict[str, Any]:
        scope = events_scope()
        scope["path"], scope["raw_path"] = "/v1/chat/completions", b"/v1/chat/completions"
        return scope

    async def ask(headed: anyio.Event | None = None) -> tuple[dict[bytes, bytes], bytes]:
        head: dict[bytes, bytes] = {}
        got = bytearray()
        done = anyio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                head.update(message["headers"])
                if headed is not None:
                    headed.set()
            else:
                got.extend(message.get("body", b""))
                if got.endswith(b"data: [DONE]\n\n"):
                    done.set()  # the client stops here, and leaves

        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            await mw(chat_scope(), body_then(request, done.wait), send)
        return head, bytes(got)

    answers: list[tuple[dict[bytes, bytes], bytes]] = []

    async def keep(headed: anyio.Event | None = None) -> None:
        answers.append(await ask(headed))

    async with anyio.create_task_group() as tg:
        headed = anyio.Event()
        tg.start_soon(keep, headed)
        await headed.wait()  # the producer has its head: the next request follows it
        tg.start_soon(keep)
    assert sorted(head[b"x-sse-cache"] for head, _ in answers) == [b"miss", b"shared"]
    assert [got for _, got in answers] == [whole, whole]
    head, got = await ask()
    assert head[b"x-sse-cache"] == b"hit" and got == whole
    app.gate.set()
    assert app.calls == 1


class _WritesSeen(MemoryBackend):
    """A memory backend that notes, as each entry write is made, what the client has been
    sent by then (``sent``: the client's ASGI messages, kept by the test)."""

    def __init__(self, sent: list[dict[str, Any]]) -> None:
        super().__init__()
        self._sent = sent
        self.at_write: list[list[dict[str, Any]]] = []

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        # A write takes a while (a disk, a network): every other task runs meanwhile.
        await anyio.wait_all_tasks_blocked()
        self.at_write.append(list(self._sent))
        await super().set(key, value, ttl)


def _whole_for_the_client(sent: list[dict[str, Any]]) -> bool:
    """The response's messages so far make a whole response: its declared length reached,
    or (chunked) its end sent."""
    head = dict(sent[0]["headers"]) if sent else {}
    got = sum(len(m.get("body", b"")) for m in sent[1:])
    if b"content-length" in head:
        return got >= int(head[b"content-length"])
    return any(not m.get("more_body", False) for m in sent[1:])


@pytest.mark.parametrize(
    ("framing", "pieces"),
    [
        ("sse", 3),  # chunked: the last (empty) chunk ends it
        ("json", 1),  # one message with its length
        ("json", 3),  # ... in three, the last one empty
    ],
)
async def test_a_miss_ends_for_its_client_only_once_its_answer_is_stored(
    framing: str, pieces: int
) -> None:
    # Read-your-writes: a client that has its whole answer and asks again at once finds it
    # stored. With a content-length, the bytes completing it end the response for the
    # client, whatever end message follows: they went out before the store, and a client
    # asking again right away (another worker) missed in 13 of 30 (helper-73).
    if framing == "sse":
        body = b"".join([_chat_piece("Hel"), _chat_piece("lo", "stop"), b"data: [DONE]\n\n"])
        media, streams = b"text/event-stream", True
    else:
        message = {"role": "assistant", "content": "Hello"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = json.dumps({"id": "c1", "object": "chat.completion", "choices": [choice]}).encode()
        media, streams = b"application/json", False
    half = len(body) // 2
    split = [body[:half], body[half:], b""] if pieces > 1 else [body]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        head = [(b"content-type", media)]
        if framing == "json":
            head.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for i, piece in enumerate(split):
            last = i == len(split) - 1
            await send({"type": "http.response.body", "body": piece, "more_body": not last})

    sent: list[dict[str, Any]] = []
    backend = _WritesSeen(sent)
    mw = CacheMiddleware(app, backend)
    scope = chat_scope()
    payload = json.dumps({"model": "m", "messages": [], "stream": streams}).encode()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mw(scope, body_then(payload, anyio.sleep_forever), send)
    assert backend.at_write, "nothing was stored"
    assert not _whole_for_the_client(backend.at_write[0]), backend.at_write[0]
    assert _whole_for_the_client(sent) and not sent[-1].get("more_body", False)
    assert b"".join(m.get("body", b"") for m in sent[1:]) == body
    assert dict(sent[0]["headers"])[b"x-sse-cache"] == b"miss"


@pytest.mark.parametrize("after", [b"", b": keep-alive\n\n", b": keep-al", b": x\r\ndata: {"])
@pytest.mark.parametrize("stop_at", ["finish", "done"])
async def test_followers_reading_on_end_with_the_completing_event_not_the_apps_body(
    after: bytes, stop_at: str
) -> None:
    # The producer's client leaves before the completing event while a follower reads: the
    # app goes on for it. `[DONE]` completes the answer: the follower's stream ends with it,
    # stored, and the app is stopped — not when the app ends its body, which here it never
    # does (it ended only then, as the transports' followers did before helper-69's fix).
    # What the app sent after it in the same piece (`after`) is no part of the answer: the
    # follower got it, and the entry did not hold it (helper-105). Or the client has `[DONE]`
    # and leaves then (``stop_at="done"``), the follower having joined before it came: the
    # same (helper-111: the follower got `after`, which no hit replays).
    pieces = [_chat_piece("Hel"), _chat_piece("lo"), _chat_piece("", "stop"), b"data: [DONE]\n\n"]
    whole = b"".join(pieces)
    pieces[-1] += after
    done, sent, stopped = anyio.Event(), anyio.Event(), anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await start_sse(receive, send, pieces[:-1])
        async with stopped_when_the_client_leaves(receive):
            await done.wait()
            await send({"type": "http.response.body", "body": pieces[-1], "more_body": True})
            sent.set()  # (delivered to the producer's client)
            try:
                await anyio.sleep_forever()  # the body's end never comes
            finally:
                stopped.set()

    log = NoticeLog()
    mw = CacheMiddleware(app, "memory://", hooks=[log])
    request = json.dumps({"model": "m", "messages": [], "stream": True}).encode()

    def chat_scope() -> dict[str, Any]:
        scope = events_scope()
        scope["path"], scope["raw_path"] = "/v1/chat/completions", b"/v1/chat/completions"
        return scope

    async def ask(leave: Callable[[], Awaitable[object]]) -> tuple[dict[bytes, bytes], bytes]:
        answered = await call(mw, chat_scope(), body_then(request, leave))
        return answered.headers, answered.body

    answers: list[tuple[dict[bytes, bytes], bytes]] = []

    async def follow() -> None:
        answers.append(await ask(anyio.sleep_forever))

    with anyio.fail_after(30):  # a deadlock guard: without the fix, the follower never ends
        async with anyio.create_task_group() as tg:
            left = anyio.Event()

            async def leave() -> None:
                await log.wait("shared")  # a follower reads the producer's stream
                if stop_at == "done":
                    done.set()
                    await sent.wait()
                left.set()

            async def produce() -> None:
                await ask(leave)  # its client leaves once the follower joined

            tg.start_soon(produce)
            await log.wait("miss")  # the producer is on its way to the app
            tg.start_soon(follow)
            await left.wait()
            await anyio.wait_all_tasks_blocked()  # the middleware has seen the client leave
            done.set()
        await stopped.wait()
    assert [(head[b"x-sse-cache"], got) for head, got in answers] == [(b"shared", whole)]
    head, got = await ask(anyio.sleep_forever)
    assert head[b"x-sse-cache"] == b"hit" and got == whole


@pytest.mark.parametrize("framing", ["json", "sse"])
async def test_work_the_app_does_after_a_whole_answer_does_not_hold_the_clients_end(
    framing: str,
) -> None:
    # Starlette's background tasks run after the response's last body message, within the
    # app's call. A whole answer (all of its declared length, or chat's [DONE] after its
    # finish_reason) is stored and ended then; it used to end only once the app returned
    # (helper-74: a JSON answer's last byte came 2 s late, behind a background task).
    if framing == "sse":
        pieces = [_chat_piece("Hel"), _chat_piece("lo", "stop"), b"data: [DONE]\n\n"]
        head = [(b"content-type", b"text/event-stream")]
        streams = True
    else:
        message = {"role": "assistant", "content": "Hello"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = json.dumps({"id": "c1", "object": "chat.completion", "choices": [choice]}).encode()
        pieces = [body[:10], body[10:]]
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        streams = False
    background = anyio.Event()
    app_returned = False

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal app_returned
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for i, piece in enumerate(pieces):
            more = i < len(pieces) - 1
            await send({"type": "http.response.body", "body": piece, "more_body": more})
        await background.wait()  # a background task, after the response
        app_returned = True

    mw = CacheMiddleware(app, "memory://")
    request = json.dumps({"model": "m", "messages": [], "stream": streams}).encode()
    scope = chat_scope()

    async def ask(ended: anyio.Event) -> tuple[dict[bytes, bytes], bytes]:
        got_head: dict[bytes, bytes] = {}
        got = bytearray()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                got_head.update(message["headers"])
                return
            got.extend(message.get("body", b""))
            if not message.get("more_body", False):
                ended.set()

        await mw(dict(scope), body_then(request, anyio.sleep_forever), send)
        return got_head, bytes(got)

    whole = b"".join(pieces)
    with anyio.fail_after(30):  # a deadlock guard: the end came only once the app returned
        async with anyio.create_task_group() as tg:
            first_ended = anyio.Event()
            tg.start_soon(ask, first_ended)
            await first_ended.wait()  # the client has its whole answer ...
            assert not app_returned  # ... while the app works on
            again, got = await ask(anyio.Event())  # asked again at once: stored
            assert again[b"x-sse-cache"] == b"hit" and got == whole
            background.set()


@pytest.mark.parametrize("excess", ["after", "within"])
async def test_an_app_sending_more_than_its_length_is_passed_on_as_sent_and_not_stored(
    excess: str,
) -> None:
    # The byte completing a declared length is held until the answer is stored. An app that
    # then sends more broke its own length: its bytes go on in the order it sent them (the
    # server refuses the excess), and nothing is stored. They were reordered (helper-74:
    # "hell" + "X" + "o"), and the excess recorded: the stored hit was longer than declared.
    sends = [DECLARED, b"X"] if excess == "after" else [DECLARED + b"X"]
    mw = CacheMiddleware(declared_app(sends), "memory://")
    scope, request = chat_scope(), CHAT_REQUEST
    got = bytearray()

    async def send(message: dict[str, Any]) -> None:
        got.extend(message.get("body", b""))

    await mw(dict(scope), body_then(request, anyio.sleep_forever), send)
    assert bytes(got) == b"".join(sends)
    got.clear()
    await mw(dict(scope), body_then(request, anyio.sleep_forever), send)
    assert bytes(got) == b"".join(sends)  # the app again: nothing was stored


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (uvicorn)
async def test_an_app_ending_its_body_short_of_its_length_is_a_cut_not_an_answer(
    serve: Any, anyio_backend: str
) -> None:
    # A whole chat stream, [DONE] included, under a content-length 50 bytes longer. uvicorn
    # alone fails the end and closes the connection: the client sees a cut. Behind the
    # middleware the failed end was swallowed: the answer was stored, and the client waited
    # for the 50 bytes until its own timeout (helper-165).
    answer = (
        b"".join(
            b"data: " + json.dumps(chunk).encode() + b"\n\n"
            for chunk in (
                {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            )
        )
        + b"data: [DONE]\n\n"
    )
    calls = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal calls
        if scope["type"] != "http":
            return
        calls += 1
        while (await receive()).get("more_body"):
            pass
        head = [
            (b"content-type", b"text/event-stream"),
            (b"content-length", b"%d" % (len(answer) + 50)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": answer})

    mw = CacheMiddleware(app, "memory://")
    request = {"model": "m", "messages": [], "stream": True}
    async with serve(mw) as url, httpx2.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(2):  # the second: the app again, nothing was stored
            with anyio.fail_after(DEADLOCK_GUARD):
                async with client.stream(
                    "POST", "/v1/chat/completions", json=request, headers={"authorization": "k"}
                ) as response:
                    assert response.headers["x-sse-cache"] == "miss"
                    got = b""
                    with pytest.raises(httpx2.RemoteProtocolError):
                        async for chunk in response.aiter_raw():
                            got += chunk
                    assert got == answer
    await mw.aclose()
    assert calls == 2


@pytest.mark.parametrize("then", ["returns", "raises"])
async def test_an_app_that_never_ends_its_declared_length_still_has_all_of_it_sent(
    then: str,
) -> None:
    # The byte completing a declared length is held until the app's final body message.
    # An app that sends its whole length, then returns (or raises) without that message
    # broke ASGI, but its client had every byte of it without the middleware (uvicorn then
    # closes the connection): it must not lose the byte held (helper-74: one byte short).
    # Nothing is stored: the response never ended.
    failure = RuntimeError("the app failed after its body") if then == "raises" else None
    mw = CacheMiddleware(declared_app([DECLARED], ends=False, then=failure), "memory://")
    scope, request = chat_scope(), CHAT_REQUEST
    got: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        got.append(message)

    for _ in range(2):  # the second: the app again, nothing was stored
        got.clear()
        if then == "raises":
            with pytest.raises(RuntimeError, match="after its body"):
                await mw(dict(scope), body_then(request, anyio.sleep_forever), send)
        else:
            await mw(dict(scope), body_then(request, anyio.sleep_forever), send)
        assert b"".join(m.get("body", b"") for m in got[1:]) == DECLARED
        assert dict(got[0]["headers"])[b"x-sse-cache"] == b"miss"
        assert all(m.get("more_body") for m in got[1:])  # never ended by the middleware


async def test_a_client_gone_at_the_held_byte_after_the_app_raised_takes_no_background_slot() -> (
    None
):
    # The byte held for the end goes out after the app is done; a client found gone then
    # was handed to the background (finish_on_disconnect), whose count the app's end had
    # given back already: each such request took a slot for good, and after max_background
    # of them no stream was finished in the background any more (helper-85).
    failure = RuntimeError("the app failed after its body")
    app = declared_app([DECLARED], ends=False, then=failure)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body") == DECLARED[-1:]:
            raise OSError("the client is gone")  # only at the held byte

    mw = CacheMiddleware(app, "memory://", finish_on_disconnect=True, single_flight=False)
    with pytest.raises(RuntimeError, match="after its body"):
        await mw(chat_scope(), body_then(CHAT_REQUEST), send)
    assert mw.slots.taken == 0  # (the slots finish_on_disconnect and resume windows take)


async def test_a_completing_event_that_does_not_complete_is_judged_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Gemini with two candidates: the first finishes in a chunk of its own (a completing
    # event) while the second streams on. The producer's client has left and a follower
    # reads on: the recording was judged whole at every chunk after that one, each time
    # checking every event (helper-76: 4,000 chunks blocked the event loop for 16 s).
    from sse_cache.adapters import GeminiGenerateContent

    checks: list[int] = []
    real_verify = GeminiGenerateContent.verify

    def counted(self: GeminiGenerateContent, events: Any) -> Any:
        checks.append(len(events))
        return real_verify(self, events)

    monkeypatch.setattr(GeminiGenerateContent, "verify", counted)

    def chunk(*candidates: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps({"candidates": list(candidates)}).encode() + b"\r\n\r\n"

    def said(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": index,
            "content": {"role": "model", "parts": [{"text": text}]},
        }
        return {**out, "finishReason": finish} if finish else out

    pieces = [chunk(said(0, "a"), said(1, "b")), chunk(said(0, "end", "STOP"))]
    pieces += [chunk(said(1, f"{i} ")) for i in range(200)] + [chunk(said(1, "end", "STOP"))]
    log = NoticeLog()
    producer_left = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await start_sse(receive, send, pieces[:1])
        async with stopped_when_the_client_leaves(receive):
            await producer_left.wait()
            for i, piece in enumerate(pieces[1:], start=1):
                more = i < len(pieces) - 1
                await send({"type": "http.response.body", "body": piece, "more_body": more})

    mw = CacheMiddleware(app, "memory://", hooks=[log])
    path = "/v1beta/models/m:streamGenerateContent"
    request = json.dumps({"contents": [], "generationConfig": {"candidateCount": 2}}).encode()

    async def ask(leave: Callable[[], Awaitable[object]]) -> tuple[bytes, bytes]:
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"alt=sse",
            "headers": [(b"x-goog-api-key", b"k"), (b"content-type", b"application/json")],
        }
        answered = await call(mw, scope, body_then(request, leave))
        return answered.headers[b"x-sse-cache"], answered.body

    answers: list[tuple[bytes, bytes]] = []

    async def follow() -> None:
        answers.append(await ask(anyio.sleep_forever))

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            joined = anyio.Event()

            async def leave() -> None:
                await log.wait("shared")
                joined.set()

            async def produce() -> None:
                await ask(leave)

            tg.start_soon(produce)
            await log.wait("miss")
            tg.start_soon(follow)
            await joined.wait()
            await anyio.wait_all_tasks_blocked()  # the middleware has seen the client leave
            producer_left.set()
    assert answers == [(b"shared", b"".join(pieces))]
    assert len(checks) <= 3, checks  # once per completing event (and the store's own)


async def test_a_follower_ends_only_once_the_answer_is_stored() -> None:
    # Read-your-writes for followers too: a follower's client asking again at once (on
    # another worker, sharing the backend) must find the answer stored. The followers'
    # streams ended before the store (helper-76: a miss, and a second upstream call).
    pieces = [_chat_piece("Hel"), _chat_piece("lo", "stop"), b"data: [DONE]\n\n"]
    app = GatedUpstream(pieces, hold_after=1)
    follower_sent: list[dict[str, Any]] = []
    backend = _WritesSeen(follower_sent)
    log = NoticeLog()
    mw = CacheMiddleware(app, backend, hooks=[log])
    request = json.dumps({"model": "m", "messages": [], "stream": True}).encode()

    def chat_scope() -> dict[str, Any]:
        scope = events_scope()
        scope["path"], scope["raw_path"] = "/v1/chat/completions", b"/v1/chat/completions"
        return scope

    async def producer_send(message: dict[str, Any]) -> None:
        pass

    async def follower_send(message: dict[str, Any]) -> None:
        follower_sent.append(message)

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, chat_scope(), body_then(request, anyio.sleep_forever), producer_send)
            await app.wait_sent(1)
            tg.start_soon(mw, chat_scope(), body_then(request, anyio.sleep_forever), follower_send)
            await log.wait("shared")
            app.gate.set()
    assert backend.at_write, "nothing was stored"
    assert not _whole_for_the_client(backend.at_write[0]), backend.at_write[0]
    assert dict(follower_sent[0]["headers"])[b"x-sse-cache"] == b"shared"
    assert _whole_for_the_client(follower_sent)
    assert b"".join(m.get("body", b"") for m in follower_sent[1:]) == b"".join(pieces)


@pytest.mark.parametrize("followers", [1, 0])
async def test_a_client_leaving_with_the_whole_answer_ends_it_for_all_before_the_app_stops(
    followers: int,
) -> None:
    # The producer's client closes at chat's [DONE] (the SDKs do), before the app ends its
    # body; the app learns it but goes on (a sync generator in a thread stops only at its
    # upstream's next chunk). The answer is whole: stored, and the followers' streams end,
    # now — they waited for the app (helper-77: 3.2 s, the upstream's end). Alone, with
    # finish_on_disconnect, it was finished in the background and stored only then.
    pieces = [_chat_piece("Hel"), _chat_piece("lo", "stop"), b"data: [DONE]\n\n"]
    whole = b"".join(pieces)
    follower_in = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await start_sse(receive, send, pieces[:1])
        if followers:
            await follower_in.wait()
        for piece in pieces[1:]:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        await anyio.sleep_forever()  # it learnt its client left, and goes on

    log = NoticeLog()
    mw = CacheMiddleware(app, "memory://", hooks=[log], finish_on_disconnect=not followers)
    request = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    scope = chat_scope()
    answers: list[Answered] = []
    producer_got = bytearray()
    producer_done = anyio.Event()

    async def producer_send(message: dict[str, Any]) -> None:
        producer_got.extend(message.get("body", b""))
        if producer_got.endswith(b"data: [DONE]\n\n"):
            producer_done.set()  # its client closes here

    async def follow() -> None:
        answers.append(await call(mw, dict(scope), body_then(request)))

    with anyio.fail_after(30):  # a deadlock guard: the follower, or the store, waited
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, dict(scope), body_then(request, producer_done.wait), producer_send)
            if followers:
                await log.wait("miss")
                tg.start_soon(follow)
                await log.wait("shared")
                follower_in.set()
                while not answers:  # noqa: ASYNC110 - the follower's answer
                    await anyio.sleep(0.01)
            await log.wait("store")
            tg.cancel_scope.cancel()  # the app would go on for ever
    if followers:
        assert answers[0].headers[b"x-sse-cache"] == b"shared"
        assert answers[0].body == whole and answers[0].ended
    again = await call(mw, dict(scope), body_then(request))
    assert again.headers[b"x-sse-cache"] == b"hit" and again.body == whole


@pytest.mark.parametrize("stream_first", [True, False])
async def test_a_non_stream_answer_never_replaces_a_recorded_stream(stream_first: bool) -> None:
    # A streamed and a non-streamed request for the same prompt miss at once (a non-stream
    # request never follows a live stream). The modes share an entry, each answering the
    # other: the recording of the upstream's own bytes must be what stays, not a body from
    # which a stream is synthesised — whichever is stored last (helper-78: 13 of 40).
    from sse_cache.testing import responses_body, responses_stream

    pieces = [serialize_sse([event]) for event in responses_stream("both", text_deltas=3)]
    body = json.dumps(responses_body("both", text_deltas=3)).encode()
    stream_gate, body_gate = anyio.Event(), anyio.Event()
    log = NoticeLog()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        if json.loads(request)["stream"]:
            head = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await stream_gate.wait()
            for piece in pieces:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await body_gate.wait()
            length = b"%d" % len(body)
            head = [(b"content-type", b"application/json"), (b"content-length", length)]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": body})

    mw = CacheMiddleware(app, "memory://", hooks=[log])
    scope = events_scope()
    scope["path"], scope["raw_path"] = "/v1/responses", b"/v1/responses"

    def request(stream: bool) -> bytes:
        return json.dumps({"model": "m", "input": "both", "stream": stream}).encode()

    answered = {True: anyio.Event(), False: anyio.Event()}

    async def ask(stream: bool) -> None:
        await call(mw, dict(scope), body_then(request(stream)))
        answered[stream].set()

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, True)
            tg.start_soon(ask, False)
            while sum(n.kind == "miss" for n in log.seen) < 2:
                await log.wait("miss")
                await anyio.wait_all_tasks_blocked()
            gates = {True: stream_gate, False: body_gate}
            gates[stream_first].set()
            await answered[stream_first].wait()  # (and stored, if it is)
            gates[not stream_first].set()
    hit = await call(mw, dict(scope), body_then(request(True)))
    assert len({n.key for n in log.seen if n.kind == "miss"}) == 1  # (the modes share it)
    assert hit.headers[b"x-sse-cache"] == b"hit" and hit.body == b"".join(pieces)


async def test_a_non_stream_answer_asked_fresh_replaces_a_recorded_stream() -> None:
    # A recorded stream is kept over a non-stream body of the same request (above), but not
    # over one asked for fresh: a refresh, or an entry found too old, replaces it (it was
    # dropped: every such request went upstream; helper-79). And a streamed request whose
    # upstream answered JSON stores it (its own live stream counted as "a recorded stream").
    from sse_cache.testing import responses_body, responses_stream

    pieces = [serialize_sse([event]) for event in responses_stream("fresh", text_deltas=3)]
    calls = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        request = json.loads((await receive())["body"])
        if request["stream"] and request["input"] == "fresh":
            head = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": b"".join(pieces)})
            return
        body = json.dumps({**responses_body(request["input"], text_deltas=3), "n": calls})
        length = b"%d" % len(body)
        head = [(b"content-type", b"application/json"), (b"content-length", length)]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body.encode()})

    mw = CacheMiddleware(app, "memory://")
    scope = events_scope()
    scope["path"], scope["raw_path"] = "/v1/responses", b"/v1/responses"

    async def ask(prompt: str, stream: bool, *headers: tuple[bytes, bytes]) -> Answered:
        asked = dict(scope, headers=[*scope["headers"], *headers])
        body = json.dumps({"model": "m", "input": prompt, "stream": stream}).encode()
        return await call(mw, asked, body_then(body))

    assert (await ask("fresh", True)).headers[b"x-sse-cache"] == b"miss"  # the stream, stored
    refreshed = await ask("fresh", False, (b"x-sse-cache-refresh", b"true"))
    assert refreshed.headers[b"x-sse-cache"] == b"refresh"
    again = await ask("fresh", False)
    assert again.headers[b"x-sse-cache"] == b"hit" and again.body == refreshed.body
    assert calls == 2
    # A streamed request answered with JSON: stored as any body.
    first = await ask("json for a stream", True)
    second = await ask("json for a stream", True)
    assert first.headers[b"x-sse-cache"] == b"miss" and second.headers[b"x-sse-cache"] == b"hit"


@pytest.mark.parametrize("case", ["oversize", "incomplete"])
async def test_a_json_answer_not_stored_says_why(case: str) -> None:
    # A stream's recording says why it was not stored; a JSON body said nothing, and the
    # proxy's access line guessed "not a storable answer" for one over max_entry_bytes
    # (helper-83).
    choice = {"index": 0, "message": {"role": "assistant", "content": "x" * 300}}
    if case == "oversize":
        choice["finish_reason"] = "stop"
    body = json.dumps({"object": "chat.completion", "id": "c", "choices": [choice]}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body})

    log = NoticeLog()
    mw = CacheMiddleware(app, "memory://", max_entry_bytes=200, hooks=[log])
    if case == "incomplete":
        mw = CacheMiddleware(app, "memory://", hooks=[log])
    scope = chat_scope()
    request = json.dumps({"model": "m", "messages": [], "stream": False}).encode()
    answered = await call(mw, scope, body_then(request))
    assert answered.body == body and answered.ended
    (why,) = [n.detail for n in log.seen if n.kind == "not_stored"]
    expected = "exceeds max_entry_bytes=200" if case == "oversize" else "not a complete answer"
    assert expected in why


async def test_a_miss_streams_on_without_its_decoded_request_body() -> None:
    # The decoded body is needed to key the request, and was kept for as long as its answer
    # streamed: a long conversation decodes to ~6 times its size (helper-85: a 2.85 MiB body,
    # 17.8 MiB). Measured while the answer is held mid-stream: about the request's own bytes.
    import tracemalloc

    messages = [{"role": "user", "content": f"message {i}"} for i in range(40_000)]
    request = json.dumps({"model": "m", "messages": messages, "stream": True}).encode()
    upstream = GatedUpstream([_chat_piece("Hel"), _chat_piece("lo", "stop")], hold_after=1)
    mw = CacheMiddleware(upstream, "memory://")
    held_at: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message.get("body") and not held_at:
            held_at.append(tracemalloc.get_traced_memory()[0])
            upstream.gate.set()

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await mw(chat_scope(), body_then(request), send)
    finally:
        tracemalloc.stop()
    assert held_at[0] - before < 2 * len(request), (held_at[0] - before, len(request))


async def test_the_last_follower_of_a_failed_stream_takes_no_background_slot() -> None:
    # The producer's client leaves while a follower reads; the upstream then breaks. The
    # follower's stream is aborted, and its leaving asked the app, done by then, to finish
    # in the background: a slot taken for good (helper-86: after eight, no stream whose
    # client left was finished in the background any more).
    pieces = [_chat_piece("Hel"), _chat_piece("lo"), _chat_piece("", "stop"), b"data: [DONE]\n\n"]
    upstream = GatedUpstream(pieces, hold_after=1, cut_after=2)
    log = NoticeLog()
    mw = CacheMiddleware(upstream, "memory://", finish_on_disconnect=True, hooks=[log])
    request = json.dumps({"model": "m", "messages": [], "stream": True}).encode()

    async def producer_client(message: dict[str, Any]) -> None:
        if message.get("body") == pieces[1]:
            raise OSError("the producer's client is gone")

    async def follower() -> None:
        with pytest.raises(SharedStreamAborted):
            await call(mw, chat_scope(), body_then(request))

    async def producer() -> None:
        with contextlib.suppress(UpstreamCut, OSError):
            await mw(chat_scope(), body_then(request), producer_client)

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await upstream.wait_sent(1)
            tg.start_soon(follower)
            await log.wait("shared")
            upstream.gate.set()
    assert mw.slots.taken == 0  # (the slots finish_on_disconnect and resume windows take)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_paced_hit_keeps_its_connection_alive_through_a_long_wait(
    client_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The original's keep-alive comments are not recorded: a paced hit (pacing "original")
    # waiting as long as the original did for its next event sent nothing meanwhile, and a
    # proxy or client with an idle timeout cut it (helper-89). It sends a comment instead,
    # which every SSE client ignores: the events are the same.
    import sse_cache.http._answers as answers

    monkeypatch.setattr(answers, "PACED_KEEPALIVE_SECONDS", 0.05)
    upstream = GatedUpstream(EVENTS[:3], delay=0.3)  # the upstream's own pace
    routes = {"/events": GenericSSE()}
    client = client_for(CacheMiddleware(upstream, MemoryBackend(), routes=routes))
    miss = await client.post("/events", json={"q": "slow"})
    paced = await client.post(
        "/events", json={"q": "slow"}, headers={"x-sse-cache-replay": "original"}
    )
    assert miss.headers["x-sse-cache"] == "miss" and paced.headers["x-sse-cache"] == "hit"
    assert b": keep-alive\n\n" in paced.content
    parser = SSEParser()
    assert parser.feed(paced.content) == list(EVENTS[:3])
    assert paced.content.replace(b": keep-alive\n\n", b"") == miss.content
    # An instant hit has no wait, and no comment: the recorded bytes as they are.
    instant = await client.post("/events", json={"q": "slow"})
    assert instant.content == miss.content


@pytest.mark.parametrize("split", ["more-after-the-end", "crlf-split-at-the-end"])
async def test_a_stream_stopped_at_its_answers_end_ends_its_followers_there(split: str) -> None:
    # The producer's client left; a follower reads on. At the completing event the answer is
    # stored, the follower's stream ends, and the app is stopped.
    # - An app that had read more sends it before it reaches a checkpoint (the proxy's
    #   forwarder, what arrived while the answer was published to Redis): the follower got
    #   those bytes past the stored answer, then a clean end, and recording them raised
    #   AssertionError (helper-100).
    # - A CRLF-framed stream whose last CR and LF came apart: stopped at the CR, the
    #   follower's stream and a stream kept as its bytes ended without the LF (helper-100).
    from sse_cache.testing import responses_stream

    events = responses_stream("stopped at its end", text_deltas=3)
    first, rest = serialize_sse(events[:2]), serialize_sse(events[2:])  # rest: completed
    pieces = [rest, b": more\n\n"]
    if split == "crlf-split-at-the-end":
        # (A comment: not the canonical form, so kept as its bytes.)
        first = b": hi\r\n\r\n" + serialize_sse(events[:2], eol="crlf")
        rest = serialize_sse(events[2:], eol="crlf")
        pieces = [rest[:-1], rest[-1:]]
    go, sent_first, left = anyio.Event(), anyio.Event(), anyio.Event()

    async def stream(send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        sent_first.set()
        await go.wait()
        for piece in pieces:  # read already: sent at once, no checkpoint between
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await anyio.sleep_forever()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # As a server's app (the proxy's forwarder): it stops when its client leaves, which
        # the middleware keeps from it while followers read on.
        if scope["type"] != "http":
            return
        await receive()
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream, send)
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

    mw = CacheMiddleware(app, "memory://")
    scope, request = responses_request("stopped at its end")
    answers: dict[str, Answered] = {}

    async def ask(name: str, receive: Any) -> None:
        answers[name] = await call(mw, scope, receive)

    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "producer", body_then(request, until=left.wait))
            await sent_first.wait()
            tg.start_soon(ask, "follower", body_then(request))
            await anyio.wait_all_tasks_blocked()  # it follows the live stream
            left.set()  # the producer's client leaves; the follower reads on
            await anyio.wait_all_tasks_blocked()
            go.set()
        again = await call(mw, scope, body_then(request))
    follower = answers["follower"]
    assert follower.headers[b"x-sse-cache"] == b"shared"
    assert follower.body == first + rest and follower.ended
    assert again.headers[b"x-sse-cache"] == b"hit" and again.body == first + rest


@pytest.mark.parametrize("join_timeout", [0.2, float("inf")])
async def test_a_follower_waits_for_the_next_piece_as_long_as_join_timeout(
    join_timeout: float,
) -> None:
    # A reasoning model may think for minutes without an event. A follower gave up at 300 s
    # of silence, whatever its own read timeout (and the proxy's producer, which waits 600 s
    # by default, went on): join_timeout is an option now (the proxy sets it to
    # --upstream-timeout). Shorter than the silence, the follower is aborted (never ended
    # cleanly) and the producer goes on; longer, it gets the whole answer.
    from sse_cache.testing import responses_stream

    events = responses_stream("a long think", text_deltas=3)
    first, rest = serialize_sse(events[:2]), serialize_sse(events[2:])
    go, sent_first = anyio.Event(), anyio.Event()
    answers: dict[str, Answered | BaseException] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        sent_first.set()
        await go.wait()  # thinking
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    mw = CacheMiddleware(app, "memory://", join_timeout=join_timeout)
    scope, request = responses_request("a long think")

    async def ask(name: str) -> None:
        try:
            answers[name] = await call(mw, scope, body_then(request))
        except Exception as exc:  # an aborted response, in process
            answers[name] = exc

    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "producer")
            await sent_first.wait()
            tg.start_soon(ask, "follower")
            if join_timeout < 1:
                while "follower" not in answers:  # noqa: ASYNC110 - until it gave up
                    await anyio.sleep(0.01)
            else:
                await anyio.wait_all_tasks_blocked()  # it follows, and waits
            go.set()
    producer, follower = answers["producer"], answers["follower"]
    assert isinstance(producer, Answered) and producer.body == first + rest and producer.ended
    if join_timeout < 1:
        aborted = isinstance(follower, BaseException) or not follower.ended
        assert aborted, follower
    else:
        assert isinstance(follower, Answered) and follower.body == first + rest
        assert follower.ended and follower.headers[b"x-sse-cache"] == b"shared"


async def test_a_producers_client_leaving_between_the_cr_and_lf_of_the_end_keeps_the_lf() -> None:
    # The producer's client leaves right after the chunk that ends with the CR of the
    # completing event's last CRLF (the LF comes in the next): the answer is complete and
    # stopped there. Its followers' streams and the bytes kept ended without the LF
    # (helper-104); the LF its framing owes is added.
    from sse_cache.testing import responses_stream

    events = responses_stream("left at the cr", text_deltas=3)
    whole = b": hi\r\n\r\n" + serialize_sse(events, eol="crlf")  # kept as its bytes
    sent_all_but_lf, left = anyio.Event(), anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
        await send({"type": "http.response.body", "body": whole[:200], "more_body": True})
        await send({"type": "http.response.body", "body": whole[200:-1], "more_body": True})
        sent_all_but_lf.set()
        while (await receive())["type"] != "http.disconnect":
            pass

    mw = CacheMiddleware(app, "memory://")
    scope, request = responses_request("left at the cr")
    answers: dict[str, Answered] = {}

    async def ask(name: str, receive: Any) -> None:
        answers[name] = await call(mw, scope, receive)

    async def until_all_but_the_lf_was_sent() -> None:
        await sent_all_but_lf.wait()
        await left.wait()

    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "producer", body_then(request, until=until_all_but_the_lf_was_sent))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ask, "follower", body_then(request))
            await anyio.wait_all_tasks_blocked()  # it follows the live stream
            left.set()
        again = await call(mw, scope, body_then(request))
    follower = answers["follower"]
    assert follower.headers[b"x-sse-cache"] == b"shared" and follower.ended
    assert follower.body == whole
    assert again.headers[b"x-sse-cache"] == b"hit" and again.body == whole


# -- a client leaving before the response's head --------------------------------------------


class SlowHead:
    """An app that waits for its upstream's head (until :attr:`head` is set) while it
    listens for its client leaving, as gateways do (Starlette's ``StreamingResponse`` and
    ``request.is_disconnected()`` read ``receive``). Told its client left, it answers the
    way Starlette's ``BaseHTTPMiddleware`` does: what it has, and a clean end."""

    def __init__(self) -> None:
        self.head = anyio.Event()
        self.calls = 0
        self.entered = 0  # calls waiting for the head, or past it
        self.told = anyio.Event()  # a call was told its client left

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        self.calls += 1
        self.entered += 1
        left = False
        async with anyio.create_task_group() as tg:

            async def listen() -> None:
                nonlocal left
                left = (await receive())["type"] == "http.disconnect"
                if left:
                    self.told.set()
                    tg.cancel_scope.cancel()

            tg.start_soon(listen)
            await self.head.wait()
            tg.cancel_scope.cancel()
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
        pieces = EVENTS[:2] if left else EVENTS
        for event in pieces:
            await send(
                {"type": "http.response.body", "body": serialize_sse([event]), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})


def leaving(body: bytes, left: anyio.Event, read: anyio.Event) -> Any:
    """:func:`body_then`, the disconnect once ``left`` is set; ``read`` is set as it is read
    (the middleware has judged it by the time a task waiting on ``read`` runs)."""

    async def until() -> None:
        await left.wait()
        read.set()

    return body_then(body, until)


async def until_true(check: Callable[[], bool]) -> None:
    with anyio.fail_after(DEADLOCK_GUARD):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.01)


@pytest.mark.parametrize("options", [{}, {"resume_window": 30}])
async def test_a_clean_end_after_the_client_left_before_the_head_is_never_stored(
    client_for: Any, options: dict[str, Any]
) -> None:
    # The client left during the time to first byte, with no one else waiting: the app is
    # told, and answers with part of the stream and a clean end (as BaseHTTPMiddleware
    # does). That end is not the upstream's: nothing is stored (helper-135: the part was
    # stored, and replayed as a whole hit). A resume window does not keep it going: there
    # is nothing to resume by yet, and it took no slot (helper-138).
    app = SlowHead()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, **options)
    left, read = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, events_scope(), leaving(b"{}", left, read))
        await until_true(lambda: app.entered == 1)
        left.set()
        with anyio.fail_after(DEADLOCK_GUARD):
            await app.told.wait()
        app.head.set()
    assert mw.slots.taken == 0
    again = await client_for(mw).post("/events", json={})
    assert again.headers["x-sse-cache"] == "miss"
    assert again.content == serialize_sse(EVENTS)
    assert app.calls == 2


@pytest.mark.parametrize("followers", [1, 3])
async def test_followers_of_a_stream_whose_client_left_before_the_head_get_all_of_it(
    client_for: Any, followers: int
) -> None:
    # Identical requests joined during the time to first byte; the first one's client
    # leaves before the head: the app is not told, and streams on for them (helper-135: it
    # was told, and they got a clean end after two events, or were all aborted).
    from flights_seen import FlightsSeen

    app, seen = SlowHead(), FlightsSeen()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, hooks=[seen])
    left, read = anyio.Event(), anyio.Event()
    answers: list[Answered] = []

    async def follow() -> None:
        answers.append(await call(mw, events_scope(), body_then(b"{}")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, events_scope(), leaving(b"{}", left, read))
        await until_true(lambda: app.entered == 1)
        for _ in range(followers):
            tg.start_soon(follow)
        await until_true(lambda: seen.followers() == followers)
        left.set()
        with anyio.fail_after(DEADLOCK_GUARD):
            await read.wait()
        app.head.set()
    assert not app.told.is_set()
    assert [(a.headers[b"x-sse-cache"], a.body, a.ended) for a in answers] == [
        (b"shared", serialize_sse(EVENTS), True)
    ] * followers
    hit = await client_for(mw).post("/events", json={})
    assert hit.headers["x-sse-cache"] == "hit" and hit.content == serialize_sse(EVENTS)
    assert app.calls == 1


async def test_a_request_after_the_client_left_before_the_head_asks_for_itself(
    client_for: Any,
) -> None:
    # With no one waiting, the stream of a client that left before its head is stopped: an
    # identical request that comes next (a client's retry after its timeout) does not join
    # it (helper-135: it joined, and was cut off or ended cleanly on part of it) but asks the
    # app itself, and gets all of it.
    app = SlowHead()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE})
    left, read = anyio.Event(), anyio.Event()
    retried: list[Answered] = []

    async def retry() -> None:
        retried.append(await call(mw, events_scope(), body_then(b"{}")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, events_scope(), leaving(b"{}", left, read))
        await until_true(lambda: app.entered == 1)
        left.set()
        with anyio.fail_after(DEADLOCK_GUARD):
            await app.told.wait()
        tg.start_soon(retry)
        await until_true(lambda: app.entered == 2)
        app.head.set()
    [answer] = retried
    assert (answer.headers[b"x-sse-cache"], answer.body, answer.ended) == (
        b"miss",
        serialize_sse(EVENTS),
        True,
    )
    hit = await client_for(mw).post("/events", json={})
    assert hit.headers["x-sse-cache"] == "hit" and hit.content == serialize_sse(EVENTS)


async def test_finish_on_disconnect_finishes_a_stream_whose_client_left_before_the_head(
    client_for: Any,
) -> None:
    # finish_on_disconnect: a client that leaves before the head is finished in the
    # background as one that leaves after it (helper-135: it was told, and nothing stored).
    app = SlowHead()
    mw = CacheMiddleware(
        app, "memory://", routes={"/events": GenericSSE}, finish_on_disconnect=True
    )
    left, read = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, events_scope(), leaving(b"{}", left, read))
        await until_true(lambda: app.entered == 1)
        left.set()
        with anyio.fail_after(DEADLOCK_GUARD):
            await read.wait()
        app.head.set()
    assert not app.told.is_set()
    hit = await client_for(mw).post("/events", json={})
    assert hit.headers["x-sse-cache"] == "hit" and hit.content == serialize_sse(EVENTS)
    assert app.calls == 1


@pytest.mark.parametrize("options", [{}, {"resume_window": 30}])
async def test_a_stream_whose_client_and_followers_all_left_before_the_head_is_stopped(
    client_for: Any, options: dict[str, Any]
) -> None:
    # Its followers waited, so the app was not told its client left; they leave too before
    # the head: once it comes, no one reads the stream, and the app is stopped, nothing
    # stored — a resume window or not: the client has nothing to resume by (helper-140: it
    # was held for the window, a slot taken).
    from flights_seen import FlightsSeen

    app, seen = SlowHead(), FlightsSeen()
    routes = {"/events": GenericSSE}
    mw = CacheMiddleware(app, "memory://", routes=routes, hooks=[seen], **options)
    left, read = anyio.Event(), anyio.Event()
    sent_after_head: list[bool] = []

    async def producer() -> None:
        answered = await call(mw, events_scope(), leaving(b"{}", left, read))
        sent_after_head.append(answered.status != 0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await until_true(lambda: app.entered == 1)
        async with anyio.create_task_group() as follower:
            follower.start_soon(call, mw, events_scope(), body_then(b"{}"))
            await until_true(lambda: seen.followers() == 1)
            left.set()
            with anyio.fail_after(DEADLOCK_GUARD):
                await read.wait()
            follower.cancel_scope.cancel()  # (the follower's client leaves too)
        assert seen.followers() == 0
        app.head.set()
    assert sent_after_head == [False]  # (its client was gone: nothing went to it)
    assert mw.slots.taken == 0
    again = await client_for(mw).post("/events", json={})
    assert again.headers["x-sse-cache"] == "miss" and again.content == serialize_sse(EVENTS)
    assert app.calls == 2


async def test_a_client_leaving_after_a_failure_past_the_answer_is_not_finished_for_nothing() -> (
    None
):
    # The answer's completing event, then an error event, then the client leaves (its SDK
    # raised): the stream failed, so finish_on_disconnect has nothing to finish — no slot
    # taken, the app told at once, nothing stored (helper-140: the app ran on to its
    # background deadline, a slot held).
    def sse(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    pieces = [
        sse("message_start", {"type": "message_start", "message": {"id": "m1", "content": []}}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        sse("message_stop", {"type": "message_stop"}),
        sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}),
    ]
    told = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if (await receive())["type"] == "http.disconnect":
            told.set()

    mw = CacheMiddleware(app, "memory://", finish_on_disconnect=True)
    scope = {**events_scope(), "path": "/v1/messages", "raw_path": b"/v1/messages"}
    body = json.dumps({"model": "m", "max_tokens": 9, "messages": [], "stream": True}).encode()
    left = anyio.Event()
    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, mw, scope, body_then(body, left.wait))
            left.set()
            await told.wait()
    assert mw.slots.taken == 0
    with anyio.fail_after(DEADLOCK_GUARD):  # (asked again, and left again: not stored)
        again = await call(mw, scope, body_then(body, left.wait))
    assert again.headers[b"x-sse-cache"] == b"miss"


async def test_a_follower_whose_client_leaves_before_the_head_leaves_at_once(
    client_for: Any,
) -> None:
    # A follower waiting for the live stream's head watches its client: gone, it gives its
    # place back then — not once the head comes (helper-138: it held it until then, and
    # after join_timeout went to the upstream for a client long gone). The stream goes on
    # for its own client.
    from flights_seen import FlightsSeen

    app, seen, notices = SlowHead(), FlightsSeen(), NoticeLog()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, hooks=[seen, notices])
    left, read = anyio.Event(), anyio.Event()
    produced: list[Answered] = []

    async def produce() -> None:
        produced.append(await call(mw, events_scope(), body_then(b"{}")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        await until_true(lambda: app.entered == 1)
        tg.start_soon(call, mw, events_scope(), leaving(b"{}", left, read))
        await until_true(lambda: seen.followers() == 1)
        left.set()
        await until_true(lambda: seen.followers() == 0)  # (before the head)
        app.head.set()
    [answer] = produced
    assert (answer.headers[b"x-sse-cache"], answer.body) == (b"miss", serialize_sse(EVENTS))
    assert app.calls == 1
    # Counted as a follower (it was counted a bypass: helper-154), with why it had no answer.
    assert any(
        n.kind == "shared"
        and n.key
        and n.detail == "the client left while it waited for the head of the live stream it follows"
        for n in notices.seen
    )


async def test_a_follower_whose_producer_stays_silent_before_the_head_asks_for_itself() -> None:
    # The follower watches its client while it waits for the head; its producer sends
    # nothing for join_timeout: the follower goes round, and asks the app itself (helper-143:
    # the watch's task group raised the silence as an ExceptionGroup, which went past the
    # handler and failed the request).
    app = SlowHead()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, join_timeout=0.2)
    answers: list[Answered] = []

    async def follow() -> None:
        answers.append(await call(mw, events_scope(), body_then(b"{}")))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, mw, events_scope(), body_then(b"{}"))
        await until_true(lambda: app.entered == 1)
        tg.start_soon(follow)
        await until_true(lambda: app.entered == 2)  # (it gave up waiting: its own call)
        app.head.set()
    [answer] = answers
    assert (answer.headers[b"x-sse-cache"], answer.body) == (b"miss", serialize_sse(EVENTS))


async def test_a_stream_no_one_waits_for_any_more_is_stopped_before_its_head(
    client_for: Any,
) -> None:
    # The producer's client left (hidden: a follower waited), then the follower's client
    # left too, both before the head: no one reads the stream, and the app is stopped then,
    # not once its upstream's head comes (helper-138: it ran until then, for no one).
    from flights_seen import FlightsSeen

    app, seen = SlowHead(), FlightsSeen()
    mw = CacheMiddleware(app, "memory://", routes={"/events": GenericSSE}, hooks=[seen])
    producer_left, producer_read = anyio.Event(), anyio.Event()
    follower_left, follower_read = anyio.Event(), anyio.Event()
    stopped = anyio.Event()

    async def produce() -> None:
        await call(mw, events_scope(), leaving(b"{}", producer_left, producer_read))
        stopped.set()

    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            await until_true(lambda: app.entered == 1)
            tg.start_soon(call, mw, events_scope(), leaving(b"{}", follower_left, follower_read))
            await until_true(lambda: seen.followers() == 1)
            producer_left.set()
            await producer_read.wait()  # (hidden from the app: a follower waits)
            follower_left.set()
            await stopped.wait()  # the app stopped, its head never released
    assert not app.told.is_set()
    assert app.calls == 1 and mw.slots.taken == 0
    app.head.set()  # (for the next request)
    again = await client_for(mw).post("/events", json={})
    assert again.headers["x-sse-cache"] == "miss"  # nothing was stored


async def test_what_the_app_writes_into_the_scope_reaches_middleware_around_the_cache() -> None:
    # The cache replaced the request's header list in a copy of the scope (for httptools'
    # trailers): what the app's router writes into it (its route, endpoint, path params),
    # which middleware around the cache reads (a metrics exporter labelling by route), was
    # lost (helper-159). The list is replaced in the same scope now, and the server's own
    # list is left as it was.
    async def router(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["endpoint"], scope["path_params"] = "events", {}
        await events_app()(scope, receive, send)

    scope = events_scope()
    servers_list = scope["headers"]
    answered = await call(
        CacheMiddleware(router, "memory://", routes={"/events": GenericSSE}),
        scope,
        body_then(b'{"q": "scope"}'),
    )
    assert answered.status == 200 and answered.headers[b"x-sse-cache"] == b"miss"
    assert scope["endpoint"] == "events" and scope["path_params"] == {}
    assert scope["headers"] == servers_list and scope["headers"] is not servers_list

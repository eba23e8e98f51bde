"""What the proxy sends upstream and back, over real loopback HTTP: raw requests (sockets), as
clients and other proxies may send them, against an upstream that records what it got."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from sse_cache.adapters import GenericSSE
from sse_cache.proxy import ProxyApp, create_proxy_app
from sse_cache.testing import NoticeLog

Serve = Any  # the `serve` fixture (tests/integration/conftest.py)

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

DEADLOCK_GUARD = 30  # seconds: only a hung test ever reaches it
CHAT = "/v1/chat/completions"
CREDENTIAL = "authorization: Bearer sk-forwarding"


@dataclass
class Received:
    """One request as the upstream got it."""

    method: str
    path: bytes
    headers: dict[str, str]
    body: bytes = b""
    whole: bool = False  # the body came to its end (not cut off by a disconnect)


@dataclass
class RecordingUpstream:
    """An ASGI upstream that records every request and answers a streamed chat answer (or,
    for ``"stream": false``, its JSON, with a length), adding ``extra`` response headers."""

    extra: list[tuple[bytes, bytes]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    ended: anyio.Event = field(default_factory=anyio.Event)  # a request ended, either way

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        got = Received(
            scope["method"],
            scope.get("raw_path") or scope["path"].encode(),
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        )
        self.requests.append(got)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                got.body += message.get("body", b"")
                if not message.get("more_body", False):
                    got.whole = True
                    break
        finally:
            self.ended.set()
        prompt = json.loads(got.body)
        body = chat_sse(json.dumps(prompt.get("messages")))
        if prompt.get("stream") is False:
            body = json.dumps({"object": "chat.completion", "id": "c1", "choices": []}).encode()
            head = [(b"content-type", b"application/json")]
            head.append((b"content-length", str(len(body)).encode()))
        else:
            head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head + self.extra})
        await send({"type": "http.response.body", "body": body})


def chat_sse(text: str) -> bytes:
    """A whole streamed chat answer saying ``text``."""
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-mock"}
    said = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}
    done = {"index": 0, "delta": {}, "finish_reason": "stop"}
    pieces = [json.dumps({**chunk, "choices": [c]}) for c in (said, done)] + ["[DONE]"]
    return b"".join(f"data: {piece}\n\n".encode() for piece in pieces)


@dataclass
class Proxy:
    url: str
    app: ProxyApp
    upstream: RecordingUpstream
    notices: NoticeLog

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture
async def proxy(serve: Serve, tmp_path: Path) -> AsyncIterator[Proxy]:
    upstream = RecordingUpstream(extra=[(b"x-sse-cache-ttl", b"98"), (b"x-sse-cache", b"hit")])
    async with serve(upstream) as upstream_url:
        notices = NoticeLog()
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}", hooks=[notices])
        async with serve(app) as url:
            try:
                yield Proxy(url, app, upstream, notices)
            finally:
                await app.aclose()


def chat_body(prompt: str, *, stream: bool = True) -> bytes:
    return json.dumps(
        {"model": "gpt-mock", "messages": [{"role": "user", "content": prompt}], "stream": stream}
    ).encode()


async def exchange(address: tuple[str, int], request: bytes) -> tuple[int, bytes, bytes]:
    """Send ``request`` (raw, asking to close) and read the response until the server
    closes: its status, head (lower-cased) and body (as sent: chunked framing kept)."""
    async with await anyio.connect_tcp(*address) as sock:
        await sock.send(request)
        raw = b""
        with anyio.fail_after(DEADLOCK_GUARD):
            while True:
                try:
                    raw += await sock.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.lower(), body


def post(target: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "host: proxy", CREDENTIAL, "connection: close"]
    lines += ["content-type: application/json", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    "target",
    [
        "@{host}:{port}/v1/models",
        ":{port}/v1/models",
        ".example.com/v1/models",
        "*",
        "/../v1/models",
        "/v1/./models",
        "/v1/chat/..",
        "/v1/%2e%2e/admin",
        "/v1/.%2E/admin",
        "/v1/%2e/models",
        "/v1/..%2fadmin",
        "/v1/%2E%2E%2Fadmin",
        "/v1/..%5Cadmin",
        "/v1/..\\admin",
        "/v1/embeddings#/v1/chat/completions",
        "/v1/chat/completions?a=1#/v1/embeddings",
    ],
)
async def test_a_request_target_that_is_no_path_never_reaches_another_server(
    serve: Serve, proxy: Proxy, target: str
) -> None:
    # The upstream's URL is the base URL and the request's path: appended to it, "@host/..."
    # made the part before it a user name and sent the request, credentials and all, to
    # another server (helper-73), ":port/..." another port of the upstream's host. A dot
    # segment, resolved by the HTTP client, left the base URL's own path (helper-74: with
    # --upstream http://host/base, /../admin reached http://host/admin), also escaped with
    # its "/" for an upstream that decodes before it resolves (helper-113: ..%2fadmin). A
    # fragment, which the HTTP client drops, forwarded another path than the one keyed.
    elsewhere = RecordingUpstream()
    async with serve(elsewhere) as other:
        host, port = other.removeprefix("http://").split(":")
        shown = target.format(host=host, port=port)
        for method in ("GET", "POST"):
            request = post(shown, chat_body("elsewhere")).replace(b"POST", method.encode(), 1)
            status, _, body = await exchange(proxy.address, request)
            assert status == 400, (method, body)
            said = json.loads(body)["error"]["message"]
            assert any(
                why in said for why in ("must be a path starting with '/'", "'..' segments", "'#'")
            ), said
    assert elsewhere.requests == [] and proxy.upstream.requests == []


async def test_an_absolute_form_target_is_served_as_its_path(proxy: Proxy) -> None:
    # RFC 9112 §3.2.2: a server must accept a target in absolute form. It was forwarded as
    # the upstream's URL followed by the whole target: a 500 (helper-73). Its path is matched,
    # keyed and forwarded, whatever authority it names.
    body = chat_body("absolute form")
    status, head, _ = await exchange(proxy.address, post(f"http://elsewhere:1{CHAT}", body))
    assert status == 200 and b"\r\nx-sse-cache: miss" in head, head
    assert [r.path for r in proxy.upstream.requests] == [CHAT.encode()]
    status, head, _ = await exchange(proxy.address, post(CHAT, body))
    assert status == 200 and b"\r\nx-sse-cache: hit" in head, head
    assert len(proxy.upstream.requests) == 1


@pytest.mark.parametrize("path", [CHAT, "/v1/not-cached"])
@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_an_upload_the_client_abandons_never_runs_upstream(
    proxy: Proxy, path: str, framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The client sends part of its body, then leaves. The proxy ended its own upload to the
    # upstream cleanly: the upstream ran the request (the whole of it, for a chunked body
    # whose last chunk never came; helper-73), where the docs say it is cancelled. A body
    # shorter than its declared length failed in the upstream's client instead: a
    # traceback in the log ("Exception in ASGI application").
    body = chat_body("abandoned upload")
    if framing == "chunked":
        framed = b"%x\r\n%s\r\n" % (len(body), body)  # no last (empty) chunk
        head = post(path, b"", "transfer-encoding: chunked").replace(b"content-length: 0\r\n", b"")
    else:
        framed = body[: len(body) // 2]
        head = post(path, body).removesuffix(body)
    async with await anyio.connect_tcp(*proxy.address) as sock:
        await sock.send(head + framed)
        if path == CHAT:
            # (A cached route reads the body before anything goes upstream: the proxy
            # notes the request passed through uncached, once the client has left.)
            left = proxy.notices.wait("bypass")  # (awaited below, within a deadlock guard)
        else:
            # The upstream has the request's head, and waits for the rest of its body.
            with anyio.fail_after(DEADLOCK_GUARD):
                while not proxy.upstream.requests:  # noqa: ASYNC110 - the upstream's record
                    await anyio.sleep(0.01)
            left = None
    if left is not None:
        with anyio.fail_after(DEADLOCK_GUARD):
            notice = await left
        assert notice.detail == "the client left before its request body was complete"
    else:
        with anyio.fail_after(DEADLOCK_GUARD):
            await proxy.upstream.ended.wait()
    assert not any(r.whole for r in proxy.upstream.requests), proxy.upstream.requests
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # The proxy serves on, and the whole request is answered.
    status, head, _ = await exchange(proxy.address, post(CHAT, body))
    assert status == 200 and b"\r\nx-sse-cache: miss" in head


async def test_a_request_declaring_two_framings_is_refused_and_its_connection_closed(
    proxy: Proxy,
) -> None:
    # RFC 9112 §6.1: a request with both Transfer-Encoding and Content-Length may be a
    # smuggling attempt (a server in front that reads the length sees the next request as
    # this one's body). uvicorn read it chunked and kept the connection open, serving the
    # request packed behind it (helper-80); forwarded, its length made the upstream's client
    # fail (a 500, helper-73). Now a 400, and the connection is closed (the RFC's MUST).
    body = chat_body("both framings")
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    behind = post(CHAT, chat_body("smuggled"))
    # (A length of 0 too, the classic CL.TE: accepted for a moment this session; helper-159.
    # And two lengths, the last 0.)
    lengths = (
        b"content-length: 5",
        b"content-length: 0",
        b"content-length: 5\r\ncontent-length: 0",
    )
    for path in (CHAT, "/v1/not-cached"):
        for length in lengths:
            request = post(path, b"", "transfer-encoding: chunked")
            request = request.replace(b"content-length: 0", length)
            request = request.replace(b"connection: close\r\n", b"")
            status, head, rest = await exchange(proxy.address, request + chunked + behind)
            assert status == 400 and b"\r\nconnection: close" in head, (length, head)
            assert b"HTTP/1.1" not in rest, rest  # (nothing served behind it)
            # (Two lengths: h11 refuses them itself, before the proxy sees them.)
            assert b"transfer-encoding" in rest.lower() or b"\r\n" in length, rest
    assert proxy.upstream.requests == []


async def test_headers_named_by_connection_are_not_forwarded_either_way(
    serve: Serve, tmp_path: Path
) -> None:
    # RFC 9110 §7.6.1: the header names a Connection header lists are hop-by-hop too. (The
    # upstream's names in any case: ASGI has them lower-case, as the client gets them.)
    back = [(b"Connection", b"X-Hop-Back"), (b"X-Hop-Back", b"1"), (b"X-Kept-Back", b"1")]
    upstream = RecordingUpstream(extra=back)
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            for path in (CHAT, "/v1/not-cached"):
                request = post(path, chat_body("hop"), "x-hop: 1", "x-kept: 1")
                request = request.replace(b"connection: close", b"connection: close, X-Hop")
                status, head, _ = await exchange((host, int(port)), request)
                assert status == 200 and b"\r\nx-hop-back:" not in head.lower(), head
                assert b"\r\nx-kept-back: 1\r\n" in head, head
            await app.aclose()
    assert len(upstream.requests) == 2
    for received in upstream.requests:
        assert "x-hop" not in received.headers and received.headers["x-kept"] == "1"


async def test_a_miss_never_carries_the_upstreams_own_cache_headers(proxy: Proxy) -> None:
    # A cache in front of another (or an upstream that sends x-sse-cache-* headers of its
    # own): the headers of this cache's namespace are its own, never the upstream's. A miss
    # carried the inner cache's x-sse-cache-ttl beside its own status (helper-73).
    body = chat_body("inner cache")
    status, head, _ = await exchange(proxy.address, post(CHAT, body))
    assert status == 200 and head.count(b"\r\nx-sse-cache:") == 1, head
    assert b"\r\nx-sse-cache: miss" in head and b"x-sse-cache-ttl" not in head, head
    status, head, _ = await exchange(proxy.address, post(CHAT, body))
    assert b"\r\nx-sse-cache: hit" in head and head.count(b"\r\nx-sse-cache-ttl:") <= 1, head


async def test_a_path_with_a_trailing_slash_is_keyed_by_it(proxy: Proxy) -> None:
    # Keys use the request's own path: /v1/chat/completions/ may be another resource
    # upstream (a 404, say). It was answered from /v1/chat/completions's entry (helper-73).
    body = chat_body("trailing slash")
    for path in (CHAT, CHAT + "/", CHAT + "//"):
        status, head, _ = await exchange(proxy.address, post(path, body))
        assert status == 200 and b"\r\nx-sse-cache: miss" in head, (path, head)
    assert [r.path for r in proxy.upstream.requests] == [
        p.encode() for p in (CHAT, CHAT + "/", CHAT + "//")
    ]
    status, head, _ = await exchange(proxy.address, post(CHAT + "/", body))
    assert b"\r\nx-sse-cache: hit" in head, head


async def test_a_header_named_by_connection_never_keys_what_the_upstream_was_not_asked(
    proxy: Proxy,
) -> None:
    # openai-beta keys an entry (the upstream may answer otherwise with it). Named by the
    # client's Connection header, it is not forwarded: it must not key the entry either.
    # It did: the upstream's answer without the beta was stored under a key with it, and
    # served to the next client asking with it (helper-74: cache poisoning).
    body = chat_body("beta")
    beta = "openai-beta: assistants=v2"
    trick = post(CHAT, body, beta).replace(b"connection: close", b"connection: close, openai-beta")
    status, head, _ = await exchange(proxy.address, trick)
    assert status == 200 and b"\r\nx-sse-cache: miss" in head, head
    status, head, _ = await exchange(proxy.address, post(CHAT, body, beta))
    assert status == 200 and b"\r\nx-sse-cache: miss" in head, head  # not the first answer
    assert [r.headers.get("openai-beta") for r in proxy.upstream.requests] == [
        None,
        "assistants=v2",
    ]
    status, head, _ = await exchange(proxy.address, post(CHAT, body))  # asked as the first was
    assert b"\r\nx-sse-cache: hit" in head, head


async def test_a_cache_control_named_by_connection_is_obeyed_and_not_forwarded(
    proxy: Proxy,
) -> None:
    # Named in Connection, a header is for this hop: the proxy, whose cache it controls.
    # no-store was ignored (removed with the rest of the hop's headers before the cache
    # read them) and the answer stored (helper-157).
    body = chat_body("hop")
    trick = post(CHAT, body, "cache-control: no-store").replace(
        b"connection: close", b"connection: close, cache-control"
    )
    status, head, _ = await exchange(proxy.address, trick)
    assert status == 200 and b"\r\nx-sse-cache: miss" in head, head
    assert "cache-control" not in proxy.upstream.requests[0].headers
    status, head, _ = await exchange(proxy.address, post(CHAT, body))
    assert b"\r\nx-sse-cache: miss" in head, head  # (nothing was stored)
    assert len(proxy.upstream.requests) == 2


def losing_an_upgrade_offers_body(app: Any) -> Any:
    """``app`` served as uvicorn's httptools serves a request offering a protocol upgrade:
    it stops reading at the offer, and hands the app an empty body as if it were whole."""

    async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
        offers = scope["type"] == "http" and any(n == b"upgrade" for n, _ in scope["headers"])
        if not offers:
            await app(scope, receive, send)
            return
        taken = False

        async def receive_nothing() -> dict[str, Any]:
            nonlocal taken
            if not taken:
                taken = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()

        await app(scope, receive_nothing, send)

    return served


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_the_server_lost_at_an_upgrade_offer_is_refused_not_forwarded(
    serve: Serve, tmp_path: Path, framing: str
) -> None:
    # curl --http2 on http:// offers Upgrade: h2c. uvicorn's httptools stops reading there:
    # the upstream was asked with an empty body as if whole (chunked), or the forward failed
    # with a bare 500 and a traceback (a length, and no byte of it; helper-157).
    upstream = RecordingUpstream()
    body = chat_body("upgrade")
    offer = post(CHAT, body, "upgrade: h2c").replace(
        b"connection: close", b"connection: close, upgrade"
    )
    if framing == "chunked":
        head, _, _ = offer.partition(b"\r\n\r\n")
        head = head.replace(f"content-length: {len(body)}".encode(), b"transfer-encoding: chunked")
        offer = head + b"\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(losing_an_upgrade_offers_body(app)) as url:
            host, port = url.removeprefix("http://").split(":")
            status, _, answer = await exchange((host, int(port)), offer)
            assert status == 400 and b"Upgrade" in answer, answer
            assert upstream.requests == []
        # Where the server reads the body (h11, uvicorn's default), the offer is answered.
        async with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            status, head, _ = await exchange((host, int(port)), offer)
            assert status == 200 and b"\r\nx-sse-cache: miss" in head, head
            assert [r.body for r in upstream.requests] == [body]
        await app.aclose()


def with_late_trailer(app: Any, trailer: tuple[bytes, bytes]) -> Any:
    """``app`` served as uvicorn's httptools serves a chunked request with a trailer field:
    added to the scope's header list when it arrives, after the head, as the body's end is
    received (h11, which these tests run on, ignores trailers)."""

    async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = scope.get("headers")  # (the server's own list, as httptools keeps it)

        async def receive_then_trailer() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                headers.append(trailer)
            return message

        await app(scope, receive_then_trailer if scope["type"] == "http" else receive, send)

    return served


@pytest.mark.parametrize("trailer", [b"connection", b"openai-beta"])
async def test_a_late_trailer_never_keys_or_forwards_as_a_header(
    serve: Serve, tmp_path: Path, trailer: bytes
) -> None:
    # A trailer naming openai-beta in Connection, or being one, sent after a pause: the
    # proxy's look at the Connection header had been done, the key and the forwarded headers
    # were read from the scope after the body, with the trailer in it. The upstream was asked
    # without the beta (the forwarder dropped it as hop-by-hop) and its answer stored under
    # the key with it, served to every client asking with it (helper-157, on httptools).
    value = b"openai-beta" if trailer == b"connection" else b"assistants=v1"
    upstream = RecordingUpstream()
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(with_late_trailer(app, (trailer, value))) as url:
            host, port = url.removeprefix("http://").split(":")
            address = (host, int(port))
            body, beta = chat_body("trailer"), "openai-beta: assistants=v2"
            status, head, _ = await exchange(address, post(CHAT, body, beta))
            assert status == 200 and b"\r\nx-sse-cache: miss" in head, head
            assert upstream.requests[0].headers.get("openai-beta") == "assistants=v2"
            # Keyed as asked, with the beta: an ordinary request with it is a hit of what
            # the upstream answered with it; one without is not.
            status, head, _ = await exchange(address, post(CHAT, body, beta))
            assert b"\r\nx-sse-cache: hit" in head, head
            status, head, _ = await exchange(address, post(CHAT, body))
            assert b"\r\nx-sse-cache: miss" in head, head
            assert [r.headers.get("openai-beta") for r in upstream.requests] == [
                "assistants=v2",
                None,
            ]
        await app.aclose()


async def test_an_upstreams_cookie_is_never_sent_with_another_callers_request(
    serve: Serve, tmp_path: Path
) -> None:
    # httpx2's client keeps every Set-Cookie in its jar and adds it to every later request:
    # one tenant's session cookie went upstream with another tenant's request (and each new
    # cookie name grew every request); helper-132. The proxy forwards for many callers: it
    # keeps none. The caller that was answered gets its Set-Cookie; a client's own Cookie
    # header goes upstream as it is.
    upstream = RecordingUpstream(extra=[(b"set-cookie", b"session=tenant-a; Path=/")])
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            for path in (CHAT, "/v1/not-cached"):
                first = post(path, chat_body(f"a {path}")).replace(b"sk-forwarding", b"sk-a")
                status, head, _ = await exchange((host, int(port)), first)
                assert status == 200 and b"\r\nset-cookie: session=tenant-a" in head, head
                other = post(path, chat_body(f"b {path}")).replace(b"sk-forwarding", b"sk-b")
                status, _, _ = await exchange((host, int(port)), other)
                assert status == 200
            own = post("/v1/not-cached", chat_body("own"), "cookie: mine=1")
            await exchange((host, int(port)), own)
            await app.aclose()
    assert len(upstream.requests) == 5
    assert [r.headers.get("cookie") for r in upstream.requests] == [None] * 4 + ["mine=1"]


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream on a socket of its own, answering every request with ``body``
    (SSE) framed as ``framing`` says: ``close`` (no length, no chunks: the body ends as the
    connection closes, which a cut does too), ``chunked``, ``length``, or
    ``chunked-and-length`` (chunked, with a ``content-length`` of 10 as well)."""

    body: bytes
    framing: str
    calls: int = 0
    gate: anyio.Event | None = None  # set: the answers go out (None: at once)
    arrived: anyio.Event = field(default_factory=anyio.Event)  # a request came

    async def handle(self, sock: Any) -> None:
        async with sock:
            got = b""
            while b"\r\n\r\n" not in got:
                got += await sock.receive()
            head, _, body = got.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            while length and len(body) < length[0]:
                body += await sock.receive()
            self.calls += 1
            self.arrived.set()
            if self.gate is not None:
                await self.gate.wait()
            kind = b"application/json" if self.body.startswith(b"{") else b"text/event-stream"
            head = b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\n"
            if self.framing == "close":
                await sock.send(head + b"connection: close\r\n\r\n" + self.body)
            elif self.framing == "length":
                await sock.send(head + b"content-length: %d\r\n\r\n" % len(self.body) + self.body)
            else:
                if self.framing == "chunked-and-length":
                    head += b"content-length: 10\r\n"
                chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.body), self.body)
                await sock.send(head + b"transfer-encoding: chunked\r\n\r\n" + chunk)


@contextlib.asynccontextmanager
async def raw_upstream(upstream: RawUpstream) -> AsyncIterator[str]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, upstream.handle)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


CUT_GENERIC = b"data: part 1 of 5\n\ndata: part 2 of 5\n\n"  # and then the connection closed
CUT_JSON = b'{"answer": "part 1 of 5, part 2'  # (the same, for a stream=false request)


@pytest.mark.parametrize(
    ("route", "body", "framing", "stored"),
    [
        ("generic", CUT_GENERIC, "close", False),  # a cut cannot be told from the end
        ("generic", CUT_GENERIC, "chunked", True),  # the upstream said this is the end
        ("generic", CUT_GENERIC, "length", True),
        ("chat", chat_sse("whole"), "close", True),  # its completing event says it is whole
        ("generic", CUT_JSON, "close", False),
    ],
    ids=["generic-close", "generic-chunked", "generic-length", "chat-close", "generic-json"],
)
async def test_a_generic_body_that_ends_as_its_connection_closes_is_not_stored(
    serve: Serve, tmp_path: Path, route: str, body: bytes, framing: str, stored: bool
) -> None:
    # An HTTP/1 upstream that sends no length and no chunks ends its body by closing the
    # connection, as a cut does: a generic stream (no completing event) cut after two of
    # five events was stored and replayed as a whole answer (helper-132). Its client gets
    # the bytes as they came, as it would from the upstream; nothing is stored or shared.
    upstream = RawUpstream(body, framing)
    async with raw_upstream(upstream) as upstream_url:
        path = "/v1/generate" if route == "generic" else CHAT
        routes = {"/v1/generate": GenericSSE} if route == "generic" else None
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}", routes=routes)
        async with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            said = []
            for _ in range(2):
                asked = chat_body("cut", stream=not body.startswith(b"{"))
                status, head, got = await exchange((host, int(port)), post(path, asked))
                assert status == 200 and body.splitlines()[max(-3, -len(body.splitlines()))] in got
                said.append(head.split(b"\r\nx-sse-cache: ")[1].split(b"\r\n")[0])
            await app.aclose()
    assert said == ([b"miss", b"hit"] if stored else [b"miss", b"miss"])
    assert upstream.calls == (1 if stored else 2)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/other"])
async def test_an_answer_framed_chunked_with_a_length_too_reaches_the_client_whole(
    serve: Serve, tmp_path: Path, route: str
) -> None:
    import httpx2

    # Chunked wins over a Content-Length (RFC 9112 §6.3), which an intermediary must remove:
    # passed back, the client got the 200 and 0 bytes, cut at "content-length: 10", on every
    # route (helper-165). Now the whole answer, and on a cached route it is stored.
    upstream = RawUpstream(chat_sse("chunked and a length"), "chunked-and-length")
    async with raw_upstream(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(app) as url, httpx2.AsyncClient(base_url=url) as client:
            said = []
            for _ in range(2):
                answer = await client.post(
                    route, content=chat_body("both framings"), headers={"authorization": "k"}
                )
                assert answer.status_code == 200 and answer.content == upstream.body
                said.append(answer.headers.get("x-sse-cache"))
            await app.aclose()
    assert said == (["miss", "hit"] if route.startswith("/v1/chat") else [None, None])


async def test_a_request_without_a_user_agent_or_accept_goes_upstream_without_them(
    proxy: Proxy,
) -> None:
    # The forwarding client's defaults (python-httpx2's user-agent, accept: */*) were added
    # to a request that had neither (helper-132): the upstream was told of another client.
    await exchange(proxy.address, post(CHAT, chat_body("no agent")))
    await exchange(proxy.address, post(CHAT, chat_body("an agent"), "user-agent: mine/1"))
    first, second = proxy.upstream.requests
    assert "user-agent" not in first.headers and "accept" not in first.headers
    assert second.headers["user-agent"] == "mine/1"


async def test_a_generic_body_that_ends_as_its_connection_closes_is_not_shared(
    serve: Serve, tmp_path: Path
) -> None:
    # Not stored, and not passed on to an identical request following it live either: its
    # end says nothing of a cut. The follower asks the upstream for itself (never a partial
    # answer ended cleanly as a shared one).
    import httpx2

    from sse_cache.testing import metric_value

    upstream = RawUpstream(CUT_GENERIC, "close", gate=anyio.Event())
    routes = {"/v1/generate": GenericSSE}
    async with raw_upstream(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}", routes=routes)
        async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=30) as client:
            said: list[str] = []

            async def ask() -> None:
                body = {"prompt": "herd", "stream": True}
                key = {"authorization": "k"}
                answer = await client.post("/v1/generate", json=body, headers=key)
                assert answer.status_code == 200 and b"part 2 of 5" in answer.content
                said.append(answer.headers["x-sse-cache"])

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                await upstream.arrived.wait()  # the first is upstream, its answer held
                tg.start_soon(ask)
                with anyio.fail_after(DEADLOCK_GUARD):
                    while True:  # the second follows the first's live stream
                        scrape = (await client.get("/_sse_cache/metrics")).text
                        if metric_value(scrape, "sse_cache_live_stream_followers") == 1:
                            break
                        await anyio.sleep(0.01)  # (a condition polled on another server)
                upstream.gate.set()
            await app.aclose()
    assert said == ["miss", "miss"]
    assert upstream.calls == 2


@dataclass
class SlowHeadUpstream:
    """An upstream that answers a streamed chat answer once :attr:`head` is set (its time to
    first byte), and notes when its client (the proxy) leaves before that."""

    head: anyio.Event = field(default_factory=anyio.Event)
    calls: int = 0
    gone: int = 0  # requests whose client left before the head
    left: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.calls += 1
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                if (await receive())["type"] == "http.disconnect":
                    self.gone += 1
                    self.left.set()
                    tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.head.wait()
            tg.cancel_scope.cancel()
        if self.left.is_set():
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEAD})
        await send({"type": "http.response.body", "body": chat_sse(body.decode())})


SSE_HEAD = [(b"content-type", b"text/event-stream")]


@pytest.mark.parametrize("prompt", [10, 400_000], ids=["one-message", "many-messages"])
@pytest.mark.parametrize("path", [CHAT, "/v1/embeddings"])
async def test_a_client_leaving_before_the_upstreams_head_cancels_the_upstream_request(
    serve: Serve, path: str, prompt: int
) -> None:
    # No one else waits: the upstream's request is cancelled as the client leaves, during
    # the upstream's time to first byte — not once the head comes (helper-138: the proxy
    # watched its client only after sending the head; the docs say it is cancelled). Also
    # for a body that came in many messages (a long prompt: the server reads a socket
    # ~256 KiB at a time), watched once all of it has gone upstream (helper-140).
    upstream = SlowHeadUpstream()
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, "memory://")
        try:
            async with serve(app) as url:
                host, port = url.removeprefix("http://").split(":")
                async with await anyio.connect_tcp(host, int(port)) as sock:
                    await sock.send(post(path, chat_body("leaving early" + "x" * prompt)))
                    with anyio.fail_after(DEADLOCK_GUARD):
                        while not upstream.calls:  # noqa: ASYNC110 - the upstream's record
                            await anyio.sleep(0.01)
                with anyio.fail_after(DEADLOCK_GUARD):
                    await upstream.left.wait()  # (the head is never released)
                assert upstream.gone == 1
        finally:
            await app.aclose()


async def test_followers_keep_the_upstream_of_a_client_that_left_before_its_head(
    serve: Serve,
) -> None:
    # Identical requests wait for the stream; the first one's client leaves, and the proxy
    # reads its disconnect before the upstream's head comes: the upstream's answer is not
    # cut for them.
    from flights_seen import FlightsSeen

    upstream, seen = SlowHeadUpstream(), FlightsSeen()
    body = chat_body("a herd")
    gone_read = anyio.Event()  # the proxy read a client's disconnect

    async def probed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def receiving() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone_read.set()
            return message

        await app(scope, receiving, send)

    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, "memory://", hooks=[seen])
        try:
            async with serve(probed) as url:
                host, port = url.removeprefix("http://").split(":")
                followers: list[tuple[int, bytes, bytes]] = []

                async def follow() -> None:
                    followers.append(await exchange((host, int(port)), post(CHAT, body)))

                async with anyio.create_task_group() as tg:
                    async with await anyio.connect_tcp(host, int(port)) as sock:
                        await sock.send(post(CHAT, body))
                        with anyio.fail_after(DEADLOCK_GUARD):
                            while not upstream.calls:  # noqa: ASYNC110 - the upstream's record
                                await anyio.sleep(0.01)
                        for _ in range(3):
                            tg.start_soon(follow)
                        with anyio.fail_after(DEADLOCK_GUARD):
                            while seen.followers() < 3:  # noqa: ASYNC110
                                await anyio.sleep(0.01)
                    with anyio.fail_after(DEADLOCK_GUARD):
                        await gone_read.wait()
                    upstream.head.set()
                shared = [
                    (status, b"\r\nx-sse-cache: shared" in head) for status, head, _ in followers
                ]
                assert shared == [(200, True)] * 3
                assert all(b"[DONE]" in got for _, _, got in followers)
                assert (upstream.calls, upstream.gone) == (1, 0)
        finally:
            await app.aclose()


async def test_the_proxy_changes_the_scope_it_was_given_in_place(
    serve: Serve, tmp_path: Path
) -> None:
    # What the proxy makes of a request (its origin-form target, a new header list without
    # what Connection names — httptools appends trailers to the list it handed over —, the
    # upgrade offer to check) is in the scope it was given, not in a copy of it: middleware
    # around it sees what the app saw (helper-159, helper-163).
    upstream = RecordingUpstream()
    seen: list[tuple[dict[str, Any], list[Any]]] = []
    async with serve(upstream) as upstream_url:
        app = create_proxy_app(upstream_url, f"sqlite:///{tmp_path / 'c.db'}")

        async def around(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append((scope, scope["headers"]))
            await app(scope, receive, send)

        async with serve(around) as url:
            host, port = url.removeprefix("http://").split(":")
            request = post(CHAT, chat_body("in place"), "x-hop: 1").replace(
                b"connection: close", b"connection: close, x-hop"
            )
            request = request.replace(
                f"POST {CHAT} ".encode(), f"POST http://a.test{CHAT} ".encode()
            )
            status, head, _ = await exchange((host, int(port)), request)
            assert status == 200 and b"\r\nx-sse-cache: miss" in head, head
        await app.aclose()
    ((scope, servers_list),) = seen
    assert scope["path"] == CHAT and scope["raw_path"] == CHAT.encode()
    assert scope["headers"] is not servers_list and (b"x-hop", b"1") in servers_list
    assert (b"x-hop", b"1") not in scope["headers"]
    assert "x-hop" not in upstream.requests[0].headers

"""An upstream that writes past the end of a response on a keep-alive connection: its excess
never becomes the next request's response.

The upstream here answers the first request on each connection twice, in one write (a
handler that wrote its response twice): the second copy is a whole response of its own,
and it reaches the client's HTTP library in the same read as the first. Reused, the
connection would hand that copy — the first tenant's answer — to whatever request is sent on
it next: another tenant's, which the cache would then relay and store under its own key. The
proxy's connections and the cache transports' inner transports close such a connection
(see ``sse_cache._upstream_connections``); these tests fail if the HTTP library's internals
that this relies on change.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import sse_cache.httpx
import sse_cache.httpx2
from forked import forked, received
from sse_cache.events import serialize_sse
from sse_cache.proxy import create_proxy_app
from sse_cache.testing import responses_stream

DEADLOCK_GUARD = 30  # seconds: only a hung connection ever reaches it


def answer(question: str) -> bytes:
    return serialize_sse(responses_stream(question, text_deltas=3))


def response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


class RawUpstream:
    """A raw HTTP/1.1 upstream on loopback (a thread per connection) that answers the first
    request on each connection with its response written twice if ``twice``, and every other
    request once. With ``tls`` (a server context), over TLS: the two copies are two writes,
    two TLS records, corked into one TCP segment (the second waits below h11, in the
    client's TLS layer); else one write. ``questions`` lists the questions it was asked,
    ``connections`` how many connections it accepted, ``ended`` how many of them the client
    closed."""

    def __init__(self, twice: bool, tls: ssl.SSLContext | None = None) -> None:
        self.twice, self.tls = twice, tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}"
        self.questions: list[str] = []
        self.connections = 0
        self.ended = 0  # connections the client closed
        self._sockets: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            self._sockets.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            if self.tls is not None:
                connection = self.tls.wrap_socket(connection, server_side=True)
                self._sockets.append(connection)  # (the plain one is detached)
            reader = connection.makefile("rb")
            first = True
            while head := reader.readline():
                length = 0
                while head not in (b"\r\n", b""):
                    name, _, value = head.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    head = reader.readline()
                question = json.loads(reader.read(length))["input"]
                self.questions.append(question)
                one = response(answer(question))
                if not (first and self.twice):
                    connection.sendall(one)
                elif self.tls is None:
                    connection.sendall(one + one)
                else:
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    connection.sendall(one)
                    connection.sendall(one)
                    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                first = False
            self.ended += 1  # (the client closed it: every copy of its socket)
        except OSError:
            pass  # the client closed the connection

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close would not)
        self._listener.close()
        for connection in self._sockets:
            connection.close()
        self._accepting.join()


@pytest.fixture(params=[True, False], ids=["excess", "sound"])
def upstream(request: pytest.FixtureRequest) -> Iterator[RawUpstream]:
    server = RawUpstream(twice=request.param)
    yield server
    server.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(params=[True, False], ids=["excess", "sound"])
def tls_upstream(
    request: pytest.FixtureRequest, certificate: tuple[Path, Path]
) -> Iterator[RawUpstream]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server = RawUpstream(twice=request.param, tls=context)
    yield server
    server.close()


def trusting(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


#: (question, API key, x-sse-cache): the first tenant's request is answered (twice, in one
#: write); the second tenant's, sent on the connection the first left idle, must reach the
#: upstream and get its own answer, which the cache then holds.
EXCHANGES = [
    ("tenant one's question", "sk-one", "miss"),
    ("tenant two's question", "sk-two", "miss"),
    ("tenant two's question", "sk-two", "hit"),
]
ASKED = ["tenant one's question", "tenant two's question"]


def check_upstream(upstream: RawUpstream) -> None:
    assert upstream.questions == ASKED
    # The connection left holding the excess was closed, and the next request opened
    # another; a sound upstream's connection is kept and used again.
    assert upstream.connections == (2 if upstream.twice else 1)


def request(question: str, key: str) -> dict[str, Any]:
    return {
        "url": "/v1/responses",
        "json": {"model": "gpt-mock-1", "input": question, "stream": True},
        "headers": {"authorization": f"Bearer {key}"},
    }


async def exchange(client: Any) -> None:
    """The :data:`EXCHANGES` through an async client: each answered as it should be."""
    for question, key, outcome in EXCHANGES:
        got = await client.post(**request(question, key))
        assert got.status_code == 200, got.text
        assert (got.headers["x-sse-cache"], got.content) == (outcome, answer(question))


def exchange_sync(client: Any) -> None:
    """:func:`exchange` through a sync client."""
    for question, key, outcome in EXCHANGES:
        got = client.post(**request(question, key))
        assert got.status_code == 200, got.text
        assert (got.headers["x-sse-cache"], got.content) == (outcome, answer(question))


def cache_of(lib: Any) -> Any:
    """The cache transports' module for the HTTP library ``lib``."""
    return {httpx2: sse_cache.httpx2, httpx: sse_cache.httpx}[lib]


def through_environment_proxy(monkeypatch: pytest.MonkeyPatch, proxy: str, *, no: str = "") -> None:
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    if no:
        monkeypatch.setenv("NO_PROXY", no)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the proxy's forwarder: httpx2, asyncio
async def test_the_proxy_never_reads_an_upstreams_excess_as_the_next_response(
    serve: Any, upstream: RawUpstream
) -> None:
    app = create_proxy_app(upstream.url, "memory://", access_log=False)
    try:
        with anyio.fail_after(DEADLOCK_GUARD):
            async with serve(app) as base, httpx2.AsyncClient(base_url=base) as client:
                await exchange(client)
    finally:
        await app.aclose()
    check_upstream(upstream)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the proxy's forwarder: httpx2, asyncio
async def test_the_proxy_forwards_through_the_environments_proxy_and_never_reads_its_excess(
    serve: Any, upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTP_PROXY names a forward proxy (here the raw upstream answers as one): the forwarder
    # goes through it (the upstream's name is never looked up), and a connection to it left
    # holding excess is closed too.
    through_environment_proxy(monkeypatch, upstream.url)
    app = create_proxy_app("http://upstream.invalid", "memory://", access_log=False)
    try:
        with anyio.fail_after(DEADLOCK_GUARD):
            async with (
                serve(app) as base,
                httpx2.AsyncClient(base_url=base, trust_env=False) as client,  # (straight)
            ):
                await exchange(client)
    finally:
        await app.aclose()
    check_upstream(upstream)


LIBRARIES = pytest.mark.parametrize("lib", [httpx2, httpx], ids=["httpx2", "httpx"])
#: The cache transport's inner transport: its default, or the library's own given to it.
INNER = pytest.mark.parametrize("given", [False, True], ids=["default", "given"])


@pytest.mark.anyio
@LIBRARIES
@INNER
async def test_the_async_transport_never_reads_an_upstreams_excess(
    upstream: RawUpstream, lib: Any, given: bool
) -> None:
    cached = cache_of(lib)
    inner = lib.AsyncHTTPTransport(retries=1) if given else None
    transport = cached.AsyncCacheTransport("memory://", inner)
    with anyio.fail_after(DEADLOCK_GUARD):
        async with lib.AsyncClient(base_url=upstream.url, transport=transport) as client:
            await exchange(client)
    check_upstream(upstream)


@LIBRARIES
@INNER
def test_the_sync_transport_never_reads_an_upstreams_excess(
    upstream: RawUpstream, lib: Any, given: bool
) -> None:
    cached = cache_of(lib)
    inner = lib.HTTPTransport(retries=1) if given else None
    transport = cached.CacheTransport("memory://", inner)
    with lib.Client(base_url=upstream.url, transport=transport, timeout=DEADLOCK_GUARD) as client:
        exchange_sync(client)
    check_upstream(upstream)


@pytest.mark.anyio
@LIBRARIES
async def test_the_async_transport_never_reads_an_upstreams_excess_over_tls(
    tls_upstream: RawUpstream, lib: Any, certificate: tuple[Path, Path]
) -> None:
    # The copy is a TLS record of its own in the segment that brought the answer's end:
    # anyio's and trio's TLS streams hold it undecrypted, below h11.
    cached = cache_of(lib)
    inner = lib.AsyncHTTPTransport(verify=trusting(certificate))
    transport = cached.AsyncCacheTransport("memory://", inner)
    with anyio.fail_after(DEADLOCK_GUARD):
        async with lib.AsyncClient(base_url=tls_upstream.url, transport=transport) as client:
            await exchange(client)
    check_upstream(tls_upstream)


@LIBRARIES
def test_the_sync_transport_never_reads_an_upstreams_excess_over_tls(
    tls_upstream: RawUpstream, lib: Any, certificate: tuple[Path, Path]
) -> None:
    cached = cache_of(lib)
    inner = lib.HTTPTransport(verify=trusting(certificate))
    transport = cached.CacheTransport("memory://", inner)
    with lib.Client(
        base_url=tls_upstream.url, transport=transport, timeout=DEADLOCK_GUARD
    ) as client:
        exchange_sync(client)
    check_upstream(tls_upstream)


@pytest.mark.anyio
@LIBRARIES
async def test_the_async_transports_default_goes_through_the_environments_proxy(
    upstream: RawUpstream, lib: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the SDK's own client would (helper-170: a bare transport went around the proxy a
    # program was told to use); the upstream's name is never looked up. The raw upstream
    # answers as the proxy, and a connection to it left holding excess is closed too.
    through_environment_proxy(monkeypatch, upstream.url)
    cached = cache_of(lib)
    transport = cached.AsyncCacheTransport("memory://")
    with anyio.fail_after(DEADLOCK_GUARD):
        async with lib.AsyncClient(base_url="http://upstream.invalid", transport=transport) as c:
            await exchange(c)
    check_upstream(upstream)


@LIBRARIES
def test_the_sync_transports_default_goes_through_the_environments_proxy_but_for_no_proxy(
    upstream: RawUpstream, lib: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = cache_of(lib)
    through_environment_proxy(monkeypatch, upstream.url)
    with lib.Client(
        base_url="http://upstream.invalid",
        transport=cached.CacheTransport("memory://"),
        timeout=DEADLOCK_GUARD,
    ) as client:
        exchange_sync(client)
    check_upstream(upstream)
    # A host NO_PROXY names is reached directly (the proxy named here listens nowhere).
    with socket.create_server(("127.0.0.1", 0)) as nowhere:
        dead = f"http://127.0.0.1:{nowhere.getsockname()[1]}"
    through_environment_proxy(monkeypatch, dead, no="127.0.0.1")
    with lib.Client(
        base_url=upstream.url, transport=cached.CacheTransport("memory://"), timeout=30
    ) as client:
        got = client.post(**request("asked directly", "sk-three"))
        assert (got.status_code, got.content) == (200, answer("asked directly"))


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: threads
@LIBRARIES
@INNER
def test_a_forked_child_never_sends_on_its_parents_connection(lib: Any, given: bool) -> None:
    # A client built and used at import, then workers forked (gunicorn, Celery): the pool's
    # idle connection was the parent's socket too, and the two processes' requests and
    # answers interleaved on it — a tenant's answer read, and stored, as another's
    # (helper-172). The child opens its own; the parent keeps its.
    server = RawUpstream(twice=False)
    try:
        inner = lib.HTTPTransport() if given else None
        transport = cache_of(lib).CacheTransport("memory://", inner)
        with lib.Client(base_url=server.url, transport=transport, timeout=30) as client:
            asked = client.post(**request("the parent's question", "sk-parent"))
            assert asked.content == answer("the parent's question")
            assert server.connections == 1

            def child(conn: Any) -> None:
                got = client.post(**request("the child's question", "sk-child"))
                conn.send((got.headers["x-sse-cache"], got.content))
                conn.recv()  # (alive until the parent has closed its connection)

            with forked(child) as conn:
                assert received(conn) == ("miss", answer("the child's question"))
                assert server.connections == 2  # the child's own
                again = client.post(**request("the parent's second question", "sk-parent"))
                assert again.content == answer("the parent's second question")
                assert server.connections == 2  # the parent's, used again
                client.close()
                # The child, alive, keeps no copy of the parent's connection open: closed by
                # the parent, it ends (helper-174: it stayed open for the child's life).
                deadline = time.monotonic() + 30  # a deadlock guard, not a timing bound
                while server.ended < 1:
                    assert time.monotonic() < deadline, "the parent's connection stayed open"
                    time.sleep(0.01)
                conn.send("done")
    finally:
        server.close()


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: threads
@LIBRARIES
def test_a_forked_child_never_sends_on_its_parents_connection_on_trio(lib: Any) -> None:
    # The async transport used in a trio.run at import, then a worker forked that runs its
    # own: trio's sockets are no event loop's, and the child's requests went out on the
    # parent's connection — parent and child read each other's answers, and stored them
    # (helper-173).
    import trio

    server = RawUpstream(twice=False)
    try:
        client = lib.AsyncClient(
            base_url=server.url, transport=cache_of(lib).AsyncCacheTransport("memory://")
        )

        async def ask(question: str, key: str) -> tuple[str, bytes]:
            got = await client.post(**request(question, key))
            return got.headers["x-sse-cache"], got.content

        assert trio.run(ask, "the parent's question", "sk-parent")[1] == answer(
            "the parent's question"
        )

        def child(conn: Any) -> None:
            conn.send(trio.run(ask, "the child's question", "sk-child"))

        with forked(child) as conn:
            assert received(conn) == ("miss", answer("the child's question"))
        assert server.connections == 2  # the child's own
        again = trio.run(ask, "the parent's second question", "sk-parent")
        assert again == ("miss", answer("the parent's second question"))
        assert server.connections == 2  # the parent's, used again
        trio.run(client.aclose)
    finally:
        server.close()


def test_a_pool_of_the_older_layout_forgets_its_parents_connections_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # httpcore before 1.0.3 (which httpx 0.28 accepts) kept its connections in ``_pool`` and
    # its lock in ``_pool_lock``: the child went on with the parent's, silently
    # (helper-174). Both layouts are known; another is said, not passed over.
    import threading

    from sse_cache._upstream_connections import _ForgottenAtFork

    class OlderPool:
        def __init__(self) -> None:
            self._pool = ["the parent's connection"]
            self._requests = ["the parent's request"]
            self._pool_lock = threading.Lock()

    pool = OlderPool()
    parents_lock = pool._pool_lock
    parents_lock.acquire()  # (held by a thread of the parent at the fork)
    _ForgottenAtFork(pool)._forked()
    assert pool._pool == [] and pool._requests == []
    assert pool._pool_lock is not parents_lock and pool._pool_lock.acquire(blocking=False)

    class Unknown:
        pass

    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        _ForgottenAtFork(Unknown())._forked()
    assert "cannot tell which upstream connections its parent opened" in caplog.text

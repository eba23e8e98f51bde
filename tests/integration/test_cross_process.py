"""Cross-process single-flight: ``sse-cache proxy --cross-process`` as real OS processes on one
Redis, in front of one upstream, over loopback HTTP — a herd spread over both released at
once, and a producer process killed with SIGKILL before and after it answered."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest
import redis.asyncio as aioredis

from flights_seen import FlightsSeen
from sse_cache import ConfigError, serialize_sse
from sse_cache.asgi import CacheMiddleware
from sse_cache.testing import GatedUpstream, MockUpstream, responses_stream

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

HEADERS = {"authorization": "Bearer sk-cross"}
LEASE = 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def proxy_process(upstream: str, backend: str) -> AsyncIterator[tuple[str, Any]]:
    """``sse-cache proxy --cross-process`` in a process of its own; yields its URL and the
    process."""
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting a process does not block for long
        [
            sys.executable,
            "-m",
            "sse_cache",
            "proxy",
            "--upstream",
            upstream,
            "--port",
            str(port),
            "--backend",
            backend,
            "--cross-process",
            "--cross-process-lease",
            str(LEASE),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with anyio.fail_after(30):
            async with httpx2.AsyncClient() as client:
                while True:
                    assert proc.poll() is None, "the proxy exited"
                    try:
                        await client.get(url + "/_sse_cache/health", timeout=1)
                        break
                    except httpx2.HTTPError:
                        await anyio.sleep(0.05)  # polling a process that is starting
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        await anyio.to_thread.run_sync(proc.wait)


@asynccontextmanager
async def two_proxies(
    serve: Any, redis_url: str, upstream_app: MockUpstream
) -> AsyncIterator[tuple[str, tuple[str, Any], tuple[str, Any]]]:
    """The upstream, and two proxy processes in front of it on one Redis (a fresh prefix):
    yields the prefix and each proxy's URL and process."""
    prefix = f"x{uuid.uuid4().hex[:8]}:"
    backend = f"{redis_url}?prefix={prefix}"
    async with (
        serve(upstream_app) as upstream,
        proxy_process(upstream, backend) as one,
        proxy_process(upstream, backend) as two,
    ):
        yield prefix, one, two


@asynccontextmanager
async def two_workers(
    serve: Any, redis_url: str, upstream_app: Any, hooks: Sequence[Any] = ()
) -> AsyncIterator[tuple[Any, httpx2.AsyncClient, Any, httpx2.AsyncClient]]:
    """The upstream, and two async transports with cross-process single-flight on one Redis
    (a fresh prefix), as two workers: yields each transport and its client. ``hooks``: the
    first worker's."""
    from sse_cache.httpx2 import AsyncCacheTransport

    url = f"{redis_url}?prefix=w{uuid.uuid4().hex[:8]}:"
    async with serve(upstream_app) as upstream:
        ta = AsyncCacheTransport(url, cross_process=True, cross_process_lease=LEASE, hooks=hooks)
        tb = AsyncCacheTransport(url, cross_process=True, cross_process_lease=LEASE)
        async with (
            httpx2.AsyncClient(transport=ta, base_url=upstream, timeout=30) as ca,
            httpx2.AsyncClient(transport=tb, base_url=upstream, timeout=30) as cb,
        ):
            yield ta, ca, tb, cb


async def herd(
    bases: tuple[str, ...], payload: dict[str, Any], count: int
) -> list[httpx2.Response]:
    """``count`` identical streamed requests spread over the proxies at ``bases``, released
    together."""
    go = anyio.Event()
    results: list[httpx2.Response] = []
    limits = httpx2.Limits(max_connections=100)
    async with httpx2.AsyncClient(timeout=30, limits=limits) as client:

        async def one(base: str) -> None:
            await go.wait()
            results.append(await client.post(base + "/v1/responses", json=payload, headers=HEADERS))

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, bases[i % len(bases)])
            go.set()
    return results


async def streamed(
    client: httpx2.AsyncClient, base: str, payload: dict[str, Any]
) -> httpx2.Response:
    """The streamed response of one request to the proxy at ``base``, body not read yet."""
    request = client.build_request("POST", base + "/v1/responses", json=payload, headers=HEADERS)
    return await client.send(request, stream=True)


@asynccontextmanager
async def two_proxy_apps(
    serve: Any, upstream_app: Any, backend: str, lease: float = LEASE, **more: Any
) -> AsyncIterator[tuple[str, str, httpx2.AsyncClient]]:
    """The upstream, and two proxies with cross-process single-flight in this process (two
    workers' apps) on ``backend`` (with ``more`` options): yields their URLs and a client."""
    from sse_cache.proxy import create_proxy_app

    options: dict[str, Any] = {"cross_process": True, "cross_process_lease": lease, **more}
    async with serve(upstream_app) as upstream:
        app_a = create_proxy_app(upstream, backend, **options)
        app_b = create_proxy_app(upstream, backend, **options)
        try:
            async with (
                serve(app_a) as pa,
                serve(app_b) as pb,
                httpx2.AsyncClient(timeout=30) as client,
            ):
                yield pa, pb, client
        finally:
            await app_a.aclose()
            await app_b.aclose()


async def lead_and_follow(
    client: httpx2.AsyncClient, pa: str, pb: str, payload: dict[str, Any]
) -> tuple[httpx2.Response, httpx2.Response]:
    """The same streamed request to the proxy at ``pa`` (it leads) then at ``pb`` (it
    follows the first over Redis); their responses, bodies not read yet."""
    producer = await streamed(client, pa, payload)
    assert producer.headers["x-sse-cache"] == "miss"
    follower = await streamed(client, pb, payload)
    assert follower.headers["x-sse-cache"] == "shared"
    return producer, follower


def complete(content: bytes) -> bool:
    return content.rstrip().split(b"\n\n")[-1].startswith(b"event: response.completed")


@pytest.mark.anyio
@asyncio_only
async def test_a_herd_over_two_processes_makes_one_upstream_call(
    serve: Any, redis_server: Any
) -> None:
    upstream_app = MockUpstream(first_delay=0.3, delay=0.002)
    payload = {"model": "gpt-mock", "input": "one upstream call for two workers", "stream": True}
    async with two_proxies(serve, redis_server.url, upstream_app) as (_, (p1, _), (p2, _)):
        results = await herd((p1, p2), payload, 40)
    statuses = Counter(r.headers["x-sse-cache"] for r in results)
    assert upstream_app.stats()["total"] == 1, statuses
    assert statuses["miss"] == 1 and statuses["shared"] == 39, statuses
    assert len({r.content for r in results}) == 1 and complete(results[0].content)


async def a_read_blocks(redis_url: str) -> None:
    """Return once a client of the Redis at ``redis_url`` is blocked in ``XREAD``: a follower
    in another process waits for its producer's next message (here, its head)."""
    client = aioredis.from_url(redis_url)
    try:
        while not any(c["cmd"] == "xread" for c in await client.client_list()):  # noqa: ASYNC110
            await anyio.sleep(0.01)  # (Redis's count of blocked readers: nothing to wait on)
    finally:
        await client.aclose()


async def lock_ttls(redis_url: str, prefix: str) -> list[int]:
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}l:sf:*")]
        return [int(await client.pttl(k)) for k in keys]
    finally:
        await client.aclose()


@pytest.mark.anyio
@asyncio_only
async def test_a_killed_producer_fails_its_followers_visibly_and_frees_its_lease(
    serve: Any, redis_server: Any
) -> None:
    # After the producer answered: its followers in other processes hold part of an answer,
    # so their responses fail (never a clean end); the lease it held runs out within LEASE
    # seconds, and the next identical request is answered in full.
    upstream_app = MockUpstream(first_delay=0.05, delay=0.02)
    payload = {"model": "gpt-mock", "input": "the producer dies mid-answer", "stream": True}
    async with two_proxies(serve, redis_server.url, upstream_app) as (prefix, one, two):
        (p1, proc1), (p2, _) = one, two
        async with httpx2.AsyncClient(timeout=30) as client:
            producer = await streamed(client, p1, payload)
            assert producer.headers["x-sse-cache"] == "miss"
            produced = producer.aiter_raw()
            first = await produced.__anext__()
            follower = await streamed(client, p2, payload)
            assert follower.headers["x-sse-cache"] == "shared"
            followed = follower.aiter_raw()
            got = await followed.__anext__()
            assert first.startswith(got[: len(first)]) or got.startswith(first)
            os.kill(proc1.pid, signal.SIGKILL)
            ttls = await lock_ttls(redis_server.url, prefix)
            assert ttls and all(0 < t <= LEASE * 1000 for t in ttls), ttls
            with pytest.raises(httpx2.HTTPError):
                async for _ in followed:
                    pass
            await producer.aclose()
            again = await client.post(p2 + "/v1/responses", json=payload, headers=HEADERS)
    assert again.status_code == 200 and complete(again.content)
    assert again.headers["x-sse-cache"] in ("miss", "hit")


@pytest.mark.anyio
@asyncio_only
async def test_followers_take_over_from_a_producer_killed_before_it_answered(
    serve: Any, redis_server: Any
) -> None:
    # Killed while waiting for its upstream (time to first byte): the followers have been
    # sent nothing, so one of them asks the upstream itself and the others follow it.
    upstream_app = MockUpstream(first_delay=2.0, delay=0.002)
    payload = {"model": "gpt-mock", "input": "the producer dies early", "stream": True}
    async with two_proxies(serve, redis_server.url, upstream_app) as (prefix, one, two):
        (p1, proc1), (p2, _) = one, two
        async with httpx2.AsyncClient(timeout=30) as client:
            results: list[httpx2.Response] = []

            async def follow() -> None:
                results.append(
                    await client.post(p2 + "/v1/responses", json=payload, headers=HEADERS)
                )

            async with anyio.create_task_group() as tg:
                request = client.build_request(
                    "POST", p1 + "/v1/responses", json=payload, headers=HEADERS
                )
                producing = await _send_in_background(tg, client, request)
                with anyio.fail_after(10):
                    # Another process's state: polled, there is no event to wait on.
                    while not await lock_ttls(redis_server.url, prefix):  # noqa: ASYNC110
                        await anyio.sleep(0.01)  # until the producer holds its lease
                for _ in range(3):
                    tg.start_soon(follow)
                while upstream_app.stats()["total"] < 1:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # until the upstream was asked
                os.kill(proc1.pid, signal.SIGKILL)
                producing.cancel()
    assert len(results) == 3
    assert all(r.status_code == 200 and complete(r.content) for r in results)
    assert len({r.content for r in results}) == 1
    assert upstream_app.stats()["total"] == 2  # the dead producer's call, and the taker's


async def _send_in_background(
    tg: anyio.abc.TaskGroup, client: httpx2.AsyncClient, request: httpx2.Request
) -> anyio.CancelScope:
    scope = anyio.CancelScope()

    async def run() -> None:
        with scope, contextlib.suppress(httpx2.HTTPError):  # its process is killed
            await client.send(request)

    tg.start_soon(run)
    return scope


def test_cross_process_needs_a_backend_with_leases_and_fan_out() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ConfigError, match="cross_process"):
        CacheMiddleware(app, "memory://", cross_process=True)


@pytest.mark.parametrize(
    ("query", "lease", "warned"),
    [("", 0.1, True), ("", 1.875, True), ("", 1.9, False), ("?timeout=2", 3.0, True)],
)
def test_a_lease_too_short_for_the_backends_timeout_is_warned_of(
    query: str, lease: float, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A producer's write may take 2 x timeout + 0.25 s and its followers wait a lease for
    # the next message: under 3 x timeout + 0.375 s a slow write that succeeds aborts them.
    # Such a lease was accepted silently (helper-101). (Nothing connects: no server needed.)
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        CacheMiddleware(
            app, f"redis://127.0.0.1:9/0{query}", cross_process=True, cross_process_lease=lease
        )
    said = [r.getMessage() for r in caplog.records if "cross_process_lease" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert f"cross_process_lease={lease:g} s" in said[0] and "keep it above" in said[0]


@pytest.mark.anyio
@asyncio_only
async def test_transports_in_two_processes_share_one_upstream_stream(
    serve: Any, redis_server: Any
) -> None:
    upstream_app = MockUpstream(first_delay=0.5, delay=0.002)
    backend = f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:8]}:"
    payload = {"model": "gpt-mock", "input": "two SDK processes", "stream": True}
    script = (
        "import sys, json, httpx2\n"
        "from sse_cache.httpx2 import CacheTransport\n"
        "backend, base, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "t = CacheTransport(backend, cross_process=True)\n"
        "with httpx2.Client(transport=t, base_url=base, timeout=30) as c:\n"
        "    t.portal  # the cache's event loop is up\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()  # released together\n"
        "    r = c.post('/v1/responses', json=body, headers={'authorization': 'Bearer sk-x'})\n"
        "    sys.stdout.buffer.write(r.headers['x-sse-cache'].encode() + b'\\n' + r.content)\n"
    )
    async with serve(upstream_app) as upstream:
        procs = [
            subprocess.Popen(  # noqa: ASYNC220 - starting a process does not block for long
                [sys.executable, "-c", script, backend, upstream, json.dumps(payload)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert await anyio.to_thread.run_sync(proc.stdout.readline) == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        outputs = [await anyio.to_thread.run_sync(p.communicate) for p in procs]
    results = [out.split(b"\n", 1) for out, _ in outputs]
    assert sorted(status for status, _ in results) == [b"miss", b"shared"]
    assert results[0][1] == results[1][1] and complete(results[0][1])
    assert upstream_app.stats()["total"] == 1


# -- in one process, two caches on one Redis (as two workers): regressions found in review ----


def _request(client: httpx2.AsyncClient, payload: dict[str, Any]) -> httpx2.Request:
    return client.build_request("POST", "/v1/responses", headers=HEADERS, json=payload)


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("local_follower", [False, True])
async def test_a_publishing_producer_reads_on_for_other_processes_when_its_client_leaves(
    serve: Any, redis_server: Any, local_follower: bool
) -> None:
    # Worker A leads, worker B follows it over Redis. A's client (and A's own follower, if
    # any) leave early: A cannot count B's readers, so it reads its upstream to the end for
    # them — B gets the whole answer, once, and the lease is released.

    upstream_app = MockUpstream(first_delay=0.3, delay=0.01)
    payload = {"model": "gpt-mock", "input": f"read on ({local_follower})", "stream": True}
    async with two_workers(serve, redis_server.url, upstream_app) as (_ta, ca, tb, cb):
        producer = await ca.send(_request(ca, payload), stream=True)
        assert producer.headers["x-sse-cache"] == "miss"
        own = await ca.send(_request(ca, payload), stream=True) if local_follower else None

        async def read_a_little_and_leave() -> None:
            # Through a transport the producer's client pulls the upstream: it reads
            # (here, one chunk) while B waits for the first bytes, then leaves.
            for response in (producer, own):
                if response is not None:
                    async for _ in response.aiter_raw():
                        break
                    await response.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_a_little_and_leave)
            follower = await cb.send(_request(cb, payload), stream=True)
            assert follower.headers["x-sse-cache"] == "shared"
            body = await follower.aread()
        # A releases its lease when its exchange ends, which comes just after B's last
        # byte (B may finish first). While held, the lease is renewed: it cannot expire
        # meanwhile, so only a release ends the wait.
        lock = "sf:" + producer.headers["x-sse-cache-key"]
        for _ in range(500):
            holder = await tb.service.backend.holder(lock)  # type: ignore[attr-defined]
            if holder is None:
                break
            await anyio.sleep(0.01)
    assert complete(body) and upstream_app.stats()["total"] == 1 and holder is None


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("stopped", ["at the answer", "mid-answer"])
async def test_followers_in_another_process_go_on_without_a_producer_that_stopped_reading(
    serve: Any, redis_server: Any, stopped: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker A's client stops reading without closing its response (google-genai does), and
    # no follower in A looks whether it did: B's follower waited out its read timeout with
    # the answer in hand (helper-116). A's lease keeper looks for them: B's follower gets
    # the whole answer, it is stored, and A's client reading again gets the upstream's
    # bytes exactly.
    import sse_cache.flight

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 0.05)
    events = responses_stream("stopped reading", text_deltas=4)
    gated = GatedUpstream(events, hold_after=len(events) if stopped == "at the answer" else 2)
    whole = b"".join(gated.pieces)
    payload = {"model": "gpt-mock", "input": f"stopped ({stopped})", "stream": True}
    async with two_workers(serve, redis_server.url, gated) as (_ta, ca, _tb, cb):
        producer = await ca.send(_request(ca, payload), stream=True)
        assert producer.headers["x-sse-cache"] == "miss"
        pieces = producer.aiter_raw()
        received = await pieces.__anext__()
        while stopped == "at the answer" and not complete(received):
            received += await pieces.__anext__()
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            follower = await cb.send(_request(cb, payload), stream=True)
            assert follower.headers["x-sse-cache"] == "shared"
            if stopped == "mid-answer":
                gated.gate.set()
            assert await follower.aread() == whole
        again = await cb.post("/v1/responses", headers=HEADERS, json=payload)
        assert again.headers["x-sse-cache"] == "hit" and again.content == whole
        gated.gate.set()
        with anyio.fail_after(30):  # a deadlock guard, not a timing bound
            async for piece in pieces:
                received += piece
        assert received == whole
        await producer.aclose()
    assert gated.calls == 1


@pytest.mark.anyio
@asyncio_only
async def test_the_local_followers_of_a_remote_stream_outlive_its_first_reader(
    serve: Any, redis_server: Any
) -> None:
    # Worker B's first request (B1) follows worker A over Redis; B2 follows B1 in B. B1's
    # client leaves: B2 still gets the whole answer.

    upstream_app = MockUpstream(first_delay=0.3, delay=0.01)
    payload = {"model": "gpt-mock", "input": "local followers of a remote stream", "stream": True}
    async with two_workers(serve, redis_server.url, upstream_app) as (_ta, ca, _tb, cb):
        a = await ca.send(_request(ca, payload), stream=True)
        async with anyio.create_task_group() as tg:
            # Each client reads its own response: through a transport, the producer's
            # client paces the upstream (it pulls it).
            tg.start_soon(a.aread)
            b1 = await cb.send(_request(cb, payload), stream=True)
            b2 = await cb.send(_request(cb, payload), stream=True)
            statuses = [r.headers["x-sse-cache"] for r in (a, b1, b2)]
            assert statuses == ["miss", "shared", "shared"]
            async for _ in b1.aiter_raw():
                break
            await b1.aclose()
            whole = await b2.aread()
        assert whole == a.content
    assert complete(whole) and upstream_app.stats()["total"] == 1


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("cancelled", [0, 1])
async def test_a_local_follower_of_a_remote_stream_cancelled_by_asyncio_spares_the_other(
    serve: Any, redis_server: Any, cancelled: int
) -> None:
    # B1 and B2 follow worker A's stream over Redis, from worker B, reading its channel in
    # turn. One of them is cancelled by asyncio itself (``task.cancel()``, as
    # ``asyncio.timeout`` does; anyio's shield does not stop it) while they wait for A's
    # next piece: the pull under way must finish for the other, who gets the whole answer
    # (helper-67). Each is cancelled in one of the cases: one of them is the one pulling.
    import asyncio

    upstream_app = MockUpstream(first_delay=0.3, delay=0.01)
    payload = {"model": "gpt-mock", "input": f"asyncio cancels B{cancelled + 1}", "stream": True}
    async with two_workers(serve, redis_server.url, upstream_app) as (_ta, ca, _tb, cb):
        a = await ca.send(_request(ca, payload), stream=True)
        producing = asyncio.ensure_future(a.aread())  # A's client paces its upstream
        bs = [await cb.send(_request(cb, payload), stream=True) for _ in range(2)]
        assert [r.headers["x-sse-cache"] for r in (a, *bs)] == ["miss", "shared", "shared"]
        reads = [asyncio.ensure_future(b.aread()) for b in bs]
        await anyio.wait_all_tasks_blocked()
        reads[cancelled].cancel()
        with anyio.fail_after(DEADLOCK_GUARD):
            whole = await reads[1 - cancelled]
            with pytest.raises(asyncio.CancelledError):
                await reads[cancelled]
            await producing
        for b in bs:
            await b.aclose()
    assert whole == a.content and complete(whole) and upstream_app.stats()["total"] == 1


DEADLOCK_GUARD = 30  # seconds: only a hung test ever reaches it
SSE = [("content-type", "text/event-stream")]


class LosePublishes:
    """Makes a service's Redis lose one fan-out publish, the next after :meth:`arm` (the
    others go through; restored when the block is left): it fails (``"fails"``, a Redis
    error) or hangs until cancelled midway (``"cancelled"``, a producer stopped while
    publishing). :attr:`started` is set once that publish began."""

    def __init__(self, backend: Any, mode: str) -> None:
        self.backend = backend
        self.mode = mode
        self.started = anyio.Event()
        self._publish = backend.publish

    async def losing(self, channel: str, data: bytes, *, ttl: float) -> None:
        self.backend.publish = self._publish  # only this one is lost
        self.started.set()
        if self.mode == "fails":
            raise ConnectionError("redis went away for one publish")
        await anyio.sleep_forever()

    def arm(self) -> None:
        """Lose the next publish."""
        self.backend.publish = self.losing

    def __enter__(self) -> LosePublishes:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.backend.publish = self._publish


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize(
    ("mode", "where"),
    [("fails", "midway"), ("cancelled", "midway"), ("fails", "at-the-end")],
)
async def test_a_follower_in_another_process_is_never_told_a_stream_with_a_hole_ended_cleanly(
    redis_server: Any, mode: str, where: str
) -> None:
    # Two services on one Redis, as two workers. A leads and publishes, B follows it over
    # Redis. One of A's publishes is lost (Redis failed, or A was cancelled midway through
    # it): midway through the stream, or the last one, made when A ends its lead. B misses
    # those bytes. A's upstream ended cleanly (A's own client has it all), yet B must be told
    # the stream failed (the failure marker), never given a clean end with a hole in it.
    # (Mutation audit T6: publish_rest ignoring publish_failed. Replaces a test that only
    # read a private flag of a stubbed lease.)
    from sse_cache.flight import SharedStreamAborted
    from sse_cache.http import CacheService

    url = f"{redis_server.url}?prefix=p{uuid.uuid4().hex[:8]}:"
    options: dict[str, Any] = {"cross_process": True, "cross_process_lease": LEASE}
    a, b = CacheService(url, **options), CacheService(url, **options)
    request_headers = {**HEADERS, "content-type": "application/json"}
    prompt = f"a hole ({mode}, {where})"
    body = json.dumps({"model": "gpt-mock", "input": prompt, "stream": True}).encode()
    data = serialize_sse(responses_stream(prompt, text_deltas=6))
    first, lost, last = data[:100], data[100:200], data[200:]
    try:
        with anyio.fail_after(DEADLOCK_GUARD):
            async with AsyncExitStack() as b_side:
                with LosePublishes(a.backend, mode) as losing:
                    async with a.exchange(
                        a.decide("POST", "/v1/responses", request_headers, body), publish=True
                    ) as producer:
                        assert producer.status.value == "miss"
                        tee = await producer.tee(200, SSE)
                        assert tee is not None
                        tee.relay(first)
                        await tee.flush()  # the head and the first bytes reach the channel
                        follower = await b_side.enter_async_context(
                            b.exchange(
                                b.decide("POST", "/v1/responses", request_headers, body),
                                publish=True,
                            )
                        )
                        assert follower.status.value == "shared" and follower.answer is not None
                        chunks = follower.answer.chunks
                        assert await chunks.__anext__() == first
                        if where == "midway":
                            losing.arm()
                            tee.relay(lost)
                            async with anyio.create_task_group() as tg:
                                tg.start_soon(tee.flush)
                                await losing.started.wait()
                                tg.cancel_scope.cancel()  # (a "fails" flush is over already)
                            tee.relay(last)
                            await tee.flush()
                        else:
                            tee.relay(lost + last)  # published when A ends its lead...
                            losing.arm()  # ... and lost then
                        tee.end()
                    # A's lead is over (its exchange was left): B hears how it ended.
                    assert losing.started.is_set()
                rest: list[bytes] = []
                with pytest.raises(SharedStreamAborted):
                    async for chunk in chunks:
                        rest.append(chunk)
                assert not (first + b"".join(rest)).endswith(last)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("mode", ["cancelled", "fails"])
async def test_a_producer_whose_publish_is_lost_fails_its_remote_followers_at_once(
    serve: Any, redis_server: Any, mode: str
) -> None:
    # Worker A (a transport) leads and publishes; worker B follows it over Redis. A publish
    # of what A relayed is lost — A's read is cancelled meanwhile (a timeout around the SDK's
    # iteration), or Redis fails it — then A's client closes the response mid-stream. B has
    # lost those bytes: it must be told the stream failed at once, the lease released and
    # the upstream closed — not be kept on heartbeats until its read timeout with A's lease
    # renewed for ever (helper-66: the lost publish had dropped the lease, yet A still
    # counted as read for other processes, so it handed its upstream over to no one).

    upstream_app = MockUpstream(first_delay=0.2, delay=0.01)
    payload = {"model": "gpt-mock", "input": "cancelled while publishing", "stream": True}
    async with two_workers(serve, redis_server.url, upstream_app) as (ta, ca, tb, cb):
        with (
            anyio.fail_after(DEADLOCK_GUARD),
            LosePublishes(ta.service.backend, mode) as losing,
        ):
            producer = await ca.send(_request(ca, payload), stream=True)
            assert producer.headers["x-sse-cache"] == "miss"
            chunks = producer.aiter_raw()
            await chunks.__anext__()
            await chunks.__anext__()  # the head and first bytes are on the channel
            follower = await cb.send(_request(cb, payload), stream=True)
            assert follower.headers["x-sse-cache"] == "shared"
            losing.arm()
            if mode == "cancelled":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(chunks.__anext__)  # publishes what it relayed, first
                    await losing.started.wait()
                    tg.cancel_scope.cancel()
            else:
                await chunks.__anext__()  # the publish fails; the read goes on
                assert losing.started.is_set()
            await producer.aclose()
            with pytest.raises(httpx2.HTTPError):
                await follower.aread()
            lock = "sf:" + producer.headers["x-sse-cache-key"]
            backend: Any = tb.service.backend
            # (Polling: another service's lease, in Redis, and the upstream's count.)
            while await backend.holder(lock) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            while upstream_app.stats()["in_flight"]:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert upstream_app.stats()["total"] == 1


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("publish", ["goes through", "fails"])
async def test_a_slow_producer_that_no_process_follows_is_not_gone_on_without(
    serve: Any, redis_server: Any, publish: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A leads and publishes; no one follows, in any process. A's client pauses, as a slow
    # one does. A's lease keeper looked at the client for followers in other processes
    # whether or not there were any, and took the stream over: the upstream was read on at
    # full speed into memory, and the client's place there cut once it fell max_entry_bytes
    # behind — or at once, after a publish that failed (fail-open: A's own client must not
    # notice), with no one left to read on (helper-119). The keeper looks only while a
    # process follows (holds the channel's presence), and not after a failed publish: the
    # client reads its upstream itself, and gets the whole body.
    import sse_cache.flight

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 0.05)
    events = responses_stream("slow and followed by no one", text_deltas=6)
    gated = GatedUpstream(events, hold_after=2)
    whole = b"".join(gated.pieces)
    payload = {"model": "gpt-mock", "input": f"slow, no one follows ({publish})", "stream": True}
    seen = FlightsSeen()
    async with two_workers(serve, redis_server.url, gated, hooks=[seen]) as (ta, ca, _tb, _cb):
        with anyio.fail_after(DEADLOCK_GUARD), LosePublishes(ta.service.backend, "fails") as losing:
            producer = await ca.send(_request(ca, payload), stream=True)
            assert producer.headers["x-sse-cache"] == "miss"
            pieces = producer.aiter_raw()
            received = await pieces.__anext__()
            if publish == "fails":
                losing.arm()
                received += await pieces.__anext__()  # publishes what came first: it fails
                assert losing.started.is_set()
            gated.gate.set()
            await anyio.sleep(1.2)  # the client pauses (the keeper looks every 0.05 s)
            # Its live stream is still its own (taken over, it was read to its end meanwhile
            # and ended, or cut).
            assert [flight.flight.producer_reading for flight in seen.live()] == [True]
            async for piece in pieces:
                received += piece
            assert received == whole
            await producer.aclose()
    assert gated.calls == 1


class Joined:
    """A hook counting the requests that joined a live stream (``shared`` notices, in any
    of the proxies it is given to)."""

    def __init__(self) -> None:
        self.count = 0
        self._more = anyio.Event()

    def __call__(self, notice: Any) -> None:
        if notice.kind == "shared":
            self.count += 1
            self._more.set()

    async def then_open(self, followers: int, gate: anyio.Event) -> None:
        """Set ``gate`` once ``followers`` requests have joined."""
        while self.count < followers:
            await self._more.wait()
            self._more = anyio.Event()
        gate.set()


def _delta(text: str) -> bytes:
    data = json.dumps({"type": "response.output_text.delta", "delta": text})
    return f"event: response.output_text.delta\ndata: {data}\n\n".encode()


class BigEvents:
    """An upstream whose stream holds an event larger than the proxies' max_entry_bytes
    between small ones (a clean stream, too large to store). It sends its first small event,
    then waits for :attr:`gate` (the test opens it once the herd has gathered) before the
    rest. (Only one large piece: readers may fall behind by the bound plus one piece.)"""

    def __init__(self, size: int) -> None:
        self.calls = 0
        self.gate = anyio.Event()
        self.body = [
            _delta("first"),
            _delta("x" * size),
            _delta("small"),
            b'event: response.completed\ndata: {"type":"response.completed"}\n\n',
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1  # (nothing else runs in between: one upstream call each)
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        for i, event in enumerate(self.body):
            if i == 1:
                # (The first bytes let a follower in another process open the stream.)
                await self.gate.wait()
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("cross_process", [False, True])
async def test_an_event_larger_than_the_lag_bound_reaches_a_herd_whole(
    serve: Any, redis_server: Any, cross_process: bool
) -> None:
    # One message larger than max_entry_bytes (the bound on how far a reader may fall
    # behind, past the oldest piece it has not read) is not a reader falling behind: every
    # client of the herd, in either process, gets the whole stream (not stored: too large).
    # Before, the producer's client and its local followers were cut as lagging, and a
    # follower in another process got a 500.
    from sse_cache.proxy import create_proxy_app

    upstream_app = BigEvents(40_000)
    backend = f"{redis_server.url}?prefix=b{uuid.uuid4().hex[:8]}:"
    joined = Joined()
    options: dict[str, Any] = {
        "max_entry_bytes": 30_000,
        "cross_process": cross_process,
        "hooks": [joined],
    }
    payload = {"model": "gpt-mock", "input": f"big events ({cross_process})", "stream": True}
    async with serve(upstream_app) as upstream:
        apps = [create_proxy_app(upstream, backend, **options) for _ in range(2)]
        try:
            async with serve(apps[0]) as p1, serve(apps[1]) as p2:
                with anyio.fail_after(DEADLOCK_GUARD):
                    async with anyio.create_task_group() as tg:
                        # The big event goes out once the 7 followers have joined the stream.
                        tg.start_soon(joined.then_open, 7, upstream_app.gate)
                        results = await herd((p1, p2) if cross_process else (p1,), payload, 8)
        finally:
            for app in apps:
                await app.aclose()
    assert [r.status_code for r in results] == [200] * 8
    assert all(r.content == b"".join(upstream_app.body) for r in results)
    assert Counter(r.headers["x-sse-cache"] for r in results) == {"miss": 1, "shared": 7}
    assert upstream_app.calls == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_proxy_reads_on_for_another_process_when_its_own_client_leaves(
    serve: Any, redis_server: Any
) -> None:
    # Two proxies (the middleware, as two workers) on one Redis. A leads; its only follower
    # is B's client, in the other process, which A cannot count. A's client leaves mid-stream:
    # A must read its upstream on for B (not stop it as for a lone client), so B gets the
    # complete answer, once, and it is stored. (Mutation audit T11: client_left ignoring
    # the lease.)
    from sse_cache.proxy import create_proxy_app

    events = responses_stream("read on for the other process", text_deltas=6)
    upstream_app = GatedUpstream(events, hold_after=2)  # held until A's client has left
    backend = f"{redis_server.url}?prefix=r{uuid.uuid4().hex[:8]}:"
    options: dict[str, Any] = {"cross_process": True, "cross_process_lease": LEASE}
    payload = {"model": "gpt-mock", "input": "read on for the other process", "stream": True}
    left = anyio.Event()

    async with serve(upstream_app) as upstream:
        app_a = create_proxy_app(upstream, backend, **options)
        app_b = create_proxy_app(upstream, backend, **options)

        async def watched_a(scope: Any, receive: Any, send: Any) -> None:
            # Proxy A, telling when it hears that its client left: once the receive that
            # says so returns, A has handled it (synchronously, before its next await).
            async def receiving() -> Any:
                message = await receive()
                if message["type"] == "http.disconnect":
                    left.set()
                return message

            await app_a(scope, receiving if scope["type"] == "http" else receive, send)

        try:
            async with (
                serve(watched_a) as pa,
                serve(app_b) as pb,
                httpx2.AsyncClient(timeout=30) as client,
            ):
                with anyio.fail_after(DEADLOCK_GUARD):
                    producer = await streamed(client, pa, payload)
                    assert producer.headers["x-sse-cache"] == "miss"
                    async for _ in producer.aiter_raw():
                        break  # A's client has its first bytes...
                    follower = await streamed(client, pb, payload)
                    assert follower.headers["x-sse-cache"] == "shared"
                    await producer.aclose()  # ... and leaves, while B follows
                    await left.wait()
                    upstream_app.gate.set()
                    whole = await follower.aread()
                    again = await client.post(pb + "/v1/responses", json=payload, headers=HEADERS)
        finally:
            await app_a.aclose()
            await app_b.aclose()
    assert whole == upstream_app.body
    assert again.headers["x-sse-cache"] == "hit" and again.content == whole
    assert upstream_app.calls == 1 and upstream_app.disconnects == 0


@pytest.mark.anyio
@asyncio_only
async def test_a_process_that_leads_after_another_stored_the_answer_replays_it(
    serve: Any, redis_server: Any
) -> None:
    # Worker B looks the key up while worker A's stream is live (a miss), then A stores its
    # answer and lets go of the key, then B takes the lease: B must answer from A's entry,
    # not ask the upstream a second time (found in 11 of 100 end-of-stream herds across two
    # processes). The order is forced: B's lookup answers what it read before A ended.
    from sse_cache.backends.redis import RedisBackend
    from sse_cache.backends.redis import from_url as redis_from_url
    from sse_cache.httpx2 import AsyncCacheTransport

    looked, a_done = anyio.Event(), anyio.Event()

    class LookedBeforeTheEnd(RedisBackend):
        async def get(self, key: str) -> bytes | None:
            value = await super().get(key)
            if not looked.is_set():
                looked.set()
                await a_done.wait()  # A ends meanwhile; B goes on with what it read
            return value

    upstream_app = MockUpstream(delay=0.005)
    url = f"{redis_server.url}?prefix=e{uuid.uuid4().hex[:8]}:"
    payload = {"model": "gpt-mock", "input": "stored meanwhile", "stream": True}
    backend_b = redis_from_url(url)
    backend_b.__class__ = LookedBeforeTheEnd
    async with serve(upstream_app) as upstream:
        ta = AsyncCacheTransport(url, cross_process=True, cross_process_lease=LEASE)
        tb = AsyncCacheTransport(backend_b, cross_process=True, cross_process_lease=LEASE)
        try:
            async with (
                httpx2.AsyncClient(transport=ta, base_url=upstream, timeout=30) as ca,
                httpx2.AsyncClient(transport=tb, base_url=upstream, timeout=30) as cb,
            ):
                producer = await ca.send(_request(ca, payload), stream=True)
                assert producer.headers["x-sse-cache"] == "miss"
                answers: dict[str, Any] = {}

                async def b_asks() -> None:
                    response = await cb.send(_request(cb, payload), stream=True)
                    answers["status"] = response.headers["x-sse-cache"]
                    answers["body"] = await response.aread()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(b_asks)
                    await looked.wait()
                    whole = await producer.aread()  # A stores, then lets go of the key
                    a_done.set()
        finally:
            await backend_b.aclose()
    assert complete(whole)
    assert (answers["status"], answers["body"]) == ("hit", whole)
    assert upstream_app.stats()["total"] == 1


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("taken", [False, True], ids=["evicted", "evicted-then-taken"])
async def test_a_producer_that_lost_its_lease_keeps_its_followers(
    serve: Any, redis_server: Any, taken: bool
) -> None:
    # Redis under memory pressure (allkeys-lru) evicts a lease like any other key. The
    # producer's keeper stopped at the failed renewal, and its heartbeats with it, so its
    # follower in the other process gave the stream up as dead on the next upstream pause
    # of a lease's length (helper-94). Now it takes the lease back; and when another process
    # took it meanwhile (a newcomer that found no lease), it still beats for its own
    # followers, on its own channel.
    lease = 0.3
    events = responses_stream("the lease was evicted", text_deltas=6)
    upstream_app = GatedUpstream(events, hold_after=2)  # the upstream thinks, a long while
    prefix = f"e{uuid.uuid4().hex[:8]}:"
    backend = f"{redis_server.url}?prefix={prefix}"
    payload = {"model": "gpt-mock", "input": "the lease was evicted", "stream": True}
    redis = aioredis.from_url(redis_server.url)
    try:
        async with two_proxy_apps(serve, upstream_app, backend, lease) as (pa, pb, client):
            with anyio.fail_after(DEADLOCK_GUARD):
                producer, follower = await lead_and_follow(client, pa, pb, payload)
                lock = f"{prefix}l:sf:{producer.headers['x-sse-cache-key']}"
                token = await redis.get(lock)
                assert token is not None
                await redis.delete(lock)  # evicted
                if taken:
                    await redis.set(lock, b"another-process", px=60_000)
                else:
                    with anyio.fail_after(10 * lease):
                        # Another process's state: polled, there is no event to wait on.
                        while await redis.get(lock) != token:  # noqa: ASYNC110
                            await anyio.sleep(0.01)  # until the producer took it back
                # The upstream goes on thinking for three leases: the follower is kept by
                # the heartbeats alone.
                await anyio.sleep(3 * lease)
                upstream_app.gate.set()
                produced = await producer.aread()
                followed = await follower.aread()
                held = await redis.get(lock)
    finally:
        await redis.aclose()
    assert produced == followed == upstream_app.body
    assert upstream_app.calls == 1
    if taken:  # (and its release left the other process's lease alone)
        assert held == b"another-process"


@pytest.mark.anyio
@asyncio_only
async def test_a_body_piece_that_begins_with_h_reaches_the_other_processes_followers(
    serve: Any, redis_server: Any
) -> None:
    # The channel's messages are a kind byte and a payload: "h" the head, "d" body bytes.
    # The producer told its pending head from its pending body by the first byte of what it
    # held, so an upstream read that began with "h" ("hatcmpl-...", "https...", "hello") was
    # published as a head, and every follower in another process failed on it (helper-103:
    # 4 to 8 of 40 pairs, with no fault at all).
    raw = serialize_sse(responses_stream("hello there", text_deltas=6))
    cut = raw.index(b"h", raw.index(b"\n\n") + 2)  # a piece that begins with "h"
    upstream_app = GatedUpstream([raw[:cut], raw[cut:]], hold_after=1)
    backend = f"{redis_server.url}?prefix=h{uuid.uuid4().hex[:8]}:"
    payload = {"model": "gpt-mock", "input": "hello there", "stream": True}
    async with two_proxy_apps(serve, upstream_app, backend) as (pa, pb, client):
        with anyio.fail_after(DEADLOCK_GUARD):
            producer, follower = await lead_and_follow(client, pa, pb, payload)
            upstream_app.gate.set()
            produced = await producer.aread()
            followed = await follower.aread()
    assert produced == followed == raw
    assert upstream_app.calls == 1


def _anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


@pytest.mark.anyio
@asyncio_only
async def test_an_error_after_message_stop_reaches_the_followers_in_another_process(
    serve: Any, redis_server: Any
) -> None:
    # An Anthropic message, then an `event: error` while the body goes on. The producer's
    # client leaves once it has the error (as its SDK does, raising the provider's error):
    # the follower in the other process gets the error event too, then a failure — never
    # the answer alone (helper-162: its stream failed at message_stop, with no provider's
    # error for its SDK to raise), and never a clean end.
    message = {"id": "msg_01x", "type": "message", "role": "assistant", "content": []}
    answer = (
        _anthropic_event("message_start", {"type": "message_start", "message": message})
        + _anthropic_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        )
        + _anthropic_event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi"},
            },
        )
        + _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + _anthropic_event(
            "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
        )
        + _anthropic_event("message_stop", {"type": "message_stop"})
    )
    error = _anthropic_event(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    gate = anyio.Event()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": answer, "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": error, "more_body": True})
        while (await receive())["type"] != "http.disconnect":  # the body is never ended
            pass

    backend = f"{redis_server.url}?prefix=m{uuid.uuid4().hex[:8]}:"
    payload = {"model": "claude", "max_tokens": 9, "messages": [], "stream": True}
    async with two_proxy_apps(serve, upstream, backend) as (pa, pb, client):
        with anyio.fail_after(DEADLOCK_GUARD):

            async def open_at(base: str) -> httpx2.Response:
                request = client.build_request(
                    "POST", base + "/v1/messages", json=payload, headers=HEADERS
                )
                return await client.send(request, stream=True)

            producer = await open_at(pa)
            assert producer.headers["x-sse-cache"] == "miss"
            follower = await open_at(pb)
            assert follower.headers["x-sse-cache"] == "shared"
            gate.set()
            produced = b""
            async for chunk in producer.aiter_raw():
                produced += chunk
                if produced.endswith(error):
                    break
            await producer.aclose()  # (the client leaves with the provider's error)
            followed = b""
            with pytest.raises(httpx2.RemoteProtocolError):
                async for chunk in follower.aiter_raw():
                    followed += chunk
            await follower.aclose()
    assert produced == followed == answer + error


@pytest.mark.anyio
@asyncio_only
async def test_an_error_to_one_callers_credentials_reaches_no_follower_in_another_process(
    serve: Any, redis_server: Any
) -> None:
    # With --shared-tenant, a request sent with a bad key leads in proxy A; an identical
    # request with a good key in proxy B follows it over Redis. A's 401 names the rejected
    # key: B's caller must not get it (helper-106), but ask for itself, and get its answer.
    gate, at_upstream = anyio.Event(), anyio.Event()
    mock = MockUpstream()
    callers: list[str] = []

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await mock(scope, receive, send)
        caller = dict(scope["headers"]).get(b"authorization", b"").decode()
        callers.append(caller)
        at_upstream.set()
        await gate.wait()
        if caller != "Bearer sk-bad":
            return await mock(scope, receive, send)
        body = b'{"error": {"message": "Incorrect API key provided: sk-bad"}}'
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 401, "headers": head})
        await send({"type": "http.response.body", "body": body})

    payload = {"model": "gpt-mock", "input": "an error for one caller", "stream": True}
    backend = f"{redis_server.url}?prefix=e{uuid.uuid4().hex[:8]}:"
    answers: dict[str, httpx2.Response] = {}
    async with two_proxy_apps(serve, upstream, backend, tenant="shared") as (pa, pb, client):

        async def ask(proxy: str, caller: str) -> None:
            headers = {"authorization": caller}
            answers[caller] = await client.post(
                proxy + "/v1/responses", json=payload, headers=headers
            )

        with anyio.fail_after(DEADLOCK_GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, pa, "Bearer sk-bad")
                await at_upstream.wait()  # A leads
                tg.start_soon(ask, pb, "Bearer sk-good")
                await a_read_blocks(redis_server.url)  # B follows A, waiting for its head
                gate.set()
    assert answers["Bearer sk-bad"].status_code == 401
    good = answers["Bearer sk-good"]
    assert good.status_code == 200 and complete(good.content), good.content[:200]
    assert good.headers["x-sse-cache"] == "miss"
    assert callers == ["Bearer sk-bad", "Bearer sk-good"]


class HeadWhenTold:
    """An upstream that answers a Responses stream once :attr:`head` is set (its time to
    first byte); :attr:`calls` counts its requests."""

    def __init__(self) -> None:
        self.head = anyio.Event()
        self.calls = 0
        self.events = responses_stream("head when told", text_deltas=4)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.calls += 1
        await self.head.wait()
        head = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": serialize_sse(self.events)})


@pytest.mark.anyio
@asyncio_only
async def test_local_followers_read_on_when_the_producer_is_cancelled_as_its_head_is_published(
    serve: Any, redis_server: Any
) -> None:
    # The producer's task is cancelled (asyncio's own cancellation: a timeout around the
    # call) while the upstream's head goes to Redis for other processes: the followers in
    # its own process have the head already. They read the upstream on and get all of it
    # (helper-139: every one was aborted after the head, and the upstream cut).
    import asyncio

    upstream_app, seen = HeadWhenTold(), FlightsSeen()
    payload = {"model": "gpt-mock", "input": "cancelled at the head", "stream": True}
    async with two_workers(serve, redis_server.url, upstream_app, hooks=[seen]) as (ta, ca, _, _):
        with (
            anyio.fail_after(DEADLOCK_GUARD),
            LosePublishes(ta.service.backend, "cancelled") as losing,
        ):
            losing.arm()  # the next publish, the head's, hangs until cancelled
            producer = asyncio.ensure_future(ca.send(_request(ca, payload), stream=True))
            while not upstream_app.calls:  # noqa: ASYNC110 - the upstream's count
                await anyio.sleep(0.01)
            followers = [
                asyncio.ensure_future(ca.send(_request(ca, payload), stream=True)) for _ in range(3)
            ]
            while seen.followers() < 3:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            upstream_app.head.set()
            await losing.started.wait()
            producer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await producer
            for follower in followers:
                response = await follower
                assert response.headers["x-sse-cache"] == "shared"
                assert await response.aread() == serialize_sse(upstream_app.events)
    assert upstream_app.calls == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_drain_whose_transport_closes_under_it_leaves_no_unretrieved_error(
    serve: Any, redis_server: Any
) -> None:
    # The producer's client closed its response at the head: a task reads the upstream on
    # for possible followers in other processes. The program then closes its client (and so
    # the transport): that read fails, and asyncio printed "Task exception was never
    # retrieved" with the traceback (helper-139). The failure is the flight's, and said.
    import asyncio
    import gc

    upstream_app = GatedUpstream(responses_stream("drained", text_deltas=4), hold_after=2)
    payload = {"model": "gpt-mock", "input": "closed under the drain", "stream": True}
    loop = asyncio.get_running_loop()

    def draining() -> bool:
        return any(t.get_name().startswith("sse-cache drain") for t in asyncio.all_tasks())

    unretrieved: list[dict[str, Any]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        async with two_workers(serve, redis_server.url, upstream_app) as (_, ca, _, _):
            with anyio.fail_after(DEADLOCK_GUARD):
                producer = await ca.send(_request(ca, payload), stream=True)
                assert producer.headers["x-sse-cache"] == "miss"
                await producer.aclose()  # at the head: the drain reads on
                while not draining():  # noqa: ASYNC110 - the event loop's tasks
                    await anyio.sleep(0.01)
        with anyio.fail_after(DEADLOCK_GUARD):
            while draining():  # noqa: ASYNC110
                await anyio.sleep(0.01)
        gc.collect()
    finally:
        loop.set_exception_handler(handler)
        upstream_app.gate.set()
    assert not unretrieved, unretrieved


class _Interrupted(Exception):
    """What a signal handler raises in the main thread (as a program's timeout alarm does)."""


def test_sync_followers_read_on_when_the_producer_is_interrupted_as_its_head_is_published(
    redis_server: Any,
) -> None:
    # The sync twin of the test above: the producer's thread (the main one: signals are
    # delivered there) is interrupted by a signal handler's exception while the head goes to
    # Redis; the followers in other threads of the process have it, and read the upstream
    # on (helper-139: every one was aborted).
    import signal
    import threading

    import anyio.from_thread

    from sse_cache._uvicorn import serve as serve_app
    from sse_cache.httpx2 import CacheTransport

    upstream_app, seen = HeadWhenTold(), FlightsSeen()
    payload = {"model": "gpt-mock", "input": "interrupted at the head", "stream": True}
    main = threading.main_thread().ident
    assert threading.get_ident() == main

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    followed: list[tuple[str, bytes | str]] = []
    try:
        with (
            anyio.from_thread.start_blocking_portal() as portal,
            portal.wrap_async_context_manager(serve_app(upstream_app)) as upstream,
        ):
            url = f"{redis_server.url}?prefix=s{uuid.uuid4().hex[:8]}:"
            transport = CacheTransport(
                url, cross_process=True, cross_process_lease=LEASE, hooks=[seen]
            )
            with (
                httpx2.Client(
                    transport=transport, base_url=upstream, headers=HEADERS, timeout=30
                ) as client,
                LosePublishes(transport.service.backend, "cancelled") as losing,
            ):

                def follow() -> None:
                    try:
                        with client.stream("POST", "/v1/responses", json=payload) as response:
                            followed.append((response.headers["x-sse-cache"], response.read()))
                    except httpx2.HTTPError as exc:
                        followed.append(("error", repr(exc)))

                followers = [threading.Thread(target=follow, daemon=True) for _ in range(3)]

                def conduct() -> None:
                    deadline = time.monotonic() + DEADLOCK_GUARD
                    while not upstream_app.calls:  # the producer asked the upstream
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    for thread in followers:
                        thread.start()
                    while seen.followers() < 3:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    portal.call(upstream_app.head.set)
                    while not losing.started.is_set():  # the head's publish hangs
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    signal.pthread_kill(main, signal.SIGUSR1)

                conductor = threading.Thread(target=conduct, daemon=True)
                conductor.start()
                losing.arm()  # the next publish, the head's, hangs (until the lease's length)
                with pytest.raises(_Interrupted):
                    client.send(client.build_request("POST", "/v1/responses", json=payload))
                conductor.join(DEADLOCK_GUARD)
                for thread in followers:
                    thread.join(DEADLOCK_GUARD)
                    assert not thread.is_alive(), "a follower never ended"
                # The thread that read the upstream on for them may still be leaving the
                # exchange (the answer stored, the lease ended) as the client closes the
                # transport: the close waits for it (it stopped the portal under it, and a
                # Redis connection was left unclosed).
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert followed == [("shared", serialize_sse(upstream_app.events))] * 3
    assert upstream_app.calls == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_producer_cancelled_as_its_head_is_published_is_not_held_for_a_resume(
    serve: Any, redis_server: Any
) -> None:
    # No follower in its process, and a resume window: its client had nothing to resume by
    # (no event, no response id), so no window holds the stream, no slot is taken, and its
    # upstream is closed (helper-140: held for the window, a slot taken).
    import asyncio

    from sse_cache.httpx2 import AsyncCacheTransport

    upstream_app = HeadWhenTold()
    payload = {"model": "gpt-mock", "input": "not held", "stream": True}
    url = f"{redis_server.url}?prefix=r{uuid.uuid4().hex[:8]}:"
    async with serve(upstream_app) as upstream:
        transport = AsyncCacheTransport(
            url, cross_process=True, cross_process_lease=LEASE, resume_window=30
        )
        async with httpx2.AsyncClient(transport=transport, base_url=upstream, timeout=30) as client:
            with (
                anyio.fail_after(DEADLOCK_GUARD),
                LosePublishes(transport.service.backend, "cancelled") as losing,
            ):
                losing.arm()
                producer = asyncio.ensure_future(
                    client.send(_request(client, payload), stream=True)
                )
                while not upstream_app.calls:  # noqa: ASYNC110 - the upstream's count
                    await anyio.sleep(0.01)
                upstream_app.head.set()
                await losing.started.wait()
                producer.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await producer
                assert transport._holds.taken == 0


def _responses_scope() -> dict[str, Any]:
    """A raw ASGI scope for ``POST /v1/responses`` from the tests' tenant."""
    headers = [(b"authorization", HEADERS["authorization"].encode())]
    headers.append((b"content-type", b"application/json"))
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/responses",
        "raw_path": b"/v1/responses",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
    }


LEFT_WAITING = "the client left while it waited for the head of the live stream it follows"


class MiddlewarePair:
    """Two middlewares (two workers' apps) with cross-process single-flight on one Redis (a
    fresh prefix) in front of one upstream whose head waits (:class:`HeadWhenTold`), called in
    process: A leads a request, B's identical requests follow it over Redis. B's notices
    and live streams are seen (:attr:`notices`, :attr:`seen`)."""

    def __init__(self, redis_url: str, text: str) -> None:
        from sse_cache.testing import NoticeLog

        self.upstream, self.notices, self.seen = HeadWhenTold(), NoticeLog(), FlightsSeen()
        self.redis_url, self.prefix = redis_url, f"l{uuid.uuid4().hex[:8]}:"
        backend = f"{redis_url}?prefix={self.prefix}"
        options: dict[str, Any] = {"cross_process": True, "cross_process_lease": LEASE}
        self.a = CacheMiddleware(self.upstream, backend, **options)
        self.b = CacheMiddleware(self.upstream, backend, hooks=[self.notices, self.seen], **options)
        self.body = json.dumps({"model": "gpt-mock", "input": text, "stream": True}).encode()

    async def ask(self, app: Any, answers: list[Any], until: Any = anyio.sleep_forever) -> None:
        """One request to ``app``, its answer appended to ``answers``; its client leaves once
        ``until`` returns."""
        from asgi_calls import body_then, call

        answers.append(await call(app, _responses_scope(), body_then(self.body, until)))

    async def lead(self, tg: anyio.abc.TaskGroup, answers: list[Any]) -> None:
        """A's request, started: returns once A has asked its upstream (its head waits)."""
        tg.start_soon(self.ask, self.a, answers)
        while not self.upstream.calls:  # noqa: ASYNC110 - the upstream's count
            await anyio.sleep(0.01)

    async def follow(self, tg: anyio.abc.TaskGroup, answers: list[Any], until: Any) -> None:
        """B's first request, started: returns once it reads A's channel."""
        tg.start_soon(self.ask, self.b, answers, until)
        while not await self.presences():  # noqa: ASYNC110 - Redis's keys
            await anyio.sleep(0.01)

    async def presences(self) -> list[bytes]:
        """The presence locks held in Redis: one per channel read elsewhere."""
        client = aioredis.from_url(self.redis_url)
        try:
            return list(await client.keys(f"{self.prefix}*sfr:*"))
        finally:
            await client.aclose()

    def left_waiting(self) -> int:
        """B's requests whose clients left while they waited for the head."""
        return sum(n.kind == "shared" and n.detail == LEFT_WAITING for n in self.notices.seen)

    async def aclose(self) -> None:
        await self.a.aclose()
        await self.b.aclose()


def _leaving(left: anyio.Event, read: anyio.Event) -> Any:
    async def until() -> None:
        await left.wait()
        read.set()

    return until


@pytest.mark.anyio
@asyncio_only
async def test_a_follower_in_another_process_whose_client_leaves_before_the_head_leaves_at_once(
    redis_server: Any,
) -> None:
    # Two middlewares (two workers) on one Redis: A leads, B's request follows A's channel
    # and waits for its head. B's client leaves: B gives its place back then, presence
    # included, not once the head comes (it held it until then, and after join_timeout went
    # on for a client long gone, as the local followers did before helper-138's fix). A's
    # stream goes on for its own client.
    pair = MiddlewarePair(redis_server.url, "left waiting")
    left, read = anyio.Event(), anyio.Event()
    produced: list[Any] = []
    try:
        with anyio.fail_after(DEADLOCK_GUARD):
            async with anyio.create_task_group() as tg:
                await pair.lead(tg, produced)
                await pair.follow(tg, [], _leaving(left, read))
                left.set()
                await pair.notices.wait("shared")
                assert pair.left_waiting() == 1
                assert await pair.presences() == []  # (given back)
                pair.upstream.head.set()
    finally:
        await pair.aclose()
    [answer] = produced
    assert answer.headers[b"x-sse-cache"] == b"miss"
    assert answer.body == serialize_sse(pair.upstream.events)
    assert pair.upstream.calls == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_follower_of_another_process_whose_client_leaves_waits_on_for_its_own_followers(
    redis_server: Any,
) -> None:
    # B's first request follows A's channel for B's process: a second identical request on B
    # follows it there. The first's client leaves before the head: the wait goes on for the
    # second, which gets all of the stream (not a failure before the head, and a second
    # reading of A's channel).
    pair = MiddlewarePair(redis_server.url, "waits on")
    left, read = anyio.Event(), anyio.Event()
    followed: list[Any] = []
    try:
        with anyio.fail_after(DEADLOCK_GUARD):
            async with anyio.create_task_group() as tg:
                await pair.lead(tg, [])
                await pair.follow(tg, [], _leaving(left, read))
                tg.start_soon(pair.ask, pair.b, followed)
                while pair.seen.followers() < 1:  # noqa: ASYNC110 - B's second request
                    await anyio.sleep(0.01)
                left.set()
                await read.wait()
                pair.upstream.head.set()
    finally:
        await pair.aclose()
    [answer] = followed
    assert answer.headers[b"x-sse-cache"] == b"shared"
    assert answer.body == serialize_sse(pair.upstream.events)
    assert pair.left_waiting() == 0
    assert pair.upstream.calls == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_follower_of_another_process_left_for_its_own_followers_leaves_after_them(
    redis_server: Any,
) -> None:
    # B's first request follows A's channel; its client leaves while a second request on B
    # follows it, so it waits on for that one. Then the second's client leaves too, still
    # before A's head: the first gives its place and the presence back then (helper-143: it
    # looked once, held them until the head, and had A died meanwhile it would have taken
    # the lease over and asked the upstream for no one).
    pair = MiddlewarePair(redis_server.url, "leaves after")
    first_left, first_read, second_left = anyio.Event(), anyio.Event(), anyio.Event()
    try:
        with anyio.fail_after(DEADLOCK_GUARD):
            async with anyio.create_task_group() as tg:
                await pair.lead(tg, [])
                await pair.follow(tg, [], _leaving(first_left, first_read))
                tg.start_soon(pair.ask, pair.b, [], second_left.wait)
                while pair.seen.followers() < 1:  # noqa: ASYNC110 - B's second request
                    await anyio.sleep(0.01)
                first_left.set()
                await first_read.wait()
                await anyio.wait_all_tasks_blocked()  # (the first waits on for the second)
                assert pair.left_waiting() == 0 and await pair.presences()
                second_left.set()
                while pair.left_waiting() < 2:  # noqa: ASYNC110 - both give their places back
                    await anyio.sleep(0.01)
                assert await pair.presences() == []
                pair.upstream.head.set()
    finally:
        await pair.aclose()
    assert pair.upstream.calls == 1


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("closes", [1, 2])
async def test_closing_a_transport_whose_stream_is_read_on_for_another_process_tells_it_at_once(
    serve: Any, redis_server: Any, closes: int
) -> None:
    # The producer's client closed its response: its transport reads the upstream on for a
    # follower in another worker. The program then closes its client: the stream ends then,
    # failed, its lease released and the failure published before the backend closes —
    # the follower fails at once, visibly (it waited a lease's silence, the lease left
    # behind, the backend closed under the exchange). Also when the client and the
    # transport are closed at once from two tasks (helper-144: the second closed the
    # backend while the first still ended the stream).
    from sse_cache.httpx2 import AsyncCacheTransport

    upstream_app = GatedUpstream(
        responses_stream("closed while drained", text_deltas=6), hold_after=2
    )
    payload = {"model": "gpt-mock", "input": "closed while drained", "stream": True}
    prefix = f"w{uuid.uuid4().hex[:8]}:"
    url = f"{redis_server.url}?prefix={prefix}"
    # A lease far longer than the test: only the producer's own release ends it in time.
    lease = 60.0
    try:
        async with serve(upstream_app) as upstream:
            ta = AsyncCacheTransport(url, cross_process=True, cross_process_lease=lease)
            tb = AsyncCacheTransport(url, cross_process=True, cross_process_lease=lease)
            ca = httpx2.AsyncClient(transport=ta, base_url=upstream, timeout=30)
            async with httpx2.AsyncClient(transport=tb, base_url=upstream, timeout=30) as cb:
                with anyio.fail_after(DEADLOCK_GUARD):
                    producer = await ca.send(_request(ca, payload), stream=True)
                    assert producer.headers["x-sse-cache"] == "miss"
                    async for _ in producer.aiter_raw():
                        break  # (its client reads: its first bytes go to Redis)
                    follower = await cb.send(_request(cb, payload), stream=True)
                    assert follower.headers["x-sse-cache"] == "shared"
                    followed = follower.aiter_raw()
                    await followed.__anext__()
                    await producer.aclose()  # the upstream is read on for the follower
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(ca.aclose)
                        if closes == 2:
                            tg.start_soon(ta.aclose)
                    assert await lock_ttls(redis_server.url, prefix) == []
                    with pytest.raises(httpx2.HTTPError):
                        async for _ in followed:
                            pass
                    upstream_app.gate.set()
                    again = await cb.post("/v1/responses", json=payload, headers=HEADERS)
    finally:
        upstream_app.gate.set()
    assert again.headers["x-sse-cache"] == "miss"
    assert again.content == upstream_app.body


def test_closing_a_sync_transport_whose_stream_is_read_on_for_another_process_tells_it_at_once(
    redis_server: Any,
) -> None:
    # The sync twin of the async test above: the producer's client closed its response, a
    # drain thread reads the upstream on for a follower of another transport (a worker);
    # closing the producer's client fails the stream first, while the backend is open —
    # the failure published and the lease released (the follower waited a lease's silence,
    # the lease left behind).
    import anyio.from_thread
    import redis

    from sse_cache._uvicorn import serve as serve_app
    from sse_cache.httpx2 import CacheTransport

    upstream_app = GatedUpstream(responses_stream("sync drained", text_deltas=6), hold_after=2)
    payload = {"model": "gpt-mock", "input": "sync drained", "stream": True}
    prefix = f"s{uuid.uuid4().hex[:8]}:"
    url = f"{redis_server.url}?prefix={prefix}"
    lease = 60.0  # far longer than the test: only the producer's own release ends it in time
    store = redis.Redis.from_url(redis_server.url)
    try:
        with (
            anyio.from_thread.start_blocking_portal() as portal,
            portal.wrap_async_context_manager(serve_app(upstream_app)) as upstream,
        ):
            options: dict[str, Any] = {"base_url": upstream, "headers": HEADERS, "timeout": 30}
            ta = CacheTransport(url, cross_process=True, cross_process_lease=lease)
            tb = CacheTransport(url, cross_process=True, cross_process_lease=lease)
            ca = httpx2.Client(transport=ta, **options)
            with httpx2.Client(transport=tb, **options) as cb:
                request = ca.build_request("POST", "/v1/responses", json=payload)
                producer = ca.send(request, stream=True)
                assert producer.headers["x-sse-cache"] == "miss"
                next(producer.iter_raw())  # (its client reads: its first bytes go to Redis)
                with cb.stream("POST", "/v1/responses", json=payload) as follower:
                    assert follower.headers["x-sse-cache"] == "shared"
                    followed = follower.iter_raw()
                    next(followed)
                    producer.close()  # a thread reads the upstream on for the follower
                    ca.close()
                    assert list(store.scan_iter(match=f"{prefix}l:sf:*")) == []
                    with pytest.raises(httpx2.HTTPError):
                        for _ in followed:
                            pass
                portal.call(upstream_app.gate.set)
                again = cb.post("/v1/responses", json=payload)
    finally:
        store.close()
    assert again.headers["x-sse-cache"] == "miss"
    assert again.content == upstream_app.body

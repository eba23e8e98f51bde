"""Live fan-out (``FanoutBackend``) on Redis Streams, against a real standalone server and a
real 3-master cluster: ordering, late joiners from the start, several readers, the end marker,
a silent producer, expiry, binary and large messages, lost messages, server faults."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sse_cache.backends import from_url
from sse_cache.backends.redis import RedisBackend
from sse_cache.errors import (
    BackendError,
    BackendFull,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from sse_cache.protocols import FanoutBackend

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

TTL = 30.0
_REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:2])
# A deadlock guard only: what must happen (a reader woken, a fault noticed) takes a few
# milliseconds, and what a bug would cost (a whole XREAD slice, the whole ``block``) is longer.
GUARD = 30.0
# Readers made by the ``reader`` fixture: per-operation timeout (their XREAD slices are half
# of it, 60 s), beyond GUARD, so that a read woken by a slice ending rather than by a message
# shows as a hang.
READER_TIMEOUT = 120.0


@pytest.fixture(params=["redis", "redis-cluster"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Only Redis fans out: narrows conftest's ``backend`` fixture to its two kinds."""
    return str(request.param)


@pytest.fixture
def fanout(backend: Any) -> RedisBackend:
    assert isinstance(backend, FanoutBackend)
    assert isinstance(backend, RedisBackend)
    return backend


@pytest.fixture
async def reader(backend_url: str, anyio_backend: str) -> AsyncIterator[RedisBackend]:
    """Another backend on the same storage (as another process would have), whose
    connections are named so that the server tells when its reads are blocked."""
    del anyio_backend  # requested so that this async fixture runs on the test's loop
    created = from_url(backend_url, timeout=READER_TIMEOUT, client_name=reader_name())
    assert isinstance(created, RedisBackend)
    try:
        yield created
    finally:
        await created.aclose()


def reader_name() -> str:
    return f"reader-{uuid.uuid4().hex[:8]}"


async def blocked_in_xread(probe: Any, name: str) -> bool:
    """Whether a connection named ``name`` is blocked in XREAD on the server (any node of a
    cluster) right now; ``probe`` is a redis-py client on the same server(s)."""
    if isinstance(probe, RedisCluster):
        by_node = await probe.client_list(target_nodes=RedisCluster.ALL_NODES)
        clients = [c for listed in by_node.values() for c in listed]
    else:
        clients = await probe.client_list()
    return any(
        c.get("name") == name and c.get("cmd") == "xread" and "b" in c.get("flags", "")
        for c in clients
    )


async def until_blocked(backend: RedisBackend, probe: Any = None) -> None:
    """Wait until one of ``backend``'s connections (named: see ``reader``) is blocked in
    XREAD, polling the server (``probe``, by default ``backend``'s own client)."""
    client: Any = backend.client
    name = client.get_connection_kwargs().get("client_name")
    assert name, "the reader's connections need a client_name"
    with anyio.fail_after(GUARD):
        while not await blocked_in_xread(probe or client, name):  # noqa: ASYNC110
            await anyio.sleep(0.01)  # nothing to wait on: the state is the server's


async def until_gone(client: Any, key: str) -> None:
    """Wait until the server has expired ``key``."""
    with anyio.fail_after(GUARD):
        while await client.exists(key):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # nothing to wait on: expiry is the server's


def channel() -> str:
    return f"ch-{uuid.uuid4().hex[:8]}"


async def collect(backend: FanoutBackend, name: str, **options: Any) -> list[bytes]:
    return [message async for message in backend.read(name, **options)]


async def publish_all(backend: FanoutBackend, name: str, messages: list[bytes]) -> None:
    for message in messages:
        await backend.publish(name, message, ttl=TTL)
    await backend.finish(name, ttl=TTL)


# -- the contract -------------------------------------------------------------------------


async def test_many_messages_in_order_while_published(
    fanout: RedisBackend, reader: RedisBackend
) -> None:
    name = channel()
    messages = [f"event {i}".encode() for i in range(1000)]
    received: list[bytes] = []

    async def read() -> None:
        received.extend(await collect(reader, name))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await until_blocked(reader)  # it joined before the stream even exists
            await publish_all(fanout, name, messages)
    assert received == messages


async def test_late_joiner_gets_everything_from_the_start(
    fanout: RedisBackend, reader: RedisBackend
) -> None:
    name = channel()
    first = [f"early {i}".encode() for i in range(100)]
    second = [f"late {i}".encode() for i in range(100)]
    for message in first:
        await fanout.publish(name, message, ttl=TTL)
    received: list[bytes] = []
    caught_up = anyio.Event()

    async def read() -> None:
        async for message in reader.read(name):
            received.append(message)
            if len(received) == len(first):
                caught_up.set()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            # It replayed what was there, then waits for more: the rest arrives live.
            await caught_up.wait()
            await until_blocked(reader)
            await publish_all(fanout, name, second)
    assert received == first + second
    # Once finished, the stream is still replayed whole to a reader that comes later still.
    assert await collect(fanout, name) == first + second


async def test_concurrent_readers_see_the_same_sequence(fanout: RedisBackend) -> None:
    name = channel()
    messages = [f"token {i}".encode() * (1 + i % 7) for i in range(300)]
    results: list[list[bytes]] = [[], [], []]

    async def read(index: int) -> None:
        results[index].extend(await collect(fanout, name))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, 0)
        tg.start_soon(read, 1)
        for i, message in enumerate(messages):
            await fanout.publish(name, message, ttl=TTL)
            if i == 150:
                tg.start_soon(read, 2)  # a third one joins halfway
            if i % 50 == 0:
                await anyio.sleep(0.01)  # let the readers block and wake up
        await fanout.finish(name, ttl=TTL)
    assert results == [messages, messages, messages]


async def test_end_marker_stops_readers(fanout: RedisBackend, reader: RedisBackend) -> None:
    name = channel()
    received: list[bytes] = []
    got_one = anyio.Event()

    async def read() -> None:
        async for message in reader.read(name, block=10 * GUARD):
            received.append(message)
            got_one.set()

    # Woken by the marker: not by its block nor by its XREAD slice ending, both past GUARD.
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await fanout.publish(name, b"only", ttl=TTL)
            await got_one.wait()
            await until_blocked(reader)  # read it, now waits for more
            await fanout.finish(name, ttl=TTL)
    assert received == [b"only"]
    # Nothing can be appended after the marker (a producer's own count is over), and
    # nothing after it is read.
    with pytest.raises(BackendError, match="did not append"):
        await fanout.publish(name, b"after the end", ttl=TTL)
    assert await collect(fanout, name) == [b"only"]


async def test_silent_producer_costs_a_timeout(fanout: RedisBackend) -> None:
    name = channel()
    for message in (b"a", b"b", b"c"):
        await fanout.publish(name, message, ttl=TTL)
    received: list[bytes] = []
    start = time.monotonic()
    with anyio.fail_after(GUARD), pytest.raises(BackendTimeout):
        async for message in fanout.read(name, block=0.4):
            received.append(message)
    elapsed = time.monotonic() - start
    assert received == [b"a", b"b", b"c"]
    assert elapsed > 0.35  # it did wait for more (its block), then gave up by itself
    # A channel nobody ever published to is just as silent.
    with anyio.fail_after(GUARD), pytest.raises(BackendTimeout):
        await collect(fanout, channel(), block=0.2)


async def test_messages_keep_the_wait_alive(fanout: RedisBackend) -> None:
    # ``block`` bounds the gap between two messages, not the whole stream.
    name = channel()
    received: list[bytes] = []

    async def read() -> None:
        received.extend(await collect(fanout, name, block=1.0))

    # Gaps of a quarter of ``block`` (room for a loaded machine), 1.5 s in all: longer than
    # one ``block``.
    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        for i in range(6):
            await fanout.publish(name, b"%d" % i, ttl=TTL)
            await anyio.sleep(0.25)
        await fanout.finish(name, ttl=TTL)
    assert received == [b"%d" % i for i in range(6)]


async def test_start_after_the_newest_message(fanout: RedisBackend, reader: RedisBackend) -> None:
    name = channel()
    await fanout.publish(name, b"old", ttl=TTL)
    received: list[bytes] = []

    async def read() -> None:
        received.extend(await collect(reader, name, start="$"))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await until_blocked(reader)  # "$" is pinned: it waits for what comes next
            await publish_all(fanout, name, [b"new 1", b"new 2"])
    assert received == [b"new 1", b"new 2"]


async def test_stream_key_expiry(fanout: RedisBackend) -> None:
    name = channel()
    key = f"{fanout.prefix}s:{name}"
    client: Any = fanout.client
    await fanout.publish(name, b"x", ttl=30)
    assert 0 < await client.pttl(key) <= 30_000
    await fanout.publish(name, b"y", ttl=600)  # every append refreshes it
    assert 30_000 < await client.pttl(key) <= 600_000
    await fanout.finish(name, ttl=0.3)
    assert await client.pttl(key) <= 300  # (or -2: gone already)
    await until_gone(client, key)
    with pytest.raises(BackendTimeout):  # gone: nothing to replay
        await collect(fanout, name, block=0.2)
    with pytest.raises(ConfigError):
        await fanout.publish(name, b"z", ttl=0)
    with pytest.raises(ConfigError):
        await fanout.finish(name, ttl=-1)
    with pytest.raises(ConfigError):
        await collect(fanout, name, block=0)


async def test_binary_safety(fanout: RedisBackend) -> None:
    name = channel()
    messages = [bytes([i]) for i in range(256)] + [bytes(range(256)) * 3, b"", b"\r\n\r\n"]
    await publish_all(fanout, name, messages)
    assert await collect(fanout, name) == messages


async def test_large_messages(fanout: RedisBackend) -> None:
    name = channel()
    messages = [bytes([i]) * 300_000 + bytes(range(256)) for i in range(12)]
    messages.insert(5, b"small")
    await publish_all(fanout, name, messages)
    assert await collect(fanout, name) == messages


async def test_lost_messages_are_an_error_not_a_gap(fanout: RedisBackend) -> None:
    # The oldest messages were trimmed (MAXLEN) before this reader came: it must not start
    # mid-stream as if that were the beginning.
    name = channel()
    await publish_all(fanout, name, [b"m0", b"m1", b"m2"])
    client: Any = fanout.client
    key = f"{fanout.prefix}s:{name}"
    (oldest_id, _), *_ = await client.xrange(key, count=1)
    await client.xdel(key, oldest_id)
    with pytest.raises(BackendError, match="lost messages"):
        await collect(fanout, name)
    # The stream expired under a reader and the producer started a new one.
    name = channel()
    key = f"{fanout.prefix}s:{name}"
    await fanout.publish(name, b"first", ttl=TTL)
    reader = fanout.read(name, block=GUARD)
    assert await reader.__anext__() == b"first"
    await client.pexpire(key, 100)  # it expires now, under the reader
    await until_gone(client, key)
    # The producer's next message would be the new stream's first: refused, and marked.
    with pytest.raises(BackendError, match="lost messages"):
        await fanout.publish(name, b"second", ttl=TTL)
    with anyio.fail_after(GUARD), pytest.raises(BackendError, match="lost messages"):
        await reader.__anext__()
    with pytest.raises(BackendError, match="lost messages"):
        await collect(fanout, name)  # a late reader, from the start


async def test_retried_publish_is_applied_once(
    fanout: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py retries a command after a timeout; the first attempt may have been applied.
    # A retry sends the same nonce, which is what this simulates.
    name = channel()
    await fanout.publish(name, b"before", ttl=TTL)
    monkeypatch.setattr(secrets, "token_hex", lambda _: "same-nonce")
    await fanout.publish(name, b"once", ttl=TTL)
    await fanout.publish(name, b"once", ttl=TTL)
    monkeypatch.undo()
    await fanout.finish(name, ttl=TTL)
    assert await collect(fanout, name) == [b"before", b"once"]


async def test_channels_are_separate_from_entries_and_locks(fanout: RedisBackend) -> None:
    name = channel()
    await publish_all(fanout, name, [b"x"])
    assert await fanout.get(name) is None
    assert [k async for k in fanout.scan()] == []
    assert await fanout.acquire(name, "token", 5)


# -- faults (standalone servers of their own) ---------------------------------------------


async def test_server_stopped_mid_read_then_restarted(spawn_redis: Callable[[], Any]) -> None:
    server = spawn_redis()
    backend = from_url(server.url, timeout=0.3, client_name=reader_name())
    assert isinstance(backend, RedisBackend)
    name = channel()
    try:
        await backend.publish(name, b"before", ttl=TTL)
        received: list[bytes] = []
        failure: list[BaseException] = []

        async def read() -> None:
            try:
                async for message in backend.read(name, block=10 * GUARD):
                    received.append(message)
            except BackendError as exc:
                failure.append(exc)

        # Noticed as the server going away, not after the read's whole block (past GUARD).
        # (Polled through a client of its own: a probe in the backend's pool would leave it
        # one more dead connection to meet after the restart, and older redis-py retries a
        # command only once.)
        probe = aioredis.Redis(host="127.0.0.1", port=server.port)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await until_blocked(backend, probe)  # read "before", blocked in XREAD
                await probe.aclose()
                server.stop()
        assert received == [b"before"]
        assert len(failure) == 1 and isinstance(failure[0], BackendUnavailable), failure
        with pytest.raises(BackendUnavailable):
            await backend.publish(name, b"during", ttl=TTL)
        server.start()  # same port, empty: the same backend object recovers
        # The channel lost its beginning: the producer cannot go on with it (a reader from
        # the start would take its rest for the whole), but a new one works.
        with pytest.raises(BackendError, match="lost messages"):
            await backend.publish(name, b"after", ttl=TTL)
        fresh = channel()
        await publish_all(backend, fresh, [b"after"])
        assert await collect(backend, fresh) == [b"after"]
    finally:
        await backend.aclose()


@pytest.fixture(params=["redis", "redis-cluster"])
def stallable(
    request: pytest.FixtureRequest, spawn_redis: Callable[[], Any]
) -> Iterator[tuple[str, Callable[[], None], Callable[[], None], float]]:
    """A Redis of this test's own: its URL, how to stall it (SIGSTOP) and resume it, and how
    old a client must be for a stall to find it as one in service does."""
    if request.param == "redis":
        server = spawn_redis()
        yield server.url, server.pause, server.resume, 0.0
        return
    import subprocess

    from servers import RedisServer, free_port, require_binary

    # One node holding every slot (a cluster of one: `redis-cli --cluster create` wants
    # three masters); the stall then leaves the client no node to refresh its topology from,
    # as when the node a channel lives on stalls.
    node = RedisServer(require_binary("redis-server", "redis-server"), cluster_port=free_port())
    cli = require_binary("redis-cli", "redis-tools")
    node.start()
    try:
        base = [cli, "-h", "127.0.0.1", "-p", str(node.port)]
        subprocess.run([*base, "cluster", "addslotsrange", "0", "16383"], check=True, timeout=10)
        deadline = time.monotonic() + 30
        while (
            b"cluster_state:ok"
            not in subprocess.run(
                [*base, "cluster", "info"], capture_output=True, check=True, timeout=10
            ).stdout
        ):
            assert time.monotonic() < deadline, "the one-node cluster did not become ok"
            time.sleep(0.05)
        # (redis-py refreshes a cluster's topology after an error no sooner than a second
        # after the last refresh: a client in service is older than that.)
        yield f"redis+cluster://127.0.0.1:{node.port}", node.pause, node.resume, 1.1
    finally:
        node.cleanup()


async def test_a_stall_shorter_than_the_block_is_silence_to_a_reader_and_a_publisher(
    stallable: tuple[str, Callable[[], None], Callable[[], None], float],
) -> None:
    # A Redis that stops answering for a moment (stalled, paused for a failover: SIGSTOP
    # here) while a reader waits and a producer appends: each command that times out is
    # sent again — the reader's XREAD until ``block`` passed with nothing, the append until
    # its ttl (the same append: applied once). One timed-out command failed every follower
    # of the stream mid-answer, and the producer's channel for good (helper-150: a stall of
    # 0.6 s, a failover's CLIENT PAUSE). On a cluster the stall came as the client's refresh
    # of its topology failing, "unreachable" (helper-153).
    url, pause, resume, age = stallable
    # redis-py before 8.2 reports a cluster's failed topology refresh without its cause (a
    # timeout): there a stall still reads as the cluster unreachable, and the stream fails —
    # visibly, for the reader and the producer alike.
    waits = not url.startswith("redis+cluster") or _REDIS_PY >= (8, 2)
    publisher = from_url(url, timeout=0.5)
    follower = from_url(url, timeout=0.5)
    assert isinstance(publisher, RedisBackend) and isinstance(follower, RedisBackend)
    name = channel()
    received: list[bytes] = []
    failure: list[BaseException] = []
    publish_failure: list[BaseException] = []
    over = anyio.Event()

    async def publish_two() -> None:
        try:
            await publisher.publish(name, b"two", ttl=TTL)
        except BackendError as exc:
            publish_failure.append(exc)

    async def read() -> None:
        try:
            async for message in follower.read(name, block=GUARD):
                received.append(message)
        except BackendError as exc:
            failure.append(exc)
        finally:
            over.set()

    try:
        await publisher.publish(name, b"one", ttl=TTL)
        with anyio.fail_after(GUARD):  # a deadlock guard, not a timing bound
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                while not received and not over.is_set():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                await anyio.sleep(age)  # (the clients' age: see the fixture)
                pause()
                try:
                    tg.start_soon(publish_two)
                    # The stall: four of the backends' timeouts, far below the read's
                    # block. (Its length is the fault's, not an order of tasks: nothing
                    # answers meanwhile, each command ends by its timeout.)
                    await anyio.sleep(2.0)
                finally:
                    resume()
                with anyio.fail_after(GUARD):
                    while len(received) < 2 and not over.is_set() and not publish_failure:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                if not waits:
                    tg.cancel_scope.cancel()  # (failed: nothing more will come)
                else:
                    await publisher.finish(name, ttl=TTL)
        if not waits:
            # Whole, or a failure — never a clean end short of what was published.
            assert received in ([b"one"], [b"one", b"two"])
            assert received == [b"one", b"two"] or failure or publish_failure
            return
        assert failure == [] and publish_failure == []
        assert received == [b"one", b"two"]  # each once: the repeated append applied once
    finally:
        await publisher.aclose()
        await follower.aclose()


async def test_a_full_server_refuses_an_append_to_a_live_stream(
    spawn_redis: Callable[[], Any],
) -> None:
    # Redis at its maxmemory (noeviction) refuses writes: the append to a stream already
    # under way went through past maxmemory (the script refreshed the expiry first, and
    # Redis checks a script for memory at its first write only; helper-128). Refused, the
    # producer's publish fails, and its followers in other processes are aborted (as the
    # reliability page says), never fed past the operator's limit.
    server = spawn_redis()
    backend = from_url(server.url, timeout=5)
    assert isinstance(backend, RedisBackend)
    name = channel()
    try:
        await backend.publish(name, b"before", ttl=TTL)
        client = aioredis.Redis(host="127.0.0.1", port=server.port)
        try:
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(used + 1024 * 1024))
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for i in range(100):
                    await client.set(f"junk-{i}", b"x" * 100_000)
            with pytest.raises(BackendFull):
                await backend.publish(name, b"x" * 100_000, ttl=TTL)
            await client.config_set("maxmemory", "0")  # room again: the stream goes on
            await backend.publish(name, b"after", ttl=TTL)
            await backend.finish(name, ttl=TTL)
        finally:
            await client.aclose()
        assert await collect(backend, name) == [b"before", b"after"]
    finally:
        await backend.aclose()


async def test_a_stream_whose_newest_messages_the_server_lost_is_an_error_not_a_gap(
    spawn_redis: Callable[[], Any],
) -> None:
    # Redis restarted from an older snapshot (or a replica promoted before it had the newest
    # entries) lost the stream's tail while its producer lived. The producer carried on, and
    # numbered its next message right after what survived: a reader found no gap and ended
    # cleanly, the lost middle missing from an answer that looked whole.
    server = spawn_redis()
    backend = from_url(server.url, timeout=0.3)
    assert isinstance(backend, RedisBackend)
    name = channel()
    try:
        for i in range(5):
            await backend.publish(name, f"m{i};".encode(), ttl=TTL)
        reader = backend.read(name, block=GUARD)
        had = [await reader.__anext__() for _ in range(5)]
        await backend.client.save()  # the snapshot holds m0..m4
        for i in range(5, 10):
            await backend.publish(name, f"m{i};".encode(), ttl=TTL)
        server.restart()  # from the snapshot: m5..m9 are gone

        async def refused(call: Callable[[], Any]) -> str:
            # (Older redis-py meets each pooled connection the restart killed once: that
            # call fails as the server being unreachable, and the next one is answered.)
            for _ in range(5):
                try:
                    await call()
                except BackendUnavailable:
                    continue
                except BackendError as exc:
                    return str(exc)
                raise AssertionError("accepted by a server that lost what came before")
            raise AssertionError("the restarted server stayed unreachable")

        said = await refused(lambda: backend.publish(name, b"m10;", ttl=TTL))
        # (Every cause Redis cannot tell apart is named: an eviction was taken for a
        # failover; helper-137.)
        assert "lost messages" in said and "evicted" in said and "lost writes" in said
        assert "lost messages" in await refused(lambda: backend.finish(name, ttl=TTL))
        assert had == [f"m{i};".encode() for i in range(5)]
        with anyio.fail_after(GUARD), pytest.raises(BackendError):
            await reader.__anext__()  # a reader that had what survived: never a clean end
        assert "lost messages" in await refused(lambda: collect(backend, name))  # from the start
    finally:
        await backend.aclose()


async def test_server_hung_mid_read_costs_the_block(spawn_redis: Callable[[], Any]) -> None:
    server = spawn_redis()
    backend = from_url(server.url, timeout=0.3)
    assert isinstance(backend, FanoutBackend)
    name = channel()
    try:
        await backend.publish(name, b"before", ttl=TTL)
        reader = backend.read(name, block=1.0)
        assert await reader.__anext__() == b"before"
        server.pause()
        # A hung server is silence (a stall may end: see the test above) for the read's
        # block, then a timeout that says it was Redis, not the producer.
        with anyio.fail_after(GUARD), pytest.raises(BackendTimeout, match="did not answer"):
            await reader.__anext__()
        server.resume()
        await backend.finish(name, ttl=TTL)
        assert await collect(backend, name) == [b"before"]
    finally:
        await backend.aclose()


async def test_cancelled_reader_gives_its_connection_back(redis_server: Any) -> None:
    # A client that goes away while its reader waits: the pooled connection (here the only
    # one) must come back usable, not stay stuck in XREAD BLOCK.
    backend = from_url(
        f"{redis_server.url}?max_connections=1&prefix={uuid.uuid4().hex}:",
        client_name=reader_name(),
    )
    assert isinstance(backend, RedisBackend)
    probe = from_url(redis_server.url)  # its only connection is busy: ask on another one
    assert isinstance(probe, RedisBackend)
    name = channel()
    try:
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: collect(backend, name, block=10 * GUARD))
                await until_blocked(backend, probe.client)
                tg.cancel_scope.cancel()
        await publish_all(backend, name, [b"still works"])
        assert await collect(backend, name) == [b"still works"]
        await backend.set("k", b"v", None)
        assert await backend.get("k") == b"v"
    finally:
        await probe.aclose()
        await backend.aclose()


async def test_reader_of_a_closed_backend(redis_server: Any) -> None:
    backend = from_url(f"{redis_server.url}?prefix={uuid.uuid4().hex}:")
    assert isinstance(backend, FanoutBackend)
    await backend.aclose()
    with pytest.raises(BackendUnavailable):
        await collect(backend, channel())
    with pytest.raises(BackendUnavailable):
        await backend.publish(channel(), b"x", ttl=TTL)

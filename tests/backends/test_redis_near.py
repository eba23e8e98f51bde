"""The Redis backend's near cache against real redis-servers: hot keys answered without a
``GET`` (counted by the server's ``INFO commandstats``), and never kept past what Redis
reports: writes by other clients and other processes, expiry, ``FLUSHDB``, the tracking
connection killed, the server paused, killed and restarted.

An invalidation reaches this process on its own connection, some time after the write
returned: the tests wait for it by polling ``cached()`` a bounded number of times."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio as aioredis

from sse_cache.backends import from_url
from sse_cache.backends.redis import RedisBackend
from sse_cache.errors import ConfigError
from sse_cache.protocols import NearCachingBackend

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

POLLS = 2000  # x 5 ms: ten seconds at most for anything that should take milliseconds

# Another process writing through its own backend: URL KEY VALUE.
WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from sse_cache.backends import from_url

    async def main(url, key, value):
        backend = from_url(url)
        await backend.set(key, value.encode(), None)
        await backend.aclose()

    asyncio.run(main(*sys.argv[1:]))
    """
)

# A program that never closes its backend: each ``asyncio.run`` ends TURNS loop turns after
# the first lookup started the tracking task, so that over the turns its one-shot shutdown
# cancellation reaches the task at every step of connecting and subscribing. URL TURNS
NEVER_CLOSED = textwrap.dedent(
    """
    import asyncio, sys
    from sse_cache.backends import from_url
    from sse_cache.errors import BackendError

    async def main(url, turns):
        backend = from_url(url)
        try:
            await backend.get("never-closed")  # starts the tracking task
        except BackendError:
            pass  # (a wrong password: the tracking task fails too, and retries)
        for _ in range(turns):
            await asyncio.sleep(0)

    for turns in range(int(sys.argv[2])):
        asyncio.run(main(sys.argv[1], turns))
    print("every loop ended")
    """
)


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(POLLS):
        if check():
            return
        await anyio.sleep(0.005)
    pytest.fail(f"{what}: not so after {POLLS} polls")


async def kept(backend: RedisBackend, key: str) -> bytes:
    """Read ``key`` until the near cache keeps it (tracking comes up in the background after
    the first read); its value."""
    for _ in range(POLLS):
        await backend.get(key)
        value = backend.cached(key)
        if value is not None:
            return value
        await anyio.sleep(0.005)
    pytest.fail(f"{key!r} never kept by the near cache")


_opened: list[RedisBackend] = []


def open_backend(url: str, **options: Any) -> RedisBackend:
    name = f"t{uuid.uuid4().hex[:10]}"
    query = "&".join(f"{k}={v}" for k, v in {"client_name": name, **options}.items())
    backend = from_url(f"{url}?{query}")
    assert isinstance(backend, RedisBackend)
    _opened.append(backend)
    return backend


@pytest.fixture(autouse=True)
async def close_backends() -> AsyncIterator[None]:
    """Every backend a test opened is closed, also when the test failed midway: a tracking
    task left running when the test's event loop ends keeps the loop from closing (a
    cancellation that reaches it inside redis-py's connect can be lost)."""
    yield
    while _opened:
        await _opened.pop().aclose()


@pytest.fixture
async def raw(redis_server: Any) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    await client.aclose()


async def get_calls(raw: aioredis.Redis) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def tracking_connections(raw: aioredis.Redis, backend: RedisBackend) -> list[dict[str, Any]]:
    name = backend.client.connection_pool.connection_kwargs["client_name"] + ":invalidations"
    return [c for c in await raw.client_list() if c["name"] == name]


async def test_a_hot_key_is_answered_without_a_get(spawn_redis: Callable[..., Any]) -> None:
    server = spawn_redis()
    raw = aioredis.Redis(host="127.0.0.1", port=server.port)
    backend = open_backend(server.url, prefix="hot:")
    assert isinstance(backend, NearCachingBackend)
    await backend.set("k", b"v" * 200_000, None)
    assert await kept(backend, "k") == b"v" * 200_000
    await raw.config_resetstat()
    for _ in range(200):
        assert await backend.get("k") == b"v" * 200_000
        assert backend.cached("k") == b"v" * 200_000
    assert await get_calls(raw) == 0
    # One tracking connection, in BCAST mode for the data keys only, redirected to itself.
    [conn] = await tracking_connections(raw, backend)
    assert "t" in conn["flags"] and "B" in conn["flags"] and conn["redir"] == conn["id"]
    await backend.aclose()
    assert backend.cached("k") is None
    await raw.aclose()


async def test_keys_answered_from_memory_are_used_in_redis_s_eyes(
    spawn_redis: Callable[..., Any],
) -> None:
    # Redis evicts by when a key was last used (allkeys-lru) or how often (allkeys-lfu). Hits
    # from the near cache never reached it, so the hottest answers looked the least used
    # and were evicted first, then dropped from every near cache: the next request for them
    # went upstream. The keys the near cache answered are TOUCHed (at most once a second).
    server = spawn_redis()
    raw = aioredis.Redis(host="127.0.0.1", port=server.port)
    backend = open_backend(server.url, prefix="lru:")
    await backend.set("hot", b"h" * 1000, None)
    await backend.set("cold", b"c" * 1000, None)
    assert await kept(backend, "hot") == b"h" * 1000
    await raw.config_resetstat()
    # Hits from memory while Redis's clock (seconds) runs on for three seconds.
    start = int((await raw.time())[0])
    while int((await raw.time())[0]) < start + 3:
        assert await backend.get("hot") == b"h" * 1000
        await anyio.sleep(0.02)  # (a request every 20 ms)
    assert await get_calls(raw) == 0  # still answered from memory
    idle_hot = await raw.object("idletime", "lru:e:hot")
    idle_cold = await raw.object("idletime", "lru:e:cold")
    assert idle_cold >= 2 and idle_hot < idle_cold, (idle_hot, idle_cold)
    await backend.aclose()
    await raw.aclose()


async def test_near_cache_0_is_off(spawn_redis: Callable[..., Any]) -> None:
    server = spawn_redis()
    raw = aioredis.Redis(host="127.0.0.1", port=server.port)
    backend = open_backend(server.url, near_cache="0")
    await backend.set("k", b"v", None)
    await raw.config_resetstat()
    for _ in range(20):
        assert await backend.get("k") == b"v"
        assert backend.cached("k") is None
    assert await get_calls(raw) == 20
    assert await tracking_connections(raw, backend) == []
    await backend.aclose()
    await raw.aclose()


async def test_writes_by_other_clients_and_processes_are_seen(
    redis_server: Any, raw: aioredis.Redis
) -> None:
    prefix = f"w{uuid.uuid4().hex[:6]}:"
    backend = open_backend(redis_server.url, prefix=prefix)
    other = open_backend(redis_server.url, prefix=prefix)
    await backend.set("k", b"one", None)
    assert await kept(backend, "k") == b"one"

    await other.set("k", b"two", None)  # another backend object, its own connections
    await eventually(lambda: backend.cached("k") != b"one", "invalidated after another client")
    assert await backend.get("k") == b"two"
    assert await kept(backend, "k") == b"two"

    await raw.set(f"{prefix}e:k", b"three")  # plain redis-py
    await eventually(lambda: backend.cached("k") != b"two", "invalidated after raw SET")
    assert await backend.get("k") == b"three"
    assert await kept(backend, "k") == b"three"

    await anyio.run_process(
        [sys.executable, "-c", WRITER, f"{redis_server.url}?prefix={prefix}", "k", "four"]
    )
    await eventually(lambda: backend.cached("k") != b"three", "invalidated after a process")
    assert await backend.get("k") == b"four"

    await raw.delete(f"{prefix}e:k")
    await eventually(lambda: backend.cached("k") is None, "invalidated after DEL")
    assert await backend.get("k") is None
    await backend.aclose()
    await other.aclose()


@pytest.mark.parametrize("password", [None, "wrong"])
async def test_a_backend_never_closed_lets_its_event_loop_end(
    spawn_redis: Callable[..., Any], password: str | None
) -> None:
    # asyncio.run cancels the tasks left at its end once. On Python 3.11 redis-py could let
    # that cancellation through while the tracking connection was being opened (CPython
    # #86296), and the program hung at exit. With a wrong password the task fails and retries
    # until the end instead (a swallowed cancellation followed by a failure is covered in
    # tests/core/test_cancellation.py). A bounded wait: a hang fails the test.
    server = spawn_redis(password="right") if password else spawn_redis()
    url = f"redis://:{password}@127.0.0.1:{server.port}/0" if password else server.url

    def run() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", NEVER_CLOSED, url, "60"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    try:
        done = await anyio.to_thread.run_sync(run)
    except subprocess.TimeoutExpired:
        pytest.fail("a program whose Redis backend was never closed did not end")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "every loop ended"


async def test_own_writes_are_never_followed_by_the_old_value(redis_server: Any) -> None:
    backend = open_backend(redis_server.url, prefix=f"o{uuid.uuid4().hex[:6]}:")
    await backend.set("k", b"old", None)
    assert await kept(backend, "k") == b"old"
    # Reads of the old value in flight while the write is sent: none of them is kept.
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(backend.get, "k")
        await backend.set("k", b"new", None)
        assert backend.cached("k") in (None, b"new")
    assert backend.cached("k") in (None, b"new")
    assert await backend.get("k") == b"new"
    await backend.delete("k")
    assert backend.cached("k") is None
    assert await backend.get("k") is None
    await backend.set("k", b"again", None)
    await backend.clear()
    assert backend.cached("k") is None
    await backend.aclose()


async def test_expiry(redis_server: Any, raw: aioredis.Redis) -> None:
    backend = open_backend(redis_server.url, prefix=f"x{uuid.uuid4().hex[:6]}:")
    # (3 s: long enough to be kept first on a busy machine; the test waits for the end.)
    await backend.set("k", b"short-lived", 3.0)
    assert await kept(backend, "k") == b"short-lived"
    await eventually(lambda: backend.cached("k") is None, "expired")
    # The near cache lets a value go early, never late (its deadline counts from before the
    # GET was sent): Redis may still answer it for as long as that GET took. Then it is gone.
    for _ in range(POLLS):
        if await backend.get("k") is None:
            break
        await anyio.sleep(0.005)
    else:
        pytest.fail("Redis never expired the key")
    await backend.aclose()


async def test_expiry_is_checked_by_the_near_cache_itself(spawn_redis: Callable[..., Any]) -> None:
    # A paused server neither expires keys nor sends invalidations (and, being paused, no
    # one can write to it): the deadline read with the value must end it all the same.
    server = spawn_redis()
    backend = open_backend(server.url, timeout="30")  # (no PING timeout during the test)
    await backend.set("k", b"short-lived", 3.0)
    assert await kept(backend, "k") == b"short-lived"
    server.pause()
    try:
        await eventually(lambda: backend.cached("k") is None, "expired while paused")
    finally:
        server.resume()
    await backend.aclose()


async def test_flush(redis_server: Any, raw: aioredis.Redis) -> None:
    backend = open_backend(redis_server.url, prefix=f"f{uuid.uuid4().hex[:6]}:")
    await backend.set("k", b"v", None)
    assert await kept(backend, "k") == b"v"
    await raw.execute_command("FLUSHDB")
    await eventually(lambda: backend.cached("k") is None, "dropped after FLUSHDB")
    assert await backend.get("k") is None
    await backend.aclose()


async def test_tracking_connection_killed(redis_server: Any, raw: aioredis.Redis) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}:"
    backend = open_backend(redis_server.url, prefix=prefix)
    await backend.set("k", b"before", None)
    assert await kept(backend, "k") == b"before"
    [conn] = await tracking_connections(raw, backend)
    await raw.execute_command("CLIENT", "KILL", "ID", conn["id"])
    # Written with no tracking connection to report it: it must be seen all the same.
    await raw.set(f"{prefix}e:k", b"after")
    await eventually(lambda: backend.cached("k") is None, "near cache off after the kill")
    assert await backend.get("k") == b"after"
    # Tracking comes back by itself, and with it the near cache.
    assert await kept(backend, "k") == b"after"
    [again] = await tracking_connections(raw, backend)
    assert again["id"] != conn["id"]
    await raw.set(f"{prefix}e:k", b"later")
    await eventually(lambda: backend.cached("k") != b"after", "invalidated after reconnect")
    assert await backend.get("k") == b"later"
    await backend.aclose()


async def test_server_killed_and_restarted(spawn_redis: Callable[..., Any]) -> None:
    server = spawn_redis()
    backend = open_backend(server.url)
    await backend.set("k", b"before", None)
    assert await kept(backend, "k") == b"before"
    server.restart()  # SIGKILL and start again on the same port: empty
    raw = aioredis.Redis(host="127.0.0.1", port=server.port)
    await raw.set("sse-cache:e:k", b"after")
    await eventually(lambda: backend.cached("k") is None, "near cache off after the restart")
    assert await _get_when_reachable(backend, "k") == b"after"
    assert await kept(backend, "k") == b"after"
    await raw.set("sse-cache:e:k", b"later")
    await eventually(lambda: backend.cached("k") != b"after", "invalidated after restart")
    assert await backend.get("k") == b"later"
    await backend.aclose()
    await raw.aclose()


async def test_silent_tracking_connection_turns_it_off(spawn_redis: Callable[..., Any]) -> None:
    # A server that stops answering (SIGSTOP: a hung server, or a partition) is noticed by
    # the PING the listener sends after a second of silence, within ``timeout``.
    server = spawn_redis()
    backend = open_backend(server.url, timeout="0.2")
    await backend.set("k", b"v", None)
    assert await kept(backend, "k") == b"v"
    server.pause()
    try:
        await eventually(lambda: backend.cached("k") is None, "near cache off while hung")
    finally:
        server.resume()
    assert await kept(backend, "k") == b"v"
    await backend.aclose()


async def test_concurrent_reads_and_foreign_writes_settle_on_the_last_value(
    redis_server: Any, raw: aioredis.Redis
) -> None:
    # The read/invalidate race with a real server: reads in flight while another client
    # writes new values; once the writes stop and the last invalidation has been handled,
    # the near cache never answers an older value.
    prefix = f"r{uuid.uuid4().hex[:6]}:"
    backend = open_backend(redis_server.url, prefix=prefix)
    await backend.set("k", b"0", None)
    await kept(backend, "k")
    writes = 300

    async def reader() -> None:
        for _ in range(writes):
            await backend.get("k")

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(reader)
        for n in range(1, writes + 1):
            await raw.set(f"{prefix}e:k", str(n).encode())
    final = str(writes).encode()
    await eventually(lambda: backend.cached("k") in (None, final), "settled")
    for _ in range(50):
        assert await backend.get("k") == final
        assert backend.cached("k") in (None, final)
    await backend.aclose()


async def test_not_on_a_cluster(redis_cluster: Any) -> None:
    with pytest.raises(ConfigError, match="near_cache"):
        from_url(f"{redis_cluster.url}?near_cache=1MiB")
    backend = from_url(f"{redis_cluster.url}?prefix=n{uuid.uuid4().hex[:6]}:")
    await backend.set("k", b"v", None)
    for _ in range(3):
        assert await backend.get("k") == b"v"
        assert backend.cached("k") is None  # type: ignore[attr-defined]
    await backend.aclose()
    from_url(f"{redis_cluster.url}?near_cache=0")  # off, as it is anyway: fine


async def test_bad_near_cache_option() -> None:
    with pytest.raises(ConfigError, match="near_cache"):
        from_url("redis://127.0.0.1:1/0?near_cache=lots")
    with pytest.raises(ConfigError, match="near_cache"):
        from_url("redis://127.0.0.1:1/0?near_cache=-1")


async def _get_when_reachable(backend: RedisBackend, key: str) -> bytes | None:
    """``get`` once the pool has reconnected after a restart (the first try may find a dead
    pooled connection beyond the one immediate retry)."""
    for _ in range(POLLS):
        try:
            return await backend.get(key)
        except Exception:
            await anyio.sleep(0.005)
    pytest.fail("the server never became reachable again")


async def test_a_user_not_allowed_to_track_is_told_why(
    redis_server: Any, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # An ACL user without CLIENT TRACKING: the near cache stays off (every lookup a GET), and
    # the warning says why in Redis's words, where redis-py's repr of the error gave only
    # "auth:NoPermissionError".
    user = f"no-tracking-{uuid.uuid4().hex[:8]}"
    await raw.execute_command(
        "ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-client|tracking"
    )
    try:
        with caplog.at_level(logging.WARNING, logger="sse_cache.backends.redis"):
            url = f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"
            backend = open_backend(url, prefix="acl:")
            await backend.set("k", b"v", None)
            with anyio.fail_after(30):  # a deadlock guard: the warning comes at once
                while not any("tracking" in r.getMessage() for r in caplog.records):
                    assert await backend.get("k") == b"v"
                    await anyio.sleep(0.01)  # the listener runs in a task of its own
            assert backend.cached("k") is None  # off: nothing answered without Redis
        [warning] = [r.getMessage() for r in caplog.records if "tracking" in r.getMessage()]
        assert "NoPermissionError" in warning and "client|tracking" in warning.lower()
    finally:
        await raw.execute_command("ACL", "DELUSER", user)


async def test_a_user_not_allowed_to_touch_is_told_once_and_still_answered_from_memory(
    redis_server: Any, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"no-touch-{uuid.uuid4().hex[:8]}"
    await raw.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-touch")
    try:
        with caplog.at_level(logging.WARNING, logger="sse_cache.backends.redis"):
            url = f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"
            backend = open_backend(url, prefix="acl-touch:")
            await backend.set("k", b"v", None)
            assert await kept(backend, "k") == b"v"
            with anyio.fail_after(30):  # a deadlock guard: a round runs every second
                while not any("TOUCH" in r.getMessage() for r in caplog.records):
                    assert await backend.get("k") == b"v"
                    await anyio.sleep(0.05)  # (a request every 50 ms)
            # Refused by the ACL: no more rounds (one refused command a second, for ever).
            toucher = backend._toucher
            assert toucher is not None
            with anyio.fail_after(30):
                while toucher.running:  # noqa: ASYNC110 - its last round ends it
                    await anyio.sleep(0.01)
            assert backend.cached("k") == b"v"  # still answered from memory
        touches = [r.getMessage() for r in caplog.records if "TOUCH" in r.getMessage()]
        assert len(touches) == 1 and "refused by the ACL" in touches[0], touches
    finally:
        await raw.execute_command("ACL", "DELUSER", user)

"""MemcachedBackend beyond the conformance suite: chunking, manifests, verification."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from pymemcache.client.base import Client, PooledClient  # type: ignore[import-untyped]

from sse_cache.backends import from_url
from sse_cache.backends._memcached_batch import IOV_MAX, read_replies, send_parts
from sse_cache.backends._memcached_layout import (
    MANIFEST,
    MAX_CHUNKS,
    Manifest,
    is_expired,
    pack_deadline,
)
from sse_cache.backends.memcached import MemcachedBackend
from sse_cache.codec import MsgpackCodec
from sse_cache.entry import Entry
from sse_cache.errors import BackendError, CorruptEntry, ValueTooLarge
from sse_cache.events import Event

pytestmark = pytest.mark.anyio


@pytest.fixture
def url(memcached_server: Any) -> str:
    return f"memcached://{memcached_server.address}?prefix=mc{os.urandom(4).hex()}:"


@pytest.fixture
def raw(memcached_server: Any) -> Iterator[Client]:
    # Waits for every reply: a delete or set must have happened before the backend reads.
    client = Client(("127.0.0.1", memcached_server.port), default_noreply=False)
    yield client
    client.close()


@pytest.fixture
def pool_url(memcached_pool: Any) -> str:
    servers = ",".join(server.address for server in memcached_pool)
    return f"memcached://{servers}?prefix=mc{os.urandom(4).hex()}:"


class Recorder:
    """Wraps a pooled connection's socket: records what is sent and when replies are read,
    and can cut the connection once a given command starts."""

    def __init__(self, sock: socket.socket, cut_at: bytes | None = None) -> None:
        self.sock = sock
        self.cut_at = cut_at
        self.events: list[str] = []  # "send" / "recv", in order
        self.sent = b""

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.events.append("send")
        data = b"".join(buffers)
        if self.cut_at is not None and (cut := (self.sent + data).find(self.cut_at)) >= 0:
            data = data[: max(0, cut - len(self.sent))]
            self.sock.sendall(data)
            self.sent += data
            # Let the server answer what it got (so those items are stored for sure), then
            # break the connection as if the server had gone away.
            replies = b""
            while replies.count(b"\r\n") < len(self.commands()):
                replies += self.sock.recv(4096)
            raise ConnectionResetError("cut before the manifest")
        sent = int(self.sock.sendmsg(buffers))
        self.sent += data[:sent]
        return sent

    def recv(self, size: int) -> bytes:
        self.events.append("recv")
        return self.sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def commands(self) -> list[tuple[str, int, int]]:
        """(key, flags, length) of every ``set`` sent, in order."""
        out = []
        rest = self.sent
        while rest:
            line, rest = rest.split(b"\r\n", 1)
            verb, key, flags, _, length = line.split()
            assert verb == b"set"
            out.append((key.decode(), int(flags), int(length)))
            rest = rest[int(length) + 2 :]
        return out


def record(backend: Any, cut_at: bytes | None = None) -> Recorder:
    """Put a Recorder on the connection the backend's next write will borrow (its pool holds
    exactly one, so the next write gets that one)."""
    pool = backend._client.client_pool
    assert len(pool.free) == 1 and not pool.used
    with pool.get_and_release() as client:
        if client.sock is None:
            client._connect()
        client.sock = recorder = Recorder(client.sock, cut_at)
    return recorder


def chunk_keys(backend: MemcachedBackend, key: str) -> list[str]:
    """The chunk keys named by the manifest stored under ``key``."""
    item_key = backend._item_key(key)
    found = backend._client.get(item_key)
    assert found is not None and found[1] == MANIFEST, "not a manifest"
    manifest = Manifest.parse(found[0])
    assert manifest is not None, "not a manifest"
    return backend._chunk_keys(item_key, manifest.write_id, manifest.chunk_count)


async def test_small_chunks_many_writers_never_mix(url: str) -> None:
    # 1 KiB chunks and 60 KB values: each write is 59 items, so concurrent writers
    # interleave at the item level. Every read must still be one complete write.
    backend = from_url(url, chunk_size=1024)
    values = [os.urandom(60_000) for _ in range(8)]
    seen: list[bytes | None] = []

    async def writer(value: bytes) -> None:
        for _ in range(3):
            await backend.set("k", value, None)

    async def reader() -> None:
        for _ in range(30):
            seen.append(await backend.get("k"))

    async with anyio.create_task_group() as tg:
        for value in values:
            tg.start_soon(writer, value)
        for _ in range(3):
            tg.start_soon(reader)
    assert await backend.get("k") in values
    assert all(v is None or v in values for v in seen)
    assert any(v is not None for v in seen)
    await backend.aclose()


async def test_pool_bound_holds_when_the_limiter_admits_too_many(url: str) -> None:
    # anyio's CapacityLimiter on asyncio can admit one borrower more than it has tokens
    # (anyio#1170, fixed in 4.14): pymemcache's pool then raised "Too many objects" at a
    # writer. The pool bound is held on the thread side; here the limiter admits eight
    # times too many, and every call must still succeed with whole values.
    backend: Any = from_url(url + "&max_pool_size=2", chunk_size=1024)
    backend._queue._turns = anyio.CapacityLimiter(16)
    backend._queue._threads = anyio.CapacityLimiter(16)
    values = {f"k{i}": os.urandom(20_000) for i in range(16)}
    read: dict[str, bytes | None] = {}

    async def write_then_read(key: str) -> None:
        await backend.set(key, values[key], None)
        read[key] = await backend.get(key)

    async with anyio.create_task_group() as tg:
        for key in values:
            tg.start_soon(write_then_read, key)
    assert read == values
    await backend.aclose()


async def test_missing_chunk_reads_as_miss(url: str, raw: Client) -> None:
    backend: Any = from_url(url, chunk_size=4096)
    value = os.urandom(50_000)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    assert len(keys) == 13 and all(raw.get(k) is not None for k in keys)
    raw.delete(keys[5])  # as if memcached had evicted one chunk
    assert await backend.get("k") is None
    await backend.aclose()


async def test_altered_chunk_reads_as_miss(url: str, raw: Client) -> None:
    # A chunk of another length (truncated, or someone else's bytes) reads as a miss. One of
    # the same length but other bytes comes only from a memory fault or a deliberate writer:
    # the backend does not hash every value again for that, the codec's digest rejects it.
    backend: Any = from_url(url, chunk_size=4096)
    events = tuple(Event(os.urandom(30).hex(), event="delta") for _ in range(600))
    entry = Entry(schema="generic", created_at=1.0, status=200,
                  content_type="text/event-stream", events=events)  # fmt: skip
    value = MsgpackCodec(compression="none").encode(entry)
    assert len(value) > 3 * 4096
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    raw.set(keys[1], b"\x00" * 4000, noreply=False)  # shorter
    assert await backend.get("k") is None

    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    raw.set(keys[1], b"\x00" * 4096, noreply=False)  # same length, other bytes
    with pytest.raises(CorruptEntry):
        MsgpackCodec().decode(await backend.get("k"))
    await backend.aclose()


async def test_overwriting_a_chunked_value_forgets_its_chunks(url: str) -> None:
    # A chunked value is remembered so that a read fetches manifest and chunks together;
    # once the key holds something else, a read must not fetch the old chunks with it.
    backend: Any = from_url(url, chunk_size=4096)
    item_key = backend._item_key("k")
    await backend.set("k", os.urandom(50_000), None)
    assert backend._hints.get(item_key) is not None
    fetched: list[list[str]] = []
    real_get_many = backend._client.get_many

    def get_many(keys: list[str]) -> Any:
        fetched.append(list(keys))
        return real_get_many(keys)

    backend._client.get_many = get_many
    await backend.set("k", b"small", None)
    assert backend._hints.get(item_key) is None
    assert await backend.get("k") == b"small"
    assert fetched == []  # one plain get, no chunk keys
    await backend.aclose()


async def test_one_server_writes_chunks_then_manifest_in_one_round_trip(url: str) -> None:
    # All the chunks and then the manifest go out before any reply is read: one batch on one
    # connection, which memcached executes in order.
    backend: Any = from_url(url, chunk_size=4096)
    await backend.set("warm", b"up", None)  # opens the one pooled connection
    recorder = record(backend)
    value = os.urandom(50_000)
    await backend.set("k", value, 60)
    assert (
        recorder.events[0] == "send"
        and "send" not in recorder.events[recorder.events.index("recv") :]
    )
    commands = recorder.commands()
    assert [key for key, _, _ in commands] == [*chunk_keys(backend, "k"), backend._item_key("k")]
    assert [flags for _, flags, _ in commands] == [0] * 13 + [MANIFEST]
    assert sum(length for _, _, length in commands[:-1]) == len(value)
    assert await backend.get("k") == value
    await backend.aclose()


async def test_a_write_cut_before_its_manifest_leaves_the_previous_value(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One server: the connection breaks after the new chunks were sent, before the manifest
    # (and the server cannot be reached again, so the write is not made again on another
    # connection): the chunks are stored, but readers still get the previous value whole.
    backend: Any = from_url(url, chunk_size=4096)
    old, new = os.urandom(50_000), os.urandom(50_000)
    await backend.set("k", old, None)
    recorder = record(backend, cut_at=b"set " + backend._item_key("k").encode() + b" ")

    def refused(self: Any) -> None:
        raise ConnectionRefusedError("the server went away")

    with monkeypatch.context() as patch, pytest.raises(BackendError):
        patch.setattr(Client, "_connect", refused)
        await backend.set("k", new, None)
    new_chunks = [key for key, _, _ in recorder.commands()]
    assert len(new_chunks) == 13
    assert all(backend._client.get(key) is not None for key in new_chunks)
    assert await backend.get("k") == old
    await backend.set("k", new, None)
    assert await backend.get("k") == new
    await backend.aclose()


async def test_a_pool_write_cut_before_its_manifest_leaves_the_previous_value(
    pool_url: str,
) -> None:
    # A pool writes the chunks, waits for them, then the manifest: a write that fails before
    # its manifest leaves the previous value readable.
    backend: Any = from_url(pool_url, chunk_size=4096)
    old, new = os.urandom(50_000), os.urandom(50_000)
    await backend.set("k", old, None)
    real_set = backend._client.set

    def fail_on_manifest(key: str, value: bytes, **kw: Any) -> bool:
        if kw.get("flags") == MANIFEST:
            raise ConnectionError("server went away")
        return bool(real_set(key, value, **kw))

    backend._client.set = fail_on_manifest
    with pytest.raises(BackendError):
        await backend.set("k", new, None)
    backend._client.set = real_set
    assert await backend.get("k") == old
    await backend.set("k", new, None)
    assert await backend.get("k") == new
    await backend.aclose()


async def test_a_write_cut_on_a_connection_closed_under_it_is_made_again(url: str) -> None:
    # The same cut with the server still there (a pooled connection it closed, as after a
    # restart): the write is made again on a fresh connection, whole.
    backend: Any = from_url(url, chunk_size=4096)
    old, new = os.urandom(50_000), os.urandom(50_000)
    await backend.set("k", old, None)
    record(backend, cut_at=b"set " + backend._item_key("k").encode() + b" ")
    await backend.set("k", new, None)
    assert await backend.get("k") == new
    await backend.aclose()


@pytest.mark.parametrize("pool", [1, 4])
async def test_a_restarted_server_is_used_at_once_despite_its_dead_pooled_connections(
    spawn_memcached: Any, pool: int
) -> None:
    # memcached restarted on the same port while every pooled connection was idle: each of
    # them is dead. The next calls must not fail on them one after the other — five failures
    # open the breaker, and each probe after its cooldown met another dead one: the cache
    # came back 12 to 34 s after memcached did (helper-68).
    server = spawn_memcached()
    backend: Any = from_url(f"memcached://{server.address}?max_pool_size={pool}&timeout=5")
    try:
        server.pause()  # (each call below holds a connection of its own while it waits)
        async with anyio.create_task_group() as tg:
            for i in range(pool):
                tg.start_soon(backend.set, f"k{i}", b"v", None)
            with anyio.fail_after(30):  # a deadlock guard
                while len(backend._client.client_pool.used) < pool:  # noqa: ASYNC110 - threads
                    await anyio.sleep(0.01)
            server.resume()
        assert len(backend._client.client_pool.free) == pool
        server.restart()
        assert await backend.get("k0") is None  # (gone with the old process)
        await backend.set("k", b"after", None)
        assert await backend.get("k") == b"after"
    finally:
        await backend.aclose()


async def test_a_refused_chunk_leaves_no_manifest(url: str, raw: Client) -> None:
    # Chunks larger than the server's item limit (1 MiB) are refused, but the server goes on
    # with the batch and stores the last, short chunk and the manifest: the backend must
    # delete that manifest and fail the write. The key then reads as a miss.
    backend: Any = from_url(url, chunk_size=2 * 1024 * 1024)
    item_key = backend._item_key("k")
    await backend.set("k", b"previous", None)
    found_before_delete: list[Any] = []
    real_delete = backend._client.delete

    def delete(key: str, **kw: Any) -> bool:
        found_before_delete.append(raw.get(key))
        return bool(real_delete(key, **kw))

    backend._client.delete = delete
    with pytest.raises(BackendError, match="did not store"):
        await backend.set("k", os.urandom(4 * 1024 * 1024 + 500_000), None)
    backend._client.delete = real_delete
    assert found_before_delete and found_before_delete[0] is not None  # the manifest landed
    assert raw.get(item_key) is None
    assert await backend.get("k") is None
    await backend.set("k", b"after", None)  # the backend's connections are still fine
    assert await backend.get("k") == b"after"
    await backend.aclose()


async def test_a_refused_small_item_fails_the_write(url: str) -> None:
    backend: Any = from_url(url, chunk_size=2 * 1024 * 1024)
    with pytest.raises(BackendError, match="did not store"):
        await backend.set("k", os.urandom(1024 * 1024 + 1), None)  # one item, over 1 MiB
    await backend.set("k", b"fine", None)
    assert await backend.get("k") == b"fine"
    await backend.aclose()


class Trickle:
    """A socket whose sendmsg takes at most ``step`` bytes per call (after ``pause`` s)."""

    def __init__(self, step: int, pause: float = 0.0) -> None:
        self.step = step
        self.pause = pause
        self.data = b""
        self.most_buffers = 0
        self.timeouts: list[float | None] = []

    def settimeout(self, timeout: float | None) -> None:
        self.timeouts.append(timeout)

    def sendmsg(self, buffers: list[memoryview]) -> int:
        time.sleep(self.pause)
        self.most_buffers = max(self.most_buffers, len(buffers))
        taken = b""
        for buffer in buffers:
            taken += bytes(buffer[: self.step - len(taken)])
            if len(taken) == self.step:
                break
        self.data += taken
        return len(taken)


@pytest.mark.parametrize("step", [7, 4096, 10**9])
def test_send_parts_survives_partial_sends(step: int) -> None:
    parts = [os.urandom(n) for n in (5, 0, 30, 1, 0, 700, 2)] * 200  # 1,400 buffers
    sock: Any = Trickle(step)
    send_parts(sock, [memoryview(p) if i % 2 else p for i, p in enumerate(parts)], None)
    assert sock.data == b"".join(parts)
    assert sock.most_buffers <= IOV_MAX


def test_a_batch_is_bounded_by_one_deadline_not_one_timeout_per_call() -> None:
    # A server that keeps taking a little at a time must not hold a write past the timeout:
    # each call gets what is left of the batch's time.
    sock: Any = Trickle(step=100, pause=0.01)
    parts = [os.urandom(100_000)]  # 1,000 calls of 10 ms without a deadline
    with pytest.raises(TimeoutError):
        send_parts(sock, parts, time.monotonic() + 0.1)
    assert 0 < len(sock.data) < 100_000
    assert sock.timeouts and all(t is not None and t <= 0.1 for t in sock.timeouts)
    assert sock.timeouts == sorted(sock.timeouts, reverse=True)


class Replies:
    """A socket whose recv hands out ``chunks`` in turn."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def settimeout(self, timeout: float | None) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_reply_lines_are_read_across_recv_calls_and_must_end_the_data() -> None:
    sock: Any = Replies(b"STO", b"RED\r\nNOT_", b"STORED\r\n")
    assert read_replies(sock, 2, None) == [b"STORED", b"NOT_STORED"]
    for extra in (b"STORED\r\nSTORED\r\n", b"STORED\r\nSTO"):
        with pytest.raises(BackendError, match="one reply per command"):
            read_replies(Replies(extra), 1, None)
    with pytest.raises(ConnectionResetError):
        read_replies(Replies(b"STORED\r\n"), 2, None)


async def test_more_chunks_than_one_sendmsg_takes(url: str) -> None:
    # 1 KiB chunks of a 600 KB value: 1,761 buffers, more than one sendmsg call accepts.
    backend: Any = from_url(url, chunk_size=1024)
    value = os.urandom(600_000)
    await backend.set("k", value, None)
    assert await backend.get("k") == value
    await backend.aclose()


async def test_without_sendmsg_the_batch_is_joined(url: str) -> None:
    # Windows sockets have no sendmsg: the batch is sent as one joined buffer instead.
    class NoSendmsg:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def __getattr__(self, name: str) -> Any:
            if name == "sendmsg":
                raise AttributeError(name)
            return getattr(self.sock, name)

    backend: Any = from_url(url, chunk_size=4096)
    await backend.set("warm", b"up", None)
    with backend._client.client_pool.get_and_release() as client:
        client.sock = NoSendmsg(client.sock)
    value = os.urandom(50_000)
    await backend.set("k", value, None)
    assert isinstance(client.sock, NoSendmsg)  # the same connection wrote it
    assert await backend.get("k") == value
    await backend.aclose()


async def test_pymemcache_internals_we_borrow(memcached_server: Any) -> None:
    # On one server, writes borrow a connection from pymemcache's pool and write on its
    # socket (pymemcache would copy the value three times). These are private details of
    # pymemcache: if this test fails after a pymemcache upgrade, _store_batch needs updating.
    client = PooledClient(("127.0.0.1", memcached_server.port), timeout=0.25, no_delay=True)
    with client.client_pool.get_and_release(destroy_on_fail=True) as conn:
        assert isinstance(conn, Client) and conn.sock is None  # connects lazily
        conn._connect()
        sock = conn.sock
        assert isinstance(sock, socket.socket)
        assert sock.gettimeout() == 0.25
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with client.client_pool.get_and_release(destroy_on_fail=True) as again:
        assert again is conn and again.sock is sock  # released connections are reused
    with pytest.raises(ZeroDivisionError):
        with client.client_pool.get_and_release(destroy_on_fail=True) as conn:
            raise ZeroDivisionError
    assert conn.sock is None and sock.fileno() == -1  # destroyed: closed, not reused
    assert not client.client_pool.free and not client.client_pool.used
    client.close()


async def test_foreign_item_reads_as_miss(url: str, raw: Client) -> None:
    backend: Any = from_url(url)
    raw.set(backend._item_key("k"), b"written by someone else", flags=7, noreply=False)
    assert await backend.get("k") is None
    raw.set(backend._item_key("k"), b"short", flags=2, noreply=False)  # a bogus manifest
    assert await backend.get("k") is None
    await backend.aclose()


async def test_a_manifest_naming_more_chunks_than_a_value_may_take_is_not_ours(
    url: str, raw: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written by anyone who can reach memcached, with every chunk it names present: were it
    # read, a manifest could make one read fetch millions of keys. It is a miss, and a delete
    # removes the manifest without building its chunks' keys. (The bound, made small here.)
    import sse_cache.backends._memcached_layout as layout
    import sse_cache.backends.memcached as memcached

    assert MAX_CHUNKS == 32768
    for module in (layout, memcached):
        monkeypatch.setattr(module, "MAX_CHUNKS", 8)
    backend: Any = from_url(url, chunk_size=1024)
    item_key, write_id = backend._item_key("k"), os.urandom(16)
    chunks = backend._chunk_keys(item_key, write_id, 9)
    for name in chunks:
        raw.set(name, b"c" * 1024, flags=0, noreply=False)
    raw.set(item_key, Manifest(None, 9 * 1024, 1024, 9, write_id).pack(), flags=MANIFEST)
    assert await backend.get("k") is None
    await backend.delete("k")
    assert raw.get(item_key) is None and all(raw.get(name) is not None for name in chunks)
    # Nor does the backend write one: it says which option to raise.
    with pytest.raises(BackendError, match=r"raise \?chunk_size="):
        await backend.set("k", b"v" * (9 * 1024), None)
    await backend.set("k", b"v" * (8 * 1024), None)  # the most that fits
    assert await backend.get("k") == b"v" * (8 * 1024)
    await backend.aclose()


async def test_a_ttl_reaching_past_2038_is_stored(url: str) -> None:
    # memcached reads its expiry time as a signed 32-bit Unix time; one past January 2038
    # was an item expired already, and every read a miss.
    backend: Any = from_url(url)
    ttl = 2**31 + 86400 * 365 - time.time()
    await backend.set("k", b"kept", ttl)
    assert await backend.get("k") == b"kept"
    await backend.aclose()


async def test_delete_removes_the_chunks(url: str, raw: Client) -> None:
    backend: Any = from_url(url, chunk_size=4096)
    value = os.urandom(30_000)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    await backend.delete("k")
    assert await backend.get("k") is None
    assert all(raw.get(k) is None for k in keys)
    await backend.aclose()


async def test_items_respect_the_server_limit(url: str, raw: Client) -> None:
    # Default chunk size stays under memcached's default 1 MiB item limit.
    backend: Any = from_url(url)
    value = os.urandom(3 * 1024 * 1024)
    await backend.set("k", value, None)
    keys = chunk_keys(backend, "k")
    assert len(keys) == 4
    sizes = [len(raw.get(k)) for k in keys]
    assert max(sizes) <= 1024 * 1024 - 1024
    assert await backend.get("k") == value
    await backend.aclose()


async def test_long_and_odd_keys_are_hashed(url: str) -> None:
    backend: Any = from_url(url)
    assert backend._item_key("abc").endswith("e:abc")
    for key in ("x" * 300, "has space", "ünï", "ctl\x01"):
        item = backend._item_key(key)
        assert len(item) <= 250 and " " not in item and item.isascii()
        assert ":h:" in item
    await backend.aclose()


async def test_server_stats(url: str) -> None:
    backend: Any = from_url(url)
    stats = await backend.stats()
    assert stats["servers"] == 1 and stats["limit_maxbytes"] > 0
    await backend.aclose()


@pytest.mark.parametrize("now", [0.0, 1_700_000_000.3, 134_217_727.9, 134_217_728.0, 2**40 + 0.5])
def test_deadline_in_flags(now: float) -> None:
    # Expiry lives in the item flags, in 1/8 s ticks modulo 2**30 (wrapping every 4.25
    # years): never early, at most one tick late, and correct across the wrap.
    for ttl in (0.001, 0.1, 0.5, 1.0, 3600.0, 86400.0 * 365 * 2):
        flags = pack_deadline(now + ttl)
        assert flags < 2**32 and flags & 0b11 == 1
        assert not is_expired(flags, now), ttl
        assert not is_expired(flags, now + ttl - 0.001), ttl
        assert is_expired(flags, now + ttl + 0.126), ttl
        assert is_expired(flags, now + ttl + 86400.0 * 365), ttl


async def test_a_known_chunked_value_is_read_in_one_round_trip_and_changes_are_seen(
    url: str,
) -> None:
    # The backend remembers the chunks of values it read or wrote, and asks for the manifest
    # and those chunks together; another process's overwrite, a small value or a delete in
    # between must still be seen, never the remembered chunks.
    reader: Any = from_url(url, chunk_size=4096)
    other: Any = from_url(url, chunk_size=4096)
    first, second = os.urandom(20_000), os.urandom(30_000)
    await other.set("k", first, None)
    assert await reader.get("k") == first  # learns the chunks: two round trips

    calls: list[str] = []
    client = reader._client
    real_get, real_get_many = client.get, client.get_many
    client.get = lambda *a, **kw: calls.append("get") or real_get(*a, **kw)
    client.get_many = lambda *a, **kw: calls.append("get_many") or real_get_many(*a, **kw)
    assert await reader.get("k") == first
    assert calls == ["get_many"]

    await other.set("k", second, None)  # new chunks, new manifest
    assert await reader.get("k") == second
    await other.set("k", b"small now", None)  # one plain item
    assert await reader.get("k") == b"small now"
    await other.set("k", first, None)
    assert await reader.get("k") == first
    await other.delete("k")
    assert await reader.get("k") is None
    await reader.aclose()
    await other.aclose()


async def test_an_item_over_the_servers_size_limit_is_named_with_what_to_change(
    tmp_path: Any,
) -> None:
    # A memcached started with a smaller item size limit (-I 256k) than the backend's
    # chunk_size (1 MiB - 1 KiB by default) refuses every large value: the error says so,
    # with memcached's own reply and the option to change, not only "did not store".
    from servers import MemcachedServer, require_binary

    server = MemcachedServer(
        require_binary("memcached", "memcached"),
        memory_mb=16,
        options=["-I", "256k", "-o", "slab_chunk_max=131072"],
    )
    server.start()
    try:
        backend = from_url(f"memcached://{server.address}")
        for size in (300_000, 3_000_000):  # one item, then a chunked value
            with pytest.raises(BackendError) as raised:
                await backend.set("big", os.urandom(size), None)
            message = str(raised.value)
            assert "SERVER_ERROR object too large for cache" in message
            assert "lower ?chunk_size= (now 1047552)" in message and "memcached -I" in message
            assert await backend.get("big") is None  # nothing partial is readable
        # Below the limit it stores, chunked to fit: the option the message names works.
        fitted = from_url(f"memcached://{server.address}?chunk_size=200000")
        value = os.urandom(3_000_000)
        await fitted.set("big", value, None)
        assert await fitted.get("big") == value
        await fitted.aclose()
        await backend.aclose()
    finally:
        server.cleanup()


@pytest.mark.parametrize("servers", ["one", "pool"])
async def test_an_item_over_the_servers_size_limit_is_value_too_large(
    servers: str, url: str, pool_url: str
) -> None:
    # The server answered (it refused an item over its -I): not a failure the breaker counts
    # (ValueTooLarge). A pool's refusal was a plain BackendError (helper-74): a burst of
    # large answers could turn the cache off.
    backend: Any = from_url(url if servers == "one" else pool_url, chunk_size=2 * 1024 * 1024)
    try:
        for size in (1024 * 1024 + 1, 4 * 1024 * 1024 + 500_000):  # one item; chunks
            with pytest.raises(ValueTooLarge, match="-I"):
                await backend.set("k", os.urandom(size), None)
        await backend.set("k", b"fine", None)
        assert await backend.get("k") == b"fine"
    finally:
        await backend.aclose()

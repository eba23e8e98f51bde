"""The backend conformance suite: the contract of :class:`sse_cache.protocols.Backend`, run
against every backend (the ``backend`` fixture in tests/conftest.py) on real servers.

A third-party backend can run it too: see docs/plugins.md.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest

from sse_cache.errors import BackendError, BackendUnavailable
from sse_cache.protocols import Backend, LockingBackend, ScanningBackend, StatsBackend

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
# A deadlock guard for waiting on expiry: a value with a TTL under a second is gone long
# before it, unless expiry is broken.
GUARD = 30.0


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds (a real server's clock: nothing to wait on)."""
    with anyio.move_on_after(GUARD):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.05)
        return
    raise AssertionError(f"{what} (in {GUARD} s)")


async def readable_before_expiry(backend: Backend, key: str, value: bytes, ttl: float) -> None:
    """``set(key, value, ttl)`` then ``get(key)``: the value, whenever the read returns
    within the TTL. A stalled machine may make the read late, and then it cannot tell: write
    again until a read lands in time (no timing is asserted, only what a timely read sees)."""
    with anyio.fail_after(GUARD):
        while True:
            start = time.monotonic()
            await backend.set(key, value, ttl)
            got = await backend.get(key)
            if time.monotonic() - start < ttl:
                assert got == value, f"{key!r} expired before its {ttl} s TTL"
                return


async def test_missing_key_is_none(backend: Backend) -> None:
    assert await backend.get("never-written") is None


async def test_set_get_delete(backend: Backend) -> None:
    await backend.set("k", b"value", None)
    assert await backend.get("k") == b"value"
    await backend.delete("k")
    assert await backend.get("k") is None


async def test_delete_missing_key_is_not_an_error(backend: Backend) -> None:
    await backend.delete("never-written")
    assert await backend.get("never-written") is None


async def test_overwrite_replaces_the_value(backend: Backend) -> None:
    await backend.set("k", b"first", None)
    await backend.set("k", b"second, longer than the first", None)
    assert await backend.get("k") == b"second, longer than the first"
    await backend.set("k", b"3", 60)
    assert await backend.get("k") == b"3"


async def test_keys_are_independent(backend: Backend) -> None:
    values = {f"key-{i}": os.urandom(random.randint(0, 2000)) for i in range(40)}
    for key, value in values.items():
        await backend.set(key, value, None)
    for key, value in values.items():
        assert await backend.get(key) == value
    await backend.delete("key-7")
    assert await backend.get("key-7") is None
    assert await backend.get("key-8") == values["key-8"]


async def test_opaque_keys(backend: Backend) -> None:
    # Keys are arbitrary strings: spaces, control characters, non-ASCII, very long, or
    # looking like the backends' internal names must all stay distinct.
    keys = [
        "with space",
        "tab\tand\nnewline",
        "ünïcödé-🔑",
        "x" * 1000,
        "x" * 999,
        "lock:abc",
        "e:abc",
        "h:abc",
        "*",
        "[a-z]?",
        "",
    ]
    for i, key in enumerate(keys):
        await backend.set(key, f"value {i}".encode(), None)
    for i, key in enumerate(keys):
        assert await backend.get(key) == f"value {i}".encode(), key


@pytest.mark.parametrize("key", ["a\udc80", "\ud800", "ok-" + "\udfff" * 3])
async def test_keys_utf8_cannot_encode_are_refused(backend: Backend, key: str) -> None:
    # A lone surrogate: SQLite and Redis raised UnicodeEncodeError from deep inside, memory
    # and memcached stored it. Every backend refuses it alike, with a ValueError naming the
    # key (bad input, not a storage failure: not a BackendError), and stores nothing.
    await backend.set("a", b"kept", None)
    calls = {
        "get": lambda: backend.get(key),
        "set": lambda: backend.set(key, b"value", None),
        "delete": lambda: backend.delete(key),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="not encodable as UTF-8") as info:
            await call()
        assert not isinstance(info.value, UnicodeError | BackendError), name
        assert repr(key)[:8] in str(info.value), name
    if isinstance(backend, ScanningBackend):
        with pytest.raises(ValueError, match="prefix .* not encodable as UTF-8"):
            async for _ in backend.scan(key):
                pass
    assert await backend.get("a") == b"kept"
    assert await backend.get("a\ufffd") is None  # (not stored under a replacement either)


async def test_ttl_expiry(backend: Backend) -> None:
    await backend.set("long", b"stays", 600)  # (600 s: outlives GUARD many times over)
    await backend.set("forever", b"stays too", None)
    await backend.set("infinite", b"as None", math.inf)
    assert await backend.get("long") == b"stays"
    await readable_before_expiry(backend, "short", b"gone soon", 0.5)
    await until(lambda: _missing(backend, "short"), "'short' never expired")
    assert await backend.get("long") == b"stays"
    assert await backend.get("forever") == b"stays too"
    assert await backend.get("infinite") == b"as None"


async def _missing(backend: Backend, key: str) -> bool:
    return await backend.get(key) is None


async def test_non_positive_ttl_stores_nothing(backend: Backend) -> None:
    await backend.set("k", b"old", None)
    await backend.set("k", b"new", 0)
    assert await backend.get("k") is None
    await backend.set("k2", b"new", -5)
    assert await backend.get("k2") is None


async def test_overwrite_changes_the_ttl(backend: Backend) -> None:
    await backend.set("k", b"v1", 0.4)
    await backend.set("k", b"v2", None)
    await anyio.sleep(0.7)
    assert await backend.get("k") == b"v2"


async def test_large_value(backend: Backend) -> None:
    value = os.urandom(8 * MiB)
    await backend.set("big", value, None)
    assert await backend.get("big") == value
    # A smaller value overwriting a chunked one must not pick up stale chunks.
    await backend.set("big", value[: 3 * MiB + 17], None)
    assert await backend.get("big") == value[: 3 * MiB + 17]
    await backend.delete("big")
    assert await backend.get("big") is None


async def test_binary_safety(backend: Backend) -> None:
    every_byte = bytes(range(256))
    cases = {
        "all-bytes": every_byte * 4,
        "empty": b"",
        "crlf": b"\r\n\r\nEND\r\n",
        "nul": b"\x00" * 100,
        "ends-like-a-trailer": every_byte + b"\x00" * 8,
    }
    for key, value in cases.items():
        await backend.set(key, value, None)
        await backend.set(key + "-ttl", value, 60)
    for key, value in cases.items():
        assert await backend.get(key) == value, key
        assert await backend.get(key + "-ttl") == value, key


async def test_accepts_bytearray_and_memoryview(backend: Backend) -> None:
    await backend.set("ba", bytearray(b"abc"), None)  # type: ignore[arg-type]
    await backend.set("mv", memoryview(b"xyz"), None)  # type: ignore[arg-type]
    assert await backend.get("ba") == b"abc"
    assert await backend.get("mv") == b"xyz"


async def test_concurrent_writers_never_mix(backend: Backend) -> None:
    # Values larger than memcached's item limit (so chunked there), each made of one
    # repeated byte: any mix of two writes, or a partial value, is detectable.
    size = 2 * MiB + 12345
    writes = {bytes([n]) * size for n in range(1, 7)}
    seen: list[bytes | None] = []

    async def writer(value: bytes) -> None:
        await backend.set("contended", value, None)

    async def reader() -> None:
        for _ in range(6):
            seen.append(await backend.get("contended"))
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for value in writes:
            tg.start_soon(writer, value)
        tg.start_soon(reader)
        tg.start_soon(reader)
    final = await backend.get("contended")
    assert final in writes
    for read in seen:
        assert read is None or read in writes
    # After the race, a plain sequential write wins.
    await backend.set("contended", b"last", None)
    assert await backend.get("contended") == b"last"


async def test_closed_backend_raises_unavailable(backend: Backend) -> None:
    await backend.set("k", b"v", None)
    await backend.aclose()
    with pytest.raises(BackendUnavailable):
        await backend.get("k")
    with pytest.raises(BackendUnavailable):
        await backend.set("k", b"v", None)
    with pytest.raises(BackendUnavailable):
        await backend.delete("k")
    assert issubclass(BackendUnavailable, BackendError)
    await backend.aclose()  # closing twice is fine


# -- optional capabilities ----------------------------------------------------------------

SCANNING = {"memory", "sqlite", "redis", "redis-cluster"}
LOCKING = {"redis", "redis-cluster"}


async def test_capabilities_declared(backend: Backend, backend_kind: str) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend, ScanningBackend) == (backend_kind in SCANNING)
    assert isinstance(backend, StatsBackend)
    assert isinstance(backend, LockingBackend) == (backend_kind in LOCKING)


async def test_scan_and_clear(backend: Backend, backend_kind: str) -> None:
    if not isinstance(backend, ScanningBackend):
        assert backend_kind not in SCANNING  # memcached cannot list keys, by design
        return
    keys = {f"a/{i}" for i in range(30)} | {f"b/{i}" for i in range(5)}
    for key in keys:
        await backend.set(key, b"x", None)
    await backend.set("gone", b"x", 0.2)
    # Expired: not listed, whether or not the backend has removed it yet.
    await anyio.sleep(0.4)  # a lower bound: past its TTL, however late this wakes
    assert {k async for k in backend.scan()} == keys
    assert {k async for k in backend.scan("b/")} == {f"b/{i}" for i in range(5)}
    assert [k async for k in backend.scan("zzz")] == []
    cleared = await backend.clear()
    assert len(keys) <= cleared <= len(keys) + 1  # the expired key may still be counted
    assert [k async for k in backend.scan()] == []
    assert await backend.get("a/1") is None


async def test_scan_many_keys_pages(backend: Backend, backend_kind: str) -> None:
    if not isinstance(backend, ScanningBackend):
        assert backend_kind not in SCANNING
        return
    keys = {f"k{i:05d}" for i in range(1234)}
    async with anyio.create_task_group() as tg:
        for chunk in range(0, 1234, 200):
            tg.start_soon(_set_many, backend, sorted(keys)[chunk : chunk + 200])
    assert {k async for k in backend.scan()} == keys


async def _set_many(backend: Backend, keys: list[str]) -> None:
    for key in keys:
        await backend.set(key, b"v", None)


async def test_stats(backend: Backend, backend_kind: str) -> None:
    assert isinstance(backend, StatsBackend)
    before = await backend.stats()
    await backend.set("s1", b"a" * 1000, None)
    await backend.set("s2", b"b" * 3000, None)
    after = await backend.stats()
    assert after["entries"] - before["entries"] >= 2
    assert after["bytes"] - before["bytes"] >= 4000
    if backend_kind in SCANNING:  # exact, scoped to this backend
        assert after["entries"] == 2
        assert after["bytes"] == 4000


async def test_lock(backend: Backend, backend_kind: str) -> None:
    if not isinstance(backend, LockingBackend):
        assert backend_kind not in LOCKING
        return
    assert await backend.acquire("job", "token-a", 5)
    assert not await backend.acquire("job", "token-b", 5)
    await backend.release("job", "token-b")  # not the holder: nothing happens
    assert not await backend.acquire("job", "token-b", 5)
    await backend.release("job", "token-a")
    assert await backend.acquire("job", "token-b", 0.3)
    # An expired lock is free again (another holder may take it).
    await until(lambda: backend.acquire("job", "token-c", 5), "the lock never expired")
    assert not await backend.acquire("job", "token-d", 5)  # token-c holds it now
    # A lock is not an entry.
    assert await backend.get("job") is None
    if isinstance(backend, ScanningBackend):
        assert [k async for k in backend.scan()] == []

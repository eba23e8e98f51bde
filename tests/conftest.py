"""Shared fixtures: the event loops every async test runs on, real storage servers, and the
``backend`` fixture (one fresh, isolated backend of every kind) that the backend conformance
suite, the engine tests and the adapter tests all reuse.

Servers (redis-server, a 3-master Redis Cluster, memcached, a 2-server memcached pool) are
started lazily by session fixtures on free 127.0.0.1 ports and stopped at the end. A missing
binary skips the tests that need it, naming the apt package — or fails them when ``CI=true``.
Redis runs on asyncio only (redis-py's asyncio client): its trio variants are not generated.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # `servers` imports whatever the layout

from servers import (
    MemcachedServer,
    RedisClusterServers,
    RedisServer,
    require_binary,
)
from sse_cache.backends import from_url
from sse_cache.protocols import Backend

# Hypothesis' default 200 ms deadline per example is a timing assertion in disguise: under load
# it failed examples that were merely slow. Tests assert behaviour; timing is for benchmarks.
# Everything else stays at hypothesis' defaults (tests' own ``@settings`` still apply).
settings.register_profile("sse-cache", deadline=None)
settings.load_profile("sse-cache")

#: Every kind of backend the conformance suite covers, in test-id form.
BACKEND_KINDS = ("memory", "sqlite", "redis", "redis-cluster", "memcached", "memcached-pool")
#: Kinds whose client runs on asyncio only.
ASYNCIO_ONLY = frozenset({"redis", "redis-cluster"})


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every anyio test on asyncio and on trio."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Redis' client is asyncio-only: drop the trio x redis combinations instead of reporting
    # them as skipped (they are not a gap, they cannot exist).
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("anyio_backend") == "trio" and params.get("backend_kind") in ASYNCIO_ONLY:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# -- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, for the whole session."""
    server = RedisServer(require_binary("redis-server", "redis-server"))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of 3 masters on loopback ports, for the whole session."""
    cluster = RedisClusterServers(
        require_binary("redis-server", "redis-server"),
        require_binary("redis-cli", "redis-tools"),
    )
    cluster.start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedServer]:
    """A memcached on a free loopback port, for the whole session."""
    server = MemcachedServer(require_binary("memcached", "memcached"))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def memcached_pool() -> Iterator[list[MemcachedServer]]:
    """Two memcached servers (for a HashClient pool), for the whole session."""
    binary = require_binary("memcached", "memcached")
    servers = [MemcachedServer(binary), MemcachedServer(binary)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
def spawn_redis() -> Iterator[Callable[..., RedisServer]]:
    """A factory of dedicated redis-servers (for fault tests that stop and restart them);
    keyword arguments go to :class:`servers.RedisServer` (``password``, ``unix_socket``)."""
    started: list[RedisServer] = []

    def spawn(**options: Any) -> RedisServer:
        server = RedisServer(require_binary("redis-server", "redis-server"), **options)
        started.append(server)
        server.start()
        return server

    yield spawn
    for server in started:
        server.cleanup()


@pytest.fixture
def spawn_memcached() -> Iterator[Callable[[], MemcachedServer]]:
    """A factory of dedicated memcached servers (for fault tests)."""
    started: list[MemcachedServer] = []

    def spawn() -> MemcachedServer:
        server = MemcachedServer(require_binary("memcached", "memcached"), memory_mb=64)
        started.append(server)
        server.start()
        return server

    yield spawn
    for server in started:
        server.cleanup()


# -- backends -----------------------------------------------------------------------------


def _unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    """The kind of backend a test runs against (parametrises ``backend``)."""
    return str(request.param)


@pytest.fixture
def backend_url(backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a fresh, isolated backend of ``backend_kind`` (own file or key prefix);
    the servers it needs are started on first use."""
    if backend_kind == "memory":
        return "memory://"
    if backend_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.db'}"
    # A generous timeout: this suite checks what backends store, on a CI machine that may be
    # loaded; how fast they fail is what the fault tests check, with their own timeouts.
    prefix = f"{_unique_prefix()}&timeout=5"
    if backend_kind == "redis":
        server: Any = request.getfixturevalue("redis_server")
        return f"{server.url}?prefix={prefix}"
    if backend_kind == "redis-cluster":
        cluster: Any = request.getfixturevalue("redis_cluster")
        return f"{cluster.url}?prefix={prefix}"
    if backend_kind == "memcached":
        server = request.getfixturevalue("memcached_server")
        return f"memcached://{server.address}?prefix={prefix}"
    if backend_kind == "memcached-pool":
        pool: list[MemcachedServer] = request.getfixturevalue("memcached_pool")
        return "memcached://" + ",".join(s.address for s in pool) + f"?prefix={prefix}"
    raise AssertionError(f"unknown backend kind {backend_kind!r}")


@pytest.fixture
async def backend(backend_url: str, anyio_backend: str) -> AsyncIterator[Backend]:
    """A fresh, isolated backend of every kind (memory, SQLite, Redis, Redis Cluster,
    memcached, a memcached pool), closed after the test. Redis kinds run on asyncio only."""
    del anyio_backend  # requested so that this async fixture runs on the test's loop
    created = from_url(backend_url)
    try:
        yield created
    finally:
        await created.aclose()

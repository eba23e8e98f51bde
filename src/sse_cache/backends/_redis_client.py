"""The Redis backend's edge with redis-py: building a client from a URL, running each command
within its time bound, and translating redis-py's exceptions into the BackendError family
(the one place where they are translated: no redis exception leaves the backend).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final
from urllib.parse import SplitResult, unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster

from .._cancellation import RaiseSwallowed
from .._logging import redact_userinfo, unreadable_url
from ..errors import (
    BackendBusy,
    BackendError,
    BackendFull,
    BackendReadOnly,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from ._common import check_open, netloc_for_errors, parse_hosts

__all__ = ["Commands", "cluster_client", "map_exceptions", "milliseconds", "standalone_client"]

#: The longest ``PX`` sent (2**53 ms, ~285,000 years): Redis refuses one past 2**63 ms from
#: now, and a TTL that long means "never" anyway.
LONGEST_PX: Final = 2**53


def milliseconds(ttl: float) -> int:
    """``ttl`` seconds (> 0) as the milliseconds of a ``PX`` / ``PEXPIRE``: at least 1, and
    at most :data:`LONGEST_PX` (``inf`` and ``1e300`` included: Redis refuses an expiry past
    the largest time it counts, and ``math.ceil(inf)`` raises OverflowError)."""
    ms = ttl * 1000
    return LONGEST_PX if ms >= LONGEST_PX else max(1, math.ceil(ms))


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, rexc.TimeoutError | TimeoutError)


def _behind(exc: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in ``exc``'s chain that ``match`` accepts: ``exc``, then its
    causes and contexts, and theirs."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if match(current):
            return current
        seen.add(id(current))
        stack += [current.__cause__, current.__context__]
    return None


def _connect_failed(exc: BaseException) -> bool:
    # A connection attempt failed (older redis-py connects inside the pool's wait: its
    # timeout then hides a refused connection, not a busy pool).
    return isinstance(exc, rexc.ConnectionError) or (
        isinstance(exc, OSError) and not isinstance(exc, TimeoutError)
    )


def _auth_refused(exc: BaseException) -> bool:
    # (redis-py 5.0 retries a refused AUTH until the pool's timeout: the AuthenticationError
    # is then behind its "No connection available".)
    return isinstance(exc, rexc.AuthenticationError)


@contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Translate redis-py (and socket / timeout) exceptions into the BackendError family.

    The one edge where they are translated (as httpcore's ``map_exceptions`` does): no
    redis exception leaves the Redis backend.
    """
    try:
        yield
    except BackendError:
        raise
    except (rexc.TimeoutError, TimeoutError) as exc:
        raise BackendTimeout(f"{what}: Redis did not answer in time ({exc!r})") from exc
    except rexc.OutOfMemoryError as exc:
        raise BackendFull(
            f"{what}: Redis is full: at its maxmemory, with a policy that evicts nothing "
            f"for this key (raise maxmemory, or set maxmemory-policy allkeys-lru) ({exc})"
        ) from exc
    except rexc.ReadOnlyError as exc:
        raise BackendReadOnly(
            f"{what}: Redis is a read-only replica: its answers are served, none is stored "
            f"(point the URL at the primary, or through a proxy that follows it) ({exc})"
        ) from exc
    except rexc.ConnectionError as exc:
        refusal = _behind(exc, _auth_refused)
        if refusal is not None:
            # (A ConnectionError to redis-py; "unreachable" sent operators to the network.)
            raise BackendUnavailable(
                f"{what}: Redis refused the credentials: check the user and password in the "
                f"URL ({refusal})"
            ) from exc
        if (
            "No connection available" not in str(exc)
            or not isinstance(exc.__cause__, TimeoutError)
            or _behind(exc.__cause__, _connect_failed) is not None
        ):
            raise BackendUnavailable(f"{what}: Redis is unreachable ({exc})") from exc
        # The blocking pool waited ``timeout`` for a free connection: a burst larger than the
        # pool, or a slow server holding every connection. Redis itself may be fine; the
        # message must not send an operator to look at it.
        raise BackendBusy(
            f"{what}: no pooled Redis connection came free in time: more operations at once "
            f"than ?max_connections=, or every connection waiting on a slow server ({exc})"
        ) from exc
    except (rexc.ClusterDownError, rexc.RedisClusterException) as exc:
        timeout = _behind(exc, _timed_out)
        if timeout is not None:
            # The cluster client's refresh of its topology (asked for by a command that
            # timed out) timed out too: a stalled node, as a command that timed out — which
            # a stall may end — not a cluster gone (helper-153: the fan-out's reads and
            # appends, which wait through a stall, gave up on the first).
            raise BackendTimeout(f"{what}: Redis did not answer in time ({exc})") from exc
        raise BackendUnavailable(f"{what}: Redis is unreachable ({exc})") from exc
    except (rexc.BusyLoadingError, ConnectionError, OSError) as exc:
        raise BackendUnavailable(f"{what}: Redis is unreachable ({exc})") from exc
    except rexc.RedisError as exc:
        raise BackendError(f"{what}: Redis error ({exc})") from exc


class Commands:
    """How one backend runs its Redis commands: ``async with commands("GET"): ...`` refuses
    once :meth:`close` was called or outside asyncio (:class:`BackendUnavailable`), bounds
    the block in time and translates its exceptions (:func:`map_exceptions`)."""

    def __init__(self, client: aioredis.Redis | RedisCluster, timeout: float) -> None:
        self.closed = False
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None  # where the pool was last used

    def close(self) -> None:
        self.closed = True

    def _moved_to(self, loop: asyncio.AbstractEventLoop) -> None:
        # Pooled connections belong to the loop they were opened on. Used from another once
        # that one ended (asyncio.run once more, a sync transport's next portal), the first
        # command took a connection of the ended loop and failed ("Event loop is closed"):
        # every other loop's first lookup was a miss, its write failed (helper-134). They
        # are let go (their sockets went with their loop) and the pool opens new ones here.
        # (Not while the other loop runs: a backend used from two at once is not supported,
        # and that loop's commands may be in flight.)
        previous, self._loop = self._loop, loop
        client = self._client
        if previous is not None and previous.is_closed() and isinstance(client, aioredis.Redis):
            client.connection_pool.reset()  # type: ignore[no-untyped-call]

    @asynccontextmanager
    async def __call__(self, what: str) -> AsyncIterator[None]:
        check_open(self.closed, "RedisBackend")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise BackendUnavailable(
                "the Redis backend runs on asyncio only (redis-py's asyncio client)"
            ) from None
        if loop is not self._loop:
            self._moved_to(loop)
        # redis-py enforces ``timeout`` itself (socket timeouts) and then drops the connection
        # cleanly; cancelling it mid-command instead can leave a pooled connection half
        # closed. The outer bound only catches what the socket timeouts cannot. It is
        # asyncio.timeout, not anyio.fail_after: this code runs on asyncio only, and an anyio
        # cancel scope costs a noticeable part of a small command.
        # redis-py sends each command through asyncio.wait_for, which on Python 3.11 drops a
        # cancellation that arrives as the command completes (CPython #86296): a caller's
        # asyncio.timeout, cancelled once, would never fire (helper-70: a follower read a
        # whole stream 3 s past its timeout).
        with RaiseSwallowed(), map_exceptions(what):
            async with asyncio.timeout(self._timeout * 2 + 0.25):
                if self._cluster:
                    # Learn the topology before the command, once (a no-op afterwards, and
                    # after a fault until redis-py asks for it again): redis-py's cluster
                    # client resolves a command's routing before taking its init lock, and a
                    # burst of concurrent first commands on a new client races there and
                    # drops live connections ("Connection closed by server", redis-py 8.1).
                    await self._client.initialize()
                yield


def _credentials(parts: SplitResult, kwargs: dict[str, Any]) -> None:
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)


def split_url(url: str, scheme: str) -> SplitResult:
    """``urlsplit(url)``, a URL it cannot read (``redis://:pw@[::1``, an unclosed IPv6
    bracket) being a :class:`ConfigError` that shows it without its password (urlsplit's own
    message may quote the netloc)."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        why = unreadable_url(exc)
        raise ConfigError(f"{scheme}:// URL: {why} in {redact_userinfo(url)!r}") from None


def cluster_client(url: str, scheme: str, kwargs: dict[str, Any]) -> RedisCluster:
    """A Redis Cluster client for ``redis+cluster://`` / ``rediss+cluster://`` ``url``, with
    ``kwargs`` (redis-py's keyword arguments) and the URL's credentials."""
    parts = split_url(url, scheme)
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"{scheme}:// URL: Redis Cluster has only database 0, got {parts.path!r}")
    nodes = [ClusterNode(host, port) for host, port in parse_hosts(scheme, parts.netloc, 6379)]
    _credentials(parts, kwargs)
    return RedisCluster(startup_nodes=nodes, ssl=scheme.startswith("rediss"), **kwargs)


def standalone_client(url: str, scheme: str, kwargs: dict[str, Any]) -> aioredis.Redis:
    """A client with a blocking connection pool for a ``redis://``, ``rediss://`` or
    ``unix://`` ``url``, with ``kwargs`` (redis-py's keyword arguments, ``socket_timeout``
    among them) and the URL's credentials and database."""
    # The connection is described to redis-py as keyword arguments, never as a rebuilt URL:
    # how redis-py parses URLs changes between releases (8.x rejects the ``unix:/path`` that
    # ``urlsplit(...).geturl()`` makes of ``unix:///path``), keyword arguments have not.
    parts = split_url(url, scheme)
    _credentials(parts, kwargs)
    connection_class: type[aioredis.connection.AbstractConnection]
    if scheme == "unix":
        path = unquote(parts.path)
        if not path:
            raise ConfigError(f"unix:// URL names no socket path: {redact_userinfo(url)!r}")
        kwargs["path"] = path
        connection_class = aioredis.connection.UnixDomainSocketConnection
    else:
        if "," in parts.netloc:
            raise ConfigError(
                f"{scheme}:// URL has several hosts; for Redis Cluster use redis+cluster://"
            )
        try:
            port = parts.port
        except ValueError:
            # The host and port only: the URL's user info holds its password.
            raise ConfigError(f"{scheme}:// URL: bad port in {netloc_for_errors(url)!r}") from None
        if port == 0:
            # (It went to 6379, maybe another Redis; redis+cluster:// refuses it too.)
            raise ConfigError(f"{scheme}:// URL: port 0 in {netloc_for_errors(url)!r}")
        kwargs["host"] = unquote(parts.hostname or "localhost")
        kwargs["port"] = 6379 if port is None else port
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(f"{scheme}:// URL: database must be a number, got {path!r}")
            if "db" in kwargs:
                raise ConfigError(f"{scheme}:// URL: database given both in path and as ?db=")
            kwargs["db"] = int(path)
        connection_class = (
            aioredis.connection.SSLConnection
            if scheme == "rediss"
            else aioredis.connection.Connection
        )
    # A blocking pool: under a burst of more than max_connections operations, the extra ones
    # wait for a connection (within the operation's deadline) instead of failing at once.
    pool = aioredis.BlockingConnectionPool(
        connection_class=connection_class, timeout=kwargs["socket_timeout"], **kwargs
    )
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) its pool

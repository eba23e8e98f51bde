"""Redis backend (standalone, TLS, unix socket, Redis Cluster) on redis-py's ``redis.asyncio``.

redis-py's asyncio client runs on asyncio only: under trio every operation raises
:class:`~sse_cache.errors.BackendUnavailable` saying so (the engine then serves misses).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError
from ._common import Options, check_open, expires_at, parse_hosts, to_bytes

__all__ = ["RedisBackend", "from_url", "map_exceptions"]

_DEFAULT_PREFIX: Final = "sse-cache:"
_DEFAULT_TIMEOUT: Final = 0.5
_SCAN_COUNT: Final = 500
# Compare-and-delete: release a lock only if it still holds our token (it may have expired
# and been taken by someone else since).
_RELEASE: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# Compare-and-extend: renew a lock only while it still holds our token.
_RENEW: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "*?[]\\"})
# Fan-out streams: a runaway producer cannot grow a stream past about this many messages
# (MAXLEN ~); an LLM answer is about one event per token, tens of thousands at most. Bytes
# are bounded by the producer (the engine's max_entry_bytes) and by the ttl.
_STREAM_MAXLEN: Final = 100_000
# Messages per XREAD: few at first and about _READ_BYTES per batch after that, so that a
# batch of large messages still arrives within the per-operation timeout while a late joiner
# catches up on small ones in few round trips.
_READ_COUNT: Final = (8, 256)
_READ_BYTES: Final = 2 * 1024 * 1024
# Append one message (field ``d``) or the end marker (field ``e``), numbered ``i`` (0, 1, ...)
# so that readers notice lost messages, tagged with the caller's nonce ``n``: redis-py retries
# a command once after a timeout, and a retried append whose first attempt was applied (only
# its reply was lost) must not append twice. One producer per channel, so a retry can only
# repeat the newest entry. Appending and refreshing the expiry in one script keeps the stream
# from living forever if the client dies in between.
_APPEND: Final = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local seq = 0
if last then
    local fields = last[2]
    for i = 1, #fields, 2 do
        if fields[i] == 'n' and fields[i + 1] == ARGV[1] then
            redis.call('PEXPIRE', KEYS[1], ARGV[3])
            return 0
        end
        if fields[i] == 'i' then
            seq = tonumber(fields[i + 1]) + 1
        end
    end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'i', seq, 'n', ARGV[1], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _refused(exc: BaseException) -> bool:
    """A connection attempt failed somewhere behind ``exc`` (older redis-py connect inside
    the pool's wait: its timeout then hides a refused connection, not a busy pool)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc.__cause__, exc.__context__]
    while stack:
        cause = stack.pop()
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, rexc.ConnectionError) or (
            isinstance(cause, OSError) and not isinstance(cause, TimeoutError)
        ):
            return True
        stack += [cause.__cause__, cause.__context__]
    return False


@contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Translate redis-py (and socket / timeout) exceptions into the BackendError family.

    The one edge where they are translated (as httpcore's ``map_exceptions`` does): no
    redis exception leaves this module.
    """
    try:
        yield
    except BackendError:
        raise
    except (rexc.TimeoutError, TimeoutError) as exc:
        raise BackendTimeout(f"{what}: Redis did not answer in time ({exc!r})") from exc
    except rexc.ConnectionError as exc:
        if (
            "No connection available" not in str(exc)
            or not isinstance(exc.__cause__, TimeoutError)
            or _refused(exc.__cause__)
        ):
            raise BackendUnavailable(f"{what}: Redis is unreachable ({exc})") from exc
        # The blocking pool waited ``timeout`` for a free connection: a burst larger than the
        # pool, or a slow server holding every connection. Redis itself may be fine; the
        # message must not send an operator to look at it.
        raise BackendTimeout(
            f"{what}: no pooled Redis connection came free in time: more operations at once "
            f"than ?max_connections=, or every connection waiting on a slow server ({exc})"
        ) from exc
    except (
        rexc.ClusterDownError,
        rexc.RedisClusterException,
        rexc.BusyLoadingError,
        ConnectionError,
        OSError,
    ) as exc:
        raise BackendUnavailable(f"{what}: Redis is unreachable ({exc})") from exc
    except rexc.RedisError as exc:
        raise BackendError(f"{what}: Redis error ({exc})") from exc


class RedisBackend:
    """Entries in Redis (a standalone server or a Redis Cluster), under a key prefix.

    Guarantees:

    - *Atomicity*: each value is one Redis string written by one ``SET``; Redis applies it
      atomically, so a reader sees the old or the new value, never a mix, in every process
      and on every machine sharing the server.
    - *TTL*: ``SET ... PX`` (millisecond resolution), enforced by Redis itself.
    - *Size*: values up to Redis' ``proto-max-bulk-len`` (512 MB by default) and the
      server's ``maxmemory`` policy; several MB are fine, although one operation must finish
      within ``timeout``.
    - *Faults*: every operation is bounded by ``timeout`` seconds (0.5 by default), so a hung
      or unreachable Redis costs a :class:`BackendTimeout` / :class:`BackendUnavailable`
      quickly, never a stalled stream; the connection pool reconnects by itself when the
      server is back (the same object recovers).
    - *Namespace*: values live at ``{prefix}e:{key}``, locks at ``{prefix}l:{name}`` and
      fan-out streams at ``{prefix}s:{channel}``, so several applications can share one
      Redis by using different prefixes.

    asyncio only (redis-py's asyncio client); under trio operations raise
    :class:`BackendUnavailable`.

    Capabilities: :class:`~sse_cache.protocols.ScanningBackend` (``SCAN``, never ``KEYS``;
    on a cluster, every primary), :class:`~sse_cache.protocols.StatsBackend`,
    :class:`~sse_cache.protocols.LeasingBackend` (``SET NX PX``, compare-and-delete,
    compare-and-``PEXPIRE``),
    :class:`~sse_cache.protocols.FanoutBackend` (Redis Streams: ``XADD`` / ``XREAD BLOCK``).
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        prefix: str = _DEFAULT_PREFIX,
        timeout: float = _DEFAULT_TIMEOUT,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self.prefix = prefix
        self._data_prefix = prefix + "e:"
        self._lock_prefix = prefix + "l:"
        self._stream_prefix = prefix + "s:"
        # EVALSHA with a fallback to loading the script (after a restart, on a new node).
        self._append = client.register_script(_APPEND)
        self._timeout = timeout
        self._closed = False

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "standalone"
        return f"RedisBackend({kind}, prefix={self.prefix!r}, timeout={self._timeout})"

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The underlying redis-py client (for capabilities this class does not wrap)."""
        return self._client

    @asynccontextmanager
    async def _op(self, what: str) -> AsyncIterator[None]:
        check_open(self._closed, "RedisBackend")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise BackendUnavailable(
                "the Redis backend runs on asyncio only (redis-py's asyncio client)"
            ) from None
        # redis-py enforces ``timeout`` itself (socket timeouts) and then drops the connection
        # cleanly; cancelling it mid-command instead can leave a pooled connection half
        # closed. The outer bound only catches what the socket timeouts cannot. It is
        # asyncio.timeout, not anyio.fail_after: this code runs on asyncio only, and an anyio
        # cancel scope costs a noticeable part of a small command.
        with map_exceptions(what):
            async with asyncio.timeout(self._timeout * 2 + 0.25):
                if self._cluster:
                    # Learn the topology before the command, once (a no-op afterwards, and
                    # after a fault until redis-py asks for it again): redis-py's cluster
                    # client resolves a command's routing before taking its init lock, and a
                    # burst of concurrent first commands on a new client races there and
                    # drops live connections ("Connection closed by server", redis-py 8.1).
                    await self._client.initialize()
                yield

    # -- the Backend protocol -------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when missing or expired."""
        async with self._op("GET"):
            value: bytes | None = await self._client.get(self._data_prefix + key)  # type: ignore[assignment]
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """``SET`` ``value`` under ``key``, with ``PX`` when ``ttl`` is given (a
        non-positive ``ttl`` deletes the key: it would be expired already)."""
        value = to_bytes(value)
        expires_at(0.0, ttl)
        async with self._op("SET"):
            name = self._data_prefix + key
            if ttl is None:
                await self._client.set(name, value)
            elif ttl <= 0:
                await self._client.delete(name)
            else:
                await self._client.set(name, value, px=max(1, math.ceil(ttl * 1000)))

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        async with self._op("DEL"):
            await self._client.delete(self._data_prefix + key)

    async def aclose(self) -> None:
        """Close the connection pool; later operations raise BackendUnavailable."""
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout * 4):
                await self._client.aclose()
        except Exception:  # closing a pool whose server is gone must not fail the caller
            pass

    # -- capabilities ---------------------------------------------------------------------

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key starting with ``prefix`` (``SCAN MATCH``, one bounded call per page;
        on a cluster, each primary in turn). Keys written during the scan may be missed."""
        match = (self._data_prefix + prefix).translate(_GLOB_SPECIAL) + "*"
        start = len(self._data_prefix)
        async for page in self._scan_pages(match):
            for raw in page:
                yield raw.decode("utf-8", "surrogateescape")[start:]

    async def _scan_pages(self, match: str) -> AsyncIterator[list[bytes]]:
        client = self._client
        if isinstance(client, RedisCluster):
            async with self._op("CLUSTER NODES"):
                await client.initialize()
            for node in client.get_primaries():
                cursor = 0
                while True:
                    async with self._op("SCAN"):
                        # On a cluster, SCAN answers {node name: cursor} and the keys.
                        reply: Any = await client.scan(
                            cursor, match=match, count=_SCAN_COUNT, target_nodes=node
                        )
                    cursors, keys = reply
                    yield [k if isinstance(k, bytes) else k.encode() for k in keys]
                    cursor = int(cursors[node.name])
                    if cursor == 0:
                        break
        else:
            cursor = 0
            while True:
                async with self._op("SCAN"):
                    cursor, keys = await client.scan(cursor, match=match, count=_SCAN_COUNT)
                yield [k if isinstance(k, bytes) else k.encode() for k in keys]
                if cursor == 0:
                    break

    async def clear(self) -> int:
        """Delete every entry under this backend's prefix (``SCAN`` + ``UNLINK`` in pages);
        return how many were deleted. Locks are left alone."""
        count = 0
        match = self._data_prefix.translate(_GLOB_SPECIAL) + "*"
        async for page in self._scan_pages(match):
            if page:
                async with self._op("UNLINK"):
                    count += int(await self._client.unlink(*page))
        return count

    async def stats(self) -> dict[str, int]:
        """``entries`` and ``bytes`` (values) under this prefix, counted by ``SCAN`` +
        ``STRLEN`` (cost grows with the number of keys), and ``servers``."""
        entries = size = 0
        match = self._data_prefix.translate(_GLOB_SPECIAL) + "*"
        async for page in self._scan_pages(match):
            if not page:
                continue
            async with self._op("STRLEN"):
                pipe = self._client.pipeline()
                for name in page:
                    pipe.strlen(name)
                lengths = await pipe.execute()
            for length in lengths:
                if isinstance(length, int) and length > 0:  # 0: expired meanwhile
                    entries += 1
                    size += length
        servers = 1
        if isinstance(self._client, RedisCluster):
            servers = len(self._client.get_primaries())
        return {"entries": entries, "bytes": size, "servers": servers}

    async def acquire(self, name: str, token: str, ttl: float) -> bool:
        """Take lock ``name`` for ``token`` for ``ttl`` seconds unless someone holds it
        (``SET NX PX``, atomic); True when taken."""
        if not ttl > 0:
            raise ConfigError(f"lock ttl must be > 0 seconds, got {ttl!r}")
        async with self._op("SET NX"):
            taken = await self._client.set(
                self._lock_prefix + name, token, nx=True, px=max(1, math.ceil(ttl * 1000))
            )
        return bool(taken)

    async def release(self, name: str, token: str) -> None:
        """Release ``name`` if ``token`` still holds it (atomic compare-and-delete in Lua)."""
        async with self._op("EVAL"):
            await self._client.eval(_RELEASE, 1, self._lock_prefix + name, token)

    async def renew(self, name: str, token: str, ttl: float) -> bool:
        """Extend ``name`` to ``ttl`` seconds from now if ``token`` still holds it (atomic
        compare-and-``PEXPIRE`` in Lua)."""
        if not ttl > 0:
            raise ConfigError(f"lock ttl must be > 0 seconds, got {ttl!r}")
        async with self._op("EVAL"):
            renewed = await self._client.eval(
                _RENEW, 1, self._lock_prefix + name, token, max(1, math.ceil(ttl * 1000))
            )
        return bool(renewed)

    async def holder(self, name: str) -> str | None:
        """The token holding lock ``name``, or None."""
        async with self._op("GET"):
            raw = await self._client.get(self._lock_prefix + name)
        if raw is None:
            return None
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        """Append ``data`` to the stream ``{prefix}s:{channel}`` (``XADD MAXLEN ~``, in a
        script that also sets the stream's expiry to ``ttl`` seconds).

        A retried append is applied once. A stream holds about 100 000 messages at most:
        beyond that the oldest are trimmed, and readers that still needed them raise
        :class:`BackendError`."""
        await self._add(channel, "d", to_bytes(data), ttl, "XADD")

    async def finish(self, channel: str, *, ttl: float) -> None:
        """Append the end marker to ``channel`` and keep the stream ``ttl`` more seconds
        (late readers replay it, then stop)."""
        await self._add(channel, "e", b"", ttl, "XADD (end)")

    async def _add(self, channel: str, field: str, data: bytes, ttl: float, what: str) -> None:
        if not ttl > 0:
            raise ConfigError(f"stream ttl must be > 0 seconds, got {ttl!r}")
        args = (secrets.token_hex(8), _STREAM_MAXLEN, max(1, math.ceil(ttl * 1000)), field, data)
        async with self._op(what):
            await self._append(keys=[self._stream_prefix + channel], args=args)

    async def read(
        self, channel: str, *, start: str = "0", block: float = 5.0
    ) -> AsyncIterator[bytes]:
        """Every message of ``channel`` published after stream ID ``start`` (``"0"``: all of
        them; ``"$"``: only those published from now on), in order, then the new ones as
        they are published, until the end marker.

        Raises :class:`BackendTimeout` when no message arrives for ``block`` seconds (the
        producer died or stalled; a stream that does not exist yet counts as silent),
        :class:`BackendError` when messages this reader needs were lost (trimmed or expired),
        and the usual :class:`BackendError` family when Redis fails.

        Waiting holds one pooled connection per reader, in slices of half the operation
        timeout (``XREAD BLOCK``), so a dead server is noticed within about ``timeout``."""
        if not block > 0:
            raise ConfigError(f"read block must be > 0 seconds, got {block!r}")
        name = self._stream_prefix + channel
        last: str | bytes = start
        if start == "$":
            # XREAD's "$" means "newer than the newest *now*": re-sent on every slice it
            # would drop what arrives between two slices, so pin it to an ID once.
            async with self._op("XREVRANGE"):
                newest: Any = await self._client.xrevrange(name, count=1)
            last = newest[0][0] if newest else "0-0"
        expect = 0 if last in ("0", "0-0") else None  # the first message's number, if known
        # Slices shorter than the socket timeout: a blocked XREAD must not look like a hung
        # server to redis-py.
        slice_ms = max(1, int(self._timeout * 500))
        count = _READ_COUNT[0]
        deadline = time.monotonic() + block
        while True:
            wait_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0:
                raise BackendTimeout(f"XREAD: no message on stream {channel!r} for {block} seconds")
            async with self._op("XREAD"):
                reply: Any = await self._client.xread(
                    {name: last}, count=count, block=min(wait_ms, slice_ms)
                )
            entries = _stream_entries(reply)
            if not entries:
                continue
            deadline = time.monotonic() + block
            size = sum(len(fields.get(b"d", b"")) for _, fields in entries) // len(entries)
            count = max(1, min(_READ_COUNT[1], _READ_BYTES // max(size, 1)))
            for entry_id, fields in entries:
                last = entry_id
                seq = int(fields.get(b"i", b"-1"))
                if expect is not None and seq != expect:
                    raise BackendError(
                        f"XREAD: stream {channel!r} lost messages (expected #{expect}, "
                        f"got #{seq}): trimmed or expired"
                    )
                expect = seq + 1
                if b"e" in fields:
                    return
                yield fields[b"d"]


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream ``XREAD`` reply (RESP2: ``[[name, entries]]``, RESP3:
    ``{name: [entries]}``); empty when it timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        (value,) = reply.values()
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(reply[0][1])


def _cluster_client(url: str, scheme: str, kwargs: dict[str, Any]) -> RedisCluster:
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"{scheme}:// URL: Redis Cluster has only database 0, got {parts.path!r}")
    nodes = [ClusterNode(host, port) for host, port in parse_hosts(scheme, parts.netloc, 6379)]
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    return RedisCluster(startup_nodes=nodes, ssl=scheme.startswith("rediss"), **kwargs)


def _standalone_client(url: str, scheme: str, kwargs: dict[str, Any]) -> aioredis.Redis:
    # The connection is described to redis-py as keyword arguments, never as a rebuilt URL:
    # how redis-py parses URLs changes between releases (8.x rejects the ``unix:/path`` that
    # ``urlsplit(...).geturl()`` makes of ``unix:///path``), keyword arguments have not.
    parts = urlsplit(url)
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    connection_class: type[aioredis.connection.AbstractConnection]
    if scheme == "unix":
        path = unquote(parts.path)
        if not path:
            raise ConfigError(f"unix:// URL names no socket path: {url!r}")
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
            raise ConfigError(f"{scheme}:// URL: bad port in {parts.netloc!r}") from None
        kwargs["host"] = unquote(parts.hostname or "localhost")
        kwargs["port"] = port or 6379
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


def from_url(url: str, **options: Any) -> RedisBackend:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
    ``unix:///path/to/redis.sock[?db=N]``, ``redis+cluster://host:port[,host:port...]`` and
    ``rediss+cluster://`` -> :class:`RedisBackend`.

    Query options: ``prefix`` (key prefix, ``sse-cache:``), ``timeout`` (seconds per
    operation, 0.5), ``connect_timeout`` (defaults to ``timeout``), ``max_connections``
    (pool size, 64), ``db`` (standalone), ``health_check_interval``, ``client_name``, and for
    TLS ``ssl_cert_reqs`` (``required``/``optional``/``none``), ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``.
    """
    scheme = url.split("://", 1)[0].lower()
    opts = Options(url, options)
    prefix = opts.take_str("prefix", _DEFAULT_PREFIX)
    timeout = opts.take_float("timeout", _DEFAULT_TIMEOUT)
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": opts.take_float("connect_timeout", timeout),
        "max_connections": opts.take_int("max_connections", 64),
        # One immediate retry: after a server restart the pooled connections are dead, and
        # the retry on a fresh connection lets the same backend object recover at once.
        "retry": Retry(NoBackoff(), 1),
    }
    if "health_check_interval" in opts:
        kwargs["health_check_interval"] = opts.take_int("health_check_interval", 0, minimum=0)
    if "client_name" in opts:
        kwargs["client_name"] = opts.take_str("client_name", "")
    if "db" in opts:
        kwargs["db"] = opts.take_int("db", 0, minimum=0)
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in opts:
            kwargs[name] = opts.take_str(name, "")
    if "ssl_cert_reqs" in opts:
        reqs = opts.take_str("ssl_cert_reqs", "required").lower()
        if reqs not in ("required", "optional", "none"):
            raise ConfigError(
                f"{scheme}:// option 'ssl_cert_reqs': expected required, optional or none, "
                f"got {reqs!r}"
            )
        kwargs["ssl_cert_reqs"] = reqs
    if "ssl_check_hostname" in opts:
        kwargs["ssl_check_hostname"] = opts.take_bool("ssl_check_hostname", True)
    opts.finish()
    if any(k.startswith("ssl_") for k in kwargs) and not scheme.startswith("rediss"):
        raise ConfigError(f"ssl_* options need a rediss:// URL, not {scheme}://")

    client: aioredis.Redis | RedisCluster
    try:
        if scheme.endswith("+cluster"):
            if "db" in kwargs:
                raise ConfigError(f"{scheme}:// URL: Redis Cluster has no 'db' option")
            client = _cluster_client(url, scheme, kwargs)
        elif scheme in ("redis", "rediss", "unix"):
            client = _standalone_client(url, scheme, kwargs)
        else:
            raise ConfigError(f"the Redis backend does not handle {scheme}:// URLs")
    except (ValueError, rexc.RedisError, rexc.RedisClusterException) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad Redis URL {url!r}: {exc}") from exc
    return RedisBackend(client, prefix=prefix, timeout=timeout)

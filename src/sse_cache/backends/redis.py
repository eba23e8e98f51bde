"""Redis backend (standalone, TLS, unix socket, Redis Cluster) on redis-py's ``redis.asyncio``.

redis-py's asyncio client runs on asyncio only: under trio every operation raises
:class:`~sse_cache.errors.BackendUnavailable` saying so (the engine then serves misses).
Building the client and translating its errors is in
:mod:`~sse_cache.backends._redis_client`, the fan-out streams in
:mod:`~sse_cache.backends._redis_fanout`, the near cache in
:mod:`~sse_cache.backends._redis_near` (what it keeps and when it may keep it) and
:mod:`~sse_cache.backends._redis_tracking` (the connection that carries Redis's
invalidations to it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._logging import redact_userinfo
from ..errors import ConfigError, CorruptEntry
from ._common import Options, check_key, expires_at, to_bytes
from ._fork import keep, reopen_after_fork
from ._redis_client import (
    Commands,
    cluster_client,
    map_exceptions,
    milliseconds,
    split_url,
    standalone_client,
)
from ._redis_fanout import StreamFanout
from ._redis_near import TrackedValues
from ._redis_touch import Toucher
from ._redis_tracking import InvalidationListener, connection_for

__all__ = ["RedisBackend", "from_url", "map_exceptions"]

_DEFAULT_PREFIX: Final = "sse-cache:"
_DEFAULT_TIMEOUT: Final = 0.5
_DEFAULT_NEAR_CACHE: Final = 32 * 1024 * 1024
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
logger = logging.getLogger("sse_cache.backends.redis")
_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "*?[]\\"})


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
    - *Near cache* (standalone servers; ``near_cache_bytes``, 0 turns it off): up to
      ``near_cache_bytes`` of recently read values are kept in this process and answered
      without a round trip (also by :meth:`cached`) while Redis itself reports every change
      under ``{prefix}e:`` to a dedicated connection (``CLIENT TRACKING ... BCAST``, named
      ``{client_name or 'sse-cache'}:invalidations``). Within this process a value is never
      answered after a ``set``, ``delete`` or ``clear`` through this backend began; a write
      by another client is seen once its invalidation arrives (the same server loop that
      answers the writer sends it), and never later than the loss of that connection,
      which empties the near cache and turns it off until tracking is back. Expiry is checked
      on every use against the ``PTTL`` read with the value.

    asyncio only (redis-py's asyncio client); under trio operations raise
    :class:`BackendUnavailable`.

    Capabilities: :class:`~sse_cache.protocols.ScanningBackend` (``SCAN``, never ``KEYS``;
    on a cluster, every primary), :class:`~sse_cache.protocols.StatsBackend`,
    :class:`~sse_cache.protocols.NearCachingBackend` (standalone servers),
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
        near_cache_bytes: int = _DEFAULT_NEAR_CACHE,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            # Entries at e:{key}, among the keys of whatever else uses the server: `sse-cache
            # ls` showed another application's e:* keys as corrupt entries, and `purge`
            # deleted them (helper-81).
            raise ConfigError(
                f"prefix must be a non-empty string (sse-cache:, myapp:...), got {prefix!r}: "
                "the cache's keys need a namespace of their own"
            )
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self.prefix = prefix
        self._data_prefix = prefix + "e:"
        self._lock_prefix = prefix + "l:"
        self._timeout = timeout
        # Every command runs in ``async with self._op(what)``: refused once closed or off
        # asyncio, bounded in time, its errors translated.
        self._op = Commands(client, timeout)
        self._fanout = StreamFanout(client, self._op, prefix=prefix + "s:", timeout=timeout)
        # The near cache and the listener that keeps it current. Not on a cluster: there each
        # primary reports only its own slots' keys, on a connection of its own, and the slots
        # move; one tracking connection per node that follows the moves is not built.
        self._values = TrackedValues(0 if self._cluster else near_cache_bytes)
        self._listener: InvalidationListener | None = None
        self._toucher: Toucher | None = None
        self._dropped: weakref.finalize[Any, Any] | None = None
        if self._values.enabled and isinstance(client, aioredis.Redis):
            name = client.connection_pool.connection_kwargs.get("client_name") or "sse-cache"
            self._listener = InvalidationListener(
                connection_for(client, f"{name}:invalidations", timeout),
                self._data_prefix,
                self._values,
                timeout=timeout,
            )
            self._toucher = Toucher(client, self._data_prefix, timeout=timeout)
            # Their tasks hold the client, not the backend: one dropped unclosed (a transport
            # made per call, never closed) left both tasks and their sockets running for the
            # life of the loop (helper-131). They stop once it is collected.
            self._dropped = weakref.finalize(self, _abandon, self._listener, self._toucher, client)
            self._dropped.atexit = False
        reopen_after_fork(self)

    def _forked(self) -> None:
        # A child of a fork: the pooled connections and the tracking connection are the
        # parent's (_fork); the child's first use connects anew.
        if self._listener is not None:
            self._listener.forked()
        if self._toucher is not None:
            self._toucher.forked()
        if self._cluster:
            if not _forget_cluster_connections(self._client):
                # A redis-py whose cluster client is laid out otherwise: refused (misses,
                # each with a warning) rather than used over the parent's sockets, and said
                # once, with why (each miss's warning says only "closed"; helper-104).
                self._op.close()
                logger.warning(
                    "sse_cache: this Redis Cluster backend was used before fork(), and this "
                    "redis-py's cluster client cannot be reset in the child: the cache is "
                    "off in this process; build the backend in each process instead"
                )
        elif isinstance(self._client, aioredis.Redis):
            pool = self._client.connection_pool
            keep(
                (
                    getattr(pool, "_available_connections", None),
                    list(getattr(pool, "_in_use_connections", ())),
                )
            )
            pool.reset()  # type: ignore[no-untyped-call]
            if hasattr(pool, "_lock"):
                # (Its lock may have been held, or bound to the parent's loop, at the fork.)
                pool._lock = asyncio.Lock()

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "standalone"
        return f"RedisBackend({kind}, prefix={self.prefix!r}, timeout={self._timeout})"

    @property
    def timeout(self) -> float:
        """Seconds a command may take (``?timeout=``): what bounds a cross-process
        producer's writes to its channel, and so the shortest safe lease."""
        return self._timeout

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The underlying redis-py client (for capabilities this class does not wrap)."""
        return self._client

    # -- the Backend protocol -------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when missing or expired."""
        check_key(key)
        near = self.cached(key)
        if near is not None:
            return near
        name = self._data_prefix + key
        value: bytes | None
        pttl: int
        async with self._op("GET"):
            if self._listener is not None:
                self._listener.ensure_running()
            if self._toucher is not None:
                self._toucher.ensure_running()
            # Noted before the GET is sent: an invalidation handled before its reply may be
            # for a write made after it ran (_redis_near).
            ticket = self._values.begin(key)
            try:
                if ticket is None:  # nothing to keep: one GET, as without a near cache
                    value = await self._client.get(name)  # type: ignore[assignment]
                    return value
                sent = time.monotonic()
                pipe = self._client.pipeline(transaction=False)
                pipe.get(name)
                pipe.pttl(name)
                value, pttl = await pipe.execute()
            except rexc.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):  # (in a pipeline, after its command)
                    raise
                # Another program's list or hash at our key: not a fault of Redis (the
                # engine deletes it, and the breaker does not count it).
                raise CorruptEntry(f"{name!r} holds a Redis value of another type") from exc
        if value is not None and pttl != -2:  # -2: gone between the two commands
            # Counted from before the GET was sent: the kept value expires early, never late.
            deadline = None if pttl < 0 else sent + pttl / 1000
            self._values.complete(key, ticket, value, deadline)
        return value

    def cached(self, key: str) -> bytes | None:
        """The value of ``key`` from the near cache, while Redis's invalidations are known to
        reach this process and it has not expired; None when it is not known that way.
        Never blocks and never does I/O (:class:`~sse_cache.protocols.NearCachingBackend`)."""
        if self._op.closed:
            return None
        listener = self._listener
        if listener is None or not listener.running_here():
            # (Its task is checked, not only the state it set: a task that ran on a loop
            # which ended without cancelling it, or in the parent of a forked child, never
            # reported that it stopped hearing Redis.)
            return None
        value = self._values.get(key, time.monotonic())
        if value is not None and self._toucher is not None:
            self._toucher.note(key)  # (a use Redis's eviction must see: _redis_touch)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """``SET`` ``value`` under ``key``, with ``PX`` when ``ttl`` is given (a
        non-positive ``ttl`` deletes the key: it would be expired already)."""
        check_key(key)
        value = to_bytes(value)
        if expires_at(0.0, ttl) is None:
            ttl = None  # (math.inf too)
        # Dropped from the near cache before the write is sent and again once it is done
        # (whatever its outcome: a timed-out SET may have been applied), so that no reply
        # of a GET that overlapped it is kept (_redis_near); Redis's own invalidation
        # follows.
        self._values.invalidate(key)
        try:
            async with self._op("SET"):
                name = self._data_prefix + key
                if ttl is None:
                    await self._client.set(name, value)
                elif ttl <= 0:
                    await self._client.delete(name)
                else:
                    await self._client.set(name, value, px=milliseconds(ttl))
        finally:
            self._values.invalidate(key)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        check_key(key)
        self._values.invalidate(key)
        try:
            async with self._op("DEL"):
                await self._client.delete(self._data_prefix + key)
        finally:
            self._values.invalidate(key)

    async def aclose(self) -> None:
        """Close the connection pool; later operations raise BackendUnavailable."""
        if self._op.closed:
            return
        self._op.close()
        if self._dropped is not None:
            self._dropped.detach()  # (closed here)
        if self._listener is not None:
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()
        if self._toucher is not None:
            with anyio.CancelScope(shield=True):
                await self._toucher.aclose()
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout * 4):
                await self._client.aclose()
        except Exception:  # closing a pool whose server is gone must not fail the caller
            pass

    # -- capabilities ---------------------------------------------------------------------

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Every key starting with ``prefix`` (``SCAN MATCH``, one bounded call per page;
        on a cluster, each primary in turn). Keys written during the scan may be missed."""
        check_key(prefix, "prefix")
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
        self._values.flush()
        try:
            async for page in self._scan_pages(match):
                if page:
                    async with self._op("UNLINK"):
                        count += int(await self._client.unlink(*page))
        finally:
            self._values.flush()
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
                # A key of another type (not ours: `ls` shows it as corrupt) is an error
                # in its place, not the end of the count.
                lengths = await pipe.execute(raise_on_error=False)
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
        px = _lock_milliseconds(name, token, ttl)
        async with self._op("SET NX"):
            taken = await self._client.set(self._lock_prefix + name, token, nx=True, px=px)
        return bool(taken)

    async def release(self, name: str, token: str) -> None:
        """Release ``name`` if ``token`` still holds it (atomic compare-and-delete in Lua)."""
        check_key(name, "lock name")
        check_key(token, "lock token")
        async with self._op("EVAL"):
            await self._client.eval(_RELEASE, 1, self._lock_prefix + name, token)

    async def renew(self, name: str, token: str, ttl: float) -> bool:
        """Extend ``name`` to ``ttl`` seconds from now if ``token`` still holds it (atomic
        compare-and-``PEXPIRE`` in Lua)."""
        px = _lock_milliseconds(name, token, ttl)
        async with self._op("EVAL"):
            renewed = await self._client.eval(_RENEW, 1, self._lock_prefix + name, token, px)
        return bool(renewed)

    async def holder(self, name: str) -> str | None:
        """The token holding lock ``name``, or None."""
        check_key(name, "lock name")
        async with self._op("GET"):
            raw = await self._client.get(self._lock_prefix + name)
        if raw is None:
            return None
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        """Append ``data`` to the stream ``{prefix}s:{channel}`` (``XADD MAXLEN ~``, in a
        script that also sets the stream's expiry to ``ttl`` seconds).

        A retried append is applied once: one Redis does not answer in time (a stall, a
        failover's pause) is sent again until ``ttl`` seconds passed (bound it further
        yourself). A stream holds about 100 000 messages at most:
        beyond that the oldest are trimmed, and readers that still needed them raise
        :class:`BackendError`."""
        await self._fanout.publish(channel, data, ttl=ttl)

    async def finish(self, channel: str, *, ttl: float) -> None:
        """Append the end marker to ``channel`` and keep the stream ``ttl`` more seconds
        (late readers replay it, then stop)."""
        await self._fanout.finish(channel, ttl=ttl)

    def read(self, channel: str, *, start: str = "0", block: float = 5.0) -> AsyncIterator[bytes]:
        """Every message of ``channel`` published after stream ID ``start`` (``"0"``: all of
        them; ``"$"``: only those published from now on), in order, then the new ones as
        they are published, until the end marker.

        Raises :class:`BackendTimeout` when no message arrives for ``block`` seconds (the
        producer died or stalled; a stream that does not exist yet counts as silent),
        :class:`BackendError` when messages this reader needs were lost (trimmed or expired),
        and the usual :class:`BackendError` family when Redis fails.

        Waiting holds one pooled connection per reader, in slices of half the operation
        timeout (``XREAD BLOCK``), so a dead server (refusing connections) is noticed within
        about ``timeout``; one that does not answer in time (stalled, paused for a failover)
        counts as silence, read again until ``block`` seconds passed with nothing."""
        return self._fanout.read(channel, start=start, block=block)


def _forget_cluster_connections(client: object) -> bool:
    """In a forked child, drop (:func:`~._fork.keep`) every connection of a cluster client's
    nodes, which the parent holds too: each node connects anew on first use. Before, every
    call in the child failed on them (their streams belong to the parent's event loop), and
    a child that shared the parent's loop would have read its siblings' replies. The
    client's asyncio locks are made anew (bound to the parent's loop if they ever had to wait
    there). False, with nothing changed, when the client is not laid out as redis-py 5.0 to
    8.x lay it out."""
    nodes = getattr(client, "nodes_manager", None)
    every = {
        id(node): node
        for table in ("nodes_cache", "startup_nodes")
        for node in getattr(nodes, table, {}).values()
    }
    # ClusterNode: its connections, and the idle ones among them.
    pools = [(getattr(n, "_connections", None), getattr(n, "_free", None)) for n in every.values()]
    if not every or any(not isinstance(held, list) or idle is None for held, idle in pools):
        return False
    for held, idle in pools:
        assert held is not None and idle is not None  # (checked above)
        keep((list(held), list(idle)))
        held.clear()
        idle.clear()
    for owner, name in ((client, "_usage_lock"), (client, "_lock"), (nodes, "_initialize_lock")):
        if isinstance(getattr(owner, name, None), asyncio.Lock):
            setattr(owner, name, asyncio.Lock())
    return True


def _lock_milliseconds(name: str, token: str, ttl: float) -> int:
    """The ``PX`` of a lock taken or renewed for ``ttl`` seconds (``inf``, ``1e300``: the
    longest Redis counts), after checking the lock's arguments."""
    check_key(name, "lock name")
    check_key(token, "lock token")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ConfigError(f"lock ttl must be a number of seconds > 0, got {ttl!r}")
    return milliseconds(ttl)


def from_url(url: str, **options: Any) -> RedisBackend:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS),
    ``unix:///path/to/redis.sock[?db=N]``, ``redis+cluster://host:port[,host:port...]`` and
    ``rediss+cluster://`` -> :class:`RedisBackend`.

    Query options: ``prefix`` (key prefix, ``sse-cache:``), ``timeout`` (seconds per
    operation, 0.5), ``connect_timeout`` (defaults to ``timeout``), ``max_connections``
    (pool size, 64), ``db`` (standalone), ``health_check_interval``, ``client_name``,
    ``near_cache`` (memory for hot values answered without a round trip while Redis reports
    changes, ``32MiB``; ``0`` turns it off; standalone servers only), and for TLS
    ``ssl_cert_reqs`` (``required``/``optional``/``none``), ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``.
    """
    scheme = url.split("://", 1)[0].lower()
    split_url(url, scheme)  # (an unreadable URL is a ConfigError before its options are read)
    opts = Options(url, options)
    prefix = opts.take_str("prefix", _DEFAULT_PREFIX)
    timeout = opts.take_timeout("timeout", _DEFAULT_TIMEOUT)
    near_cache_given = "near_cache" in opts
    # ``0`` or ``none``: off, as on SQLite.
    near_cache = opts.take_size("near_cache", _DEFAULT_NEAR_CACHE, minimum=0) or 0
    if scheme.endswith("+cluster"):
        if near_cache_given and near_cache:  # asked for: say it cannot be had, not ignore it
            raise ConfigError(
                f"{scheme}:// option 'near_cache': the near cache works with a standalone "
                "Redis only (each node of a cluster would need a tracking connection of its "
                "own); leave it out or set it to 0"
            )
        near_cache = 0
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": opts.take_timeout("connect_timeout", timeout),
        "max_connections": opts.take_int("max_connections", 64),
        # One immediate retry: after a server restart the pooled connections are dead, and
        # the retry on a fresh connection lets the same backend object recover at once. Not
        # after a timeout: a server that hangs would cost each operation twice its timeout
        # (helper-81: a miss took 2 s on a stopped Redis with the default 0.5 s).
        "retry": Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
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
            client = cluster_client(url, scheme, kwargs)
        elif scheme in ("redis", "rediss", "unix"):
            client = standalone_client(url, scheme, kwargs)
        else:
            raise ConfigError(f"the Redis backend does not handle {scheme}:// URLs")
    except (ValueError, rexc.RedisError, rexc.RedisClusterException) as exc:
        if isinstance(exc, ConfigError):
            raise
        # Never the URL as given: its password would be in the message (sse-cache ls prints it).
        raise ConfigError(f"bad Redis URL {redact_userinfo(url)!r}: {exc}") from exc
    return RedisBackend(
        client,
        prefix=prefix,
        timeout=timeout,
        near_cache_bytes=near_cache,
    )


def _abandon(listener: InvalidationListener, toucher: Toucher, client: aioredis.Redis) -> None:
    # A backend collected unclosed: its background tasks stop and its pool closes, on the
    # loop they ran on (from whichever thread collected it). Where they never ran, its
    # pool's connections (opened on some loop) go as the loop ends them.
    loop = toucher.loop()
    listener.abandon()
    toucher.abandon()
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(_close_pool, client)


def _close_pool(client: aioredis.Redis) -> None:
    task = asyncio.get_running_loop().create_task(client.aclose())
    _CLOSING.add(task)  # (the loop holds its tasks weakly)
    task.add_done_callback(_CLOSING.discard)


_CLOSING: set[asyncio.Task[None]] = set()

"""memcached backend on pymemcache, one server or a pool, with values chunked past the item limit.

pymemcache is a blocking client: calls run in anyio worker threads (at most ``max_pool_size``
at once, each with its own pooled connection), so the backend works under asyncio and trio.
That bound is held by a semaphore on the thread side: pymemcache's pool raises rather than
waits when it is exceeded, and anyio's ``CapacityLimiter`` on asyncio can admit one borrower
too many before anyio 4.14 (anyio#1170), so the limiter alone is not enough.

How values are laid out in items (one item, or chunks named by a manifest) is in
:mod:`~sse_cache.backends._memcached_layout`. How a chunked value is written:

- one server: the chunks and then the manifest go out as one pipelined batch on one
  connection, and the replies are read after it: one round trip
  (:mod:`~sse_cache.backends._memcached_batch`). memcached runs one connection's commands in
  order, so when the manifest is stored every chunk before it has been stored or refused: a
  reader sees the previous value until then, the new one after, never a part. If memcached
  refuses a chunk (larger than its item limit, out of memory) it still stores the manifest:
  the backend deletes it and the write fails, so the key reads as a miss, not as the previous
  value (a reader that finds the manifest before the delete finds a chunk missing: a miss
  too; the delete may also remove a value another client stored in between: a miss as well).
  A batch cut before its manifest arrived whole (connection lost, timeout while sending)
  leaves the previous value. A write that fails *after* its manifest was sent (a timeout
  waiting for the replies: the server was paused, say) may still be applied when the server
  goes on, as a plain ``set`` that timed out may: the caller saw an error, readers later see
  the new value, whole.
- a pool: chunks and manifest land on different servers, and nothing orders commands sent
  to different servers, so the manifest is written only after every chunk was acknowledged
  (two round trips); a failed write leaves the previous value.

On one server every write, chunked or not, goes through that batch, which hands the value's
own buffer to ``socket.sendmsg`` instead of letting pymemcache copy it three times.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from pymemcache.client.base import PooledClient  # type: ignore[import-untyped]
from pymemcache.client.hash import HashClient  # type: ignore[import-untyped]
from pymemcache.exceptions import (  # type: ignore[import-untyped]
    MemcacheError,
    MemcacheUnexpectedCloseError,
)

from ..errors import (
    BackendError,
    BackendFull,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    ValueTooLarge,
)
from ._call_queue import DEFAULT_QUEUE_TIMEOUT, CallQueue
from ._common import Options, check_open, expires_at, parse_hosts, to_bytes
from ._fork import keep, reopen_after_fork
from ._memcached_batch import store_batch
from ._memcached_layout import (
    MANIFEST,
    MAX_CHUNKS,
    MIN_CHUNK_SIZE,
    RAW,
    TIMED,
    Manifest,
    WriteHints,
    chunk_keys,
    flags_for,
    is_expired,
    item_key,
    kind,
    server_expiry,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "MemcachedBackend", "from_url", "map_exceptions"]

T = TypeVar("T")

#: memcached's default item limit is 1 MiB including the item header and key, so a chunk
#: stays 1 KiB under it.
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024 - 1024
_MAX_ITEM_SIZE: Final = 1024 * 1024 * 1024  # memcached's own bound on -I
_DEFAULT_PREFIX: Final = "sse-cache:"
_DEFAULT_TIMEOUT: Final = 0.5
_HINTS: Final = 4096  # chunked keys remembered per backend (a few dozen bytes each)
#: The most connections per server (and worker threads) ``max_pool_size`` may ask for:
#: memcached's own default connection limit (-c 1024).
MAX_POOL_SIZE: Final = 1024


class _BytesSerde:
    """Store bytes unchanged and hand back ``(bytes, flags)``: flags tell our layouts apart."""

    def serialize(self, key: bytes, value: bytes) -> tuple[bytes, int]:
        return value, RAW

    def deserialize(self, key: bytes, value: bytes, flags: int) -> tuple[bytes, int]:
        return value, flags


# What to change when a server refuses an item over its item size limit.
_TOO_LARGE_HINT = (
    ": the item is over the server's item size limit (memcached -I); lower ?chunk_size= "
    "below it, or raise -I"
)


@contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Translate pymemcache / socket exceptions into the BackendError family (the one edge
    where they are translated)."""
    try:
        yield
    except BackendError:
        raise
    except TimeoutError as exc:  # socket.timeout is TimeoutError
        raise BackendTimeout(f"{what}: memcached did not answer in time ({exc!r})") from exc
    except (MemcacheUnexpectedCloseError, ConnectionError, OSError) as exc:
        raise BackendUnavailable(f"{what}: memcached is unreachable ({exc!r})") from exc
    except MemcacheError as exc:
        if "down" in str(exc):  # HashClient: "All servers seem to be down right now"
            raise BackendUnavailable(f"{what}: {exc}") from exc
        if "too large" in str(exc):  # a pool's server refused an item over its -I
            raise ValueTooLarge(f"{what}: memcached error ({exc}){_TOO_LARGE_HINT}") from exc
        raise BackendError(f"{what}: memcached error ({exc})") from exc
    except Exception as exc:
        # pymemcache's pool bookkeeping is not built for threads; whatever escapes it is a
        # storage fault, never a reason to fail a stream.
        raise BackendError(f"{what}: memcached client error ({exc!r})") from exc


#: What a pooled connection to a server that restarted meets (its socket was closed under it).
_STALE_CONNECTION = (
    MemcacheUnexpectedCloseError,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


class MemcachedBackend:
    """Entries in memcached: one server, or several with keys spread by rendezvous hashing
    (pymemcache ``HashClient``).

    Guarantees:

    - *Atomicity*: a value up to ``chunk_size`` bytes is one item, written by one ``set``.
      A larger value is split into chunks keyed by a random write id, with a manifest
      stored after them (one pipelined round trip on one server, two on a pool) and every
      chunk's length checked on read (see the module docstring): ``get`` returns the
      complete value of one ``set`` or None, never a mix of two writes or a partial value.
      A write that fails before its manifest was sent leaves the previous value. On one
      server, a write that timed out after sending it may still be applied (as any timed-out
      ``set`` may), and one where memcached refused a chunk reads as a miss.
    - *TTL*: exact to the client's clock (the expiry time is stored with the value and
      checked on read); memcached itself drops the items a second or two later.
    - *Size*: any value size; memcached may evict any item at any time (it is a cache), and
      a value whose chunk was evicted reads as a miss. Chunks of overwritten values are not
      deleted (a concurrent reader may still need them): they age out through TTL or LRU.
    - *Faults*: socket operations are bounded by ``timeout`` seconds; an unreachable server
      raises :class:`BackendUnavailable` and a hung one :class:`BackendTimeout`. A restarted
      server is reconnected to by the same object, at once: a call that meets a pooled
      connection closed under it is made again on another (a fresh one at the latest). With
      several servers, a failed server is taken out of the ring for ``dead_timeout`` seconds
      and its keys go to the others (misses, then re-filled); values written meanwhile may
      reappear stale when it comes back, as with any memcached pool.
    - *Namespace*: keys are ``{prefix}e:{key}`` (memcached keys longer than 250 bytes or with
      spaces, control or non-ASCII characters are hashed: ``{prefix}h:{blake2b}``).

    Works under asyncio and trio. memcached cannot list its keys: this backend has no
    ``scan``/``clear``. Capability: :class:`~sse_cache.protocols.StatsBackend` (server-wide).
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        prefix: str = _DEFAULT_PREFIX,
        timeout: float = _DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_pool_size: int = 8,
        dead_timeout: float = 10.0,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        if not servers:
            raise ConfigError("memcached: at least one server is needed")
        if len(prefix) > 100 or any(not 0x21 <= ord(c) <= 0x7E for c in prefix):
            raise ConfigError(
                f"memcached prefix must be at most 100 printable ASCII characters without "
                f"spaces, got {prefix!r}"
            )
        if (
            isinstance(max_pool_size, bool)
            or not isinstance(max_pool_size, int)
            or not 1 <= max_pool_size <= MAX_POOL_SIZE
        ):
            raise ConfigError(
                f"memcached max_pool_size must be an integer from 1 to {MAX_POOL_SIZE}, "
                f"got {max_pool_size!r}"
            )
        if not MIN_CHUNK_SIZE <= chunk_size <= _MAX_ITEM_SIZE:
            raise ConfigError(
                f"memcached chunk_size must be from {MIN_CHUNK_SIZE} bytes to memcached's "
                f"largest item ({_MAX_ITEM_SIZE} bytes, -I 1024m), got {chunk_size}"
            )
        self.servers = list(servers)
        self.prefix = prefix
        self._chunk_size = chunk_size
        self._one_server = len(self.servers) == 1
        common: dict[str, Any] = {
            "serde": _BytesSerde(),
            "connect_timeout": connect_timeout if connect_timeout is not None else timeout,
            "timeout": timeout,
            "no_delay": True,
            "default_noreply": False,  # we must know that chunks landed before the manifest
            "max_pool_size": max_pool_size,
        }
        self._connection_options = common
        self._dead_timeout = dead_timeout
        self._queue_timeout = queue_timeout
        self._client: Any
        self._queue: CallQueue
        self._slots: threading.BoundedSemaphore
        self._connect()
        # The longest a healthy call takes: a connection, then two round trips (a chunked
        # value: its manifest, then its chunks), each within the socket timeout.
        self._call_bound = common["connect_timeout"] + 2 * timeout
        reopen_after_fork(self)
        # Chunked values this process read or wrote lately: key -> (write id, chunk count).
        self._hints = WriteHints(_HINTS)
        self._closed = False

    def _connect(self) -> None:
        """The pooled clients, and what bounds the calls into them."""
        common = self._connection_options
        max_pool_size = common["max_pool_size"]
        if self._one_server:
            self._client = PooledClient(self.servers[0], **common)
        else:
            # retry_attempts=0: a failing server leaves the ring at once (its keys go to the
            # others) and is tried again after dead_timeout.
            self._client = HashClient(
                self.servers,
                use_pooling=True,
                retry_attempts=0,
                dead_timeout=self._dead_timeout,
                ignore_exc=False,
                **common,
            )
        # The queue keeps waiting calls on the event loop, and gives up a wait longer than
        # queue_timeout as busy (_call_queue); the semaphore is what bounds the threads
        # inside pymemcache to its pool size (see the module docstring).
        self._queue = CallQueue(
            max_pool_size,
            self._queue_timeout,
            resource=f"one of the {max_pool_size} pooled memcached connections",
            advice="raise ?max_pool_size= or ?queue_timeout=, under the engine's backend_timeout",
            stuck="memcached is not answering",
        )
        self._slots = threading.BoundedSemaphore(max_pool_size)

    def _forked(self) -> None:
        # A child of a fork: the pooled sockets are the parent's (both processes' requests
        # and replies would share them), and calls in flight at the fork held slots for
        # the parent's threads (_fork).
        keep(self._client)
        self._connect()

    def __repr__(self) -> str:
        servers = ",".join(f"{h}:{p}" for h, p in self.servers)
        return f"MemcachedBackend({servers}, prefix={self.prefix!r})"

    async def _run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        check_open(self._closed, "MemcachedBackend")
        # A restarted server leaves every pooled connection dead: each fails once, at once,
        # and pymemcache drops it. Tried again until one works (a fresh connection at the
        # latest), as Redis's client does, rather than fail that many calls — five open the
        # breaker, and each probe after its cooldown met another dead one (helper-68: the
        # cache came back 12 to 34 s after memcached did). Every operation here may be run
        # again: a get reads, a set writes the same value (under a new write id when
        # chunked), a delete deletes. A hung server times out, and is not tried again.
        attempts = self._connection_options["max_pool_size"] + 1

        def call() -> T:
            with self._slots, map_exceptions(what):
                for _ in range(attempts - 1):
                    try:
                        return func(*args)
                    except _STALE_CONNECTION:
                        continue
                return func(*args)

        return await self._queue.run(call, bound=self._call_bound, what=what)

    # -- the Backend protocol -------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key`` (reassembled and verified when chunked), or None
        when missing, expired, or when a chunk is missing or does not match."""
        return await self._run("get", self._get, self._item_key(key))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds; chunks, then their manifest for large values.
        Raises BackendError when memcached refuses an item."""
        value = to_bytes(value)
        now = time.time()
        deadline = expires_at(now, ttl)
        await self._run("set", self._set, self._item_key(key), value, now, deadline)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (and the chunks its manifest names); missing is not an error."""
        await self._run("delete", self._delete, self._item_key(key))

    async def aclose(self) -> None:
        """Close every pooled connection; later operations raise BackendUnavailable."""
        if self._closed:
            return
        self._closed = True
        # Closing the sockets of a dead server must not fail the caller.
        with suppress(Exception):
            await self._queue.run_last(self._client.close)

    # -- capabilities ---------------------------------------------------------------------

    async def stats(self) -> dict[str, int]:
        """Server-wide figures summed over the servers: ``entries`` (memcached items, chunks
        and other applications' items included), ``bytes``, ``limit_maxbytes``,
        ``servers``."""
        return await self._run("stats", self._stats)

    # -- thread side ----------------------------------------------------------------------

    def _item_key(self, key: str) -> str:
        return item_key(self.prefix, key)

    def _chunk_keys(self, item_key: str, write_id: bytes, count: int) -> list[str]:
        return chunk_keys(self.prefix, item_key, write_id, count)

    def _get(self, item_key: str) -> bytes | None:
        hint = self._hints.get(item_key)
        if hint is None:
            found = self._client.get(item_key)
            fetched: dict[str, Any] = {}
        else:
            # Chunked, the last time this process looked: ask for the manifest and the chunks
            # it named then in one round trip. They are used only if the manifest still names
            # them (a write id is never reused); otherwise the right chunks are fetched.
            fetched = self._client.get_many([item_key, *self._chunk_keys(item_key, *hint)])
            found = fetched.get(item_key)
        if found is None:
            self._hints.discard(item_key)
            return None
        data, flags = found
        if flags == MANIFEST:
            return self._get_chunked(item_key, data, hint, fetched)
        self._hints.discard(item_key)
        if flags == RAW:
            return bytes(data)
        if kind(flags) == TIMED:
            return None if is_expired(flags, time.time()) else bytes(data)
        return None  # not written by this backend: a miss, never someone else's bytes

    def _get_chunked(
        self,
        item_key: str,
        data: bytes,
        hint: tuple[bytes, int] | None,
        fetched: dict[str, Any],
    ) -> bytes | None:
        manifest = Manifest.parse(data)
        if manifest is None:
            return None
        if manifest.deadline is not None and manifest.deadline <= time.time():
            return None
        if not manifest.is_consistent():
            return None
        write_id, count, size = manifest.write_id, manifest.chunk_count, manifest.chunk_size
        keys = self._chunk_keys(item_key, write_id, count)
        # The chunks fetched with the manifest are this write's only if it names them.
        found = fetched if hint == (write_id, count) else self._client.get_many(keys)
        self._hints.put(item_key, (write_id, count))
        parts: list[bytes] = []
        for key in keys:
            chunk = found.get(key)
            if chunk is None or chunk[1] != RAW:
                return None  # evicted (or never arrived): a miss, not a partial value
            if len(chunk[0]) != size and len(parts) < count - 1:
                return None
            parts.append(chunk[0])
        value = b"".join(parts)
        if len(value) != manifest.total:
            return None
        return value

    def _set(self, item_key: str, value: bytes, now: float, deadline: float | None) -> None:
        # The chunks of what this key held are not this write's: the next read must not
        # fetch them along with the manifest (a chunked write remembers its own at the end).
        self._hints.discard(item_key)
        if deadline is not None and deadline <= now:
            self._client.delete(item_key, noreply=False)  # non-positive TTL: expired already
            return
        expire = server_expiry(now, deadline)
        if len(value) <= self._chunk_size:
            flags = flags_for(now, deadline)
            if self._one_server:
                refused = self._store_batch([(item_key, flags, value)], expire)
                if refused is not None:
                    raise self._refused(item_key, len(value), refused)
            elif not self._client.set(item_key, value, expire=expire, flags=flags):
                raise BackendError(f"memcached did not store {item_key!r}")
            return
        write_id = secrets.token_bytes(16)
        size = self._chunk_size
        count = -(-len(value) // size)
        if count > MAX_CHUNKS:
            raise ValueTooLarge(
                f"a value of {len(value)} bytes would take {count} chunks of chunk_size={size}, "
                f"over the {MAX_CHUNKS} a value may take: raise ?chunk_size="
            )
        keys = self._chunk_keys(item_key, write_id, count)
        view = memoryview(value)
        chunks = [(k, RAW, view[i * size : (i + 1) * size]) for i, k in enumerate(keys)]
        manifest = Manifest(deadline, len(value), size, count, write_id).pack()
        if self._one_server:
            # One round trip: memcached runs a connection's commands in order, so the
            # manifest (last) is stored only after every chunk was.
            refused = self._store_batch([*chunks, (item_key, MANIFEST, manifest)], expire)
            if refused is not None:
                # A refused chunk does not stop the manifest: remove it, so that readers
                # miss at once instead of fetching chunks that are not there.
                self._client.delete(item_key, noreply=False)
                raise self._refused(item_key, size, refused)
        else:
            # Chunks and manifest live on different servers, written one after another:
            # the manifest waits for every chunk's reply. Until it lands, readers see the
            # previous value.
            values = {k: bytes(chunk) for k, _, chunk in chunks}
            failed = self._client.set_many(values, expire=expire, flags=RAW)
            if failed:
                raise BackendError(
                    f"memcached did not store {len(failed)} chunk(s) of {item_key!r}"
                )
            if not self._client.set(item_key, manifest, expire=expire, flags=MANIFEST):
                raise BackendError(f"memcached did not store {item_key!r}")
        self._hints.put(item_key, (write_id, count))

    def _store_batch(
        self, items: Sequence[tuple[str, int, bytes | memoryview]], expire: int
    ) -> bytes | None:
        # One server only: the whole batch on one of its pooled connections.
        return store_batch(self._client, items, expire)

    def _refused(self, item_key: str, item_bytes: int, reply: bytes) -> BackendError:
        """The error for a ``set`` memcached answered with ``reply``, saying what to change
        when the item was too large for the server's ``-I`` (item size limit)."""
        said = reply.decode("ascii", "replace").strip()
        hint = ""
        if "too large" in said:
            hint = (
                f": items of {item_bytes} bytes are over the server's item size limit "
                f"(memcached -I); lower ?chunk_size= (now {self._chunk_size}) below it, or "
                "raise -I"
            )
        if "out of memory" in said:
            # Out of memory with -M (no eviction): memcached answered, and still reads.
            return BackendFull(
                f"memcached did not store {item_key!r} ({said}): it is full and evicts "
                "nothing (-M); raise -m, or run it without -M"
            )
        error = ValueTooLarge if hint else BackendError
        return error(f"memcached did not store {item_key!r} ({said}){hint}")

    def _delete(self, item_key: str) -> None:
        self._hints.discard(item_key)
        found = self._client.get(item_key)
        self._client.delete(item_key, noreply=False)
        if found is not None and found[1] == MANIFEST:
            manifest = Manifest.parse(found[0])
            # (Only a manifest this backend could have written names chunks to delete.)
            if manifest is not None and manifest.is_consistent():
                keys = self._chunk_keys(item_key, manifest.write_id, manifest.chunk_count)
                self._client.delete_many(keys, noreply=False)

    def _stats(self) -> dict[str, int]:
        clients = (
            list(self._client.clients.values())
            if isinstance(self._client, HashClient)
            else [self._client]
        )
        out = {"entries": 0, "bytes": 0, "limit_maxbytes": 0, "servers": len(self.servers)}
        for client in clients:
            raw = client.stats()
            for ours, theirs in (
                ("entries", b"curr_items"),
                ("bytes", b"bytes"),
                ("limit_maxbytes", b"limit_maxbytes"),
            ):
                out[ours] += int(raw.get(theirs, 0))
        return out


def from_url(url: str, **options: Any) -> MemcachedBackend:
    """``memcached://host[:port][,host[:port]...]`` -> :class:`MemcachedBackend`.

    Query options: ``prefix`` (``sse-cache:``), ``timeout`` (seconds per socket operation,
    0.5), ``connect_timeout`` (defaults to ``timeout``), ``chunk_size`` (bytes per item,
    ``1023KiB`` by default; lower it for servers started with a smaller ``-I``),
    ``max_pool_size`` (connections per server and worker threads, 8, at most 1024),
    ``dead_timeout``
    (seconds a failed pool member stays out, 10), ``queue_timeout`` (seconds a call may wait
    for a pooled connection before it is given up as busy, 1).
    """
    scheme = url.split("://", 1)[0].lower()
    netloc = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    if "@" in netloc:
        # pymemcache speaks the text protocol, which has no authentication: credentials
        # would be dropped without a word, and the server used without them.
        raise ConfigError(
            f"{scheme}:// URL: memcached has no authentication (the text protocol), but the "
            "URL names a user or password: leave them out"
        )
    servers = parse_hosts(scheme, netloc, 11211)
    path = urlsplit(url).path
    if path not in ("", "/"):
        # Not a database number, as with redis://: memcached has one keyspace.
        raise ConfigError(f"{scheme}:// URL: memcached has no databases, got the path {path!r}")
    opts = Options(url, options)
    prefix = opts.take_str("prefix", _DEFAULT_PREFIX)
    timeout = opts.take_timeout("timeout", _DEFAULT_TIMEOUT)
    connect_timeout = opts.take_timeout("connect_timeout", timeout)
    chunk_size = opts.take_size("chunk_size", DEFAULT_CHUNK_SIZE, minimum=MIN_CHUNK_SIZE)
    max_pool_size = opts.take_int("max_pool_size", 8, maximum=MAX_POOL_SIZE)
    dead_timeout = opts.take_timeout("dead_timeout", 10.0)
    queue_timeout = opts.take_timeout("queue_timeout", DEFAULT_QUEUE_TIMEOUT)
    opts.finish()
    if chunk_size is None:
        raise ConfigError("memcached:// option 'chunk_size': expected a size, got 'none'")
    return MemcachedBackend(
        servers,
        prefix=prefix,
        timeout=timeout,
        connect_timeout=connect_timeout,
        chunk_size=chunk_size,
        max_pool_size=max_pool_size,
        dead_timeout=dead_timeout,
        queue_timeout=queue_timeout,
    )

"""SQLite backend: one file, shared safely by threads and processes, via the stdlib ``sqlite3``.

``sqlite3`` is blocking, so every call runs in an anyio worker thread, one at a time per backend:
a queue on the event loop orders the calls and bounds each one's wait for its turn
(:class:`~sse_cache.backends._call_queue.CallQueue`), and a lock on the thread side
guards the single connection (anyio's limiter on asyncio can admit a second borrower before
anyio 4.14, anyio#1170, and two threads in one connection would mix their transactions).
That keeps it usable from asyncio and trio alike, which an asyncio-only wrapper such as
aiosqlite would not be.

Hot values are also kept in a near cache (:class:`~sse_cache.backends._near.NearCache`) and
served on the caller's thread without that hop while SQLite's ``PRAGMA data_version``, read on
a second connection that never waits for a lock, says that no connection has committed since.
Lookups of one key that do go to the worker thread together share one read of its row
(:class:`~sse_cache.backends._sqlite_reads.SharedReads`).
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

from .._logging import redact_userinfo
from ..errors import BackendUnavailable, ConfigError
from ._call_queue import DEFAULT_QUEUE_TIMEOUT, CallQueue
from ._common import Options, check_key, check_open, expires_at, to_bytes
from ._near import NearCache
from ._sqlite_file import DatabaseFile
from ._sqlite_probe import VersionProbe
from ._sqlite_reads import SharedReads
from ._sqlite_store import EntryTable

__all__ = ["SQLiteBackend", "from_url"]

T = TypeVar("T")

# Seconds a write may wait for the lock: under the engine's default backend_timeout (2 s),
# which cannot interrupt a call already running in a worker thread.
_WRITE_TIMEOUT: Final = 1.5
_DEFAULT_MAX_BYTES: Final = 1024**3
_DEFAULT_NEAR_CACHE: Final = 32 * 1024 * 1024
# Seconds between checks that the path still names the file this backend has open.
_CHECK_INTERVAL: Final = 1.0


class SQLiteBackend:
    """Entries in one SQLite file that several threads and processes may share.

    Guarantees:

    - *Atomicity*: every ``set``/``delete`` is one transaction, so a reader (in any process)
      sees the old or the new value, never a mix. Writers from several processes queue on
      SQLite's lock (WAL mode, ``timeout`` seconds of busy waiting, then retries) and no
      write is lost while the lock can be had within ``timeout``.
    - *TTL*: the expiry time is stored with the value (wall clock, as processes share it);
      ``get`` treats an expired row as missing, and expired rows are deleted at most every
      ``purge_interval`` seconds by the next ``set``.
    - *Size budget*: values never total more than ``max_bytes`` after a ``set`` returns:
      expired rows go first, then the least recently used. Use is approximate: a ``get``
      records its access time in memory and the next ``set`` of this backend writes it, so
      reads stay read-only (and fast) in SQLite. A single value larger than ``max_bytes`` is
      not stored; ``set`` removes the old value and raises :class:`~sse_cache.errors.ValueTooLarge`.
    - *Opening*: the file is opened on first use and created (an empty cache) if missing,
      unless ``create`` is False: then a missing file raises :class:`BackendUnavailable`
      naming the path, and an existing file that is not an sse_cache database is left
      untouched (:class:`BackendError`). With ``readonly`` (implies not ``create``) the file
      is opened read-only: nothing in it changes, not its journal mode, nor the access times
      (the LRU order: reads are not recorded), and a file this process may not write is
      read (with no ``-wal`` beside it, and a directory it cannot write, as an immutable
      file); ``set``, ``delete`` and ``clear`` raise :class:`BackendError` — what a command
      that only reads a cache wants (``sse-cache ls``, ``show``, ``stats``).
    - *Faults*: a missing directory, a corrupt or foreign file
      or a lock held too long (``read_timeout`` for reads, ``timeout`` for writes) raise
      :class:`BackendError` subclasses (the engine turns them into misses); after a corrupt or
      unreadable file the connection is reopened on the next call, so replacing the file
      recovers without a restart. A path that is not a regular file (a FIFO, a directory)
      raises :class:`BackendUnavailable` at once, saying what it is. A row of other types (a
      text value, UTF-8 or not: a bit flipped on disk) raises
      :class:`~sse_cache.errors.CorruptEntry` (the engine deletes it); a key that is not
      UTF-8 is listed by ``scan`` with its bytes as lone surrogates, and evicted like any row.
    - *Queue*: calls run one at a time, in arrival order; a call that waited
      ``queue_timeout`` seconds for its turn (at most half the time left before the caller's
      deadline) raises :class:`BackendBusy` (more calls at once than the connection serves:
      the breaker does not count it), or :class:`BackendTimeout` when the call holding the
      connection has run more than four times the longer of ``timeout`` and ``read_timeout``
      (twice what a healthy call may take: a disk that does not answer; the breaker counts
      it).
    - *A file deleted, replaced or moved while open*: at most every ``check_interval``
      seconds, a call compares the identity (device, inode) of the file at the path with the
      one it has open; when they differ it closes the old file and opens the path afresh
      (creating an empty cache if nothing is there), so this backend, other processes and
      the ``sse-cache`` commands share one cache again. The old file's ``-wal`` and ``-shm``
      files, which SQLite would otherwise read as part of the new one, are removed.
    - *Near cache*: up to ``near_cache_bytes`` of recently read values are kept in this
      process and answered without a worker thread (also by :meth:`cached`) while
      ``PRAGMA data_version`` on a second, read-only-in-practice connection is unchanged:
      any commit by any connection or process (a ``set``, a ``delete``, ``sse-cache purge``,
      an eviction) empties it before the next lookup, so a lookup never returns a value that
      a commit made before it replaced or deleted. That version is read on the caller's
      thread with a zero busy timeout: when it cannot be read at once, the lookup goes to
      the worker thread as before. A file replaced at the path is noticed within
      ``check_interval``, as above. Files only (not ``:memory:``); 0 turns it off.
    - *Shared reads*: lookups of one key that go to the worker thread while a read of it is
      queued but not begun share that read (the row it reads is newer than any of them), so
      the hits that arrive after a commit emptied the near cache wait for one read, not one
      each.

    Works under asyncio and trio: the stdlib ``sqlite3`` module runs in anyio worker threads,
    one call at a time per backend.

    Capabilities: :class:`~sse_cache.protocols.ScanningBackend`,
    :class:`~sse_cache.protocols.StatsBackend`, :class:`~sse_cache.protocols.NearCachingBackend`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int | None = _DEFAULT_MAX_BYTES,
        timeout: float = _WRITE_TIMEOUT,
        read_timeout: float = 1.0,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
        purge_interval: float = 60.0,
        synchronous: str = "NORMAL",
        check_interval: float = _CHECK_INTERVAL,
        create: bool = True,
        near_cache_bytes: int = _DEFAULT_NEAR_CACHE,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(f"synchronous must be OFF, NORMAL, FULL or EXTRA: {synchronous!r}")
        if not (math.isfinite(check_interval) and check_interval >= 0):
            raise ConfigError(f"check_interval must be a number >= 0: {check_interval!r}")
        self.path = os.fspath(path)
        if "\0" in self.path:
            # Else every call would fail open (ValueError from the file system) for ever.
            raise ConfigError(f"path {self.path!r} holds a NUL character, which no file name can")
        self._clock = clock
        self._table = EntryTable(max_bytes=max_bytes, purge_interval=purge_interval, clock=clock)
        # The connection and the file it has open: used by worker threads, one at a time.
        self._db = DatabaseFile(
            self.path,
            timeout=timeout,
            read_timeout=read_timeout,
            synchronous=synchronous.upper(),
            check_interval=check_interval,
            create=create,
            on_replaced=self._table.forget_purge,
            readonly=readonly,
        )
        # The longest a healthy call takes: its lock wait, the retries to the same deadline
        # (the last may start just before it), a reopen with the write timeout.
        self._call_bound = 2 * max(timeout, read_timeout)
        self._queue = CallQueue(
            1,
            queue_timeout,
            resource="SQLite's one connection",
            advice="raise ?queue_timeout=, under the engine's backend_timeout, or run more workers",
            stuck="the disk or the file system is not answering",
        )
        self._closed = False
        # The near cache and the probe that reads its version: both used on the caller's
        # (event loop) thread only, never by a worker thread.
        self._near = NearCache(near_cache_bytes, option="near_cache_bytes")
        if not self._db.watch or self._db.readonly:
            # A private database: no second connection can see it. Read-only: what is read
            # once is shown once (and the probe's connection would open the file to write).
            self._near.max_bytes = 0
        self._probe = VersionProbe(self._db, on_close=self._near.clear)
        self._reads: SharedReads[tuple[bytes, float | None] | None] = SharedReads()

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r}, max_bytes={self._table.max_bytes})"

    # -- the Backend protocol -------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when missing or expired."""
        check_open(self._closed, "SQLiteBackend")
        _check_key(key)
        value = self.cached(key)
        if value is not None:
            return value
        # The version is read before the row: a commit in between makes the kept value look
        # older than it is (dropped at the next lookup), never newer.
        version = self._version() if self._near.enabled else None
        # Lookups of this key arriving before the read begins share it (_sqlite_reads).
        row = await self._reads.run(
            key, lambda began: self._call(self._table.read, key, began, read=True)
        )
        if row is None:
            return None
        value, deadline = row
        if version is not None:
            self._near.put(key, value, deadline, version)
        return value

    def cached(self, key: str) -> bytes | None:
        """The value of ``key`` from the near cache when no commit has happened since it was
        read (checked now, without waiting); None when it is not known that way. Never
        blocks on a lock or a worker thread (:class:`~sse_cache.protocols.NearCachingBackend`)."""
        near = self._near
        if self._closed or key not in near:
            return None  # (without reading the version: a key never kept costs nothing)
        version = self._version()
        if version is None or not near.check(version):
            return None
        now = self._clock()
        value = near.get(key, now)
        if value is not None:
            self._table.accessed.note(key, now)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: until evicted), in one
        transaction that also enforces the size budget."""
        check_open(self._closed, "SQLiteBackend")
        _check_key(key)
        value = to_bytes(value)
        expires_at(0.0, ttl)  # validates ttl before any I/O
        self._near.discard(key)  # (the commit empties it anyway, at the next lookup)
        await self._call(self._table.write, key, value, ttl, read=False)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        check_open(self._closed, "SQLiteBackend")
        _check_key(key)
        self._near.discard(key)
        await self._call(self._table.delete, key, read=False)

    async def aclose(self) -> None:
        """Write pending access times (best effort; not when opened ``readonly``) and close
        the connection; later operations raise BackendUnavailable. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        self._probe.close()
        await self._queue.run_last(lambda: self._db.close(self._table.flush))

    # -- capabilities ---------------------------------------------------------------------

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Every live key starting with ``prefix``, in key order, read in pages of 500."""
        check_open(self._closed, "SQLiteBackend")
        check_key(prefix, "prefix")
        after: str | None = None
        while True:
            page = await self._call(self._table.scan_page, prefix, after, read=True)
            for key in page:
                yield key
            if self._table.page_is_last(page):
                return
            after = page[-1]

    async def clear(self) -> int:
        """Delete every entry; return how many there were."""
        check_open(self._closed, "SQLiteBackend")
        self._near.clear()
        return await self._call(self._table.clear, read=False)

    async def stats(self) -> dict[str, int]:
        """``entries`` and ``bytes`` (values, expired-but-not-purged included),
        ``max_bytes`` (0: unbounded) and ``file_bytes`` (database file plus its WAL)."""
        check_open(self._closed, "SQLiteBackend")
        entries, size, file_bytes = await self._call(self._totals, read=True)
        return {
            "entries": entries,
            "bytes": size,
            "max_bytes": self._table.max_bytes or 0,
            "file_bytes": file_bytes,
        }

    def _totals(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        entries, size = self._table.totals(conn)
        return entries, size, self._db.size_on_disk()  # (a stat: on the worker thread too)

    # -- the near cache (caller's thread) and the worker threads --------------------------

    def _version(self) -> tuple[int, int] | None:
        # None once closed, or when the version cannot be read at once (VersionProbe).
        if self._closed:
            return None
        return self._probe.version()

    async def _call(self, func: Callable[..., T], *args: Any, read: bool) -> T:
        def run() -> T:
            if self._closed:  # queued behind aclose()
                raise BackendUnavailable("SQLiteBackend is closed")
            return self._db.run(lambda conn: func(conn, *args), read=read)

        # One at a time, a bounded wait for its turn (_call_queue); not abandoned once it
        # runs: its lock wait is bounded by ``timeout`` / ``read_timeout`` instead.
        what = "SQLite read" if read else "SQLite write"
        return await self._queue.run(run, bound=self._call_bound, what=what)


def _check_key(key: str) -> None:
    # A str (TypeError) that UTF-8 can encode (ValueError: sqlite3 would raise
    # UnicodeEncodeError in the worker thread).
    check_key(key)


def _path_from_url(url: str) -> str:
    # As SQLAlchemy reads them, so that a URL means the same file to both: what follows
    # ``sqlite:///`` is the path, so three slashes and a relative path (``sqlite:///cache.db``
    # is ./cache.db), four slashes and an absolute one (``sqlite:////var/cache/sse.db``).
    parts = urlsplit(url)
    netloc, path = parts.netloc, unquote(parts.path)
    if "\0" in path:
        # No file name can hold one: refused here, not by every call failing open for ever.
        raise ConfigError(
            f"sqlite:// URL {redact_userinfo(url)!r}: the path holds a NUL character (%00), "
            "which no file name can"
        )
    if netloc in (".", "..", "~"):
        return os.path.expanduser(netloc + path)  # sqlite://./x.db, a common slip
    if netloc:
        raise ConfigError(
            f"sqlite:// URL {redact_userinfo(url)!r}: a SQLite URL has no host; "
            "write sqlite:///relative.db "
            "(three slashes: relative to the working directory) or "
            "sqlite:////absolute/path.db (four slashes)"
        )
    path = path[1:]  # the slash that ends sqlite:// and its empty host
    if path.startswith("/"):
        path = "/" + path.lstrip("/")  # absolute: however many slashes
    if path == ":memory:":
        return ":memory:"
    if not path or path == "/":
        raise ConfigError(
            f"sqlite:// URL {redact_userinfo(url)!r} names no file: write sqlite:///relative.db, "
            "sqlite:////absolute/path.db or sqlite:///:memory:"
        )
    return os.path.expanduser(path)


def from_url(url: str, **options: Any) -> SQLiteBackend:
    """``sqlite:///relative.db`` (relative to the working directory), ``sqlite:////abs/path.db``
    or ``sqlite:///:memory:`` -> :class:`SQLiteBackend`, as SQLAlchemy reads SQLite URLs.

    Query options: ``max_bytes`` (size budget, ``1GiB`` by default, ``none`` for none),
    ``timeout`` (seconds a write may wait for the lock, 1.5), ``read_timeout`` (1),
    ``queue_timeout`` (seconds a call may wait for its turn on the connection, 1),
    ``purge_interval`` (seconds between purges of expired rows, 60), ``synchronous``
    (SQLite's ``PRAGMA synchronous``, ``NORMAL``), ``check_interval`` (seconds between checks
    that the path still names the open file, 1; 0: before every call), ``create`` (``true``:
    a missing file becomes a new cache; ``false``: open an existing cache only, as the
    ``sse-cache`` inspection commands do), ``readonly`` (``true``: open the file read-only
    and change nothing in it, as ``sse-cache ls``, ``show`` and ``stats`` do),
    ``near_cache`` (memory for hot values answered without a worker thread while no commit
    happened, ``32MiB``; ``0`` turns it off).
    """
    path = _path_from_url(url)
    opts = Options(url, options)
    max_bytes = opts.take_size("max_bytes", _DEFAULT_MAX_BYTES)
    timeout = opts.take_timeout("timeout", _WRITE_TIMEOUT)
    read_timeout = opts.take_timeout("read_timeout", 1.0)
    queue_timeout = opts.take_timeout("queue_timeout", DEFAULT_QUEUE_TIMEOUT)
    purge_interval = opts.take_float("purge_interval", 60.0, minimum=0.0, allow_zero=True)
    synchronous = opts.take_str("synchronous", "NORMAL")
    check_interval = opts.take_float(
        "check_interval", _CHECK_INTERVAL, minimum=0.0, allow_zero=True
    )
    create = opts.take_bool("create", True)
    readonly = opts.take_bool("readonly", False)
    near_cache = opts.take_size("near_cache", _DEFAULT_NEAR_CACHE, minimum=0) or 0
    clock = opts.take_raw("clock")
    opts.finish()
    if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(
            f"sqlite:// option 'synchronous': expected OFF, NORMAL, FULL or EXTRA, "
            f"got {synchronous!r}"
        )
    if clock is not None and not callable(clock):
        raise ConfigError(f"sqlite:// option 'clock': expected a callable, got {clock!r}")
    return SQLiteBackend(
        path,
        max_bytes=max_bytes,
        timeout=timeout,
        read_timeout=read_timeout,
        queue_timeout=queue_timeout,
        purge_interval=purge_interval,
        synchronous=synchronous,
        check_interval=check_interval,
        create=create,
        near_cache_bytes=near_cache,
        clock=clock or time.time,
        readonly=readonly,
    )

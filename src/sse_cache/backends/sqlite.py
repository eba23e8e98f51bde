"""SQLite backend: one file, shared safely by threads and processes, via the stdlib ``sqlite3``.

``sqlite3`` is blocking, so every call runs in an anyio worker thread, one at a time per backend:
a ``CapacityLimiter(1)`` queues the calls on the event loop, and a lock on the thread side
guards the single connection (anyio's limiter on asyncio can admit a second borrower before
anyio 4.14, anyio#1170, and two threads in one connection would mix their transactions).
That keeps it usable from asyncio and trio alike, which an asyncio-only wrapper such as
aiosqlite would not be.

Hot values are also kept in a near cache (:class:`~sse_cache.backends._near.NearCache`) and
served on the caller's thread without that hop while SQLite's ``PRAGMA data_version``, read on
a second connection that never waits for a lock, says that no connection has committed since.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote, urlsplit

import anyio
import anyio.to_thread

from ..errors import BackendError, BackendTimeout, BackendUnavailable, ConfigError
from ._common import Options, check_open, expires_at, to_bytes
from ._near import NearCache

__all__ = ["SQLiteBackend", "from_url"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: A file's identity: (st_dev, st_ino).
_FileId = tuple[int, int]

_SCHEMA_VERSION: Final = 1
# Seconds a write may wait for the lock: under the engine's default backend_timeout (2 s),
# which cannot interrupt a call already running in a worker thread.
_WRITE_TIMEOUT: Final = 1.5
_DEFAULT_MAX_BYTES: Final = 1024**3
_DEFAULT_NEAR_CACHE: Final = 32 * 1024 * 1024
# Seconds between checks that the path still names the file this backend has open.
_CHECK_INTERVAL: Final = 1.0
# The files SQLite keeps beside a database in WAL mode, named after it.
_SIDECARS: Final = ("-wal", "-shm")
# How often opening is retried while the path keeps changing under it.
_OPEN_ATTEMPTS: Final = 3
_TABLE: Final = "sse_cache_entries"
# `value` is the last column on purpose: SQLite reads a row's columns in order, and a column
# stored after a large BLOB can only be reached by walking the BLOB's overflow pages. With the
# BLOB last, eviction and scans (key, size, times) never touch the values.
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    key TEXT PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    accessed_at REAL NOT NULL,
    expires_at REAL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sse_cache_by_access ON {_TABLE} (accessed_at);
CREATE INDEX IF NOT EXISTS sse_cache_by_expiry ON {_TABLE} (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS sse_cache_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO sse_cache_totals VALUES (0, 0, 0);
-- Running totals kept by triggers, inside each writer's own transaction: exact across
-- processes, and the size budget is checked without a SUM over the table.
CREATE TRIGGER IF NOT EXISTS sse_cache_count_insert AFTER INSERT ON {_TABLE} BEGIN
    UPDATE sse_cache_totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS sse_cache_count_delete AFTER DELETE ON {_TABLE} BEGIN
    UPDATE sse_cache_totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS sse_cache_count_update AFTER UPDATE OF size ON {_TABLE} BEGIN
    UPDATE sse_cache_totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0;
END;
PRAGMA user_version = {_SCHEMA_VERSION};
"""
_GET: Final = f"SELECT value, expires_at FROM {_TABLE} WHERE key = ?"
_UPSERT: Final = f"""
INSERT INTO {_TABLE} (key, size, created_at, accessed_at, expires_at, value)
VALUES (?1, ?2, ?3, ?3, ?4, ?5)
ON CONFLICT (key) DO UPDATE SET size = ?2, created_at = ?3, accessed_at = ?3,
    expires_at = ?4, value = ?5
"""
_DELETE: Final = f"DELETE FROM {_TABLE} WHERE key = ?"
_TOUCH: Final = f"UPDATE {_TABLE} SET accessed_at = ?2 WHERE key = ?1 AND accessed_at < ?2"
_PURGE: Final = f"""
DELETE FROM {_TABLE} WHERE key IN (
    SELECT key FROM {_TABLE} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)
"""
_OLDEST: Final = f"SELECT key FROM {_TABLE} WHERE key != ? ORDER BY accessed_at LIMIT ?"
_TOTALS: Final = "SELECT entries, bytes FROM sse_cache_totals WHERE id = 0"
_MAX_PENDING_TOUCHES: Final = 4096
_EVICT_BATCH: Final = 64
_PURGE_BATCH: Final = 1000


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # SQLITE_BUSY (5) and SQLITE_LOCKED (6), with any extended code.
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


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
      not stored; ``set`` removes the old value and raises :class:`BackendError`.
    - *Opening*: the file is opened on first use and created (an empty cache) if missing,
      unless ``create`` is False: then a missing file raises :class:`BackendUnavailable`
      naming the path, and an existing file that is not an sse_cache database is left
      untouched (:class:`BackendError`) — what a command that only reads a cache wants.
    - *Faults*: a missing directory, a corrupt or foreign file
      or a lock held too long (``read_timeout`` for reads, ``timeout`` for writes) raise
      :class:`BackendError` subclasses (the engine turns them into misses); after a corrupt or
      unreadable file the connection is reopened on the next call, so replacing the file
      recovers without a restart.
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
        purge_interval: float = 60.0,
        synchronous: str = "NORMAL",
        check_interval: float = _CHECK_INTERVAL,
        create: bool = True,
        near_cache_bytes: int = _DEFAULT_NEAR_CACHE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigError(f"synchronous must be OFF, NORMAL, FULL or EXTRA: {synchronous!r}")
        if not (math.isfinite(check_interval) and check_interval >= 0):
            raise ConfigError(f"check_interval must be a number >= 0: {check_interval!r}")
        self.path = os.fspath(path)
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._purge_interval = purge_interval
        self._synchronous = synchronous.upper()
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._busy_ms = -1
        # Watching the path: a file on disk (not ``:memory:`` nor ``""``, a private temporary
        # database). ``_where`` is the path made absolute (a later chdir does not move the
        # cache), ``_file`` the identity of the file ``_conn`` has open,
        # ``_sidecars`` that of its -wal and -shm files when it was opened; only worker
        # threads touch them, one at a time (``_conn_lock``).
        self._check_interval = check_interval
        self._watch = self.path not in ("", ":memory:")
        self._where = _absolute(self.path) if self._watch else self.path
        self._create = create or not self._watch  # a private database is always new
        self._file: _FileId | None = None
        self._sidecars: dict[str, _FileId] = {}
        self._next_check = -math.inf
        self._limiter = anyio.CapacityLimiter(1)
        self._conn_lock = threading.Lock()
        self._closed = False
        self._last_purge = -math.inf
        # Access times of keys read since the last write (approximate LRU, see docstring).
        self._touched: dict[str, float] = {}
        self._touch_lock = threading.Lock()
        # The near cache and the connection that reads its version: both used on the
        # caller's (event loop) thread only, never by a worker thread. ``_probe_file`` is the
        # identity of the file the probe has open, ``_probe_serial`` numbers the probes (a
        # new connection counts data_version afresh).
        self._near = NearCache(near_cache_bytes, option="near_cache_bytes")
        if not self._watch:
            self._near.max_bytes = 0  # a private database: no second connection can see it
        self._probe: sqlite3.Connection | None = None
        self._probe_file: _FileId | None = None
        self._probe_serial = 0
        self._probe_check = -math.inf

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r}, max_bytes={self._max_bytes})"

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
        row = await self._call(self._get, key, read=True)
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
            self._touch(key, now)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: until evicted), in one
        transaction that also enforces the size budget."""
        check_open(self._closed, "SQLiteBackend")
        _check_key(key)
        value = to_bytes(value)
        expires_at(0.0, ttl)  # validates ttl before any I/O
        self._near.discard(key)  # (the commit empties it anyway, at the next lookup)
        await self._call(self._set, key, value, ttl, read=False)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        check_open(self._closed, "SQLiteBackend")
        _check_key(key)
        self._near.discard(key)
        await self._call(self._write, _DELETE, (key,), read=False)

    async def aclose(self) -> None:
        """Write pending access times (best effort) and close the connection; later
        operations raise BackendUnavailable. Closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        self._close_probe()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close, limiter=self._limiter)

    # -- capabilities ---------------------------------------------------------------------

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """Every live key starting with ``prefix``, in key order, read in pages of 500."""
        check_open(self._closed, "SQLiteBackend")
        after = ""
        first = True
        while True:
            page = await self._call(self._scan_page, prefix, after, first, read=True)
            for key in page:
                yield key
            if len(page) < 500:
                return
            after, first = page[-1], False

    async def clear(self) -> int:
        """Delete every entry; return how many there were."""
        check_open(self._closed, "SQLiteBackend")
        self._near.clear()
        return await self._call(self._clear, read=False)

    async def stats(self) -> dict[str, int]:
        """``entries`` and ``bytes`` (values, expired-but-not-purged included),
        ``max_bytes`` (0: unbounded) and ``file_bytes`` (database file plus its WAL)."""
        check_open(self._closed, "SQLiteBackend")
        entries, size, file_bytes = await self._call(self._totals, read=True)
        return {
            "entries": entries,
            "bytes": size,
            "max_bytes": self._max_bytes or 0,
            "file_bytes": file_bytes,
        }

    # -- the near cache (caller's thread) -------------------------------------------------

    def _version(self) -> tuple[int, int] | None:
        """The database's version as the near cache counts it: (probe, ``PRAGMA
        data_version``), read now without waiting for any lock; None when it cannot be read
        at once (then the near cache is not used for this lookup)."""
        if self._closed:
            return None
        probe = self._probe
        if probe is not None:
            now = time.monotonic()
            if now >= self._probe_check:
                # The same look at the path as the worker threads' (_connection): a file
                # replaced at the path is the probe's to reopen too.
                self._probe_check = now + self._check_interval
                try:
                    moved = _file_id(self._where) != self._probe_file
                except OSError:
                    moved = False
                if moved:
                    self._close_probe()
                    probe = None
        if probe is None:
            probe = self._open_probe()
            if probe is None:
                return None
        try:
            row = probe.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            self._close_probe()  # busy right now, or the file is gone: not used this time
            return None
        return (self._probe_serial, int(row[0]))

    def _open_probe(self) -> sqlite3.Connection | None:
        # Only on the file the worker threads' connection has open (known once it opened):
        # a version read from another file would vouch for values it never held.
        opened = self._file
        if opened is None:
            return None
        try:
            if _file_id(self._where) != opened:
                return None
            conn = sqlite3.connect(
                f"file:{quote(self._where)}?mode=rw",  # never creates a file
                uri=True,
                timeout=0,  # never waits for a lock: it runs on the caller's thread
                isolation_level=None,
                check_same_thread=False,  # opened and used on the event loop's thread only
            )
        except (sqlite3.Error, OSError):
            return None
        try:
            same = _file_id(self._where) == opened
        except OSError:
            same = False
        if not same:
            conn.close()
            return None
        self._probe, self._probe_file = conn, opened
        self._probe_serial += 1
        self._probe_check = time.monotonic() + self._check_interval
        return conn

    def _close_probe(self) -> None:
        probe, self._probe = self._probe, None
        self._probe_file = None
        self._near.clear()
        if probe is not None:
            with suppress(sqlite3.Error):
                probe.close()

    def _touch(self, key: str, now: float) -> None:
        with self._touch_lock:
            if len(self._touched) >= _MAX_PENDING_TOUCHES:
                self._touched.clear()
            self._touched[key] = now

    # -- thread side ----------------------------------------------------------------------

    async def _call(self, func: Callable[..., T], *args: Any, read: bool) -> T:
        def run() -> T:
            with self._conn_lock, self._map_exceptions():
                conn = self._connection()
                self._set_busy(conn, self._read_timeout if read else self._timeout)
                return self._retrying(read, lambda: func(conn, *args))

        # Not abandoned on cancel: the next call would share the connection with a thread
        # still using it. A call is bounded by ``timeout`` / ``read_timeout`` instead, which
        # default to less than the engine's ``backend_timeout``.
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    @contextmanager
    def _map_exceptions(self) -> Iterator[None]:
        # The one place where sqlite3 errors become the BackendError family.
        try:
            yield
        except BackendError:
            raise  # already ours, with its own message (BackendUnavailable is an OSError)
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise BackendTimeout(f"SQLite database {self.path!r} is locked: {exc}") from exc
            # Corrupt, foreign, unreadable or vanished file: start afresh next time.
            self._drop_connection()
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise BackendUnavailable(f"cannot open SQLite file {self.path!r}: {exc}") from exc
            raise BackendError(f"SQLite database {self.path!r}: {exc}") from exc
        except OSError as exc:
            raise BackendUnavailable(f"SQLite file {self.path!r}: {exc}") from exc

    def _retrying(self, read: bool, op: Callable[[], T]) -> T:
        # SQLite's busy handler covers most contention; some lock states (WAL recovery, a
        # journal-mode switch, a read lock that cannot be upgraded) return SQLITE_BUSY at once,
        # so retry with backoff until the same deadline.
        deadline = time.monotonic() + (self._read_timeout if read else self._timeout)
        delay = 0.002
        while True:
            try:
                return op()
            except sqlite3.Error as exc:
                if not _is_busy(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _connection(self) -> sqlite3.Connection:
        # The open connection, after a look at the path at most every ``check_interval``
        # seconds: one os.stat in the worker thread this call runs in anyway.
        if self._closed:
            raise BackendUnavailable("SQLiteBackend is closed")
        if self._conn is not None and self._watch:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self._check_interval
                if self._moved():
                    self._drop_connection()
        if self._conn is None:
            self._open()
        assert self._conn is not None
        return self._conn

    def _open(self) -> None:
        for _ in range(_OPEN_ATTEMPTS):
            before = self._existing_file() if self._watch else None
            if before is None and self._watch and not self._create:
                raise BackendUnavailable(
                    f"SQLite file {self._where!r} does not exist (create=false: nothing is "
                    "created; sqlite:///name.db is relative to the working directory, "
                    "sqlite:////abs/name.db absolute)"
                )
            conn = sqlite3.connect(
                # mode=rw: a file removed since the check above is an error, not a new file.
                self._where if self._create else f"file:{quote(self._where)}?mode=rw",
                timeout=self._timeout,
                isolation_level=None,  # autocommit; write transactions are explicit
                check_same_thread=False,  # used from worker threads, one at a time (limiter)
                uri=not self._create,
            )
            try:
                self._retrying(False, partial(self._initialise, conn))
                after = _file_id(self._where) if self._watch else None
                sidecars = self._sidecar_ids() if self._watch else {}
            except BaseException:
                conn.close()
                raise
            if before == after and (after is not None or not self._watch):
                break
            # The path named another file (or none) after sqlite3 opened it than before: which
            # one this connection holds is unknown, so it is not kept.
            conn.close()
        else:
            raise BackendUnavailable(
                f"SQLite file {self.path!r} kept changing while it was being opened"
            )
        self._conn, self._file, self._sidecars = conn, after, sidecars
        self._busy_ms = int(self._timeout * 1000)
        self._next_check = time.monotonic() + self._check_interval

    def _existing_file(self) -> _FileId | None:
        # The identity of the file at the path, which is created (empty: SQLite makes it a new
        # database) if missing. -wal and -shm files found beside a missing database belong to
        # a deleted one, maybe still open in a process that has not noticed yet; SQLite would
        # read them as part of the new file, so the process that creates the file removes
        # them. Only files seen *before* the database existed: never a new database's own.
        current = _file_id(self._where)
        if current is not None or not self._create:
            return current
        orphans = self._sidecar_ids()
        try:
            fd = os.open(self._where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return _file_id(self._where)  # another process created it first
        except OSError:
            return None  # a missing directory, say: sqlite3 reports it
        os.close(fd)
        self._remove_if_unchanged(orphans)
        self._note_absolute_twin()
        return _file_id(self._where)

    def _note_absolute_twin(self) -> None:
        # ``sqlite:///var/cache.db`` names var/cache.db in the working directory, as SQLAlchemy
        # reads it; someone who meant /var/cache.db gets a new, empty cache. Say so when that
        # file exists: a fact, not a guess, and the path is not rewritten.
        given = self.path
        if os.path.isabs(given) or given.startswith((".", "~")):
            return
        twin = os.path.normpath("/" + given)
        if twin != self._where and os.path.isfile(twin):  # not the file just created
            logger.warning(
                "SQLite: created a new cache file %s; %s exists. A sqlite:/// URL with three "
                "slashes names a path relative to the working directory: for %s write "
                "sqlite:///%s (four slashes)",
                self._where,
                twin,
                twin,
                twin,
            )

    def _sidecar_ids(self) -> dict[str, _FileId]:
        ids: dict[str, _FileId] = {}
        for suffix in _SIDECARS:
            ident = _file_id(self._where + suffix)
            if ident is not None:
                ids[suffix] = ident
        return ids

    def _remove_if_unchanged(self, sidecars: dict[str, _FileId]) -> None:
        for suffix, ident in sidecars.items():
            with suppress(OSError):
                if _file_id(self._where + suffix) == ident:
                    os.unlink(self._where + suffix)

    def _moved(self) -> bool:
        # Whether the path no longer names the file the connection has open: deleted,
        # replaced (a rename over it) or moved away.
        if self._file is None:
            return False
        try:
            return _file_id(self._where) != self._file
        except OSError:
            return False  # cannot tell (a directory made unsearchable): keep the connection

    def _initialise(self, conn: sqlite3.Connection) -> None:
        if not self._create:
            # Open-existing-only: a file without our schema is somebody else's (or a fresh
            # empty one): neither switched to WAL nor given our tables.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version != _SCHEMA_VERSION:
                raise BackendError(
                    f"SQLite file {self._where!r} is not an sse_cache database "
                    f"(user_version {version}; create=false leaves it untouched)"
                )
        # WAL: readers never wait for the writer and the writer never waits for readers.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() not in ("wal", "memory"):
            raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == _SCHEMA_VERSION:
            return
        if version not in (0, _SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"unknown sse_cache schema version {version}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(_SCHEMA):
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _set_busy(self, conn: sqlite3.Connection, seconds: float) -> None:
        ms = int(seconds * 1000)
        if ms != self._busy_ms:
            conn.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_ms = ms

    def _drop_connection(self) -> None:
        # When the database file was deleted, replaced or moved away, its -wal and -shm files
        # stay at the path (SQLite names them after the path, and does not checkpoint or
        # delete them when it closes a file that has moved). Left there, they would be read
        # as part of whatever file the path names now and corrupt it. So: copy the WAL into
        # the file we have open (a moved file stays whole; a deleted one costs at most one
        # WAL's worth of writes), close it, and remove the -wal and -shm if they are still the
        # ones it was opened with (never another database's).
        moved = self._moved()
        conn, self._conn = self._conn, None
        sidecars, self._sidecars = self._sidecars, {}
        self._file = None
        if conn is None:
            return
        if moved:
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with suppress(sqlite3.Error):
            conn.close()
        if moved:
            self._remove_if_unchanged(sidecars)
            self._last_purge = -math.inf  # another file: its expired rows are not ours to know

    def _close(self) -> None:
        with self._conn_lock:
            self._close_connection()

    def _close_connection(self) -> None:
        conn = self._conn
        if conn is not None and not self._moved():
            try:
                self._set_busy(conn, min(self._timeout, 0.2))
                self._transaction(conn, lambda: None)  # flushes pending access times
            except sqlite3.Error:
                pass  # best effort: losing a few access times only blurs the LRU order
        self._drop_connection()

    def _get(self, conn: sqlite3.Connection, key: str) -> tuple[bytes, float | None] | None:
        row = conn.execute(_GET, (key,)).fetchone()
        if row is None:
            return None
        value, deadline = row
        now = self._clock()
        if deadline is not None and deadline <= now:
            return None
        self._touch(key, now)
        return bytes(value), deadline

    def _set(self, conn: sqlite3.Connection, key: str, value: bytes, ttl: float | None) -> None:
        now = self._clock()
        deadline = expires_at(now, ttl)

        too_large = self._max_bytes is not None and len(value) > self._max_bytes

        def body() -> None:
            if too_large or (deadline is not None and deadline <= now):
                # Non-positive TTL (expired already) or a value over the whole budget: the
                # old value must not outlive this set either.
                conn.execute(_DELETE, (key,))
                return
            conn.execute(_UPSERT, (key, len(value), now, deadline, value))
            if now - self._last_purge >= self._purge_interval:
                conn.execute(_PURGE, (now, _PURGE_BATCH))
                self._last_purge = now
            if self._max_bytes is not None:
                self._evict(conn, key, now)

        self._transaction(conn, body)
        if too_large:
            raise BackendError(
                f"value of {len(value)} bytes is larger than max_bytes={self._max_bytes}"
            )

    def _evict(self, conn: sqlite3.Connection, keep: str, now: float) -> None:
        assert self._max_bytes is not None
        _, total = conn.execute(_TOTALS).fetchone()
        if total <= self._max_bytes:
            return
        conn.execute(_PURGE, (now, _PURGE_BATCH))
        while True:
            _, total = conn.execute(_TOTALS).fetchone()
            if total <= self._max_bytes:
                return
            victims = conn.execute(_OLDEST, (keep, _EVICT_BATCH)).fetchall()
            if not victims:
                return
            # Evict in small steps: each batch is the least recently used of what is left.
            for (victim,) in victims:
                conn.execute(_DELETE, (victim,))
                _, total = conn.execute(_TOTALS).fetchone()
                if total <= self._max_bytes:
                    return

    def _write(self, conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
        self._transaction(conn, lambda: conn.execute(sql, params))

    def _transaction(self, conn: sqlite3.Connection, body: Callable[[], object]) -> None:
        # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that reads
        # first and writes later can fail with SQLITE_BUSY without waiting (lock upgrade).
        conn.execute("BEGIN IMMEDIATE")
        try:
            with self._touch_lock:
                touched, self._touched = self._touched, {}
            if touched:
                conn.executemany(_TOUCH, touched.items())
            body()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _scan_page(
        self, conn: sqlite3.Connection, prefix: str, after: str, first: bool
    ) -> list[str]:
        now = self._clock()
        op = ">=" if first else ">"
        rows = conn.execute(
            f"SELECT key FROM {_TABLE} WHERE key {op} ? AND substr(key, 1, ?) = ?"
            " AND (expires_at IS NULL OR expires_at > ?) ORDER BY key LIMIT 500",
            (after if not first else prefix, len(prefix), prefix, now),
        ).fetchall()
        return [k for (k,) in rows]

    def _clear(self, conn: sqlite3.Connection) -> int:
        counted: list[int] = []

        def body() -> None:
            counted.append(conn.execute(f"DELETE FROM {_TABLE}").rowcount)

        self._transaction(conn, body)
        return counted[0]

    def _totals(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        entries, size = conn.execute(_TOTALS).fetchone()
        file_bytes = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                file_bytes += os.path.getsize(self._where + suffix)
        return int(entries), int(size), file_bytes


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT our BEGIN IMMEDIATE first; split the script ourselves.
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return [s for s in out if s]


def _file_id(path: str) -> _FileId | None:
    """The identity of the file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def _absolute(path: str) -> str:
    try:
        return os.path.abspath(path)
    except OSError:  # the working directory was deleted
        return path


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, got {type(key).__name__}")


def _path_from_url(url: str) -> str:
    # As SQLAlchemy reads them, so that a URL means the same file to both: what follows
    # ``sqlite:///`` is the path, so three slashes and a relative path (``sqlite:///cache.db``
    # is ./cache.db), four slashes and an absolute one (``sqlite:////var/cache/sse.db``).
    parts = urlsplit(url)
    netloc, path = parts.netloc, unquote(parts.path)
    if netloc in (".", "..", "~"):
        return os.path.expanduser(netloc + path)  # sqlite://./x.db, a common slip
    if netloc:
        raise ConfigError(
            f"sqlite:// URL {url!r}: a SQLite URL has no host; write sqlite:///relative.db "
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
            f"sqlite:// URL {url!r} names no file: write sqlite:///relative.db, "
            "sqlite:////absolute/path.db or sqlite:///:memory:"
        )
    return os.path.expanduser(path)


def from_url(url: str, **options: Any) -> SQLiteBackend:
    """``sqlite:///relative.db`` (relative to the working directory), ``sqlite:////abs/path.db``
    or ``sqlite:///:memory:`` -> :class:`SQLiteBackend`, as SQLAlchemy reads SQLite URLs.

    Query options: ``max_bytes`` (size budget, ``1GiB`` by default, ``none`` for none),
    ``timeout`` (seconds a write may wait for the lock, 1.5), ``read_timeout`` (1),
    ``purge_interval`` (seconds between purges of expired rows, 60), ``synchronous``
    (SQLite's ``PRAGMA synchronous``, ``NORMAL``), ``check_interval`` (seconds between checks
    that the path still names the open file, 1; 0: before every call), ``create`` (``true``:
    a missing file becomes a new cache; ``false``: open an existing cache only, as the
    ``sse-cache`` inspection commands do), ``near_cache`` (memory for hot values answered
    without a worker thread while no commit happened, ``32MiB``; ``0`` turns it off).
    """
    path = _path_from_url(url)
    opts = Options(url, options)
    max_bytes = opts.take_size("max_bytes", _DEFAULT_MAX_BYTES)
    timeout = opts.take_float("timeout", _WRITE_TIMEOUT)
    read_timeout = opts.take_float("read_timeout", 1.0)
    purge_interval = opts.take_float("purge_interval", 60.0, minimum=0.0, allow_zero=True)
    synchronous = opts.take_str("synchronous", "NORMAL")
    check_interval = opts.take_float(
        "check_interval", _CHECK_INTERVAL, minimum=0.0, allow_zero=True
    )
    create = opts.take_bool("create", True)
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
        purge_interval=purge_interval,
        synchronous=synchronous,
        check_interval=check_interval,
        create=create,
        near_cache_bytes=near_cache,
        clock=clock or time.time,
    )

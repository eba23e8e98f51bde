"""What a SQLite cache file holds and how it is kept: the schema, the entries table's reads and
writes, the size budget (expired rows first, then least recently used) and the access times
batched into the next write.

Everything here runs on a worker thread that holds the backend's one connection (see
:class:`~sse_cache.backends._sqlite_file.DatabaseFile`); nothing here opens files or waits.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Callable
from typing import Final

from ..errors import BackendCorrupt, BackendError, CorruptEntry, ValueTooLarge
from ._common import expires_at

__all__ = ["SCHEMA_VERSION", "AccessTimes", "EntryTable", "initialise"]

SCHEMA_VERSION: Final = 1
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
PRAGMA user_version = {SCHEMA_VERSION};
"""
# A row is found by its key through the key's index, then read by its rowid: its own key
# with it, from the row, not the index (SQLite answers a column the index holds from the
# index). A corrupt index (one byte of a cell's rowid) pointed one key at another key's row,
# whose entry is whole: its checksum passed, and another tenant's answer was a hit
# (helper-164). Checked on every read, write and delete.
_GET: Final = (
    f"SELECT key, value, expires_at FROM {_TABLE} "
    f"WHERE rowid = (SELECT rowid FROM {_TABLE} WHERE key = ?)"
)
_KEY_OF_ROW: Final = (
    f"SELECT key FROM {_TABLE} WHERE rowid = (SELECT rowid FROM {_TABLE} WHERE key = ?)"
)
_UPSERT: Final = f"""
INSERT INTO {_TABLE} (key, size, created_at, accessed_at, expires_at, value)
VALUES (?1, ?2, ?3, ?3, ?4, ?5)
ON CONFLICT (key) DO UPDATE SET size = ?2, created_at = ?3, accessed_at = ?3,
    expires_at = ?4, value = ?5
"""
_DELETE: Final = f"DELETE FROM {_TABLE} WHERE key = ?"
_TOUCH: Final = f"UPDATE {_TABLE} SET accessed_at = ?2 WHERE key = ?1 AND accessed_at < ?2"
# (By rowid, as eviction: not through the key index, which a damaged file may have lead
# one key to another's row; helper-167.)
_PURGE: Final = f"""
DELETE FROM {_TABLE} WHERE rowid IN (
    SELECT rowid FROM {_TABLE} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)
"""
# Victims by rowid: their key text is never read, nor bound again (a key that is not UTF-8,
# another program's, came back as a str with lone surrogates, which no statement can bind).
_OLDEST: Final = f"SELECT rowid FROM {_TABLE} WHERE key != ? ORDER BY accessed_at LIMIT ?"
_DELETE_ROW: Final = f"DELETE FROM {_TABLE} WHERE rowid = ?"
_TOTALS: Final = "SELECT entries, bytes FROM sse_cache_totals WHERE id = 0"
_SCAN_PAGE: Final = 500
_MAX_PENDING_TOUCHES: Final = 4096
_EVICT_BATCH: Final = 64
_PURGE_BATCH: Final = 1000


def initialise(
    conn: sqlite3.Connection,
    *,
    where: str,
    synchronous: str,
    create: bool,
    readonly: bool = False,
) -> None:
    """Switch a freshly opened connection to WAL and give its file our schema (in one
    transaction), or, with ``create`` False, check that the file already has it; with
    ``readonly``, only check (the file keeps its journal mode: a rollback-journal file
    stays one).

    Raises :class:`BackendError` for a file that is not an sse_cache database when
    ``create`` is False, and ``sqlite3`` errors otherwise (translated by the caller)."""
    # Whose file it is, decided before anything is changed in it: a file of another
    # program (an application's database given by mistake) is refused as it is, never
    # switched to WAL nor given our tables.
    version, names = _contents(conn)
    _check_not_newer(where, version, names)
    if not create and version != SCHEMA_VERSION:
        # Open-existing-only: a file without our schema is somebody else's (or a fresh
        # empty one).
        raise BackendError(
            f"SQLite file {where!r} is not an sse_cache database "
            f"(user_version {version}; create=false leaves it untouched)"
        )
    _check_ours(where, version, names)
    if readonly:
        return
    # WAL: readers never wait for the writer and the writer never waits for readers.
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode is None or str(mode[0]).lower() not in ("wal", "memory"):
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    version, names = _contents(conn)  # (another process may have created it meanwhile)
    _check_not_newer(where, version, names)
    _check_ours(where, version, names)
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(_SCHEMA):
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _contents(conn: sqlite3.Connection) -> tuple[int, set[str]]:
    """The file's ``user_version`` and the names in its schema, read in one transaction:
    another process creating our schema in the same file (in one transaction of its own)
    is seen either not at all or whole, never as tables without their version."""
    conn.execute("BEGIN")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.execute("COMMIT")
    return int(version), names


def _check_not_newer(where: str, version: int, names: set[str]) -> None:
    """Raise :class:`BackendError` for a file of a newer sse_cache: our table, and a
    ``user_version`` above ours. It is ours, and it is left as it is: a newer release wrote
    it and reads it, this one cannot."""
    if version > SCHEMA_VERSION and _TABLE in names:
        raise BackendError(
            f"SQLite file {where!r} was written by a newer sse_cache (schema {version}; this "
            f"version reads {SCHEMA_VERSION}): upgrade sse-cache to read it; it is left as it is"
        )


def _check_ours(where: str, version: int, names: set[str]) -> None:
    """Raise :class:`BackendError` unless the file holds our schema (``user_version`` ours
    and our table there) or nothing at all (``user_version`` 0, no table: a new file)."""
    if version == SCHEMA_VERSION and _TABLE in names:
        return
    if version == 0 and not names:
        return
    if version == SCHEMA_VERSION:
        what = f"user_version {version} but no {_TABLE} table"
    elif version == 0:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        what = f"it holds {shown}"
    else:
        what = f"user_version {version}: another program's, or another sse_cache schema"
    raise BackendError(
        f"SQLite file {where!r} is not an sse_cache database ({what}); it is left as it "
        "is: give the cache a file of its own"
    )


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


def _check_index(conn: sqlite3.Connection, key: str) -> None:
    # Before a write or a delete by ``key``: the row its index leads to is its own (else the
    # write would go to another key's row, a corrupt entry's delete delete another's).
    row = conn.execute(_KEY_OF_ROW, (key,)).fetchone()
    if row is not None and row[0] != key:
        raise _corrupt_index(key, row[0])


def _corrupt_index(key: str, found: object) -> BackendCorrupt:
    return BackendCorrupt(
        f"the file's key index is corrupt: {key!r} leads to the row of {found!r} "
        "(nothing read, written or deleted by that key); rebuild it with "
        "`sqlite3 FILE 'REINDEX sse_cache_entries'` (check it with 'PRAGMA integrity_check'), "
        "or delete the file and its -wal and -shm"
    )


class AccessTimes:
    """When keys were last read, kept in memory until the next write transaction records
    them: reads stay read-only in SQLite, and the LRU order is approximate. Thread-safe (the
    event loop's near-cache hits and the worker threads both note reads)."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, key: str, now: float) -> None:
        with self._lock:
            if len(self._pending) >= _MAX_PENDING_TOUCHES:
                self._pending.clear()  # a bound on memory; only blurs the LRU order
            self._pending[key] = now

    def take(self) -> dict[str, float]:
        """Every access time noted since the last call."""
        with self._lock:
            taken, self._pending = self._pending, {}
        return taken


class EntryTable:
    """The operations on the entries table, each given the connection of the worker thread
    that runs it. Writes are ``BEGIN IMMEDIATE`` transactions that also record the pending
    access times; ``write`` keeps the values within ``max_bytes`` (None: unbounded)."""

    def __init__(
        self, *, max_bytes: int | None, purge_interval: float, clock: Callable[[], float]
    ) -> None:
        self.max_bytes = max_bytes
        self.accessed = AccessTimes()
        self._purge_interval = purge_interval
        self._clock = clock
        self._last_purge = -math.inf

    def forget_purge(self) -> None:
        """Purge expired rows at the next write: the file open now is another one."""
        self._last_purge = -math.inf

    def read(
        self, conn: sqlite3.Connection, key: str, began: Callable[[], None] | None = None
    ) -> tuple[bytes, float | None] | None:
        """The value of ``key`` and its deadline, or None when missing or expired;
        ``began`` is called right before the row is read. Raises CorruptEntry for a row
        another writer gave other types (the engine deletes it)."""
        if began is not None:
            began()
        row = conn.execute(_GET, (key,)).fetchone()
        if row is None:
            return None
        found, value, deadline = row
        if found != key:
            raise _corrupt_index(key, found)
        # SQLite columns take any type; our rows hold a BLOB and a REAL or NULL.
        if not isinstance(value, bytes) or not isinstance(deadline, (float, int, type(None))):
            raise CorruptEntry(
                f"the row of {key!r} holds {type(value).__name__} and "
                f"{type(deadline).__name__}, not a value (blob) and a deadline (real or null)"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            return None
        self.accessed.note(key, now)
        return bytes(value), deadline

    def write(self, conn: sqlite3.Connection, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` for ``ttl`` seconds, purging and evicting in the same transaction.
        A value larger than ``max_bytes`` removes the old one and raises ValueTooLarge."""
        now = self._clock()
        deadline = expires_at(now, ttl)

        too_large = self.max_bytes is not None and len(value) > self.max_bytes

        def body() -> None:
            _check_index(conn, key)
            if too_large or (deadline is not None and deadline <= now):
                # Non-positive TTL (expired already) or a value over the whole budget: the
                # old value must not outlive this set either.
                conn.execute(_DELETE, (key,))
                return
            conn.execute(_UPSERT, (key, len(value), now, deadline, value))
            if now - self._last_purge >= self._purge_interval:
                conn.execute(_PURGE, (now, _PURGE_BATCH))
                self._last_purge = now
            if self.max_bytes is not None:
                self._evict(conn, key, now, self.max_bytes)

        self.transaction(conn, body)
        if too_large:
            raise ValueTooLarge(
                f"value of {len(value)} bytes is larger than max_bytes={self.max_bytes}"
            )

    def _evict(self, conn: sqlite3.Connection, keep: str, now: float, max_bytes: int) -> None:
        _, total = conn.execute(_TOTALS).fetchone()
        if total <= max_bytes:
            return
        conn.execute(_PURGE, (now, _PURGE_BATCH))
        while True:
            _, total = conn.execute(_TOTALS).fetchone()
            if total <= max_bytes:
                return
            victims = conn.execute(_OLDEST, (keep, _EVICT_BATCH)).fetchall()
            if not victims:
                return
            # Evict in small steps: each batch is the least recently used of what is left.
            for (victim,) in victims:
                conn.execute(_DELETE_ROW, (victim,))
                _, total = conn.execute(_TOTALS).fetchone()
                if total <= max_bytes:
                    return

    def delete(self, conn: sqlite3.Connection, key: str) -> None:
        def body() -> None:
            _check_index(conn, key)
            conn.execute(_DELETE, (key,))

        self.transaction(conn, body)

    def flush(self, conn: sqlite3.Connection) -> None:
        """Record the pending access times (an otherwise empty write transaction)."""
        self.transaction(conn, lambda: None)

    def transaction(self, conn: sqlite3.Connection, body: Callable[[], object]) -> None:
        # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that reads
        # first and writes later can fail with SQLITE_BUSY without waiting (lock upgrade).
        conn.execute("BEGIN IMMEDIATE")
        try:
            touched = self.accessed.take()
            if touched:
                conn.executemany(_TOUCH, touched.items())
            body()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def scan_page(self, conn: sqlite3.Connection, prefix: str, after: str | None) -> list[str]:
        """Up to 500 live keys starting with ``prefix``, in key order, after ``after``
        (None: from the first). A key whose bytes are not UTF-8 (another program's) comes
        with them as lone surrogates (``k2\\udcff``, the connection's text factory), as the
        Redis backend lists such keys: listed, and the scan goes on."""
        now = self._clock()
        op = ">=" if after is None else ">"
        # The bound as the bytes of the key it came from, made TEXT again in SQL: a key with
        # lone surrogates cannot be bound as a str (UnicodeEncodeError), and the last key of
        # a page may be one. (A constant expression: the key index still serves the range.)
        bound = (prefix if after is None else after).encode("utf-8", "surrogateescape")
        rows = conn.execute(
            f"SELECT key FROM {_TABLE} WHERE key {op} CAST(? AS TEXT) AND substr(key, 1, ?) = ?"
            f" AND (expires_at IS NULL OR expires_at > ?) ORDER BY key LIMIT {_SCAN_PAGE}",
            (bound, len(prefix), prefix, now),
        ).fetchall()
        return [k for (k,) in rows]

    @staticmethod
    def page_is_last(page: list[str]) -> bool:
        return len(page) < _SCAN_PAGE

    def clear(self, conn: sqlite3.Connection) -> int:
        """Delete every entry; how many there were."""
        counted: list[int] = []

        def body() -> None:
            counted.append(conn.execute(f"DELETE FROM {_TABLE}").rowcount)

        self.transaction(conn, body)
        return counted[0]

    @staticmethod
    def totals(conn: sqlite3.Connection) -> tuple[int, int]:
        """(entries, bytes of values), expired-but-not-purged rows included."""
        entries, size = conn.execute(_TOTALS).fetchone()
        return int(entries), int(size)

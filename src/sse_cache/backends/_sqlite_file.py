"""The one connection of a SQLite backend and the file it has open: opening (or creating) the
path, noticing that the file there was deleted, replaced or moved and its ``-wal``/``-shm``
sidecars, the busy timeout and retries, and the translation of ``sqlite3`` errors.

Used from worker threads, one at a time (a lock inside); only :meth:`DatabaseFile.current_file`
and :attr:`DatabaseFile.opened` are read from the event loop's thread (the near cache's probe).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import Final, TypeVar
from urllib.parse import quote

from ..errors import (
    BackendError,
    BackendFull,
    BackendReadOnly,
    BackendTimeout,
    BackendUnavailable,
)
from ._fork import hold_over_fork, keep, reopen_after_fork
from ._sqlite_store import initialise

__all__ = ["DatabaseFile", "FileId", "file_id"]

# The public module's name: where users look for (and configure) the backend's logging.
logger = logging.getLogger("sse_cache.backends.sqlite")

T = TypeVar("T")
#: A file's identity: (st_dev, st_ino).
FileId = tuple[int, int]

# The files SQLite keeps beside a database in WAL mode, named after it.
_SIDECARS: Final = ("-wal", "-shm")
# How often opening is retried while the path keeps changing under it.
_OPEN_ATTEMPTS: Final = 3
# How the connection reads TEXT: as str, the bytes that are not UTF-8 as lone surrogates
# (``a\udcff``), as the Redis backend lists such keys. sqlite3's own decoding raises on them
# (OperationalError "Could not decode to UTF-8 column"), which failed the whole call: a key
# another program wrote, or one bit flipped on disk, stopped every eviction and listing, and a
# value turned TEXT (a flipped serial type) failed every read of its key as a backend fault,
# never deleted (helper-148). Called only for TEXT values: a hit reads a BLOB and a REAL.
_TEXT: Final = partial(str, encoding="utf-8", errors="surrogateescape")
# What a path that is not a regular file names, by its st_mode.
_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_id(path: str) -> FileId | None:
    """The identity of the file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def _not_regular(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is when it is not a regular file, or ""."""
    if stat.S_ISREG(mode):
        return ""
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _absolute(path: str) -> str:
    try:
        return os.path.abspath(path)
    except OSError:  # the working directory was deleted
        return path


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # SQLITE_BUSY (5) and SQLITE_LOCKED (6), with any extended code.
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(exc).lower()
    return "locked" in message or "busy" in message


class InsideSQLite:
    """A lock held while a thread of ours is inside SQLite with one connection (``with``),
    and held over every fork too (waiting at most ``wait`` seconds for it): SQLite's locks
    are per process, and a thread of the parent inside SQLite at the fork leaves them held
    for ever in the child, where closing the inherited connection would wait on them."""

    def __init__(self, wait: float) -> None:
        self._wait = wait
        self._lock = threading.Lock()
        self._held_over_fork = False
        hold_over_fork(self)

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _fork_begins(self) -> None:
        # Bounded: a call stuck past its own timeouts leaves its connection to be kept in
        # the child rather than the fork waiting for ever.
        self._held_over_fork = self._lock.acquire(timeout=self._wait)

    def _fork_ended(self) -> None:
        if self._held_over_fork:
            self._held_over_fork = False
            self._lock.release()

    def drop_inherited(self, conn: sqlite3.Connection | None) -> None:
        """In a child of a fork: the connection it inherited is the parent's. Closed, as SQLite
        counts the locks of every connection to a file per process: a new connection next to
        an inherited one would count the parent's locks as its own and take none, and the
        parent, closing, would see no other user and delete the WAL the child writes to.
        Closed in the child, it releases only that count. One that could not be made quiet
        over the fork is kept instead (:func:`~sse_cache.backends._fork.keep`), with a lock
        of its own (the old one is held by a thread the child does not have)."""
        if conn is None:
            return
        if self._held_over_fork:
            with suppress(sqlite3.Error):
                conn.close()
        else:
            keep(conn)
            self._lock = threading.Lock()


class DatabaseFile:
    """The connection to the SQLite file at ``path`` (``""`` or ``":memory:"``: a private
    database, never watched), opened on first use and reopened when the path names another
    file (looked at at most every ``check_interval`` seconds) or after a corrupt or
    unreadable file. ``on_replaced`` is called when the connection is dropped because the
    file at the path changed."""

    def __init__(
        self,
        path: str,
        *,
        timeout: float,
        read_timeout: float,
        synchronous: str,
        check_interval: float,
        create: bool,
        on_replaced: Callable[[], None],
        readonly: bool = False,
    ) -> None:
        self.path = path
        self.check_interval = check_interval
        # A file on disk (not ``:memory:`` nor ``""``, a private temporary database).
        self.watch = path not in ("", ":memory:")
        #: The path made absolute: a later chdir does not move the cache.
        self.where = _absolute(path) if self.watch else path
        #: Opened read-only (a file on disk only): nothing in it, nor beside it, is changed.
        self.readonly = readonly and self.watch
        self.create = (create and not self.readonly) or not self.watch  # (private: always new)
        #: The identity of the file the connection has open (None: none open).
        self.opened: FileId | None = None
        self._timeout = timeout
        self._read_timeout = read_timeout
        self._synchronous = synchronous
        self._on_replaced = on_replaced
        self._conn: sqlite3.Connection | None = None
        self._lock = InsideSQLite(wait=timeout + 1)
        self._busy_ms = -1
        # The identities of the -wal and -shm files when the connection opened them.
        self._sidecars: dict[str, FileId] = {}
        self._next_check = -math.inf
        # Opened immutable (see _read_only_mode): the file's size and change time then, which
        # say when a writer has changed it since (None: not opened so).
        self._immutable: tuple[int, int] | None = None
        reopen_after_fork(self)

    def _forked(self) -> None:
        # A child of a fork: the parent's connection is not ours to use (SQLite forbids it).
        self._lock.drop_inherited(self._conn)
        self._conn, self.opened, self._sidecars = None, None, {}
        self._immutable = None
        self._busy_ms = -1
        self._next_check = -math.inf

    def current_file(self) -> FileId | None:
        """The identity of the file the path names now (OSError when it cannot be told)."""
        return file_id(self.where)

    def size_on_disk(self) -> int:
        """Bytes of the database file and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                total += os.path.getsize(self.where + suffix)
        return total

    def run(self, op: Callable[[sqlite3.Connection], T], *, read: bool) -> T:
        """``op`` on the connection (opened or reopened first if need be), with the read or
        write busy timeout, retried while SQLite reports the database busy; ``sqlite3`` and
        OS errors raised as the BackendError family."""
        if self.readonly and not read:
            raise BackendReadOnly(
                f"SQLite file {self.path!r} is opened read-only (readonly=true): "
                "nothing is written to it"
            )
        with self._lock, self._translated_errors(read):
            conn = self._connection()
            self._set_busy(conn, self._read_timeout if read else self._timeout)
            try:
                return self._retrying(read, lambda: op(conn))
            except sqlite3.DatabaseError:
                if self._immutable is None:
                    raise
                # Read as immutable, the file was changed under the read by a writer that
                # opened it since (SQLite then says "malformed" of a sound file; helper-99):
                # read it again, opened as the file now is.
                self._drop_connection()
                conn = self._connection()
                return self._retrying(read, lambda: op(conn))

    def close(self, flush: Callable[[sqlite3.Connection], None]) -> None:
        """``flush`` (best effort, briefly) unless the file has moved, then close."""
        with self._lock:
            conn = self._conn
            if conn is not None and not self.readonly and not self._moved():
                try:
                    self._set_busy(conn, min(self._timeout, 0.2))
                    flush(conn)
                except sqlite3.Error:
                    pass  # best effort: losing a few access times only blurs the LRU order
            self._drop_connection()

    @contextmanager
    def _translated_errors(self, read: bool) -> Iterator[None]:
        # The one place where sqlite3 errors become the BackendError family.
        try:
            yield
        except BackendError:
            raise  # already ours, with its own message (BackendUnavailable is an OSError)
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise BackendTimeout(f"SQLite database {self.path!r} is locked: {exc}") from exc
            read_only = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY
            opened = self._conn is not None
            if read_only and opened and not read:
                # Opened for reading only (SQLite falls back to that when this process may
                # not write the file): it still reads, as for a full disk. The write's
                # transaction was rolled back; the connection is reopened at most once per
                # check interval (made writable since, the file is written then), not for
                # each refused store, which cost every hit meanwhile (helper-133).
                if time.monotonic() >= self._next_check:
                    self._drop_connection()
                raise BackendReadOnly(
                    f"SQLite file {self.path!r} is read-only to this process ({exc}): its "
                    "answers are served, none is stored; let the process's user write the "
                    "file, its directory and its -wal and -shm files"
                ) from exc
            # Corrupt, foreign, unreadable or vanished file: start afresh next time. (Also a
            # full disk: the write's transaction is left behind with the connection.)
            self._drop_connection()
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                # The file is sound and still reads: not a failure of the backend.
                raise BackendFull(
                    f"SQLite database {self.path!r} is full: its disk has no room for this "
                    f"write ({exc}); free some, or lower ?max_bytes= to what it holds"
                ) from exc
            if read_only and not opened:
                # Not even opened: opening a WAL file writes its -wal and -shm files beside
                # it, which this process may not do in a directory it cannot write.
                raise BackendUnavailable(
                    f"SQLite file {self.path!r} cannot be opened by this process ({exc}): "
                    "SQLite opens it read-only (its owner and mode, its directory's, a "
                    "read-only mount, or a write version above 2 in its header) and cannot "
                    "write the -wal and -shm files a WAL file needs; make it writable to "
                    "this process's user, or open it with ?readonly=true to serve what it "
                    "holds without storing"
                ) from exc
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                hint = ""
                folder = os.path.dirname(os.path.abspath(self.path))
                if os.path.exists(self.path) and not os.access(folder, os.W_OK):
                    # (A read-only mount says SQLITE_CANTOPEN, not SQLITE_READONLY: the
                    # -wal and -shm files cannot be made beside it; helper-164.)
                    hint = (
                        f" (its directory {folder!r} cannot be written: a read-only mount? "
                        "open it with ?readonly=true to serve what it holds without storing)"
                    )
                raise BackendUnavailable(
                    f"cannot open SQLite file {self.path!r}: {exc}{hint}"
                ) from exc
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

    def _set_busy(self, conn: sqlite3.Connection, seconds: float) -> None:
        ms = int(seconds * 1000)
        if ms != self._busy_ms:
            conn.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_ms = ms

    def _connection(self) -> sqlite3.Connection:
        # The open connection, after a look at the path at most every ``check_interval``
        # seconds: one os.stat in the worker thread this call runs in anyway.
        if self._conn is not None and self._immutable is not None and self._changed():
            self._drop_connection()  # a writer has it now: read what it holds now
        if self._conn is not None and self.watch:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + self.check_interval
                if self._moved():
                    self._drop_connection()
        if self._conn is None:
            self._open()
        assert self._conn is not None
        return self._conn

    def _open(self) -> None:
        for _ in range(_OPEN_ATTEMPTS):
            before = self._existing_file() if self.watch else None
            if before is not None:
                self._check_regular()
            if before is None and self.watch and not self.create:
                raise BackendUnavailable(
                    f"SQLite file {self.where!r} does not exist (create=false: nothing is "
                    "created; sqlite:///name.db is relative to the working directory, "
                    "sqlite:////abs/name.db absolute)"
                )
            mode = self._read_only_mode() if self.readonly else "rw"
            conn = self._connect(mode)
            try:
                prepare = partial(
                    initialise,
                    where=self.where,
                    synchronous=self._synchronous,
                    create=self.create,
                    readonly=self.readonly,
                )
                self._retrying(False, partial(prepare, conn))
                after = file_id(self.where) if self.watch else None
                sidecars = self._sidecar_ids() if self.watch else {}
            except BaseException:
                conn.close()
                raise
            if before == after and (after is not None or not self.watch):
                break
            # The path named another file (or none) after sqlite3 opened it than before: which
            # one this connection holds is unknown, so it is not kept.
            conn.close()
        else:
            raise BackendUnavailable(
                f"SQLite file {self.path!r} kept changing while it was being opened"
            )
        self._conn, self.opened, self._sidecars = conn, after, sidecars
        self._immutable = self._stamp() if mode.endswith("immutable=1") else None
        self._busy_ms = int(self._timeout * 1000)
        self._next_check = time.monotonic() + self.check_interval

    def _check_regular(self, mode: int | None = None) -> None:
        # A path naming a FIFO (a mistake, or a file swapped for one) hung for ever: opening
        # it to read waits for a writer (helper-148), and SQLite's own open reads nothing from
        # it ("disk I/O error"). A database is a regular file: anything else is said as what
        # it is, at once. ``mode``: the st_mode already read, else the path is looked at.
        if mode is None:
            try:
                mode = os.stat(self.where).st_mode
            except OSError:
                return  # gone since, or cannot be told: sqlite3 says what is wrong
        kind = _not_regular(mode)
        if kind:
            raise BackendUnavailable(
                f"SQLite file {self.where!r} is not a regular file: it is {kind}; give the "
                "cache the path of a database file (or of none, to create one)"
            )

    def _connect(self, mode: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            # mode=rw: a file removed since the check above is an error, not a new file;
            # mode=ro: nothing is written (opened read-only, readonly=true).
            self.where if self.create else f"file:{quote(self.where)}?mode={mode}",
            timeout=self._timeout,
            isolation_level=None,  # autocommit; write transactions are explicit
            check_same_thread=False,  # used from worker threads, one at a time (limiter)
            uri=not self.create,
        )
        conn.text_factory = _TEXT
        return conn

    def _read_only_mode(self) -> str:
        # A WAL file that no process has open (no -wal beside it: the last connection
        # removed it as it closed) holds every committed row in itself. Opened read-only,
        # SQLite would still create a -wal and a -shm beside it, and leave them (a reader
        # cannot checkpoint): files of this process's user, which a proxy running as another
        # may not write; in a directory this process cannot write, it fails ("unable to
        # open"). Read as immutable instead, nothing is created. (A writer that opens the
        # file meanwhile may make a read fail, a page read mid-checkpoint, never change it.)
        # A rollback-journal file, or one a process has open, is read as any reader would.
        try:
            # O_NONBLOCK: a FIFO put at the path since _check_regular looked would make a
            # plain open wait for a writer, for ever.
            fd = os.open(self.where, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return "ro"  # (sqlite3 says what is wrong)
        try:
            mode = os.fstat(fd).st_mode
            header = os.pread(fd, 20, 0) if stat.S_ISREG(mode) else b""
        except OSError:
            return "ro"
        finally:
            os.close(fd)
        self._check_regular(mode)  # (SQLite's read-only open of a FIFO would wait too)
        wal = len(header) == 20 and header[:16] == b"SQLite format 3\x00" and header[18] == 2
        if wal and not os.path.exists(self.where + "-wal"):
            return "ro&immutable=1"
        return "ro"

    def _existing_file(self) -> FileId | None:
        # The identity of the file at the path, which is created (empty: SQLite makes it a new
        # database) if missing. -wal and -shm files found beside a missing database belong to
        # a deleted one, maybe still open in a process that has not noticed yet; SQLite would
        # read them as part of the new file, so the process that creates the file removes
        # them. Only files seen *before* the database existed: never a new database's own.
        current = file_id(self.where)
        if current is not None or not self.create:
            return current
        orphans = self._sidecar_ids()
        try:
            fd = os.open(self.where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return file_id(self.where)  # another process created it first
        except OSError:
            return None  # a missing directory, say: sqlite3 reports it
        os.close(fd)
        self._remove_if_unchanged(orphans)
        self._note_absolute_twin()
        return file_id(self.where)

    def _note_absolute_twin(self) -> None:
        # ``sqlite:///var/cache.db`` names var/cache.db in the working directory, as SQLAlchemy
        # reads it; someone who meant /var/cache.db gets a new, empty cache. Say so when that
        # file exists: a fact, not a guess, and the path is not rewritten.
        given = self.path
        if os.path.isabs(given) or given.startswith((".", "~")):
            return
        twin = os.path.normpath("/" + given)
        if twin != self.where and os.path.isfile(twin):  # not the file just created
            logger.warning(
                "SQLite: created a new cache file %s; %s exists. A sqlite:/// URL with three "
                "slashes names a path relative to the working directory: for %s write "
                "sqlite:///%s (four slashes)",
                self.where,
                twin,
                twin,
                twin,
            )

    def _sidecar_ids(self) -> dict[str, FileId]:
        ids: dict[str, FileId] = {}
        for suffix in _SIDECARS:
            ident = file_id(self.where + suffix)
            if ident is not None:
                ids[suffix] = ident
        return ids

    def _remove_if_unchanged(self, sidecars: dict[str, FileId]) -> None:
        for suffix, ident in sidecars.items():
            with suppress(OSError):
                if file_id(self.where + suffix) == ident:
                    os.unlink(self.where + suffix)

    def _stamp(self) -> tuple[int, int] | None:
        with suppress(OSError):
            stat = os.stat(self.where)
            return stat.st_size, stat.st_mtime_ns
        return None

    def _changed(self) -> bool:
        # Whether a file opened immutable may hold other rows now: a writer has it open (a
        # -wal beside it), or wrote it since (a checkpoint).
        return os.path.exists(self.where + "-wal") or self._stamp() != self._immutable

    def _moved(self) -> bool:
        # Whether the path no longer names the file the connection has open: deleted,
        # replaced (a rename over it) or moved away.
        if self.opened is None:
            return False
        try:
            return file_id(self.where) != self.opened
        except OSError:
            return False  # cannot tell (a directory made unsearchable): keep the connection

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
        self.opened = None
        self._immutable = None
        if conn is None:
            return
        if moved and not self.readonly:
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with suppress(sqlite3.Error):
            conn.close()
        if moved:
            if not self.readonly:
                self._remove_if_unchanged(sidecars)
            self._on_replaced()  # another file: its expired rows are not ours to know
            # An operator who swapped or deleted the file wants to see that it was noticed
            # (and a surprise swap is worth a line in any log).
            logger.warning(
                "sse_cache: the SQLite file at %s was deleted, replaced or moved while open: "
                "closed it, and the next call opens the file at that path",
                self.where,
            )

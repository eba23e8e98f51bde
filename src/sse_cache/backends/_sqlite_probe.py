"""The near cache's probe: a second SQLite connection that reads ``PRAGMA data_version`` on the
caller's (event loop) thread, never waiting for a lock, so that a SQLite backend can tell that
no connection or process has committed since it kept a value.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from contextlib import suppress
from urllib.parse import quote

from ._fork import reopen_after_fork
from ._sqlite_file import DatabaseFile, FileId, InsideSQLite

__all__ = ["VersionProbe"]


class VersionProbe:
    """Reads the version of the file ``db`` has open. Used on one thread (the event loop's)
    only; ``on_close`` is called whenever the probe's connection is given up, so that the
    values kept under its versions are dropped with it."""

    def __init__(self, db: DatabaseFile, on_close: Callable[[], None]) -> None:
        self._db = db
        self._on_close = on_close
        #: The probe's connection (None until a version is first asked for, and after a
        #: failure).
        self.connection: sqlite3.Connection | None = None
        # The identity of the file the probe has open; ``_serial`` numbers the connections
        # (a new one counts data_version afresh).
        self._file: FileId | None = None
        self._serial = 0
        self._next_check = -math.inf
        # Held while the probe is inside SQLite, so that a fork waits for it.
        self._busy = InsideSQLite(wait=5.0)
        reopen_after_fork(self)

    def _forked(self) -> None:
        # A child of a fork: the inherited connection is the parent's; the values kept
        # under its versions go with it.
        self._busy.drop_inherited(self.connection)
        self.connection, self._file = None, None
        self._serial += 1
        self._on_close()

    def version(self) -> tuple[int, int] | None:
        """The database's version as the near cache counts it: (probe, ``PRAGMA
        data_version``), read now without waiting for any lock; None when it cannot be read
        at once (then the near cache is not used for this lookup)."""
        probe = self.connection
        if probe is not None and self._file != self._db.opened:
            # The worker threads' connection has moved to a file replaced at the path
            # before this probe looked: values read from that file would be kept under this
            # file's versions, which its commits never change (helper-72: a value another
            # process had overwritten was served until the probe's own look, up to
            # check_interval later).
            self.close()
            probe = None
        if probe is not None:
            now = time.monotonic()
            if now >= self._next_check:
                # The same look at the path as the worker threads' (DatabaseFile): a file
                # replaced at the path is the probe's to reopen too.
                self._next_check = now + self._db.check_interval
                try:
                    moved = self._db.current_file() != self._file
                except OSError:
                    moved = False
                if moved:
                    self.close()
                    probe = None
        if probe is None:
            probe = self._open()
            if probe is None:
                return None
        try:
            with self._busy:
                row = probe.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            self.close()  # busy right now, or the file is gone: not used this time
            return None
        return (self._serial, int(row[0]))

    def _open(self) -> sqlite3.Connection | None:
        # Only on the file the worker threads' connection has open (known once it opened):
        # a version read from another file would vouch for values it never held.
        opened = self._db.opened
        if opened is None:
            return None
        where = self._db.where
        try:
            if self._db.current_file() != opened:
                return None
            with self._busy:
                conn = sqlite3.connect(
                    f"file:{quote(where)}?mode=rw",  # never creates a file
                    uri=True,
                    timeout=0,  # never waits for a lock: it runs on the caller's thread
                    isolation_level=None,
                    check_same_thread=False,  # opened and used on the event loop's thread only
                )
        except (sqlite3.Error, OSError):
            return None
        try:
            same = self._db.current_file() == opened
        except OSError:
            same = False
        if not same:
            with self._busy:
                conn.close()
            return None
        self.connection, self._file = conn, opened
        self._serial += 1
        self._next_check = time.monotonic() + self._db.check_interval
        return conn

    def close(self) -> None:
        """Close the connection (a new one is opened when a version is next asked for)."""
        probe, self.connection = self.connection, None
        self._file = None
        self._on_close()
        if probe is not None:
            with self._busy, suppress(sqlite3.Error):
                probe.close()

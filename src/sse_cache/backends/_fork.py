"""Backends carried into a child process by ``fork()`` (a backend object built and used at
import, then gunicorn ``--preload`` or multiprocessing workers forked from that process).

The child inherits the parent's open sockets and SQLite connections, but not its threads, its
event loop's tasks or its file locks. Used from both processes, one socket would carry two
processes' requests and replies (each reading the other's answers), a SQLite connection
would commit into a WAL the parent may checkpoint and delete, and a near cache would trust
invalidations that only the parent's listener receives. So each backend registered here
drops, in the child, everything it holds open, and opens afresh on first use there.

What the child drops is not closed there (closing could end what the parent still uses);
it is kept referenced (:func:`keep`) for the child's life instead, so that no finaliser
closes it either. SQLite's connections are the exception: they are closed in the child
(``_sqlite_file``), because SQLite keeps one count of a file's locks per process, which
an inherited connection would otherwise share with the child's new ones.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Protocol

__all__ = ["Forkable", "Quiet", "hold_over_fork", "keep", "reopen_after_fork"]


class Forkable(Protocol):
    def _forked(self) -> None:
        """In the child, right after the fork: drop (with :func:`keep`) what the parent
        holds open, so that first use opens afresh."""


_registered: weakref.WeakSet[Forkable] = weakref.WeakSet()
_inherited: list[object] = []


def reopen_after_fork(obj: Forkable) -> None:
    """Call ``obj._forked()`` in every child process forked from now on."""
    _registered.add(obj)


def keep(obj: object) -> None:
    """Keep what a child inherited referenced for its life: never used, never closed."""
    _inherited.append(obj)


#: Locks held over a fork (:func:`hold_over_fork`): each guards a SQLite connection of ours,
#: held while a thread of ours is inside SQLite with it.
_quiet: weakref.WeakSet[Quiet] = weakref.WeakSet()


class Quiet(Protocol):
    def _fork_begins(self) -> None:
        """In the parent, before the fork: wait (bounded) until no thread of ours is inside
        SQLite with this connection, and keep it so until :meth:`_fork_ended`."""

    def _fork_ended(self) -> None:
        """In the parent and in the child, after the fork: let go of what
        :meth:`_fork_begins` took."""


def hold_over_fork(obj: Quiet) -> None:
    """Have ``obj`` quiet over every fork from now on: SQLite's locks are per process, and a
    thread of the parent inside SQLite at the fork (on any connection to a file) leaves them
    held for ever in the child, where closing an inherited connection to that file waits on
    them."""
    _quiet.add(obj)


def _before() -> None:
    for obj in list(_quiet):
        obj._fork_begins()


def _in_parent() -> None:
    for obj in list(_quiet):
        obj._fork_ended()


def _in_child() -> None:
    for obj in list(_registered):
        # One backend's failure must not leave the others on the parent's connections.
        with contextlib.suppress(Exception):
            obj._forked()
    for quiet in list(_quiet):
        quiet._fork_ended()


os.register_at_fork(before=_before, after_in_parent=_in_parent, after_in_child=_in_child)

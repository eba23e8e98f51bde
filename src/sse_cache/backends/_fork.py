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

import os
import weakref
from typing import Protocol

__all__ = ["Forkable", "keep", "reopen_after_fork"]


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


def _in_child() -> None:
    for obj in list(_registered):
        obj._forked()


os.register_at_fork(after_in_child=_in_child)

"""A child process forked from the test (as gunicorn or Celery fork their workers from a
process that built, and used, its clients at import): run a function there and read what it
sends back."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

#: Seconds a child may take to answer: only a hung child reaches it.
HUNG = 60


@contextmanager
def forked(child: Callable[[Connection], None]) -> Iterator[Connection]:
    """Fork a child running ``child(conn)``; yield the parent's end of their pipe. On exit the
    child is waited for (killed if it lingers)."""
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=child, args=(child_end,))
    process.start()
    try:
        yield parent_end
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()


def received(conn: Connection) -> Any:
    """What the child sent next; a child that sends nothing for :data:`HUNG` seconds fails
    the test."""
    assert conn.poll(HUNG), "the forked child hung"
    return conn.recv()

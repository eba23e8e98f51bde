"""A cancellation that redis-py lets through on Python 3.11, raised again; and whether the
caller runs on asyncio (whose own cancellations, ``task.cancel()`` and ``asyncio.timeout``,
reach into an anyio shielded scope).

On Python 3.11, ``asyncio.wait_for``, which redis-py sends every command with, drops a
cancellation that arrives as the send completes (CPython #86296, fixed in 3.12); the task
still counts it as requested (``Task.cancelling()``). Our own calls run in anyio cancel scopes,
which deliver a cancellation again at the next checkpoint. But the asyncio tasks of our own
that outlive a request (the Redis near cache's tracking connection, a cross-process lease's
keeper) are cancelled once, by whoever closes them or by ``asyncio.run`` at its end: a lost
cancellation there leaves a task running that nothing will cancel again, and the loop waits
for it for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import TracebackType
from typing import TypeVar

__all__ = ["RaiseSwallowed", "checked", "on_asyncio"]

T = TypeVar("T")


class RaiseSwallowed:
    """``with RaiseSwallowed():`` around redis-py calls: a cancellation of the current task
    requested during the block and not raised by it is raised when the block ends — also
    when the block failed instead (``wait_for`` can swallow the cancellation and raise the
    inner error), or a caller that retries on errors would retry for ever. One requested
    before the block (a shielded cleanup while a cancellation goes on) is the caller's
    business and left alone."""

    __slots__ = ("_before", "_task")

    def __enter__(self) -> None:
        task = self._task = asyncio.current_task()
        self._before = task.cancelling() if task is not None else 0

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self._task
        if task is None or task.cancelling() <= self._before:
            return
        if exc is None:
            raise asyncio.CancelledError
        if isinstance(exc, Exception):
            raise asyncio.CancelledError from exc


async def checked(call: Awaitable[T]) -> T:
    """``await call`` (a redis-py call) in :class:`RaiseSwallowed`."""
    with RaiseSwallowed():
        return await call


def on_asyncio() -> bool:
    """Whether the caller runs on asyncio (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

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
from typing import TypeVar

__all__ = ["checked", "on_asyncio"]

T = TypeVar("T")


async def checked(call: Awaitable[T]) -> T:
    """``await call`` (a redis-py call), then raise the cancellation it let through, if any:
    also when the call failed instead (``wait_for`` can swallow the cancellation and raise the
    inner error), or a caller that retries on errors would retry for ever."""
    try:
        result = await call
    except Exception as exc:
        if _cancel_requested():
            raise asyncio.CancelledError from exc
        raise
    if _cancel_requested():
        raise asyncio.CancelledError
    return result


def _cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def on_asyncio() -> bool:
    """Whether the caller runs on asyncio (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

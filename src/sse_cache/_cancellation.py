"""Cancellations on asyncio that anyio's cancel scopes do not govern: one that redis-py lets
through on Python 3.11, raised again (:func:`checked`), and asyncio's own (``task.cancel()``,
``asyncio.timeout``), which reach into a shielded scope (:func:`finished`).

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
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

__all__ = ["checked", "finished", "on_asyncio"]

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


async def finished(
    call: Callable[[], Awaitable[T]], bound: float, *, in_task: bool
) -> tuple[T | None, bool, BaseException | None]:
    """``await call()`` to its end, shielded from the caller's cancellation, for at most
    ``bound`` seconds: ``(its result, whether the bound passed first — then it was cancelled
    and the result is None —, the caller's own asyncio cancellation that arrived meanwhile)``.
    The caller raises that cancellation once it has done with the result. The call's own
    error is raised.

    anyio's shield keeps anyio's cancellations out, not asyncio's: ``task.cancel()`` and
    ``asyncio.timeout`` (what gateways wrap their reads in) reach into a shielded scope and
    stop the call midway. With ``in_task``, on asyncio, the call runs in a task of its own,
    which the caller waits for through such cancellations: two passes of the event loop and
    ~7 µs more a call, for calls that wait for the network anyway."""
    if not (in_task and on_asyncio()):
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + bound
            result = await call()
        return (None, True, None) if scope.cancelled_caught else (result, False, None)
    task = asyncio.ensure_future(call())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    cancelled: BaseException | None = None
    timed_out = False
    with anyio.CancelScope(shield=True):
        while not task.done():
            wait = None if math.isinf(bound) or timed_out else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait({task}, timeout=wait)
            except asyncio.CancelledError as exc:
                cancelled = exc  # asyncio's own: the call goes on, for the others
                continue
            if not task.done():  # the bound passed
                timed_out = True
                task.cancel()
    if task.cancelled():
        return None, True, cancelled
    return task.result(), False, cancelled

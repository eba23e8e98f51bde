"""One background task of a backend's, on the event loop that last asked for it.

The Redis backend keeps two (its invalidation listener, its ``TOUCH`` rounds). A backend may
be used from one event loop after another (``asyncio.run`` twice), and from a forked child:
the task runs on the loop that last needed it, a task left on a loop that ended is started
anew, and one that runs elsewhere is never awaited here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["LoopTask"]


class LoopTask:
    """The task ``name``, made by ``run()`` on the running loop by :meth:`ensure`."""

    __slots__ = ("_name", "_run", "task")

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._run = run
        self._name = name
        self.task: asyncio.Task[None] | None = None

    def running_here(self) -> bool:
        """Whether the task runs on the running loop (False outside one)."""
        task = self.task
        if task is None or task.done():
            return False
        try:
            return task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:
            return False

    def ensure(self) -> bool:
        """Start the task on the running loop unless it runs there already; True when it
        was started now."""
        if self.running_here():
            return False
        self.task = asyncio.get_running_loop().create_task(self._run(), name=self._name)
        return True

    def cancel_soon(self) -> None:
        """Cancel the task on its loop, from any thread, waiting for nothing (its owner was
        dropped unclosed); nothing to do if it is done or its loop has ended."""
        task = self.task
        if task is None or task.done():
            return
        loop = task.get_loop()
        if not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def forget(self) -> None:
        """In a forked child: the task is the parent's."""
        self.task = None

    def take_here(self) -> asyncio.Task[None] | None:
        """Let go of the task, and return it if it is still running on the running loop (the
        one to cancel and wait for); a task of an ended loop, or of none, is just dropped."""
        task, self.task = self.task, None
        if task is None or task.done():
            return None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return task if task.get_loop() is running else None  # (an ended loop cancelled it)

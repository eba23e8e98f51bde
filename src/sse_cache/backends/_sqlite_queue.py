"""The queue in front of a SQLite backend's one connection: calls run one at a time, in
arrival order, each in a worker thread; a call waits at most ``wait`` seconds for its turn.

A call that waited that long is given up with one of two errors, which the engine's breaker
tells apart:

- :class:`~sse_cache.errors.BackendBusy` while the connection is making progress: more calls
  at once than one connection serves (a burst of misses storing their answers, each hit of a
  key whose near-cache value a commit dropped). SQLite is healthy; the breaker does not count
  it, or a burst would turn the cache off and send every stored answer upstream.
- :class:`~sse_cache.errors.BackendTimeout` when the call holding the connection has run more
  than twice its own bound (the lock wait it was given, ``timeout`` or ``read_timeout``): the
  disk or the file system is not answering. The breaker counts it, and opens.

A call that has its turn is never abandoned (the next call would share the connection with a
thread still using it); the lock waits inside it are bounded instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from ..errors import BackendBusy, BackendError, BackendTimeout, ConfigError

__all__ = ["ConnectionQueue"]

T = TypeVar("T")


class ConnectionQueue:
    """Runs calls on the connection's worker thread one at a time (see the module)."""

    def __init__(self, wait: float) -> None:
        if not (math.isfinite(wait) and wait > 0):
            raise ConfigError(f"queue_timeout must be a number of seconds > 0, got {wait!r}")
        self.wait = wait
        # FIFO: the order calls arrive in is the order they run in.
        self._turns = anyio.CapacityLimiter(1)
        # The thread a call runs in (uncontended: only the holder of a turn asks for it).
        self._threads = anyio.CapacityLimiter(1)
        #: (when it began, its own bound) of the call holding the connection, or None.
        self._running: tuple[float, float] | None = None

    async def run(self, func: Callable[[], T], *, bound: float, what: str) -> T:
        """``func()`` in the worker thread once it is this call's turn; ``bound`` is how long
        ``func`` may legitimately take (its lock wait); ``what`` names the call in errors."""
        with anyio.move_on_after(self.wait) as waiting:
            await self._turns.acquire()
        if waiting.cancelled_caught:
            raise self._gave_up(what)
        try:
            self._running = (time.monotonic(), bound)
            return await anyio.to_thread.run_sync(func, limiter=self._threads)
        finally:
            self._running = None
            self._turns.release()

    async def run_last(self, func: Callable[[], T]) -> T:
        """``func()`` after every call queued before it, however long that takes, even when
        the caller is cancelled meanwhile (closing the connection)."""
        with anyio.CancelScope(shield=True):
            async with self._turns:
                result = await anyio.to_thread.run_sync(func, limiter=self._threads)
        return result

    def _gave_up(self, what: str) -> BackendError:
        running = self._running
        if running is not None:
            began, bound = running
            held = time.monotonic() - began
            if held > 2 * bound:
                return BackendTimeout(
                    f"{what}: SQLite's connection has been held by one call for {held:.1f} s, "
                    f"more than twice its {bound:g} s bound: the disk or the file system is "
                    "not answering"
                )
        return BackendBusy(
            f"{what}: waited {self.wait:g} s for SQLite's one connection: more calls at once "
            "than it serves one by one (raise ?queue_timeout=, keeping it under the engine's "
            "backend_timeout, or run more workers)"
        )

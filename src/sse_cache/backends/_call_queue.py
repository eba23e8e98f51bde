"""The queue in front of a blocking client's connections (SQLite's one, memcached's pool):
calls run in worker threads, at most ``slots`` at once, in arrival order; a call waits at most
``wait`` seconds for its turn, and never more than half the time left before the caller's
deadline (the engine's ``backend_timeout``, when it calls from inside one): the rest is the
call's own, so that waiting alone never runs a call into that deadline.

A call that waited that long is given up with one of two errors, which the engine's breaker
tells apart:

- :class:`~sse_cache.errors.BackendBusy` while the connections are making progress: more
  calls at once than they serve (a burst of misses storing their answers, every hit of a key
  whose near-cache value a commit dropped). The backend is healthy; the breaker does not
  count it, or a burst would turn the cache off and send every stored answer upstream.
- :class:`~sse_cache.errors.BackendTimeout` when every slot is taken and no call has finished
  for more than twice a call's bound (the longest it may take when healthy: its lock waits
  and their retries, its socket timeouts): the disk or the server is not answering. The
  breaker counts it, and opens.

A call that has its turn is never abandoned (the next call would share a connection with a
thread still using it); its own waits are bounded instead.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from ..errors import BackendBusy, BackendError, BackendTimeout, BackendUnavailable, ConfigError

__all__ = ["DEFAULT_QUEUE_TIMEOUT", "CallQueue"]

T = TypeVar("T")

#: Seconds a call waits for its turn by default before it is given up (BackendBusy): under the
#: engine's default backend_timeout (2 s), with room for the call itself.
DEFAULT_QUEUE_TIMEOUT = 1.0


def _would_block() -> tuple[type[Exception], ...]:
    # anyio 4.10 (the oldest we support) lets trio's own WouldBlock out of a trio limiter's
    # acquire_nowait.
    trio = sys.modules.get("trio")
    return (anyio.WouldBlock,) if trio is None else (anyio.WouldBlock, trio.WouldBlock)


class CallQueue:
    """Runs calls in worker threads, ``slots`` at a time (see the module). ``resource`` names
    what the calls wait for and ``advice`` what to raise, in the errors; ``stuck`` says what a
    call that never finishes means (``"the disk ... is not answering"``)."""

    def __init__(self, slots: int, wait: float, *, resource: str, advice: str, stuck: str) -> None:
        if slots < 1:
            raise ConfigError(f"{resource}: at least one connection is needed, got {slots!r}")
        if not (math.isfinite(wait) and wait > 0):
            raise ConfigError(f"queue_timeout must be a number of seconds > 0, got {wait!r}")
        self.slots = slots
        self.wait = wait
        self._resource = resource
        self._advice = advice
        self._stuck = stuck
        # FIFO: the order calls arrive in is the order they start in.
        self._turns = anyio.CapacityLimiter(slots)
        # The threads the calls run in (only the holders of a turn ask for one).
        self._threads = anyio.CapacityLimiter(slots)
        self._running = 0
        # Since when no call has finished while some ran: the last finish, or the start of a
        # call that found none running.
        self._since = 0.0
        self._bound = 0.0  # the largest bound of the calls running since then
        # The calls that entered :meth:`run` and have not returned (waiting for their turn or
        # running), and what :meth:`run_last` waits on until there are none.
        self._pending = 0
        self._closing = False
        self._drained: anyio.Event | None = None

    async def run(self, func: Callable[[], T], *, bound: float, what: str) -> T:
        """``func()`` in a worker thread once it is this call's turn; ``bound`` is how long
        ``func`` may take when healthy (its own timeouts); ``what`` names it in errors.
        Refused (:class:`BackendUnavailable`) once :meth:`run_last` was called."""
        if self._closing:
            raise BackendUnavailable(
                f"{what}: the backend is closed (no more calls to {self._resource})"
            )
        self._pending += 1
        try:
            return await self._run(func, bound, what)
        finally:
            self._pending -= 1
            if self._pending == 0 and self._drained is not None:
                self._drained.set()

    async def _run(self, func: Callable[[], T], bound: float, what: str) -> T:
        try:
            self._turns.acquire_nowait()  # (no waiters, a free slot: no cancel scope)
        except Exception as exc:
            if not isinstance(exc, _would_block()):
                raise
            # At most half the time left before the caller's deadline: a call that ran past
            # it would be a timeout, which the breaker counts, for having waited.
            left = anyio.current_effective_deadline() - anyio.current_time()
            wait = min(self.wait, left / 2)
            with anyio.move_on_after(max(wait, 0.0)) as waiting:
                await self._turns.acquire()
            if waiting.cancelled_caught:
                raise self._gave_up(what, wait) from None
        try:
            if self._running == 0:
                self._since, self._bound = time.monotonic(), bound
            else:
                self._bound = max(self._bound, bound)
            self._running += 1
            return await anyio.to_thread.run_sync(func, limiter=self._threads)
        finally:
            self._running -= 1
            self._since = time.monotonic()
            if self._running == 0:
                self._bound = 0.0
            self._turns.release()

    async def run_last(self, func: Callable[[], T]) -> T:
        """``func()`` once every call queued before it has finished, however long that takes,
        even when the caller is cancelled meanwhile (closing the connections). Calls made
        from then on are refused, so nothing runs beside or after it.

        Its cost does not depend on ``slots``: it waits until no call is pending, instead of
        taking every slot for a borrower of its own (a million of them for a pool of a
        million)."""
        self._closing = True
        with anyio.CancelScope(shield=True):
            while self._pending:
                self._drained = anyio.Event()
                await self._drained.wait()
            result = await anyio.to_thread.run_sync(func, limiter=self._threads)
        return result

    def _gave_up(self, what: str, waited: float) -> BackendError:
        if self._running >= self.slots:
            quiet = time.monotonic() - self._since
            if quiet > 2 * self._bound:
                return BackendTimeout(
                    f"{what}: no call to {self._resource} has finished for {quiet:.1f} s, "
                    f"more than twice a call's {self._bound:g} s bound: {self._stuck}"
                )
        return BackendBusy(
            f"{what}: waited {max(waited, 0.0):.2g} s for {self._resource}: more calls at once "
            f"than it serves ({self._advice})"
        )

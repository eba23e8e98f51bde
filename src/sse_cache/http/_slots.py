"""The bound on streams an integration reads on without their client (its
``max_background``): one count, taken and given back in one event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


class BackgroundSlots:
    """An integration's bound on the streams read on without their client (its
    ``max_background``): finished in the background to be stored (the middleware's
    ``finish_on_disconnect``), or held for a resume window. Each holds an upstream call and
    up to two copies of ``max_entry_bytes``, and a program whose clients leave faster than
    those end would hold without bound (helper-83: 20 clients leaving at once passed 1.5 GB).
    Past it, a client that leaves is treated as without them (its answer abandoned at once,
    unless followers read it). Taken and given back in one event loop (the middleware's,
    the async transport's, the sync one's portal)."""

    __slots__ = ("bound", "taken")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.taken = 0

    def free(self) -> bool:
        """Whether one is free (:meth:`take` would take it)."""
        return self.taken < self.bound

    def take(self) -> bool:
        """Take one; False when none is free."""
        if self.taken >= self.bound:
            return False
        self.taken += 1
        return True

    def give(self) -> None:
        """Give one taken back."""
        self.taken -= 1

    async def held_for(self, window: Callable[[], Awaitable[None]]) -> None:
        """Run ``window()`` (a held stream's resume window), then give its place back."""
        try:
            await window()
        finally:
            self.give()

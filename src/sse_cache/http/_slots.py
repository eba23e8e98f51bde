"""The bound on streams an integration reads on without their client (its
``max_background``): one count, taken and given back in one event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .._logging import backend_warnings


class BackgroundSlots:
    """An integration's bound on the streams read on without their client (its
    ``max_background``): finished in the background to be stored (the middleware's
    ``finish_on_disconnect``), or held for a resume window. Each holds an upstream call and
    up to two copies of ``max_entry_bytes``, and a program whose clients leave faster than
    those end would hold without bound (helper-83: 20 clients leaving at once passed 1.5 GB).
    Past it, a client that leaves is treated as without them (its answer abandoned at once,
    unless followers read it). Taken and given back in one event loop (the middleware's,
    the async transport's, the sync one's portal). A refusal is logged (at most one warning
    per 10 s): a resume by id of a stream not held answers from the upstream, and nothing
    said why (helper-130)."""

    __slots__ = ("__weakref__", "bound", "taken")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.taken = 0

    def free(self) -> bool:
        """Whether one is free (:meth:`take` would take it); a refusal is logged."""
        if self.taken < self.bound:
            return True
        self._refused()
        return False

    def take(self) -> bool:
        """Take one; False (logged) when none is free."""
        if self.taken >= self.bound:
            self._refused()
            return False
        self.taken += 1
        return True

    def _refused(self) -> None:
        if self.bound:  # (0: none wanted, by the operator's choice)
            backend_warnings.warning(
                self,
                "background_full",
                "sse_cache: a stream whose client left is not read on (held for its resume "
                "window, or finished in the background): max_background=%d already are",
                self.bound,
            )

    def give(self) -> None:
        """Give one taken back."""
        self.taken -= 1

    async def held_for(self, window: Callable[[], Awaitable[None]]) -> None:
        """Run ``window()`` (a held stream's resume window), then give its place back."""
        try:
            await window()
        finally:
            self.give()

"""The bound on streams an integration reads on without their client (its
``max_background``): one count, taken and given back in one event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from .._logging import backend_warnings
from .._notices import BackgroundHook, Hook, Notice, emit


class BackgroundSlots:
    """An integration's bound on the streams read on without their client (its
    ``max_background``): finished in the background to be stored (the middleware's
    ``finish_on_disconnect``), or held for a resume window. Each holds an upstream call and
    up to two copies of ``max_entry_bytes``, and a program whose clients leave faster than
    those end would hold without bound (helper-83: 20 clients leaving at once passed 1.5 GB).
    Past it, a client that leaves is treated as without them (its answer abandoned at once,
    unless followers read it). Taken and given back in one event loop (the middleware's,
    the async transport's, the sync one's portal). A refusal is logged (at most one warning
    per 10 s) and counted (``sse_cache_background_refused``): a resume by id of a stream not
    held answers from the upstream, and nothing said why (helper-130)."""

    __slots__ = ("__weakref__", "bound", "hooks", "taken")

    def __init__(self, bound: int, hooks: Iterable[Hook] = ()) -> None:
        self.bound = bound
        #: Told of each refusal (a ``background_full`` notice).
        self.hooks = tuple(hooks)
        self.taken = 0
        for hook in self.hooks:
            if isinstance(hook, BackgroundHook):
                hook.watch_background(self)

    def take(self, *, tell: bool = True) -> bool:
        """Take one; False when none is free: a refusal, logged and told to the hooks (a
        ``background_full`` notice) unless ``tell`` is false (the same stream asking again)."""
        if self.taken < self.bound:
            self.taken += 1
            return True
        if self.bound and tell:  # (0: none wanted, by the operator's choice)
            emit(self.hooks, Notice(kind="background_full", key=""))
            backend_warnings.warning(
                self,
                "background_full",
                "sse_cache: a stream whose client left is not read on (held for its resume "
                "window, or finished in the background): max_background=%d already are",
                self.bound,
            )
        return False

    def give(self) -> None:
        """Give one taken back."""
        self.taken -= 1

    async def held_for(self, window: Callable[[], Awaitable[None]]) -> None:
        """Run ``window()`` (a held stream's resume window), then give its place back."""
        try:
            await window()
        finally:
            self.give()

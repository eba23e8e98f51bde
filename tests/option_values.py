"""Values the option tests of the engine (tests/engine/test_engine_options.py) and of
CacheOptions (tests/http/test_options.py) both give: hooks of each kind, and NaN."""

from __future__ import annotations

NAN = float("nan")


def metrics_hook(notice: object) -> None:
    """A plain hook: accepted."""


async def async_hook(notice: object) -> None:
    """An ``async def`` hook: refused (hooks are called, never awaited)."""


class AsyncCallable:
    """An object whose ``__call__`` is ``async def``: refused like :func:`async_hook`."""

    async def __call__(self, notice: object) -> None:
        pass

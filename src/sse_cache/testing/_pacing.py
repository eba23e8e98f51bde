"""Time between events, as an upstream spaces them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio
import anyio.lowlevel

from ..events import Event
from ._text import seeded

__all__ = ["pause", "paced"]


async def pause(seconds: float) -> None:
    """Sleep ``seconds``; at zero, still let the other tasks run."""
    if seconds > 0:
        await anyio.sleep(seconds)
    else:
        await anyio.lowlevel.checkpoint()


async def paced(
    events: Iterable[Event],
    *,
    delay: float = 0.0,
    first_delay: float | None = None,
    jitter: float = 0.0,
    seed: object = 0,
    fail_after: int | None = None,
) -> AsyncIterator[Event]:
    """Yield ``events`` like an upstream would: ``first_delay`` before the first (time to
    first token; defaults to ``delay``), then ``delay`` seconds (± ``jitter``) between
    events. ``fail_after=n`` raises :class:`ConnectionError` after ``n`` events (a cut
    stream)."""
    rng = seeded(repr(("pace", seed)).encode())
    for i, event in enumerate(events):
        if fail_after is not None and i >= fail_after:
            raise ConnectionError(f"mock upstream cut after {fail_after} events")
        wait = (first_delay if first_delay is not None else delay) if i == 0 else delay
        if jitter:
            wait = max(0.0, wait + rng.uniform(-jitter, jitter))
        await pause(wait)
        yield event

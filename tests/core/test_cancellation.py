"""sse_cache._cancellation.checked: a cancellation that the awaited call swallowed (as
``asyncio.wait_for`` does on Python 3.11 when the inner call completes as the task is
cancelled, CPython #86296) is raised again, whether the call then returns or fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sse_cache._cancellation import checked

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def swallowing(waiting: asyncio.Event, outcome: Exception | None) -> str:
    """A call that swallows the cancellation it receives, then returns or raises."""
    waiting.set()
    # Swallowed, as wait_for does; the task still counts the request.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    if outcome is not None:
        raise outcome
    return "returned"


async def cancelled_once(
    wrap: Callable[[Awaitable[str]], Awaitable[str]], outcome: Exception | None
) -> Any:
    """What a task awaiting ``wrap(swallowing(...))`` ends with when cancelled once."""
    waiting = asyncio.Event()

    async def run() -> Any:
        try:
            return await wrap(swallowing(waiting, outcome))
        except Exception as exc:  # the caller's retry loop would catch these and go on
            return exc

    task = asyncio.create_task(run())
    await waiting.wait()
    task.cancel()
    await asyncio.wait([task])
    return "cancelled" if task.cancelled() else task.result()


async def plain(call: Awaitable[str]) -> str:
    return await call


@pytest.mark.parametrize(
    "outcome", [None, ConnectionError("AUTH failed")], ids=["returns", "fails"]
)
async def test_a_swallowed_cancellation_is_raised_again(outcome: Exception | None) -> None:
    # Without the check, the task goes on as if never cancelled: it returns (or, after a
    # failure, its retry loop goes round again) and a one-shot cancellation is lost.
    lost = await cancelled_once(plain, outcome)
    assert lost == "returned" if outcome is None else lost is outcome
    assert await cancelled_once(checked, outcome) == "cancelled"


async def test_an_uncancelled_call_is_unchanged() -> None:
    assert await asyncio.create_task(checked(asyncio.sleep(0, "value"))) == "value"
    with pytest.raises(ConnectionError, match="refused"):
        await asyncio.create_task(checked(refused()))


async def refused() -> str:
    raise ConnectionError("refused")

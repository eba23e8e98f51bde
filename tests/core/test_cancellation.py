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


async def test_a_lease_drain_cancelled_once_stops_though_a_publish_swallowed_it() -> None:
    # A cross-process producer whose client left drains its upstream in a task of its own,
    # cancelled once when the program ends. The cancellation that lands in a publish to
    # Redis (in a piece's read) can be swallowed there; the drain must stop anyway, not read
    # its upstream to the end (here, 50 pieces later).
    from sse_cache.flight import Flight, LiveFlight
    from sse_cache.http._fanout import _Lease

    live: LiveFlight[bytes] = LiveFlight(Flight("k"))
    live.respond(b"head")
    waiting = asyncio.Event()
    turns = 0

    async def piece() -> bool:
        nonlocal turns
        turns += 1
        if turns == 3:
            await swallowing(waiting, None)  # the publish that swallows it
        else:
            await asyncio.sleep(0)
        live.deliver(b"data: x\n\n")
        return turns < 50

    async def abandon() -> None:
        pass

    live.hand_over(piece, abandon)
    lease = _Lease.__new__(_Lease)
    lease.lock, lease._drains = "lock", set()
    lease.drain(live)
    (task,) = lease._drains
    await waiting.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled() and turns == 3


async def in_a_redis_command(call: Awaitable[str]) -> str:
    """``call`` as the Redis backend runs each command (what redis-py's client awaits)."""
    from sse_cache.backends._redis_client import Commands

    async with Commands(object(), timeout=60)("GET"):  # type: ignore[arg-type]
        return await call


@pytest.mark.parametrize("outcome", [None, ConnectionError("reset")], ids=["returns", "fails"])
async def test_a_redis_command_that_swallowed_a_cancellation_raises_it(
    outcome: Exception | None,
) -> None:
    # A follower's asyncio.timeout fired while it looked its key up in Redis: redis-py let
    # the cancellation through, and the follower read the whole stream 3 s past its
    # timeout (helper-70: 47 followers in 160 trials).
    assert await cancelled_once(in_a_redis_command, outcome) == "cancelled"


async def test_a_redis_command_in_a_cleanup_after_a_cancellation_runs() -> None:
    # A cancellation requested before the command (a shielded cleanup while it goes on, as
    # a lead's end publishes its failure marker) is not the command's to raise.
    waiting = asyncio.Event()

    async def run() -> str:
        try:
            waiting.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return await in_a_redis_command(asyncio.sleep(0, "cleaned up"))
        return "not cancelled"

    task = asyncio.create_task(run())
    await waiting.wait()
    task.cancel()
    assert await task == "cleaned up"

"""The queue in front of SQLite's one connection (backends/_sqlite_queue.py): calls run one at
a time in arrival order, and a call that waited too long for its turn is told apart as busy
(the connection is serving others: not a failure) or stuck (the call holding it has run far
past its own bound: a disk that does not answer)."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

from sse_cache.backends import from_url
from sse_cache.backends._sqlite_queue import ConnectionQueue
from sse_cache.errors import BackendBusy, BackendTimeout, ConfigError

pytestmark = pytest.mark.anyio


async def test_calls_run_one_at_a_time_in_arrival_order() -> None:
    queue = ConnectionQueue(30)
    gate = threading.Event()
    order: list[int] = []
    inside = 0
    most = 0

    def call(n: int) -> int:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        if n == 0:
            gate.wait(30)  # holds the connection while the others queue
        order.append(n)
        inside -= 1
        return n

    results: list[int] = []

    async def run(n: int) -> None:
        results.append(await queue.run(lambda: call(n), bound=1, what="call"))

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(run, n)
            await anyio.wait_all_tasks_blocked()  # n has its turn or waits in the queue
        gate.set()
    assert order == list(range(6)) and sorted(results) == list(range(6))
    assert most == 1


@pytest.mark.parametrize(
    ("holder_bound", "expected", "message"),
    [
        # The call holding the connection is within its bound: the queue is just long.
        (60.0, BackendBusy, "waited 0.3 s for SQLite's one connection"),
        # It has run more than twice its bound: the disk is not answering.
        (0.1, BackendTimeout, "held by one call for .* more than twice its 0.1 s bound"),
    ],
)
async def test_a_call_that_waits_too_long_is_busy_or_stuck(
    holder_bound: float, expected: type[Exception], message: str
) -> None:
    queue = ConnectionQueue(0.3)
    gate = threading.Event()
    ran: list[str] = []

    async def hold() -> None:
        await queue.run(lambda: gate.wait(30), bound=holder_bound, what="holder")

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()  # the holder runs in its thread
        with pytest.raises(expected, match=message):
            await queue.run(lambda: ran.append("queued"), bound=1, what="SQLite read")
        gate.set()
    assert ran == []  # given up: never ran
    assert await queue.run(lambda: "free", bound=1, what="after") == "free"


async def test_closing_waits_for_the_queue_even_when_cancelled() -> None:
    queue = ConnectionQueue(30)
    gate = threading.Event()
    order: list[str] = []

    async def hold() -> None:
        await queue.run(lambda: (gate.wait(30), order.append("held")), bound=1, what="holder")

    async def close() -> None:
        await queue.run_last(lambda: order.append("closed"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            tg.start_soon(close)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
        gate.set()
    assert order == ["held", "closed"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
async def test_queue_timeout_is_validated(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="queue_timeout"):
        from_url(f"sqlite:///{tmp_path / 'c.db'}?queue_timeout={value}")

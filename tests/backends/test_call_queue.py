"""The queue in front of a blocking client's connections (backends/_call_queue.py: SQLite's
one, memcached's pool): calls run at most ``slots`` at once in arrival order, and a call that
waited too long for its turn is told apart as busy (the connections serve others: not a
failure) or stuck (no call has finished for more than twice a call's bound: a disk or a
server that does not answer)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from sse_cache.backends import from_url
from sse_cache.backends._call_queue import CallQueue
from sse_cache.errors import BackendBusy, BackendTimeout, BackendUnavailable, ConfigError

pytestmark = pytest.mark.anyio


def queue(slots: int, wait: float) -> CallQueue:
    return CallQueue(slots, wait, resource="the test's connections", advice="a", stuck="stuck")


@asynccontextmanager
async def held(calls: CallQueue, slots: int, bound: float) -> AsyncIterator[None]:
    """``slots`` calls of ``bound`` seconds hold their connections, each in its thread,
    until the block ends."""
    gate = threading.Event()

    async def hold() -> None:
        await calls.run(lambda: gate.wait(30), bound=bound, what="holder")

    async with anyio.create_task_group() as tg:
        for _ in range(slots):
            tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()  # every one of them runs, in its thread
        try:
            yield
        finally:
            gate.set()


@pytest.mark.parametrize("slots", [1, 3])
async def test_calls_run_at_most_slots_at_once_in_arrival_order(slots: int) -> None:
    calls = queue(slots, 30)
    gate = threading.Event()
    lock = threading.Lock()
    entered = [threading.Event() for _ in range(8)]
    started: list[int] = []
    inside = most = 0

    def call(n: int) -> int:
        nonlocal inside, most
        with lock:
            started.append(n)
            inside += 1
            most = max(most, inside)
        entered[n].set()
        gate.wait(30)  # holds its connection until the test lets every call go
        with lock:
            inside -= 1
        return n

    results: list[int] = []

    async def run(n: int) -> None:
        results.append(await calls.run(lambda: call(n), bound=1, what="call"))

    async with anyio.create_task_group() as tg:
        try:
            for n in range(8):
                tg.start_soon(run, n)
                if n < slots:  # it has a slot: it runs, in its thread
                    await anyio.to_thread.run_sync(entered[n].wait, 30)
                else:  # it waits for its turn
                    await anyio.wait_all_tasks_blocked()
            assert started == list(range(slots))  # the others wait, in order
        finally:
            gate.set()
    assert sorted(started) == sorted(results) == list(range(8))
    if slots == 1:  # one at a time: in the order they arrived (with more, threads race)
        assert started == list(range(8))
    assert most == slots


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize(
    ("holder_bound", "expected", "message"),
    [
        # The calls holding the connections are within their bound: the queue is just long.
        (60.0, BackendBusy, "waited 0.3 s for the test's connections: more calls at once"),
        # None has finished for more than twice its bound: nothing answers.
        (0.1, BackendTimeout, "no call to the test's connections has finished for .* 0.1 s"),
    ],
)
async def test_a_call_that_waits_too_long_is_busy_or_stuck(
    slots: int, holder_bound: float, expected: type[Exception], message: str
) -> None:
    calls = queue(slots, 0.3)
    ran: list[str] = []
    async with held(calls, slots, holder_bound):  # every slot is taken
        with pytest.raises(expected, match=message):
            await calls.run(lambda: ran.append("queued"), bound=1, what="SQLite read")
    assert ran == []  # given up: never ran
    assert await calls.run(lambda: "free", bound=1, what="after") == "free"


async def test_a_free_slot_means_busy_never_stuck() -> None:
    # Two slots, one held far past its bound: a call still gets the other one at once.
    calls = queue(2, 0.3)
    async with held(calls, 1, 0.01):
        assert await calls.run(lambda: "served", bound=1, what="beside") == "served"


async def test_closing_waits_for_every_running_call_even_when_cancelled() -> None:
    calls = queue(2, 30)
    gate = threading.Event()
    order: list[str] = []

    def held() -> None:
        gate.wait(30)
        order.append("held")

    async def hold() -> None:
        await calls.run(held, bound=1, what="holder")

    async def close() -> None:
        await calls.run_last(lambda: order.append("closed"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        async with anyio.create_task_group() as closing:
            closing.start_soon(close)
            await anyio.wait_all_tasks_blocked()  # the closer waits for both slots
            closing.cancel_scope.cancel()  # (the caller gives up: closing goes on)
            gate.set()
    assert order == ["held", "held", "closed"]


async def test_a_wait_leaves_the_call_half_the_callers_deadline() -> None:
    # Inside the engine's backend_timeout, a call waits at most half of what is left, so
    # that it is told busy (not counted) instead of running into the deadline (counted).
    calls = queue(1, 30)
    async with held(calls, 1, 60):
        with anyio.fail_after(5):  # a TimeoutError here: it waited into the deadline
            with pytest.raises(BackendBusy, match=r"waited 2\.\d* s"):
                await calls.run(lambda: "never", bound=1, what="lookup")


def test_at_least_one_slot() -> None:
    with pytest.raises(ConfigError, match="at least one connection"):
        queue(0, 1)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
async def test_queue_timeout_is_validated(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="queue_timeout"):
        from_url(f"sqlite:///{tmp_path / 'c.db'}?queue_timeout={value}")
    with pytest.raises(ConfigError, match="queue_timeout"):
        from_url(f"memcached://127.0.0.1:1?queue_timeout={value}")


async def test_closing_costs_the_same_whatever_the_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    # run_last took every slot for a borrower of its own: 10**7 slots (?max_pool_size=)
    # cost 90 s and 643 MiB to close. Now it waits until no call is pending, once: what it
    # borrows does not grow with the slots (the one worker thread its own call takes).
    calls = queue(10**6, 30)
    assert await calls.run(lambda: "ran", bound=1, what="before") == "ran"
    limiter_type = type(anyio.CapacityLimiter(1))
    borrowed = 0
    real = limiter_type.acquire_on_behalf_of

    async def counted(self: anyio.CapacityLimiter, borrower: object) -> None:
        nonlocal borrowed
        borrowed += 1
        await real(self, borrower)

    monkeypatch.setattr(limiter_type, "acquire_on_behalf_of", counted)
    assert await calls.run_last(lambda: "closed") == "closed"
    assert borrowed <= 1


async def test_calls_after_closing_are_refused_and_queued_ones_still_run() -> None:
    calls = queue(1, 30)
    gate = threading.Event()
    order: list[str] = []

    def held() -> None:
        gate.wait(30)
        order.append("held")

    async def close() -> None:
        await calls.run_last(lambda: order.append("closed"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: calls.run(held, bound=1, what="holder"))
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(lambda: calls.run(lambda: order.append("queued"), bound=1, what="q"))
        await anyio.wait_all_tasks_blocked()  # queued behind the holder
        tg.start_soon(close)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(BackendUnavailable, match="late: the backend is closed"):
            await calls.run(lambda: order.append("late"), bound=1, what="late")
        gate.set()
    assert order == ["held", "queued", "closed"]

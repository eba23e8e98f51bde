"""The backend breaker: the sans-IO state machine, and the engine skipping a backend that
keeps failing (against a real Redis stopped with SIGSTOP)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sse_cache import ConfigError, Entry, StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.breaker import Breaker, BreakerState
from sse_cache.engine import Notice
from sse_cache.testing import responses_stream

EVENTS = responses_stream(text_deltas=5)


def changes(breaker: Breaker) -> list[BreakerState]:
    seen: list[BreakerState] = []
    breaker.on_change = lambda state, why: seen.append(state)
    return seen


def test_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    breaker = Breaker(failures=3, cooldown=10)
    seen = changes(breaker)
    for now in (0.0, 1.0):
        assert breaker.allow(now)
        breaker.failure(now, "timeout")
    assert breaker.allow(2.0)
    breaker.success()  # a success in between: the count starts again
    for now in (3.0, 4.0, 5.0):
        assert breaker.allow(now)
        breaker.failure(now, "timeout")
    assert breaker.state is BreakerState.OPEN and seen == [BreakerState.OPEN]
    assert not breaker.allow(14.9)  # skipped during the cooldown
    assert breaker.allow(15.0)  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(15.0) and not breaker.allow(16.0)  # one probe at a time
    breaker.failure(16.0, "still down")
    assert breaker.state is BreakerState.OPEN and not breaker.allow(25.0)
    assert breaker.allow(26.0)
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow(26.0)
    assert seen == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_a_cancelled_probe_lets_the_next_caller_probe() -> None:
    breaker = Breaker(failures=1, cooldown=1)
    breaker.allow(0)
    breaker.failure(0)
    assert breaker.allow(1) and not breaker.allow(1)
    breaker.cancelled()
    assert breaker.allow(1)


def test_zero_failures_never_opens_and_bad_settings_are_refused() -> None:
    breaker = Breaker(failures=0)
    for now in range(100):
        assert breaker.allow(now)
        breaker.failure(now)
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(ConfigError, match="failures"):
        Breaker(failures=-1)
    with pytest.raises(ConfigError, match="cooldown"):
        Breaker(cooldown=0)


@given(st.lists(st.tuples(st.sampled_from(["ok", "fail", "cancel"]), st.floats(0, 5)), max_size=60))
def test_the_backend_is_called_only_when_allowed_and_never_twice_while_half_open(
    steps: list[tuple[str, float]],
) -> None:
    breaker = Breaker(failures=2, cooldown=3)
    now = 0.0
    for outcome, gap in steps:
        now += gap
        before = breaker.state
        allowed = breaker.allow(now)
        if before is BreakerState.OPEN and allowed:
            assert breaker.state is BreakerState.HALF_OPEN  # the cooldown is over: a probe
        if not allowed:
            assert breaker.state is not BreakerState.CLOSED
            continue
        if breaker.state is BreakerState.HALF_OPEN:
            assert not breaker.allow(now)  # exactly one probe
        if outcome == "ok":
            breaker.success()
            assert breaker.state is BreakerState.CLOSED
        elif outcome == "fail":
            before = breaker.state
            breaker.failure(now)
            if before is BreakerState.HALF_OPEN:
                assert breaker.state is BreakerState.OPEN
        else:
            breaker.cancelled()
            if breaker.state is BreakerState.HALF_OPEN:
                assert breaker.allow(now)  # the next caller probes instead
                breaker.cancelled()


class CountingBackend:
    """A dict backend that counts calls and can hang (as a stopped server does)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls = 0
        self.hang = False

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        if self.hang:
            await anyio.sleep_forever()
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.calls += 1
        if self.hang:
            await anyio.sleep_forever()
        self.data[key] = value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def aclose(self) -> None:
        pass


async def consume(cache: StreamCache, text: str) -> str:
    async def upstream() -> Any:
        for event in EVENTS:
            yield event

    body = {"model": "m", "input": text, "stream": True}
    async with cache.stream(cache.request(body, shared=True), upstream) as stream:
        async for _ in stream:
            pass
    return str(stream.status)


@pytest.mark.anyio
async def test_the_engine_skips_a_hung_backend_once_its_breaker_opened() -> None:
    backend = CountingBackend()
    notices: list[Notice] = []
    cache = StreamCache(
        backend,
        GenericSSE(),
        backend_timeout=0.05,
        breaker=Breaker(failures=2, cooldown=3600),
        hooks=[notices.append],
    )
    backend.hang = True
    for i in range(2):  # each lookup, and each store, times out
        assert await consume(cache, f"q{i}") == "miss"
    assert cache.breaker.state is BreakerState.OPEN
    calls = backend.calls
    for i in range(5):  # open: the backend is not asked at all (neither read nor write)
        assert await consume(cache, f"r{i}") == "miss"
    assert backend.calls == calls
    assert [n.detail for n in notices if n.kind == "breaker"] == ["open"]
    # The first request's lookup and its read before the store (is a newer entry stored?)
    # timed out: two failures, open; its store and everything since were skipped.
    assert [n.kind for n in notices if n.kind.endswith("_failed")] == [
        "read_failed",
        "read_failed",
    ]
    assert [n.kind for n in notices if n.kind == "store_skipped"] == ["store_skipped"] * 7


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stopped_redis_is_skipped_then_used_again(
    spawn_redis: Callable[..., Any],
) -> None:
    server = spawn_redis()
    notices: list[Notice] = []
    cache = StreamCache(
        f"redis://127.0.0.1:{server.port}?timeout=0.2",
        GenericSSE(),
        backend_timeout=0.3,
        breaker=Breaker(failures=2, cooldown=2.0),
        hooks=[notices.append],
    )
    try:
        assert await consume(cache, "before") == "miss"
        assert await consume(cache, "before") == "hit"
        server.pause()  # SIGSTOP: the port is open, nothing answers
        try:
            statuses = [await consume(cache, "during") for _ in range(4)]
            assert statuses == ["miss"] * 4
            assert [n.detail for n in notices if n.kind == "breaker"][:1] == ["open"]
            failed = sum(n.kind in ("read_failed", "store_failed") for n in notices)
            assert await consume(cache, "during") == "miss"
            # Skipped: no new backend failure was paid for while it is open.
            assert sum(n.kind in ("read_failed", "store_failed") for n in notices) == failed
        finally:
            server.resume()
        with anyio.fail_after(30):
            while cache.breaker.state is not BreakerState.CLOSED:
                await anyio.sleep(0.1)  # the cooldown runs out; the next call probes
                await consume(cache, "probe")
        assert await consume(cache, "after") == "miss"
        assert await consume(cache, "after") == "hit"  # the cache is used again
        assert [n.detail for n in notices if n.kind == "breaker"][-1] == "closed"
    finally:
        await cache.backend.aclose()


@pytest.mark.anyio
async def test_a_callers_bad_key_is_its_error_and_never_turns_the_cache_off() -> None:
    # A key no backend takes (not a str; a str with a lone surrogate) was logged as a
    # failed backend read and counted by the breaker: a few such calls, and every other
    # caller's correct requests went unstored for the cooldown (helper-82).
    backend = CountingBackend()
    cache = StreamCache(backend, GenericSSE(), breaker=Breaker(failures=2, cooldown=3600))
    bad_keys: list[Any] = ["k-\udc80", 5, b"k"]
    for bad in bad_keys:
        error = ValueError if isinstance(bad, str) else TypeError
        for _ in range(3):
            with pytest.raises(error):
                await cache.lookup(bad)
            with pytest.raises(error):
                await cache.store(bad, Entry(schema="generic", created_at=1.0, events=[]))
            with pytest.raises(error):
                await cache.delete(bad)
            with pytest.raises(error):
                async with cache.stream(bad, lambda: None):  # type: ignore[arg-type]
                    pass
    with pytest.raises(TypeError, match="expected a CacheRequest .* or a key"):
        cache.key({"model": "m"})  # type: ignore[arg-type]
    assert backend.calls == 0 and cache.breaker.state is BreakerState.CLOSED
    assert await consume(cache, "good") == "miss"
    assert await consume(cache, "good") == "hit"


@pytest.mark.anyio
async def test_a_store_skipped_by_the_breaker_says_so() -> None:
    # It said "the backend write failed": no write was tried (helper-82).
    backend = CountingBackend()
    cache = StreamCache(
        backend, GenericSSE(), backend_timeout=0.05, breaker=Breaker(failures=1, cooldown=3600)
    )
    backend.hang = True
    await consume(cache, "opens it")
    assert cache.breaker.state is BreakerState.OPEN

    async def upstream() -> Any:
        for event in EVENTS:
            yield event

    async with cache.stream(cache.request({"input": "skipped"}, shared=True), upstream) as stream:
        async for _ in stream:
            pass
    assert not stream.stored and "circuit breaker is open" in stream.reason


class BreakerMachine(RuleBasedStateMachine):
    """Any interleaving of calls let through, and ending as they end in production (a
    success, a failure, a cancellation; in any order, also after the state they were let
    through in has passed), against what the breaker promises: closed lets every call
    through, open lets none through for its cooldown, half-open lets one probe through at a
    time, ``failures`` failures in a row open it, a success closes it, and every transition
    is reported once, as it happens."""

    FAILURES = 3
    COOLDOWN = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.reported: list[BreakerState] = []
        self.breaker = Breaker(self.FAILURES, self.COOLDOWN)
        self.breaker.on_change = lambda state, why: self.reported.append(state)
        self.now = 0.0
        self.opened_at = 0.0
        self.in_a_row = 0  # failures since the last success or opening, while closed
        self.calls: dict[int, tuple[BreakerState, int]] = {}  # let through: in, half-open #
        self.next_call = 0
        self.half_opens = 0  # half-open periods so far
        self.stale_ended = False  # a call from before this half-open ended during it

    def _changed_to(self, before: BreakerState) -> None:
        state = self.breaker.state
        if state is not before:
            assert self.reported[-1] is state  # reported as it happened
            if state is BreakerState.OPEN:
                self.opened_at, self.in_a_row = self.now, 0
            elif state is BreakerState.HALF_OPEN:
                self.half_opens += 1
                self.stale_ended = False

    @rule(seconds=st.sampled_from([0.0, 0.5, 3.0, 9.9, 10.0, 25.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def call(self) -> None:
        before = self.breaker.state
        allowed = self.breaker.allow(self.now)
        if before is BreakerState.CLOSED:
            assert allowed
        if before is BreakerState.OPEN and self.now - self.opened_at < self.COOLDOWN:
            assert not allowed and self.breaker.state is BreakerState.OPEN
        self._changed_to(before)
        if not allowed:
            return
        state = self.breaker.state
        if state is BreakerState.HALF_OPEN and not self.stale_ended:
            probes = [c for c in self.calls.values() if c == (state, self.half_opens)]
            assert not probes, "a second probe while one is under way"
        self.calls[self.next_call] = (state, self.half_opens)
        self.next_call += 1

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), how=st.sampled_from(["success", "failure", "cancelled"]))
    def call_ends(self, data: st.DataObject, how: str) -> None:
        which = data.draw(st.sampled_from(sorted(self.calls)))
        let_in, period = self.calls.pop(which)
        if self.breaker.state is BreakerState.HALF_OPEN and (
            let_in is not BreakerState.HALF_OPEN or period != self.half_opens
        ):
            self.stale_ended = True
        before = self.breaker.state
        if how == "success":
            self.breaker.success()
            assert self.breaker.state is BreakerState.CLOSED
            self.in_a_row = 0
        elif how == "failure":
            self.breaker.failure(self.now, "boom")
            if before is BreakerState.CLOSED:
                self.in_a_row += 1
                opened = self.in_a_row >= self.FAILURES
                assert (self.breaker.state is BreakerState.OPEN) == opened
            else:  # a probe, or a call from before, failed: open for another cooldown
                assert self.breaker.state is BreakerState.OPEN
        else:
            self.breaker.cancelled()
            assert self.breaker.state is before  # says nothing about the backend
        self._changed_to(before)

    @invariant()
    def each_transition_is_reported_once(self) -> None:
        assert all(a is not b for a, b in itertools.pairwise(self.reported))
        assert (self.reported[-1] if self.reported else BreakerState.CLOSED) is self.breaker.state


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=40)

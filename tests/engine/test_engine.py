"""StreamCache: tee on a miss, replay on a hit, single-flight, and fail-open storage."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from sse_cache import CacheRequest, ConfigError, Entry, Event, MsgpackCodec, Outcome
from sse_cache.adapters import (
    GeminiGenerateContent,
    GenericSSE,
    OpenAIChat,
    OpenAIResponses,
)
from sse_cache.engine import CacheStatus, Notice, SharedStreamAborted, StreamCache
from sse_cache.http.service import CacheService
from sse_cache.keys import tenant_scope
from sse_cache.testing import paced, responses_stream

pytestmark = pytest.mark.anyio

EVENTS = responses_stream(text_deltas=30)
BODY = {"model": "m", "input": "hello", "stream": True}


class DictBackend:
    """The smallest honest backend, with switches to inject faults."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.foreign: set[str] = set()
        self.fail_get = self.fail_set = False
        self.hang = False
        self.sets = 0
        self.ttls: list[float | None] = []  # of every set, in order

    async def get(self, key: str) -> bytes | None:
        if self.hang:
            await anyio.sleep(60)
        if self.fail_get:
            raise ConnectionError("backend down")
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if self.fail_set:
            raise ConnectionError("backend down")
        self.sets += 1
        self.ttls.append(ttl)
        self.data[key] = value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def aclose(self) -> None:
        pass


class Upstream:
    """Counts calls and records whether each opened stream was closed."""

    def __init__(self, events: Sequence[Event] = EVENTS, **pacing: float | int | None) -> None:
        self.events = events
        self.pacing = pacing
        self.calls = 0
        self.closed = 0

    def __call__(self) -> AsyncIterator[Event]:
        self.calls += 1
        return self._gen()

    async def _gen(self) -> AsyncIterator[Event]:
        try:
            # aclosing: an abandoned inner generator must be closed here, not by the GC.
            async with aclosing(paced(self.events, **self.pacing)) as events:  # type: ignore[arg-type]
                async for event in events:
                    yield event
        finally:
            self.closed += 1


def wire(events: Sequence[Event]) -> list[tuple[str, str | None, str | None, int | None]]:
    return [(e.data, e.event, e.id, e.retry) for e in events]


async def consume(
    cache: StreamCache, upstream: Upstream, **kw: object
) -> tuple[object, list[Event]]:
    async with cache.stream(cache.request(BODY, shared=True), upstream, **kw) as s:  # type: ignore[arg-type]
        events = [e async for e in s]
    return s, events


async def test_miss_stores_and_hit_replays_identical_events() -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    first, events1 = await consume(cache, up)
    assert first.status is CacheStatus.MISS and first.stored  # type: ignore[attr-defined]
    second, events2 = await consume(cache, up)
    assert second.status is CacheStatus.HIT and up.calls == 1
    assert wire(events1) == wire(events2) == wire(EVENTS)
    assert second.key == first.key and len(second.key) == 64  # type: ignore[attr-defined]
    assert second.age is not None and second.age < 60  # type: ignore[attr-defined]
    ats = [e.at for e in events2]
    assert ats == sorted(ats) and ats[-1] > 0


async def test_streamed_and_non_streamed_requests_share_a_key() -> None:
    cache = StreamCache(DictBackend(), GenericSSE())
    assert cache.key(cache.request(BODY, shared=True)) == cache.key(
        cache.request({**BODY, "stream": False}, shared=True)
    )


async def test_events_are_delivered_before_the_upstream_finishes() -> None:
    cache = StreamCache(DictBackend(), GenericSSE())
    gate = anyio.Event()

    async def slow() -> AsyncIterator[Event]:
        yield Event("first")
        await gate.wait()
        yield Event("second")

    async with cache.stream(cache.request(BODY, shared=True), slow) as s:
        assert (await s.__anext__()).data == "first"  # no buffering before delivery
        gate.set()
        assert [e.data async for e in s] == ["second"]


async def test_failing_upstream_stores_nothing_and_reaches_the_caller() -> None:
    backend, up = DictBackend(), Upstream(fail_after=5)
    cache = StreamCache(backend, GenericSSE())
    got: list[Event] = []
    with pytest.raises(ConnectionError):
        async with cache.stream(cache.request(BODY, shared=True), up) as s:
            async for e in s:
                got.append(e)
    assert len(got) == 5 and backend.data == {} and up.closed == 1


async def test_reader_leaving_early_stores_nothing_and_closes_upstream() -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    async with cache.stream(cache.request(BODY, shared=True), up) as s:
        async for _ in s:
            break
    assert backend.data == {} and up.closed == 1 and not s.stored
    assert "abandoned" in s.reason
    # Nothing partial is visible: the next request is a miss again.
    again, _ = await consume(cache, up)
    assert again.status is CacheStatus.MISS  # type: ignore[attr-defined]


@pytest.mark.parametrize("outcome", ["complete", "cut"])
async def test_a_miss_leaves_no_flight_behind(outcome: str) -> None:
    # The engine hands every miss's upstream over to its flight: once the stream is over,
    # the flight is no longer listed as read on (helper-151: each clean miss's flight, its
    # entry and recording with it, stayed listed for good: ~30 KB a miss).
    up = Upstream() if outcome == "complete" else Upstream(fail_after=2)
    cache = StreamCache(DictBackend(), GenericSSE())
    for n in range(3):
        try:
            async with cache.stream(cache.request({**BODY, "n": n}, shared=True), up) as s:  # type: ignore[arg-type]
                async for _ in s:
                    pass
        except ConnectionError:
            assert outcome == "cut"
    assert up.calls == 3
    assert len(cache.live) == 0
    assert cache.live.handed_over == 0


async def test_cancelled_reader_stores_nothing_and_closes_upstream() -> None:
    backend, up = DictBackend(), Upstream(delay=0.01)
    cache = StreamCache(backend, GenericSSE())
    with anyio.move_on_after(0.05):
        await consume(cache, up)
    assert backend.data == {} and up.closed == 1 and up.calls == 1
    assert len(cache.live) == 0


async def test_oversize_stream_is_delivered_but_not_stored() -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE(), max_entry_bytes=2000)
    s, events = await consume(cache, up)
    assert wire(events) == wire(EVENTS)
    assert not s.stored and "max_entry_bytes" in s.reason  # type: ignore[attr-defined]
    assert backend.data == {}


async def test_backend_read_failure_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    await consume(cache, up)
    backend.fail_get = True
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        s, events = await consume(cache, up)
    assert s.status is CacheStatus.MISS and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]
    assert "backend read failed" in caplog.text and up.calls == 2


async def test_hung_backend_costs_a_miss_within_the_timeout() -> None:
    backend, up = DictBackend(), Upstream()
    backend.hang = True
    cache = StreamCache(backend, GenericSSE(), backend_timeout=0.05)
    with anyio.fail_after(5):
        s, events = await consume(cache, up)
    assert s.status is CacheStatus.MISS and len(events) == len(EVENTS)  # type: ignore[attr-defined]


async def test_backend_write_failure_costs_nothing_but_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, up = DictBackend(), Upstream()
    backend.fail_set = True
    cache = StreamCache(backend, GenericSSE())
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        s, events = await consume(cache, up)
    assert wire(events) == wire(EVENTS) and not s.stored  # type: ignore[attr-defined]
    assert "write failed" in s.reason and "backend write failed" in caplog.text  # type: ignore[attr-defined]


async def test_corrupt_entry_is_deleted_and_missed(caplog: pytest.LogCaptureFixture) -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    s, _ = await consume(cache, up)
    backend.data[s.key] = backend.data[s.key][:-10]  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        again, events = await consume(cache, up)
    assert again.status is CacheStatus.MISS and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]
    assert "corrupt" in caplog.text
    third, _ = await consume(cache, up)  # the miss re-stored a good entry
    assert third.status is CacheStatus.HIT  # type: ignore[attr-defined]


@pytest.mark.parametrize("reader", ["without zstandard", "smaller max_decoded_bytes"])
async def test_an_entry_another_process_can_read_is_missed_here_and_left_stored(
    reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Processes of one cache may differ: one without the optional zstandard package, one with
    # a smaller decode bound. Neither may delete what the others wrote and read.
    import sse_cache.codec

    backend, up = DictBackend(), Upstream()
    writer = StreamCache(backend, GenericSSE(), codec=MsgpackCodec(compression="zstd"))
    s, _ = await consume(writer, up)
    key, stored = s.key, backend.data[s.key]  # type: ignore[attr-defined]
    if reader == "without zstandard":
        monkeypatch.setattr(sse_cache.codec, "_zstd", None)
        codec = MsgpackCodec()
    else:
        codec = MsgpackCodec(max_decoded_bytes=1000)
    notices: list[Notice] = []
    here = StreamCache(backend, GenericSSE(), codec=codec, hooks=[notices.append])
    assert await here.lookup(key) is None
    assert await here.lookup_wire(key) is None
    assert backend.data[key] == stored
    assert {n.kind for n in notices} >= {"unreadable"} and "corrupt" not in {
        n.kind for n in notices
    }
    monkeypatch.undo()
    again, events = await consume(writer, up)
    assert again.status is CacheStatus.HIT and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]


async def test_a_value_the_backend_cannot_return_is_deleted_without_opening_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another program wrote a value of another type at the key (a SQLite text column, a
    # Redis list): the backend raises CorruptEntry. Each lookup is a miss that deletes it,
    # and however often it is asked, the breaker stays closed for every other key.
    from sse_cache import CorruptEntry

    class Foreign(DictBackend):
        async def get(self, key: str) -> bytes | None:
            if key in self.foreign:
                raise CorruptEntry("a value of another type")
            return await super().get(key)

        async def delete(self, key: str) -> None:
            self.foreign.discard(key)
            await super().delete(key)

    backend, up = Foreign(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    good, _ = await consume(cache, up)
    bad = cache.key(cache.request({**BODY, "input": "other"}, shared=True))
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        for _ in range(3 * cache.breaker.failures):
            backend.foreign = {bad}
            assert await cache.lookup(bad) is None
            assert backend.foreign == set()  # deleted
    assert "corrupt" in caplog.text
    assert cache.breaker.state.value == "closed"
    assert await cache.lookup(good.key) is not None  # type: ignore[attr-defined]


async def test_the_last_follower_of_a_silent_upstream_gives_up_after_join_timeout() -> None:
    # The producer's caller leaves; one follower reads the upstream on alone, and the upstream
    # goes silent. The follower gives up after join_timeout, as it does with company.
    joined = anyio.Event()

    def hook(notice: Notice) -> None:
        if notice.kind == "shared":
            joined.set()

    async def upstream() -> AsyncIterator[Event]:
        await joined.wait()
        for event in EVENTS[:3]:
            yield event
        await anyio.sleep_forever()
        yield EVENTS[3]

    cache = StreamCache(DictBackend(), GenericSSE(), join_timeout=0.3, hooks=[hook])
    producer_started = anyio.Event()
    outcome: list[object] = []

    async def producer() -> None:
        async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
            producer_started.set()
            async with aclosing(aiter(s)) as events:
                async for _ in events:
                    break  # leaves after one event

    async def follower() -> None:
        try:
            async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
                outcome.append(s.status)
                outcome.extend([e async for e in s])
        except SharedStreamAborted as exc:
            outcome.append(exc)

    with anyio.fail_after(30):  # (a hang guard: it hung for ever)
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await producer_started.wait()
            tg.start_soon(follower)
    assert outcome[0] is CacheStatus.SHARED
    assert isinstance(outcome[-1], SharedStreamAborted)
    assert "sent nothing for 0.3 s" in str(outcome[-1])
    assert cache.live.get(cache.key(cache.request(BODY, shared=True))) is None


async def test_entry_of_another_schema_is_not_served() -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    key = cache.key(cache.request(BODY, shared=True))
    backend.data[key] = MsgpackCodec().encode(Entry(schema="other", created_at=1.0, body=b"{}"))
    s, _ = await consume(cache, up)
    assert s.status is CacheStatus.MISS  # type: ignore[attr-defined]


async def test_callers_share_answers_only_when_they_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An integration written from the README keyed every caller alike, and answered one
    # user from another's entry (helper-156). Each tenant keys apart; no tenant keys as the
    # shared scope, "shared" included (helper-159); a request without one is shared, as it
    # was (its entries stay), and the cache says so once.
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())

    async def ask(**whose: Any) -> CacheStatus:
        async with cache.stream(cache.request(BODY, **whose), up) as s:
            assert wire([e async for e in s]) == wire(EVENTS)
        return s.status

    people = [{"tenant": "alice"}, {"tenant": "bob"}, {"tenant": "shared"}, {"shared": True}]
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert [await ask(**whose) for whose in people + people] == [CacheStatus.MISS] * 4 + [
            CacheStatus.HIT
        ] * 4
        assert not [r for r in caplog.records if "without tenant=" in r.getMessage()]
        assert [await ask(), await ask()] == [CacheStatus.HIT] * 2  # (shared=True's entry)
    (said,) = [r.getMessage() for r in caplog.records if "without tenant=" in r.getMessage()]
    assert "every caller of this cache shares its answers" in said and "shared=True" in said
    assert up.calls == 4
    fields = GenericSSE().key_fields(BODY)
    assert cache.key(cache.request(BODY, shared=True)) == cache.key(
        CacheRequest(schema="generic", route="", fields=fields)
    )
    assert cache.key(cache.request(BODY, tenant="t")) == cache.key(
        CacheRequest(schema="generic", route="", fields=fields, tenant="t")
    )
    # A request that carries no credential (tenant_scope gives "") tells no one apart: it
    # is passed through uncached, as the HTTP integrations pass it.
    anonymous = cache.request(BODY, tenant=tenant_scope({}))
    assert anonymous.uncached == "no tenant scope (the request carries no credential)"
    # ... and its key is no other request's, for a caller keying it by hand (helper-161).
    keys = {cache.key(cache.request(BODY, tenant="")) for _ in range(2)} | {cache.key(anonymous)}
    keys |= {cache.key(cache.request(BODY, tenant="x")), cache.key(cache.request(BODY))}
    assert len(keys) == 5
    assert [await ask(tenant=""), await ask(tenant="")] == [CacheStatus.BYPASS] * 2
    assert up.calls == 6


async def test_a_hook_that_raises_is_ignored_and_logged_with_its_traceback_now_and_then(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A hook that always fails wrote an error and its traceback for every notice, ~5 a miss,
    # and flooded the log (helper-156): one, then one every 10 s with a count.
    def broken(notice: Notice) -> None:
        raise RuntimeError("the hook broke")

    seen: list[Notice] = []
    cache = StreamCache(DictBackend(), GenericSSE(), hooks=[broken, seen.append])
    with caplog.at_level(logging.ERROR, logger="sse_cache"):
        for _ in range(3):
            _, events = await consume(cache, Upstream())
            assert wire(events) == wire(EVENTS)
    assert [n.kind for n in seen].count("hit") == 2  # every notice reached the other hook
    (record,) = [r for r in caplog.records if "hook" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "the hook broke" in caplog.text


async def test_request_controls() -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    s, _ = await consume(cache, up, store=False)
    assert s.status is CacheStatus.MISS and not s.stored and backend.data == {}  # type: ignore[attr-defined]
    s, _ = await consume(cache, up, lookup=False)
    assert s.status is CacheStatus.BYPASS and s.stored  # type: ignore[attr-defined]
    s, _ = await consume(cache, up, refresh=True)
    assert s.status is CacheStatus.REFRESH and s.stored and up.calls == 3  # type: ignore[attr-defined]
    s, _ = await consume(cache, up)
    assert s.status is CacheStatus.HIT  # type: ignore[attr-defined]
    s, _ = await consume(cache, up, max_age=0.0)
    assert s.status is CacheStatus.MISS  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"conversation": "conv_1"}, "continues a conversation"),
        ({"stream": "true"}, "stream"),
    ],
)
async def test_a_request_the_adapter_screens_out_bypasses_the_engine(
    extra: dict[str, Any], why: str
) -> None:
    # A Responses request continuing a conversation changes state upstream: each one must
    # reach it, none answered from (or stored as) another's stream, even released together.
    backend, up, notices = DictBackend(), Upstream(delay=0.002), []
    cache = StreamCache(backend, OpenAIResponses(), hooks=[notices.append])
    request = cache.request({**BODY, **extra}, shared=True)
    assert why in request.uncached and not cache.request(BODY, shared=True).uncached
    statuses: list[CacheStatus] = []

    async def one() -> None:
        async with cache.stream(request, up) as s:
            assert wire([e async for e in s]) == wire(EVENTS)
        statuses.append(s.status)
        assert not s.stored

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    await one()
    assert statuses == [CacheStatus.BYPASS] * 4 and up.calls == 4 and backend.data == {}
    bypasses = [n for n in notices if n.kind == "bypass"]
    assert len(bypasses) == 4 and all(why in n.detail for n in bypasses)
    assert {n.kind for n in notices} == {"bypass", "not_stored"}
    # The same request without the screened field is cached as ever.
    s, _ = await consume(cache, up)
    assert s.status is CacheStatus.MISS and s.stored  # type: ignore[attr-defined]


async def test_an_answer_being_stored_is_no_hit_for_a_request_wanting_none_so_old() -> None:
    # The producer's upstream ended and its entry is judged, not yet stored (its block is
    # still open): an identical request is answered from it — but one that asks for no
    # answer older than max_age gets what the stored copy would give it: none so old.
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    async with cache.stream(cache.request(BODY, shared=True), up) as producer:
        assert wire([e async for e in producer]) == wire(EVENTS)
        plain, _ = await consume(cache, up)
        strict, _ = await consume(cache, up, max_age=0.0)
    assert plain.status is CacheStatus.HIT  # type: ignore[attr-defined]
    assert strict.status is CacheStatus.MISS and up.calls == 2  # type: ignore[attr-defined]


async def test_ttl_is_passed_to_the_backend_and_validated() -> None:
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE(), ttl=60)
    await consume(cache, Upstream())
    await consume(cache, Upstream(), lookup=False, ttl=5)
    assert backend.ttls == [60, 5]
    with pytest.raises(ConfigError, match="ttl"):
        StreamCache(backend, GenericSSE(), ttl=-1)


async def test_single_flight_shares_one_upstream() -> None:
    backend, up = DictBackend(), Upstream(delay=0.002)
    cache = StreamCache(backend, GenericSSE())
    results: list[tuple[CacheStatus, list[Event]]] = []

    async def one() -> None:
        s, events = await consume(cache, up)
        results.append((s.status, events))  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert up.calls == 1 and backend.sets == 1
    assert sorted(status.value for status, _ in results) == ["miss", "shared", "shared", "shared"]
    assert all(wire(events) == wire(EVENTS) for _, events in results)


async def test_shared_stream_survives_the_leader_leaving() -> None:
    backend, up = DictBackend(), Upstream(delay=0.002)
    cache = StreamCache(backend, GenericSSE())
    follower: list[Event] = []
    inside, joined = anyio.Event(), anyio.Event()
    left: list[Any] = []

    async def leader() -> None:
        async with cache.stream(cache.request(BODY, shared=True), up) as s:
            await s.__anext__()
            inside.set()
            await joined.wait()
        left.append(s)  # left after one event

    async def late_follower() -> None:
        await inside.wait()
        async with cache.stream(cache.request(BODY, shared=True), up) as s:
            assert s.status is CacheStatus.SHARED
            joined.set()
            follower.extend([e async for e in s])

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        tg.start_soon(late_follower)
    assert up.calls == 1 and up.closed == 1
    assert wire(follower) == wire(EVENTS) and backend.sets == 1
    # The leader's own stream says why it knows nothing of the store (it said stored=False
    # and no reason, as if stored: helper-82).
    assert not left[0].stored and "went on for the readers following it" in left[0].reason


async def test_followers_see_the_upstream_failure() -> None:
    backend, up = DictBackend(), Upstream(delay=0.002, fail_after=10)
    cache = StreamCache(backend, GenericSSE())
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await consume(cache, up)
        except (ConnectionError, SharedStreamAborted) as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert up.calls == 1 and backend.data == {}
    assert sorted(type(e).__name__ for e in errors) == [
        "ConnectionError",
        "SharedStreamAborted",
        "SharedStreamAborted",
    ]


async def test_batches_coalesce_ready_events() -> None:
    cache = StreamCache(DictBackend(), GenericSSE())
    await consume(cache, Upstream())
    async with cache.stream(cache.request(BODY, shared=True), Upstream()) as s:
        batches = [b async for b in s.batches(max_events=50)]
    assert s.status is CacheStatus.HIT
    assert [len(b) for b in batches[:-1]] == [50] * (len(batches) - 1)
    assert wire([e for b in batches for e in b]) == wire(EVENTS)


async def test_original_pacing_replays_the_recorded_gaps() -> None:
    events = [Event(str(i)) for i in range(5)]
    cache = StreamCache(DictBackend(), GenericSSE())
    await consume(cache, Upstream(events, delay=0.05))  # recorded over ~0.2 s
    start = time.monotonic()
    s, replayed = await consume(cache, Upstream(events), pacing="original")
    assert s.status is CacheStatus.HIT and wire(replayed) == wire(events)  # type: ignore[attr-defined]
    assert time.monotonic() - start >= 0.15  # a lower bound only: the gaps were kept
    start = time.monotonic()
    await consume(cache, Upstream(events), pacing="4x")
    assert time.monotonic() - start >= 0.04


class Synthesizing(GenericSSE):
    name = "synth"

    def synthesize(self, body: bytes) -> list[Event] | None:
        return [Event(part) for part in body.decode().split()]

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        return " ".join(e.data for e in events).encode()

    def body_outcome(self, body: bytes) -> Outcome:
        return Outcome.COMPLETE


async def test_cross_mode_answers() -> None:
    backend = DictBackend()
    cache = StreamCache(backend, Synthesizing())
    key = cache.key(cache.request(BODY, shared=True))
    await cache.store(key, Entry(schema="synth", created_at=time.time(), body=b"a b c"))
    s, events = await consume(cache, Upstream())
    assert s.status is CacheStatus.HIT and [e.data for e in events] == ["a", "b", "c"]  # type: ignore[attr-defined]
    stream_entry = Entry(schema="synth", created_at=1.0, events=(Event("x"), Event("y")))
    assert cache.body_of(stream_entry) == b"x y"


async def test_hooks_see_every_step_and_cannot_break_a_stream() -> None:
    seen: list[Notice] = []

    def broken(_: Notice) -> None:
        raise RuntimeError("hook bug")

    cache = StreamCache(DictBackend(), GenericSSE(), hooks=[seen.append, broken])
    await consume(cache, Upstream())
    await consume(cache, Upstream())
    calls = [n.detail for n in seen if n.kind == "backend"]  # every backend call, timed
    # (The miss reads again before it stores: is a newer entry stored?)
    assert calls == ["get", "get", "set", "get"]
    seen = [n for n in seen if n.kind != "backend"]
    kinds = [n.kind for n in seen]
    assert kinds == ["miss", "store", "hit"]
    assert seen[1].events == len(EVENTS) and seen[1].bytes > 0
    assert seen[2].seconds >= 0


async def test_upstream_is_not_called_on_a_hit_and_closed_on_a_miss() -> None:
    up = Upstream()
    cache = StreamCache(DictBackend(), GenericSSE())
    await consume(cache, up)
    await consume(cache, up)
    assert up.calls == 1 and up.closed == 1


async def test_pushed_recording_is_stored() -> None:
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    key = cache.key(cache.request(BODY, shared=True))
    async with cache.recording(key) as live:
        live.respond(200, "text/event-stream")
        live.add(EVENTS[:10])
        live.add(EVENTS[10:])
    assert live.stored
    s, events = await consume(cache, Upstream())
    assert s.status is CacheStatus.HIT and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]


async def test_pushed_recording_that_fails_stores_nothing() -> None:
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    with pytest.raises(RuntimeError, match="producer broke"):
        async with cache.recording("k" * 64) as live:
            live.add(EVENTS[:3])
            raise RuntimeError("producer broke")
    assert backend.data == {} and not live.stored and "cut" in live.reason


@pytest.mark.parametrize(("status", "stored"), [(200, True), (500, False)])
async def test_pushed_recording_respects_status_and_no_store(status: int, stored: bool) -> None:
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    async with cache.recording("a" * 64) as live:
        live.respond(status, "text/event-stream")
        live.add(EVENTS)
    assert live.stored is stored
    async with cache.recording("b" * 64, store=False) as live:
        live.add(EVENTS)
    assert not live.stored and "no-store" in live.reason


async def test_request_during_the_store_is_a_hit_not_a_second_upstream_call() -> None:
    backend, up = DictBackend(), Upstream()
    original = backend.set
    storing = anyio.Event()
    release = anyio.Event()

    async def slow_set(key: str, value: bytes, ttl: float | None = None) -> None:
        storing.set()
        await release.wait()
        await original(key, value, ttl)

    backend.set = slow_set  # type: ignore[method-assign]
    cache = StreamCache(backend, GenericSSE())
    seen: list[CacheStatus] = []

    async def second() -> None:
        await storing.wait()  # the first stream ended and its store is under way
        s, events = await consume(cache, up)
        seen.append(s.status)  # type: ignore[attr-defined]
        assert wire(events) == wire(EVENTS)
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await consume(cache, up)
    assert seen == [CacheStatus.HIT] and up.calls == 1 and backend.sets == 1


async def test_a_late_joiner_gets_whole_batches_never_empty_ones() -> None:
    cache = StreamCache(DictBackend(), GenericSSE())
    go, produced = anyio.Event(), anyio.Event()

    async def upstream() -> AsyncIterator[Event]:
        for i in range(300):
            yield Event(str(i))
        produced.set()
        await go.wait()
        yield Event("last")

    batches: list[list[Event]] = []
    async with anyio.create_task_group() as tg:

        async def first() -> None:
            async with cache.stream("k" * 64, upstream) as s:
                async for _ in s:
                    pass

        tg.start_soon(first)
        await produced.wait()  # the first reader is waiting for the last event
        async with cache.stream("k" * 64, upstream) as joined:
            assert joined.status is CacheStatus.SHARED
            async for batch in joined.batches(256):
                batches.append(batch)
                if sum(map(len, batches)) == 300:
                    go.set()
    assert all(batches) and [e.data for b in batches for e in b] == [*map(str, range(300)), "last"]


async def test_a_silent_upstream_releases_the_readers_waiting_on_it() -> None:
    # The reader pulling the upstream is stuck in it; the other gives up after join_timeout
    # with an error (never a clean end).
    cache = StreamCache(DictBackend(), GenericSSE(), join_timeout=0.1)
    stuck = anyio.Event()

    async def upstream() -> AsyncIterator[Event]:
        yield Event("one")
        yield Event("two")
        stuck.set()
        await anyio.sleep_forever()
        yield Event("never")

    got: list[str] = []
    async with anyio.create_task_group() as tg:

        async def first() -> None:
            async with cache.stream("s" * 64, upstream) as s:
                async for _ in s:
                    pass

        tg.start_soon(first)
        await stuck.wait()  # the first reader is inside its pull
        with pytest.raises(SharedStreamAborted, match="sent nothing"):
            async with cache.stream("s" * 64, upstream) as joined:
                assert joined.status is CacheStatus.SHARED
                async for event in joined:
                    got.append(event.data)
        tg.cancel_scope.cancel()
    assert got == ["one", "two"]


# -- decoded-entry cache and instant-replay scheduling ----------------------------------------


class CountingCodec(MsgpackCodec):
    """Counts decodes, to tell a hit served from the decoded-entry cache from a decoded one."""

    def __init__(self) -> None:
        super().__init__()
        self.decodes = 0

    def decode(self, data: bytes) -> Entry:
        self.decodes += 1
        return super().decode(data)


async def test_hot_entry_is_not_decoded_again_but_changes_are_seen() -> None:
    backend, up, codec = DictBackend(), Upstream(), CountingCodec()
    cache = StreamCache(backend, GenericSSE(), codec=codec)
    await consume(cache, up)  # miss: stored
    for _ in range(3):
        s, events = await consume(cache, up)
        assert s.status == "hit" and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]
    assert codec.decodes == 1 and up.calls == 1  # decoded by the first hit only
    key = cache.key(cache.request(BODY, shared=True))

    # Another process replaces the entry: the bytes differ, so the new entry is decoded.
    other = [Event('{"other": true}', event="x")]
    backend.data[key] = MsgpackCodec().encode(
        Entry(schema="generic", created_at=time.time(), status=200,
              content_type="text/event-stream", events=tuple(other))
    )  # fmt: skip
    s, events = await consume(cache, up)
    assert wire(events) == wire(other) and codec.decodes == 2
    s, events = await consume(cache, up)
    assert wire(events) == wire(other) and codec.decodes == 2  # hot again

    # Deleted behind the cache's back: a miss, never the remembered entry.
    del backend.data[key]
    s, events = await consume(cache, up)
    assert s.status == "miss" and up.calls == 2  # type: ignore[attr-defined]


async def test_decoded_cache_respects_its_budget_and_can_be_turned_off() -> None:
    backend, up, codec = DictBackend(), Upstream(), CountingCodec()
    cache = StreamCache(backend, GenericSSE(), codec=codec, decoded_cache_bytes=0)
    await consume(cache, up)
    await consume(cache, up)
    await consume(cache, up)
    assert codec.decodes == 2 and len(cache.decoded) == 0

    small = StreamCache(DictBackend(), GenericSSE(), decoded_cache_bytes=200_000)
    for n in range(20):  # distinct requests: distinct entries of ~30 KB decoded each
        request = small.request({**BODY, "input": str(n)}, shared=True)
        async with small.stream(request, Upstream()) as s:
            [e async for e in s]
        assert s.stored
        assert await small.lookup(small.key(request)) is not None  # decoded and kept
        assert small.decoded.size <= 200_000
    assert 0 < len(small.decoded) < 20

    with pytest.raises(ConfigError, match="decoded_cache_bytes"):
        StreamCache(DictBackend(), GenericSSE(), decoded_cache_bytes=-1)
    with pytest.raises(ConfigError, match="decoded_cache_bytes"):
        CacheService(DictBackend(), decoded_cache_bytes=-1)


class FakeWallClock:
    """Stands for the ``time`` module where the engine stamps and checks expiry: ``time()``
    is what the test says, everything else is the real module's."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_expiry_applies_to_a_hot_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a fake wall clock: no real wait, and no bound on how fast the test must run.
    import sse_cache._entries

    clock = FakeWallClock(1_000_000.0)
    monkeypatch.setattr(sse_cache._entries, "time", clock)
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE(), ttl=30)  # DictBackend never expires anything
    await consume(cache, up)
    clock.now += 29.9
    s, _ = await consume(cache, up)
    assert s.status == "hit"  # type: ignore[attr-defined]  # now kept decoded (hot)
    clock.now += 0.1  # its recorded end: never served past it, hot or not
    s, _ = await consume(cache, up)
    assert s.status == "miss" and up.calls == 2  # type: ignore[attr-defined]


async def test_long_instant_replay_lets_other_tasks_run_and_can_be_cancelled() -> None:
    events = [Event(f'{{"n": {n}}}') for n in range(200_000)]  # tens of ms to replay
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    await consume(cache, Upstream(events))
    ticks: list[int] = []
    replayed = 0

    async def ticker() -> None:
        while True:
            ticks.append(replayed)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with cache.stream(cache.request(BODY, shared=True), Upstream(events)) as s:
            assert s.status == "hit"
            async for _ in s:
                replayed += 1
        tg.cancel_scope.cancel()
    # The other task ran while the replay was under way, not only before and after it.
    assert any(0 < n < len(events) for n in ticks)

    with anyio.move_on_after(0.005) as scope:
        async with cache.stream(cache.request(BODY, shared=True), Upstream(events)) as s:
            async for _ in s:
                pass
    assert scope.cancelled_caught


async def test_wire_lookup_is_kept_decoded_too() -> None:
    backend, up = DictBackend(), Upstream()
    cache = StreamCache(backend, GenericSSE())
    await consume(cache, up)
    key = cache.key(cache.request(BODY, shared=True))
    first = await cache.lookup_wire(key)
    assert first is not None and first.sse is not None
    assert await cache.lookup_wire(key) is first  # same bytes: not decoded again
    backend.data[key] = bytes(backend.data[key])  # equal bytes, another object: still kept
    assert await cache.lookup_wire(key) is first
    await cache.delete(key)
    assert await cache.lookup_wire(key) is None and len(cache.decoded) == 0


async def test_max_entry_bytes_holds_when_readers_of_one_flight_pull_in_turn() -> None:
    # Two readers share one upstream and take turns pulling it (each consumer does some
    # work per event); the size bound counts every event once, whoever pulled it.
    events = [Event("x" * 50) for _ in range(40)]  # 40 x (50 + 16) bytes > 2,000
    cache = StreamCache(DictBackend(), GenericSSE(), max_entry_bytes=2000)
    results: dict[str, tuple[str, int, bool]] = {}
    go = anyio.Event()

    async def reader(name: str, pause: float) -> None:
        await go.wait()
        async with cache.stream(
            cache.request(BODY, shared=True), Upstream(events, delay=0.002)
        ) as s:
            n = 0
            async for _ in s:
                n += 1
                await anyio.sleep(pause)  # consumers of different speeds
        results[name] = (s.status, n, s.stored)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader, "a", 0.003)
        tg.start_soon(reader, "b", 0.001)
        go.set()
    assert sorted(r[:2] for r in results.values()) == [("miss", 40), ("shared", 40)]
    assert not results["a"][2] and not results["b"][2]
    assert await cache.lookup(cache.key(cache.request(BODY, shared=True))) is None


async def test_a_failed_stream_is_not_joined_while_its_reader_is_still_inside() -> None:
    class FailingSchema(GenericSSE):
        def outcome(self, event: Event) -> Outcome:
            return Outcome.FAIL if event.event == "error" else Outcome.CONTINUE

    failed = [Event("partial"), Event('{"error": "overloaded"}', event="error")]
    cache = StreamCache(DictBackend(), FailingSchema())
    first, second = Upstream(failed), Upstream()
    async with cache.stream(cache.request(BODY, shared=True), first) as a:
        assert [e.data for e in [e async for e in a]] == ["partial", '{"error": "overloaded"}']
        # The failed stream has ended; its reader has not left yet.
        async with cache.stream(cache.request(BODY, shared=True), second) as b:
            got = [e async for e in b]
        assert b.status == "miss" and wire(got) == wire(EVENTS) and second.calls == 1
    assert not a.stored


async def test_a_complete_stream_is_a_hit_while_its_reader_is_still_inside() -> None:
    cache = StreamCache(DictBackend(), GenericSSE())
    first, second = Upstream(), Upstream()
    async with cache.stream(cache.request(BODY, shared=True), first) as a:
        [e async for e in a]
        async with cache.stream(cache.request(BODY, shared=True), second) as b:
            got = [e async for e in b]
        assert b.status == "hit" and wire(got) == wire(EVENTS) and second.calls == 0
    assert a.stored


async def test_caches_sharing_a_decoded_budget_but_not_a_codec_do_not_share_decodings() -> None:
    backend = DictBackend()
    writer = StreamCache(backend, GenericSSE(), codec=MsgpackCodec(secret=b"one"))
    await consume(writer, Upstream())
    assert (
        await writer.lookup(writer.key(writer.request(BODY, shared=True))) is not None
    )  # kept decoded
    # Same backend, same key, same budget, another secret: the entry's MAC does not verify.
    other = StreamCache(
        backend, GenericSSE(), codec=MsgpackCodec(secret=b"two"), decoded_cache_bytes=writer.decoded
    )
    assert await other.lookup(other.key(other.request(BODY, shared=True))) is None


async def test_a_cancelled_reader_does_not_break_a_shared_stream_for_the_others() -> None:
    # The first request holds after its first event, so the one that joined it is the one
    # pulling the upstream when its own client gives up: the pull it started completes for
    # the others, and the first request gets its whole stream, which is stored.
    events = [Event(str(n)) for n in range(12)]
    cache = StreamCache(DictBackend(), GenericSSE())
    pulling, gate = anyio.Event(), anyio.Event()
    calls = closed = 0

    def upstream() -> AsyncIterator[Event]:
        nonlocal calls
        calls += 1

        async def gen() -> AsyncIterator[Event]:
            nonlocal closed
            try:
                for n, event in enumerate(events):
                    if n == 1:  # the second pull (the joiner's) waits for the test
                        pulling.set()
                        await gate.wait()
                    yield event
            finally:
                closed += 1

        return gen()

    got: list[str] = []
    reading, owner_go = anyio.Event(), anyio.Event()
    joiner_scope = anyio.CancelScope()
    outcome: dict[str, object] = {}

    async def owner() -> None:
        async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
            async for event in s:
                got.append(event.data)
                if not reading.is_set():
                    reading.set()
                    await owner_go.wait()  # not pulling: the joiner pulls next
        outcome["owner"] = (s.status, s.stored)

    async def joiner() -> None:
        with joiner_scope:
            async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
                outcome["joiner"] = s.status
                async for _ in s:
                    pass
        outcome["joiner cancelled"] = joiner_scope.cancelled_caught

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(owner)
            await reading.wait()
            tg.start_soon(joiner)
            await pulling.wait()  # the joiner is inside the shared pull
            joiner_scope.cancel()  # its client gives up mid-pull
            gate.set()
            owner_go.set()
    assert outcome == {
        "owner": (CacheStatus.MISS, True),
        "joiner": CacheStatus.SHARED,
        "joiner cancelled": True,
    }
    assert got == [e.data for e in events] and calls == 1 and closed == 1


async def test_a_shared_pull_that_never_ends_is_bounded() -> None:
    # The bound is the readers' idle timeout (join_timeout).

    pulling = anyio.Event()

    async def hung() -> AsyncIterator[Event]:
        yield Event("first")
        pulling.set()
        await anyio.sleep_forever()
        yield Event("never")

    cache = StreamCache(DictBackend(), GenericSSE(), join_timeout=0.2)
    outcome: list[str] = []
    reading, joiner_left = anyio.Event(), anyio.Event()
    joiner_scope = anyio.CancelScope()

    async def owner() -> None:
        try:
            async with cache.stream(cache.request(BODY, shared=True), hung) as s:
                async for _ in s:
                    reading.set()
                    await joiner_left.wait()  # not pulling: the joiner pulls next
        except SharedStreamAborted as exc:
            outcome.append(f"owner aborted: {exc}")

    async def joiner() -> None:
        with joiner_scope:
            async with cache.stream(cache.request(BODY, shared=True), hung) as s:
                async for _ in s:
                    pass
        outcome.append("joiner left")
        joiner_left.set()

    with anyio.fail_after(30):  # a deadlock guard: without the bound it hangs for ever
        async with anyio.create_task_group() as tg:
            tg.start_soon(owner)
            await reading.wait()
            tg.start_soon(joiner)
            await pulling.wait()  # the joiner is inside the shared (shielded) pull
            joiner_scope.cancel()
    # The cancelled joiner's pull ran out its bound, failing the flight for the owner.
    assert outcome == ["joiner left", "owner aborted: the shared stream stopped: "
                       "the upstream sent nothing for 0.2 s"]  # fmt: skip


async def test_a_follower_sent_nothing_asks_the_upstream_itself_once() -> None:
    # The stream they shared failed before its first event: the reader that was pulling gets
    # the upstream's error; the one that had been sent nothing asks the upstream itself.
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    calls = 0

    def upstream() -> AsyncIterator[Event]:
        nonlocal calls
        calls += 1
        return Upstream(fail_after=0 if calls == 1 else None)()  # type: ignore[arg-type]

    go = anyio.Event()
    outcomes: list[tuple[str, object]] = []

    async def one() -> None:
        await go.wait()
        try:
            async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
                events = [e async for e in s]
            outcomes.append((s.status, wire(events) == wire(EVENTS)))
        except ConnectionError as exc:
            outcomes.append(("error", type(exc).__name__))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
        go.set()
    assert sorted(outcomes, key=str) == [("error", "ConnectionError"), ("miss", True)]
    assert calls == 2 and backend.sets == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_herd_shares_one_upstream_on_every_real_backend(backend: Any) -> None:
    # The same herd on each real backend (whose reads do yield to the event loop): released
    # together, one upstream call, every reader gets the whole stream.
    cache = StreamCache(backend, GenericSSE())
    up = Upstream(delay=0.001)
    go = anyio.Event()
    results: list[tuple[str, list[Event]]] = []

    async def one() -> None:
        await go.wait()
        s, events = await consume(cache, up)
        results.append((s.status, events))  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
        go.set()
    assert up.calls == 1
    assert sorted(status for status, _ in results) == ["miss"] + ["shared"] * 19
    assert all(wire(events) == wire(EVENTS) for _, events in results)
    again, _ = await consume(cache, up)
    assert again.status is CacheStatus.HIT  # type: ignore[attr-defined]


class GatedUpstream:
    """A class-based upstream (it survives a cancelled ``__anext__``, as queues and SDK
    wrappers do): announces when it is asked for an event, waits for a gate, records aclose."""

    def __init__(self, events: Sequence[Event], inside: anyio.Event, gate: anyio.Event) -> None:
        self.events = list(events)
        self.inside, self.gate = inside, gate
        self.closed = False

    def __aiter__(self) -> GatedUpstream:
        return self

    async def __anext__(self) -> Event:
        self.inside.set()
        await self.gate.wait()
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_follower_of_a_reader_cancelled_mid_pull_gets_each_event_once() -> None:
    # The producing reader is cancelled while it pulls alone; a follower joined meanwhile.
    # The flight fails (its upstream may be unusable), the follower — sent nothing — asks
    # its own upstream, and gets every event exactly once; the failed upstream is closed.
    cache = StreamCache(DictBackend(), GenericSSE())
    inside, gate, open_gate = anyio.Event(), anyio.Event(), anyio.Event()
    open_gate.set()
    first = GatedUpstream(EVENTS, inside, gate)
    second = GatedUpstream(EVENTS, anyio.Event(), open_gate)
    upstreams = iter([first, second])
    got: list[Event] = []
    status = ""
    async with anyio.create_task_group() as tg:
        producer_scope = anyio.CancelScope()

        async def producer() -> None:
            with producer_scope:
                async with cache.stream("p" * 64, lambda: next(upstreams)) as s:
                    async for _ in s:
                        pass

        async def follower() -> None:
            nonlocal status
            async with cache.stream("p" * 64, lambda: next(upstreams)) as s:
                got.extend([e async for e in s])
            status = s.status

        tg.start_soon(producer)
        await inside.wait()  # the producer's reader is inside its pull
        tg.start_soon(follower)
        live = cache.live.get("p" * 64)
        assert live is not None
        while len(live.flight.cursors) < 2:  # until the follower has joined
            await anyio.lowlevel.checkpoint()
        producer_scope.cancel()
    assert wire(got) == wire(EVENTS) and status == "miss"
    assert first.closed


async def test_an_adapter_that_raises_converting_an_entry_costs_a_miss_not_a_failure() -> None:
    # A stored answer of a shape the adapter did not foresee: the request that would be
    # answered from it in the other mode goes upstream (a miss), logged; it never fails.
    class Fragile(GenericSSE):
        def final_body(self, events: Sequence[Event]) -> bytes | None:
            raise TypeError("'<' not supported between instances of 'NoneType' and 'int'")

        def synthesize(self, body: bytes) -> list[Event] | None:
            raise KeyError("choices")

    cache = StreamCache(DictBackend(), Fragile())
    recorded = Entry(schema=cache.adapter.name, created_at=1.0, events=tuple(EVENTS))
    stored = Entry(schema=cache.adapter.name, created_at=1.0, body=b"{}")
    assert cache.body_of(recorded) is None
    assert cache.events_of(stored) is None
    assert cache.synthesized(b"{}") is None


def _yielding(*items: object) -> Any:
    """An upstream yielding ``items`` as they are (events or not), counting its calls."""
    calls: list[int] = []

    def upstream() -> AsyncIterator[Any]:
        calls.append(1)

        async def gen() -> AsyncIterator[Any]:
            for item in items:
                yield item

        return gen()

    upstream.calls = calls  # type: ignore[attr-defined]
    return upstream


@pytest.mark.parametrize(
    ("item", "shown"),
    [
        ("text", "str 'text'"),
        (b"x", "bytes b'x'"),
        (None, "NoneType None"),
        ({"data": "x"}, "dict"),
    ],
)
async def test_an_upstream_yielding_no_event_gets_a_type_error_naming_what_it_yielded(
    item: object, shown: str
) -> None:
    # It was a bare AttributeError: 'str' object has no attribute 'data'.
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    upstream = _yielding(Event("first"), item)
    got: list[Event] = []
    with pytest.raises(
        TypeError, match=rf"the upstream yielded {shown}.*must yield sse_cache\.Event"
    ):
        async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
            async for event in s:
                got.append(event)
    assert [e.data for e in got] == ["first"] and not s.stored and backend.sets == 0
    # The flight failed with it: the next identical request asks the upstream again.
    good = _yielding(Event("a"), Event("b"))
    again, events = await consume(cache, good)
    assert again.status is CacheStatus.MISS and [e.data for e in events] == ["a", "b"]  # type: ignore[attr-defined]
    assert good.calls == [1]


async def test_a_shared_upstream_yielding_no_event_gets_a_type_error_too() -> None:
    # With a follower, the events are pulled through the flight (not the lone reader's fast
    # path): the check is there too.
    cache = StreamCache(DictBackend(), GenericSSE())
    upstream = _yielding(Event("first"), "not an event")
    errors: list[BaseException] = []
    statuses: list[CacheStatus] = []
    first_read, joined = anyio.Event(), anyio.Event()

    async def read(leader: bool) -> None:
        try:
            async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
                statuses.append(s.status)
                if not leader:
                    joined.set()
                async for _ in s:
                    if leader and not first_read.is_set():
                        first_read.set()
                        await joined.wait()  # (not pulling while the follower joins)
        except Exception as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read, True)
            await first_read.wait()
            tg.start_soon(read, False)
    assert statuses == [CacheStatus.MISS, CacheStatus.SHARED]
    assert len(errors) == 2 and upstream.calls == [1]
    assert any(
        isinstance(e, TypeError) and "the upstream yielded str 'not an event'" in str(e)
        for e in errors
    ), errors
    assert all(isinstance(e, TypeError | SharedStreamAborted) for e in errors), errors


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (Event("ok", id=5), "event 0 has id=5, it must be a str or None"),  # type: ignore[arg-type]
        (Event("ok", retry="5"), "event 0 has retry='5', it must be an int or None"),  # type: ignore[arg-type]
    ],
)
async def test_an_event_the_codec_refuses_is_not_blamed_on_the_backend(
    event: Event, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    # It was "the backend write failed" with a store_failed warning, though the backend was
    # never called: the codec refused the entry.
    backend = DictBackend()
    notices: list[Notice] = []
    cache = StreamCache(backend, GenericSSE(), hooks=[notices.append])
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        s, events = await consume(cache, _yielding(event))
    assert events == [event] and not s.stored  # type: ignore[attr-defined]  # delivered
    assert s.reason.startswith(f"the entry could not be encoded: {why}")  # type: ignore[attr-defined]
    assert backend.sets == 0
    kinds = [n.kind for n in notices]
    assert "store_failed" not in kinds and "store" not in kinds
    assert [n.detail for n in notices if n.kind == "not_stored"] == [s.reason]  # type: ignore[attr-defined]
    assert "backend write failed" not in caplog.text
    assert "could not be encoded" in caplog.text
    # The public store says False, not an exception.
    assert not await cache.store("k", Entry(schema="generic", created_at=1.0, events=[event]))


@pytest.mark.parametrize(
    "adapter", [OpenAIResponses(), OpenAIChat(), GeminiGenerateContent(), GenericSSE()]
)
@pytest.mark.parametrize(
    ("data", "why"),
    [(b"x", "data is bytes b'x': it must be str"), (None, "data is NoneType None")],
)
async def test_an_event_whose_data_is_no_text_is_delivered_and_not_stored(
    adapter: Any, data: object, why: str
) -> None:
    # msgspec does not check an Event's fields when it is made. Such an event reached the
    # adapters' judging: a bare TypeError as the block was left, after every event was
    # delivered (Chat, Responses, Gemini), or an AttributeError mid-stream when data was None
    # (helper-158). It is delivered as it came, and nothing of its stream is stored.
    backend = DictBackend()
    cache = StreamCache(backend, adapter)
    events = [Event("first"), Event(data), Event("last")]  # type: ignore[arg-type]
    body = {**BODY, "messages": []}
    async with cache.stream(cache.request(body, shared=True), _yielding(*events)) as s:
        got = [e async for e in s]
    assert got == events and not s.stored and backend.sets == 0
    assert s.reason.startswith(f"the upstream yielded an Event whose {why}"), s.reason
    # The same through the push recording (cache.recording), whose events are added as sent.
    async with cache.recording("c" * 64) as live:
        live.add(events)
    assert live.entry is None and backend.sets == 0


async def test_a_follower_waiting_on_a_lone_pull_that_raises_is_aborted_at_once() -> None:
    # The producer pulls its upstream alone (the hot loop); a follower joins meanwhile, reads
    # what is logged and waits for the next event. The upstream then raises: the follower,
    # which holds part of the answer, must be told at once (SharedStreamAborted), not after
    # join_timeout of silence (an hour here), and never get a clean end of a cut stream.
    inside, gate = anyio.Event(), anyio.Event()

    async def upstream() -> AsyncIterator[Event]:
        yield Event("first")
        inside.set()
        await gate.wait()
        raise ConnectionError("upstream cut")
        yield Event("never")  # pragma: no cover  (makes it an async generator)

    cache = StreamCache(DictBackend(), GenericSSE(), join_timeout=3600)
    producer_got: list[str] = []
    follower_got: list[str] = []
    follower_has_first = anyio.Event()
    outcomes: dict[str, object] = {}

    async def producer() -> None:
        try:
            async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
                async for event in s:
                    producer_got.append(event.data)
        except ConnectionError as exc:
            outcomes["producer"] = exc

    async def follower() -> None:
        try:
            async with cache.stream(cache.request(BODY, shared=True), upstream) as s:
                outcomes["status"] = s.status
                async for event in s:
                    follower_got.append(event.data)
                    follower_has_first.set()
            outcomes["follower"] = "clean end"
        except SharedStreamAborted as exc:
            outcomes["follower"] = exc

    with anyio.fail_after(30):  # a deadlock guard, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await inside.wait()  # the producer's reader is pulling alone, after "first"
            tg.start_soon(follower)
            await follower_has_first.wait()  # joined, read the log, now waits for more
            gate.set()
    assert outcomes["status"] is CacheStatus.SHARED
    assert isinstance(outcomes["producer"], ConnectionError)  # the upstream's own error
    assert isinstance(outcomes["follower"], SharedStreamAborted), outcomes["follower"]
    assert producer_got == follower_got == ["first"]


async def test_a_no_store_request_is_not_joined_by_an_identical_one() -> None:
    # A no-store request (e.g. Cache-Control: no-store) must never become the producer others
    # join: they would get an answer that is never stored. Released together, in whichever
    # order they run, both ask the upstream (both "miss"); only the normal one is stored.
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    go, both_in = anyio.Event(), anyio.Event()
    statuses: dict[bool, CacheStatus] = {}
    streams: dict[bool, Any] = {}
    got: dict[bool, list[Event]] = {}
    calls = 0

    def upstream() -> AsyncIterator[Event]:
        nonlocal calls
        calls += 1

        async def gen() -> AsyncIterator[Event]:
            # Holds after the first event until both requests have their status: they are
            # in flight together, whichever came first.
            for n, event in enumerate(EVENTS):
                if n == 1:
                    await both_in.wait()
                yield event

        return gen()

    async def one(store: bool) -> None:
        await go.wait()
        async with cache.stream(cache.request(BODY, shared=True), upstream, store=store) as s:
            statuses[store] = s.status
            if len(statuses) == 2:
                both_in.set()
            got[store] = [e async for e in s]
        streams[store] = s

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, False)
            tg.start_soon(one, True)
            go.set()
    assert statuses == {False: CacheStatus.MISS, True: CacheStatus.MISS}
    assert calls == 2
    assert wire(got[False]) == wire(got[True]) == wire(EVENTS)
    assert streams[True].stored and not streams[False].stored and backend.sets == 1
    third, events = await consume(cache, Upstream())
    assert third.status is CacheStatus.HIT and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]


async def test_a_follower_that_asks_the_upstream_again_stores_its_answer() -> None:
    # The producer's upstream fails before sending anything, while a follower waits on it:
    # the follower asks the upstream itself (status "miss") and its complete answer is
    # stored like any miss's, so the next identical request is a hit.
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    inside, gate = anyio.Event(), anyio.Event()

    async def failing() -> AsyncIterator[Event]:
        inside.set()
        await gate.wait()
        raise ConnectionError("upstream refused")
        yield Event("never")  # pragma: no cover  (makes it an async generator)

    upstreams = iter([failing, Upstream()])
    results: dict[str, Any] = {}

    async def producer() -> None:
        with pytest.raises(ConnectionError):
            async with cache.stream(
                cache.request(BODY, shared=True), lambda: next(upstreams)()
            ) as s:
                [e async for e in s]

    async def follower() -> None:
        async with cache.stream(cache.request(BODY, shared=True), lambda: next(upstreams)()) as s:
            results["joined as"] = s.status
            results["events"] = [e async for e in s]
        results["stream"] = s

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await inside.wait()  # the producer is inside its first pull
            tg.start_soon(follower)
            live = cache.live.get(cache.key(cache.request(BODY, shared=True)))
            assert live is not None
            while live.followers < 1:  # until the follower has joined
                await anyio.lowlevel.checkpoint()
            gate.set()
    assert results["joined as"] is CacheStatus.SHARED
    s = results["stream"]
    assert s.status is CacheStatus.MISS and s.stored and backend.sets == 1
    assert wire(results["events"]) == wire(EVENTS)
    again, events = await consume(cache, Upstream())
    assert again.status is CacheStatus.HIT and wire(events) == wire(EVENTS)  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", ["memory://?max_bytes=4096", "sqlite:///{tmp}/c.db?max_bytes=4096"])
async def test_answers_over_the_backends_size_limit_leave_the_breaker_closed(
    tmp_path: Any, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The backend refuses a value over its max_bytes: it answered, and is fine. Counted as
    # backend failures, a burst of five large answers opened the breaker, and every stored
    # answer went upstream for its cooldown (helper-72, through the proxy on SQLite).
    from sse_cache import ValueTooLarge
    from sse_cache.backends import from_url

    backend = from_url(url.format(tmp=tmp_path))
    seen: list[Notice] = []
    cache = StreamCache(backend, GenericSSE(), hooks=[seen.append])
    try:
        small, _ = await consume(cache, Upstream())
        assert small.stored  # type: ignore[attr-defined]
        noise = secrets.token_urlsafe(12_000)  # (incompressible: over 4096 bytes stored)
        large = Entry(schema="generic", created_at=time.time(), events=(Event(noise),))
        with pytest.raises(ValueTooLarge, match="max_bytes=4096"):
            await backend.set("direct", MsgpackCodec().encode(large), None)
        with caplog.at_level(logging.WARNING, logger="sse_cache"):
            stored = [await cache.store(f"large-{i}", large) for i in range(3 * 5)]
        assert stored == [False] * 15
        assert cache.breaker.state.value == "closed"
        refused = [n for n in seen if n.kind == "not_stored" and n.key.startswith("large-")]
        assert len(refused) == 15 and "larger than max_bytes=4096" in refused[0].detail
        assert "larger than max_bytes=4096" in caplog.text
        assert await cache.lookup(small.key) is not None  # type: ignore[attr-defined]
    finally:
        await backend.aclose()


def _fill_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used + 2 * 1024 * 1024))
        junk = b"x" * 100_000
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(1000):
                client.set(f"junk-{i}", junk)
    finally:
        client.close()


def _fill_memcached(address: str) -> None:
    from pymemcache.client.base import Client
    from pymemcache.exceptions import MemcacheServerError

    host, port = address.split(":")
    client = Client((host, int(port)))
    try:
        with pytest.raises(MemcacheServerError, match="out of memory"):
            for i in range(1000):
                client.set(f"junk-{i}", b"x" * 100_000, noreply=False)
    finally:
        client.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the Redis backend's loop)
@pytest.mark.parametrize("kind", ["redis", "memcached", "sqlite"])
async def test_a_full_backend_still_answers_what_it_holds(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A backend that refuses writes because it is full (Redis at maxmemory with noeviction,
    # memcached -M out of memory, SQLite's disk full) still reads: its refusals counted as
    # failures opened the breaker after five stores, and every stored answer went upstream
    # for the cooldown, again after each probe (helper-94).
    from servers import MemcachedServer, RedisServer, require_binary
    from sse_cache import BackendFull
    from sse_cache.backends import _sqlite_file as sqlite_file
    from sse_cache.backends import from_url

    server: Any = None
    if kind == "redis":
        server = RedisServer(require_binary("redis-server", "redis-server"))
        server.start()
        url = server.url
    elif kind == "memcached":
        binary = require_binary("memcached", "memcached")
        server = MemcachedServer(binary, memory_mb=8, options=["-M"])
        server.start()
        url = f"memcached://{server.address}"
    else:
        # SQLite's own "database or disk is full" (SQLITE_FULL), from a page limit set on
        # the backend's connection as it is opened (a full disk needs a small filesystem).
        real = sqlite_file.initialise

        def limited(conn: Any, **kw: Any) -> None:
            real(conn, **kw)
            conn.execute("PRAGMA max_page_count = 400")  # 400 x 4 KiB

        monkeypatch.setattr(sqlite_file, "initialise", limited)
        url = f"sqlite:///{tmp_path / 'c.db'}?near_cache=0"
    backend = from_url(url)
    seen: list[Notice] = []
    cache = StreamCache(backend, GenericSSE(), hooks=[seen.append])
    try:
        small, _ = await consume(cache, Upstream())
        assert small.stored  # type: ignore[attr-defined]
        noise = secrets.token_urlsafe(200_000)  # (incompressible)
        large = Entry(schema="generic", created_at=time.time(), events=(Event(noise),))
        if kind == "redis":
            await anyio.to_thread.run_sync(_fill_redis, url)
        elif kind == "memcached":
            await anyio.to_thread.run_sync(_fill_memcached, server.address)
        with pytest.raises(BackendFull, match="full"):
            for i in range(100):  # (SQLite: until its pages are used up)
                await backend.set(f"direct-{i}", MsgpackCodec().encode(large), None)
        with caplog.at_level(logging.WARNING, logger="sse_cache"):
            stored = [await cache.store(f"large-{i}", large) for i in range(3 * 5)]
        assert stored == [False] * 15
        assert cache.breaker.state.value == "closed"
        refused = [n for n in seen if n.kind == "not_stored" and n.key.startswith("large-")]
        assert len(refused) == 15 and "full" in refused[0].detail
        assert await cache.lookup(small.key) is not None  # type: ignore[attr-defined]
    finally:
        await backend.aclose()
        if server is not None:
            server.cleanup()


def _follow(replica_url: str, primary_url: str) -> None:
    # Make the server at ``replica_url`` a replica of the primary, and wait until it holds
    # what the primary does (a condition, not a time: replication is asynchronous).
    import redis

    primary, replica = redis.Redis.from_url(primary_url), redis.Redis.from_url(replica_url)
    try:
        host, port = (
            primary.connection_pool.connection_kwargs["host"],
            primary.connection_pool.connection_kwargs["port"],
        )
        replica.execute_command("REPLICAOF", host, str(port))
        deadline = time.monotonic() + 30  # a deadlock guard
        while replica.info("replication").get("master_link_status") != "up" or sorted(
            replica.keys()
        ) != sorted(primary.keys()):
            assert time.monotonic() < deadline, "the replica never caught up"
            time.sleep(0.01)
    finally:
        primary.close()
        replica.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (the Redis backend's loop)
@pytest.mark.parametrize("kind", ["redis", "sqlite"])
async def test_a_read_only_backend_still_answers_what_it_holds(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A backend this process may only read (a Redis replica after a failover or a wrong
    # URL; an SQLite file owned by another user, which SQLite opens read-only) refused every
    # store as an error: counted by the breaker, five of them turned the whole cache off,
    # its reads too, and every stored answer went upstream for the cooldown.
    from servers import RedisServer, require_binary
    from sse_cache import BackendReadOnly
    from sse_cache.backends import _sqlite_file as sqlite_file
    from sse_cache.backends import from_url

    servers: list[Any] = []
    writer: Any = None
    if kind == "redis":
        binary = require_binary("redis-server", "redis-server")
        servers = [RedisServer(binary), RedisServer(binary)]
        for server in servers:
            server.start()
        writer = from_url(servers[0].url)
        url = servers[1].url
    else:
        # SQLite's own "attempt to write a readonly database" (SQLITE_READONLY), from a
        # pragma set on the backend's connection as it is opened; the file's permissions
        # are tested apart (test_backend_sqlite: root ignores them).
        real = sqlite_file.initialise
        read_only = False

        def limited(conn: Any, **kw: Any) -> None:
            real(conn, **kw)
            if read_only:
                conn.execute("PRAGMA query_only = 1")

        monkeypatch.setattr(sqlite_file, "initialise", limited)
        url = f"sqlite:///{tmp_path / 'c.db'}?near_cache=0"
        writer = from_url(url)
    seen: list[Notice] = []
    try:
        small, _ = await consume(StreamCache(writer, GenericSSE()), Upstream())
        assert small.stored  # type: ignore[attr-defined]
        if kind == "redis":
            await anyio.to_thread.run_sync(_follow, url, servers[0].url)
        else:
            read_only = True
        backend = from_url(url)
        cache = StreamCache(backend, GenericSSE(), hooks=[seen.append])
        try:
            entry = Entry(schema="generic", created_at=time.time(), events=(Event("x"),))
            with pytest.raises(BackendReadOnly, match="read-only"):
                await backend.set("direct", MsgpackCodec().encode(entry), None)
            with caplog.at_level(logging.WARNING, logger="sse_cache"):
                stored = [await cache.store(f"new-{i}", entry) for i in range(3 * 5)]
            assert stored == [False] * 15
            assert cache.breaker.state.value == "closed"
            refused = [n for n in seen if n.kind == "not_stored" and n.key.startswith("new-")]
            assert len(refused) == 15 and "read-only" in refused[0].detail
            assert await cache.lookup(small.key) is not None  # type: ignore[attr-defined]
        finally:
            await backend.aclose()
    finally:
        await writer.aclose()
        for server in servers:
            server.cleanup()


async def test_a_miss_iterated_after_its_block_was_left_says_so() -> None:
    # It raised SharedStreamAborted, "every reader left": nothing was shared (helper-82).
    cache = StreamCache(DictBackend(), GenericSSE())
    async with cache.stream(cache.request(BODY, shared=True), Upstream()) as s:
        assert s.status is CacheStatus.MISS
    with pytest.raises(RuntimeError, match="block was left: iterate it inside"):
        async for _ in s:
            pass


async def test_a_refresh_is_not_undone_by_an_older_identical_answer_still_streaming() -> None:
    # An operator refreshes an entry to evict a bad answer; a request begun before the
    # refresh, still streaming when it ends, stored its answer over the refreshed one, for
    # the entry's whole lifetime, with nothing to say so (helper-89).
    backend = DictBackend()
    cache = StreamCache(backend, GenericSSE())
    old = responses_stream("from the bad minute", text_deltas=3)
    new = responses_stream("refreshed", text_deltas=3)
    gate, streaming = anyio.Event(), anyio.Event()

    async def slow_upstream() -> AsyncIterator[Event]:
        yield old[0]
        streaming.set()
        await gate.wait()
        for event in old[1:]:
            yield event

    async def fast_upstream() -> AsyncIterator[Event]:
        for event in new:
            yield event

    outcome: list[Any] = []

    async def older() -> None:
        async with cache.stream(cache.request(BODY, shared=True), slow_upstream) as s:
            got = [e async for e in s]
        outcome.append((s, got))

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(older)
            await streaming.wait()
            async with cache.stream(
                cache.request(BODY, shared=True), fast_upstream, refresh=True
            ) as r:
                assert [e async for e in r] == list(new)
            assert r.status is CacheStatus.REFRESH and r.stored
            gate.set()
    ((s, got),) = outcome
    assert wire(got) == wire(old)  # its own client got its whole answer ...
    assert s.status is CacheStatus.MISS and not s.stored  # ... not stored over the refresh
    assert "refresh" in s.reason
    hit, replayed = await consume(cache, Upstream())
    assert hit.status is CacheStatus.HIT and wire(replayed) == wire(new)  # type: ignore[attr-defined]
    # A request begun after the refresh stores as ever.
    later, _ = await consume(cache, Upstream(old), refresh=True)
    assert later.stored  # type: ignore[attr-defined]


async def test_a_follower_that_takes_over_stores_with_its_own_ttl() -> None:
    # The producer's upstream fails before its first event; its follower goes round the
    # lookup order again and produces: its answer was stored without the ttl it asked for
    # (helper-89: never expiring).
    backend = DictBackend()
    joined, followed = anyio.Event(), anyio.Event()

    def hook(notice: Notice) -> None:
        if notice.kind == "shared":
            joined.set()

    cache = StreamCache(backend, GenericSSE(), hooks=[hook])

    async def failing() -> AsyncIterator[Event]:
        await followed.wait()
        raise RuntimeError("the upstream failed before its first event")
        yield EVENTS[0]  # pragma: no cover

    async def producer() -> None:
        with pytest.raises(RuntimeError):
            async with cache.stream(cache.request(BODY, shared=True), failing, ttl=600) as s:
                [e async for e in s]

    statuses: list[object] = []

    async def follower() -> None:
        async with cache.stream(cache.request(BODY, shared=True), Upstream(), ttl=7) as s:
            statuses.append(s.status)
            followed.set()
            [e async for e in s]
        statuses.append(s.status)
        assert s.stored

    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(follower)
            await joined.wait()
    assert statuses == [CacheStatus.SHARED, CacheStatus.MISS]
    assert backend.ttls == [7]

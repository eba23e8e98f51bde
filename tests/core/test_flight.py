"""Single-flight: the sans-IO :class:`Flight` and the :class:`Flights` registry as a hypothesis
state machine (no event loop), then a few examples of the async shell :class:`LiveFlight`."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sse_cache.flight import (
    DEFAULT_MAX_LOG_BYTES,
    Cursor,
    Flight,
    Flights,
    Head,
    LiveFlight,
    Phase,
    SharedStreamAborted,
)

KEY = "k"
HEAD = Head(200, [("content-type", "text/event-stream")])
DONE = (Phase.ENDED, Phase.FAILED)
#: How long a reader waits for a piece before giving up: generous, only ever a lower bound.
IDLE = 30.0


# -- the sans-IO state machine ------------------------------------------------------------


class Reader:
    """A follower, as the model sees it."""

    def __init__(self, flow: Flow, cursor: Cursor) -> None:
        self.flow = flow
        self.cursor = cursor
        self.got = bytearray()
        self.pieces = 0  # how many of the producer's pieces it read
        self.attached = True
        self.cut = False  # the model's view: fell more than max_lag_bytes behind


class Flow:
    """One flight for the key, as the model sees it: what its producer did."""

    def __init__(self, live: LiveFlight[bytes]) -> None:
        self.live = live
        self.flight = live.flight
        self.phase = Phase.WAITING
        self.sent = bytearray()  # the bytes the producer's client received
        self.ends: list[int] = []  # where each piece the producer delivered ends in them
        self.producer_reading = True
        self.overflowed = False
        self.closed = False  # the producer's exchange is over: it acts on it no more
        # Its upstream was handed over (LiveFlight.hand_over): its followers pull it, also
        # after the producer's exchange is over (a cross-process follower's local readers).
        self.source = False
        self.readers: list[Reader] = []
        self.settling = False
        self.abandoned = 0
        # What its LiveFlight.keep answers once asked (None: none was given, or asked).
        self.kept: bool | None = None

    @property
    def upstream_open(self) -> bool:
        """Its upstream may still send: the producer is there, or a source is handed over."""
        if self.settling:
            return False
        return not self.closed or (self.source and self.phase not in DONE)

    @property
    def attached(self) -> list[Reader]:
        return [r for r in self.readers if r.attached]

    @property
    def joinable(self) -> bool:
        # Closed by its producer (after the store), a flight takes no newcomer either: the
        # log then keeps only what its followers still need.
        return self.phase is not Phase.FAILED and not self.overflowed and not self.closed


def producing_in(*phases: Phase) -> Callable[[FlightMachine], bool]:
    """A precondition: some flight whose upstream may still send is in one of ``phases``."""

    def can(machine: FlightMachine) -> bool:
        return any(f.upstream_open and f.phase in phases for f in machine.flows)

    return can


class FlightMachine(RuleBasedStateMachine):
    """Requests for one key arrive, the producer's upstream answers, is cut, ends; followers
    read and leave; the producer's client leaves; the exchange closes."""

    def __init__(self) -> None:
        super().__init__()
        self.flights = Flights()
        self.flows: list[Flow] = []
        self.readers: list[Reader] = []
        self.registered: Flow | None = None
        self.max_log = DEFAULT_MAX_LOG_BYTES
        self.max_lag = DEFAULT_MAX_LOG_BYTES

    @initialize(
        max_log=st.sampled_from([0, 1, 6, 12, 30, DEFAULT_MAX_LOG_BYTES]),
        max_lag=st.sampled_from([None, 0, 3, 10, 40, DEFAULT_MAX_LOG_BYTES]),
    )
    def bounds(self, max_log: int, max_lag: int | None) -> None:
        self.max_log = max_log
        self.max_lag = max_log if max_lag is None else max_lag

    # -- helpers ----------------------------------------------------------------------------

    def _unregister(self, flow: Flow) -> None:
        if self.registered is flow:
            self.registered = None

    def _failed(self, flow: Flow) -> None:
        # LiveFlight.fail: a flight that is not done fails; either way it is offered no more.
        if flow.phase not in DONE:
            flow.phase = Phase.FAILED
            flow.source = False  # nothing more is read from it
        self._unregister(flow)

    def _producing(self, data: st.DataObject, *phases: Phase) -> Flow:
        # A flight whose upstream may still send, in the first of ``phases`` that has one,
        # newest first (it shrinks towards the live one).
        producing = [f for f in reversed(self.flows) if f.upstream_open]
        for phase in phases:
            if in_phase := [f for f in producing if f.phase is phase]:
                return data.draw(st.sampled_from(in_phase))
        return data.draw(st.sampled_from(producing))

    def _reader(self, data: st.DataObject) -> Reader:
        return data.draw(st.sampled_from([r for r in reversed(self.readers) if r.attached]))

    def _has_producer(self) -> bool:
        return any(f.upstream_open for f in self.flows)

    def _can_hand_over(self) -> bool:
        return any(not f.closed and not f.source and f.phase not in DONE for f in self.flows)

    def _has_reader(self) -> bool:
        return any(r.attached for r in self.readers)

    def _leave(self, reader: Reader) -> None:
        # LiveFlight.leave (its own event loop: the machine has none): the last reader to
        # leave a flight that is not done fails it (its upstream is abandoned) — unless the
        # stream is whole, which whoever made it so ends (helper-152).
        flow = reader.flow
        abandoned = flow.abandoned
        anyio.run(flow.live.leave, reader.cursor)
        reader.attached = False
        if not flow.producer_reading and not flow.attached and flow.phase not in DONE:
            if flow.settling:
                return  # whole: its settler ends it (release_followers)
            kept, flow.kept = flow.kept, None
            if kept and not flow.source:
                # Read on by its integration (helper-166): joinable, as if its producer
                # read it, and nothing abandoned.
                flow.producer_reading = True
                assert flow.live.flight.producer_reading and flow.abandoned == abandoned
                return
            self._failed(flow)

    # -- requests ---------------------------------------------------------------------------

    @rule()
    def arrive(self) -> None:
        before = self.registered
        live, cursor = self.flights.claim(KEY, max_log_bytes=self.max_log)
        if cursor is None:
            # One upstream call per flight: a new producer only when no flight for the key
            # can be followed (none registered, or it failed / outgrew its log).
            assert before is None, f"a second producer while {before.phase} is live"
            assert live.flight.phase is Phase.WAITING and not live.flight.cursors
            live.flight.max_lag_bytes = self.max_lag
            flow = Flow(live)
            self.flows.append(flow)
            self.registered = flow
        else:
            assert before is not None and live is before.live
            assert before.joinable
            reader = Reader(before, cursor)
            before.readers.append(reader)
            self.readers.append(reader)

    # -- the producer's upstream --------------------------------------------------------------

    @precondition(producing_in(Phase.WAITING))
    @rule(data=st.data())
    def upstream_head(self, data: st.DataObject) -> None:
        self._respond(self._producing(data, Phase.WAITING))

    def _respond(self, flow: Flow) -> None:
        flow.live.respond(HEAD)
        if flow.phase is Phase.WAITING:
            flow.phase = Phase.STREAMING
            assert flow.flight.head == HEAD

    # The first chunk comes with the head. Late chunks (after the end or a failure) happen
    # too: they must change nothing.
    @precondition(_has_producer)
    @rule(data=st.data(), chunks=st.lists(st.binary(max_size=6), min_size=1, max_size=3))
    def upstream_chunks(self, data: st.DataObject, chunks: list[bytes]) -> None:
        flow = self._producing(data, Phase.STREAMING, Phase.WAITING)
        if flow.phase is Phase.WAITING:
            self._respond(flow)
        for chunk in chunks:
            flow.live.deliver(chunk)
            if flow.phase is not Phase.STREAMING:
                continue
            flow.sent += chunk
            flow.ends.append(len(flow.sent))
            if len(flow.sent) > self.max_log:
                flow.overflowed = True
                self._unregister(flow)
            for reader in flow.attached:
                # Behind by more than the bound past the oldest piece it has not read.
                unread = flow.ends[reader.pieces :]
                if unread and len(flow.sent) - unread[0] > self.max_lag:
                    reader.cut = True

    @precondition(producing_in(Phase.STREAMING))
    @rule(data=st.data())
    def upstream_end(self, data: st.DataObject) -> None:
        flow = self._producing(data, Phase.STREAMING)
        flow.live.end()
        if flow.phase is Phase.STREAMING:
            flow.phase = Phase.ENDED

    @precondition(_can_hand_over)
    @rule(data=st.data())
    def producer_hands_over(self, data: st.DataObject) -> None:
        # The producer hands its upstream to the followers (the engine does at once). The
        # machine has no event loop: the source is only ever looked at, never awaited; its
        # pulls are upstream_chunks and upstream_end.
        flow = data.draw(
            st.sampled_from(
                [f for f in self.flows if not f.closed and not f.source and f.phase not in DONE]
            )
        )

        async def source() -> bool:  # pragma: no cover  (never awaited here)
            raise AssertionError("the sans-IO machine never pulls")

        async def abandon() -> None:
            assert not flow.settling, "a whole stream's upstream was abandoned"
            flow.abandoned += 1

        flow.live.hand_over(source, abandon)
        flow.source = True

    @precondition(_has_producer)
    @rule(data=st.data())
    def producer_side_stops(self, data: st.DataObject) -> None:
        # One rule for every way the producer's side stops, so that streams live long
        # enough (rules are drawn uniformly) to outgrow their log and cut slow followers.
        flow = self._producing(data)
        if flow.closed:
            # A handed-over upstream its followers pull after the exchange is over: it can
            # only break.
            flow.live.fail("the upstream was cut")
            self._failed(flow)
            return
        how = data.draw(
            st.sampled_from(
                [
                    *(["the client left"] if flow.producer_reading else []),
                    "the exchange closed",
                    "the exchange closed, keeping its readers",
                    "the upstream was cut",
                    "the producer was cancelled",
                    "the producer's process died",
                ]
            ),
            label="how",
        )
        if how == "the client left":
            keep_reading = flow.live.producer_left()
            assert keep_reading is bool(flow.attached)
            flow.producer_reading = False
            if not keep_reading and flow.phase not in DONE:
                self._failed(flow)
            elif keep_reading:
                # The integration may read it on itself once its last follower leaves (a
                # background completion: LiveFlight.keep), or not, or not be asked.
                kept = data.draw(st.sampled_from([None, True, False]), label="keep")
                if kept is not None:
                    asked: list[bool] = []

                    def keep() -> bool:
                        assert not asked, "keep was asked twice"
                        asked.append(True)
                        return kept

                    flow.live.keep = keep
                    flow.kept = kept
        elif how == "the exchange closed":
            flow.live.close()
            self._failed(flow)  # not done: it failed; done: it is offered no more
            flow.closed = True
        elif how == "the exchange closed, keeping its readers":
            # A follower process's exchange (HTTP service): its local readers go on only
            # while a handed-over source still feeds them. Readers of a flight nothing
            # feeds any more must fail now, not wait out their idle timeout; and a source
            # no one here reads is not kept either.
            flow.live.close(keep_readers=True)
            if flow.source and flow.attached and flow.phase not in DONE:
                self._unregister(flow)  # goes on for its readers, offered to no one new
            else:
                self._failed(flow)
            flow.closed = True
        else:
            flow.live.fail(how)
            self._failed(flow)

    @precondition(producing_in(Phase.ENDED))
    @rule(data=st.data())
    def store_fails(self, data: st.DataObject) -> None:
        # The stream ended cleanly but could not be stored: the producer closes its exchange.
        # Its readers must still get every byte and a clean end (checked as they read).
        flow = data.draw(
            st.sampled_from([f for f in self.flows if f.phase is Phase.ENDED and not f.closed])
        )
        flow.live.close()
        assert flow.flight.phase is Phase.ENDED
        self._unregister(flow)
        flow.closed = True

    @precondition(producing_in(Phase.STREAMING))
    @rule(data=st.data())
    def stream_whole(self, data: st.DataObject) -> None:
        # ResponseTee._end_followers: the upstream ended (or the answer is complete); the
        # followers' end waits for the store.
        flow = self._producing(data, Phase.STREAMING)
        flow.live.settling = True
        flow.settling = True

    @precondition(lambda m: any(f.settling and f.phase is Phase.STREAMING for f in m.flows))
    @rule(data=st.data())
    def stored_then_released(self, data: st.DataObject) -> None:
        # The exchange left: the answer stored, the followers' streams end (release_followers).
        whole = [f for f in self.flows if f.settling and f.phase is Phase.STREAMING]
        flow = data.draw(st.sampled_from(whole))
        flow.live.end()
        flow.phase = Phase.ENDED

    @invariant()
    def a_whole_stream_never_fails(self) -> None:
        for flow in self.flows:
            if flow.settling:
                assert flow.flight.phase is not Phase.FAILED

    # -- followers --------------------------------------------------------------------------

    @precondition(_has_reader)
    @rule(data=st.data())
    def follower_reads(self, data: st.DataObject) -> None:
        # As LiveFlight.batches does: read what is there, until nothing is; then the state.
        reader = self._reader(data)
        flow, flight = reader.flow, reader.flow.flight
        while chunks := flight.read(reader.cursor):
            assert not reader.cut, "a cut follower is sent nothing more"
            reader.got += b"".join(chunks)
            reader.pieces += len(chunks)
            assert flow.sent.startswith(reader.got)
        phase = flight.state(reader.cursor)
        if phase is Phase.ENDED:
            assert flow.phase is Phase.ENDED and not reader.cut
            assert reader.got == flow.sent, "a clean end without every byte"
        if reader.cut:
            assert phase is Phase.FAILED
        else:
            # An uncut follower loses nothing, and sees how the flight stands.
            assert reader.got == flow.sent
            assert phase is flow.phase
        if phase in DONE:
            self._leave(reader)  # a reader whose stream ended or failed is done

    @precondition(_has_reader)
    @rule(data=st.data())
    def follower_leaves(self, data: st.DataObject) -> None:
        self._leave(self._reader(data))

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def registry_offers_only_the_live_flight(self) -> None:
        expected = None if self.registered is None else self.registered.live
        assert self.flights.get(KEY) is expected

    @invariant()
    def flights_are_where_the_model_says(self) -> None:
        for flow in self.flows:
            assert flow.flight.phase is flow.phase
            assert flow.flight.joinable is flow.joinable

    @invariant()
    def unjoinable_flights_take_no_follower(self) -> None:
        for flow in self.flows:
            if not flow.joinable:
                assert flow.flight.follow() is None

    @invariant()
    def readers_hold_a_prefix_of_the_producers_bytes(self) -> None:
        for reader in self.readers:
            assert reader.flow.sent.startswith(reader.got)

    @invariant()
    def slow_followers_are_cut(self) -> None:
        for reader in self.readers:
            if reader.attached:
                assert bool(reader.cursor.cut) is reader.cut
                if reader.cut:
                    assert reader.flow.flight.state(reader.cursor) is Phase.FAILED

    @invariant()
    def logs_keep_what_followers_need_and_no_more(self) -> None:
        for flow in self.flows:
            kept = sum(len(chunk) for chunk in flow.flight.chunks)
            if flow is self.registered:  # offered: a new follower starts from the first byte
                assert kept == len(flow.sent)
                continue
            uncut = [r for r in flow.attached if not r.cut]
            needed = len(flow.sent) - min(len(r.got) for r in uncut) if uncut else 0
            assert kept >= needed, "a follower's next bytes were dropped"
            if not flow.joinable:
                assert kept <= needed, "an unjoinable flight keeps what no follower needs"

    @invariant()
    def sources_are_where_the_model_says(self) -> None:
        for flow in self.flows:
            if flow.phase not in DONE:
                assert (flow.live.source is not None) is flow.source

    @invariant()
    def handed_over_flights_are_listed_until_they_are_over(self) -> None:
        # (What a closing transport ends: one left listed was kept for ever, its log and
        # entry with it.)
        over = [f for f in self.flows if f.source and f.phase not in DONE]
        assert self.flights.handed_over == len(over)

    @invariant()
    def wanted_while_someone_reads(self) -> None:
        for flow in self.flows:
            assert flow.flight.wanted is (flow.producer_reading or bool(flow.attached))


FlightMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestFlightMachine = FlightMachine.TestCase


# -- the bounds, at their edges ----------------------------------------------------------


def test_a_follower_exactly_max_lag_bytes_behind_is_not_cut() -> None:
    flight: Flight[bytes] = Flight(KEY, max_log_bytes=100, max_lag_bytes=4)
    flight.respond(HEAD)
    cursor = flight.follow()
    assert cursor is not None
    flight.deliver(b"12")
    assert flight.read(cursor) == [b"12"]
    for piece in (b"3", b"4", b"5", b"6", b"7"):
        flight.deliver(piece)  # past the oldest unread piece ("3"): at most 4 bytes
    assert not cursor.cut
    flight.deliver(b"8")  # 5 past it: one byte more than it may lag
    assert cursor.cut and flight.read(cursor) == [] and flight.state(cursor) is Phase.FAILED
    flight.end()
    assert flight.state(cursor) is Phase.FAILED  # never a clean end


def test_one_piece_larger_than_the_lag_bound_cuts_no_follower_that_had_the_rest() -> None:
    # An upstream's burst (the proxy forwards up to ~320 KiB at once), or several events
    # parsed from one read and delivered before the follower could run, larger than the
    # bound: a follower that had everything before it is not behind.
    flight: Flight[bytes] = Flight(KEY, max_log_bytes=4, max_lag_bytes=4)
    flight.respond(HEAD)
    cursor = flight.follow()
    assert cursor is not None
    flight.deliver(b"0123456789")
    assert not cursor.cut and flight.read(cursor) == [b"0123456789"]
    flight.deliver(b"abcdefghij")
    flight.deliver(b"k")  # the next piece, before the follower ran
    assert not cursor.cut and flight.read(cursor) == [b"abcdefghij", b"k"]
    flight.deliver(b"x" * 10)
    flight.deliver(b"yz")
    flight.deliver(b"...")  # 5 bytes past the oldest piece it has not read
    assert cursor.cut


def test_a_closed_flight_drops_what_only_a_follower_it_cut_would_have_read() -> None:
    # CI's hypothesis run found it: closed to newcomers, a flight whose last reading follower
    # is cut by a new piece (an empty one, so the log stays under max_log_bytes) kept the
    # pieces no one will read, until that follower left.
    flight: Flight[bytes] = Flight(KEY, max_log_bytes=1, max_lag_bytes=0)
    flight.respond(HEAD)
    flight.deliver(b"")
    flight.deliver(b"x")
    cursor = flight.follow()
    assert cursor is not None
    flight.close_to_newcomers()
    assert flight.chunks == [b"", b"x"]  # its follower has not read them yet
    flight.deliver(b"")
    assert cursor.cut
    assert flight.chunks == []
    flight.deliver(b"")  # and nothing is kept for it afterwards
    assert flight.chunks == [] and flight.read(cursor) == []
    assert flight.state(cursor) is Phase.FAILED


def test_a_log_of_exactly_max_log_bytes_is_still_offered() -> None:
    flights = Flights()
    live, _ = flights.claim(KEY, max_log_bytes=4)
    live.respond(HEAD)
    live.deliver(b"1234")
    same, cursor = flights.claim(KEY, max_log_bytes=4)
    assert same is live and cursor is not None
    assert live.flight.read(cursor) == [b"1234"]
    live.deliver(b"5")  # outgrown: offered no more, its follower is still served
    assert flights.get(KEY) is None and live.flight.follow() is None
    assert live.flight.read(cursor) == [b"5"] and live.flight.chunks == []
    other, none = flights.claim(KEY, max_log_bytes=4)
    assert none is None and other is not live
    live.end()
    assert live.flight.read(cursor) == [] and live.flight.state(cursor) is Phase.ENDED


def test_an_ended_flight_is_replayed_whole_until_its_producer_closes_it() -> None:
    flights = Flights()
    live, _ = flights.claim(KEY)
    live.respond(HEAD)
    live.deliver(b"a")
    live.deliver(b"b")
    live.end()
    _, late = flights.claim(KEY)  # between the end and the store: it follows from byte 0
    assert late is not None and live.flight.read(late) == [b"a", b"b"]
    assert live.flight.state(late) is Phase.ENDED
    live.close()  # stored (or not): new requests find the entry or ask the upstream
    assert live.flight.phase is Phase.ENDED and flights.claim(KEY)[1] is None


# -- the async shell ------------------------------------------------------------------------


async def read_all(live: LiveFlight[bytes], cursor: Cursor, got: bytearray) -> None:
    """Read a follower's stream to its clean end (raises where it is not clean)."""
    async with aclosing(live.chunks(cursor, IDLE)) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            got += chunk


def pieces(n: int, start: int = 0) -> list[bytes]:
    return [b"data: %d\n\n" % i for i in range(start, start + n)]


class HandedOver:
    """The upstream a producer hands over to its followers: ``source`` reads one piece into
    the flight (as the engine's does), ``abandon`` closes it. Counts both, and whether two
    readers ever pulled at once."""

    def __init__(self, live: LiveFlight[bytes], upstream: AsyncIterator[bytes]) -> None:
        self.live = live
        self.upstream = upstream
        self.pulls = self.abandoned = self.active = 0
        self.overlapped = False

    @classmethod
    def of(cls, live: LiveFlight[bytes], items: Iterable[bytes]) -> HandedOver:
        async def upstream() -> AsyncIterator[bytes]:
            for item in items:
                await anyio.lowlevel.checkpoint()
                yield item

        return cls(live, upstream())

    async def source(self) -> bool:
        self.pulls += 1
        self.active += 1
        self.overlapped |= self.active > 1
        try:
            try:
                piece = await self.upstream.__anext__()
            except StopAsyncIteration:
                self.live.end()
                return False
            self.live.deliver(piece)
            return True
        finally:
            self.active -= 1

    async def abandon(self) -> None:
        self.abandoned += 1
        await self.upstream.aclose()  # type: ignore[attr-defined]


def produce(n_followers: int) -> tuple[Flights, LiveFlight[bytes], list[Cursor]]:
    """A registry with one flight for KEY and ``n_followers`` followers of it."""
    flights = Flights()
    live, none = flights.claim(KEY)
    assert none is None
    cursors = []
    for _ in range(n_followers):
        same, cursor = flights.claim(KEY)
        assert same is live and cursor is not None
        cursors.append(cursor)
    return flights, live, cursors


@pytest.mark.anyio
async def test_followers_get_exactly_the_producers_bytes_and_end_cleanly() -> None:
    flights, live, cursors = produce(3)
    sent = pieces(30)
    go = anyio.Event()
    heads: list[Head | None] = []
    got: list[bytearray] = []

    async def follower(cursor: Cursor) -> None:
        received = bytearray()
        got.append(received)
        await go.wait()
        heads.append(await live.wait_head(IDLE))
        await read_all(live, cursor, received)

    async def producer() -> None:
        await go.wait()
        live.respond(HEAD)
        for i, piece in enumerate(sent):
            live.deliver(piece)
            if i == 10:  # one more identical request, mid-stream: it follows from byte 0
                same, cursor = flights.claim(KEY)
                assert same is live and cursor is not None
                tg.start_soon(follower, cursor)
            await anyio.lowlevel.checkpoint()
        live.end()

    async with anyio.create_task_group() as tg:
        for cursor in cursors:
            tg.start_soon(follower, cursor)
        tg.start_soon(producer)
        go.set()

    assert len(got) == 4 and all(bytes(g) == b"".join(sent) for g in got)
    assert heads == [HEAD] * 4
    assert not live.flight.cursors and flights.get(KEY) is live  # offered until closed
    live.close()
    assert flights.get(KEY) is None and live.flight.phase is Phase.ENDED


@pytest.mark.anyio
async def test_failure_aborts_every_follower_after_the_bytes_it_got() -> None:
    flights, live, cursors = produce(3)
    sent = pieces(2)
    received = [anyio.Event() for _ in cursors]
    got: list[bytes] = [b""] * len(cursors)

    async def follower(i: int, cursor: Cursor) -> None:
        bytes_ = bytearray()
        with pytest.raises(SharedStreamAborted, match="the upstream was cut"):
            async with aclosing(live.chunks(cursor, IDLE)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    bytes_ += chunk
                    if bytes_ == b"".join(sent):
                        received[i].set()
        got[i] = bytes(bytes_)

    async with anyio.create_task_group() as tg:
        for i, cursor in enumerate(cursors):
            tg.start_soon(follower, i, cursor)
        live.respond(HEAD)
        for piece in sent:
            live.deliver(piece)
        for event in received:
            await event.wait()
        live.fail("the upstream was cut")

    assert got == [b"".join(sent)] * len(cursors)
    assert not live.flight.cursors and not live.flight.chunks
    # A failed flight is offered no more: the next identical request asks the upstream.
    again, cursor = flights.claim(KEY)
    assert cursor is None and again is not live


@pytest.mark.anyio
async def test_wait_head_is_none_when_the_flight_fails_before_its_head() -> None:
    flights, live, (cursor,) = produce(1)
    waiting = anyio.Event()
    heads: list[Head | None] = []

    async def follower() -> None:
        waiting.set()
        heads.append(await live.wait_head(IDLE))  # blocks: nothing to wait for yet
        await live.leave(cursor)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower)
        await waiting.wait()
        live.fail("the producer's process died")

    assert heads == [None]
    again, none = flights.claim(KEY)  # the follower may ask the upstream itself
    assert none is None and again is not live


@pytest.mark.anyio
@pytest.mark.parametrize("kept", [True, False])
async def test_the_last_follower_leaving_asks_keep_before_the_flight_is_abandoned(
    kept: bool,
) -> None:
    # The producer's client left, then its last follower leaves before the end. ``keep``
    # is asked first, once: True (its integration finishes the stream in the background),
    # and the flight goes on, joined by the next identical request; False, and it fails and
    # its upstream is abandoned (helper-166: it was abandoned either way).
    flights, live, [cursor] = produce(1)
    live.respond(HEAD)
    live.deliver(b"part")
    asked: list[str] = []
    abandoned: list[str] = []

    def keep() -> bool:
        asked.append("keep")
        return kept

    async def abandon() -> None:
        abandoned.append("abandon")

    assert live.producer_left() is True
    live.abandon, live.keep = abandon, keep
    await live.leave(cursor)
    assert asked == ["keep"]
    if kept:
        assert abandoned == [] and live.flight.phase is Phase.STREAMING
        same, gone = flights.claim(KEY)  # an identical request joins it, and leaves:
        assert same is live and gone is not None
        await live.leave(gone)
        # ... read on all the same (its integration reads it), for the next one
        assert live.flight.wanted and abandoned == [] and asked == ["keep"]
        same, joined = flights.claim(KEY)
        assert same is live and joined is not None
        live.deliver(b" and the rest")
        live.end()
        received = bytearray()
        await read_all(live, joined, received)
        assert bytes(received) == b"part and the rest"
    else:
        assert abandoned == ["abandon"] and live.flight.phase is Phase.FAILED
        again, none = flights.claim(KEY)
        assert again is not live and none is None


@pytest.mark.anyio
async def test_followers_pull_a_handed_over_upstream_to_its_end() -> None:
    _, live, cursors = produce(2)
    first, rest = pieces(2), pieces(20, start=2)
    live.respond(HEAD)
    for piece in first:
        live.deliver(piece)
    assert live.producer_left() is True  # followers still read: keep the upstream
    upstream = HandedOver.of(live, rest)
    live.hand_over(upstream.source, upstream.abandon)
    go = anyio.Event()
    got = [bytearray() for _ in cursors]

    async def follower(cursor: Cursor, received: bytearray) -> None:
        await go.wait()
        await read_all(live, cursor, received)

    async with anyio.create_task_group() as tg:
        for cursor, received in zip(cursors, got, strict=True):
            tg.start_soon(follower, cursor, received)
        go.set()

    assert [bytes(g) for g in got] == [b"".join(first + rest)] * 2
    assert upstream.pulls == len(rest) + 1 and not upstream.overlapped
    assert upstream.abandoned == 0 and live.flight.phase is Phase.ENDED


@pytest.mark.anyio
async def test_last_follower_leaving_early_abandons_the_upstream_once() -> None:
    flights, live, cursors = produce(3)
    live.respond(HEAD)
    live.deliver(b"data: first\n\n")
    assert live.producer_left() is True
    upstream = HandedOver.of(live, (b"data: %d\n\n" % i for i in itertools.count()))
    live.hand_over(upstream.source, upstream.abandon)
    go = anyio.Event()
    got = [bytearray() for _ in cursors]

    async def follower(cursor: Cursor, received: bytearray, enough: int) -> None:
        await go.wait()
        async with aclosing(live.chunks(cursor, IDLE)) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                received += chunk
                if len(received) >= enough:
                    break  # the client leaves before the end

    async with anyio.create_task_group() as tg:
        for i, (cursor, received) in enumerate(zip(cursors, got, strict=True)):
            tg.start_soon(follower, cursor, received, 50 * (i + 1))
        go.set()

    for cursor in cursors:  # leaving is idempotent
        await live.leave(cursor)
    assert upstream.abandoned == 1 and not upstream.overlapped
    assert live.flight.phase is Phase.FAILED and flights.get(KEY) is None
    assert live.flight.chunks == [] and not live.flight.wanted  # nothing kept: nobody reads
    longest = max(got, key=len)
    assert all(longest.startswith(g) for g in got) and longest.startswith(b"data: first\n\n")


def gated_upstream(
    live: LiveFlight[bytes], *, isolated: bool = False
) -> tuple[HandedOver, anyio.Event, anyio.Event]:
    """``live``'s producer sent its head and ``p``, then left while followers read: its
    upstream, handed over, yields ``1`` and ``2`` once ``gate`` is set (``inside``: a pull
    waits for it)."""
    live.respond(HEAD)
    live.deliver(b"p")
    assert live.producer_left() is True
    inside, gate = anyio.Event(), anyio.Event()

    async def slow() -> AsyncIterator[bytes]:
        inside.set()
        await gate.wait()
        yield b"1"
        yield b"2"

    upstream = HandedOver(live, slow())
    live.hand_over(upstream.source, upstream.abandon, isolated=isolated)
    return upstream, inside, gate


@pytest.mark.anyio
async def test_follower_cancelled_while_pulling_does_not_break_the_stream() -> None:
    _, live, (a, b) = produce(2)
    upstream, inside, gate = gated_upstream(live)
    a_got, b_got = bytearray(), bytearray()
    a_scope = anyio.CancelScope()
    a_done = anyio.Event()

    async def follower_a() -> None:
        with a_scope:
            await read_all(live, a, a_got)
        a_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower_a)
        await inside.wait()  # A pulls the upstream for both of them
        assert live.pulling
        a_scope.cancel()
        gate.set()
        await a_done.wait()
        await read_all(live, b, b_got)

    assert a_scope.cancelled_caught and b"p12".startswith(a_got)
    assert b_got == b"p12" and live.flight.phase is Phase.ENDED and upstream.abandoned == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout"])
@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("isolated", [True, False])
async def test_a_follower_cancelled_by_asyncio_while_pulling_finishes_the_pull(
    anyio_backend: str, how: str, held: bool, isolated: bool
) -> None:
    # The test above with asyncio's own cancellation, which anyio's shield does not stop
    # (gateways wrap reads in asyncio.timeout): A's pull of a source handed over
    # ``isolated`` (the HTTP layer's) must still end for B, and A leave by its cancellation
    # at once (helper-67: B was aborted, "cancelled mid-read", 10 of 10). ``held``: A pulls alone a
    # stream held for a client that may resume it. Not isolated (the engine's per-event
    # sources), the read is cut: the flight fails, visibly, never a clean end of a part.
    import asyncio

    from sse_cache.flight import SharedStreamAborted

    _, live, cursors = produce(1 if held else 2)
    upstream, inside, gate = gated_upstream(live, isolated=isolated)
    live.held = held
    a_got = bytearray()
    timeouts: list[asyncio.Timeout] = []

    async def follower_a() -> None:
        async with asyncio.timeout(None) as timeout:
            timeouts.append(timeout)
            await read_all(live, cursors[0], a_got)

    a = asyncio.ensure_future(follower_a())
    await inside.wait()  # A pulls the upstream
    assert live.pulling
    if how == "task.cancel":
        a.cancel()
    else:
        timeouts[0].reschedule(asyncio.get_running_loop().time())  # expires now
    # A leaves at once, by its cancellation (a gateway's stall guard is kept: helper-69 saw
    # a timeout come only with the upstream's next piece), while the upstream holds it.
    with pytest.raises(TimeoutError if how == "asyncio.timeout" else asyncio.CancelledError):
        await a
    gate.set()
    if not isolated:
        assert live.flight.phase is Phase.FAILED
        if not held:
            with pytest.raises(SharedStreamAborted):
                await read_all(live, cursors[1], bytearray())
        return
    assert live.flight.phase is not Phase.FAILED and live.source is not None
    if held:
        live.held = False  # (the client comes back: it reads what is left)
        b = live.flight.follow()
        assert b is not None
    else:
        b = cursors[1]
    b_got = bytearray()
    await read_all(live, b, b_got)
    assert b"p12".startswith(a_got) and b_got == b"p12"
    assert live.flight.phase is Phase.ENDED and upstream.abandoned == 0


@pytest.mark.anyio
async def test_follower_joining_a_lone_pull_never_gets_a_truncated_clean_end() -> None:
    # The producer's client left while one follower (A) read; A pulls the upstream alone,
    # so unshielded. While A waits inside that pull, an identical request (B) joins. Then
    # A's client goes: its cancellation lands inside the upstream iterator, which is
    # finished for good. B must not take the upstream's early StopAsyncIteration for its
    # end: it gets the whole answer or a visible failure, never a clean end of a part of it.
    flights, live, (a,) = produce(1)
    upstream, inside, gate = gated_upstream(live)
    a_scope = anyio.CancelScope()
    a_done = anyio.Event()
    b_got = bytearray()
    outcome = ""

    async def follower_a() -> None:
        with a_scope:
            await read_all(live, a, bytearray())
        a_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower_a)
        await inside.wait()
        assert live.pulling and len(live.flight.cursors) == 1
        same, b = flights.claim(KEY)  # B joins during A's pull
        assert same is live and b is not None
        a_scope.cancel()
        await a_done.wait()
        gate.set()
        try:
            await read_all(live, b, b_got)
            outcome = "ended"
        except SharedStreamAborted:
            outcome = "aborted"

    assert a_scope.cancelled_caught
    assert b"p12".startswith(b_got)
    assert outcome == "aborted" or b_got == b"p12", (
        f"B ended cleanly with a part of the answer: {bytes(b_got)!r}"
    )
    assert upstream.abandoned == (1 if outcome == "aborted" else 0)


@pytest.mark.anyio
async def test_a_reader_closed_by_another_task_under_its_read_fails_never_skips() -> None:
    # A follower's chunks closed from another task while its read waits (a client's close
    # may leave the stream under a read its cancellation does not reach; the async
    # generator refused to close, the class did not):
    # it left the flight under the reader, the log was trimmed past its place once the
    # other follower read on, and the waiting read gave the pieces after the trimmed ones,
    # skipping two (helper-122). Now it fails; the other follower reads on, whole.
    flight: Flight[bytes] = Flight(KEY, max_log_bytes=1, max_lag_bytes=10**6)
    live = LiveFlight(flight)
    a, b = flight.follow(), flight.follow()
    assert a is not None and b is not None
    live.respond(Head(200, []))
    live.deliver(b"c0")
    live.deliver(b"c1")  # (the log outgrew max_log_bytes: closed to newcomers, trimmed)
    chunks_a, chunks_b = live.chunks(a, IDLE), live.chunks(b, IDLE)
    assert await chunks_a.__anext__() == b"c0c1" and await chunks_b.__anext__() == b"c0c1"
    got: list[bytes | str] = []

    async def read_a() -> None:
        try:
            got.append(await chunks_a.__anext__())
        except SharedStreamAborted as exc:
            got.append(str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_a)
        await anyio.wait_all_tasks_blocked()  # (A waits for its next piece)
        await chunks_a.aclose()
        live.deliver(b"c2")
        live.deliver(b"c3")
        assert await chunks_b.__anext__() == b"c2c3"
        live.deliver(b"c4")
    assert got == ["the shared stream stopped: this reader left the stream"]
    assert await chunks_b.__anext__() == b"c4"
    await chunks_b.aclose()


@pytest.mark.anyio
async def test_a_lone_reader_cancelled_mid_pull_abandons_the_upstream_once() -> None:
    flights, live, (a,) = produce(1)
    live.respond(HEAD)
    live.deliver(b"p")
    assert live.producer_left() is True
    inside = anyio.Event()

    async def hanging() -> AsyncIterator[bytes]:
        inside.set()
        await anyio.Event().wait()
        yield b"never"

    upstream = HandedOver(live, hanging())
    live.hand_over(upstream.source, upstream.abandon)
    got = bytearray()
    async with anyio.create_task_group() as tg:
        tg.start_soon(read_all, live, a, got)
        await inside.wait()  # its client goes while it waits for the upstream
        tg.cancel_scope.cancel()

    assert got == b"p" and upstream.abandoned == 1
    assert live.flight.phase is Phase.FAILED and flights.get(KEY) is None


# -- a held flight (a resume window) ---------------------------------------------------------


def _held_flight() -> tuple[Flights, LiveFlight[bytes], list[str]]:
    """A flight whose producer's client left within a resume window; the reasons it was
    abandoned with (if it was)."""
    flights = Flights()
    live, _ = flights.claim(KEY)
    abandoned: list[str] = []

    async def abandon() -> None:
        abandoned.append(live.flight.reason)

    live.abandon = abandon
    live.respond(HEAD)
    live.deliver(b"event: a\ndata: 1\n\n")
    live.held = True
    assert live.producer_left()  # no one reads it, but it is kept: the window
    return flights, live, abandoned


@pytest.mark.anyio
async def test_a_held_flight_is_read_on_with_no_reader_until_its_window_is_released() -> None:
    flights, live, abandoned = _held_flight()
    assert flights.get(KEY) is live and live.flight.phase is Phase.STREAMING
    # A client comes back: it reads from the start, and is a reader like any other.
    again, cursor = flights.claim(KEY)
    assert again is live and cursor is not None
    await live.release()  # the window ends while it reads: nothing is abandoned
    assert not abandoned and live.flight.phase is Phase.STREAMING
    await live.leave(cursor)  # the last reader leaves before the end: abandoned now
    assert live.flight.phase is Phase.FAILED and abandoned


@pytest.mark.anyio
async def test_a_held_flight_no_one_came_back_to_is_abandoned_when_released() -> None:
    flights, live, abandoned = _held_flight()
    await live.release()
    assert live.flight.phase is Phase.FAILED
    assert abandoned == ["no one resumed the stream within its resume window"]
    assert flights.get(KEY) is None  # not offered to anyone: a part is never an answer


# -- closing a follower process's exchange (close(keep_readers=True)) ----------------------------


@pytest.mark.anyio
async def test_closing_with_keep_readers_fails_the_readers_nothing_feeds_at_once() -> None:
    # A follower process's exchange ends while its local readers wait on a flight that no
    # handed-over source feeds: nothing will ever come, so they fail now (they hold part of
    # an answer), not after their idle timeout (an hour here).
    flights, live, (cursor,) = produce(1)
    live.respond(HEAD)
    live.deliver(b"p")
    got = bytearray()
    has_first = anyio.Event()
    outcome: list[object] = []

    async def reader() -> None:
        try:
            async with aclosing(live.chunks(cursor, 3600)) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    got.extend(chunk)
                    has_first.set()
            outcome.append("clean end")
        except SharedStreamAborted as exc:
            outcome.append(exc)

    with anyio.fail_after(30):  # a deadlock guard, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await has_first.wait()  # it has the log and waits for more
            live.close(keep_readers=True)
    assert got == b"p" and len(outcome) == 1
    assert isinstance(outcome[0], SharedStreamAborted), outcome
    assert live.flight.phase is Phase.FAILED and flights.get(KEY) is None


@pytest.mark.anyio
async def test_closing_with_keep_readers_and_no_reader_keeps_no_source() -> None:
    # A handed-over source that no reader here pulls is not kept going: the flight fails
    # (it is not done, and no one would ever read it to its end).
    flights, live, (cursor,) = produce(1)
    live.respond(HEAD)
    upstream = HandedOver.of(live, pieces(3))
    live.hand_over(upstream.source, upstream.abandon)
    await live.leave(cursor)  # the producer's client still reads: nothing is abandoned
    assert live.flight.phase is Phase.STREAMING
    live.close(keep_readers=True)
    assert live.flight.phase is Phase.FAILED and live.source is None
    assert flights.get(KEY) is None and live.flight.follow() is None


@pytest.mark.anyio
async def test_closing_with_keep_readers_lets_a_fed_flight_go_on_for_its_readers() -> None:
    # The same close while a handed-over source feeds the flight: its readers read it to its
    # clean end, and no newcomer joins it.
    flights, live, (cursor,) = produce(1)
    live.respond(HEAD)
    live.deliver(b"p")
    assert live.producer_left() is True
    rest = pieces(5)
    upstream = HandedOver.of(live, rest)
    live.hand_over(upstream.source, upstream.abandon)
    live.close(keep_readers=True)
    assert live.flight.phase is Phase.STREAMING
    assert flights.get(KEY) is None and live.flight.follow() is None
    got = bytearray()
    with anyio.fail_after(30):  # a deadlock guard
        await read_all(live, cursor, got)
    assert got == b"p" + b"".join(rest) and live.flight.phase is Phase.ENDED
    assert upstream.abandoned == 0


# -- a producer's client that stopped reading: its followers go on without it ------------------


def taken_over() -> tuple[Flights, LiveFlight[bytes], Cursor, Cursor, HandedOver]:
    """A flight whose producer's client had ``a`` and stopped reading: a place is kept for
    it there (follow_on), and its one follower reads the upstream on (three pieces)."""
    flights, live, (follower,) = produce(1)
    live.respond(HEAD)
    live.deliver(b"a")
    place = live.flight.follow_on()
    assert place is not None
    assert live.producer_left() is True
    upstream = HandedOver.of(live, pieces(3))
    live.hand_over(upstream.source, upstream.abandon)
    return flights, live, follower, place, upstream


@pytest.mark.anyio
async def test_a_reserved_place_keeps_the_log_for_its_reader_but_keeps_nothing_going() -> None:
    # The producer's client stopped reading; its followers take the upstream over and keep a
    # place for it where it was (follow_on). The place is no follower and wants nothing:
    # when the last follower leaves before the end, the upstream is abandoned — a dropped
    # response's reader never comes — and the reader coming back finds the stream failed,
    # never a clean end of part of it.
    flights, live, follower, place, upstream = taken_over()
    assert place.reserved and live.followers == 1
    assert live.flight.read(follower) == [b"a"]
    await live.pull()
    await live.leave(follower)
    assert upstream.abandoned == 1 and live.flight.phase is Phase.FAILED
    live.flight.claim(place)
    assert live.flight.read(place) == [b"data: 0\n\n"]  # kept for it, from where it was
    assert live.flight.state(place) is Phase.FAILED
    assert flights.get(KEY) is None


@pytest.mark.anyio
async def test_a_reader_coming_back_to_its_place_reads_on_from_it_to_the_end() -> None:
    _, live, follower, place, upstream = taken_over()
    assert live.flight.read(place) == []  # it had "a" already
    live.flight.claim(place)
    assert not place.reserved and live.followers == 2
    got, theirs = bytearray(), bytearray()
    with anyio.fail_after(30):  # a deadlock guard
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all, live, place, got)
            tg.start_soon(read_all, live, follower, theirs)
    assert bytes(got) == b"".join(pieces(3)) and bytes(theirs) == b"a" + bytes(got)
    assert upstream.abandoned == 0


@pytest.mark.anyio
async def test_a_waiting_follower_asks_whether_the_producer_stopped_then_pulls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No piece comes: every STALL_LOOK seconds the follower asks ``stalled``; once it says
    # the producer's client stopped (handing the upstream over), the follower pulls it.
    import sse_cache.flight

    monkeypatch.setattr(sse_cache.flight, "STALL_LOOK", 0.001)
    _, live, (follower,) = produce(1)
    live.respond(HEAD)
    live.deliver(b"a")
    upstream = HandedOver.of(live, pieces(2))
    looks = 0

    async def stalled() -> bool:
        nonlocal looks
        looks += 1
        if looks < 3:
            return False  # (still reading, say)
        assert live.producer_left() is True
        live.hand_over(upstream.source, upstream.abandon)
        return True

    live.stalled = stalled
    got = bytearray()
    with anyio.fail_after(30):  # a deadlock guard
        await read_all(live, follower, got)
    assert bytes(got) == b"a" + b"".join(pieces(2)) and looks == 3


@pytest.mark.anyio
@pytest.mark.parametrize("pulling", [False, True])
async def test_ending_a_whole_stream_waits_for_it_to_be_settled(pulling: bool) -> None:
    # A closing integration ends what is read on for others (end_handed_over). A stream
    # already whole (settling: its answer being stored by whoever read its end — a pull, or
    # the producer's client's own read) is not failed: the close waits until it has ended,
    # and for the pull under way, while the backend is still open (helper-151: a store in
    # the client's own read was not waited for).
    flights = Flights()
    live, _ = flights.claim("k")
    cursor = live.flight.follow()
    assert cursor is not None
    live.respond(Head(200, []))
    live.deliver(b"data: x\n\n")

    async def source() -> bool:  # pragma: no cover  (never pulled here)
        raise AssertionError("a whole stream is not read on")

    async def abandon() -> None:  # pragma: no cover
        raise AssertionError("a whole stream is not abandoned")

    live.hand_over(source, abandon, isolated=True)
    live.settling = True  # (by the tee: its answer is being stored)
    live.pulling = pulling
    done = False

    async def end() -> None:
        nonlocal done
        await flights.end_handed_over("the transport was closed")
        done = True

    with anyio.fail_after(30):  # a deadlock guard, not a timing bound
        async with anyio.create_task_group() as tg:
            tg.start_soon(end)
            await anyio.wait_all_tasks_blocked()
            assert not done  # still being settled
            live.end()  # stored: the followers' streams end (release_followers)
            await anyio.wait_all_tasks_blocked()
            assert done is not pulling  # (and the pull under way returns)
            if pulling:
                live.pulled()
    assert done
    assert live.flight.phase is Phase.ENDED  # not failed: its followers end cleanly
    assert flights.handed_over == 0

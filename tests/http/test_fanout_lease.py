"""The cross-process producer's writes to its channel (sse_cache.http._fanout): one at a
time, the response's pieces and the lease keeper's heartbeats alike.

A write that timed out is sent again by redis-py while the first may still be applied (a
stalled Redis runs both once it resumes). The channel's append recognises a repeat only as
the newest entry, so a heartbeat written between the two made every follower in another
process read that piece of the answer twice, then end cleanly (found with a SIGSTOPped
redis-server under two proxies: 11 of 110 runs)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from sse_cache.http._fanout import TimedFanout, _Lease

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

DEADLOCK_GUARD = 30  # seconds: only a hung test reaches it


class SlowChannel:
    """A fan-out backend whose appends wait until the test opens :attr:`gate`, counting how
    many are in flight at once; renewals (the keeper's other call) return at once."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.in_flight = 0
        self.most_in_flight = 0
        self.renewals = 0
        self.renewed_thrice = anyio.Event()
        self.written: list[bytes] = []

    async def acquire(self, name: str, token: str, ttl: float) -> bool:
        return True

    async def renew(self, name: str, token: str, ttl: float) -> bool:
        self.renewals += 1
        if self.renewals == 3:
            self.renewed_thrice.set()
        return True

    async def release(self, name: str, token: str) -> None:
        pass

    async def holder(self, name: str) -> str | None:
        return None

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            self.written.append(data)
        finally:
            self.in_flight -= 1

    async def finish(self, channel: str, *, ttl: float) -> None:
        await self.publish(channel, b"<end>", ttl=ttl)

    def read(self, channel: str, *, block: float) -> AsyncIterator[bytes]:
        raise AssertionError("not read here")


async def test_a_heartbeat_waits_for_the_write_under_way() -> None:
    channel = SlowChannel()
    # A short lease: its keeper renews and writes a heartbeat every 10 ms.
    lease = _Lease(TimedFanout(channel, ()), "sf:key", "token", ttl=0.03)  # type: ignore[arg-type]
    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lease.publish, b"d piece of the answer")
            # The piece is in flight (a stalled Redis): the keeper goes on renewing...
            await channel.renewed_thrice.wait()
            # ...but writes no heartbeat beside it (nor waits to: the lease stays renewed).
            assert channel.in_flight == 1 and channel.written == []
            channel.gate.set()
        await lease.stop()
        await lease.finish()
    assert channel.most_in_flight == 1
    assert channel.written[0] == b"d piece of the answer"
    assert set(channel.written[1:-1]) <= {b"k"} and channel.written[-1] == b"<end>"


async def test_a_publish_under_way_is_finished_when_its_producer_is_cancelled() -> None:
    # The producer's client leaves at the answer's end (the openai SDK closes a chat stream
    # at [DONE]) and the proxy stops its app at once, while the last piece is being
    # published. Cancelled midway, that publish (which Redis may well have applied) counted
    # as failed: every follower in another process got the whole answer, then an abort
    # (helper-105). It is finished first.
    from sse_cache.flight import Head
    from sse_cache.http._tee import ResponseTee

    channel = SlowChannel()
    channel.gate.set()  # the head goes through
    lease = _Lease(TimedFanout(channel, ()), "sf:key", "token", ttl=60)  # type: ignore[arg-type]
    tee = ResponseTee()
    tee.publish_to(lease, Head(200, [("content-type", "text/event-stream")]))
    await tee.flush()
    channel.gate = anyio.Event()  # the next publish waits (a slow Redis)
    tee.relay(b"data: [DONE]\n\n")
    with anyio.fail_after(DEADLOCK_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tee.flush)
            while channel.in_flight == 0:
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()  # the app is stopped
            channel.gate.set()
        await lease.stop()
    assert b"d" + b"data: [DONE]\n\n" in channel.written
    assert not tee.publish_failed


class FullChannel(SlowChannel):
    """Renewals succeed; every write is refused (a Redis at its maxmemory refuses appends,
    where the lease's renewal, which adds nothing, goes through)."""

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        from sse_cache.errors import BackendFull

        raise BackendFull("XADD: Redis is full")


async def test_a_refused_heartbeat_is_not_called_a_failed_renewal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Both were one warning, "could not renew <lock>", while the lease was renewed each time
    # (helper-129). Now the heartbeat's failure says so, and names the channel.
    import logging

    channel = FullChannel()
    lease = _Lease(TimedFanout(channel, ()), "sf:key", "token", ttl=0.03)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        with anyio.fail_after(DEADLOCK_GUARD):
            await channel.renewed_thrice.wait()
        await lease.stop()
    said = [r.getMessage() for r in caplog.records]
    assert said and all("could not write a heartbeat to" in m for m in said), said
    assert "BackendFull" in said[0]


class FailingOnce(SlowChannel):
    """The first write of the answer's body times out (a Redis stalled past the lease);
    every write after it goes through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.set()
        self.failed = False

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        from sse_cache.errors import BackendTimeout

        if data.startswith(b"d") and not self.failed:
            self.failed = True
            raise BackendTimeout("XADD: Redis did not answer in time")
        await super().publish(channel, data, ttl=ttl)


async def test_a_failed_publish_is_told_to_the_followers_by_the_keeper() -> None:
    # A piece of the answer could not be published: the followers in other processes miss
    # it. The keeper's heartbeats kept them waiting, alive but silent, until the response
    # ended (helper-150: 7.5 s; minutes for a long answer), then they were told. The keeper
    # writes the failure marker in place of its next heartbeat, once, and the end of the
    # lead does not write it again.
    from sse_cache.flight import Head
    from sse_cache.http._fanout import end_lead
    from sse_cache.http._tee import ResponseTee

    channel = FailingOnce()
    lease = _Lease(TimedFanout(channel, ()), "sf:key", "token", ttl=0.03)  # type: ignore[arg-type]
    tee = ResponseTee()
    tee.publish_to(lease, Head(200, [("content-type", "text/event-stream")]))
    tee.relay(b"data: 1\n\n")
    await tee.flush()
    assert tee.publish_failed
    with anyio.fail_after(DEADLOCK_GUARD):
        while b"x" not in channel.written:  # noqa: ASYNC110  (the keeper's next round)
            await anyio.sleep(0.01)
        while channel.renewals < 6:  # noqa: ASYNC110  (rounds after it: nothing more)
            await anyio.sleep(0.01)
    await end_lead(lease, "key", tee.publish_rest)
    written = channel.written
    assert written[0].startswith(b"h") and written[-1] == b"<end>"
    assert written[1:-1].count(b"x") == 1
    assert written.index(b"x") == len(written) - 2  # no heartbeat after it


class HungChannel(SlowChannel):
    """Every write hangs (a Redis that stopped answering, whose appends are sent again until
    their bound); renewals go through."""

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        await anyio.sleep_forever()


async def test_a_heartbeat_into_a_hung_redis_gives_way_to_the_next_round() -> None:
    # A heartbeat is of use until the next one is due: one hung for a channel's minute held
    # its keeper (and the channel's writes) long after the lead had ended (helper-153).
    channel = HungChannel()
    lease = _Lease(TimedFanout(channel, ()), "sf:key", "token", ttl=0.03)  # type: ignore[arg-type]
    with anyio.fail_after(DEADLOCK_GUARD):
        while channel.renewals < 6:  # noqa: ASYNC110  (rounds go on past hung heartbeats)
            await anyio.sleep(0.01)
        await lease.stop()
    assert channel.written == []

"""The live fan-out's channels (Redis Streams) as a state machine, against a real Redis: a
producer appending and ending its channel, the server losing the stream (evicted, deleted,
expired: one command here) or its oldest message (trimmed), readers from the start at any
moment and readers that follow the channel as it grows.

What must hold at every step — the cross-process half of "a partial answer never looks
complete": a reader ends cleanly only with every message the producer appended, in order,
once each; anything else a reader sees is a prefix of them, followed by an error or by
silence. A producer whose stream lost messages is told so by its next append.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sse_cache.backends import from_url
from sse_cache.backends.redis import RedisBackend
from sse_cache.errors import BackendError, BackendTimeout

TTL = 30.0
# How long a reader waits for a message that will not come (the channel is silent: its
# producer has not ended it, or its stream is gone). Silence is an outcome the model allows.
BLOCK = 0.05
# A deadlock guard only: a message already appended reaches a reader in milliseconds.
GUARD = 30.0

messages = st.binary(min_size=0, max_size=40)


@dataclass
class Channel:
    name: str
    #: What the producer appended (each append that returned), in order.
    sent: list[bytes] = field(default_factory=list)
    ended: bool = False
    #: The server lost messages of it: the stream went while it held some, or its oldest.
    lost: bool = False
    #: An append was refused (the producer was told): the stream carries the marker.
    refused: bool = False
    #: A reader following it, and what it has read.
    follower: AsyncIterator[bytes] | None = None
    followed: list[bytes] = field(default_factory=list)
    follower_done: bool = False


@dataclass
class Redis:
    """The backends of the machine, on one loop (the portal's): the producer's and a
    reader's, as two processes would have."""

    portal: anyio.from_thread.BlockingPortal
    producer: RedisBackend
    reader: RedisBackend


def _channels(machine: FanoutMachine) -> bool:
    return bool(machine.channels)


class FanoutMachine(RuleBasedStateMachine):
    redis: Redis  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[Channel] = []

    def call(self, fn: Any, *args: Any) -> Any:
        return self.redis.portal.call(fn, *args)

    @property
    def client(self) -> Any:
        return self.redis.producer.client

    def key(self, ch: Channel) -> str:
        return f"{self.redis.producer.prefix}s:{ch.name}"

    def pick(self, index: int) -> Channel:
        return self.channels[index % len(self.channels)]

    @initialize()
    def first_channel(self) -> None:
        self.open_channel()

    @rule()
    def open_channel(self) -> None:
        if len(self.channels) < 4:
            self.channels.append(Channel(f"ch-{uuid.uuid4().hex[:12]}"))

    # -- the producer ----------------------------------------------------------------------

    def _append(self, ch: Channel, message: bytes | None) -> None:
        producer = self.redis.producer
        refusal: BackendError | None = None
        try:
            if message is None:
                self.call(lambda: producer.finish(ch.name, ttl=TTL))
            else:
                self.call(lambda: producer.publish(ch.name, message, ttl=TTL))
        except BackendError as exc:
            refusal = exc
        if refusal is not None:
            # Refused only when something was lost: never a sound stream's append.
            assert not isinstance(refusal, BackendTimeout), refusal
            assert ch.lost or ch.refused, refusal
            assert "lost messages" in str(refusal)
            ch.refused = True
            return
        # Taken: only where the producer's numbering still follows on (a lost oldest message
        # leaves the newest, after which it does); never once refused.
        assert not ch.refused
        if message is None:
            ch.ended = True
        else:
            ch.sent.append(message)

    @precondition(_channels)
    @rule(index=st.integers(0, 3), message=messages)
    def publish(self, index: int, message: bytes) -> None:
        ch = self.pick(index)
        if not ch.ended:
            self._append(ch, message)

    @precondition(_channels)
    @rule(index=st.integers(0, 3))
    def finish(self, index: int) -> None:
        ch = self.pick(index)
        if not ch.ended:
            self._append(ch, None)

    # -- the server losing data ----------------------------------------------------------

    @precondition(_channels)
    @rule(index=st.integers(0, 3))
    def stream_gone(self, index: int) -> None:
        """Evicted, deleted, flushed or expired: the stream key is gone."""
        ch = self.pick(index)
        if self.call(self.client.delete, self.key(ch)) and (ch.sent or ch.ended):
            ch.lost = True

    @precondition(_channels)
    @rule(index=st.integers(0, 3))
    def oldest_trimmed(self, index: int) -> None:
        """The oldest message trimmed (XADD's MAXLEN), the newest kept."""
        ch = self.pick(index)
        key = self.key(ch)
        if self.call(self.client.xlen, key) < 2:
            return  # (trimming the only entry empties the stream: stream_gone's case)
        ((oldest, _),) = self.call(lambda: self.client.xrange(key, count=1))
        self.call(self.client.xdel, key, oldest)
        ch.lost = True

    # -- readers ----------------------------------------------------------------------------

    @precondition(_channels)
    @rule(index=st.integers(0, 3))
    def read_from_the_start(self, index: int) -> None:
        """A late joiner: everything from the first message, to the end or to silence."""
        ch = self.pick(index)
        # Past what was appended it can only wait: not asked for (silence costs BLOCK), unless
        # the channel ended or is broken, where what comes next is the point.
        wanted = None if ch.ended or ch.lost or ch.refused else len(ch.sent)

        async def read() -> tuple[list[bytes], BaseException | None]:
            got: list[bytes] = []
            with anyio.fail_after(GUARD):
                reading = self.redis.reader.read(ch.name, start="0", block=BLOCK)
                try:
                    async for message in reading:
                        got.append(message)
                        if wanted is not None and len(got) == wanted:
                            return got, None
                except (BackendError, BackendTimeout) as exc:
                    return got, exc
                finally:
                    await reading.aclose()  # type: ignore[attr-defined]
            return got, StopAsyncIteration()

        got, ending = self.call(read)
        self.check(ch, got, ending, whole_asked=wanted is not None)

    @precondition(_channels)
    @rule(index=st.integers(0, 3))
    def follow(self, index: int) -> None:
        """A reader that joined as the channel began takes its next message."""
        ch = self.pick(index)
        if ch.follower_done:
            return
        if ch.follower is None:
            ch.follower = self.redis.reader.read(ch.name, start="0", block=BLOCK)
        if len(ch.followed) == len(ch.sent) and not (ch.ended or ch.lost or ch.refused):
            return  # (nothing to take yet: it would only wait)
        follower = ch.follower

        async def take() -> bytes | BaseException:
            with anyio.fail_after(GUARD):
                try:
                    return await follower.__anext__()
                except (BackendError, BackendTimeout, StopAsyncIteration) as exc:
                    return exc

        got = self.call(take)
        if isinstance(got, bytes):
            ch.followed.append(got)
            assert ch.followed == ch.sent[: len(ch.followed)], "a follower read a wrong message"
            return
        ch.follower_done = True
        self.check(ch, ch.followed, got, whole_asked=False)

    def check(
        self, ch: Channel, got: list[bytes], ending: BaseException | None, *, whole_asked: bool
    ) -> None:
        # Every reader sees a prefix of what was appended, in order, once each.
        assert got == ch.sent[: len(got)], f"read {got!r}, appended {ch.sent!r}"
        if ending is None:  # (stopped by the reader, with all it asked for)
            assert whole_asked and got == ch.sent
        elif isinstance(ending, StopAsyncIteration):
            # A clean end: only of an ended channel, with every message of it.
            assert ch.ended and got == ch.sent, (
                f"a reader ended cleanly with {len(got)} of {len(ch.sent)} messages "
                f"(ended={ch.ended}, lost={ch.lost}, refused={ch.refused})"
            )
        elif isinstance(ending, BackendTimeout):
            # Silence: the channel is not ended, or its stream is gone.
            assert not ch.ended or ch.lost, f"an ended channel went silent: {ending!r}"
        else:
            # An error only where something was lost.
            assert ch.lost or ch.refused, f"a sound channel failed a reader: {ending!r}"

    def teardown(self) -> None:
        for ch in self.channels:
            if ch.follower is not None:
                self.call(ch.follower.aclose)  # type: ignore[attr-defined]
            self.call(self.client.delete, self.key(ch))


@pytest.fixture
def fanout_redis(redis_server: Any) -> Iterator[Redis]:
    url = f"{redis_server.url}?prefix=fsm-{uuid.uuid4().hex[:8]}:&timeout=5"
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        producer = portal.call(from_url, url)
        reader = portal.call(from_url, url)
        assert isinstance(producer, RedisBackend) and isinstance(reader, RedisBackend)
        try:
            yield Redis(portal, producer, reader)
        finally:
            portal.call(producer.aclose)
            portal.call(reader.aclose)


def test_the_fanout_machine(fanout_redis: Redis) -> None:
    FanoutMachine.redis = fanout_redis
    run_state_machine_as_test(
        FanoutMachine, settings=settings(max_examples=60, stateful_step_count=30, deadline=None)
    )

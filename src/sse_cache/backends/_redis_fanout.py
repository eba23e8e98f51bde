"""Fan-out over Redis Streams for cross-process single-flight: one producer appends a
response's messages to a stream (``XADD`` in a script that also refreshes its expiry), any
number of readers in any process replay it from the start and follow it (``XREAD BLOCK``)
until the end marker.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..errors import BackendError, BackendTimeout, ConfigError
from ._common import check_key, to_bytes
from ._redis_client import Commands, milliseconds

__all__ = ["StreamFanout"]

# A runaway producer cannot grow a stream past about this many messages (MAXLEN ~); an LLM
# answer is about one event per token, tens of thousands at most. Bytes are bounded by the
# producer (the engine's max_entry_bytes) and by the ttl.
_STREAM_MAXLEN: Final = 100_000
# Messages per XREAD: few at first and about _READ_BYTES per batch after that, so that a
# batch of large messages still arrives within the per-operation timeout while a late joiner
# catches up on small ones in few round trips.
#: Why a stream's messages may be gone, which the server cannot tell apart (helper-137: an
#: eviction was reported as a failover, sending operators looking for one that never was).
_LOST: Final = (
    "the stream was evicted (maxmemory-policy: INFO stats evicted_keys counts them), deleted "
    "or flushed, expired, or the server lost writes (restarted from an older snapshot, or "
    "failed over)"
)
_READ_COUNT: Final = (8, 256)
_READ_BYTES: Final = 2 * 1024 * 1024
# Append one message (field ``d``) or the end marker (field ``e``), numbered ``i`` (0, 1, ...)
# so that readers notice lost messages, tagged with the caller's nonce ``n``: redis-py retries
# a command once after a connection error (the cluster client after a timeout too), and a
# retried append whose first attempt was applied (only its reply was lost) must not append
# twice. One producer per channel, so a retry can only
# repeat the newest entry. Appending and refreshing the expiry in one script keeps the stream
# from living forever if the client dies in between.
#
# The number is the producer's own count (ARGV[6]), not the stream's: a Redis restarted from
# an older snapshot, or a replica promoted before it had the newest entries, has lost the
# stream's tail, and a producer that carried on would number its next message right after
# what survived — a reader would find no gap, and end cleanly without the lost middle. Such an
# append is refused ({-1, ...}) and a marker numbered -1 appended instead, at which every
# reader raises; a stream so marked refuses every later append (a retry of the refused one
# included). ARGV[7]: how many appends of unknown outcome (they raised) came before, any of
# which may have been applied.
#
# XADD is the script's first write wherever it appends: Redis checks a script against its
# maxmemory at the first write only, and a PEXPIRE (which it lets through when full) first
# let every append after it past maxmemory (helper-128). A full Redis refuses the append.
_APPEND: Final = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local seq = 0
if last then
    local fields = last[2]
    local newest, nonce = -1, nil
    for i = 1, #fields, 2 do
        if fields[i] == 'i' then
            newest = tonumber(fields[i + 1])
        elseif fields[i] == 'n' then
            nonce = fields[i + 1]
        end
    end
    if newest < 0 or nonce == ARGV[1] then
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        if newest < 0 then
            return {-1, -1}
        end
        return {0, newest}
    end
    seq = newest + 1
end
if seq < tonumber(ARGV[6]) or seq > tonumber(ARGV[6]) + tonumber(ARGV[7]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'i', -1, 'n', ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {-1, seq}
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'i', seq, 'n', ARGV[1], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, seq}
"""
# Channels this process publishes to, remembered (their next number) until finished; a
# producer that never finishes (its process kept on, its lease lost) is forgotten after this
# many others began (its next append is then refused: safe).
_MAX_CHANNELS: Final = 4096


class StreamFanout:
    """The streams ``{prefix}{channel}`` of one Redis backend, each command run by its
    ``commands`` (bounded in time, errors translated); the contract is
    :class:`~sse_cache.protocols.FanoutBackend`'s, documented on
    :class:`~sse_cache.backends.redis.RedisBackend`."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        commands: Commands,
        *,
        prefix: str,
        timeout: float,
    ) -> None:
        self._client = client
        self._commands = commands
        self._prefix = prefix
        self._timeout = timeout
        # EVALSHA with a fallback to loading the script (after a restart, on a new node).
        self._append = client.register_script(_APPEND)
        # channel -> (the number of its next message, appends of unknown outcome since)
        self._next: dict[str, tuple[int, int]] = {}

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        await self._add(channel, "d", to_bytes(data), ttl, "XADD")

    async def finish(self, channel: str, *, ttl: float) -> None:
        await self._add(channel, "e", b"", ttl, "XADD (end)")

    async def _add(self, channel: str, field: str, data: bytes, ttl: float, what: str) -> None:
        check_key(channel, "channel")
        if not ttl > 0:
            raise ConfigError(f"stream ttl must be > 0 seconds, got {ttl!r}")
        counted = self._next.pop(channel, None)  # (re-inserted below: the newest last)
        expected, unknown = (0, 0) if counted is None else counted
        nonce = secrets.token_hex(8)
        args = (nonce, _STREAM_MAXLEN, milliseconds(ttl), field, data, expected, unknown)
        # What the next append must follow (nothing after an end marker that was taken:
        # forgotten). A refused channel is kept as it was, so that every later append is
        # refused too — an end marker's included: forgotten, a refused end sent again found
        # the stream empty (lost) and was taken as a new stream's first message, and readers
        # ended cleanly with nothing (the fan-out's state machine).
        after = (expected, unknown + 1)  # applied or not (a timeout, a cancellation): either
        ended = False
        deadline = time.monotonic() + ttl
        try:
            while True:
                try:
                    async with self._commands(what):
                        status, seq = await self._append(keys=[self._prefix + channel], args=args)
                    break
                except BackendTimeout:
                    # Redis did not answer in time (stalled, paused for a failover): the
                    # same append again — its nonce: one that was applied is not applied
                    # twice — until the stream's ttl passed (callers bound it further: a
                    # response's publish by its lease). One such command failed the channel
                    # for good, every follower elsewhere cut mid-answer (helper-150).
                    if time.monotonic() >= deadline:
                        raise
            refused = int(status) < 0
            after = (expected, unknown) if refused else (int(seq) + 1, 0)
            ended = field == "e" and not refused
        finally:
            if not ended:
                self._remember(channel, *after)
        if refused:
            if counted is None:
                raise BackendError(
                    f"{what}: stream {channel!r} has messages this process did not append "
                    "(another publisher, a publish after its end, or one of more than "
                    f"{_MAX_CHANNELS} channels this process had under way)"
                )
            raise BackendError(
                f"{what}: stream {channel!r} lost messages (it ends before #{expected}, which "
                f"this process was to append next): {_LOST}"
            )

    def _remember(self, channel: str, expected: int, unknown: int) -> None:
        known = self._next
        known[channel] = (expected, unknown)
        if len(known) > _MAX_CHANNELS:
            del known[next(iter(known))]

    async def read(self, channel: str, *, start: str, block: float) -> AsyncIterator[bytes]:
        check_key(channel, "channel")
        if not block > 0:
            raise ConfigError(f"read block must be > 0 seconds, got {block!r}")
        name = self._prefix + channel
        last: str | bytes = start
        if start == "$":
            # XREAD's "$" means "newer than the newest *now*": re-sent on every slice it
            # would drop what arrives between two slices, so pin it to an ID once.
            async with self._commands("XREVRANGE"):
                newest: Any = await self._client.xrevrange(name, count=1)
            last = newest[0][0] if newest else "0-0"
        expect = 0 if last in ("0", "0-0") else None  # the first message's number, if known
        # Slices shorter than the socket timeout: a blocked XREAD must not look like a hung
        # server to redis-py.
        slice_ms = max(1, int(self._timeout * 500))
        count = _READ_COUNT[0]
        deadline = time.monotonic() + block
        stalled: BackendTimeout | None = None  # the last read Redis did not answer in time
        while True:
            left_ms = (deadline - time.monotonic()) * 1000  # (inf for block=inf)
            if left_ms <= 0:
                if stalled is not None:
                    raise stalled  # (it says Redis stalled, not the producer)
                raise BackendTimeout(f"XREAD: no message on stream {channel!r} for {block} seconds")
            wait_ms = slice_ms if left_ms >= slice_ms else math.ceil(left_ms)
            try:
                async with self._commands("XREAD"):
                    reply: Any = await self._client.xread({name: last}, count=count, block=wait_ms)
            except BackendTimeout as exc:
                # Redis did not answer in time (stalled, paused for a failover): silence, as
                # a slice with no message — read again (from the same entry: nothing is
                # lost) until ``block`` seconds passed with nothing. One such command failed
                # every follower of the stream mid-answer (a stall of 0.6 s; helper-150).
                stalled = exc
                continue
            stalled = None
            entries = _stream_entries(reply)
            if not entries:
                continue
            deadline = time.monotonic() + block
            size = sum(len(fields.get(b"d", b"")) for _, fields in entries) // len(entries)
            count = max(1, min(_READ_COUNT[1], _READ_BYTES // max(size, 1)))
            for entry_id, fields in entries:
                last = entry_id
                seq = int(fields.get(b"i", b"-1"))
                if seq < 0:  # marked by its producer, who found its newest messages gone
                    raise BackendError(f"XREAD: stream {channel!r} lost messages: {_LOST}")
                if expect is not None and seq != expect:
                    raise BackendError(
                        f"XREAD: stream {channel!r} lost messages (expected #{expect}, "
                        f"got #{seq}): trimmed or expired"
                    )
                expect = seq + 1
                if b"e" in fields:
                    return
                yield fields[b"d"]


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream ``XREAD`` reply (RESP2: ``[[name, entries]]``, RESP3:
    ``{name: [entries]}``); empty when it timed out."""
    if not reply:
        return []
    if isinstance(reply, dict):
        (value,) = reply.values()
        return list(value[0] if value and isinstance(value[0], list) else value)
    return list(reply[0][1])

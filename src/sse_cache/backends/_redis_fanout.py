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
_READ_COUNT: Final = (8, 256)
_READ_BYTES: Final = 2 * 1024 * 1024
# Append one message (field ``d``) or the end marker (field ``e``), numbered ``i`` (0, 1, ...)
# so that readers notice lost messages, tagged with the caller's nonce ``n``: redis-py retries
# a command once after a timeout, and a retried append whose first attempt was applied (only
# its reply was lost) must not append twice. One producer per channel, so a retry can only
# repeat the newest entry. Appending and refreshing the expiry in one script keeps the stream
# from living forever if the client dies in between.
_APPEND: Final = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local seq = 0
if last then
    local fields = last[2]
    for i = 1, #fields, 2 do
        if fields[i] == 'n' and fields[i + 1] == ARGV[1] then
            redis.call('PEXPIRE', KEYS[1], ARGV[3])
            return 0
        end
        if fields[i] == 'i' then
            seq = tonumber(fields[i + 1]) + 1
        end
    end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'i', seq, 'n', ARGV[1], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


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

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        await self._add(channel, "d", to_bytes(data), ttl, "XADD")

    async def finish(self, channel: str, *, ttl: float) -> None:
        await self._add(channel, "e", b"", ttl, "XADD (end)")

    async def _add(self, channel: str, field: str, data: bytes, ttl: float, what: str) -> None:
        check_key(channel, "channel")
        if not ttl > 0:
            raise ConfigError(f"stream ttl must be > 0 seconds, got {ttl!r}")
        args = (secrets.token_hex(8), _STREAM_MAXLEN, milliseconds(ttl), field, data)
        async with self._commands(what):
            await self._append(keys=[self._prefix + channel], args=args)

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
        while True:
            left_ms = (deadline - time.monotonic()) * 1000  # (inf for block=inf)
            if left_ms <= 0:
                raise BackendTimeout(f"XREAD: no message on stream {channel!r} for {block} seconds")
            wait_ms = slice_ms if left_ms >= slice_ms else math.ceil(left_ms)
            async with self._commands("XREAD"):
                reply: Any = await self._client.xread({name: last}, count=count, block=wait_ms)
            entries = _stream_entries(reply)
            if not entries:
                continue
            deadline = time.monotonic() + block
            size = sum(len(fields.get(b"d", b"")) for _, fields in entries) // len(entries)
            count = max(1, min(_READ_COUNT[1], _READ_BYTES // max(size, 1)))
            for entry_id, fields in entries:
                last = entry_id
                seq = int(fields.get(b"i", b"-1"))
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

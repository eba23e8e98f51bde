"""A follower of another process's live stream (sse_cache.http._fanout._ProcessSource): what
its readers are told when reading the producer's channel stops."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sse_cache.errors import BackendTimeout
from sse_cache.flight import Flight, LiveFlight, Phase
from sse_cache.http._fanout import _ProcessSource

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])]


class Held:
    """The follower's presence on the channel (a Redis lock in production): always held."""

    async def keep(self) -> None:
        pass

    async def release(self) -> None:
        pass


async def _timing_out(error: BackendTimeout) -> AsyncIterator[bytes]:
    yield b"d" + b"data: 1\n\n"
    raise error


@pytest.mark.parametrize(
    "error",
    [
        BackendTimeout("XREAD: no message on stream 'c' for 3.0 seconds"),
        BackendTimeout("XREAD: Redis did not answer in time (TimeoutError())"),
    ],
    ids=["producer-silent", "redis-stalled"],
)
async def test_a_timed_out_read_of_the_channel_says_which_timeout(error: BackendTimeout) -> None:
    # Both are BackendTimeout; a Redis stalled for a second, the producer alive, was told to
    # every follower (and logged) as "the process producing this stream went silent
    # (killed?)" (helper-128). The reason carries the error, which says which.
    live: LiveFlight[bytes] = LiveFlight(Flight("k"))
    source = _ProcessSource(live, _timing_out(error), idle_timeout=60.0, presence=Held())  # type: ignore[arg-type]
    assert await source() is True
    assert await source() is False
    assert live.flight.phase is Phase.FAILED
    assert live.flight.reason == f"following the producing process timed out: {error}"

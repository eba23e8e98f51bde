"""The engine on its own: the same streamed request twice, a miss then a hit."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import anyio

from sse_cache import Event, StreamCache
from sse_cache.adapters import GenericSSE


async def upstream() -> AsyncIterator[Event]:  # any async iterator of Event: an LLM stream
    for word in ["Hello", " world", "!"]:
        await anyio.sleep(0.05)
        yield Event(data=word)


async def main(db: str) -> None:
    async with StreamCache(f"sqlite:///{db}", GenericSSE(), ttl=3600) as cache:
        # tenant: whose answer it is (a user id, a hash of the caller's credentials:
        # sse_cache.keys.tenant_scope(headers)); shared=True in its place shares answers
        # between every caller.
        request = cache.request({"model": "m", "input": "hi", "stream": True}, tenant="user-42")
        for _ in range(2):
            async with cache.stream(request, upstream) as stream:
                text = "".join([event.data async for event in stream])
            print(stream.status, text)  # miss Hello world!  then  hit Hello world!


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "quickstart.db")

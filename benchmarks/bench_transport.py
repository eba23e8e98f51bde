"""Transport benchmark: a cache hit through the official openai SDK vs the SDK with no cache.

One OpenAI Responses stream of 2,000 text deltas of 50 characters each (plus the reasoning
summary and framing events) is served over loopback HTTP by uvicorn, one event per write, as
the providers send it. That upstream runs in an OS process of its own (this script, started
again with ``--serve-upstream``), as in production: in a thread of the timed process it would
take its share of the GIL from the no-cache floor, which reads it while it serves, and not
from a hit, which never reaches it - flattering the hit/floor ratio. Measured, in the same
run, alternating within each repetition:

- **floor**: ``AsyncOpenAI`` (plain ``httpx2.AsyncClient``) reading the stream straight from
  the upstream, no cache; also against an upstream that writes the whole body at once (the
  strictest floor: nothing left but the SDK's own parsing);
- **hit**: the same SDK call through ``sse_cache.httpx2.AsyncCacheTransport`` on a SQLite
  cache that already holds the stream (no request reaches the upstream);
- the same two for the sync ``OpenAI`` client (``CacheTransport``, through its portal thread).

Time is from the call to the last event parsed by the SDK. Target: hit <= 1.2x the floor,
with exactly the original events (checked: the SDK's parsed events and the raw bytes). Every
timed hit is checked to be one: the upstream counts the requests it serves, and after each
series only the floor's reads may have reached it (the run fails otherwise).
With ``litellm`` installed, its cached streamed replay (``litellm.acompletion`` on the Chat
Completions form of the same stream, in-memory cache) is measured beside it, against the
openai SDK reading that form with no cache, checked the same way; otherwise that line says
it was skipped. (LiteLLM's cache-hit path imports its proxy modules: it needs ``pip install
'litellm[proxy]'``. The LiteLLM *proxy* against ``sse-cache proxy`` is
``benchmarks/peers/compare.py``.)

Run: ``.venv/bin/python benchmarks/bench_transport.py [--repeat N] [--deltas N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import httpx2
import uvicorn
from _servers import HOST, server
from openai import AsyncOpenAI, OpenAI

from sse_cache import Event, serialize_sse
from sse_cache.httpx2 import AsyncCacheTransport, CacheTransport
from sse_cache.testing import responses_stream

MODEL = "gpt-mock-1"
PROMPT = "benchmark"
Scope = MutableMapping[str, Any]


class Upstream:
    """Serves pre-built SSE bodies (one event per ``http.response.body`` message, no delay)
    and counts the requests it receives (``GET /_upstream/requests``, not counted)."""

    def __init__(self, deltas: int, delta_chars: int) -> None:
        events = exact_stream(deltas, delta_chars)
        self.responses_chunks = [serialize_sse([e]) for e in events]
        self.body = b"".join(self.responses_chunks)
        self.chat_chunks = [serialize_sse([e]) for e in chat_stream(events)]
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        path: str = scope["path"]
        if path == "/_upstream/requests":
            count = str(self.requests).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": count})
            return
        self.requests += 1
        if path.endswith("/chat/completions"):
            chunks = self.chat_chunks
        elif path.startswith("/bulk/"):
            chunks = [self.body]  # the whole stream in one write: the strictest floor
        else:
            chunks = self.responses_chunks
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def exact_stream(deltas: int, delta_chars: int) -> list[Event]:
    """A Responses stream with exactly ``deltas`` text deltas of ``delta_chars`` characters:
    :func:`responses_stream` with a longer answer, cut to size (the texts of the closing
    events follow, sequence numbers stay contiguous)."""
    events = responses_stream(
        PROMPT, text_deltas=deltas + deltas // 10 + 10, delta_chars=delta_chars
    )
    kept: list[Event] = []
    text: list[str] = []
    for event in events:
        data = json.loads(event.data)
        if event.event == "response.output_text.delta":
            if len(text) == deltas:
                continue
            assert len(data["delta"]) == delta_chars
            text.append(data["delta"])
        answer = "".join(text)
        if event.event == "response.output_text.done":
            data["text"] = answer
        elif event.event == "response.content_part.done":
            data["part"]["text"] = answer
        elif event.event == "response.output_item.done" and data["item"]["type"] == "message":
            data["item"]["content"][0]["text"] = answer
        elif event.event == "response.completed":
            data["response"]["output"][-1]["content"][0]["text"] = answer
        data["sequence_number"] = len(kept)
        kept.append(Event(json.dumps(data, separators=(",", ":"), ensure_ascii=False), event.event))
    assert len(text) == deltas
    return kept


def chat_stream(responses: list[Event]) -> list[Event]:
    """The Chat Completions form of the same answer: one chunk per text delta of
    ``responses``, then ``finish_reason`` and ``[DONE]``."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> Event:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_750_000_000,
            "model": MODEL,
            "choices": [choice],
        }
        return Event(json.dumps(payload, separators=(",", ":"), ensure_ascii=False))

    pieces = [
        json.loads(e.data)["delta"] for e in responses if e.event == "response.output_text.delta"
    ]
    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": piece}) for piece in pieces),
        chunk({}, "stop"),
        Event("[DONE]"),
    ]


def serve_upstream(port: int, deltas: int, delta_chars: int) -> None:
    """The upstream's process (``--serve-upstream PORT``): uvicorn on its main thread."""
    app = Upstream(deltas, delta_chars)
    uvicorn.run(
        app, host=HOST, port=port, log_level="warning", lifespan="off", ws="none", http="h11"
    )


class NotAHit(RuntimeError):
    """A timed call that had to be a cache hit reached the upstream."""


def upstream_requests(url: str) -> int:
    """The requests the upstream has served so far."""
    return int(httpx2.get(f"{url}/_upstream/requests").text)


def check_hits(name: str, url: str, before: int, expected: int) -> None:
    """Only the ``expected`` floor reads reached the upstream since ``before``: every timed
    hit was one."""
    extra = upstream_requests(url) - before - expected
    if extra:
        raise NotAHit(f"{name}: {extra} timed hit(s) reached the upstream")


async def read_async(client: AsyncOpenAI) -> list[Any]:
    stream = await client.responses.create(model=MODEL, input=PROMPT, stream=True)
    async with stream:
        return [event async for event in stream]


def read_sync(client: OpenAI) -> list[Any]:
    with client.responses.create(model=MODEL, input=PROMPT, stream=True) as stream:
        return list(stream)


async def atime(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def stime(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    """Median [min-max] in ms."""
    low, high = min(values) * 1e3, max(values) * 1e3
    return f"{statistics.median(values) * 1e3:6.1f} [{low:.0f}-{high:.0f}]"


def report(name: str, floor: list[float], hit: list[float], target: float = 1.2) -> None:
    """Medians [min-max]; the ratio of the medians, and its range over the repetitions (each
    hit against the floor read just before it)."""
    ratio = statistics.median(hit) / statistics.median(floor)
    ratios = [h / f for f, h in zip(floor, hit, strict=True)]
    verdict = "OK" if ratio <= target else "OVER TARGET"
    print(f"{name:<34} floor {spread(floor)} ms   hit {spread(hit)} ms   ", end="")
    print(
        f"hit/floor {ratio:4.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]  "
        f"(target <= {target}x: {verdict})"
    )


async def bench_async(url: str, cache: str, repeat: int) -> None:
    plain = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-bench", http_client=httpx2.AsyncClient())
    cached = AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="sk-bench",
        http_client=httpx2.AsyncClient(transport=AsyncCacheTransport(cache)),
    )
    bulk = AsyncOpenAI(
        base_url=f"{url}/bulk/v1", api_key="sk-bench", http_client=httpx2.AsyncClient()
    )
    async with plain, cached, bulk, httpx2.AsyncClient() as http:
        # The upstream's own bytes, for the byte-for-byte check of a hit.
        request = {"model": MODEL, "input": PROMPT, "stream": True}
        body = (await http.post(f"{url}/v1/responses", json=request)).content
        original = await read_async(plain)
        recorded = await read_async(cached)  # the miss: recorded and stored
        before = upstream_requests(url)
        replayed = await read_async(cached)
        assert upstream_requests(url) == before, "the hit reached the upstream"
        dumps = [e.model_dump() for e in original]
        assert [e.model_dump() for e in recorded] == dumps
        assert [e.model_dump() for e in replayed] == dumps, "the hit's events differ"
        deltas = sum(e.type == "response.output_text.delta" for e in replayed)
        # Byte for byte too, below the SDK.
        raw = await cached.responses.with_raw_response.create(
            model=MODEL, input=PROMPT, stream=True
        )
        assert raw.headers["x-sse-cache"] == "hit"
        assert await raw.http_response.aread() == body, "the hit's bytes differ"
        print(
            f"stream: {len(original)} events, {deltas} text deltas, {len(body):,} bytes"
            f" of SSE; hit == original: events and bytes identical"
        )
        floor: list[float] = []
        bulk_floor: list[float] = []
        hit: list[float] = []
        before = upstream_requests(url)
        for _ in range(repeat):
            floor.append(await atime(lambda: read_async(plain)))
            bulk_floor.append(await atime(lambda: read_async(bulk)))
            hit.append(await atime(lambda: read_async(cached)))
        check_hits("async OpenAI, AsyncCacheTransport", url, before, 2 * repeat)
        report("async OpenAI, AsyncCacheTransport", floor, hit)
        report("  vs upstream body in one write", bulk_floor, hit)


def bench_sync(url: str, cache: str, repeat: int) -> None:
    plain = OpenAI(base_url=f"{url}/v1", api_key="sk-bench", http_client=httpx2.Client())
    bulk = OpenAI(base_url=f"{url}/bulk/v1", api_key="sk-bench", http_client=httpx2.Client())
    cached = OpenAI(
        base_url=f"{url}/v1",
        api_key="sk-bench",
        http_client=httpx2.Client(transport=CacheTransport(cache)),
    )
    with plain, cached, bulk:
        original = read_sync(plain)
        read_sync(cached)
        assert [e.model_dump() for e in read_sync(cached)] == [e.model_dump() for e in original]
        floor: list[float] = []
        bulk_floor: list[float] = []
        hit: list[float] = []
        before = upstream_requests(url)
        for _ in range(repeat):
            floor.append(stime(lambda: read_sync(plain)))
            bulk_floor.append(stime(lambda: read_sync(bulk)))
            hit.append(stime(lambda: read_sync(cached)))
        check_hits("sync OpenAI, CacheTransport", url, before, 2 * repeat)
        report("sync OpenAI, CacheTransport", floor, hit)
        report("  vs upstream body in one write", bulk_floor, hit)


async def bench_litellm(url: str, repeat: int) -> None:
    # Its bundled price list, not a download (this runs offline too).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
        from litellm.caching.caching import Cache
    except ImportError:
        print("litellm: not installed, comparison skipped (pip install litellm)")
        return
    litellm.cache = Cache(type="local")
    kwargs: dict[str, Any] = {
        "model": f"openai/{MODEL}",
        "messages": [{"role": "user", "content": PROMPT}],
        "api_base": f"{url}/v1",
        "api_key": "sk-bench",
        "stream": True,
        "caching": True,
    }

    async def read() -> int:
        n = 0
        async for _chunk in await litellm.acompletion(**kwargs):
            n += 1
        return n

    plain = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-bench", http_client=httpx2.AsyncClient())

    async def floor_read() -> int:
        stream = await plain.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        async with stream:
            return sum([1 async for _ in stream])

    async with plain:
        original = await floor_read()
        # LiteLLM stores the assembled stream in the background once it ended: read until a
        # read no longer reaches the upstream.
        for _ in range(60):
            before = upstream_requests(url)
            replayed = await read()
            if upstream_requests(url) == before:
                break
            await anyio.sleep(0.25)
        else:
            raise NotAHit("litellm: still not a hit after 60 reads")
        floor: list[float] = []
        hit: list[float] = []
        before = upstream_requests(url)
        for _ in range(repeat):
            floor.append(await atime(floor_read))
            hit.append(await atime(read))
        check_hits("litellm cached stream", url, before, repeat)
    ratios = [h / f for f, h in zip(floor, hit, strict=True)]
    print(
        f"{'litellm cached stream (chat form)':<34} floor {spread(floor)} ms   hit {spread(hit)}"
        f" ms   hit/floor {statistics.median(hit) / statistics.median(floor):4.2f}x "
        f"[{min(ratios):.2f}-{max(ratios):.2f}]  ({replayed:,} chunks replayed for {original:,})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--deltas", type=int, default=2000)
    parser.add_argument("--delta-chars", type=int, default=50)
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, args.deltas, args.delta_chars)
        return
    sizes = ["--deltas", str(args.deltas), "--delta-chars", str(args.delta_chars)]
    with (
        server(sys.executable, __file__, "--serve-upstream", "{port}", *sizes) as upstream,
        tempfile.TemporaryDirectory() as tmp,
    ):
        async_cache = f"sqlite:///{Path(tmp) / 'async.db'}"
        sync_cache = f"sqlite:///{Path(tmp) / 'sync.db'}"
        anyio.run(bench_async, upstream.url, async_cache, args.repeat)
        bench_sync(upstream.url, sync_cache, args.repeat)
        try:
            anyio.run(bench_litellm, upstream.url, args.repeat)
        except NotAHit:
            raise
        except Exception as exc:  # an optional comparison must not fail the benchmark
            print(f"litellm: comparison failed: {exc!r:.200}")


if __name__ == "__main__":
    main()

"""Engine benchmark: replay, tee and parser rates as ratios to baselines of the same run.

For a 2,000-delta OpenAI Responses stream (8 characters per delta by default, the ~490 KB
stream docs/benchmarks.md ("What bounds a replay") measures; ``--delta-chars 50`` for a
stress case of ~900 KB):

(a) hit replay from the memory backend, including the backend GET, vs a raw async generator
    over the same pre-decoded events                               (target >= 0.3x)
    - hot: the entry's decoded form is still in the engine's decoded-entry cache (the bytes
      are read and compared, not decoded again): repeated hits of a popular request;
    - cold: decoded from its bytes on every hit (``decoded_cache_bytes=0``).
(b) a miss through the tee (record + store) vs a plain passthrough loop over the same upstream
                                                                   (target >= 0.5x)
(c) SSEParser vs httpx-sse's line decoder on the same bytes        (target >= 2x)
(d) time to the first replayed event on a hit

Run: ``.venv/bin/python benchmarks/bench_engine.py [--repeat N]``. Medians of N runs; the
baseline and the measured path alternate within each repetition so machine noise hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from sse_cache import Event, SSEParser, StreamCache, serialize_sse
from sse_cache.adapters import GenericSSE
from sse_cache.backends import from_url
from sse_cache.testing import responses_stream

BODY = {"model": "gpt-mock-1", "input": "benchmark", "stream": True}


async def upstream_of(events: Sequence[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event


async def bare_tee(upstream: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The floor of any tee that hands events on as an iterator: one generator layer that
    records nothing."""
    async for event in upstream:
        yield event


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def atimed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    await fn()  # type: ignore[misc]
    return time.perf_counter() - start


def parse_ours(raw: bytes) -> int:
    parser = SSEParser()
    n = 0
    for i in range(0, len(raw), 16384):  # network-sized chunks
        n += len(parser.feed(raw[i : i + 16384]))
    return n


def parse_httpx_sse(raw: bytes) -> int:
    lines, decoder, n = SSELineDecoder(), SSEDecoder(), 0
    for i in range(0, len(raw), 16384):
        for line in lines.decode(raw[i : i + 16384].decode("utf-8", "ignore")):
            if decoder.decode(line) is not None:
                n += 1
    return n


async def main(repeat: int, delta_chars: int) -> None:
    events = responses_stream("benchmark", text_deltas=2000, delta_chars=delta_chars, summaries=2)
    raw = serialize_sse(events)
    print(f"stream: {len(events)} events, {len(raw) / 1024:.0f} KiB of SSE; {repeat} repetitions")

    backend = from_url("memory://")
    cache = StreamCache(backend, GenericSSE())
    cold_cache = StreamCache(backend, GenericSSE(), decoded_cache_bytes=0)
    request = cache.request(BODY, shared=True)
    async with cache.stream(request, lambda: upstream_of(events)) as s:
        async for _ in s:
            pass
    assert s.stored
    # The tee stores under another key, so that it does not replace the replayed entry.
    tee_request = cache.request({**BODY, "input": "benchmark the tee"}, shared=True)

    raw_gen, replay, cold, first = [], [], [], []
    passthrough, tee_delivery, tee_total, floor = [], [], [], []
    ours, theirs = [], []
    for _ in range(repeat):

        async def raw_loop() -> None:
            async for _ in upstream_of(events):
                pass

        async def replay_loop(cache: StreamCache = cache) -> None:
            async with cache.stream(request, lambda: upstream_of(events)) as stream:
                async for _ in stream:
                    pass
            assert stream.status == "hit"

        async def first_event() -> None:
            start = time.perf_counter()
            async with cold_cache.stream(request, lambda: upstream_of(events)) as stream:
                async for _ in stream:
                    first.append(time.perf_counter() - start)
                    break

        raw_gen.append(await atimed(raw_loop))
        replay.append(await atimed(replay_loop))
        cold.append(await atimed(lambda: replay_loop(cold_cache)))
        await first_event()

        async def tee_loop() -> None:
            start = time.perf_counter()
            async with cache.stream(tee_request, lambda: upstream_of(events), lookup=False) as st:
                async for _ in st:
                    pass
                tee_delivery.append(time.perf_counter() - start)
            # leaving the block judged, encoded and stored the stream
            assert st.stored

        async def floor_loop() -> None:
            async for _ in bare_tee(upstream_of(events)):
                pass

        passthrough.append(await atimed(raw_loop))
        tee_total.append(await atimed(tee_loop))
        floor.append(await atimed(floor_loop))

        theirs.append(timed(lambda: parse_httpx_sse(raw)))
        ours.append(timed(lambda: parse_ours(raw)))

    assert parse_ours(raw) == parse_httpx_sse(raw) == len(events)
    med = statistics.median

    def row(name: str, base: list[float], value: list[float], target: float) -> None:
        ratio = med(base) / med(value)
        mark = "ok" if ratio >= target else "BELOW TARGET"
        print(
            f"{name:<38} {med(value) * 1e3:8.2f} ms  baseline {med(base) * 1e3:7.2f} ms  "
            f"rate {ratio:5.2f}x (target >= {target}x) {mark}"
        )

    print()
    row("(a) hit replay, hot (decoded cache)", raw_gen, replay, 0.3)
    row("(a) hit replay, cold (incl. decode)", raw_gen, cold, 0.3)
    row("(b) miss tee, delivery of all events", passthrough, tee_delivery, 0.5)
    row("(b) miss tee, incl. encode + store", passthrough, tee_total, 0.5)
    row("(b) floor: bare re-yielding generator", passthrough, floor, 0.5)
    row("(c) SSEParser vs httpx-sse", theirs, ours, 2.0)
    print(f"{'(d) cold hit: time to first event':<38} {med(first) * 1e3:8.3f} ms")
    print(
        f"    per event: replay hot {med(replay) / len(events) * 1e6:.2f} us, "
        f"cold {med(cold) / len(events) * 1e6:.2f} us, "
        f"raw generator {med(raw_gen) / len(events) * 1e6:.2f} us"
    )
    await cache.aclose()
    await backend.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--delta-chars",
        type=int,
        default=8,
        help="characters per text delta: 8 gives the 2,000-event, ~490 KB stream of "
        "docs/benchmarks.md (real deltas are a token or two); 50 is a heavier stress case",
    )
    args = parser.parse_args()
    anyio.run(main, args.repeat, args.delta_chars)

"""Metrics benchmark: what the Prometheus hook costs, as ratios to baselines of the same run.

(a) a hit through the engine (memory backend, a short 20-delta stream: per-request costs
    dominate, the worst case for a hook) with ``hooks=[Metrics()]`` vs without hooks
                                                                   (target <= 1.1x)
(b) one notice into ``Metrics`` (a counter, a histogram observation) vs into a hook that
    does nothing: microseconds per notice
(c) a scrape (``Metrics.render``) while 100 live streams with 10 followers each are in
    flight, vs with none: milliseconds

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--repeat N]``. Medians (and ranges) of N
runs; the baseline and the measured path alternate within each repetition.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence

import anyio

from sse_cache import Event, StreamCache
from sse_cache.adapters import GenericSSE
from sse_cache.engine import Notice
from sse_cache.flight import Flights
from sse_cache.metrics import Metrics
from sse_cache.testing import responses_stream

BODY = {"model": "gpt-mock-1", "input": "benchmark", "stream": True}
HITS = 2000
NOTICES = 100_000


async def upstream_of(events: Sequence[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: list[float], scale: float, unit: str) -> str:
    low, mid, high = min(values) * scale, statistics.median(values) * scale, max(values) * scale
    return f"{mid:9.3f} {unit} (range {low:.3f}-{high:.3f})"


async def hits(cache: StreamCache) -> float:
    request = cache.request(BODY, shared=True)
    start = time.perf_counter()
    for _ in range(HITS):
        async with cache.stream(request, lambda: upstream_of(())) as stream:
            async for _event in stream:
                pass
    return (time.perf_counter() - start) / HITS


async def main(repeat: int) -> None:
    events = responses_stream("benchmark", text_deltas=20)
    bare = StreamCache("memory://", GenericSSE())
    hooked = StreamCache("memory://", GenericSSE(), hooks=[Metrics()])
    for cache in (bare, hooked):  # store the entry: every later request is a hit
        async with cache.stream(
            cache.request(BODY, shared=True), lambda: upstream_of(events)
        ) as stream:
            async for _event in stream:
                pass

    metrics = Metrics()
    notices = [
        Notice(kind="backend", key="", detail="get", seconds=0.0002),
        Notice(kind="hit", key="k", events=20, seconds=1.5),
        Notice(kind="first_byte", key="k", detail="hit", seconds=0.001),
        Notice(kind="replayed", key="k", bytes=4096),
    ]

    def feed(hook: Callable[[Notice], None]) -> None:
        for i in range(NOTICES):
            hook(notices[i & 3])

    def nothing(_: Notice) -> None:
        pass

    idle, busy = Metrics(), Metrics()
    live = Flights()
    busy.watch(live)
    for n in range(100):
        flight, _ = live.claim(f"key-{n}")
        for _ in range(10):
            flight.flight.follow()

    base_hit: list[float] = []
    hook_hit: list[float] = []
    base_notice: list[float] = []
    hook_notice: list[float] = []
    idle_scrape: list[float] = []
    busy_scrape: list[float] = []
    for _ in range(repeat):
        base_hit.append(await hits(bare))
        hook_hit.append(await hits(hooked))
        base_notice.append(timed(lambda: feed(nothing)) / NOTICES)
        hook_notice.append(timed(lambda: feed(metrics)) / NOTICES)
        idle_scrape.append(timed(idle.render))
        busy_scrape.append(timed(busy.render))

    ratio = statistics.median(hook_hit) / statistics.median(base_hit)
    print(f"(a) hit without hooks     {spread(base_hit, 1e6, 'us')}")
    print(f"    hit with Metrics      {spread(hook_hit, 1e6, 'us')}")
    print(f"    ratio                 {ratio:9.3f}x  (target <= 1.1x)")
    print(f"(b) notice, no-op hook    {spread(base_notice, 1e6, 'us')}")
    print(f"    notice, Metrics       {spread(hook_notice, 1e6, 'us')}")
    print(f"(c) scrape, no streams    {spread(idle_scrape, 1e3, 'ms')}")
    print(f"    scrape, 100 x 10      {spread(busy_scrape, 1e3, 'ms')}")
    scrape_ratio = statistics.median(busy_scrape) / statistics.median(idle_scrape)
    print(f"    ratio                 {scrape_ratio:9.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    anyio.run(main, parser.parse_args().repeat)

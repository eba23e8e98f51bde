"""Fan-out benchmark: N identical streamed requests at once, and cross-process following on Redis.

(a) Live fan-out through the caching proxy over loopback HTTP. The mock upstream
    (``sse-cache mock-upstream``: a real time to first byte, 300 ms by default, then one event
    every 20 ms, like a model; 60 deltas: ~118 events, ~2.6 s) and the proxy
    (``create_proxy_app(upstream, "memory://")`` under uvicorn) run in their own processes, as
    in bench_proxy.py. For each N (``--n``, default 1,10,100,1000) and each round
    (``--rounds``, default 3, each with its own cache key through an ``x-sse-cache-namespace``
    header), the client opens N connections first
    (N concurrent ``GET /_sse_cache/health``, so that neither phase measures TCP connects),
    then N tasks wait on one ``anyio.Event`` and send the same ``POST /v1/responses``
    (``"stream": true``) when it is set:

    - fan-out: the time from the release until the last of the N responses has its last byte,
      with the key not yet stored: ideally one upstream call (``miss``) whose stream the other
      N-1 requests follow live (``shared``);
    - hit: the same herd again once the entry is stored: N independent ``hit`` replays.

    Printed per N: fan-out and hit times (median [min-max] over the rounds), the ratio
    fan-out / hit, fan-out at N over fan-out at N=1 (what the herd adds to the stream's own
    duration, which bounds the fan-out from below), the upstream calls per round (the mock's
    ``/_mock/stats`` counter, and the most it answered at once), the ``x-sse-cache`` statuses
    and whether every body was byte-identical (within each phase and across them). Nothing is
    asserted: a herd that is not collapsed shows as more than one upstream call. Each herd
    also prints the CPU seconds the client (this process) and the proxy used during it: one
    client process reads all N streams (over httpx2 pools of 50 connections; one pool of 1,000
    is quadratic and measured itself), so at large N the client's CPU bounds the hit time, and
    the fan-out / hit ratio is then a lower bound. ``--n-budget`` (40 s) stops starting rounds
    for an N that has used it (an uncollapsed herd of 1,000 takes ~10 upstream waves, since
    the proxy's forwarder has 100 upstream connections); ``--round-timeout`` bounds a herd.

(b) Cross-process follower latency on loopback Redis (a redis-server this script starts): a
    producer in this process publishes ``--messages`` messages (default 2,000 of ``--size``
    200 bytes, one every ``--interval-ms`` 2 ms) to one channel; ``--followers`` (default 2)
    separate OS processes read it from the start and record, for each message, receive time
    minus the send time the producer wrote into it (``time.monotonic_ns``: CLOCK_MONOTONIC,
    one clock for every process of the machine), taken just before the publish call. Two paths,
    alternated over ``--redis-reps`` repetitions (default 2) after one unrecorded warm-up each:

    - sse_cache: ``RedisBackend.publish`` / ``finish`` and ``RedisBackend.read`` (the calls
      cross-process single-flight uses: a Lua script around ``XADD``, ``XREAD BLOCK``);
    - raw (the baseline): redis-py asyncio ``XADD`` and an ``XREAD BLOCK`` loop, no sse_cache
      code.

    Printed: p50 / p99 / max latency in ms over all followers' messages of each run, the
    medians over the repetitions (max: the largest), the producer's publish-call p50, and the
    ratios sse_cache / raw of the same run.

Run: ``.venv/bin/python benchmarks/bench_fanout.py [--n 1,10,100] [--rounds 3] [--skip-redis]``.
Compare ratios, not absolute times: client, proxy, upstream and Redis share this machine's
cores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _servers import Server, server

from servers import RedisServer, ServerMissing, find_binary

HEADERS = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
BODY = b'{"model": "gpt-mock-1", "input": "fan-out benchmark", "stream": true}'
# The proxy: create_proxy_app on the memory backend under uvicorn, in its own process, as
# `sse-cache proxy --backend memory://` runs it, except for a longer keep-alive (uvicorn's 5 s
# lets the server close pooled connections between two herds, and a request sent as it closes
# one fails with "Server disconnected").
PROXY_APP = """
import sys, uvicorn
from sse_cache.proxy import create_proxy_app
uvicorn.run(create_proxy_app(sys.argv[1], "memory://"), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning", lifespan="on", timeout_keep_alive=120)
"""
# Connections per httpx2 client. Assigning a request to a connection, and returning it, costs
# httpx2's pool O(connections) (and a socket probe per idle one): with one pool of 1,000
# connections the client spent 18 s of CPU on 1,000 hits, and measured itself, not the proxy.
PER_POOL = 50
STREAM_TTL = 60.0
RAW_PREFIX = "bench-fanout-raw:"


# -- (a) fan-out through the proxy --------------------------------------------------------------


@dataclass
class Herd:
    """One herd of N requests released at once."""

    elapsed: float | None  # release -> last byte of the last response; None: timed out
    statuses: Counter[str] = field(default_factory=Counter)
    bodies: Counter[bytes] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    upstream_calls: int = 0
    upstream_max_in_flight: int = 0
    client_cpu: float = math.nan  # CPU seconds this process used during the herd
    proxy_cpu: float = math.nan  # CPU seconds the proxy process used during the herd


def pick(clients: list[httpx2.AsyncClient], n: int) -> Callable[[int], httpx2.AsyncClient]:
    """Request i of N goes to pool i mod P, P = the fewest pools of PER_POOL that hold N."""
    used = clients[: max(1, min(len(clients), math.ceil(n / PER_POOL)))]
    return lambda i: used[i % len(used)]


async def warm_pool(clients: list[httpx2.AsyncClient], proxy: str, n: int) -> None:
    """Open (about) N connections to the proxy: N concurrent health checks (a failed one is
    tried again, up to three times: this only prepares the pools)."""
    client_of = pick(clients, n)

    async def one(i: int) -> None:
        client = client_of(i)
        for attempt in range(3):
            try:
                (await client.get(proxy + "/_sse_cache/health")).raise_for_status()
                return
            except httpx2.HTTPError:
                if attempt == 2:
                    raise

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)


async def herd(
    clients: list[httpx2.AsyncClient],
    proxy: Server,
    headers: dict[str, str],
    n: int,
    limit: float,
) -> Herd:
    """Release N identical streamed requests at once; wait for every last byte."""
    url = proxy.url + "/v1/responses"
    release = anyio.Event()
    all_waiting = anyio.Event()
    waiting = 0
    ends: list[float] = []
    result = Herd(elapsed=None)
    start = 0.0
    client_of = pick(clients, n)

    async def one(i: int) -> None:
        nonlocal waiting
        client = client_of(i)
        waiting += 1
        if waiting == n:
            all_waiting.set()
        await release.wait()
        try:
            async with client.stream("POST", url, content=BODY, headers=headers) as response:
                parts = [chunk async for chunk in response.aiter_raw()]
                status = response.headers.get("x-sse-cache", "-")
                if response.status_code != 200:
                    status = f"{status}/http {response.status_code}"
                    result.errors.append(f"http {response.status_code}: {b''.join(parts)[:100]!r}")
            ends.append(time.perf_counter())
            result.statuses[status] += 1
            result.bodies[b"".join(parts)] += 1
        except Exception as exc:  # reported, not raised: one failure must not hide the rest
            result.errors.append(repr(exc))

    with anyio.move_on_after(limit):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
            await all_waiting.wait()
            cpu0, proxy0 = time.process_time(), proxy.cpu()
            start = time.perf_counter()
            release.set()
        if len(ends) == n:  # every response ended (whatever its status)
            result.elapsed = max(ends) - start
            result.client_cpu = time.process_time() - cpu0
            result.proxy_cpu = proxy.cpu() - proxy0
    return result


async def fanout_round(
    control: httpx2.AsyncClient,
    clients: list[httpx2.AsyncClient],
    proxy: Server,
    upstream: str,
    n: int,
    ns: str,
    limit: float,
) -> tuple[Herd, Herd]:
    headers = {**HEADERS, "x-sse-cache-namespace": ns}
    (await control.post(upstream + "/_mock/reset")).raise_for_status()
    await warm_pool(clients, proxy.url, n)
    fan = await herd(clients, proxy, headers, n, limit)
    stats = (await control.get(upstream + "/_mock/stats")).json()
    fan.upstream_calls, fan.upstream_max_in_flight = stats["total"], stats["max_in_flight"]
    await warm_pool(clients, proxy.url, n)
    hit = await herd(clients, proxy, headers, n, limit)
    stats = (await control.get(upstream + "/_mock/stats")).json()
    hit.upstream_calls = stats["total"] - fan.upstream_calls
    return fan, hit


def fmt_range(values: list[float], unit: float = 1e3, suffix: str = "ms", digits: int = 1) -> str:
    if not values:
        return "n/a"
    low, med, high = (v * unit for v in (min(values), statistics.median(values), max(values)))
    return f"{med:8.{digits}f} {suffix} [{low:.{digits}f}-{high:.{digits}f}]"


def describe(h: Herd, unit: float, suffix: str, digits: int) -> str:
    took = f"{h.elapsed * unit:.{digits}f} {suffix}" if h.elapsed is not None else "n/a"
    statuses = " ".join(f"{k} {v}" for k, v in sorted(h.statuses.items()))
    text = f"{took} ({statuses}; {len(h.bodies)} distinct bodies"
    if len(h.bodies) > 1:
        sizes = ", ".join(f"{len(b)} B x{c}" for b, c in h.bodies.most_common(4))
        text += f" ({sizes})"
    if h.errors:
        text += f"; {len(h.errors)} errors, e.g. {h.errors[0][:120]}"
    if h.elapsed is None:
        text += "; INCOMPLETE (timed out or failed)"
    text += f"; upstream calls {h.upstream_calls}"
    if h.upstream_max_in_flight:
        text += f", <= {h.upstream_max_in_flight} at once"
    return text + f"; cpu client {h.client_cpu:.2f} s, proxy {h.proxy_cpu:.2f} s)"


async def bench_fanout(args: argparse.Namespace) -> None:
    cli = [sys.executable, "-m", "sse_cache"]
    mock = [*cli, "mock-upstream", "--port", "{port}", "--delay-ms", str(args.delay_ms)]
    mock += ["--first-ms", str(args.first_ms), "--deltas", str(args.deltas)]
    pools = math.ceil(max(args.n) / PER_POOL)
    limits = httpx2.Limits(
        max_connections=PER_POOL, max_keepalive_connections=PER_POOL, keepalive_expiry=60
    )
    timeout = httpx2.Timeout(args.round_timeout)
    print(
        f"(a) fan-out through the proxy (memory backend): mock upstream first byte "
        f"{args.first_ms:g} ms, then one event every {args.delay_ms:g} ms, {args.deltas} deltas; "
        f"{args.rounds} rounds per N (fewer once an N has used {args.n_budget:g} s)"
    )
    rows: list[tuple[int, list[float], list[float], list[int], list[int], bool]] = []
    with server(*mock) as upstream:
        proxy_cmd = [sys.executable, "-c", PROXY_APP, upstream.url, "{port}"]
        with server(*proxy_cmd) as proxy:
            async with AsyncExitStack() as stack:
                control = await stack.enter_async_context(httpx2.AsyncClient(timeout=30))
                clients = [
                    await stack.enter_async_context(
                        httpx2.AsyncClient(limits=limits, timeout=timeout)
                    )
                    for _ in range(pools)
                ]
                shown_stream = False
                for n in args.n:
                    fans: list[float] = []
                    hits: list[float] = []
                    calls: list[int] = []
                    in_flight: list[int] = []
                    identical = True
                    began = time.monotonic()
                    for r in range(args.rounds):
                        if r and time.monotonic() - began > args.n_budget:
                            print(f"    N={n:<5} {r} of {args.rounds} rounds: time budget spent")
                            break
                        ns = f"bench-fanout-n{n}-r{r}-{time.time_ns()}"
                        fan, hit = await fanout_round(
                            control, clients, proxy, upstream.url, n, ns, args.round_timeout
                        )
                        if not shown_stream and fan.bodies:
                            body = next(iter(fan.bodies))
                            events = body.count(b"\n\n")
                            nominal = (args.first_ms + args.delay_ms * (events - 1)) / 1e3
                            print(
                                f"    stream: {events} events, {len(body) / 1024:.1f} KiB; "
                                f"nominal duration (first byte + gaps) {nominal:.2f} s"
                            )
                            shown_stream = True
                        same = (
                            len(fan.bodies) == 1
                            and len(hit.bodies) == 1
                            and set(fan.bodies) == set(hit.bodies)
                        )
                        identical = identical and same
                        if fan.elapsed is not None:
                            fans.append(fan.elapsed)
                        if hit.elapsed is not None:
                            hits.append(hit.elapsed)
                        calls.append(fan.upstream_calls)
                        in_flight.append(fan.upstream_max_in_flight)
                        print(
                            f"    N={n:<5} round {r + 1}: fan-out {describe(fan, 1, 's', 3)}\n"
                            f"    {'':13}hit     {describe(hit, 1e3, 'ms', 1)}; "
                            f"bodies identical across both: {'yes' if same else 'NO'}"
                        )
                    rows.append((n, fans, hits, calls, in_flight, identical))
    print()
    base = next((statistics.median(f) for n, f, *_ in rows if n == 1 and f), None)
    print(
        f"    {'N':>5}  {'fan-out, all last bytes: median [min-max]':<42} "
        f"{'hit, all last bytes':<30} {'fan/hit':>8} {'fan vs N=1':>10}  identical  "
        "upstream calls per round (most at once)"
    )
    for n, fans, hits, calls, in_flight, identical in rows:
        ratio = statistics.median(fans) / statistics.median(hits) if fans and hits else math.nan
        vs1 = statistics.median(fans) / base if fans and base else math.nan
        print(
            f"    {n:>5}  {fmt_range(fans, 1, 's', 3):<42} {fmt_range(hits):<30} "
            f"{ratio:7.1f}x {vs1:9.2f}x  {'yes' if identical else 'NO':<9}  "
            f"{'/'.join(map(str, calls))} ({max(in_flight, default=0)})"
        )


# -- (b) cross-process follower latency on Redis ---------------------------------------------


def _stamp(seq: int, size: int) -> bytes:
    head = b"%08d %020d " % (seq, time.monotonic_ns())
    return head + b"x" * max(0, size - len(head))


def _sent_ns(data: bytes) -> int:
    return int(data[9:29])


async def _follow(mode: str, redis_url: str, channel: str, ready: Callable[[], None]) -> list[int]:
    """Read one channel from its start to its end; each message's latency in ns."""
    latencies: list[int] = []
    if mode == "sse_cache":
        from sse_cache.backends import from_url

        backend: Any = from_url(redis_url)
        try:
            await backend.get("bench-fanout-warm")  # opens the pooled connection
            ready()
            async for data in backend.read(channel, start="0", block=10.0):
                latencies.append(time.monotonic_ns() - _sent_ns(data))
        finally:
            await backend.aclose()
        return latencies
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    key, last = RAW_PREFIX + channel, "0-0"
    try:
        await client.ping()
        ready()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            reply: Any = await client.xread({key: last}, block=250, count=256)
            if not reply:
                continue
            deadline = time.monotonic() + 10.0
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if b"e" in fields:
                    return latencies
                latencies.append(time.monotonic_ns() - _sent_ns(fields[b"d"]))
        raise TimeoutError(f"raw follower: no message on {key} for 10 s")
    finally:
        await client.aclose()


def follower_process(index: int, redis_url: str, commands: Any, results: Any) -> None:
    """A follower in its own OS process: runs (mode, channel) commands until None."""
    while True:
        try:
            command = commands.get(timeout=600)
        except Exception:
            return
        if command is None:
            return
        mode, channel = command
        try:
            latencies = asyncio.run(
                _follow(mode, redis_url, channel, lambda: results.put(("ready", index, None)))
            )
            results.put(("done", index, latencies))
        except Exception as exc:
            results.put(("done", index, repr(exc)))


@dataclass
class LatencyRun:
    mode: str
    latencies_ms: list[float]
    publish_ms: list[float]
    pace_ms: float
    errors: list[str]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Followers:
    def __init__(self, redis_url: str, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with a running loop
        self.results: Any = ctx.Queue()
        self.commands: list[Any] = [ctx.Queue() for _ in range(count)]
        self.procs = [
            ctx.Process(
                target=follower_process,
                args=(i, redis_url, self.commands[i], self.results),
                daemon=True,
            )
            for i in range(count)
        ]
        for proc in self.procs:
            proc.start()

    async def _get(self, seconds: float) -> tuple[str, int, Any]:
        item: tuple[str, int, Any] = await anyio.to_thread.run_sync(
            lambda: self.results.get(timeout=seconds)
        )
        return item

    async def run(
        self, mode: str, channel: str, produce: Callable[[], Awaitable[LatencyRun]]
    ) -> LatencyRun:
        for queue in self.commands:
            queue.put((mode, channel))
        done: list[tuple[int, Any]] = []
        ready = 0
        while ready < len(self.procs):  # bounded: each follower sends one ready (or done)
            kind, index, payload = await self._get(60)
            if kind == "ready":
                ready += 1
            else:
                done.append((index, payload))
                ready += 1
        await anyio.sleep(0.05)  # let every follower's first XREAD reach the server
        run = await produce()
        while len(done) < len(self.procs):
            kind, index, payload = await self._get(60)
            if kind == "done":
                done.append((index, payload))
        for index, payload in done:
            if isinstance(payload, str):
                run.errors.append(f"follower {index}: {payload}")
            else:
                run.latencies_ms.extend(ns / 1e6 for ns in payload)
        return run

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


async def produce(
    mode: str, publish: Callable[[bytes], Awaitable[Any]], count: int, size: int, interval: float
) -> LatencyRun:
    """Publish ``count`` stamped messages, one every ``interval`` seconds (on a fixed schedule:
    a slow publish does not push the later ones back)."""
    publish_ms: list[float] = []
    start = time.monotonic()
    for i in range(count):
        wait = start + i * interval - time.monotonic()
        if wait > 0:
            await anyio.sleep(wait)
        data = _stamp(i, size)
        t0 = time.perf_counter()
        await publish(data)
        publish_ms.append((time.perf_counter() - t0) * 1e3)
    pace = (time.monotonic() - start) / max(1, count - 1) * 1e3
    return LatencyRun(mode, [], publish_ms, pace, [])


async def latency_run(
    followers: Followers, mode: str, redis_url: str, channel: str, args: argparse.Namespace
) -> LatencyRun:
    count, size, interval = args.messages, args.size, args.interval_ms / 1e3
    if mode == "sse_cache":
        from sse_cache.backends import from_url

        backend: Any = from_url(redis_url)
        await backend.get("bench-fanout-warm")

        async def go() -> LatencyRun:
            async def publish(data: bytes) -> None:
                await backend.publish(channel, data, ttl=STREAM_TTL)

            run = await produce(mode, publish, count, size, interval)
            await backend.finish(channel, ttl=STREAM_TTL)
            return run

        try:
            return await followers.run(mode, channel, go)
        finally:
            await backend.aclose()
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    key = RAW_PREFIX + channel
    await client.ping()

    async def go_raw() -> LatencyRun:
        async def publish(data: bytes) -> None:
            await client.xadd(key, {"d": data})

        run = await produce(mode, publish, count, size, interval)
        await client.xadd(key, {"e": b""})
        return run

    try:
        return await followers.run(mode, channel, go_raw)
    finally:
        await client.delete(key)
        await client.aclose()


def summarize(run: LatencyRun) -> str:
    lat = run.latencies_ms
    text = (
        f"p50 {pct(lat, 0.5):6.2f} ms  p99 {pct(lat, 0.99):6.2f} ms  max {max(lat):7.2f} ms"
        if lat
        else "no messages"
    )
    text += (
        f"  ({len(lat)} messages; publish call p50 {statistics.median(run.publish_ms):.2f} ms; "
        f"pace {run.pace_ms:.2f} ms)"
    )
    if run.errors:
        text += f"  ERRORS: {'; '.join(run.errors)[:200]}"
    return text


async def bench_redis(args: argparse.Namespace) -> None:
    print(
        f"(b) cross-process follower latency on loopback Redis: {args.messages} messages of "
        f"{args.size} bytes every {args.interval_ms:g} ms, {args.followers} follower processes, "
        f"{args.redis_reps} repetitions"
    )
    try:
        redis = RedisServer(find_binary("redis-server", "redis-server"))
    except ServerMissing as exc:
        print(f"    skipped: {exc}")
        return
    redis.start()
    followers: Followers | None = None
    try:
        url = redis.url
        followers = Followers(url, args.followers)
        warm = argparse.Namespace(**{**vars(args), "messages": min(100, args.messages)})
        for mode in ("sse_cache", "raw"):
            await latency_run(followers, mode, url, f"warm-{mode}", warm)
        runs: dict[str, list[LatencyRun]] = {"sse_cache": [], "raw": []}
        for rep in range(args.redis_reps):
            order = ("sse_cache", "raw") if rep % 2 == 0 else ("raw", "sse_cache")
            for mode in order:
                run = await latency_run(followers, mode, url, f"lat-{rep}-{mode}", args)
                runs[mode].append(run)
                print(f"    rep {rep + 1} {mode:<9} {summarize(run)}")
    finally:
        if followers is not None:
            followers.close()
        redis.cleanup()

    def agg(mode: str) -> tuple[float, float, float]:
        ok = [r.latencies_ms for r in runs[mode] if r.latencies_ms]
        if not ok:
            return math.nan, math.nan, math.nan
        p50 = statistics.median(pct(v, 0.5) for v in ok)
        p99 = statistics.median(pct(v, 0.99) for v in ok)
        return p50, p99, max(max(v) for v in ok)

    ours, raw = agg("sse_cache"), agg("raw")
    print()
    for name, (p50, p99, worst) in (("sse_cache", ours), ("raw redis-py", raw)):
        print(f"    {name:<13} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {worst:7.2f} ms")
    print(
        f"    ratio sse_cache / raw: p50 {ours[0] / raw[0]:.2f}x  p99 {ours[1] / raw[1]:.2f}x  "
        f"max {ours[2] / raw[2]:.2f}x"
    )


def counts(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,10,100, got {text!r}")
    return values


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    if not args.skip_fanout:
        await bench_fanout(args)
        print()
    if not args.skip_redis:
        await bench_redis(args)
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=counts, default=[1, 10, 100, 1000], help="herd sizes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N (fresh key each)")
    parser.add_argument("--first-ms", type=float, default=300.0, help="upstream first byte")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="upstream gap per event")
    parser.add_argument("--deltas", type=int, default=60, help="text deltas per answer")
    parser.add_argument(
        "--round-timeout", type=float, default=60.0, help="seconds one herd may take"
    )
    parser.add_argument(
        "--n-budget", type=float, default=40.0, help="no new round for an N after this many s"
    )
    parser.add_argument("--messages", type=int, default=2000, help="(b) messages per run")
    parser.add_argument("--size", type=int, default=200, help="(b) bytes per message")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="(b) publish pace")
    parser.add_argument("--followers", type=int, default=2, help="(b) follower processes")
    parser.add_argument("--redis-reps", type=int, default=2, help="(b) repetitions per path")
    parser.add_argument("--skip-fanout", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    anyio.run(main, parser.parse_args())

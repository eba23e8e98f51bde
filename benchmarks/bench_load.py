"""Load benchmark: many streamed requests at once through a real ``sse-cache proxy`` process,
on Redis and on SQLite, against the same load served straight by the upstream.

(a) Load. ``sse-cache mock-upstream`` (a real time to first byte, ``--first-ms`` 50 ms, then
    one event every ``--delay-ms`` 2 ms: ~60 events, ~180 ms, ~10 KiB per answer) and
    ``sse-cache proxy`` each run as an OS process; Redis is a redis-server this script starts,
    SQLite a file in a temporary directory. Before the first round, ``--hit-prompts`` (50)
    prompts are asked once through the proxy, so that they are stored. Each round then sends
    ``--requests`` (1,000) streamed ``POST /v1/responses`` over ``--connections`` (200)
    concurrent connections (one worker per connection, all released together, each sending
    its next request as soon as the previous one ended), half of them for the stored prompts
    (hits), half for prompts never asked before (distinct misses), shuffled. The same request
    list goes first straight to the upstream (the baseline: the bodies it answers are the
    bytes every proxied body is compared with), then through the proxy.

    Printed per backend and round: errors (an exception, a non-200 status or an unexpected
    ``x-sse-cache``), wrong bodies (any byte different from the upstream's), p50 / p99 time to
    the first and the last body byte of hits and misses, requests per second, and the CPU
    seconds the proxy and this client used. Then the medians over the rounds [min-max] and
    their ratios to the baseline of the same rounds. The proxy's RSS and open descriptors are
    printed when it has started, before the first round (the hit prompts stored, no client
    connected),
    after each round (right after the last byte, the clients still connected) and idle (the
    clients gone, once the proxy's descriptors have settled), the descriptors by kind:
    connections from clients, to the upstream, to the backend, and everything else (files,
    pipes, the event loop's).

(b) The breaker's cost while open (Redis only). A second proxy on a dedicated redis-server
    (``?timeout=0.25``, ``--breaker-failures 2``, a cooldown longer than the run): the redis-server
    is stopped with SIGSTOP (it keeps its port open and answers nothing, a hung server) and
    ``--breaker-repeat`` (30) sequential requests for new prompts go through it with the
    breaker open, alternating with the same requests through the forwarder alone (the
    proxy's httpx2 forwarder under uvicorn, no cache: the floor) and through the proxy while
    Redis is healthy. The upstream answers these at once (``x-mock-first-ms: 0``,
    ``x-mock-delay-ms: 0``), so the time to the last byte is mostly the path's own. Printed:
    medians [min-max] and the difference open - floor (what a request pays for the cache
    while the breaker is open), and the time each of the requests paid that opened the
    breaker (a timeout each).

Run: ``.venv/bin/python benchmarks/bench_load.py [--requests 1000] [--connections 200]
[--rounds 3] [--backends redis,sqlite] [--skip-breaker]``. Nothing is asserted here (the
reduced run in tests/integration/test_load.py asserts correctness and descriptors); client,
proxy, upstream and Redis share this machine's cores, and one client process reads every
stream: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _servers import BARE_FORWARDER, HOST, Server, server

from servers import RedisServer, ServerMissing, find_binary

CLI = [sys.executable, "-m", "sse_cache"]
HEADERS = {"authorization": "Bearer sk-load", "content-type": "application/json"}
# Connections per httpx2 client: httpx2's pool costs O(connections) per request assignment
# (see bench_fanout.py), so 200 connections are four pools of 50.
PER_POOL = 50


# -- what a proxy process holds ---------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """A process's resident memory and open descriptors, the descriptors by kind."""

    rss_kib: int
    fds: int
    clients: int  # TCP connections accepted on the process's listening port
    upstream: int  # TCP connections to the upstream's port
    backend: int  # TCP connections to the backend's port (Redis; SQLite's files are "other")
    other: int  # files, pipes, the listening socket, the event loop's descriptors

    def describe(self) -> str:
        return (
            f"RSS {self.rss_kib / 1024:6.1f} MiB   fds {self.fds:4d} = clients {self.clients:3d}"
            f" + upstream {self.upstream:3d} + backend {self.backend:3d} + other {self.other:3d}"
        )


def _tcp_table() -> dict[int, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of every IPv4 TCP socket of this network
    namespace (loopback is all this benchmark uses)."""
    table: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return table


def usage(pid: int, port: int, upstream_port: int, backend_port: int | None) -> Usage:
    """What process ``pid`` (listening on ``port``) holds right now."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    tcp = _tcp_table()
    kinds: Counter[str] = Counter()
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we looked
        fds += 1
        kind = "other"
        if target.startswith("socket:["):
            local, remote = tcp.get(int(target[8:-1]), (0, 0))
            if local == port and remote != 0:
                kind = "clients"
            elif remote == upstream_port:
                kind = "upstream"
            elif backend_port is not None and remote == backend_port:
                kind = "backend"
        kinds[kind] += 1
    return Usage(rss, fds, kinds["clients"], kinds["upstream"], kinds["backend"], kinds["other"])


async def settled(
    pid: int, port: int, upstream_port: int, backend_port: int | None, *, limit: float = 15.0
) -> Usage:
    """The process's usage once no client connection is left and its descriptor count has not
    changed for half a second (or after ``limit`` seconds: then as it is)."""
    deadline = time.monotonic() + limit
    last = usage(pid, port, upstream_port, backend_port)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        await anyio.sleep(0.05)
        now = usage(pid, port, upstream_port, backend_port)
        if now.fds != last.fds or now.clients:
            stable_since = time.monotonic()
        last = now
        if not now.clients and time.monotonic() - stable_since >= 0.5:
            break
    return last


async def scrape(proxy: str) -> Counter[str]:
    """The proxy's metrics (``GET /_sse_cache/metrics``): sample name with labels -> value."""
    async with httpx2.AsyncClient(timeout=30) as client:
        text = (await client.get(proxy + "/_sse_cache/metrics")).text
    samples: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


#: What the summary line of a round shows from the proxy's metrics (its counters' increase).
WATCHED = {
    "read failures": "sse_cache_read_failures_total",
    "store failures": "sse_cache_store_failures_total",
    "stores skipped": "sse_cache_store_skipped_total",
    "breaker opened": 'sse_cache_backend_breaker_transitions_total{state="open"}',
}


def cpu_seconds(pid: int) -> float:
    return Server("", pid).cpu()


# -- the load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: str
    expect: str  # the x-sse-cache status expected through the proxy: "hit" or "miss"

    def body(self) -> bytes:
        return json.dumps({"model": "gpt-mock", "input": self.prompt, "stream": True}).encode()


@dataclass
class Outcome:
    request: Request
    status: int = 0
    cache: str = ""  # x-sse-cache
    first: float = math.nan  # seconds from the request's start to its first body byte
    last: float = math.nan  # ... to its last
    body: bytes = b""
    error: str = ""  # an exception (the response then is incomplete or absent)


@dataclass
class Run:
    outcomes: list[Outcome]
    elapsed: float  # the release to the last byte of the last response
    client_cpu: float
    proxy_cpu: float
    after: Usage | None = None  # the proxy right after the last byte, clients still connected
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return len(self.outcomes) / self.elapsed


def plan(hits: list[str], count: int, tag: str, seed: int) -> list[Request]:
    """``count`` requests: half for the stored ``hits`` prompts (round robin), half for new
    prompts named after ``tag``, shuffled."""
    misses = count // 2
    requests = [Request(f"load miss {tag} {i}", "miss") for i in range(misses)]
    requests += [Request(hits[i % len(hits)], "hit") for i in range(count - misses)]
    random.Random(seed).shuffle(requests)
    return requests


async def run_load(
    base_url: str,
    requests: list[Request],
    connections: int,
    *,
    warm_path: str,
    limit: float,
    extra_headers: dict[str, str] | None = None,
    watch: tuple[int, int, int, int | None] | None = None,
) -> Run:
    """Send ``requests`` over ``connections`` connections: one worker per connection, each
    first opening its connection (``GET warm_path``), then all released together, each
    sending its next request when the previous one ended. ``watch``: the proxy's (pid, port,
    upstream port, backend port), for its CPU time and its usage right after the last byte.
    Failures are recorded, not raised: one must not hide the rest. ``limit`` bounds the whole
    run (requests not answered by then are errors)."""
    headers = {**HEADERS, **(extra_headers or {})}
    outcomes = [Outcome(r) for r in requests]
    pending = iter(outcomes)
    pools = max(1, math.ceil(connections / PER_POOL))
    clients = [
        httpx2.AsyncClient(
            base_url=base_url,
            timeout=httpx2.Timeout(60, pool=limit),
            limits=httpx2.Limits(max_connections=PER_POOL, max_keepalive_connections=PER_POOL),
        )
        for _ in range(pools)
    ]
    release, all_ready = anyio.Event(), anyio.Event()
    ready = 0

    async def one(client: httpx2.AsyncClient, outcome: Outcome) -> None:
        start = time.perf_counter()
        parts: list[bytes] = []
        try:
            async with client.stream(
                "POST", "/v1/responses", content=outcome.request.body(), headers=headers
            ) as response:
                outcome.status = response.status_code
                outcome.cache = response.headers.get("x-sse-cache", "")
                async for chunk in response.aiter_raw():
                    if not parts:
                        outcome.first = time.perf_counter() - start
                    parts.append(chunk)
            outcome.last = time.perf_counter() - start
        except Exception as exc:
            outcome.error = repr(exc)
        outcome.body = b"".join(parts)

    async def worker(client: httpx2.AsyncClient) -> None:
        nonlocal ready
        try:
            (await client.get(warm_path)).raise_for_status()
        finally:
            ready += 1
            if ready == connections:
                all_ready.set()
        await release.wait()
        for outcome in pending:  # one iterator shared by every worker: each takes the next
            await one(client, outcome)

    try:
        start = cpu0 = proxy0 = 0.0
        with anyio.move_on_after(limit):
            async with anyio.create_task_group() as tg:
                for w in range(connections):
                    tg.start_soon(worker, clients[w % pools])
                await all_ready.wait()
                cpu0 = time.process_time()
                proxy0 = cpu_seconds(watch[0]) if watch else math.nan
                start = time.perf_counter()
                release.set()
        elapsed = time.perf_counter() - start
        after = usage(*watch) if watch else None
        proxy_cpu = cpu_seconds(watch[0]) - proxy0 if watch else math.nan
        run = Run(outcomes, elapsed, time.process_time() - cpu0, proxy_cpu, after)
    finally:
        for client in clients:
            await client.aclose()
    for o in outcomes:
        if not o.error and math.isnan(o.last):
            o.error = f"not answered within {limit:g} s"
        run.statuses[o.cache or "-"] += 1
    return run


@dataclass(frozen=True)
class Check:
    errors: list[str]  # an exception (an aborted response) or a status other than 200
    wrong_bodies: int  # complete 200 answers that differ from the upstream's by any byte
    missed_hits: int  # stored prompts answered from the upstream (miss or shared), not replayed


def check(run: Run, expected: dict[str, bytes]) -> Check:
    """What went wrong in ``run``; ``expected``: the upstream's bytes for each prompt."""
    errors: list[str] = []
    wrong = missed = 0
    for o in run.outcomes:
        if o.error:
            errors.append(f"{o.request.prompt}: {o.error}")
        elif o.status != 200:
            errors.append(f"{o.request.prompt}: HTTP {o.status} {o.body[:120]!r}")
        else:
            want = expected.get(o.request.prompt)
            wrong += want is not None and o.body != want
            missed += o.request.expect == "hit" and o.cache != "hit"
    return Check(errors, wrong, missed)


def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank; NaN when empty."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def latencies(run: Run, kind: str) -> dict[str, float]:
    chosen = [o for o in run.outcomes if o.request.expect == kind and not o.error]
    first, last = [o.first for o in chosen], [o.last for o in chosen]
    return {
        "first p50": pct(first, 0.5),
        "first p99": pct(first, 0.99),
        "last p50": pct(last, 0.5),
        "last p99": pct(last, 0.99),
    }


# -- servers --------------------------------------------------------------------------------


def port_of(url: str) -> int:
    """The port of an ``http://`` or ``redis://`` URL."""
    port = urllib.parse.urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url!r}")
    return port


@contextmanager
def proxy_process(upstream: str, backend: str, log: Path, *options: str) -> Iterator[Server]:
    cmd = [*CLI, "proxy", "--upstream", upstream, "--backend", backend, "--port", "{port}"]
    with server(*cmd, "--log-level", "warning", *options, log=log) as proxy:
        yield proxy


def fmt(values: list[float], unit: float = 1e3, digits: int = 1) -> str:
    """``median [min-max]`` of ``values`` (seconds, printed in ms by default)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    med = statistics.median(values) * unit
    return f"{med:.{digits}f} [{min(values) * unit:.{digits}f}-{max(values) * unit:.{digits}f}]"


# -- (a) load -------------------------------------------------------------------------------


async def store_hits(proxy: str, hits: list[str]) -> None:
    """Ask every hit prompt once through the proxy (stored), then check that it is a hit."""
    async with httpx2.AsyncClient(base_url=proxy, timeout=60) as client:
        for expect in ("miss", "hit"):
            async with anyio.create_task_group() as tg:
                for prompt in hits:

                    async def ask(prompt: str = prompt, expect: str = expect) -> None:
                        r = await client.post(
                            "/v1/responses", content=Request(prompt, "").body(), headers=HEADERS
                        )
                        got = r.headers.get("x-sse-cache")
                        if r.status_code != 200 or got != expect:
                            raise RuntimeError(f"storing {prompt!r}: {r.status_code} {got}")

                    tg.start_soon(ask)


async def bench_backend(
    args: argparse.Namespace, kind: str, backend: str, upstream: Server, tmp: Path
) -> dict[str, list[Any]]:
    """Every round on one backend; returns the per-round figures for the summary."""
    hits = [f"load hit {i}" for i in range(args.hit_prompts)]
    log = tmp / f"proxy-{kind}.log"
    backend_port = port_of(backend) if backend.startswith("redis") else None
    figures: dict[str, list[Any]] = {}
    with proxy_process(upstream.url, backend, log, *args.proxy_args.split()) as proxy:
        watch = (proxy.pid, port_of(proxy.url), port_of(upstream.url), backend_port)
        started = usage(*watch)
        print(f"  {kind}: started           {started.describe()}")
        await store_hits(proxy.url, hits)
        before = await settled(*watch)
        print(f"  {kind}: before            {before.describe()}")
        for r in range(args.rounds):
            requests = plan(hits, args.requests, f"{kind} {r}", seed=r)
            direct = await run_load(
                upstream.url, requests, args.connections, warm_path="/_mock/stats", limit=args.limit
            )
            expected = {o.request.prompt: o.body for o in direct.outcomes if o.status == 200}
            base = check(direct, {})
            counters = await scrape(proxy.url)
            proxied = await run_load(
                proxy.url,
                requests,
                args.connections,
                warm_path="/_sse_cache/health",
                limit=args.limit,
                watch=watch,
            )
            idle = await settled(*watch)
            counters = await scrape(proxy.url) - counters
            got = check(proxied, expected)
            print(
                f"  {kind}: round {r + 1}  errors {len(got.errors)}  wrong bodies "
                f"{got.wrong_bodies}  statuses {dict(proxied.statuses)} (stored prompts not "
                f"replayed: {got.missed_hits})  {proxied.rate:.0f} req/s (direct "
                f"{direct.rate:.0f}; direct errors {len(base.errors)})"
            )
            print(
                f"  {kind}:   CPU proxy {proxied.proxy_cpu:.1f} s, client "
                f"{proxied.client_cpu:.1f} s (direct: client {direct.client_cpu:.1f} s); "
                + ", ".join(f"{label} {counters[name]:.0f}" for label, name in WATCHED.items())
            )
            for line in got.errors[:5]:
                print(f"      {line}")
            assert proxied.after is not None
            print(f"  {kind}:   after           {proxied.after.describe()}")
            print(f"  {kind}:   idle            {idle.describe()}")
            figures.setdefault("rate", []).append(proxied.rate)
            figures.setdefault("direct rate", []).append(direct.rate)
            figures.setdefault("errors", []).append(len(got.errors))
            figures.setdefault("wrong", []).append(got.wrong_bodies)
            figures.setdefault("missed", []).append(got.missed_hits)
            for k in ("hit", "miss"):
                for name, value in latencies(proxied, k).items():
                    figures.setdefault(f"{k} {name}", []).append(value)
                for name, value in latencies(direct, k).items():
                    figures.setdefault(f"direct {k} {name}", []).append(value)
            figures.setdefault("after", []).append(proxied.after)
            figures.setdefault("idle", []).append(idle)
        figures["before"] = [before]
    text = log.read_text(errors="replace")
    figures["tracebacks"] = [text.count("Traceback")]
    # What the proxy logged (warnings and above reach stderr), each kind of line once.
    kinds = Counter(log_kind(line) for line in text.splitlines() if line.strip())
    figures["log"] = [f"{n} x {line}" for line, n in kinds.most_common(8)]
    return figures


def log_kind(line: str) -> str:
    """A log line without its time stamp, process id and specifics (keys, numbers)."""
    line = re.sub(r"^\S+T\S+ ", "", line)  # an ISO time stamp
    line = re.sub(r"\[\d+\] ", "", line)
    line = re.sub(r"\b[0-9a-f]{16,}\b", "<key>", line)
    return re.sub(r"\d+(\.\d+)?", "<n>", line)[:160]


def summarize(kind: str, f: dict[str, list[Any]], rounds: int) -> None:
    print(f"\n  {kind}: {rounds} round(s); medians [min-max] over them; ratio: proxy / direct")
    print(
        f"    errors {sum(f['errors'])}, wrong bodies {sum(f['wrong'])}, stored prompts not "
        f"replayed {sum(f['missed'])}, tracebacks in the proxy's log {f['tracebacks'][0]}"
    )
    for line in f["log"]:
        print(f"      log: {line}")
    rate, direct = f["rate"], f["direct rate"]
    print(
        f"    throughput  {fmt(rate, 1, 0)} req/s   direct {fmt(direct, 1, 0)} req/s   "
        f"ratio {statistics.median(rate) / statistics.median(direct):.2f}x"
    )
    for k in ("hit", "miss"):
        for name in ("first p50", "first p99", "last p50", "last p99"):
            ours, base = f[f"{k} {name}"], f[f"direct {k} {name}"]
            print(
                f"    {k:<4} {name:<10}  {fmt(ours):>22} ms   direct {fmt(base):>22} ms   "
                f"ratio {statistics.median(ours) / statistics.median(base):5.2f}x"
            )
    idle: list[Usage] = f["idle"]
    before: Usage = f["before"][0]
    print(
        f"    fds before {before.fds}, after {[u.fds for u in f['after']]}, idle "
        f"{[u.fds for u in idle]}; RSS MiB before {before.rss_kib / 1024:.1f}, idle "
        f"{[round(u.rss_kib / 1024, 1) for u in idle]}"
    )


async def bench_load(args: argparse.Namespace, tmp: Path) -> None:
    print(
        f"(a) load: {args.requests} streamed requests over {args.connections} connections per "
        f"round, half hits on {args.hit_prompts} stored prompts, half distinct misses; "
        f"upstream first byte {args.first_ms:g} ms, {args.delay_ms:g} ms between events"
    )
    mock = [*CLI, "mock-upstream", "--port", "{port}", "--delay-ms", str(args.delay_ms)]
    mock += ["--first-ms", str(args.first_ms)]
    results: dict[str, dict[str, list[Any]]] = {}
    with ExitStack() as stack:
        upstream = stack.enter_context(server(*mock))
        for kind in args.backends:
            if kind == "sqlite":
                url = f"sqlite:///{tmp / 'load.db'}"
            elif kind == "redis":
                try:
                    redis = RedisServer(find_binary("redis-server", "redis-server"))
                except ServerMissing as exc:
                    print(f"  redis skipped: {exc}")
                    continue
                redis.start()
                stack.callback(redis.cleanup)
                url = redis.url
            else:
                raise SystemExit(f"unknown backend {kind!r}: redis or sqlite")
            results[kind] = await bench_backend(args, kind, url, upstream, tmp)
    for kind, figures in results.items():
        summarize(kind, figures, args.rounds)


# -- (b) the breaker ------------------------------------------------------------------------


async def timed_post(client: httpx2.AsyncClient, url: str, prompt: str) -> tuple[float, str]:
    """(time to the last byte, x-sse-cache) of one streamed request answered at once."""
    headers = {**HEADERS, "x-mock-first-ms": "0", "x-mock-delay-ms": "0"}
    start = time.perf_counter()
    body = Request(prompt, "").body()
    r = await client.post(url + "/v1/responses", content=body, headers=headers)
    elapsed = time.perf_counter() - start
    if r.status_code != 200 or not r.content.rstrip().endswith(b"}"):
        raise RuntimeError(f"{url}: {r.status_code} {r.content[-120:]!r}")
    return elapsed, r.headers.get("x-sse-cache", "")


async def bench_breaker(args: argparse.Namespace, tmp: Path) -> None:
    print(
        f"\n(b) the breaker while open: {args.breaker_repeat} sequential requests (an answer sent "
        "at once) per path, alternated"
    )
    try:
        binary = find_binary("redis-server", "redis-server")
    except ServerMissing as exc:
        print(f"    skipped: {exc}")
        return
    hung, healthy = RedisServer(binary), RedisServer(binary)
    mock = [*CLI, "mock-upstream", "--port", "{port}", "--delay-ms", "0", "--first-ms", "0"]
    with ExitStack() as stack:
        for redis in (hung, healthy):
            redis.start()
            stack.callback(redis.cleanup)
        upstream = stack.enter_context(server(*mock))
        breaker = ("--breaker-failures", "2", "--breaker-cooldown", "3600")
        opened = stack.enter_context(
            proxy_process(upstream.url, hung.url + "?timeout=0.25", tmp / "b1.log", *breaker)
        )
        normal = stack.enter_context(
            proxy_process(upstream.url, healthy.url + "?timeout=0.25", tmp / "b2.log", *breaker)
        )
        bare = stack.enter_context(
            server(sys.executable, "-c", BARE_FORWARDER, upstream.url, "{port}")
        )
        async with httpx2.AsyncClient(timeout=60) as client:
            for url in (opened.url, normal.url, bare.url):  # connections open, code paths warm
                for i in range(3):
                    await timed_post(client, url, f"warm {url} {i}")
            hung.pause()
            opening: list[float] = []
            for i in range(5):  # the requests that open it: each pays the backend's timeout
                health = (await client.get(opened.url + "/_sse_cache/health")).json()
                if health["breaker"] == "open":
                    break
                elapsed, _ = await timed_post(client, opened.url, f"opening {i}")
                opening.append(elapsed)
            health = (await client.get(opened.url + "/_sse_cache/health")).json()
            if health["breaker"] != "open":
                raise RuntimeError(f"the breaker did not open: {health}")
            paths = {"open": opened.url, "healthy": normal.url, "floor": bare.url}
            rows: dict[str, list[float]] = {name: [] for name in paths}
            for i in range(args.breaker_repeat):
                for name, url in paths.items():
                    elapsed, status = await timed_post(client, url, f"breaker {name} {i}")
                    if name != "floor" and status != "miss":
                        raise RuntimeError(f"{name}: x-sse-cache {status!r}, not miss")
                    rows[name].append(elapsed)
            hung.resume()
    med = statistics.median
    print(f"    opening it (Redis hung, breaker closed): {[round(t * 1e3) for t in opening]} ms")
    for name, label in (
        ("open", "proxy, Redis hung, breaker open"),
        ("healthy", "proxy, Redis healthy (miss: get + set)"),
        ("floor", "the forwarder alone (no cache)"),
    ):
        print(f"    {label:<40} {fmt(rows[name], digits=2):>24} ms")
    cost = med(rows["open"]) - med(rows["floor"])
    print(f"    cost of the cache while open (open - floor, medians): {cost * 1e3:+.2f} ms")


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        if args.requests > 0:
            await bench_load(args, Path(tmp))
        if not args.skip_breaker:
            await bench_breaker(args, Path(tmp))
    print(f"\ntotal {time.monotonic() - started:.0f} s (host {HOST}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per round")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hit-prompts", type=int, default=50)
    parser.add_argument("--first-ms", type=float, default=50.0)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument(
        "--backends", type=lambda s: [b.strip() for b in s.split(",")], default=["redis", "sqlite"]
    )
    parser.add_argument("--limit", type=float, default=120.0, help="seconds a run may take")
    parser.add_argument("--breaker-repeat", type=int, default=30)
    parser.add_argument("--skip-breaker", action="store_true")
    parser.add_argument(
        "--proxy-args",
        default="",
        help="more options for the load's sse-cache proxy, e.g. '--decoded-cache-mb 0'",
    )
    anyio.run(main, parser.parse_args())

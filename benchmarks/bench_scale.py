"""Hits at scale: cache hits through a real ``sse-cache proxy`` under concurrency, against the
ceiling of the same run, on every backend; the cost per event as streams grow; and the
proxy's memory per live stream and per follower.

(a) Hits under load. A real recorded OpenAI Responses stream (``--stream``; by default the
    largest, ``openai-responses_reasoning-4-summaries_o3-mini.sse``, 676 events, ~195 KB, from
    ``../shared/real-streams``) is served by uvicorn from a plain ASGI app in a process of its
    own: that server is *the ceiling* (the same bytes, served by the same HTTP server, with
    nothing to look up) and the proxy's upstream. For each backend (``memory``, ``sqlite``,
    ``redis``; Redis is a redis-server this script starts) an ``sse-cache proxy`` process
    stores the stream once (a miss), then each round sends, for each of ``--connections``
    (10, 50, 100, 200), ``--requests`` (default: 3 per connection) identical streamed
    ``POST /v1/responses`` over that many keep-alive connections
    (each connection opened and used once first, then all released together, each sending
    its next request as soon as the previous answer ended) to the proxy and the same load to
    the ceiling, in alternating order. Every answer is checked: status 200, ``x-sse-cache:
    hit`` from the proxy, the body byte-identical to the recording. Printed per round and as
    medians [min-max] over ``--rounds`` (3): throughput, p50 and p99 time to the last byte,
    the CPU time per request of the server (the proxy's processes, or the ceiling's) and of
    this client, and the ratios proxy / ceiling of the same round. ``--workers 1,2`` adds
    the proxy with two worker processes (SQLite and Redis: a memory backend is per process).

    The client is a minimal HTTP/1.1 client on asyncio streams, in this process: httpx2
    costs ~1.4 ms of CPU per 195 KB answer here, more than either server, so with it the
    ceiling measured the client (docs/performance.md).

(b) Events scaling. ``sse-cache mock-upstream`` streams Responses answers of 100, 1,000,
    10,000 and 100,000 text deltas at once (no pacing). For each size: the time to the last
    byte of a miss through the proxy (a new prompt each time) against the same request
    straight to the upstream, and of a hit against the ceiling serving the stored bytes;
    each also per event. ``--rounds`` alternating repetitions, medians [min-max].

(c) Memory. The proxy on SQLite (stored entries on disk, not in the process), a new process
    per measurement, warmed by one miss, one shared stream and one hit; its RSS is read from
    ``/proc/<pid>/status`` and its peak (``VmHWM``) reset. Then, on connections of their
    own, either N live misses at once (N prompts, released together) or one live miss and N
    followers of it (identical requests sent together once the first client has half of
    its answer: each catches up on the shared log, then follows live). The answers come
    from ``sse-cache mock-upstream`` paced over ``--memory-seconds`` (6) each, so that all
    are live together; every one is checked (``x-sse-cache`` ``miss`` or ``shared``, the
    body byte-identical to the upstream's answer). Printed: the peak RSS during the load
    minus the RSS before it, per stream (miss or follower), for N in ``--memory-counts``
    (1, 10, 100, 500) at the first of ``--memory-deltas`` (200, 2,000), and for
    ``--memory-length-count`` (100) at the others: whether the cost grows with N or with the
    answer's length.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--requests N] [--connections 10,50,100,200]
[--rounds 3] [--backends memory,sqlite,redis] [--workers 1,2] [--mode hits,events,memory]
[--events 100,1000,10000,100000] [--memory-counts 1,10,100,500] [--memory-deltas 200,2000]
[--json PATH]``; ``benchmarks/plot_scale.py`` draws the JSON's plots. ``--quick`` for a smoke
run (what tests/integration/test_bench_scale.py runs). Nothing is asserted about time; a wrong
answer is an error (exit status 1). Client, servers and Redis share this machine's cores: compare
the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _servers import Server, server

from servers import RedisServer, ServerMissing, find_binary

CLI = [sys.executable, "-m", "sse_cache"]
# ../shared/real-streams beside the clone (as in CI), unless the environment says otherwise.
REAL_STREAMS = Path(
    os.environ.get(
        "SSE_CACHE_REAL_STREAMS",
        str(Path(__file__).resolve().parents[2] / "shared" / "real-streams"),
    )
)
DEFAULT_STREAM = "openai-responses_reasoning-4-summaries_o3-mini.sse"
EVENT_SIZES = (100, 1_000, 10_000, 100_000)
CONNECTIONS = (10, 50, 100, 200)
MEMORY_COUNTS = (1, 10, 100, 500)
MEMORY_DELTAS = (200, 2_000)
# The ceiling: uvicorn serving the same bytes from a plain ASGI app (the request body read,
# the answer — the file named by $BENCH_BODY — sent as one body message, chunked), as the
# proxy's own uvicorn would without a cache. bench_server.py imports the app's source as a
# module. With $BENCH_CONTENT_LENGTH set it also says the body's length, as the proxy's hits
# do (bench_instructions.py's second reference).
STATIC_APP_SOURCE = """
import os
body = open(os.environ["BENCH_BODY"], "rb").read()
head = [(b"content-type", b"text/event-stream; charset=utf-8")]
if os.environ.get("BENCH_CONTENT_LENGTH"):
    head.append((b"content-length", str(len(body)).encode()))
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": head})
    await send({"type": "http.response.body", "body": body})
"""
STATIC_APP = (
    STATIC_APP_SOURCE
    + """
import sys, uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
)


# -- a minimal HTTP/1.1 client ----------------------------------------------------------------


class WrongAnswer(Exception):
    """An answer that is not what the request must get (status, cache status or bytes)."""


@dataclass(frozen=True)
class Call:
    """One request, prebuilt: its bytes and what its answer must be."""

    data: bytes
    body: bytes  # the expected answer body
    cache: str | None  # the expected x-sse-cache (None: not checked, the ceiling has none)

    @classmethod
    def post(
        cls,
        url: str,
        payload: dict[str, Any],
        expect: bytes,
        cache: str | None,
        headers: dict[str, str] | None = None,
    ) -> Call:
        content = json.dumps(payload).encode()
        host = url.split("//", 1)[1].split("/", 1)[0]
        lines = [
            "POST /v1/responses HTTP/1.1",
            f"host: {host}",
            "content-type: application/json",
            "authorization: Bearer sk-bench",
            f"content-length: {len(content)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        return cls(("\r\n".join(lines) + "\r\n\r\n").encode() + content, expect, cache)


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request on a keep-alive connection; its (status, headers, body)."""
    writer.write(data)
    status, headers = await read_head(reader)
    return status, headers, await read_body(reader, headers)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    """An answer's status and headers (names lowercased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body(
    reader: asyncio.StreamReader,
    headers: dict[bytes, bytes],
    progress: Callable[[int], None] | None = None,
) -> bytes:
    """An answer's body: ``content-length`` or ``chunked``, which is what uvicorn sends.
    ``progress`` is told the bytes received so far after each chunk."""
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts: list[bytes] = []
        received = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers: the blank line
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])
            received += size
            if progress is not None:
                progress(received)
    return await reader.readexactly(int(headers.get(b"content-length", b"0")))


async def ask(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    call: Call,
    progress: Callable[[int], None] | None = None,
) -> None:
    """One request; raises :class:`WrongAnswer` unless its answer is exactly the expected.
    ``progress``: as for :func:`read_body`."""
    writer.write(call.data)
    status, headers = await read_head(reader)
    body = await read_body(reader, headers, progress)
    cache = headers.get(b"x-sse-cache", b"").decode()
    if status != 200 or (call.cache is not None and cache != call.cache):
        raise WrongAnswer(f"HTTP {status}, x-sse-cache {cache!r}: {body[:160]!r}")
    if body != call.body:
        raise WrongAnswer(f"a body of {len(body)} bytes differs from the expected {len(call.body)}")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (uvicorn's workers)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid``, its threads and its child processes
    (uvicorn's workers), from the scheduler's nanosecond counters (``/proc/*/stat`` counts
    in 10 ms ticks: too coarse for a short load)."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0  # gone
    for tid in threads:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9 + sum(tree_cpu(child) for child in children(pid))


@dataclass
class Load:
    """One load: ``requests`` answers over ``connections`` connections."""

    requests: int
    connections: int
    elapsed: float  # from the release to the last byte of the last answer
    latencies: list[float]  # per request: from writing it to the last byte of its answer
    server_cpu: float  # CPU seconds of the server's processes during the load
    client_cpu: float  # ... of this process
    errors: list[str] = field(default_factory=list)
    backend_cpu: float = math.nan  # ... of the backend's server (redis-server), if any

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed

    def pct(self, q: float) -> float:
        return pct(self.latencies, q)

    def figures(self) -> dict[str, float]:
        return {
            "rate": self.rate,
            "p50": self.pct(0.5),
            "p99": self.pct(0.99),
            "server_cpu_per_request": self.server_cpu / self.requests,
            "client_cpu_per_request": self.client_cpu / self.requests,
            "backend_cpu_per_request": self.backend_cpu / self.requests,
        }


async def load(
    url: str,
    call: Call,
    requests: int,
    connections: int,
    pid: int | None = None,
    backend_pid: int | None = None,
) -> Load:
    """Send ``requests`` copies of ``call`` over ``connections`` connections, released
    together, each sending its next request when the previous answer ended. ``pid``: the
    server's process, ``backend_pid`` its backend's, for their CPU time (NaN without)."""
    host, port = url.split("//", 1)[1].split(":")
    conns = await asyncio.gather(
        *(asyncio.open_connection(host, int(port), limit=1 << 20) for _ in range(connections))
    )
    try:
        # Every connection used once first: accepted, and the server's paths warm.
        await asyncio.gather(*(ask(r, w, call) for r, w in conns))
        left = requests
        latencies: list[float] = []
        errors: list[str] = []

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                start = time.perf_counter()
                try:
                    await ask(reader, writer, call)
                except (WrongAnswer, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(repr(exc))
                    return  # the connection's state is unknown: this worker stops
                latencies.append(time.perf_counter() - start)

        server0 = tree_cpu(pid) if pid else math.nan
        backend0 = tree_cpu(backend_pid) if backend_pid else math.nan
        client0 = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in conns))
        elapsed = time.perf_counter() - start
        client_cpu = time.process_time() - client0
        server_cpu = tree_cpu(pid) - server0 if pid else math.nan
        backend_cpu = tree_cpu(backend_pid) - backend0 if backend_pid else math.nan
    finally:
        for _, writer in conns:
            writer.close()
    errors += [f"{left} requests not sent"] if left > 0 else []
    result = Load(requests, connections, elapsed, latencies, server_cpu, client_cpu, errors)
    result.backend_cpu = backend_cpu
    return result


def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank; NaN when empty."""
    values = sorted(values)
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def spread(values: list[float], unit: float = 1.0, digits: int = 0) -> str:
    """``median [min-max]``, scaled by ``unit``."""
    values = [v * unit for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


# -- servers ----------------------------------------------------------------------------------


@contextmanager
def static_server(body: Path) -> Iterator[Server]:
    with server(
        sys.executable, "-c", STATIC_APP, "{port}", env={"BENCH_BODY": str(body)}
    ) as running:
        yield running


@contextmanager
def proxy_server(upstream: str, backend: str, log: Path, workers: int = 1) -> Iterator[Server]:
    cmd = [*CLI, "proxy", "--upstream", upstream, "--backend", backend, "--port", "{port}"]
    cmd += ["--log-level", "warning", "--workers", str(workers)]
    with server(*cmd, log=log) as running:
        yield running


async def one(url: str, call: Call) -> None:
    """A single request on a connection of its own."""
    host, port = url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    try:
        await ask(reader, writer, call)
    finally:
        writer.close()


async def timed(url: str, call: Call) -> float:
    """Seconds to the last byte of one checked request on a new connection."""
    start = time.perf_counter()
    await one(url, call)
    return time.perf_counter() - start


@contextmanager
def backend_urls(kinds: list[str], tmp: Path) -> Iterator[dict[str, tuple[str, int | None]]]:
    """kind -> (backend URL, the pid of its server if it has one); Redis on a redis-server of
    its own, stopped at the end."""
    urls: dict[str, tuple[str, int | None]] = {}
    with ExitStack() as stack:
        for kind in kinds:
            if kind == "memory":
                urls[kind] = ("memory://", None)
            elif kind == "sqlite":
                urls[kind] = (f"sqlite:///{tmp / 'scale.db'}", None)
            elif kind == "redis":
                redis = RedisServer(find_binary("redis-server", "redis-server"))
                redis.start()
                stack.callback(redis.cleanup)
                assert redis.proc is not None
                urls[kind] = (redis.url, redis.proc.pid)
            else:
                raise SystemExit(f"unknown backend {kind!r}: memory, sqlite or redis")
        yield urls


# -- (a) hits under load ----------------------------------------------------------------------


@dataclass
class Config:
    """One proxy (a backend, a number of workers) at one concurrency, and its rounds."""

    backend: str
    workers: int
    connections: int
    requests: int
    rounds: list[dict[str, dict[str, float]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    backend_pid: int | None = None  # redis-server's

    @property
    def proxy(self) -> str:
        return f"{self.backend}, {self.workers} worker{'s' if self.workers > 1 else ''}"

    @property
    def name(self) -> str:
        return f"{self.proxy}, {self.connections} connections"


def requests_for(args: argparse.Namespace, connections: int) -> int:
    """``--requests``, or three per connection by default."""
    return int(args.requests) if args.requests else 3 * connections


async def bench_hits(
    args: argparse.Namespace, tmp: Path, stream: Path, recording: bytes
) -> list[Config]:
    payload = {"model": "o3-mini", "input": "bench scale", "stream": True}
    events = recording.count(b"\n\n")
    loads = ", ".join(
        f"{requests_for(args, c)} requests over {c} connections" for c in args.connections
    )
    print(
        f"(a) hits: {stream.name} ({events} events, {len(recording) / 1000:.0f}"
        f" KB); loads of {loads}; {args.rounds} rounds; "
        f"ceiling = uvicorn serving the same bytes from a plain ASGI app"
    )
    configs = [
        Config(kind, workers, connections, requests_for(args, connections))
        for workers in args.workers
        for kind in args.backends
        if workers == 1 or kind != "memory"  # memory:// is per process: nothing to share
        for connections in args.connections
    ]
    with ExitStack() as stack:
        ceiling = stack.enter_context(static_server(stream))
        urls = stack.enter_context(backend_urls(args.backends, tmp))
        proxies: dict[str, Server] = {}
        for config in configs:
            # Each proxy a cache of its own, so that each stores the stream itself.
            backend, config.backend_pid = urls[config.backend]
            if config.proxy in proxies:
                continue
            log = tmp / f"proxy-{config.backend}-{config.workers}.log"
            if config.backend == "redis":
                backend += f"?prefix=scale-{config.workers}:"
            elif config.backend == "sqlite":
                backend = f"sqlite:///{tmp / f'scale-{config.workers}.db'}"
            proxy = stack.enter_context(proxy_server(ceiling.url, backend, log, config.workers))
            proxies[config.proxy] = proxy
            # Stored once (a miss; the proxy ends the answer once it is stored), then a hit.
            await one(proxy.url, Call.post(proxy.url, payload, recording, "miss"))
            await one(proxy.url, Call.post(proxy.url, payload, recording, "hit"))
        for r in range(args.rounds):
            for config in configs:
                proxy = proxies[config.proxy]
                paths = [("ceiling", ceiling, None), ("proxy", proxy, "hit")]
                if r % 2:
                    paths.reverse()
                row: dict[str, dict[str, float]] = {}
                for name, target, cache in paths:
                    call = Call.post(target.url, payload, recording, cache)
                    backend_pid = config.backend_pid if name == "proxy" else None
                    result = await load(
                        target.url,
                        call,
                        config.requests,
                        config.connections,
                        target.pid,
                        backend_pid,
                    )
                    config.errors += [f"{name}: {e}" for e in result.errors]
                    row[name] = result.figures()
                config.rounds.append(row)
                print(f"  round {r + 1} {config.name:<36} {describe_round(row)}")
    for config in configs:
        summarize_hits(config)
    return configs


def describe_round(row: dict[str, dict[str, float]]) -> str:
    p, c = row["proxy"], row["ceiling"]
    return (
        f"proxy {p['rate']:5.0f} req/s p50 {p['p50'] * 1e3:5.1f} p99 {p['p99'] * 1e3:5.1f} ms | "
        f"ceiling {c['rate']:5.0f} req/s p50 {c['p50'] * 1e3:5.1f} p99 {c['p99'] * 1e3:5.1f} ms"
        f" | {p['rate'] / c['rate']:.2f}x, p99 {p['p99'] / c['p99']:.2f}x"
    )


def summary(config: Config) -> dict[str, Any]:
    """Medians and ranges over the rounds, and the ratios proxy / ceiling per round."""

    def of(path: str, figure: str) -> list[float]:
        return [row[path][figure] for row in config.rounds]

    out: dict[str, Any] = {}
    for path in ("proxy", "ceiling"):
        for figure in config.rounds[0][path]:
            values = of(path, figure)
            out[f"{path} {figure}"] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
    for figure in ("rate", "p50", "p99", "server_cpu_per_request"):
        values = ratios(of("proxy", figure), of("ceiling", figure))
        out[f"ratio {figure}"] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def ratios(ours: list[float], base: list[float]) -> list[float]:
    return [a / b if b else math.nan for a, b in zip(ours, base, strict=True)]


def summarize_hits(config: Config) -> None:
    def of(path: str, figure: str) -> list[float]:
        return [row[path][figure] for row in config.rounds]

    def ratio(figure: str) -> list[float]:
        return ratios(of("proxy", figure), of("ceiling", figure))

    print(f"\n  {config.name}: medians [min-max] over {len(config.rounds)} rounds")
    if config.errors:
        print(f"    ERRORS ({len(config.errors)}): {config.errors[:3]}")
    for label, path in (("proxy", "proxy"), ("ceiling", "ceiling")):
        print(
            f"    {label:<8} {spread(of(path, 'rate')):>18} req/s   p50 "
            f"{spread(of(path, 'p50'), 1e3, 1):>18} ms   p99 {spread(of(path, 'p99'), 1e3, 1):>18}"
            f" ms   server CPU/request {spread(of(path, 'server_cpu_per_request'), 1e6):>16} us"
            f"   client {spread(of(path, 'client_cpu_per_request'), 1e6):>14} us"
        )
    redis = of("proxy", "backend_cpu_per_request")
    if not any(math.isnan(v) for v in redis):
        print(f"    redis-server CPU/request {spread(redis, 1e6)} us (besides the proxy's)")
    print(
        f"    proxy / ceiling: throughput {spread(ratio('rate'), digits=2)}x (target >= 0.8x), "
        f"p99 {spread(ratio('p99'), digits=2)}x (target <= 1.5x), server CPU/request "
        f"{spread(ratio('server_cpu_per_request'), digits=2)}x"
    )


# -- (b) events scaling -----------------------------------------------------------------------


async def bench_events(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    print(
        f"\n(b) events scaling: Responses streams from sse-cache mock-upstream, unpaced; "
        f"backend {args.events_backend}; {args.rounds} rounds; time to the last byte"
    )
    mock = [*CLI, "mock-upstream", "--port", "{port}", "--delay-ms", "0", "--first-ms", "0"]
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        upstream = stack.enter_context(server(*mock))
        proxy = stack.enter_context(
            proxy_server(upstream.url, args.events_backend, tmp / "proxy-events.log")
        )
        for size in args.events:
            headers = {"x-mock-deltas": str(size), "x-mock-summaries": "1"}
            payload = {"model": "gpt-mock", "input": f"scale {size}", "stream": True}
            # The upstream's answer (deterministic: the same request, the same bytes), stored
            # through the proxy once.
            host, port = upstream.url.split("//", 1)[1].split(":")
            reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
            direct_call = Call.post(upstream.url, payload, b"", None, headers)
            _, _, expect = await exchange(reader, writer, direct_call.data)
            writer.close()
            events = expect.count(b"\n\n")
            body_file = tmp / f"events-{size}.sse"
            body_file.write_bytes(expect)
            await one(proxy.url, Call.post(proxy.url, payload, expect, "miss", headers))
            await one(proxy.url, Call.post(proxy.url, payload, expect, "hit", headers))
            figures: dict[str, list[float]] = {"miss": [], "direct": [], "hit": [], "ceiling": []}
            with static_server(body_file) as ceiling:
                for r in range(args.rounds):
                    # A miss needs a prompt never asked: its own bytes are checked against the
                    # upstream's answer to the same prompt, asked first.
                    fresh = {**payload, "input": f"scale {size} miss {r}"}
                    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
                    start = time.perf_counter()
                    _, _, fresh_body = await exchange(
                        reader, writer, Call.post(upstream.url, fresh, b"", None, headers).data
                    )
                    figures["direct"].append(time.perf_counter() - start)
                    writer.close()
                    steps = [
                        ("miss", Call.post(proxy.url, fresh, fresh_body, "miss", headers), proxy),
                        ("hit", Call.post(proxy.url, payload, expect, "hit", headers), proxy),
                        ("ceiling", Call.post(ceiling.url, payload, expect, None), ceiling),
                    ]
                    if r % 2:
                        steps.reverse()
                    for name, call, target in steps:
                        figures[name].append(await timed(target.url, call))
            row = {"deltas": size, "events": events, "bytes": len(expect), **figures}
            rows.append(row)
            med = statistics.median
            print(
                f"  {events:>7} events {len(expect) / 1e6:6.2f} MB | miss "
                f"{spread(figures['miss'], 1e3, 1)} ms ({med(figures['miss']) / events * 1e6:.2f}"
                f" us/event) direct {spread(figures['direct'], 1e3, 1)} ms "
                f"({med(figures['direct']) / events * 1e6:.2f} us/event) | hit "
                f"{spread(figures['hit'], 1e3, 1)} ms ({med(figures['hit']) / events * 1e6:.2f}"
                f" us/event) ceiling {spread(figures['ceiling'], 1e3, 1)} ms "
                f"({med(figures['ceiling']) / events * 1e6:.2f} us/event)"
            )
    return rows


# -- (c) memory per live stream and per follower ---------------------------------------------


def status_bytes(pid: int, name: str) -> int:
    """``name`` (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``, in bytes; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    return [pid, *(p for child in children(pid) for p in tree(child))]


def tree_memory(pid: int, name: str) -> int:
    return sum(status_bytes(p, name) for p in tree(pid))


def reset_peak(pid: int) -> None:
    """Set the peak RSS (``VmHWM``) of ``pid``'s processes back to their RSS now (Linux:
    ``clear_refs`` 5), so that the next peak read is the peak of what follows."""
    for p in tree(pid):
        Path(f"/proc/{p}/clear_refs").write_text("5")


@dataclass
class MemoryCase:
    """``count`` live misses at once (``misses``), or one live miss and ``count`` followers
    joined to it (``followers``), of answers of ``deltas`` text deltas; RSS figures (bytes)
    per round."""

    kind: str
    count: int
    deltas: int
    events: int = 0  # of one answer
    bytes: int = 0  # of one answer
    rounds: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        what = "live misses" if self.kind == "misses" else "followers of one live miss"
        return f"{self.count} {what}, {self.events} events ({self.bytes / 1000:.0f} KB)"

    def per_stream(self, figure: str = "peak") -> list[float]:
        """RSS at its ``peak`` (or ``live``) minus the RSS before the load, per stream (miss
        or follower), per round."""
        return [(r[figure] - r["baseline"]) / self.count for r in self.rounds]


async def fetch_answers(
    url: str, payloads: list[dict[str, Any]], headers: dict[str, str]
) -> list[bytes]:
    """The upstream's answers to ``payloads``, asked straight and unpaced over a few
    connections: what the proxy must pass on byte for byte."""
    answers: list[bytes] = [b""] * len(payloads)
    todo = iter(range(len(payloads)))
    host, port = url.split("//", 1)[1].split(":")

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        try:
            for i in todo:
                call = Call.post(url, payloads[i], b"", None, headers)
                status, _, answers[i] = await exchange(reader, writer, call.data)
                if status != 200:
                    raise WrongAnswer(f"the upstream answered HTTP {status}: {answers[i][:160]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(min(8, len(payloads)))))
    return answers


async def live_load(
    proxy: Server, kind: str, calls: list[Call]
) -> tuple[dict[str, float], list[str]]:
    """Send ``calls`` to the proxy on connections of their own and read every answer to its
    end; the proxy's RSS before, at its peak during (``peak``), at the moment every client
    had passed a mark in its answer (``live``: half for misses, three quarters for
    followers; ``ended`` answers had ended by then) and after; the errors. ``misses``: all
    released together. ``followers``: the first (the producer) alone, the others together
    once its client has half of its answer (they catch up on the shared log, then follow)."""
    host, port = proxy.url.split("//", 1)[1].split(":")
    errors: list[str] = []
    mark = 0.5 if kind == "misses" else 0.75
    passed: set[int] = set()
    ended = 0
    figures = {"live": math.nan, "ended": math.nan}
    half = asyncio.Event()  # the first client has half of its answer

    def progress(i: int, size: int) -> Callable[[int], None]:
        def on_bytes(received: int) -> None:
            if i == 0 and received >= size // 2:
                half.set()
            if i not in passed and received >= size * mark:
                passed.add(i)
                if len(passed) == len(calls):
                    figures["live"] = tree_memory(proxy.pid, "VmRSS")
                    figures["ended"] = ended

        return on_bytes

    async def run(i: int, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        nonlocal ended
        call = calls[i]
        try:
            await ask(*conn, call, progress(i, len(call.body)))
        except (WrongAnswer, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(repr(exc))
        ended += 1

    baseline = tree_memory(proxy.pid, "VmRSS")
    reset_peak(proxy.pid)
    # The connections count: a stream needs one.
    conns = await asyncio.gather(
        *(asyncio.open_connection(host, int(port), limit=1 << 20) for _ in calls)
    )
    try:
        if kind == "misses":
            await asyncio.gather(*(run(i, conn) for i, conn in enumerate(conns)))
        else:
            producer = asyncio.create_task(run(0, conns[0]))
            halfway = asyncio.create_task(half.wait())
            # Half of the answer, or the producer's end (then the followers come too late:
            # each gets a hit, not "shared", and counts as an error).
            await asyncio.wait([producer, halfway], return_when=asyncio.FIRST_COMPLETED)
            halfway.cancel()
            await asyncio.gather(*(run(i, conn) for i, conn in enumerate(conns) if i))
            await producer
    finally:
        for _, writer in conns:
            writer.close()
    figures["baseline"] = baseline
    figures["peak"] = tree_memory(proxy.pid, "VmHWM")
    figures["after"] = tree_memory(proxy.pid, "VmRSS")
    return figures, errors


async def bench_memory(args: argparse.Namespace, tmp: Path) -> list[MemoryCase]:
    print(
        f"\n(c) memory: sse-cache proxy on SQLite, a new process per measurement; Responses "
        f"answers from sse-cache mock-upstream paced over ~{args.memory_seconds:g} s each; "
        f"{args.rounds} rounds; the proxy's peak RSS during the load (VmHWM) minus its RSS "
        f"before it (after a warm-up)"
    )
    base, *longer = args.memory_deltas
    cases = [
        MemoryCase(kind, n, base) for kind in ("misses", "followers") for n in args.memory_counts
    ]
    cases += [
        MemoryCase(kind, args.memory_length_count, d)
        for kind in ("misses", "followers")
        for d in longer
    ]
    mock = [*CLI, "mock-upstream", "--port", "{port}", "--delay-ms", "0", "--first-ms", "0"]
    with server(*mock) as upstream:
        unpaced = {"x-mock-summaries": "1", "x-mock-delay-ms": "0", "x-mock-first-ms": "0"}
        warm_payload = {"model": "gpt-mock", "input": "memory warm-up", "stream": True}
        (warm_body,) = await fetch_answers(
            upstream.url, [warm_payload], {**unpaced, "x-mock-deltas": "20"}
        )
        warm_headers = {"x-mock-deltas": "20", "x-mock-summaries": "1", "x-mock-delay-ms": "2"}
        # The answers, asked once per size: as many prompts as the most misses at once.
        need: dict[tuple[str, int], int] = {}
        for case in cases:
            key = (case.kind, case.deltas)
            need[key] = max(need.get(key, 1), case.count if case.kind == "misses" else 1)
        prompts: dict[tuple[str, int], list[dict[str, Any]]] = {}
        bodies: dict[tuple[str, int], list[bytes]] = {}
        for (kind, deltas), many in need.items():
            prompts[kind, deltas] = [
                {"model": "gpt-mock", "input": f"memory {kind} {i}", "stream": True}
                for i in range(many)
            ]
            headers = {**unpaced, "x-mock-deltas": str(deltas)}
            bodies[kind, deltas] = await fetch_answers(upstream.url, prompts[kind, deltas], headers)
        for case in cases:
            case.bytes = len(bodies[case.kind, case.deltas][0])
            case.events = bodies[case.kind, case.deltas][0].count(b"\n\n")
        for r in range(args.rounds):
            for case in cases:
                key = (case.kind, case.deltas)
                gap = args.memory_seconds * 1000 / case.deltas
                headers = {
                    "x-mock-deltas": str(case.deltas),
                    "x-mock-summaries": "1",
                    "x-mock-delay-ms": f"{gap:.3f}",
                    "x-mock-first-ms": "0",
                }
                db = tmp / f"memory-{case.kind}-{case.count}-{case.deltas}-{r}.db"
                log = tmp / "proxy-memory.log"
                with proxy_server(upstream.url, f"sqlite:///{db}", log) as proxy:
                    # Warm: the code paths of a miss, a shared stream and a hit run once.
                    warm = Call.post(proxy.url, warm_payload, warm_body, None, warm_headers)
                    await asyncio.gather(one(proxy.url, warm), one(proxy.url, warm))
                    await one(proxy.url, warm)
                    if case.kind == "misses":
                        calls = [
                            Call.post(proxy.url, payload, body, "miss", headers)
                            for payload, body in zip(
                                prompts[key][: case.count], bodies[key], strict=False
                            )
                        ]
                    else:
                        payload, body = prompts[key][0], bodies[key][0]
                        calls = [Call.post(proxy.url, payload, body, "miss", headers)]
                        calls += [
                            Call.post(proxy.url, payload, body, "shared", headers)
                        ] * case.count
                    figures, errors = await live_load(proxy, case.kind, calls)
                case.rounds.append(figures)
                case.errors += errors
                rise = figures["peak"] - figures["baseline"]
                live = figures["live"] - figures["baseline"]
                kept = figures["after"] - figures["baseline"]
                print(
                    f"  round {r + 1} {case.name:<52} peak +{rise / 1e6:7.1f} MB"
                    f" ({rise / case.count / 1e3:5.0f} KB each), live +{live / 1e6:7.1f} MB "
                    f"({figures['ended']} ended), after +{kept / 1e6:6.1f} MB"
                    + (f"  ERRORS {len(errors)}: {errors[:2]}" if errors else "")
                )
    summarize_memory(cases)
    return cases


def summarize_memory(cases: list[MemoryCase]) -> None:
    print(
        f"\n  memory: medians [min-max] over {len(cases[0].rounds)} rounds; peak: the proxy's "
        f"peak RSS minus its RSS before the load; live: its RSS when every client had passed "
        f"half (misses) or three quarters (followers) of its answer"
    )
    for case in cases:
        peak, live = case.per_stream(), case.per_stream("live")
        print(
            f"    {case.name:<52} per {'stream' if case.kind == 'misses' else 'follower'}: "
            f"peak {spread(peak, 1e-3):>16} KB = {spread([v / case.bytes for v in peak], digits=1)}"
            f"x the answer, live {spread(live, 1e-3):>16} KB"
        )
        if case.errors:
            print(f"      ERRORS ({len(case.errors)}): {case.errors[:3]}")
    for kind in ("misses", "followers"):
        sweep = sorted(
            (c for c in cases if c.kind == kind and c.deltas == cases[0].deltas),
            key=lambda c: c.count,
        )
        for low, high in itertools.pairwise(sweep):
            print(
                f"    {kind}: each one more from {low.count} to {high.count} adds "
                f"{marginal(low, high, 'peak') / 1e3:.0f} KB at the peak, "
                f"{marginal(low, high, 'live') / 1e3:.0f} KB live (medians)"
            )


def marginal(low: MemoryCase, high: MemoryCase, figure: str) -> float:
    """What each stream more adds, from ``low``'s count to ``high``'s (medians, bytes)."""

    def med(case: MemoryCase) -> float:
        return statistics.median(r[figure] - r["baseline"] for r in case.rounds)

    return (med(high) - med(low)) / (high.count - low.count)


# -- main -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


async def main(args: argparse.Namespace) -> int:
    stream = args.stream if args.stream.is_absolute() else REAL_STREAMS / args.stream
    if not stream.is_file():
        raise SystemExit(f"no recorded stream at {stream} (set SSE_CACHE_REAL_STREAMS)")
    report: dict[str, Any] = {"machine": machine(), "args": {}}
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if "hits" in args.mode:
            configs = await bench_hits(args, Path(tmp), stream, stream.read_bytes())
            report["hits"] = [{**asdict(c), "name": c.name, "summary": summary(c)} for c in configs]
            errors += sum(len(c.errors) for c in configs)
        if "events" in args.mode:
            report["events"] = await bench_events(args, Path(tmp))
        if "memory" in args.mode:
            cases = await bench_memory(args, Path(tmp))
            report["memory"] = [
                {
                    **asdict(c),
                    "name": c.name,
                    "per_stream": c.per_stream(),
                    "live_per_stream": c.per_stream("live"),
                }
                for c in cases
            ]
            errors += sum(len(c.errors) for c in cases)
    report["machine"]["load_average_end"] = os.getloadavg()
    print(f"\nmachine: {report['machine']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"written: {args.json}")
    return 1 if errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def numbers(text: str) -> list[int]:
        return [int(n.replace("_", "")) for n in text.split(",") if n.strip()]

    def names(text: str) -> list[str]:
        return [n.strip() for n in text.split(",") if n.strip()]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per load (default: 3 per connection)"
    )
    parser.add_argument(
        "--connections", type=numbers, default=list(CONNECTIONS), help="concurrent connections"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", type=names, default=["memory", "sqlite", "redis"])
    parser.add_argument("--workers", type=numbers, default=[1, 2])
    parser.add_argument("--mode", type=names, default=["hits", "events", "memory"])
    parser.add_argument("--events", type=numbers, default=list(EVENT_SIZES))
    parser.add_argument("--events-backend", default="memory://")
    parser.add_argument(
        "--memory-counts",
        type=numbers,
        default=list(MEMORY_COUNTS),
        help="(c): live misses at once, and followers of one live miss",
    )
    parser.add_argument(
        "--memory-deltas",
        type=numbers,
        default=list(MEMORY_DELTAS),
        help="(c): text deltas per answer (the counts at the first, the length count at the rest)",
    )
    parser.add_argument("--memory-length-count", type=int, default=100)
    parser.add_argument(
        "--memory-seconds", type=float, default=6.0, help="(c): how long each answer is paced over"
    )
    parser.add_argument("--stream", type=Path, default=Path(DEFAULT_STREAM))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "a smoke run: 1 round; hits over 5 and 10 connections; 100 and 1,000 events; "
            "memory with 1 and 5 streams or followers, answers of 100 and 300 deltas"
        ),
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.rounds = [5, 10], 1
        args.events = [n for n in args.events if n <= 1_000]
        args.memory_counts, args.memory_deltas, args.memory_length_count = [1, 5], [100, 300], 5
        args.memory_seconds = 1.5
    if not args.memory_deltas or min([*args.memory_counts, args.memory_length_count]) < 1:
        parser.error("--memory-deltas needs a size and the memory counts must be >= 1")
    return args


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except ServerMissing as exc:
        raise SystemExit(str(exc)) from None

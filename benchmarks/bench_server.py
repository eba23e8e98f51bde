"""granian against uvicorn: the same ``sse-cache proxy`` app served by each HTTP server, hits
under load and single requests, CPU per request of the server's processes.

Every server runs the proxy's app built the way ``sse-cache proxy --workers N`` builds each
worker's (``sse_cache.cli.proxy:app_from_environment``, a factory reading the ``SSE_CACHE_*``
variables), 1 worker, in a process of its own; the uvicorn line is the ``sse-cache proxy``
command itself. The upstream is uvicorn serving a real recorded OpenAI Responses stream
(``--stream``; by default ``openai-responses_reasoning-4-summaries_o3-mini.sse``, 676 events,
~195 KB, from ``../shared/real-streams``) from a plain ASGI app, in a process of its own.
Each proxy stores the stream once (a miss), then every request is a hit.

The servers (``--servers``; those whose package is not installed are skipped, with a line
saying so):

- ``uvicorn``: ``sse-cache proxy`` as shipped (uvicorn with its h11 parser on asyncio: the
  proxy extra installs neither httptools nor uvloop).
- ``uvicorn-httptools``: uvicorn with ``--http httptools --loop uvloop`` (its fast path,
  when both are installed).
- ``granian``: granian's ASGI interface with its defaults (``--loop auto`` picks uvloop when
  it is installed, else asyncio) but ``--loop asyncio``, so that it runs on the loop the
  proxy has.
- ``granian-uvloop``, ``granian-rloop``: ``--loop uvloop`` / ``--loop rloop``.
- ``granian-rust-tasks``: ``--task-impl rust`` (Python < 3.12 only; not in the default set:
  anyio's cancel scopes cannot name its tasks, so the proxy's first task group raises
  ``RuntimeError: Future object is not initialized`` and the request stalls).
- ``granian-st``: ``--runtime-mode st`` (one single-threaded Rust runtime).

``--static`` adds the ceiling of each server: the plain app serving the same bytes, on
uvicorn and on granian, with nothing to look up.

A load is ``--requests`` (300) identical streamed ``POST /v1/responses`` over
``--connections`` (100) keep-alive connections, each connection used once first, then all
released together (benchmarks/bench_scale.py's client and load). Every answer is checked:
status 200, ``x-sse-cache: hit``, the body byte-identical to the recording; a wrong answer
fails the run (exit status 1). Each round gives every server the same load, in an order
that rotates from round to round, then ``--single`` (20) requests one after the other, each
on a new connection (time to the last byte). Printed per round and as medians [min-max] over
``--rounds`` (5): throughput, p50 and p99, single-request latency, the CPU time per request
of the server's processes (all of them: granian runs its worker in a child process), of its
busiest thread (the Python thread: what bounds one process when it has cores to spare) and
of this client, how many cores the server kept busy, and the ratios to ``uvicorn`` of the
same round (> 1: better than uvicorn).

``--pin`` confines every server to CPU 1 and the client to CPU 0. On a machine where other
work competes for the cores, a server with more threads (granian's Rust runtime beside its
Python thread) also gets a larger share of a contended CPU: the CPU time per request is the
figure that this does not move.

Run it where granian is installed, e.g. ``pip install granian`` in the project's venv:
``.venv/bin/python benchmarks/bench_server.py [--servers uvicorn,granian] [--backend memory]
[--requests 300] [--connections 100] [--rounds 5] [--single 20] [--static] [--pin]
[--json PATH]``; ``--quick`` for a smoke run. Nothing is asserted about time. Client,
upstream and servers share this machine's cores: compare the ratios of one run, above all
the CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import Server, server
from bench_scale import (
    DEFAULT_STREAM,
    REAL_STREAMS,
    STATIC_APP_SOURCE,
    Call,
    load,
    machine,
    one,
    ratios,
    spread,
    static_server,
    timed,
)

from servers import ServerMissing

T = TypeVar("T")
# Seconds without a complete answer after which a server counts as stalled (the run fails).
STALLED = 30.0
# --pin: where the client and the servers run.
CLIENT_CPU, SERVER_CPU = 0, 1
FACTORY = "sse_cache.cli.proxy:app_from_environment"
PAYLOAD = {"model": "o3-mini", "input": "bench server", "stream": True}


@dataclass(frozen=True)
class Variant:
    """One way of serving: its name, the modules it needs, and its command (``{port}`` and
    ``{app}`` filled in when started)."""

    name: str
    needs: tuple[str, ...]
    argv: tuple[str, ...]
    static: bool = False  # the plain app (no cache): its answers carry no x-sse-cache

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


def _granian(*extra: str) -> tuple[str, ...]:
    return (
        *(sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1"),
        *("--port", "{port}", "--workers", "1", "--log-level", "warning", *extra),
    )


def _uvicorn(*extra: str) -> tuple[str, ...]:
    return (
        *(sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}"),
        *("--workers", "1", "--log-level", "warning", "--no-access-log", *extra),
    )


GRANIAN_PROXY = ("--factory", FACTORY)
UVICORN_PROXY = ("--factory", FACTORY, "--lifespan", "on")
VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "uvicorn",
            ("uvicorn",),
            (
                sys.executable,
                "-m",
                "sse_cache",
                "proxy",
                "--port",
                "{port}",
                "--log-level",
                "warning",
            ),
        ),
        Variant(
            "uvicorn-httptools",
            ("uvicorn", "httptools", "uvloop"),
            _uvicorn("--http", "httptools", "--loop", "uvloop", *UVICORN_PROXY),
        ),
        Variant("granian", ("granian",), _granian("--loop", "asyncio", *GRANIAN_PROXY)),
        Variant(
            "granian-uvloop", ("granian", "uvloop"), _granian("--loop", "uvloop", *GRANIAN_PROXY)
        ),
        Variant("granian-rloop", ("granian", "rloop"), _granian("--loop", "rloop", *GRANIAN_PROXY)),
        Variant(
            "granian-rust-tasks",
            ("granian",),
            _granian("--loop", "asyncio", "--task-impl", "rust", *GRANIAN_PROXY),
        ),
        Variant(
            "granian-st",
            ("granian",),
            _granian("--loop", "asyncio", "--runtime-mode", "st", *GRANIAN_PROXY),
        ),
        Variant(
            "static-uvicorn", ("uvicorn",), _uvicorn("--app-dir", "{dir}", "static_app:app"), True
        ),
        Variant(
            "static-granian",
            ("granian",),
            _granian("--loop", "asyncio", "--working-dir", "{dir}", "static_app:app"),
            True,
        ),
    )
}
DEFAULT_SERVERS = [
    "uvicorn",
    "uvicorn-httptools",
    "granian",
    "granian-uvloop",
    "granian-rloop",
    "granian-st",
]


@contextmanager
def serve(
    variant: Variant, env: dict[str, str], tmp: Path, cpu: int | None = None
) -> Iterator[Server]:
    """Start ``variant`` with ``env`` added to its environment (on CPU ``cpu`` alone when
    given); stopped at the end."""
    argv = [a.replace("{dir}", str(tmp)) for a in variant.argv]
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    settings = [f"{k}={v}" for k, v in env.items()]
    with server(*pin, "env", *settings, *argv, log=tmp / f"{variant.name}.log") as running:
        yield running


@dataclass
class Figures:
    """One server's figures, one dict per round."""

    variant: Variant
    rounds: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def of(self, figure: str) -> list[float]:
        return [r[figure] for r in self.rounds]


async def bench(args: argparse.Namespace, tmp: Path, recording: bytes) -> list[Figures]:
    body = tmp / "recording.sse"
    body.write_bytes(recording)
    (tmp / "static_app.py").write_text(STATIC_APP_SOURCE)
    chosen = [VARIANTS[name] for name in args.servers]
    if args.static:
        chosen += [VARIANTS["static-uvicorn"], VARIANTS["static-granian"]]
    runnable = []
    for variant in chosen:
        missing = variant.missing()
        if missing:
            print(f"  skipped {variant.name}: {', '.join(missing)} not installed")
        else:
            runnable.append(variant)
    if not runnable or runnable[0].name != "uvicorn":
        raise SystemExit("the uvicorn line is the baseline: keep it first in --servers")
    results = [Figures(v) for v in runnable]
    with ExitStack() as stack:
        upstream = stack.enter_context(static_server(body))
        running: dict[str, Server] = {}
        for variant in runnable:
            backend = args.backend
            if backend.startswith("sqlite"):
                backend = f"sqlite:///{tmp / f'{variant.name}.db'}"
            env = {
                "SSE_CACHE_UPSTREAM": upstream.url,
                "SSE_CACHE_BACKEND": backend,
                "BENCH_BODY": str(body),
            }
            target = stack.enter_context(serve(variant, env, tmp, SERVER_CPU if args.pin else None))
            running[variant.name] = target
            if not variant.static:
                # Stored once (a miss; the answer ends once it is stored), then a hit.
                miss = Call.post(target.url, PAYLOAD, recording, "miss")
                await within(STALLED, one(target.url, miss), f"{variant.name}: the miss")
            await within(
                STALLED, one(target.url, call_for(target, variant, recording)), variant.name
            )
        for r in range(args.rounds):
            shift = r % len(results)
            for result in results[shift:] + results[:shift]:
                target = running[result.variant.name]
                call = call_for(target, result.variant, recording)
                name = result.variant.name
                before = thread_cpu(target.pid)
                loaded = await within(
                    STALLED * 10,
                    load(target.url, call, args.requests, args.connections, target.pid),
                    f"{name}: a load",
                )
                spent = [t - before.get(k, 0) for k, t in thread_cpu(target.pid).items()]
                result.errors += loaded.errors
                singles = [
                    await within(STALLED, timed(target.url, call), f"{name}: a single request")
                    for _ in range(args.single)
                ]
                figures = loaded.figures()
                del figures["backend_cpu_per_request"]
                figures["single"] = statistics.median(singles)
                figures["server_cores"] = loaded.server_cpu / loaded.elapsed
                # The busiest thread's share of the server's CPU (over the load and its
                # warm-up) applied to the load's CPU per request.
                share = max(spent) / sum(spent) if sum(spent) > 0 else math.nan
                figures["busiest_thread_cpu_per_request"] = (
                    share * figures["server_cpu_per_request"]
                )
                result.rounds.append(figures)
            print(f"  round {r + 1}")
            for result in results:
                print(f"    {result.variant.name:<19} {describe(result.rounds[-1])}")
    return results


def thread_cpu(pid: int) -> dict[tuple[int, int], int]:
    """CPU nanoseconds used so far by each thread of process ``pid`` and of its child
    processes, keyed by (process, thread)."""
    out: dict[tuple[int, int], int] = {}
    for proc in [pid, *children(pid)]:
        try:
            threads = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue  # gone
        for tid in threads:
            try:
                ns = Path(f"/proc/{proc}/task/{tid}/schedstat").read_text().split()[0]
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
            out[proc, int(tid)] = int(ns)
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (granian's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


async def within(seconds: float, work: Awaitable[T], what: str) -> T:
    """``work``'s result; a server that stalls it ``seconds`` fails the run, saying which."""
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise SystemExit(f"{what} got no complete answer within {seconds:.0f} s") from None


def call_for(target: Server, variant: Variant, recording: bytes) -> Call:
    return Call.post(target.url, PAYLOAD, recording, None if variant.static else "hit")


def describe(row: dict[str, float]) -> str:
    return (
        f"{row['rate']:5.0f} req/s  p50 {row['p50'] * 1e3:6.1f}  p99 {row['p99'] * 1e3:6.1f} ms"
        f"  single {row['single'] * 1e3:5.2f} ms  server CPU/request "
        f"{row['server_cpu_per_request'] * 1e6:5.0f} us (busiest thread "
        f"{row['busiest_thread_cpu_per_request'] * 1e6:4.0f})"
    )


# (figure, label, unit, digits, compared with uvicorn)
FIGURES = (
    ("rate", "req/s", 1.0, 0, True),
    ("p50", "p50 ms", 1e3, 1, True),
    ("p99", "p99 ms", 1e3, 1, True),
    ("single", "single ms", 1e3, 2, True),
    ("server_cpu_per_request", "server CPU/request us", 1e6, 0, True),
    # The thread that used the most CPU: one process cannot serve faster than this thread
    # alone can (the Python thread, which holds the GIL; granian moves part of the HTTP
    # work to a Rust thread beside it).
    ("busiest_thread_cpu_per_request", "busiest thread CPU/req us", 1e6, 0, True),
    ("client_cpu_per_request", "client CPU/request us", 1e6, 0, True),
    # How much of one core the server's processes used during the load: well under 1 on
    # a machine with cores to spare means the server was not what held the load back.
    ("server_cores", "server cores busy", 1.0, 2, False),
)


def summarize(results: list[Figures]) -> dict[str, Any]:
    base = results[0]
    print(f"\nmedians [min-max] over {len(base.rounds)} rounds; ratios to uvicorn, per round")
    report: dict[str, Any] = {}
    for result in results:
        name = result.variant.name
        entry: dict[str, Any] = {"rounds": result.rounds, "errors": result.errors}
        print(f"  {name}")
        if result.errors:
            print(f"    ERRORS ({len(result.errors)}): {result.errors[:3]}")
        for figure, label, unit, digits, compared in FIGURES:
            values = result.of(figure)
            line = f"    {label:<25} {spread(values, unit, digits):>22}"
            entry[figure] = summary_of(values)
            if compared and result is not base:
                # Higher is better for the rate; lower for the rest: a ratio > 1 always
                # means this server does better than uvicorn.
                own, theirs = values, base.of(figure)
                better = ratios(own, theirs) if figure == "rate" else ratios(theirs, own)
                entry[f"{figure} advantage"] = summary_of(better)
                line += f"   {spread(better, digits=2):>18}x better than uvicorn"
            print(line)
        report[name] = entry
    return report


def summary_of(values: list[float]) -> dict[str, float]:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("uvicorn", "granian", "httptools", "uvloop", "rloop", "sse-cache"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


async def main(args: argparse.Namespace) -> int:
    stream = args.stream if args.stream.is_absolute() else REAL_STREAMS / args.stream
    if not stream.is_file():
        raise SystemExit(f"no recorded stream at {stream} (set SSE_CACHE_REAL_STREAMS)")
    recording = stream.read_bytes()
    events = recording.count(b"\n\n")
    print(
        f"{stream.name} ({events} events, {len(recording) / 1000:.0f} KB), "
        f"backend {args.backend}; {args.requests} hits over {args.connections} connections per "
        f"load, {args.single} single requests, {args.rounds} rounds"
    )
    print(f"versions: {versions()}")
    if args.pin:
        # The client on one CPU, each server on the other: a server's threads cannot take
        # more than one core between them.
        os.sched_setaffinity(0, {CLIENT_CPU})
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        results = await bench(args, Path(tmp), recording)
    report = {"machine": machine(), "versions": versions(), "servers": summarize(results)}
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"\nmachine: {report['machine']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"written: {args.json}")
    return 1 if any(r.errors for r in results) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def names(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in VARIANTS]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown server {', '.join(unknown)}; known: {', '.join(VARIANTS)}"
            )
        return chosen

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=names, default=DEFAULT_SERVERS)
    parser.add_argument(
        "--backend", default="memory://", help="memory:// or sqlite (a file per server)"
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per load")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--single", type=int, default=20, help="single requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--static", action="store_true", help="add each server's ceiling")
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"confine each server to CPU {SERVER_CPU} and the client to CPU {CLIENT_CPU}",
    )
    parser.add_argument("--stream", type=Path, default=Path(DEFAULT_STREAM))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 40 requests over 10 connections"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.connections, args.rounds, args.single = 40, 10, 1, 3
    return args


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except ServerMissing as exc:
        raise SystemExit(str(exc)) from None

"""Instructions per hit, counted by valgrind: the proxy against the ceiling, without the noise.

On these shared 2-core VMs a load's throughput and CPU time move by ±30 % between rounds
(docs/performance.md), more than most changes to the hit path. An instruction count does not
move: ``valgrind --tool=callgrind`` counts what the server's process executed, whatever else
the machine was doing. This script starts each server under callgrind with its
instrumentation off, warms it up (``--warm`` hits over the same connections), turns the
instrumentation on (``callgrind_control -i on``), serves ``--hits`` hits, turns it off: the
count is the hits' alone, without start-up, warm-up or shut-down.

Servers: the *ceiling* (uvicorn serving the recorded stream from a plain ASGI app, as in
bench_scale.py; it is also the proxy's upstream, run natively) and ``sse-cache proxy`` on each
``--backends`` (memory, sqlite, redis: a redis-server is started). The client runs natively
in this process: ``--connections`` keep-alive connections, each answer checked byte for byte
(and ``x-sse-cache: hit`` through the proxy).

An instruction is not a nanosecond (cache misses, system calls and the kernel's share are not
in it), so this is the ratio of the CPU work in the server's own process, not of its time. One
kind of instruction is far from it: glibc copies memory with ``rep movsb``, which callgrind
counts once per byte — ~200k "instructions" for a copy of the 195 KB answer that takes ~5 µs.
So each count is printed with its copies (``memcpy``/``memmove``, from ``callgrind_annotate``)
and without them, and the ratio of the counts without copies is the one to read.

A second reference, *ceiling with length*, is the same app saying the body's length
(``content-length``) as the proxy's hits do: uvicorn's h11 then frames no chunks (and makes no
copy of the body to frame it).

Run: ``.venv/bin/python benchmarks/bench_instructions.py [--backends memory,sqlite]``
(~1 minute per server; needs valgrind). ``PYTHONPATH=<another checkout>/src`` measures
another version of sse_cache with the same script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from _servers import free_port
from bench_scale import (
    CLI,
    DEFAULT_STREAM,
    REAL_STREAMS,
    STATIC_APP,
    Call,
    backend_urls,
    load,
    one,
    static_server,
)

PAYLOAD = {"model": "o3-mini", "input": "bench instructions", "stream": True}


def wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server under valgrind exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server under valgrind did not start") from None
            time.sleep(0.2)


def launch(argv: list[str], tmp: Path) -> tuple[int, Path, subprocess.Popen[bytes]]:
    """Start ``argv`` (``{port}`` replaced) under callgrind and wait until it accepts
    connections: (its port, valgrind's log file, the process)."""
    port = free_port()
    log = tmp / f"valgrind.{port}.log"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",  # (turned on once the server is warm: instrument())
        f"--callgrind-out-file={tmp / f'callgrind.{port}.out'}",
        f"--log-file={log}",
        *(a.replace("{port}", str(port)) for a in argv),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, 300)
    except BaseException:
        proc.kill()
        raise
    return port, log, proc


def total_instructions(log: Path) -> int:
    """What valgrind's log says callgrind collected (instrumented instructions only)."""
    for line in log.read_text().splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].replace(",", "").strip())
    raise RuntimeError(f"no count in {log}")


# glibc's memcpy/memmove variants (__memmove_avx_unaligned_erms, __memcpy_ssse3, ...).
_COPY_FUNCTION = re.compile(r":__(?:mem(?:cpy|move)\w*)\b")


def copy_instructions(out: Path) -> int:
    """The instructions counted in glibc's memory copies, from callgrind's output file."""
    annotated = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = 0
    for line in annotated.splitlines():
        count, _, where = line.strip().partition(" ")
        if _COPY_FUNCTION.search(where) and count.replace(",", "").isdigit():
            total += int(count.replace(",", ""))
    return total


async def counted(
    argv: list[str], call: Call, warm: Call | None, args: argparse.Namespace
) -> tuple[int, int]:
    """Run ``argv`` (``{port}`` replaced) under callgrind, instrumentation off; warm it
    (``warm`` once, then ``args.warm`` copies of ``call``); count ``args.hits`` copies of
    ``call``: the instructions its process executed for them, and those of them that were
    memory copies."""
    with tempfile.TemporaryDirectory() as tmp:
        port, log, proc = launch(argv, Path(tmp))
        try:
            url = f"http://127.0.0.1:{port}"
            if warm is not None:
                await one(url, warm)
            await served(url, call, args.warm, args.connections)
            instrument(proc.pid, "on")
            await served(url, call, args.hits, args.connections)
            instrument(proc.pid, "off")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        return total_instructions(log), copy_instructions(Path(tmp) / f"callgrind.{port}.out")


async def served(url: str, call: Call, hits: int, connections: int) -> None:
    done = await load(url, call, hits, connections)
    if done.errors:
        raise SystemExit(f"wrong answers under valgrind: {done.errors[:3]}")


def instrument(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)


class Count(NamedTuple):
    """Instructions per request: all of them, and those of them that were memory copies."""

    total: float
    copies: float

    @property
    def without_copies(self) -> float:
        return self.total - self.copies


async def per_request(
    name: str, argv: list[str], call: Call, warm: Call | None, args: argparse.Namespace
) -> Count:
    total, copies = await counted(argv, call, warm, args)
    each = Count(total / args.hits, copies / args.hits)
    print(
        f"  {name:19} {each.total / 1000:9.1f} k instructions per request"
        f" ({each.copies / 1000:.1f} k of them memory copies;"
        f" {each.without_copies / 1000:.1f} k without)",
        flush=True,
    )
    return each


def ratios(proxy: Count, reference: Count, name: str) -> None:
    print(
        f"    proxy / {name}: {proxy.total / reference.total:.2f}x the instructions per request,"
        f" {proxy.without_copies / reference.without_copies:.2f}x without the copies"
    )


async def main(args: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (apt-get install -y valgrind)")
    stream = REAL_STREAMS / DEFAULT_STREAM
    if not stream.exists():
        raise SystemExit(f"no recorded stream at {stream} (set SSE_CACHE_REAL_STREAMS)")
    recording = stream.read_bytes()
    print(
        f"instructions per request under callgrind: {stream.name} "
        f"({len(recording) / 1000:.0f} KB); "
        f"{args.hits} requests over {args.connections} connections, counted after "
        f"{args.warm} not counted"
    )
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        upstream = stack.enter_context(static_server(stream))
        urls = stack.enter_context(backend_urls(args.backends, Path(tmp)))
        ceiling_call = Call.post(upstream.url, PAYLOAD, recording, None)
        ceiling_argv = [sys.executable, "-c", STATIC_APP, "{port}"]
        os.environ["BENCH_BODY"] = str(stream)
        ceiling = await per_request("ceiling", ceiling_argv, ceiling_call, None, args)
        os.environ["BENCH_CONTENT_LENGTH"] = "1"
        try:
            with_length = await per_request(
                "ceiling with length", ceiling_argv, ceiling_call, None, args
            )
        finally:
            del os.environ["BENCH_CONTENT_LENGTH"]
        for kind in args.backends:
            backend = urls[kind][0]
            if kind == "sqlite":
                backend = f"sqlite:///{Path(tmp) / f'instructions-{time.time_ns()}.db'}"
            elif kind == "redis":
                backend += f"?prefix=instructions-{time.time_ns()}:"
            proxy_argv = [*CLI, "proxy", "--upstream", upstream.url, "--backend", backend]
            proxy_argv += ["--port", "{port}", "--log-level", "warning"]
            miss = Call.post(upstream.url, PAYLOAD, recording, None)  # stored, or already
            hit = Call.post(upstream.url, PAYLOAD, recording, "hit")
            # A memory:// proxy starts empty each time; the warm-up stores the answer.
            proxy = await per_request(f"proxy {kind}", proxy_argv, hit, miss, args)
            ratios(proxy, ceiling, "ceiling")
            ratios(proxy, with_length, "ceiling with length")
    print(f"machine: load average {statistics.fmean(os.getloadavg()):.2f} (does not matter here)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="memory,sqlite,redis", type=lambda t: t.split(","))
    parser.add_argument("--warm", type=int, default=50, help="requests before counting")
    parser.add_argument("--hits", type=int, default=300, help="requests counted")
    parser.add_argument("--connections", type=int, default=10)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

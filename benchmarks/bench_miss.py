"""The miss path through ``sse-cache proxy``, against the same request straight to the upstream.

(a) unpaced: an upstream that sends a 2,000-delta OpenAI Responses stream as fast as it can,
    one HTTP chunk per event. Time to the last byte of a miss (a new prompt each request)
    through the proxy vs the same kind of request direct, alternating within each round:
    medians [min-max] and the ratio. And how many HTTP chunks (one per ASGI body message of
    the proxy) the client received for the upstream's chunks.
(b) paced: 200 events 5-20 ms apart (seeded), each stamped by the upstream with the time it
    sent it. The latency of each event (its arrival at the client minus its send time, one
    clock: CLOCK_MONOTONIC is system-wide), through the proxy, through the proxy's forwarder
    alone (no cache: the floor of a second hop built like ours), through a bare asyncio TCP
    relay (no HTTP at all: the floor of any second hop in Python) and direct: p50 and p99,
    what the proxy adds, and how much of it each floor adds too.

The upstream, the proxy (``sse-cache proxy --backend memory://``) and the client each run in
a process of their own. Every miss is checked: ``x-sse-cache: miss``; and once per run the
proxy's answer and the stored entry (a hit) equal the upstream's bytes for the same prompt.

Run: ``.venv/bin/python benchmarks/bench_miss.py [--rounds N] [--deltas N] [--paced N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field

from _servers import BARE_FORWARDER, server

# A plain ASGI upstream, in its own process: a Responses stream for the request's prompt, one
# body message per event. ``x-bench-gaps-ms: LO-HI`` paces it (seeded by ``x-bench-seed``) and
# stamps each event with a comment line holding the time it was sent; without it the events
# go out as fast as the server takes them (a checkpoint between two, as a real server yields).
UPSTREAM_APP = """
import json, random, sys, time
import anyio, anyio.lowlevel, uvicorn
from sse_cache.events import serialize_sse
from sse_cache.testing import responses_stream

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    headers = dict(scope["headers"])
    deltas = int(headers.get(b"x-bench-deltas", b"2000"))
    gaps = headers.get(b"x-bench-gaps-ms", b"").decode()
    rng = random.Random(headers.get(b"x-bench-seed", b"0"))
    events = responses_stream(json.loads(body)["input"], text_deltas=deltas, delta_chars=6,
                              summaries=1)
    chunks = [serialize_sse([event]) for event in events]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    if gaps:
        low, _, high = gaps.partition("-")
        low_s, high_s = float(low) / 1e3, float(high or low) / 1e3
    for chunk in chunks:
        if gaps:
            await anyio.sleep(rng.uniform(low_s, high_s))
            chunk = b": sent %.6f\\n" % time.monotonic() + chunk
        else:
            await anyio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
# The floor of any second hop in Python on this machine: an asyncio TCP relay that copies bytes
# both ways and parses nothing (no HTTP, no cache), a process of its own.
RELAY = """
import asyncio, sys
host, port = sys.argv[1].split("//", 1)[1].split(":")

async def pump(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
    finally:
        writer.close()

async def handle(reader, writer):
    upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
    await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer),
                         return_exceptions=True)

async def main():
    relay = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[2]))
    async with relay:
        await relay.serve_forever()

asyncio.run(main())
"""
CLI = [sys.executable, "-m", "sse_cache"]
# ``sse-cache`` under cProfile; the stats are written when the server is told to stop (uvicorn
# restores this handler and re-raises the signal once it has shut down).
PROFILED_CLI = """
import cProfile, signal, sys
from sse_cache.cli import main
profile = cProfile.Profile()
def stop(*_):
    profile.disable()
    profile.dump_stats(sys.argv[1])
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
profile.enable()
main(sys.argv[2:])
stop()
"""


@dataclass
class Answer:
    """One answer as the client saw it."""

    status: int
    cache: str
    body: bytes
    seconds: float  # to the last byte, from before connecting
    chunks: int  # HTTP chunks of the body
    latencies: list[float] = field(default_factory=list)  # per stamped event, seconds


async def ask(url: str, prompt: str, headers: dict[str, str]) -> Answer:
    """POST a streamed Responses request on a new connection; read the chunked answer, noting
    when each event arrived."""
    host, port = url.split("//", 1)[1].split(":")
    content = json.dumps({"model": "gpt-bench", "input": prompt, "stream": True}).encode()
    lines = [
        "POST /v1/responses HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        "authorization: Bearer sk-bench",
        f"content-length: {len(content)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + content)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        found = dict(line.split(b": ", 1) for line in header_lines)
        found = {k.lower(): v for k, v in found.items()}
        if found.get(b"transfer-encoding") != b"chunked":
            raise RuntimeError(f"expected a chunked answer, got {head!r}")
        parts: list[bytes] = []
        latencies: list[float] = []
        pending = b""
        chunks = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = (await reader.readexactly(size + 2))[:-2]
            now = time.monotonic()
            chunks += 1
            parts.append(data)
            pending += data
            *done, pending = pending.split(b"\n\n")
            for block in done:
                if block.startswith(b": sent "):
                    latencies.append(now - float(block[7:].split(b"\n", 1)[0]))
        seconds = time.perf_counter() - start
    finally:
        writer.close()
    cache = found.get(b"x-sse-cache", b"").decode()
    status = int(status_line.split(b" ", 2)[1])
    return Answer(status, cache, b"".join(parts), seconds, chunks, latencies)


def spread(values: list[float], unit: float = 1.0, digits: int = 1) -> str:
    low, med, high = (
        f"{v * unit:.{digits}f}" for v in (min(values), statistics.median(values), max(values))
    )
    return f"{med} [{low}-{high}]"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def check(answer: Answer, cache: str, what: str) -> None:
    if answer.status != 200 or answer.cache != cache:
        raise SystemExit(f"{what}: HTTP {answer.status}, x-sse-cache {answer.cache!r}")


async def unpaced(proxy: str, upstream: str, args: argparse.Namespace, run: str) -> None:
    headers = {"x-bench-deltas": str(args.deltas)}
    # Byte identity, once: the proxy's miss and its stored entry against the upstream.
    direct = await ask(upstream, f"{run} identity", headers)
    miss = await ask(proxy, f"{run} identity", headers)
    hit = await ask(proxy, f"{run} identity", headers)
    check(miss, "miss", "the identity miss")
    check(hit, "hit", "the identity hit")
    if not direct.body == miss.body == hit.body:
        raise SystemExit("the proxy's answer (or the stored entry) differs from the upstream's")
    events = direct.body.count(b"\n\n")
    print(
        f"(a) unpaced: {events} events, {len(direct.body) / 1024:.0f} KiB, one upstream chunk "
        f"per event; {args.rounds} rounds; miss and stored entry byte-identical to the upstream"
    )
    through, straight, ratios, proxy_chunks, direct_chunks = [], [], [], [], []
    for r in range(args.rounds):
        steps = [("proxy", proxy), ("direct", upstream)]
        if r % 2:
            steps.reverse()
        times = {}
        for name, url in steps:
            answer = await ask(url, f"{run} unpaced {name} {r}", headers)
            if name == "proxy":
                check(answer, "miss", "a miss")
                proxy_chunks.append(answer.chunks)
            else:
                direct_chunks.append(answer.chunks)
            times[name] = answer.seconds
        through.append(times["proxy"])
        straight.append(times["direct"])
        ratios.append(times["proxy"] / times["direct"])
    print(f"    miss through the proxy  {spread(through, 1e3)} ms to the last byte")
    print(f"    direct                  {spread(straight, 1e3)} ms")
    print(f"    ratio (per round)       {spread(ratios, 1, 2)}x")
    print(
        f"    HTTP chunks to the client: direct {spread(direct_chunks, 1, 0)}, "
        f"through the proxy {spread(proxy_chunks, 1, 0)} (the proxy's body messages)"
    )


async def paced(paths: dict[str, str], args: argparse.Namespace, run: str) -> None:
    headers = {"x-bench-deltas": str(args.paced), "x-bench-gaps-ms": args.gaps}
    print(
        f"(b) paced: {args.paced} deltas, {args.gaps} ms apart; {args.paced_rounds} rounds; "
        "latency of each event (arrival at the client - sent by the upstream)"
    )
    names = list(paths)
    lat: dict[str, list[float]] = {name: [] for name in names}
    p50: dict[str, list[float]] = {name: [] for name in names}
    p99: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.paced_rounds):
        # Each path goes first, second and last in turn: the same gaps for all (seeded).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seeded = {**headers, "x-bench-seed": str(r)}
            answer = await ask(paths[name], f"{run} paced {name} {r}", seeded)
            if name == "proxy":
                check(answer, "miss", "a paced miss")
            lat[name] += answer.latencies
            p50[name].append(pct(answer.latencies, 50))
            p99[name].append(pct(answer.latencies, 99))
    for name in names:
        print(
            f"    {name:9}  p50 {spread(p50[name], 1e3, 2)} ms  p99 {spread(p99[name], 1e3, 2)}"
            f" ms  (all {len(lat[name])} events: p50 {pct(lat[name], 50) * 1e3:.2f} ms,"
            f" p99 {pct(lat[name], 99) * 1e3:.2f} ms)"
        )

    def added(name: str, over: str = "direct") -> tuple[float, float]:
        return tuple(pct(lat[name], q) - pct(lat[over], q) for q in (50, 99))  # type: ignore[return-value]

    added50, added99 = added("proxy")
    print(
        f"    the proxy adds per event: p50 {added50 * 1e3:+.2f} ms, p99 {added99 * 1e3:+.2f} ms "
        f"(target: at most 1 ms at p99) {'ok' if added99 <= 0.001 else 'ABOVE TARGET'}"
    )
    if "forwarder" in paths:
        floor50, floor99 = added("forwarder")
        own50, own99 = added("proxy", "forwarder")
        print(
            f"    the forwarder alone (no cache) adds: p50 {floor50 * 1e3:+.2f} ms, "
            f"p99 {floor99 * 1e3:+.2f} ms: the second hop's floor on this machine"
        )
        print(
            f"    the cache's own share (proxy - forwarder): p50 {own50 * 1e3:+.2f} ms, "
            f"p99 {own99 * 1e3:+.2f} ms"
        )
    if "relay" in paths:
        relay50, relay99 = added("relay")
        print(
            f"    a bare TCP relay (asyncio, parses nothing) adds: p50 {relay50 * 1e3:+.2f} ms, "
            f"p99 {relay99 * 1e3:+.2f} ms: any second hop in Python on this machine"
        )


async def main(args: argparse.Namespace) -> None:
    run = f"run {time.time()}"  # prompts never asked before, also of a proxy left running
    with server(sys.executable, "-c", UPSTREAM_APP, "{port}") as upstream:
        cli = CLI
        if args.profile:
            cli = [sys.executable, "-c", PROFILED_CLI, args.profile]
        proxy_cmd = [*cli, "proxy", "--upstream", upstream.url, "--backend", "memory://"]
        proxy_cmd += ["--port", "{port}", "--log-level", "warning"]
        forwarder_cmd = [sys.executable, "-c", BARE_FORWARDER, upstream.url, "{port}"]
        relay_cmd = [sys.executable, "-c", RELAY, upstream.url, "{port}"]
        with (
            server(*proxy_cmd) as proxy,
            server(*forwarder_cmd) as forwarder,
            server(*relay_cmd) as relay,
        ):
            paths = {
                "proxy": proxy.url,
                "forwarder": forwarder.url,
                "relay": relay.url,
                "direct": upstream.url,
            }
            # Warm all (imports, first connections) before anything is timed.
            for url in paths.values():
                await ask(url, f"{run} warm-up", {"x-bench-deltas": "50"})
            if args.deltas:
                await unpaced(proxy.url, upstream.url, args, run)
            if args.paced:
                await paced(paths, args, run)
    if args.profile:  # written when the proxy exited
        print(f"\nthe proxy's profile ({args.profile}), by own time:")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="unpaced rounds (default 9)")
    parser.add_argument("--deltas", type=int, default=2000, help="unpaced deltas (0: skip)")
    parser.add_argument("--paced", type=int, default=200, help="paced deltas (0: skip)")
    parser.add_argument("--gaps", default="5-20", help="paced gaps in ms, LO-HI (default 5-20)")
    parser.add_argument("--profile", help="run the proxy under cProfile, stats to this file")
    parser.add_argument("--paced-rounds", type=int, default=3, help="paced rounds (default 3)")
    asyncio.run(main(parser.parse_args()))

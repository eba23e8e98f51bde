"""``sse-cache demo``: the same streamed request twice — a miss that records, a hit that
replays — with timings, and a check that the replay equals the original byte for byte."""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from ..adapters import GenericSSE
from ..engine import StreamCache
from ..events import Event, serialize_sse
from ..testing import paced, responses_stream

__all__ = ["register", "run_demo"]


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help="record a mock streamed answer, replay it from the cache, compare",
        description=(
            "Streams a mock OpenAI Responses answer (reasoning summaries and text deltas, paced "
            "like a model) through the cache twice and shows the miss and the hit."
        ),
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="backend URL (default: a SQLite file in a temporary directory)",
    )
    parser.add_argument("--deltas", type=int, default=120, help="text deltas (default 120)")
    parser.add_argument(
        "--delay-ms", type=float, default=8.0, help="upstream gap between events (default 8)"
    )
    parser.add_argument(
        "--first-ms", type=float, default=250.0, help="upstream time to first event"
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.deltas < 1 or args.delay_ms < 0 or args.first_ms < 0:
        raise SystemExit("sse-cache demo: --deltas must be >= 1 and delays >= 0")
    with tempfile.TemporaryDirectory(prefix="sse-cache-demo-") as tmp:
        url = args.backend or f"sqlite:///{Path(tmp) / 'demo.db'}"
        ok: bool = anyio.run(run_demo, url, args.deltas, args.delay_ms / 1000, args.first_ms / 1000)
    return 0 if ok else 1


async def run_demo(backend_url: str, deltas: int, delay: float, first: float) -> bool:
    """Run the demo against ``backend_url``; True when the replay equals the original."""
    original = responses_stream("What is sse-cache?", text_deltas=deltas, summaries=3)
    print("sse-cache demo: one OpenAI Responses stream, requested twice")
    print(f"  backend  {backend_url}")
    print(
        f"  upstream {len(original)} events (3 reasoning summaries, {deltas} text deltas), "
        f"{first * 1000:.0f} ms to first event, {delay * 1000:.0f} ms between events"
    )
    async with StreamCache(backend_url, GenericSSE()) as cache:
        request = cache.request(
            {"model": "gpt-mock-1", "input": "What is sse-cache?", "stream": True},
            route="POST /v1/responses",
            # A fresh namespace per run: the first request is a miss even on a warm backend.
            namespace=f"demo-{uuid.uuid4().hex}",
        )
        statuses: list[str] = []
        runs: list[list[Event]] = []
        for attempt in (1, 2):
            start = time.perf_counter()
            first_at: float | None = None
            got: list[Event] = []
            async with cache.stream(
                request, lambda: paced(original, delay=delay, first_delay=first)
            ) as stream:
                async for event in stream:
                    if first_at is None:
                        first_at = time.perf_counter() - start
                    got.append(event)
            total = time.perf_counter() - start
            stored = "  stored" if stream.stored else ""
            print(
                f"  request {attempt}: {stream.status.value:<5} first event "
                f"{_ms(first_at or 0.0)}  total {_ms(total)}  {len(got)} events{stored}"
            )
            runs.append(got)
            statuses.append(stream.status.value)
    same = serialize_sse(runs[0]) == serialize_sse(runs[1]) == serialize_sse(original)
    size = len(serialize_sse(runs[1]))
    verdict = "yes" if same else "NO — replay differs from the original"
    print(f"  replay identical to the original: {verdict} ({len(runs[1])} events, {size} bytes)")
    if statuses != ["miss", "hit"]:
        print(f"  expected a miss then a hit, got {statuses}")
        return False
    return same


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"

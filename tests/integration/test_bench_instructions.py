"""The instruction-count benchmark's smoke run: ``benchmarks/bench_instructions.py`` starts
the ceiling and a memory proxy under valgrind, turns the count on once each is warm and serves
a few hits, every answer checked byte for byte. Nothing about speed is asserted: only that it
runs, that the answers were right, and that it counted the hits (a count that was never
turned on reads 0)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from servers import require_binary, require_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_scale import REAL_STREAMS

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_instructions.py"
STREAM = REAL_STREAMS / "openai-responses_reasoning-4-summaries_o3-mini.sse"

pytestmark = pytest.mark.real_streams


def test_the_hits_are_counted_under_valgrind(tmp_path: Path) -> None:
    require_binary("valgrind", "valgrind")
    require_file(STREAM, "the recorded stream")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--backends",
            "memory",
            "--warm",
            "2",
            "--hits",
            "6",
            "--connections",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(
        r"^  (ceiling|ceiling with length|proxy memory)\s+([\d.]+) k instructions per request"
        r" \(([\d.]+) k of them memory copies; ([\d.]+) k without\)",
        done.stdout,
        re.M,
    )
    counts = {name: [float(k) for k in figures] for name, *figures in rows}
    assert set(counts) == {"ceiling", "ceiling with length", "proxy memory"}, done.stdout
    # Serving a 195 KB answer through uvicorn takes hundreds of thousands of instructions.
    assert all(total > 100 for total, _, _ in counts.values()), counts
    assert all(abs(total - copies - rest) < 0.2 for total, copies, rest in counts.values())
    # The copies are found: h11 joins a chunk's framing and the 195 KB body into one bytes, a
    # copy callgrind counts once per byte; said the length, it frames nothing, copies nothing.
    assert counts["ceiling"][1] > 150 > counts["ceiling with length"][1], counts

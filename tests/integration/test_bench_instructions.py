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
    counts = dict(
        re.findall(r"^  (ceiling|proxy memory)\s+([\d.]+) k instructions", done.stdout, re.M)
    )
    assert set(counts) == {"ceiling", "proxy memory"}, done.stdout
    # Serving a 195 KB answer through uvicorn takes hundreds of thousands of instructions.
    assert all(float(k) > 100 for k in counts.values()), counts

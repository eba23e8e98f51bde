"""The server benchmark's smoke run: ``benchmarks/bench_server.py --quick`` serves the
proxy's app with uvicorn (and granian, where it is installed) in front of a recorded stream,
sends hits and checks every answer byte for byte. Nothing about time is asserted: only that
it runs, that every answer was right, and that the JSON report holds the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_scale import REAL_STREAMS

from servers import require_file

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_server.py"
STREAM = REAL_STREAMS / "openai-responses_reasoning-4-summaries_o3-mini.sse"

pytestmark = pytest.mark.real_streams


def test_the_quick_run_serves_every_hit_correctly(tmp_path: Path) -> None:
    require_file(STREAM, "the recorded stream")
    report = tmp_path / "servers.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(report.read_text())
    uvicorn = figures["servers"]["uvicorn"]
    assert uvicorn["errors"] == []
    assert uvicorn["rounds"] and all(r["rate"] > 0 for r in uvicorn["rounds"])
    assert figures["versions"]["sse-cache"]

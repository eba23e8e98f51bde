"""The examples in examples/ are real programs: run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_quickstart(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "engine_quickstart.py"), str(tmp_path / "q.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.splitlines() == ["miss Hello world!", "hit Hello world!"]


def test_demo_command_prints_a_miss_then_an_identical_hit() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sse_cache",
            "demo",
            "--deltas",
            "20",
            "--delay-ms",
            "1",
            "--first-ms",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout
    assert "miss" in lines and "hit" in lines
    assert "identical to the original: yes" in lines

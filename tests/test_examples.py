"""The examples in examples/ are real programs: run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["http", "in-process"])
def test_demo_command_prints_a_miss_then_an_identical_hit(mode: list[str]) -> None:
    args = ["demo", "--deltas", "20", "--delay-ms", "1", "--first-ms", "5", *mode]
    result = subprocess.run(
        [sys.executable, "-m", "sse_cache", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    miss = next(line for line in out.splitlines() if "request 1" in line)
    hit = next(line for line in out.splitlines() if "request 2" in line)
    assert "miss" in miss and "hit" in hit
    assert "identical to the original: yes" in out
    if not mode:
        assert "openai SDK" in out and "requests that reached the upstream: 1" in out

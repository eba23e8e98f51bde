"""The examples in examples/ are real programs: run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(args: list[str], cwd: Path) -> str:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=True
    ).stdout


def quickstart_block(page: Path) -> str:
    """The Python block under the page's "Quickstart: the engine" heading."""
    section = page.read_text().split("## Quickstart: the engine", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.parametrize("where", ["default", "absolute"])
def test_engine_quickstart(tmp_path: Path, where: str) -> None:
    # Run from a directory of its own: its cache must land where the URL says, i.e.
    # sqlite:///quickstart.db in the working directory (not /quickstart.db, which running as
    # root would silently allow), and an absolute path given as an argument at that path.
    cwd, elsewhere = tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    elsewhere.mkdir()
    args = [] if where == "default" else [str(elsewhere / "q.db")]
    out = run_python([str(ROOT / "examples" / "engine_quickstart.py"), *args], cwd)
    assert out.splitlines() == ["miss Hello world!", "hit Hello world!"]
    expected = cwd / "quickstart.db" if where == "default" else elsewhere / "q.db"
    assert expected.is_file()
    assert {p for d in (cwd, elsewhere) for p in d.iterdir() if p.suffix == ".db"} == {expected}


def test_docs_quickstart_runs_and_keeps_its_cache_where_the_url_says(tmp_path: Path) -> None:
    code = quickstart_block(ROOT / "docs" / "index.md")
    assert '"sqlite:///quickstart.db"' in code
    out = run_python(["-c", code], tmp_path)
    assert out.splitlines() == ["miss Hello world!", "hit Hello world!"]
    assert (tmp_path / "quickstart.db").is_file()


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


def test_demo_without_the_metrics_package_runs_in_process() -> None:
    # uvicorn and httpx2 installed but prometheus_client not (a partial install): the HTTP
    # demo's proxy needs all three, so the demo runs on the engine instead of crashing.
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from sse_cache.cli import main\n"
        "sys.exit(main(['demo', '--deltas', '5', '--delay-ms', '0', '--first-ms', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not installed: running the engine demo in process" in result.stdout
    assert "identical to the original: yes" in result.stdout

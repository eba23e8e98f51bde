"""The scale benchmark's smoke run: ``benchmarks/bench_scale.py --quick`` starts the ceiling
(uvicorn serving a real recorded stream), a redis-server and a real ``sse-cache proxy`` process
per backend (memory, SQLite, Redis; SQLite and Redis also with two workers), sends hits over
concurrent connections (5 and 10) and checks every answer byte for byte, measures the events
scaling on 100 and 1,000 events, and the proxy's memory with live misses and followers.
Nothing about time is asserted: only that it runs, that every answer was right, and that the
JSON report holds every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import plot_scale
from bench_scale import REAL_STREAMS, Call, load, reset_peak, static_server, tree_memory

from servers import in_ci, require_binary, require_file

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"
STREAM = REAL_STREAMS / "openai-responses_reasoning-4-summaries_o3-mini.sse"

pytestmark = pytest.mark.real_streams


def test_the_quick_run_answers_every_request_correctly(tmp_path: Path) -> None:
    require_binary("redis-server", "redis-server")
    require_file(STREAM, "the recorded stream")
    report = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(report.read_text())
    names = [config["name"] for config in figures["hits"]]
    assert names == [
        f"{proxy}, {connections} connections"
        for proxy in (
            "memory, 1 worker",
            "sqlite, 1 worker",
            "redis, 1 worker",
            "sqlite, 2 workers",
            "redis, 2 workers",
        )
        for connections in (5, 10)
    ]
    for config in figures["hits"]:
        assert config["errors"] == [], config["name"]
        assert config["requests"] == 3 * config["connections"]
        (row,) = config["rounds"]
        for path in ("proxy", "ceiling"):
            assert row[path]["rate"] > 0
            assert 0 < row[path]["p50"] <= row[path]["p99"]
        assert config["summary"]["ratio rate"]["median"] > 0
    rows = figures["events"]
    assert [row["deltas"] for row in rows] == [100, 1_000]
    for row in rows:
        assert row["events"] > row["deltas"]  # the deltas and the events around them
        assert all(len(row[path]) == 1 for path in ("miss", "direct", "hit", "ceiling"))
    # Memory: live misses and followers (each follower's answer was checked to be "shared"),
    # 1 and 5 of each, then 5 of each with a longer answer.
    cases = [(c["kind"], c["count"], c["deltas"]) for c in figures["memory"]]
    assert cases == [
        ("misses", 1, 100),
        ("misses", 5, 100),
        ("followers", 1, 100),
        ("followers", 5, 100),
        ("misses", 5, 300),
        ("followers", 5, 300),
    ]
    for case in figures["memory"]:
        assert case["errors"] == [], case["name"]
        (memory,) = case["rounds"]
        assert 0 < memory["baseline"] <= memory["peak"]
        assert case["bytes"] > case["deltas"] * 100  # a whole Responses answer
    assert figures["memory"][4]["bytes"] > 2 * figures["memory"][1]["bytes"]


def test_the_peak_rss_is_the_peak_of_what_follows_its_reset() -> None:
    # What the memory figures rely on: after reset_peak, VmHWM forgets an earlier peak.
    with subprocess.Popen(
        [sys.executable, "-c", "x = bytearray(64 << 20); del x; print(flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        try:
            assert child.stdout is not None
            child.stdout.readline()  # 64 MiB touched and freed
            assert tree_memory(child.pid, "VmHWM") > tree_memory(child.pid, "VmRSS") + (48 << 20)
            reset_peak(child.pid)
            assert tree_memory(child.pid, "VmHWM") < tree_memory(child.pid, "VmRSS") + (8 << 20)
        finally:
            child.kill()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_wrong_body_is_counted_as_an_error() -> None:
    # The check the figures rely on: an answer that differs by one byte is an error.
    require_file(STREAM, "the recorded stream")
    recording = STREAM.read_bytes()
    altered = recording[:-3] + b"X\n\n"
    payload = {"model": "o3-mini", "input": "check", "stream": True}
    with static_server(STREAM) as ceiling:
        good = await load(ceiling.url, Call.post(ceiling.url, payload, recording, None), 8, 2)
        assert good.errors == [] and len(good.latencies) == 8
        with pytest.raises(Exception, match="differs"):
            await load(ceiling.url, Call.post(ceiling.url, payload, altered, None), 8, 2)


def test_the_plots_and_tables_come_from_the_committed_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/performance.md embeds these: they must be drawable from docs/img/scale.json.
    if in_ci():
        import matplotlib  # noqa: F401  (CI installs it: a missing one fails, never skips)
    else:
        pytest.importorskip("matplotlib")
    figures = Path(__file__).resolve().parents[2] / "docs" / "img" / "scale.json"
    assert plot_scale.main([str(figures), "--out", str(tmp_path)]) == 0
    for name in ("scale-throughput.png", "scale-events.png", "scale-memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    capsys.readouterr()
    assert plot_scale.main([str(figures), "--tables", "100"]) == 0
    tables = capsys.readouterr().out
    assert "| memory | " in tables and "| 100,026 | " in tables and "| 500 live misses | " in tables
    # Without matplotlib: the command that installs it, not a traceback.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_scale.main([str(figures), "--out", str(tmp_path)]) == 2
    assert "pip install -c requirements/dev.lock matplotlib" in capsys.readouterr().err

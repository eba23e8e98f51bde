"""``sse-cache demo``: what it refuses before any server starts (a bad ``--backend``; a delay
that is not a finite number of milliseconds: tests/test_cli_mock_upstream.py, for both
commands). The demo itself runs in tests/test_examples.py."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from sse_cache.cli import demo, main


@pytest.fixture
def never_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a check to let a bad value through, the demo would start (and with an infinite
    delay never end): it fails instead."""

    def refuse(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("the demo started: a check let a bad value through")

    monkeypatch.setattr(demo, "run_http_demo", refuse)
    monkeypatch.setattr(demo, "run_engine_demo", refuse)


@pytest.mark.usefixtures("never_run")
@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["http", "in-process"])
@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("foo", "backend URL must look like scheme://..., got 'foo'"),
        ("nosuch://x", "unknown backend URL scheme 'nosuch'; known schemes: "),
        (
            "memory://?max_bytes=abc",
            "memory:// option 'max_bytes': expected a size such as 1048576, 512KiB or 64MiB, "
            "got 'abc'",
        ),
        ("redis://:hunter2@[::1", "redis:// URL: "),
    ],
)
def test_a_bad_backend_is_said_in_one_line_before_any_server_starts(
    url: str, said: str, mode: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # It was an ExceptionGroup traceback from inside the servers' task group (a plain one
    # with --in-process).
    assert main(["demo", "--backend", url, *mode]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"sse-cache demo: --backend: {said}")
    assert captured.err.count("\n") == 1 and "hunter2" not in captured.err


def test_good_delays_are_taken_as_given() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    demo.register(sub)
    args = parser.parse_args(["demo", "--delay-ms", "0", "--first-ms", "2.5"])
    assert (args.delay_ms, args.first_ms) == (0.0, 2.5)

"""``sse-cache proxy`` as operators run it: options from ``SSE_CACHE_*`` variables, validated
values, the docs' option table, log lines (format, startup, access, rate-limited backend
warnings), ``--workers`` as real processes on one port, ``--graceful-timeout`` under SIGTERM /
SIGINT, and the container recipe (Dockerfile, compose.yaml) parsed through the CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml

from servers import free_port
from sse_cache import serialize_sse
from sse_cache._logging import RateLimitedLog, redact_url
from sse_cache.backends import from_url
from sse_cache.cli import main
from sse_cache.cli.proxy import (
    OPTIONS,
    add_options,
    forwards_to_itself,
    plan_workers,
    register,
    resolve,
)
from sse_cache.errors import ConfigError
from sse_cache.proxy import create_proxy_app, log_config
from sse_cache.testing import GatedUpstream, MockUpstream, metric_value, responses_stream

ROOT = Path(__file__).resolve().parents[2]
HEADERS = {"authorization": "Bearer sk-ops-secret-123"}
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

#: A log line as the proxy writes it: UTC time to the millisecond, level, [process].
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) \[(?P<pid>\d+)\] ")


def parsed(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    """``sse-cache proxy ARGV`` with ``environ``: the options it would run with."""
    parser = argparse.ArgumentParser()
    add_options(parser)
    return resolve(parser.parse_args(argv), environ)


# -- options from the environment -----------------------------------------------------------

#: A value for every option's variable, and what it must read as. A new option fails
#: test_every_option_reads_its_variable until it is added here.
SAMPLES: dict[str, tuple[str, Any]] = {
    "SSE_CACHE_UPSTREAM": ("https://api.anthropic.com", "https://api.anthropic.com"),
    "SSE_CACHE_BACKEND": ("redis://redis:6379/1", "redis://redis:6379/1"),
    "SSE_CACHE_HOST": ("0.0.0.0", "0.0.0.0"),
    "SSE_CACHE_PORT": ("9100", 9100),
    "SSE_CACHE_WORKERS": ("4", 4),
    "SSE_CACHE_TTL": ("86400", 86400.0),
    "SSE_CACHE_SHARED_TENANT": ("true", True),
    "SSE_CACHE_ROUTE": (
        "/chat/completions=openai-chat, /responses=openai-responses",
        [("/chat/completions", "openai-chat"), ("/responses", "openai-responses")],
    ),
    "SSE_CACHE_CREDENTIAL_HEADER": ("X-Session, x-team-key", ["x-session", "x-team-key"]),
    "SSE_CACHE_KEY_HEADER": ("x-account", ["x-account"]),
    "SSE_CACHE_FINISH_ON_DISCONNECT": ("yes", True),
    "SSE_CACHE_RESUME_WINDOW": ("45", 45.0),
    "SSE_CACHE_CROSS_PROCESS": ("1", True),
    "SSE_CACHE_CROSS_PROCESS_LEASE": ("2.5", 2.5),
    "SSE_CACHE_BREAKER_FAILURES": ("0", 0),
    "SSE_CACHE_BREAKER_COOLDOWN": ("30", 30.0),
    "SSE_CACHE_MAX_BODY_BYTES": ("2MiB", 2097152),  # (units as backend URLs take them)
    "SSE_CACHE_UPSTREAM_TIMEOUT": ("120", 120.0),
    "SSE_CACHE_UPSTREAM_CONNECTIONS": ("500", 500),
    "SSE_CACHE_LIMIT_CONCURRENCY": ("1000", 1000),
    "SSE_CACHE_BODY_TIMEOUT": ("12.5", 12.5),
    "SSE_CACHE_HEADER_TIMEOUT": ("7", 7.0),
    "SSE_CACHE_DECODED_CACHE_MB": ("0", 0.0),
    "SSE_CACHE_SECRET": ("fleet secret", "fleet secret"),
    "SSE_CACHE_GRACEFUL_TIMEOUT": ("5", 5.0),
    "SSE_CACHE_LOG_LEVEL": ("DEBUG", "debug"),
}


def test_every_option_reads_its_variable() -> None:
    assert {opt.env for opt in OPTIONS} == set(SAMPLES)
    settings = parsed([], {name: text for name, (text, _) in SAMPLES.items()})
    for opt in OPTIONS:
        assert getattr(settings, opt.dest) == SAMPLES[opt.env][1], opt.env


def test_without_flags_or_variables_the_defaults_apply() -> None:
    settings = parsed(["--upstream", "http://127.0.0.1:9"], {"SSE_CACHE_TTL": ""})
    assert settings.backend == "sqlite:///./sse-cache.db"
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert settings.ttl is None  # an empty variable counts as unset
    assert settings.route == [] and settings.cross_process is False
    assert settings.graceful_timeout == 30.0 and settings.log_level == "info"


def test_flags_win_over_variables() -> None:
    environ = {
        "SSE_CACHE_UPSTREAM": "https://api.openai.com",
        "SSE_CACHE_PORT": "9002",
        "SSE_CACHE_ROUTE": "/a=generic /b=generic",
        "SSE_CACHE_CROSS_PROCESS": "false",
    }
    settings = parsed(
        ["--port", "9001", "--route", "/v1/responses=openai-responses", "--cross-process"],
        environ,
    )
    assert settings.upstream == "https://api.openai.com"  # no flag: the variable
    assert settings.port == 9001
    # The flags' routes replace the variable's list: they are not added to it.
    assert settings.route == [("/v1/responses", "openai-responses")]
    assert settings.cross_process is True


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("SSE_CACHE_PORT", "99999", "expected a port number from 1 to 65535, got '99999'"),
        ("SSE_CACHE_PORT", "http", "expected a port number, got 'http'"),
        ("SSE_CACHE_WORKERS", "0", "expected a number of workers >= 1, got '0'"),
        ("SSE_CACHE_TTL", "-5", "expected a positive number of seconds, got '-5'"),
        ("SSE_CACHE_TTL", "nan", "expected a positive number of seconds, got 'nan'"),
        ("SSE_CACHE_GRACEFUL_TIMEOUT", "soon", "expected a number of seconds >= 0"),
        ("SSE_CACHE_BODY_TIMEOUT", "-1", "expected a number of seconds >= 0, got '-1'"),
        ("SSE_CACHE_CROSS_PROCESS", "maybe", "expected true or false"),
        ("SSE_CACHE_ROUTE", "/x=nope", "unknown adapter 'nope' in '/x=nope'; known: "),
        ("SSE_CACHE_ROUTE", "v1/x=generic", "expected /PATH=ADAPTER, got 'v1/x=generic'"),
        ("SSE_CACHE_BACKEND", "cache.db", "expected a backend URL"),
        ("SSE_CACHE_KEY_HEADER", "x-a,x b:c", "expected a header name, got 'b:c'"),
        ("SSE_CACHE_HOST", "@@bad@@", "expected an address to listen on"),
        ("SSE_CACHE_HOST", "[::1]", "expected an address to listen on"),
        ("SSE_CACHE_LOG_LEVEL", "loud", "expected one of critical, error, warning, info"),
        ("SSE_CACHE_DECODED_CACHE_MB", "-1", "expected a number of MiB >= 0"),
        ("SSE_CACHE_CROSS_PROCESS_LEASE", "86401", "at most 86400, got '86401'"),
        # Not parsed by the options but by the backend or the app: named all the same.
        ("SSE_CACHE_BACKEND", "redis://h/0?bogus=1", "unknown option(s) 'bogus'"),
        ("SSE_CACHE_CROSS_PROCESS", "1", "needs a backend with locks and fan-out"),
    ],
)
def test_a_bad_variable_names_itself_and_what_was_expected(
    name: str, text: str, expected: str, monkeypatch: pytest.MonkeyPatch, never_served: None
) -> None:
    monkeypatch.setenv("SSE_CACHE_UPSTREAM", "http://127.0.0.1:9")
    monkeypatch.setenv(name, text)
    with pytest.raises(SystemExit) as info:
        main(["proxy"])
    message = str(info.value)
    assert re.match(f"sse-cache proxy: {name}:? ", message), message
    assert expected in message
    # As the same value given as a flag (argparse's 2): it exited 1 (helper-101).
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--backend", "redis://h/0?bogus=1"], "--backend: redis:// URL: unknown option(s)"),
        (["--backend", "nope://x"], "--backend: unknown backend URL scheme 'nope'"),
        (["--backend", "memory://", "--cross-process"], "--cross-process needs a backend with"),
    ],
)
def test_an_option_the_app_refuses_is_named_as_it_was_given(
    argv: list[str], expected: str, never_served: None
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "--upstream", "http://127.0.0.1:9", *argv])
    assert str(info.value).startswith(f"sse-cache proxy: {expected}"), info.value
    assert info.value.code == 2


def test_a_missing_upstream_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, never_served: None
) -> None:
    monkeypatch.delenv("SSE_CACHE_UPSTREAM", raising=False)
    with pytest.raises(SystemExit, match=r"--upstream URL or SSE_CACHE_UPSTREAM=URL"):
        main(["proxy"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--port", "99999"], "argument --port: expected a port number from 1 to 65535"),
        (["--port", "0"], "argument --port: expected a port number from 1 to 65535"),
        (["--workers", "two"], "argument --workers: expected a number of workers, got 'two'"),
        (["--breaker-failures", "-1"], "argument --breaker-failures: expected a number of"),
        (["--max-body-bytes", "0"], "argument --max-body-bytes: expected a number of bytes"),
        (["--max-body-bytes", "4MB2"], "argument --max-body-bytes: expected a number of bytes"),
        (["--upstream-timeout", "0"], "argument --upstream-timeout: expected a positive"),
        (["--cross-process-lease", "inf"], "argument --cross-process-lease: expected a positive"),
        (["--upstream", "http://"], "argument --upstream: upstream must be an http(s):// URL"),
        (["--upstream", "http://h:99999"], "argument --upstream: upstream 'http://h:99999' has a"),
        (["--cross-process-lease", "86401"], "--cross-process-lease: expected a positive number"),
        # Empty, it was uvicorn's "every interface": a proxy forwarding API keys, open to all.
        (["--host", ""], "argument --host: expected an address to listen on"),
        (["--host", " "], "argument --host: expected an address to listen on"),
    ],
)
def test_numeric_flags_are_checked_with_a_clear_message(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str], never_served: None
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["proxy", "--upstream", "http://127.0.0.1:9", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_port_out_of_range_is_no_traceback_from_the_command() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "sse_cache", "proxy", "--upstream", "http://x", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "expected a port number from 1 to 65535, got '99999'" in run.stderr
    assert "Traceback" not in run.stderr and "OverflowError" not in run.stderr


def test_docs_table_lists_every_option_with_its_variable_and_default() -> None:
    root = argparse.ArgumentParser()
    register(root.add_subparsers())
    # Every option the command's parser has (its destinations, as parsing nothing gives).
    dests = set(vars(root.parse_args(["proxy"]))) - {"run"}
    text = (ROOT / "docs" / "proxy.md").read_text()
    header = "| flag | variable | default | meaning |"
    assert text.count(header) == 1
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        flag, variable, default, meaning = (c.strip() for c in line.strip("|").split(" | "))
        rows[flag.strip("`").split()[0]] = (variable.strip("`"), default.replace("`", ""), meaning)
    assert {flag.removeprefix("--").replace("-", "_") for flag in rows} == dests
    for opt in OPTIONS:
        variable, default, meaning = rows[opt.flag]
        assert variable == opt.env, opt.flag
        assert default == opt.shown, opt.flag
        assert meaning, opt.flag


def test_a_misspelt_variable_is_warned_about(tmp_path: Path) -> None:
    # The command runs until stopped, so it is checked by what it logs before serving.
    env = {**os.environ, "SSE_CACHE_UPSTREM": "https://api.openai.com", "SSE_CACHE_OTHER": "x"}
    env["SSE_CACHE_UPSTREAM"] = "http://127.0.0.1:9"
    log = tmp_path / "proxy.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sse_cache", "proxy", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=env,
            cwd=tmp_path,
        )
    try:
        wait_for_line(log, "Application startup complete", proc)
    finally:
        stop(proc)
    text = log.read_text()
    assert "ignoring SSE_CACHE_UPSTREM: not an option (did you mean SSE_CACHE_UPSTREAM?)" in text
    assert "SSE_CACHE_OTHER" not in text  # other tools' variables are left alone


def test_a_refusal_names_a_misspelt_variable_too(tmp_path: Path) -> None:
    # The misspelt variable is why there is no upstream: the warning, logged only once the
    # configuration resolved, was lost with the refusal (helper-126).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_CACHE_")}
    env["SSE_CACHE_UPSTREM"] = "http://127.0.0.1:9"
    refused = subprocess.run(
        [sys.executable, "-m", "sse_cache", "proxy"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    lines = refused.stderr.splitlines()
    assert lines[0].startswith("sse-cache proxy: an upstream is required")
    assert lines[1:] == [
        "sse-cache proxy: ignoring SSE_CACHE_UPSTREM: not an option "
        "(did you mean SSE_CACHE_UPSTREAM?)"
    ]


def test_workers_on_redis_turn_cross_process_on() -> None:
    settings = parsed(["--upstream", "http://x", "--workers", "2"], {})
    settings.backend = "redis://127.0.0.1:1/0"
    assert plan_workers(settings) == [] and settings.cross_process is True


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("memory://", "each worker has a cache of its own"),
        # A database in each process's memory: it said the workers share its entries.
        ("sqlite:///:memory:", "each worker has a cache of its own"),
        ("sqlite:///./cache.db", "share its entries but not live streams"),
    ],
)
def test_workers_on_a_backend_without_live_streams_warn(backend: str, expected: str) -> None:
    settings = parsed(["--upstream", "http://x", "--workers", "3", "--backend", backend], {})
    (warning,) = plan_workers(settings)
    assert warning.startswith("--workers 3 with ") and expected in warning
    assert settings.cross_process is False
    single = parsed(["--upstream", "http://x", "--backend", backend], {})
    assert plan_workers(single) == []


@pytest.mark.parametrize(
    ("upstream", "host", "loops"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", True),
        ("http://localhost:8000/v1", "127.0.0.1", True),
        ("http://127.0.0.1:8000", "0.0.0.0", True),
        ("http://[::1]:8000", "::", True),
        ("http://10.0.0.5:8000", "10.0.0.5", True),
        ("http://127.0.0.1:8001", "127.0.0.1", False),  # another port
        ("http://10.0.0.5:8000", "127.0.0.1", False),  # another address
        ("http://api.example.com:8000", "0.0.0.0", False),
        # Other sockets on the same port (helper-85): never refused.
        ("http://127.0.0.2:8000", "127.0.0.1", False),
        ("http://127.0.0.1:8000", "::1", False),
        ("http://[::1]:8000", "127.0.0.1", False),
        ("http://localhost:8000", "::1", True),
        # A wildcard address connected to is this host's loopback (helper-126).
        ("http://0.0.0.0:8000", "127.0.0.1", True),
        ("http://0.0.0.0:8000", "localhost", True),
        ("http://[::]:8000", "::1", True),
        ("http://0.0.0.0:8000", "::1", False),
        ("http://0.0.0.0:8000", "10.0.0.5", False),
    ],
)
def test_an_upstream_that_is_the_proxy_itself_is_refused(
    upstream: str, host: str, loops: bool
) -> None:
    # Each request came back to the proxy, until it ran out of file descriptors (helper-81).
    settings = parsed(["--upstream", upstream, "--host", host, "--port", "8000"], {})
    assert forwards_to_itself(settings) is loops
    if loops:
        with pytest.raises(SystemExit, match="is this proxy itself"):
            main(["proxy", "--upstream", upstream, "--host", host, "--port", "8000"])


# -- log helpers ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """Something warnings are about (weakly referenced by the rate limiter)."""


def test_repeated_warnings_are_rate_limited_per_backend_and_topic(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("sse_cache.test_rate"), interval=10.0, clock=clock)
    one, two = Backend(), Backend()
    with caplog.at_level(logging.WARNING, logger="sse_cache.test_rate"):
        for i in range(6):
            log.warning(one, "read_failed", "read %d failed", i)
            clock.now += 1
        log.warning(two, "read_failed", "another backend")  # not held back by `one`
        log.warning(one, "store_failed", "another topic")  # nor by another topic
        clock.now += 5  # 11 s after the first line
        log.warning(one, "read_failed", "read %d failed", 6)
        log.warning(one, "read_failed", "read %d failed", 7)
    assert [r.getMessage() for r in caplog.records] == [
        "read 0 failed",
        "another backend",
        "another topic",
        "read 6 failed [5 more like this in the last 11 s]",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0?prefix=a:", "redis://:***@redis:6379/0?prefix=a:"),
        ("rediss://user:s3cret@h/1", "rediss://user:***@h/1"),
        ("sqlite:///./sse-cache.db", "sqlite:///./sse-cache.db"),
        ("sqlite:////data/sse-cache.db", "sqlite:////data/sse-cache.db"),
        (
            "https://g.example/v1beta?key=AIza-s3cret&alt=sse",
            "https://g.example/v1beta?key=***&alt=sse",
        ),
        ("redis://h:6379/0?password=s3cret&timeout=1", "redis://h:6379/0?password=***&timeout=1"),
    ],
)
def test_urls_in_log_lines_carry_no_secret(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- the proxy as a process -----------------------------------------------------------------


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """The first line of ``log`` containing ``text``, once the process wrote it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"the proxy exited: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Proxy:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def access(self) -> list[str]:
        """The access lines of requests on cached routes."""
        return [line for line in self.lines() if " cache=" in line]

    async def until(self, ready: Callable[[list[str]], bool], what: str) -> list[str]:
        """The log's lines once ``ready(lines)`` holds: as :func:`wait_for_line`, polled
        within its deadline (the process writes a line when it will: an access line after
        its response has ended)."""
        deadline = time.monotonic() + 30
        while not ready(lines := self.lines()):
            if self.proc.poll() is not None:
                raise AssertionError(f"the proxy exited: {lines}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {lines}")
            await anyio.sleep(0.05)
        return lines


@asynccontextmanager
async def proxy_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, script: Path | None = None
) -> AsyncIterator[Proxy]:
    """``sse-cache proxy ARGS`` (or the Python ``script`` given the port) in a process of its
    own on a free port, its stderr in a file; yields once it answers (its health may be
    503: the backend may be down on purpose)."""
    port = free_port()
    log = tmp_path / f"proxy-{port}.log"
    command = (
        [sys.executable, str(script), str(port)]
        if script is not None
        else [sys.executable, "-m", "sse_cache", "proxy", "--port", str(port), *args]
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting a process does not block for long
            command,
            stdout=subprocess.DEVNULL,
            stderr=out,
            env={**os.environ, **(env or {})},
            cwd=tmp_path,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with anyio.fail_after(60):
            async with httpx2.AsyncClient() as client:
                while True:
                    assert proc.poll() is None, log.read_text()
                    try:
                        await client.get(url + "/_sse_cache/health", timeout=5)
                        break
                    except httpx2.HTTPError:
                        await anyio.sleep(0.05)  # polling a process that is starting
        yield Proxy(url, proc, log)
    finally:
        await anyio.to_thread.run_sync(stop, proc)


def chat(prompt: str, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "gpt-mock",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    }


@pytest.mark.anyio
@asyncio_only
async def test_an_app_served_by_plain_uvicorn_logs_as_the_proxy_with_log_config(
    serve: Any, tmp_path: Path
) -> None:
    # create_proxy_app served another way logged none of our lines (no handler on
    # sse_cache), and uvicorn's access line showed Gemini's key= in full (helper-101; the
    # docs' workaround imported from the CLI's module). log_config() is the proxy's logging.
    script = tmp_path / "my_proxy.py"
    script.write_text(
        "import os, sys\n"
        "import uvicorn\n"
        "from sse_cache.proxy import create_proxy_app, log_config\n"
        "app = create_proxy_app(os.environ['SSE_CACHE_UPSTREAM'], 'memory://')\n"
        "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), log_config=log_config())\n"
    )
    async with (
        serve(MockUpstream(delay=0.001)) as upstream,
        proxy_process(tmp_path, env={"SSE_CACHE_UPSTREAM": upstream}, script=script) as p,
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        gemini = await client.post(
            "/v1beta/models/gemini-mock:streamGenerateContent?alt=sse&key=AIza-s3cret"
            "&access_token=ya29-s3cret",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        )
        await p.until(
            # (Not the startup line, which names the route too: it raced our access line.)
            lambda lines: sum("POST /v1beta/models/gemini-mock:" in line for line in lines) >= 2,
            "our access line and uvicorn's",
        )
        lines = p.lines()
    assert gemini.status_code == 200
    assert any("sse_cache: proxy for" in line for line in lines)  # the startup line
    assert any(" cache=miss " in line and "key=***" in line for line in lines)  # ours
    assert all(LINE.match(line) and "s3cret" not in line for line in lines), lines
    with pytest.raises(ConfigError, match="log level must be one of"):
        log_config("verbose")


@pytest.mark.anyio
@asyncio_only
async def test_log_lines_startup_and_access(serve: Any, tmp_path: Path) -> None:
    upstream_app = MockUpstream(delay=0.001)
    backend = f"sqlite:///{tmp_path / 'cache.db'}"
    async with (
        serve(upstream_app) as upstream,
        proxy_process(tmp_path, "--backend", backend, env={"SSE_CACHE_UPSTREAM": upstream}) as p,
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        miss = await client.post("/v1/chat/completions", json=chat("log me"))
        hit = await client.post("/v1/chat/completions", json=chat("log me"))
        refused = await client.post(
            "/v1/chat/completions", json=chat("rate limited"), headers={"x-mock-error": "429"}
        )
        unstored = await client.post(
            "/v1/chat/completions", json=chat("keep out"), headers={"cache-control": "no-store"}
        )
        gemini = await client.post(
            "/v1beta/models/gemini-mock:streamGenerateContent?alt=sse&key=AIza-s3cret",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        )
        await client.get("/v1/models")  # passed through: no access line of ours
        await p.until(
            lambda lines: (
                sum(" cache=" in line for line in lines) >= 5
                and any('"GET /v1/models' in line for line in lines)
            ),
            "access lines of all six requests",
        )
        lines, access = p.lines(), p.access()
    assert (miss.headers["x-sse-cache"], hit.headers["x-sse-cache"]) == ("miss", "hit")
    assert refused.status_code == 429 and unstored.status_code == 200
    assert gemini.status_code == 200
    for line in lines:
        assert LINE.match(line), line  # one format for uvicorn's lines and ours
        assert "sk-ops-secret-123" not in line and "AIza-s3cret" not in line
    startup = next(line for line in lines if "sse_cache: proxy for" in line)
    assert f"proxy for {upstream}, backend {backend}, routes /v1/responses=openai-responses" in (
        startup
    )
    assert any(f"sse_cache: backend {backend} answers" in line for line in lines)
    key = miss.headers["x-sse-cache-key"]
    assert len(access) == 5, access
    first, second, third, fourth, fifth = access
    assert (
        f"POST /v1/chat/completions 200 cache=miss key={key[:12]} bytes={len(miss.content)}"
        in first
    )
    assert first.endswith(" stored=yes") and " INFO " in first
    assert f"cache=hit key={key[:12]} bytes={len(hit.content)}" in second
    assert re.search(r" ms=\d+\.\d$", second) and "stored=" not in second
    assert "cache=miss" in third and third.endswith('stored=no reason="upstream status 429"')
    assert fourth.endswith('stored=no reason="the request said Cache-Control: no-store"')
    assert "?alt=sse&key=*** 200 cache=miss" in fifth and "stored=yes" in fifth
    # uvicorn's own access line: the same format, the query key redacted too.
    assert any(
        '"POST /v1beta/models/gemini-mock:streamGenerateContent?alt=sse&key=***' in line
        for line in lines
    )


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("limit", [1, 3])
async def test_limit_concurrency_serves_n_requests_at_once_and_503_past_them(
    limit: int, serve: Any, tmp_path: Path
) -> None:
    # Slow or stalled clients each hold a request (and a stalled miss up to max_entry_bytes):
    # --limit-concurrency bounds them per process (helper-83). N requests are served at once,
    # whatever else is connected: idle keep-alive connections do not count, the health check
    # and the metrics answer while the limit is reached (uvicorn's own limit counted the
    # connections, the new request's own included, and refused /_sse_cache/health when busy;
    # --limit-concurrency 1 refused everything: helper-97).
    gated = GatedUpstream(responses_stream("held", text_deltas=3), hold_after=1)
    gated.gate.set()  # open until the streams to hold
    async with (
        serve(gated) as upstream,
        proxy_process(
            tmp_path,
            "--backend",
            "memory://",
            "--upstream",
            upstream,
            "--limit-concurrency",
            str(limit),
        ) as p,  # fmt: skip
        AsyncExitStack() as stack,
    ):
        clients = [
            await stack.enter_async_context(
                httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS)
            )
            for _ in range(limit + 2)
        ]

        def asking(prompt: str) -> dict[str, Any]:
            return {"model": "gpt-mock", "input": prompt, "stream": True}

        # One request at a time, each on a connection of its own left open: all served.
        for i, client in enumerate(clients):
            answer = await client.post("/v1/responses", json=asking(f"one at a time {i}"))
            assert answer.status_code == 200, (i, answer.text)
        # N streams, released together, each on one of those idle connections: all served,
        # and held after their first event.
        gated.gate = anyio.Event()
        go = anyio.Event()
        held: list[httpx2.Response] = []

        async def hold(client: httpx2.AsyncClient, i: int) -> None:
            request = client.build_request("POST", "/v1/responses", json=asking(f"held {i}"))
            await go.wait()
            held.append(await stack.enter_async_context(_opened(client, request)))

        async with anyio.create_task_group() as tg:
            for i in range(limit):
                tg.start_soon(hold, clients[i], i)
            go.set()
        assert [r.status_code for r in held] == [200] * limit
        # One more: refused at once, saying why and when to come back.
        extra = clients[limit]
        busy = await extra.post("/v1/responses", json=asking("one too many"))
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        message = busy.json()["error"]["message"]
        assert f"limit of {limit} requests" in message and "--limit-concurrency" in message
        # A passed-through route counts too.
        assert (await extra.get("/v1/models")).status_code == 503
        # The proxy's own endpoints answer, on a new connection and on an idle one.
        for client in (clients[limit + 1], extra):
            assert (await client.get("/_sse_cache/health")).status_code == 200
            assert (await client.get("/_sse_cache/metrics")).status_code == 200
        # Counted, for the operator to see (and logged, once per 10 s).
        scrape = (await extra.get("/_sse_cache/metrics")).text
        assert metric_value(scrape, "sse_cache_refused_requests_total") == 2
        # ... and what the limit counts: the held streams (refused ones never were).
        assert metric_value(scrape, "sse_cache_requests_in_progress") == limit
        # A held stream read to its end gives its place back: the next request is served.
        gated.gate.set()
        assert await held[0].aread() == gated.body
        again = await extra.post("/v1/responses", json=asking("after one ended"))
        assert again.status_code == 200, again.text


async def _until_closed(host: str, port: int, sent: bytes) -> bytes:
    """What the proxy sends on a new connection given ``sent``, until it closes it."""
    async with await anyio.connect_tcp(host, port) as sock:
        if sent:
            await sock.send(sent)
        return await _rest(sock)


@pytest.mark.anyio
@asyncio_only
async def test_a_request_body_that_stops_coming_is_answered_408_and_gives_its_place_back(
    serve: Any, tmp_path: Path
) -> None:
    # A client that sent its request's head and then nothing, or part of its body, held its
    # place in --limit-concurrency for good: two of them locked every other caller out, and
    # the graceful shutdown waited for them (helper-113). Past --body-timeout without a byte
    # it is answered 408, its connection closed, and nothing runs upstream.
    upstream_app = GatedUpstream(responses_stream("after the stall", text_deltas=2))
    async with (
        serve(upstream_app) as upstream,
        proxy_process(
            tmp_path,
            "--backend",
            "memory://",
            "--upstream",
            upstream,
            "--limit-concurrency",
            "1",
            "--body-timeout",
            "0.5",
        ) as p,  # fmt: skip
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        host, port = p.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "gpt-mock", "input": "stalled", "stream": True}).encode()
        for path, sent in (
            ("/v1/responses", b""),  # the head, then nothing (a cached route)
            ("/v1/responses", body[:8]),  # part of the body
            ("/v1/files", body[:8]),  # part of a body streamed through to the upstream
        ):
            head = (
                f"POST {path} HTTP/1.1\r\nhost: proxy\r\n"
                f"authorization: {HEADERS['authorization']}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode()
            raw = await _until_closed(host, int(port), head + sent)
            said, _, answer = raw.partition(b"\r\n\r\n")
            assert said.startswith(b"HTTP/1.1 408 "), raw
            assert b"\r\nconnection: close" in said.lower()
            message = json.loads(answer)["error"]["message"]
            assert "no byte of the request body came for 0.5 s" in message, message
            # Its place was given back: the next request is served.
            served = await client.post(
                "/v1/responses", json={"model": "gpt-mock", "input": path, "stream": True}
            )
            assert served.status_code == 200, served.text
        # The two served; of the stalled ones, only the one streamed through reached the
        # upstream, cut off mid-body: never whole, so never run.
        with anyio.fail_after(30):  # a deadlock guard
            while len(upstream_app.bodies) < 3:  # noqa: ASYNC110 - the upstream's requests
                await anyio.sleep(0.01)
        assert body not in upstream_app.bodies and body[:8] in upstream_app.bodies
        assert upstream_app.calls == 3
        scrape = (await client.get("/_sse_cache/metrics")).text
        assert metric_value(scrape, "sse_cache_refused_requests_total") == 3
    assert sum("no byte of the request body came" in line for line in p.lines()) == 1  # (per 10 s)


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_connection_whose_request_head_does_not_come_is_closed(
    serve: Any, tmp_path: Path, workers: str
) -> None:
    # uvicorn times a connection out only after a response, and each byte cancels that: 300
    # connections that sent nothing, or trickled a head, held a proxy limited to 256 file
    # descriptors off the air, its health check included, for good (helper-132). Past
    # --header-timeout the proxy closes them (408 if part of a head came); a request whose
    # head came is served however long its answer takes. (Workers are spawned: they get
    # the protocol by name.)
    upstream_app = GatedUpstream(responses_stream("in time", text_deltas=2), delay=0.1)
    async with (
        serve(upstream_app) as upstream,
        proxy_process(
            tmp_path,
            "--backend",
            "memory://",
            "--upstream",
            upstream,
            "--header-timeout",
            "1",
            "--workers",
            workers,
        ) as p,  # fmt: skip
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        host, port = p.url.removeprefix("http://").split(":")
        assert await _until_closed(host, int(port), b"") == b""  # nothing came: closed
        partial = b"POST /v1/responses HTTP/1.1\r\nhost: pr"
        said = await _until_closed(host, int(port), partial)
        assert said.startswith(b"HTTP/1.1 408 "), said
        assert said.endswith(b"the request's head did not come in time")
        # An answer longer than the deadline (its events 0.1 s apart) is served whole.
        served = await client.post(
            "/v1/responses", json={"model": "gpt-mock", "input": "slow", "stream": True}
        )
        assert served.status_code == 200 and b"response.completed" in served.content
        assert (await client.get("/_sse_cache/health")).status_code == 200
        async with await anyio.connect_tcp(host, int(port)) as sock:
            # After a response, the wait for the next head begins again: a partial one is
            # answered 408. Before it, an upload still moving after its request was answered
            # early (405: health takes no POST) is not cut, however long it takes as a
            # whole, and the connection serves on.
            await sock.send(
                b"POST /_sse_cache/health HTTP/1.1\r\nhost: p\r\ncontent-length: 25\r\n\r\n"
            )
            assert b" 405 " in await _response(sock)
            for _ in range(25):  # 2.5 s in all, a byte every 0.1 s: a slow client's pace
                await sock.send(b"x")
                await anyio.sleep(0.1)
            await sock.send(b"GET /_sse_cache/health HTTP/1.1\r\nhost: p\r\n\r\n")
            assert b" 200 " in await _response(sock)
            await sock.send(b"GET /_sse_cache/health HTTP/1.1\r\nho")
            said = await _rest(sock)
            assert said.startswith(b"HTTP/1.1 408 "), said
        # Counted for the operator: the three above, and the client's own keep-alive
        # connections if they sat idle past the deadline (the workers' figures meet within a
        # second or so: the scrape is repeated until they have).
        closed = 0.0
        with anyio.fail_after(30):
            while closed < 3:
                scrape = (await client.get("/_sse_cache/metrics")).text
                closed = metric_value(scrape, "sse_cache_head_timeouts_total")
                await anyio.sleep(0.1)
    assert any("request's head did not come within --header-timeout" in x for x in p.lines())


async def _response(sock: Any) -> bytes:
    """One whole response with a content-length (health's), read from ``sock``."""
    raw = b""
    with anyio.fail_after(30):  # a deadlock guard
        while b"\r\n\r\n" not in raw:
            raw += await sock.receive()
        head, _, body = raw.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += await sock.receive()
    return head


async def _rest(sock: Any) -> bytes:
    """What comes on ``sock`` until the other end closes it."""
    raw = b""
    with anyio.fail_after(30):  # a deadlock guard
        while True:
            try:
                raw += await sock.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return raw


@pytest.mark.anyio
@asyncio_only
async def test_a_client_that_left_does_not_hold_its_place_against_its_own_resume(
    serve: Any, tmp_path: Path
) -> None:
    # With a resume window, the stream of a client that left is read on for it: counted
    # against --limit-concurrency until the upstream ended, it refused the client's own
    # resume (503) all that time (helper-99). A request's place is given back as its client
    # is known gone.
    events = responses_stream("come back", text_deltas=6)
    gated = GatedUpstream(events, hold_after=3)
    async with (
        serve(gated) as upstream,
        proxy_process(
            tmp_path,
            "--backend",
            "memory://",
            "--upstream",
            upstream,
            "--limit-concurrency",
            "1",
            "--resume-window",
            "60",
        ) as p,  # fmt: skip
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        body = {"model": "gpt-mock", "input": "come back", "stream": True}
        request = client.build_request("POST", "/v1/responses", json=body)
        async with _opened(client, request) as first:
            assert first.status_code == 200
            seen = b""
            async for chunk in first.aiter_raw():
                seen += chunk
                if seen.count(b"\n\n") >= 3:
                    break
        # (Closed: the client left, the upstream held after its third event.)
        response_id = json.loads(events[0].data)["response"]["id"]
        params = {"stream": "true", "starting_after": "2"}
        with anyio.fail_after(30):
            while True:  # until the proxy has heard the first client leave
                resumed = await client.send(
                    client.build_request("GET", f"/v1/responses/{response_id}", params=params),
                    stream=True,
                )
                if resumed.status_code != 503:
                    break
                await resumed.aclose()
                await anyio.sleep(0.05)  # (retry-after says 1 s: a client's own pace)
        try:
            assert resumed.status_code == 200 and resumed.headers["x-sse-cache"] == "shared"
            gated.gate.set()
            rest = await resumed.aread()
        finally:
            await resumed.aclose()
        after = [e for e in events if json.loads(e.data)["sequence_number"] > 2]
        assert rest == serialize_sse(after)


@asynccontextmanager
async def _opened(
    client: httpx2.AsyncClient, request: httpx2.Request
) -> AsyncIterator[httpx2.Response]:
    response = await client.send(request, stream=True)
    try:
        yield response
    finally:
        await response.aclose()


@pytest.mark.anyio
@asyncio_only
async def test_a_path_never_writes_a_log_line_or_a_terminal_escape(
    serve: Any, tmp_path: Path
) -> None:
    # The access line (and the "response aborted" warning) printed the decoded path: %0a
    # wrote a whole forged line of the client's choosing, %1b raw terminal escapes
    # (helper-83). Now the path as sent, a control character escaped all the same.
    forged = "2026-01-01T00:00:00.000Z INFO [1] sse_cache: FORGED"
    path = f"/x%0a{forged.replace(' ', '%20')}%1b[2J/v1/chat/completions"
    async with (
        serve(MockUpstream(delay=0.001)) as upstream,
        proxy_process(tmp_path, "--backend", "memory://", "--upstream", upstream) as p,
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        await client.post(path, json=chat("forge"))
        await p.until(lambda lines: any(" cache=" in line for line in lines), "the access line")
        lines = p.lines()
    assert not any(line.startswith(forged[:24]) for line in lines), lines
    assert not any("\x1b" in line for line in lines)
    (access,) = [line for line in lines if " cache=" in line]
    assert "POST /x%0a2026-01-01T00:00:00.000Z%20INFO" in access, access


@pytest.mark.anyio
@asyncio_only
async def test_access_lines_of_requests_served_together_each_say_their_own_outcome(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A herd (one producer, followers) and a failing request at the same moment: each line
    # carries what happened to its own request, not its neighbours'.
    upstream_app = MockUpstream(first_delay=0.3, delay=0.002)
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy, timeout=30) as client:
            go = anyio.Event()

            async def one(prompt: str, error: str = "") -> None:
                await go.wait()
                headers = {**HEADERS, "x-mock-error": error} if error else HEADERS
                await client.post("/v1/chat/completions", json=chat(prompt), headers=headers)

            with caplog.at_level(logging.INFO, logger="sse_cache.access"):
                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(one, "together")
                    tg.start_soon(one, "refused", "500")
                    go.set()
        await app.aclose()
    records = [r for r in caplog.records if r.name == "sse_cache.access"]
    outcomes = Counter(
        (r.cache_status, r.stored, r.reason.split(":")[0])  # type: ignore[attr-defined]
        for r in records
    )
    assert outcomes == {
        ("miss", True, ""): 1,
        ("shared", None, ""): 7,
        ("miss", False, "upstream status 500"): 1,
    }, outcomes


@pytest.mark.anyio
@asyncio_only
async def test_the_access_line_of_a_no_cache_request_says_whether_it_was_stored(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Cache-Control: no-cache answers from the upstream (x-sse-cache: bypass) and stores what
    # it gets: its line said nothing of it (helper-154).
    async with serve(MockUpstream()) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy, timeout=30) as client:
            with caplog.at_level(logging.INFO, logger="sse_cache.access"):
                fresh = {**HEADERS, "cache-control": "no-cache"}
                first = await client.post("/v1/chat/completions", json=chat("nc"), headers=fresh)
            again = await client.post("/v1/chat/completions", json=chat("nc"), headers=HEADERS)
        await app.aclose()
    assert first.headers["x-sse-cache"] == "bypass" and again.headers["x-sse-cache"] == "hit"
    lines = [r.getMessage() for r in caplog.records if r.name == "sse_cache.access"]
    [line] = [line for line in lines if " cache=bypass " in line]
    assert " stored=yes" in line, line


class _HeldHead:
    """An SSE upstream whose response head waits for :attr:`gate`."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        await self.gate.wait()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = serialize_sse(responses_stream("held", text_deltas=2))
        await send({"type": "http.response.body", "body": body})


@pytest.mark.anyio
@asyncio_only
async def test_a_follower_that_left_before_the_head_is_counted_and_logged_as_a_follower(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its client gave up on a slow first token: it was counted a bypass (uncacheable
    # traffic), its line said cache=- key=- (helper-154). It was a follower: shared, its key,
    # and why it has no answer.
    upstream_app = _HeldHead()
    body = {"model": "gpt-mock", "input": "held head", "stream": True}
    async with serve(upstream_app) as upstream:
        app = create_proxy_app(upstream, f"sqlite:///{tmp_path / 'c.db'}")
        async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy, timeout=30) as client:
            with caplog.at_level(logging.INFO, logger="sse_cache.access"):
                with anyio.fail_after(30):  # a deadlock guard
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(
                            partial(client.post, "/v1/responses", json=body, headers=HEADERS)
                        )
                        while upstream_app.calls == 0:  # noqa: ASYNC110
                            await anyio.sleep(0.01)
                        follower = anyio.CancelScope()
                        tg.start_soon(partial(_post_within, follower, client, body))
                        while "shared" not in await _live_status(client):  # noqa: ASYNC110
                            await anyio.sleep(0.01)
                        follower.cancel()  # its client leaves
                        while not any(  # noqa: ASYNC110
                            "left while it waited" in r.getMessage() for r in caplog.records
                        ):
                            await anyio.sleep(0.01)
                        upstream_app.gate.set()
                scrape = (await client.get("/_sse_cache/metrics")).text
        await app.aclose()
    assert metric_value(scrape, "sse_cache_requests_total", status="shared") == 1
    assert metric_value(scrape, "sse_cache_requests_total", status="bypass") == 0
    [left] = [r for r in caplog.records if "left while it waited" in r.getMessage()]
    assert left.cache_status == "shared"  # type: ignore[attr-defined]
    assert re.search(r" cache=shared key=[0-9a-f]{8,} ", left.getMessage()), left.getMessage()


async def _post_within(scope: anyio.CancelScope, client: httpx2.AsyncClient, body: Any) -> None:
    with scope:
        await client.post("/v1/responses", json=body, headers=HEADERS)


async def _live_status(client: httpx2.AsyncClient) -> str:
    scrape = (await client.get("/_sse_cache/metrics")).text
    return "shared" if metric_value(scrape, "sse_cache_live_stream_followers") >= 1 else ""


@pytest.mark.anyio
@asyncio_only
async def test_an_unreachable_backend_is_warned_at_startup_and_rate_limited(
    serve: Any, tmp_path: Path
) -> None:
    upstream_app = MockUpstream(delay=0.001)
    down = f"redis://:s3cret@127.0.0.1:{free_port()}/0?timeout=0.2"
    async with (
        serve(upstream_app) as upstream,
        proxy_process(
            tmp_path, "--upstream", upstream, "--backend", down, "--breaker-failures", "0"
        ) as p,
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=HEADERS) as client,
    ):
        started = time.monotonic()
        answers = [
            await client.post("/v1/chat/completions", json=chat(f"fail open {i}"))
            for i in range(20)
        ]
        elapsed = time.monotonic() - started
        health = await client.get("/_sse_cache/health")
        lines = await p.until(
            lambda lines: sum(" cache=miss" in line for line in lines) >= 20,
            "20 access lines",
        )
    # Fail-open: every request served, as a miss.
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.headers["x-sse-cache"] for a in answers} == {"miss"}
    assert health.status_code == 503
    warned = [line for line in lines if "does not answer" in line]
    assert len(warned) == 1 and " WARNING " in warned[0]
    assert "backend redis://:***@127.0.0.1:" in warned[0] and "serving uncached" in warned[0]
    assert not any("s3cret" in line for line in lines)
    # 20 failed reads (and 20 failed writes): a line per 10 s per kind, the rest counted.
    warnings = [line for line in lines if " cache=" not in line]  # not the access lines
    reads = [line for line in warnings if "backend read failed" in line]
    writes = [line for line in warnings if "backend write failed" in line]
    allowed = 1 + int(elapsed / 10) + 1
    assert 1 <= len(reads) <= allowed and 1 <= len(writes) <= allowed, (reads, elapsed)
    access = [line for line in lines if " cache=miss" in line]
    assert len(access) == 20
    assert all(re.search(r'stored=no reason="backend write failed: ', a) for a in access)


# -- the operational endpoints -------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_health_and_metrics_answer_get_and_head_and_refuse_other_methods(
    serve: Any,
) -> None:
    # They answered any method: a POST or a DELETE got a 200 as if it had done something.
    app = create_proxy_app(f"http://127.0.0.1:{free_port()}", "memory://")
    try:
        async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy, timeout=30) as client:
            for path in ("/_sse_cache/health", "/_sse_cache/metrics"):
                got = await client.get(path)
                assert got.status_code == 200 and got.content, path
                head = await client.head(path)
                assert head.status_code == 200 and head.content == b"", path
                assert head.headers["content-type"] == got.headers["content-type"]
                assert int(head.headers["content-length"]) > 0
                for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                    refused = await client.request(method, path, json={})
                    assert refused.status_code == 405, (method, path)
                    assert refused.headers["allow"] == "GET, HEAD"
                    assert refused.headers["content-type"] == "application/json"
                    assert refused.json() == {
                        "error": {
                            "message": f"{path} answers GET and HEAD only, not {method}",
                            "type": "method_not_allowed",
                            "code": "method_not_allowed",
                        }
                    }
            # An unknown endpoint stays unknown, whatever the method.
            for method in ("GET", "POST"):
                missing = await client.request(method, "/_sse_cache/nope")
                assert missing.status_code == 404 and "allow" not in missing.headers
    finally:
        await app.aclose()


@pytest.mark.anyio
@asyncio_only
async def test_a_secret_makes_the_entries_checksum_a_mac(serve: Any, tmp_path: Path) -> None:
    # SSE_CACHE_SECRET (or --secret): the proxy writes as MsgpackCodec(secret=...) does, and
    # the inspection commands read with the same variable (test_cli_inspect).
    from sse_cache.cli.proxy import build_app
    from sse_cache.codec import MsgpackCodec
    from sse_cache.errors import CorruptEntry

    url = f"sqlite:///{tmp_path / 'cache.db'}"
    async with serve(MockUpstream(delay=0.001)) as upstream:
        settings = parsed(
            ["--backend", url], {"SSE_CACHE_UPSTREAM": upstream, "SSE_CACHE_SECRET": "fleet secret"}
        )
        app = build_app(settings)
        async with serve(app) as proxy, httpx2.AsyncClient(base_url=proxy) as client:
            answer = await client.post("/v1/chat/completions", json=chat("mac"), headers=HEADERS)
            assert answer.headers["x-sse-cache"] == "miss"
        await app.aclose()
    store = from_url(url)
    try:
        (key,) = [key async for key in store.scan()]  # type: ignore[attr-defined]
        data = await store.get(key)
    finally:
        await store.aclose()
    assert data is not None
    assert MsgpackCodec(secret=b"fleet secret").decode(data).events
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        MsgpackCodec().decode(data)


# -- workers --------------------------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_two_workers_serve_one_port_and_a_herd_makes_one_upstream_call(
    serve: Any, redis_server: Any, tmp_path: Path
) -> None:
    upstream_app = MockUpstream(first_delay=0.5, delay=0.002)
    backend = f"{redis_server.url}?prefix=w{uuid.uuid4().hex[:8]}:"
    body = {"model": "gpt-mock", "input": "one call for the whole herd", "stream": True}
    env = {"SSE_CACHE_UPSTREAM": "", "SSE_CACHE_BACKEND": backend}
    async with serve(upstream_app) as upstream, AsyncExitStack() as clients:
        env["SSE_CACHE_UPSTREAM"] = upstream
        p = await clients.enter_async_context(proxy_process(tmp_path, "--workers", "2", env=env))
        # One connection per client, opened one after another: the kernel hands each to
        # either worker (a herd's new connections would all go to the first to accept).
        herd = []
        for _ in range(40):
            client = httpx2.AsyncClient(base_url=p.url, timeout=60)
            herd.append(await clients.enter_async_context(client))
            assert (await client.get("/_sse_cache/health")).status_code == 200
        results: list[httpx2.Response] = []
        go = anyio.Event()

        async def one(client: httpx2.AsyncClient) -> None:
            await go.wait()
            results.append(await client.post("/v1/responses", json=body, headers=HEADERS))

        async with anyio.create_task_group() as tg:
            for client in herd:
                tg.start_soon(one, client)
            go.set()
        # The access lines are written as the responses end.
        await p.until(lambda lines: sum(" cache=" in li for li in lines) >= 40, "40 lines")
        lines, access = p.lines(), p.access()
        # Whichever worker a scrape reaches, it counts the whole herd: the workers share
        # their figures (each writes its own every second; a scrape adds the others'), so
        # every scrape says 40 once the other worker's latest figures are written.
        with anyio.move_on_after(30):
            while (counts := [await scraped_requests(c) for c in herd]) != [40] * 40:  # noqa: ASYNC110
                await anyio.sleep(0.1)  # nothing to wait on: each worker writes every second
        assert counts == [40] * 40
    statuses = Counter(r.headers["x-sse-cache"] for r in results)
    assert upstream_app.stats()["total"] == 1, statuses
    assert statuses["miss"] == 1 and statuses["shared"] + statuses["hit"] == 39, statuses
    assert len({r.content for r in results}) == 1
    # Which process answered is in each line: both workers served the herd.
    pids = Counter(LINE.match(line)["pid"] for line in access)  # type: ignore[index]
    assert len(pids) == 2 and sum(pids.values()) == 40, pids
    parent = next(line for line in lines if "2 workers on 127.0.0.1:" in line)
    assert "cross-process single-flight on" in parent
    starts = {LINE.match(line)["pid"] for line in lines if "sse_cache: proxy for" in line}  # type: ignore[index]
    assert starts == set(pids)


def worker_pids(lines: list[str], text: str) -> set[str]:
    """The processes that wrote a line holding ``text``."""
    return {LINE.match(line)["pid"] for line in lines if text in line}  # type: ignore[index]


@pytest.mark.anyio
@asyncio_only
async def test_a_worker_publishes_its_last_counts_as_it_shuts_down(
    serve: Any, tmp_path: Path
) -> None:
    # A worker writes its figures for the others every second (here: every hour, so that
    # only what it writes as it shuts down can be seen). Those it counted since its last
    # write were lost at a restart (SIGHUP) or a shutdown (helper-97).
    env = {"SSE_CACHE_WORKERS_METRICS_INTERVAL": "3600"}
    served = 12
    async with (
        serve(MockUpstream(delay=0.001)) as upstream,
        proxy_process(
            tmp_path,
            "--workers",
            "2",
            "--upstream",
            upstream,
            "--backend",
            f"sqlite:///{tmp_path / 'cache.db'}",
            env=env,
        ) as p,  # fmt: skip
    ):
        ready = "Application startup complete"
        lines = await p.until(lambda lines: len(worker_pids(lines, ready)) == 2, "two workers")
        old = worker_pids(lines, ready)
        for i in range(served):  # a connection each: the kernel hands them to either worker
            async with httpx2.AsyncClient(base_url=p.url, timeout=30) as client:
                answer = await client.post(
                    "/v1/chat/completions", json=chat(f"counted {i}"), headers=HEADERS
                )
                assert answer.status_code == 200
        await p.until(lambda lines: sum(" cache=" in li for li in lines) >= served, "lines")
        p.proc.send_signal(signal.SIGHUP)  # a restart: new workers first, then the old end
        finished = "Finished server process"
        await p.until(lambda lines: old <= worker_pids(lines, finished), "the old workers' end")
        async with httpx2.AsyncClient(base_url=p.url, timeout=30) as client:
            assert await scraped_requests(client) == served


@pytest.mark.anyio
@asyncio_only
async def test_workers_refuse_new_connections_at_once_after_sigterm(
    serve: Any, tmp_path: Path
) -> None:
    # After SIGTERM the workers close their listening sockets and drain their streams. The
    # supervisor kept its copy open: new connections were accepted into the backlog and hung
    # until the last stream ended, then were reset (helper-97). One process refuses them at
    # once; so do N.
    gated = GatedUpstream(responses_stream("draining", text_deltas=3), hold_after=1)
    async with (
        serve(gated) as upstream,
        proxy_process(
            tmp_path,
            "--workers",
            "2",
            "--upstream",
            upstream,
            "--backend",
            f"sqlite:///{tmp_path / 'cache.db'}",
        ) as p,  # fmt: skip
        httpx2.AsyncClient(base_url=p.url, timeout=60) as client,
    ):
        ready = "Application startup complete"
        lines = await p.until(lambda lines: len(worker_pids(lines, ready)) == 2, "two workers")
        workers = worker_pids(lines, ready)
        body = {"model": "gpt-mock", "input": "a stream in flight", "stream": True}
        request = client.build_request("POST", "/v1/responses", json=body, headers=HEADERS)
        async with _opened(client, request) as stream:
            assert stream.status_code == 200
            p.proc.send_signal(signal.SIGTERM)

            # Each worker has closed its listening socket once it says it waits for its
            # connections, or that it has finished (uvicorn closes it before either line).
            def closed(lines: list[str]) -> bool:
                waiting = worker_pids(lines, "Waiting for connections to close")
                return workers <= waiting | worker_pids(lines, "Finished server process")

            await p.until(closed, "both workers' sockets closed")
            port = int(p.url.rsplit(":", 1)[1])
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=30).close()
            # The stream in flight is still served to its end.
            gated.gate.set()
            assert await stream.aread() == gated.body
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(p.proc.wait)
    assert not any("Traceback" in line for line in p.lines())


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("when", ["during the restart", "right behind the SIGHUP"])
async def test_workers_told_to_exit_during_a_restart_stop_accepting_at_once(
    serve: Any, tmp_path: Path, when: str
) -> None:
    # SIGHUP replaces the workers one at a time, each old one draining its streams first
    # (up to the grace period). uvicorn's supervisor only queued a SIGTERM meanwhile: new
    # connections were served until the whole restart was over, and the exit came
    # ~(busy workers + 1) x the grace later (helper-142). Told during the restart, or
    # before it began (`kill -HUP; kill -TERM`: the supervisor looks at its signals every
    # 0.5 s; helper-144), every worker stops accepting at once; the stream in flight still
    # drains to its end.
    gated = GatedUpstream(responses_stream("restarting", text_deltas=3), hold_after=1)
    async with (
        serve(gated) as upstream,
        proxy_process(
            tmp_path,
            "--workers",
            "2",
            "--upstream",
            upstream,
            "--backend",
            f"sqlite:///{tmp_path / 'cache.db'}",
            "--graceful-timeout",
            "600",
        ) as p,  # fmt: skip
        httpx2.AsyncClient(base_url=p.url, timeout=60) as client,
    ):
        ready = "Application startup complete"
        lines = await p.until(lambda lines: len(worker_pids(lines, ready)) == 2, "two workers")
        old = worker_pids(lines, ready)
        body = {"model": "gpt-mock", "input": "a stream across a restart", "stream": True}
        request = client.build_request("POST", "/v1/responses", json=body, headers=HEADERS)
        async with _opened(client, request) as stream:
            assert stream.status_code == 200
            p.proc.send_signal(signal.SIGHUP)

            # The restart waits for the old worker that holds the stream: a new worker is
            # in, and that old one was told to stop (it drains its stream first).
            def waiting(lines: list[str]) -> bool:
                new = worker_pids(lines, ready) - old
                draining = old - worker_pids(lines, "Finished server process")
                return bool(new) and bool(draining & worker_pids(lines, "Shutting down"))

            if when == "during the restart":
                await p.until(waiting, "the restart waiting for the stream's worker")
            p.proc.send_signal(signal.SIGTERM)
            port = int(p.url.rsplit(":", 1)[1])
            with anyio.fail_after(60):  # (the grace is 600 s)
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    except ConnectionRefusedError:
                        break
                    await anyio.sleep(0.05)  # polling the port: nothing to wait on
            gated.gate.set()
            assert await stream.aread() == gated.body
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(p.proc.wait, abandon_on_cancel=True)
    assert any("Received SIGTERM, exiting." in line for line in p.lines())
    assert not any("Traceback" in line for line in p.lines())


@pytest.mark.anyio
@asyncio_only
async def test_workers_told_to_exit_as_a_restart_spawns_a_worker_are_all_stopped(
    tmp_path: Path,
) -> None:
    # The exit signal comes as the restart spawns its first new worker (the handler runs in
    # the supervisor's main thread, between any two bytecodes): closing the listening socket
    # then failed the spawn ("bad value(s) in fds_to_keep"), which escaped the supervisor,
    # and it exited with a traceback, its workers never joined (helper-145).
    script = tmp_path / "proxy_signalled_as_it_spawns.py"
    script.write_text(
        "import os, signal, sys\n"
        "from uvicorn.supervisors import multiprocess\n"
        "from sse_cache.cli import main\n"
        "spawned = 0\n"
        "start = multiprocess.Process.start\n"
        "def signalled_start(self):\n"
        "    global spawned\n"
        "    spawned += 1\n"
        "    if spawned == 3:  # the restart's first new worker\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    start(self)\n"
        "if __name__ == '__main__':  # (the workers are spawned: they import this module)\n"
        "    multiprocess.Process.start = signalled_start\n"
        "    sys.exit(main(['proxy', '--port', sys.argv[1], '--workers', '2',\n"
        "                   '--upstream', 'http://127.0.0.1:9',\n"
        f"                   '--backend', 'sqlite:///{tmp_path / 'cache.db'}']))\n"
    )
    async with proxy_process(tmp_path, script=script) as p:
        ready = "Application startup complete"
        await p.until(lambda lines: len(worker_pids(lines, ready)) == 2, "two workers")
        p.proc.send_signal(signal.SIGHUP)
        with anyio.fail_after(60):
            code = await anyio.to_thread.run_sync(p.proc.wait, abandon_on_cancel=True)
    lines = p.lines()
    assert code == 0, lines
    assert not any("Traceback" in line for line in lines), lines
    assert any("Received SIGTERM, exiting." in line for line in lines)


@pytest.mark.anyio
@asyncio_only
async def test_workers_exit_when_more_workers_are_asked_for_after_sigterm(
    tmp_path: Path,
) -> None:
    # SIGTERM closes the supervisor's socket; a SIGTTIN (one more worker) or SIGHUP (a
    # restart) right behind it started a worker on the closed socket: the supervisor's loop
    # raised, and it never stopped its workers nor exited (helper-99).
    async with proxy_process(
        tmp_path,
        "--workers",
        "2",
        "--upstream",
        "http://127.0.0.1:9",  # (never asked)
        "--backend",
        f"sqlite:///{tmp_path / 'cache.db'}",
    ) as p:
        ready = "Application startup complete"
        await p.until(lambda lines: len(worker_pids(lines, ready)) == 2, "two workers")
        p.proc.send_signal(signal.SIGTERM)
        p.proc.send_signal(signal.SIGTTIN)
        p.proc.send_signal(signal.SIGHUP)
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(p.proc.wait, abandon_on_cancel=True)
    assert not any("Traceback" in line for line in p.lines())


async def scraped_requests(client: httpx2.AsyncClient) -> int:
    """The requests on cached routes a scrape of ``/_sse_cache/metrics`` counts."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/_sse_cache/metrics")).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "sse_cache_requests_total"
        )
    )


# -- graceful shutdown ----------------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_shutdown_cuts_streams_in_flight_after_the_graceful_timeout(
    sig: signal.Signals, backend: str, serve: Any, tmp_path: Path
) -> None:
    # A stream that would run for minutes: the process ends it after --graceful-timeout.
    # On memory:// the shutdown itself awaits nothing: the cut request still gets to say so
    # (its access line and the warning) before the process ends.
    upstream_app = MockUpstream(first_delay=0.01, delay=0.25)
    db = tmp_path / "cache.db"
    graceful = 1.0
    async with serve(upstream_app) as upstream:
        async with proxy_process(
            tmp_path,
            "--upstream", upstream,
            "--backend", f"sqlite:///{db}" if backend == "sqlite" else "memory://",
            "--graceful-timeout", str(graceful),
        ) as p:  # fmt: skip
            async with httpx2.AsyncClient(base_url=p.url, timeout=60) as client:
                request = client.build_request(
                    "POST",
                    "/v1/chat/completions",
                    json=chat("a long answer"),
                    headers={**HEADERS, "x-mock-deltas": "2000"},
                )
                response = await client.send(request, stream=True)
                assert response.status_code == 200
                assert response.headers["x-sse-cache"] == "miss"
                chunks = response.aiter_raw()
                received = await chunks.__anext__()
                signalled = time.monotonic()
                p.proc.send_signal(sig)
                with pytest.raises(httpx2.RemoteProtocolError):  # a cut, not a clean end
                    async for chunk in chunks:
                        received += chunk
                cut = time.monotonic() - signalled
                with anyio.fail_after(60):
                    code = await anyio.to_thread.run_sync(p.proc.wait)
                await response.aclose()
            lines = p.lines()
    # uvicorn raises the signal again once it has shut down: the process ends by it, or
    # exits 0 where it is ignored (PID 1 in a container) or handled (asyncio's SIGINT).
    # (One process stops on SIGHUP as on SIGTERM: it ended at once, cutting every stream
    # without a word.)
    assert code in (0, -(signal.SIGTERM if sig == signal.SIGHUP else sig))
    assert not any("Traceback" in line for line in lines)
    (cancelled,) = [line for line in lines if "cut by the shutdown" in line]
    assert " WARNING " in cancelled
    assert cut >= graceful  # the stream was given its time, then cut
    assert b"data: [DONE]" not in received
    assert any("timeout graceful shutdown exceeded" in line for line in lines)
    (line,) = [line for line in lines if " cache=miss" in line]
    assert line.endswith(" end=incomplete") and "stored=no" in line
    if backend == "memory":
        return
    # Nothing partial was stored.
    store = from_url(f"sqlite:///{db}")
    try:
        keys = [key async for key in store.scan()]  # type: ignore[attr-defined]
    finally:
        await store.aclose()
    assert keys == []


# -- the container recipe -------------------------------------------------------------------


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def final_stage() -> list[tuple[str, str]]:
    instructions = list(dockerfile_instructions())
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"ENV {item}: use the NAME=value form"
                env[name] = value
    return env


def dockerfile_command() -> list[str]:
    found: dict[str, list[str]] = {}
    for word, rest in final_stage():
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)  # the exec form: signals reach the proxy itself
    return found["ENTRYPOINT"] + found["CMD"]


def test_the_dockerfile_runs_the_proxy_configured_from_its_environment() -> None:
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    argv = dockerfile_command()
    assert argv[:2] == ["sse-cache", "proxy"]
    env = dockerfile_env()
    root = argparse.ArgumentParser()
    register(root.add_subparsers())
    settings = resolve(root.parse_args(argv[1:]), env)
    assert settings.host == "0.0.0.0"  # reachable through the published port
    assert settings.upstream.startswith("https://")
    assert settings.backend.startswith("sqlite:////data/")  # the volume, an absolute path
    (health,) = [rest for word, rest in stage if word == "HEALTHCHECK"]
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")  # valid Python
    assert "/_sse_cache/health" in command[2] and "SSE_CACHE_PORT" in command[2]
    installs = " ".join(rest for word, rest in stage if word == "RUN")
    assert "-c /tmp/dev.lock" in installs and "[proxy,redis,zstd]" in installs


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` interpolation."""

    def one(match: re.Match[str]) -> str:
        name, _, default = match.group(1).partition(":-")
        return environ.get(name) or default

    return re.sub(r"\$\{([^}]+)\}", one, value)


@pytest.mark.parametrize("shell_env", [{}, {"SSE_CACHE_UPSTREAM": "https://api.anthropic.com"}])
def test_compose_runs_the_proxy_on_redis_with_a_valid_configuration(
    shell_env: dict[str, str],
) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"proxy", "redis"}
    proxy = services["proxy"]
    env = {**dockerfile_env()}  # the image's variables, then the service's over them
    env.update({k: interpolate(str(v), shell_env) for k, v in proxy["environment"].items()})
    root = argparse.ArgumentParser()
    register(root.add_subparsers())
    settings = resolve(root.parse_args(dockerfile_command()[1:]), env)
    assert settings.upstream == shell_env.get("SSE_CACHE_UPSTREAM", "https://api.openai.com")
    assert settings.backend.startswith("redis://redis:6379/")  # the compose service's name
    assert settings.workers > 1 and plan_workers(settings) == []
    assert settings.cross_process is True  # workers on Redis share live streams
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    grace = float(str(proxy["stop_grace_period"]).removesuffix("s"))
    assert grace > settings.graceful_timeout  # streams end before the runtime kills it
    with pytest.raises(ConfigError):  # and the variables are read, not ignored:
        resolve(root.parse_args(["proxy"]), {**env, "SSE_CACHE_PORT": "http"})


@pytest.mark.anyio
@asyncio_only
async def test_a_gateways_credential_and_routing_headers_keep_callers_apart(
    serve: Any, tmp_path: Path
) -> None:
    # Clients of an AI gateway send one placeholder Authorization and their identity in the
    # gateway's own header; its routing headers pick the provider. Each such caller and
    # route is answered by its own upstream call (helper-88: all of them shared one entry),
    # and the operator names the gateway's other headers by flag or by variable.
    placeholder = {"authorization": "Bearer placeholder"}
    upstream_app = MockUpstream(delay=0.001)
    async with (
        serve(upstream_app) as upstream,
        proxy_process(
            tmp_path,
            "--backend",
            "memory://",
            "--upstream",
            upstream,
            "--credential-header",
            "X-Session",
            env={"SSE_CACHE_KEY_HEADER": "x-account,x-region"},
        ) as p,
        httpx2.AsyncClient(base_url=p.url, timeout=30, headers=placeholder) as client,
    ):

        async def status(**headers: str) -> str:
            response = await client.post(
                "/v1/chat/completions", json=chat("gateway"), headers=headers
            )
            assert response.status_code == 200
            return response.headers["x-sse-cache"]

        callers = [
            {"x-portkey-api-key": "pk-user-1"},
            {"x-portkey-api-key": "pk-user-2"},
            {"x-portkey-api-key": "pk-user-1", "x-portkey-provider": "anthropic"},
            {"cf-aig-authorization": "Bearer cf-user-1"},
            {"x-session": "s-1"},
            {"x-session": "s-2"},
            {"x-session": "s-1", "x-account": "a-2"},
            {"x-session": "s-1", "x-region": "eu"},
        ]
        assert [await status(**caller) for caller in callers] == ["miss"] * len(callers)
        assert [await status(**caller) for caller in callers] == ["hit"] * len(callers)
        assert upstream_app.stats()["total"] == len(callers)
        # A routing header alone says nothing of who asks: not cached.
        anonymous = await client.post(
            "/v1/chat/completions",
            json=chat("gateway"),
            headers={"authorization": "", "x-account": "a-2"},
        )
        assert anonymous.headers["x-sse-cache"] == "bypass"

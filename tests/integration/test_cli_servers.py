"""The contract commands as a user runs them: ``sse-cache mock-upstream`` and ``sse-cache
proxy`` as real processes on loopback, then raw HTTP through them."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sse_cache", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()  # uvicorn's graceful shutdown: requests in flight finish first
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sse_cache", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        try:
            httpx2.get(url, timeout=1)
            return
        except httpx2.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@contextmanager
def mock_and_proxy(
    *proxy_args: str, cwd: Path | None = None
) -> Iterator[tuple[str, str, list[subprocess.Popen[bytes]]]]:
    """``sse-cache mock-upstream`` and ``sse-cache proxy`` in front of it (with
    ``proxy_args``), as processes: yields their URLs and the processes, stopped on exit."""
    up_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    procs = [start("mock-upstream", "--port", str(up_port), "--delay-ms", "1")]
    try:
        wait_ready(upstream + "/_mock/stats", procs[0])
        procs.append(
            start("proxy", "--upstream", upstream, "--port", str(proxy_port), *proxy_args, cwd=cwd)
        )
        wait_ready(proxy + "/_sse_cache/health", procs[1])
        yield upstream, proxy, procs
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with mock_and_proxy(
        "--backend",
        f"sqlite:///{tmp_path / 'cache.db'}",
        "--ttl",
        "60",
        "--route",
        "/v1/responses=openai-responses",
        "--route",
        "/events=generic",
        "--decoded-cache-mb",
        "8",
        "--log-level",
        "warning",
    ) as (upstream, proxy, _):
        yield upstream, proxy


def test_proxy_and_mock_upstream_commands(servers: tuple[str, str]) -> None:
    upstream, proxy = servers
    body = {"model": "gpt-mock", "input": "from the command line", "stream": True}
    headers = {"authorization": "Bearer sk-cli"}
    with httpx2.Client(base_url=proxy, timeout=30) as client:
        first = client.post("/v1/responses", json=body, headers=headers)
        second = client.post("/v1/responses", json=body, headers=headers)
        assert (first.headers["x-sse-cache"], second.headers["x-sse-cache"]) == ("miss", "hit")
        assert first.content == second.content
        assert 0 < int(second.headers["x-sse-cache-ttl"]) <= 60
        # --route replaced the defaults: chat completions pass through uncached.
        chat = {"model": "gpt-mock", "messages": [{"role": "user", "content": "hi"}]}
        assert (
            "x-sse-cache"
            not in client.post("/v1/chat/completions", json=chat, headers=headers).headers
        )
        metrics = client.get("/_sse_cache/metrics").text
        assert 'sse_cache_requests_total{status="hit"} 1' in metrics
    stats = httpx2.get(upstream + "/_mock/stats").json()
    assert stats["total"] == 2  # one responses miss, one chat pass-through


def test_inspecting_what_the_proxy_stored(tmp_path: Path) -> None:
    """The proxy's default cache lands in its working directory, and the inspection commands
    run there see what it stored: entries, and the Responses index rows as aliases."""
    with mock_and_proxy("--backend", "sqlite:///sse-cache.db", cwd=tmp_path) as (_, proxy, procs):
        headers = {"authorization": "Bearer sk-cli"}
        statuses = []
        with httpx2.Client(base_url=proxy, timeout=30) as client:
            for text in ("one", "two", "three", "one"):
                body = {"model": "gpt-mock", "input": text, "stream": True}
                response = client.post("/v1/responses", json=body, headers=headers)
                statuses.append(response.headers["x-sse-cache"])
        assert statuses == ["miss", "miss", "miss", "hit"]
        stop(procs.pop())  # every request handled to its end, its index rows written
    assert (tmp_path / "sse-cache.db").is_file()  # relative to where the proxy ran

    listed = cli("ls", "-l", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert len(rows) == 3 and all(row[2] == "openai-responses" for row in rows), rows
    assert listed.stderr.strip() == "3 entries, 3 aliases (not listed; -a lists them)"
    keys = {row[0] for row in rows}

    stats = cli("stats", cwd=tmp_path)
    figures = dict(line.split(":", 1) for line in stats.stdout.splitlines()[1:])
    assert (int(figures["entries"]), int(figures["aliases"])) == (3, 3), stats.stdout

    every = cli("ls", "-la", cwd=tmp_path).stdout.splitlines()
    aliases = {row[0]: row[3] for row in (line.split("\t") for line in every) if row[2] == "alias"}
    assert len(every) == 6 and set(aliases.values()) == keys  # one alias per entry, none dangling

    alias, key = next(iter(aliases.items()))
    shown = cli("show", alias, "--sse-only", cwd=tmp_path)
    assert (
        shown.returncode == 0
        and shown.stdout == cli("show", key, "--sse-only", cwd=tmp_path).stdout
    )
    assert "event: response.completed" in shown.stdout

    purged = cli("purge", key, "--yes", cwd=tmp_path)
    assert "purged 1 entry and 1 alias" in purged.stdout, purged.stderr
    assert len(cli("ls", "-a", cwd=tmp_path).stdout.split()) == 4

    typo = cli("ls", "--backend", "sqlite:///typo.db", cwd=tmp_path)
    assert typo.returncode == 1
    assert f"SQLite file '{tmp_path / 'typo.db'}' does not exist" in typo.stderr
    assert not (tmp_path / "typo.db").exists()


def test_version_command(tmp_path: Path) -> None:
    from sse_cache import __version__

    version = cli("--version", cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"sse-cache {__version__}\n")


def test_proxy_rejects_a_negative_decoded_cache_size(
    capsys: pytest.CaptureFixture[str], never_served: None
) -> None:
    from sse_cache.cli import main

    with pytest.raises(SystemExit):
        main(["proxy", "--upstream", "http://127.0.0.1:9", "--decoded-cache-mb", "-1"])
    assert "argument --decoded-cache-mb: expected a number of MiB >= 0" in capsys.readouterr().err


def test_the_proxy_access_log_never_prints_a_credential_in_a_query() -> None:
    import logging

    from sse_cache.cli.proxy import RedactQueryKey

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        (
            "127.0.0.1:5",
            "POST",
            "/v1beta/models/m:streamGenerateContent?alt=sse&key=AIza-secret",
            "1.1",
            200,
        ),
        None,
    )
    assert RedactQueryKey().filter(record)
    line = record.getMessage()
    assert "AIza-secret" not in line and "?alt=sse&key=***" in line
    # The cache reads parameter names percent-decoded: each spelling is the credential.
    for spelled in ("%6Bey", "k%65y", "%6b%65%79", "ke%79"):
        path = f"/v1/chat/completions?{spelled}=sk-secret&x=1"
        record.msg, record.args = "%s", (path,)
        assert RedactQueryKey().filter(record)
        assert record.getMessage() == f"/v1/chat/completions?{spelled}=***&x=1"
    # Any parameter that carries a credential (helper-113: api-key= and access_token= were
    # logged as they came), and none that does not.
    secret = (
        "api-key=1&access_token=2&apiKey=3&X-Amz-Signature=4&sig=5&KEY=6&client_secret=7"
        "&authorization=Bearer%208&bearer=9&key=10%2211"  # (helper-123: these went unredacted)
    )
    plain = "monkey=1&keys=2&api-version=3&alt=sse&author=4&tokens_max=5"
    record.msg, record.args = "%s", (f"/v1/x?{plain}&{secret}",)
    assert RedactQueryKey().filter(record)
    redacted = "&".join(pair.split("=")[0] + "=***" for pair in secret.split("&"))
    assert record.getMessage() == f"/v1/x?{plain}&{redacted}"
    # A raw quote in a value is part of it (the redaction stopped there), a closing one not.
    record.msg, record.args = '"%s"', ('/v1/x?key=a"SECRET&alt=sse',)
    assert RedactQueryKey().filter(record)
    assert record.getMessage() == '"/v1/x?key=***&alt=sse"'
    record.msg, record.args = 'url="/v1/x?key=SECRET"', ()
    assert RedactQueryKey().filter(record)
    assert record.getMessage() == 'url="/v1/x?key=***"'
    # uvicorn's trace level logs the request's ASGI scope, query string and all.
    scope = {"type": "http", "path": "/v1/x", "query_string": b"key=AIza-secret&alt=sse"}
    record.msg, record.args = "ASGI [%d] Started scope=%s", (2, scope)
    assert RedactQueryKey().filter(record)
    assert "AIza-secret" not in record.getMessage() and "key=***&alt=sse" in record.getMessage()
    assert scope["query_string"] == b"key=AIza-secret&alt=sse"  # (the request's own is intact)


def test_a_shutdown_that_cut_nothing_logs_no_error() -> None:
    # uvicorn's graceful shutdown logs "Cancel N running task(s)" as an error when its
    # deadline passes, also with N = 0: the last stream ended as it came (it looks every
    # 0.1 s), nothing was cut, and an alert on error lines fired (helper-142).
    from sse_cache._logging import CutAtShutdown

    def record(cancelled: int) -> logging.LogRecord:
        text = "Cancel %s running task(s), timeout graceful shutdown exceeded"
        return logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, text, (cancelled,), None)

    quiet, cut = record(0), record(2)
    uvicorn_error = logging.getLogger("uvicorn.error")
    level = uvicorn_error.level
    try:
        uvicorn_error.setLevel(logging.INFO)
        assert CutAtShutdown().filter(quiet) and CutAtShutdown().filter(cut)
        assert quiet.levelname == "INFO" and "nothing to cut" in quiet.getMessage()
        assert cut.levelname == "ERROR"
        assert cut.getMessage().startswith("Cancel 2 running task(s)")
        uvicorn_error.setLevel(logging.ERROR)  # (--log-level error: the info line is not written)
        assert not CutAtShutdown().filter(record(0)) and CutAtShutdown().filter(record(2))
    finally:
        uvicorn_error.setLevel(level)


def test_inspecting_what_a_cross_process_proxy_stored(
    tmp_path: Path, redis_server: Any, request: pytest.FixtureRequest
) -> None:
    """A cross-process proxy on Redis also indexes each Responses stream's producer under a
    *live alias* ("key token"), for a resume by id from another process; the inspection
    commands read it as naming its entry (helper-126: ``ls -la`` called it dangling, ``show``
    failed on it, ``purge KEY`` left it behind)."""
    url = f"{redis_server.url}?prefix=cli-live-{request.node.name}:"
    with mock_and_proxy("--backend", url, "--cross-process", cwd=tmp_path) as (_, proxy, procs):
        body = {"model": "gpt-mock", "input": "live aliases", "stream": True}
        with httpx2.Client(base_url=proxy, timeout=30) as client:
            response = client.post(
                "/v1/responses", json=body, headers={"authorization": "Bearer sk-cli"}
            )
        assert response.headers["x-sse-cache"] == "miss"
        stop(procs.pop())  # its index rows written
    every = [
        line.split("\t")
        for line in cli("ls", "-la", "--backend", url, cwd=tmp_path).stdout.splitlines()
    ]
    entries = [row[0] for row in every if row[2] == "openai-responses"]
    kinds = sorted(row[2] for row in every if row[0] not in entries)
    assert len(entries) == 1 and kinds == ["alias", "live-alias"], every
    (key,) = entries
    live = next(row for row in every if row[2] == "live-alias")
    assert live[3:] == [key]  # its entry, not dangling

    shown = cli("show", live[0], "--backend", url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "kind:  live alias" in shown.stdout and f"names: {key}" in shown.stdout
    assert "event: response.completed" in shown.stdout  # and then the entry it names

    purged = cli("purge", key, "--yes", "--backend", url, cwd=tmp_path)
    assert "purged 1 entry and 2 aliases" in purged.stdout, purged.stderr
    assert cli("ls", "-a", "--backend", url, cwd=tmp_path).stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["--port", "99999"], {}, "argument --port: expected a port number"),
        ([], {"SSE_CACHE_PORT": "99999"}, "SSE_CACHE_PORT: expected a port number"),
        (["--backend", "bogus://x"], {}, "--backend: unknown backend URL scheme 'bogus'"),
    ],
    ids=["flag", "variable", "backend"],
)
def test_a_refused_configuration_exits_2_however_it_was_given(
    args: list[str], env: dict[str, str], said: str, tmp_path: Path
) -> None:
    # A bad value as a flag exited 2 (argparse's), the same value as a variable 1, and a bad
    # backend URL 1 (helper-101): a wrapper script could not tell a refused configuration
    # from a proxy that failed at run time.
    refused = subprocess.run(
        [sys.executable, "-m", "sse_cache", "proxy", "--upstream", "http://127.0.0.1:9", *args],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert said in refused.stderr and refused.stderr.count(said) == 1
    assert "Traceback" not in refused.stderr

"""``sse-cache mock-upstream`` as a user runs it: the port it serves on (``--port 0``: the one
the system gave, printed) and the delays it refuses. What the mock answers is tested in
tests/integration/test_mock_upstream.py. (The delays are ``sse-cache demo``'s too.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import httpx2
import pytest

from sse_cache.cli import demo, main


def test_port_0_serves_on_a_free_port_and_prints_it() -> None:
    # It printed "on http://127.0.0.1:0": the port asked for, never the one bound.
    command = [sys.executable, "-m", "sse_cache", "mock-upstream", "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once the socket is bound
        prefix = "sse-cache mock-upstream on http://127.0.0.1:"
        assert first.startswith(prefix), first
        port = int(first.removeprefix(prefix))
        assert port != 0
        # Bound before it was printed: a connection waits in the backlog until uvicorn has
        # started, then is answered.
        response = httpx2.get(f"http://127.0.0.1:{port}/_mock/stats", timeout=60)
        assert response.status_code == 200 and "requests" in response.json()
        # Ctrl-C stops it as uvicorn.run's servers stop: shut down, exit 0, no traceback.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0  # (a guard against a hang, not a timing assertion)
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()  # (by its own pid)
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a check to let a bad delay through, the command would serve (or pace) for ever:
    it fails instead."""
    import uvicorn

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the command started: a check let a bad value through")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)
    monkeypatch.setattr(demo, "run_http_demo", refuse)
    monkeypatch.setattr(demo, "run_engine_demo", refuse)


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize("command", [["mock-upstream"], ["demo", "--in-process"]])
@pytest.mark.parametrize("flag", ["--delay-ms", "--first-ms"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1", "1e400", "soon"])
def test_a_delay_is_a_finite_number_of_milliseconds(
    command: list[str], flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # inf paced every answer (the mock's, the demo's) for ever; nan was taken silently.
    with pytest.raises(SystemExit) as exit_info:
        main([*command, f"{flag}={value}"])  # (= : "-inf" is no option)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a number of milliseconds >= 0, got {value!r}" in err


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize("value", ["", " ", "@@bad@@", "[::1]"])
def test_the_mock_listens_only_on_an_address_it_can_name(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty --host is uvicorn's every interface: a mock that answers anyone (as the
    # proxy's own --host refuses it; helper-90).
    with pytest.raises(SystemExit) as exit_info:
        main(["mock-upstream", f"--host={value}"])
    assert exit_info.value.code == 2
    assert "argument --host: expected an address to listen on" in capsys.readouterr().err


def test_a_port_in_use_is_said_before_anything_claims_to_serve() -> None:
    # It printed "sse-cache mock-upstream on http://127.0.0.1:PORT" and its routes, then
    # uvicorn's error (helper-126): bound first now, it says only what failed.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sse_cache", "mock-upstream", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert done.stdout == ""
    assert "address already in use" in done.stderr.lower() and "Traceback" not in done.stderr


@pytest.mark.usefixtures("nothing_starts")
def test_a_port_out_of_range_says_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["mock-upstream", "--port", "99999"])
    assert exit_info.value.code == 2
    assert "argument --port: expected a port number from 0 to 65535" in capsys.readouterr().err


def test_a_host_name_is_served_on_every_address_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bound before the banner, "localhost" was bound on its first address only, where
    # uvicorn.run binds each (a client trying ::1 first was refused; helper-129). This
    # machine may name 127.0.0.1 only: the name is made to name both.
    import socket

    import uvicorn

    from sse_cache.cli import mock

    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            if os.environ.get("CI"):
                raise  # (CI's machines have one: never skipped there)
            pytest.skip("no IPv6 loopback on this machine")
    real = socket.getaddrinfo

    def both(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host != "localhost":
            return real(host, port, *args, **kwargs)
        v4 = real("127.0.0.1", port, *args, **kwargs)
        v6 = real("::1", port, *args, **kwargs)
        return [*v4, *v6]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    config = uvicorn.Config(lambda: None, host="localhost", port=0)
    sockets = mock._bind(config)
    try:
        names = sorted((s.family, s.getsockname()[0]) for s in sockets)
        assert names == [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
        assert len({s.getsockname()[1] for s in sockets}) == 1  # one port for both
    finally:
        for s in sockets:
            s.close()

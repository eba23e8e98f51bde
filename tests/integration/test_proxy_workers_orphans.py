"""``sse-cache proxy --workers 2`` whose supervising process is killed with ``SIGKILL`` (the
OOM killer, ``kill -9``, a runtime that kills only PID 1): its workers shut down rather than
serve the port for ever as orphans, and the port can be bound again. Real processes, as in
production; Linux (``/proc``)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli_servers import mock_and_proxy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

#: Generous: a worker's graceful shutdown has nothing in flight to wait for.
DEADLINE = 30.0


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that still have it as their parent."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return found


def identity(pid: int) -> str | None:
    """``pid``'s start time (which process it is, should the pid be reused), or None once it
    has ended (a zombie, left to a parent that does not reap it, has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return None if fields[0] in "ZX" else fields[19]


def is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {DEADLINE} s")
        time.sleep(0.05)  # polling processes that start and end when they will


def test_workers_leave_with_a_killed_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor makes the workers' metrics directory in $TMPDIR: here, where it can be
    # looked for.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    started: dict[int, str | None] = {}
    try:
        with mock_and_proxy(
            "--workers", "2", "--backend", f"sqlite:///{tmp_path / 'cache.db'}"
        ) as (_, proxy, procs):
            supervisor = procs[1]
            port = int(proxy.rsplit(":", 1)[1])
            (metrics,) = tmp_path.glob("sse-cache-metrics-*")

            # Both workers serve once each has built its app: each then writes its figures
            # to the metrics directory, in a file named after its pid.
            def both_serve() -> bool:
                workers = [pid for pid in children(supervisor.pid) if is_worker(pid)]
                started.update((pid, identity(pid)) for pid in children(supervisor.pid))
                writers = {int(path.name.split("-")[1]) for path in metrics.glob("metrics-*")}
                return len(workers) == 2 and writers >= set(workers)

            wait_until(both_serve, "two workers serving")
            workers = [pid for pid in started if is_worker(pid)]

            supervisor.kill()
            supervisor.wait()

            # Every process the supervisor started ends: the workers (and with them
            # multiprocessing's resource tracker, which outlives its users only).
            wait_until(
                lambda: all(identity(pid) != started[pid] for pid in started),
                f"the workers {workers} of a killed supervisor ending",
            )
            # The port is free again: a new proxy could listen on it (as uvicorn binds).
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
            assert not metrics.exists()  # removed by a worker, for the supervisor
            # Each worker shut down as on SIGTERM (uvicorn's graceful shutdown, the app's
            # lifespan shutdown included). Every process writing to the pipe has ended.
            assert supervisor.stderr is not None
            log = supervisor.stderr.read().decode(errors="replace")
            for pid in workers:
                assert f"[{pid}] sse_cache: supervisor [{supervisor.pid}] is gone" in log, log
                assert f"[{pid}] Finished server process [{pid}]" in log, log
    finally:
        for pid, ident in started.items():  # whatever this test started does not outlive it
            if ident is not None and identity(pid) == ident:
                os.kill(pid, signal.SIGKILL)

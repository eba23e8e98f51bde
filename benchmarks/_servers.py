"""Servers in processes of their own for the benchmarks (as in production: the proxy, its
upstream and the client never share an event loop or a core's time slice)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"

# The floor of any forwarding proxy built like ours: the proxy's own httpx2 forwarder under
# uvicorn, without the cache in front. Run it as ``server(sys.executable, "-c",
# BARE_FORWARDER, upstream_url, "{port}")``.
BARE_FORWARDER = """
import sys, uvicorn
from sse_cache.proxy import Forwarder
uvicorn.run(Forwarder(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning", lifespan="on", access_log=False, ws="none")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    pid: int

    def cpu(self) -> float:
        """CPU seconds (user + system) the process has used so far; NaN where unknown."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return math.nan


@contextmanager
def server(
    *args: str, log: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Run ``args`` (``{port}`` replaced by a free port) until it accepts connections; yield
    its URL and pid; terminate it at the end. ``log``: a file that gets its stdout and stderr
    (appended; default: discarded). ``env``: variables added to this process's for it."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in args]
    child_env = None if env is None else {**os.environ, **env}
    if log is None:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env
        )
    else:
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited with {proc.returncode}")
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv} did not start") from None
                time.sleep(0.05)
        yield Server(f"http://{HOST}:{port}", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

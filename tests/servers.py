"""Real redis-server / memcached processes for tests and benchmarks, on 127.0.0.1 only.

Each server binds a free loopback port, runs in a temporary directory without persistence,
and is stopped by its owner. ``require_binary`` decides what a missing binary means: a skip
naming the apt package to install, or — with ``CI=true`` — a test failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "HOST",
    "MemcachedServer",
    "RedisClusterServers",
    "RedisServer",
    "ServerMissing",
    "free_port",
    "in_ci",
    "require_binary",
    "require_dir",
    "require_file",
]

HOST = "127.0.0.1"


class ServerMissing(RuntimeError):
    """A server binary is not installed (the message names the apt package)."""


def in_ci() -> bool:
    """Running under CI (``CI=true``, as CI services set it; also ``1`` or ``yes``): what
    would be a skip elsewhere is a failure there."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_file(path: Path, what: str) -> Path:
    """``path``; outside CI a missing file skips the test, in CI it fails it (the recorded
    streams of ``../shared`` are beside every CI clone)."""
    return _required(path, path.is_file(), what)


def require_dir(path: Path, what: str) -> Path:
    """As :func:`require_file`, for a directory."""
    return _required(path, path.is_dir(), what)


def _required(path: Path, present: bool, what: str) -> Path:
    import pytest

    if not present:
        if in_ci():
            pytest.fail(f"CI=true and {what} is missing: {path}", pytrace=False)
        pytest.skip(f"{what} not present: {path}")
    return path


def find_binary(name: str, apt_package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise ServerMissing(
            f"{name} is not installed: install the apt package {apt_package!r} "
            f"(sudo apt-get install {apt_package})"
        )
    return path


def require_binary(name: str, apt_package: str) -> str:
    """The binary's path; outside CI a missing one skips the test, in CI it fails it."""
    import pytest

    try:
        return find_binary(name, apt_package)
    except ServerMissing as exc:
        if in_ci():
            pytest.fail(f"CI=true and {exc}", pytrace=False)
        pytest.skip(str(exc))


def free_port(exclude: set[int] | None = None, below: int = 65536) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port < below and port not in (exclude or set()):
            return port
    raise RuntimeError("no free port found")


def _wait_for(
    port: int, probe: bytes, expect: bytes, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 10
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}: {out}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as s:
                s.sendall(probe)
                reply = b""
                while expect not in reply and (data := s.recv(1024)):
                    reply += data  # the answer to a multi-command probe may be split
                if expect in reply:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"server on port {port} did not start: {last!r}")


class _Process:
    name = ""
    probe = b""
    expect = b""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"sse-cache-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def log(self) -> Path:
        """The server's output (a file, not a pipe: nobody reads a pipe, and a full one
        would block the server mid-test)."""
        return self.dir / "server.log"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for(self.port, self.probe, self.expect, self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self.paused:
            os.kill(proc.pid, signal.SIGCONT)
            self.paused = False
        proc.kill()  # no persistence to flush: SIGKILL is fine and fast
        proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port open but answers nothing (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True
        # The signal is delivered asynchronously: wait until the process is really stopped,
        # or a request sent right now may still be answered.
        stat = Path(f"/proc/{self.proc.pid}/stat")
        deadline = time.monotonic() + 5
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not stop")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer(_Process):
    name = "redis"
    probe = b"PING\r\n"
    expect = b"+PONG"

    def __init__(
        self,
        binary: str,
        port: int | None = None,
        *,
        cluster_port: int | None = None,
        password: str | None = None,
        unix_socket: bool = False,
    ) -> None:
        super().__init__(binary, port)
        self.cluster_port = cluster_port
        self.password = password
        self.socket_path = self.dir / "redis.sock" if unix_socket else None
        if password is not None:
            self.probe = f"AUTH {password}\r\nPING\r\n".encode()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        if self.socket_path is not None:
            cmd += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.cluster_port is not None:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-port", str(self.cluster_port),
                "--cluster-node-timeout", "3000",
            ]  # fmt: skip
        return cmd


class RedisClusterServers:
    """Three masters (no replicas) on loopback, joined with ``redis-cli --cluster create``."""

    def __init__(self, server_binary: str, cli_binary: str, masters: int = 3) -> None:
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for _ in range(masters):
            port = free_port(taken)
            taken.add(port)
            bus = free_port(taken)
            taken.add(bus)
            self.nodes.append(RedisServer(server_binary, port, cluster_port=bus))
        self.cli = cli_binary

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [self.cli, "--cluster", "create"]
                + [f"{HOST}:{n.port}" for n in self.nodes]
                + ["--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._wait_ok()
        except BaseException:
            self.cleanup()
            raise

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = 0
            for node in self.nodes:
                out = subprocess.run(
                    [self.cli, "-h", HOST, "-p", str(node.port), "cluster", "info"],
                    capture_output=True,
                    timeout=10,
                ).stdout
                ok += b"cluster_state:ok" in out
            if ok == len(self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("Redis Cluster did not reach cluster_state:ok")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class MemcachedServer(_Process):
    name = "memcached"
    probe = b"version\r\n"
    expect = b"VERSION"

    def __init__(
        self,
        binary: str,
        port: int | None = None,
        *,
        memory_mb: int = 128,
        options: Sequence[str] = (),
    ) -> None:
        super().__init__(binary, port)
        self.memory_mb = memory_mb
        self.options = list(options)  # more command-line options (-I 256k, say)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        # -U 0: no UDP; -t 2: two worker threads are plenty on loopback.
        cmd = [self.binary, "-l", HOST, "-p", str(self.port), "-U", "0", "-t", "2"]
        cmd += ["-m", str(self.memory_mb), *self.options]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # memcached refuses to run as root without it
        return cmd

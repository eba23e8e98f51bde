"""``sse-cache proxy``: a caching reverse proxy in front of an LLM API.

Every option is a flag and an ``SSE_CACHE_<OPTION>`` environment variable (``--port`` and
``SSE_CACHE_PORT``, ``--cross-process`` and ``SSE_CACHE_CROSS_PROCESS=true``); a flag wins
over its variable, a variable over the default. :data:`OPTIONS` is the one list of them: the
parser, the environment and docs/proxy.md's table are all made from it (a test checks the
table).

With ``--workers N`` (N > 1) uvicorn runs N processes on one port. Each builds its app from
the environment (:func:`app_from_environment`): the command writes the options it resolved
back into ``SSE_CACHE_*`` variables, which the workers inherit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import shutil
import signal
import threading
import urllib.parse
from typing import Any

from .._logging import LOG_LEVELS, RedactQueryKey, proxy_log_config, redact_url
from ..errors import ConfigError
from ._options import (
    ENV_PREFIX,
    LOOPBACK_NAMES,
    OPTIONS,
    Option,
    Refused,
    add_options,
    check_backend,
    option,
    process_private,
    resolve,
    secret_bytes,
    unknown_variables,
)

__all__ = [
    "ENV_PREFIX",
    "OPTIONS",
    "Option",
    "RedactQueryKey",
    "add_options",
    "app_from_environment",
    "register",
    "resolve",
]

logger = logging.getLogger("sse_cache")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "proxy",
        help="run a caching reverse proxy in front of an LLM API",
        description=(
            "Serves POST /v1/responses, /v1/chat/completions, /v1/messages and Gemini's "
            "generateContent routes through the cache (streamed and not) and passes everything "
            "else to the upstream unchanged. GET /_sse_cache/health and /_sse_cache/metrics "
            "report on the proxy. Every option can also be set by its SSE_CACHE_* environment "
            "variable; a flag wins over its variable."
        ),
    )
    add_options(parser)
    parser.set_defaults(run=_run)


# -- building and serving -------------------------------------------------------------------


#: Set by ``sse-cache proxy --workers N`` for its workers: where they share their metrics.
METRICS_DIR_ENV = "SSE_CACHE_WORKERS_METRICS_DIR"
#: Seconds between two writes of a worker's metrics (default 1): a tests' seam, not an
#: option (a test sets it long to see what a worker publishes as it shuts down).
METRICS_INTERVAL_ENV = "SSE_CACHE_WORKERS_METRICS_INTERVAL"


def build_app(
    settings: argparse.Namespace, metrics_dir: str | None = None, metrics_interval: float = 1.0
) -> Any:
    """The proxy's ASGI app for resolved ``settings`` (raises :class:`ConfigError`)."""
    from ..adapters import by_name
    from ..codec import MsgpackCodec
    from ..proxy import create_proxy_app
    from ._head_deadline import tell_closes_to

    routes = {path: by_name(name) for path, name in settings.route} or None
    secret = secret_bytes(settings.secret)
    extra: dict[str, Any] = {} if secret is None else {"codec": MsgpackCodec(secret=secret)}
    app = create_proxy_app(
        settings.upstream,
        settings.backend,
        ttl=settings.ttl,
        tenant="shared" if settings.shared_tenant else None,
        credential_headers=settings.credential_header,
        key_headers=settings.key_header,
        routes=routes,
        finish_on_disconnect=settings.finish_on_disconnect,
        resume_window=settings.resume_window,
        cross_process=settings.cross_process,
        cross_process_lease=settings.cross_process_lease,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown=settings.breaker_cooldown,
        max_body_bytes=settings.max_body_bytes,
        upstream_timeout=settings.upstream_timeout,
        upstream_connections=settings.upstream_connections or None,
        decoded_cache_bytes=int(settings.decoded_cache_mb * 1024 * 1024),
        metrics_dir=metrics_dir,
        metrics_interval=metrics_interval,
        limit_concurrency=settings.limit_concurrency or None,
        body_timeout=settings.body_timeout or None,
        **extra,
    )
    # The connections closed for --header-timeout are the server's doing, not the app's:
    # counted in the app's metrics all the same (a process serves the app it built last).
    tell_closes_to(app.metrics)
    return app


def app_from_environment() -> Any:
    """The app of one worker of ``sse-cache proxy --workers N`` (a uvicorn factory): built
    from the ``SSE_CACHE_*`` variables the command resolved and wrote for its workers."""
    metrics_dir = os.environ.get(METRICS_DIR_ENV)
    interval = float(os.environ.get(METRICS_INTERVAL_ENV) or 1.0)
    app = build_app(resolve(argparse.Namespace(), os.environ), metrics_dir, interval)
    leave_with_supervisor(metrics_dir)
    freeze_startup_objects()
    return app


def leave_with_supervisor(metrics_dir: str | None) -> None:
    """In a worker uvicorn spawned: shut down as on ``SIGTERM`` (requests in flight finish,
    within ``--graceful-timeout``) once the supervising process is gone.

    A supervisor killed by ``SIGKILL`` (the OOM killer, ``kill -9``, a runtime that kills only
    PID 1) neither stops its workers nor removes the metrics directory; the workers, now
    orphans, would serve its port for ever and a new proxy could not bind it. multiprocessing
    gives each worker a sentinel of its parent (the end of a pipe the parent alone holds
    open), ready once the parent has died by any means, or at once if it died before this
    runs: a thread waits on it, no polling and no race. A process that is not a
    multiprocessing child (a single-process server) has no supervisor to follow."""
    import multiprocessing
    import multiprocessing.connection

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel, supervisor = parent.sentinel, parent.pid

    def follow() -> None:
        multiprocessing.connection.wait([sentinel])
        logger.warning("sse_cache: supervisor [%s] is gone; shutting down", supervisor)
        if metrics_dir is not None:
            # The supervisor removes it at exit; it will not now. Whichever worker is first
            # removes it for all: nothing creates it again (a worker writes its figures
            # only into the directory as it is), but another's write may land during a
            # removal, hence the retries. Done before the SIGTERM, which ends the process.
            for _ in range(5):
                shutil.rmtree(metrics_dir, ignore_errors=True)
                if not os.path.exists(metrics_dir):
                    break
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown

    threading.Thread(target=follow, name="sse-cache supervisor", daemon=True).start()


def freeze_startup_objects() -> None:
    """Leave what the server process holds from its start (modules, the app: ~50,000 objects)
    out of the cycle collector's work from now on. Every full collection walked them all:
    ~23 ms, during which no stream moves; frozen, ~2 ms (docs/performance.md). Only for the
    command's own server processes: a library never changes its host's collector."""
    gc.collect()
    gc.freeze()


def forwards_to_itself(settings: argparse.Namespace) -> bool:
    """Whether ``--upstream`` names the address this proxy listens on: each request would
    come back to it, until the process ran out of file descriptors (helper-81). Only what is
    sure from the settings, on the proxy's port: the very address it listens on; a loopback
    address when it listens on every interface; ``localhost`` beside a loopback address
    (it names 127.0.0.1 or ::1). (127.0.0.2, or ::1 beside 127.0.0.1, are other sockets.)"""
    parts = urllib.parse.urlsplit(settings.upstream)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    if port != settings.port:
        return False
    upstream = (parts.hostname or "").lower()
    listening = settings.host.strip("[]").lower()
    if upstream == listening:
        return True
    # Connected to, a wildcard address is this host's loopback (Linux: 0.0.0.0 is 127.0.0.1,
    # :: is ::1; helper-126: `--upstream http://0.0.0.0:PORT` on the proxy's own port).
    upstream = _CONNECTED_AS.get(upstream, upstream)
    if upstream == listening:
        return True
    loopback = upstream in LOOPBACK_NAMES or upstream.startswith("127.")
    if listening in _EVERY_INTERFACE:
        return loopback
    return (upstream == "localhost" and listening in LOOPBACK_NAMES) or (
        listening == "localhost" and upstream in LOOPBACK_NAMES
    )


#: The addresses that listen on every interface, loopback included.
_EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})
#: What a connection to a wildcard address reaches.
_CONNECTED_AS = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def _stop_gracefully(signum: int, frame: object) -> None:
    logger.info("sse_cache: SIGHUP: stopping as on SIGTERM (one process: nothing restarts it)")
    os.kill(os.getpid(), signal.SIGTERM)


def _given_as(opt: Option, args: argparse.Namespace) -> str:
    """How the user gave ``opt``: its flag, else its variable if set, else its flag."""
    if getattr(args, opt.dest, None) is None and os.environ.get(opt.env, "").strip():
        return opt.env
    return opt.flag


def _naming_the_option(message: str, args: argparse.Namespace) -> str:
    """``message`` of a :class:`ConfigError` from building the app, its first word — the
    keyword argument it is about (``cross_process_lease must be ...``) — replaced by the
    flag or the variable the user gave it by."""
    name, sep, rest = message.partition(" ")
    for opt in OPTIONS:
        if opt.dest == name and sep:
            return f"{_given_as(opt, args)} {rest}"
    return message


def plan_workers(settings: argparse.Namespace) -> list[str]:
    """For ``--workers N`` (N > 1): turn on cross-process single-flight when the backend can
    (Redis: a lock and live fan-out), and the warnings about what the workers will not share
    otherwise. Changes ``settings``; raises :class:`ConfigError` for a bad backend URL."""
    if settings.workers <= 1:
        return []
    import anyio

    from ..backends import from_url
    from ..protocols import FanoutBackend, LeasingBackend

    backend = from_url(settings.backend)
    try:
        shares_streams = isinstance(backend, LeasingBackend) and isinstance(backend, FanoutBackend)
        name = type(backend).__name__
        private = process_private(backend)
    finally:
        anyio.run(backend.aclose)
    n = settings.workers
    if shares_streams:
        settings.cross_process = True
        return []
    if private:
        return [
            f"--workers {n} with {redact_url(settings.backend)}: each worker has a cache of "
            "its own (a request is a hit only on the worker that stored its answer, and the "
            f"memory is spent {n} times); use sqlite:// on a file or redis:// to share one cache"
        ]
    return [
        f"--workers {n} with {name}: the workers share its entries but not live streams, so "
        "identical requests arriving together at different workers each call the upstream; "
        "use redis:// for cross-process single-flight"
    ]


def _run(args: argparse.Namespace) -> int:
    # A misspelt variable is often why a value is missing or refused: a refusal of the
    # configuration says it (helper-126: SSE_CACHE_UPSTREM=... gave "an upstream is
    # required" and no word of the typo); once it resolves, it is logged as a warning.
    typos = unknown_variables(os.environ)
    try:
        settings = resolve(args, os.environ)
    except ConfigError as exc:
        said = [f"sse-cache proxy: {exc}", *(f"sse-cache proxy: {typo}" for typo in typos)]
        raise Refused("\n".join(said)) from None
    return _serve(args, settings, typos)


def _serve(args: argparse.Namespace, settings: argparse.Namespace, typos: list[str]) -> int:
    try:
        import uvicorn
    except ImportError:
        raise Refused("sse-cache proxy needs uvicorn: pip install 'sse-cache[proxy]'") from None
    import logging.config

    from ._head_deadline import http_protocol

    log_config = proxy_log_config(settings.log_level)
    logging.config.dictConfig(log_config)
    for warning in typos:
        logger.warning("sse_cache: %s", warning)
    if forwards_to_itself(settings):
        raise Refused(
            f"sse-cache proxy: --upstream {redact_url(settings.upstream)} is this proxy itself "
            f"(--host {settings.host} --port {settings.port}): every request would be "
            "forwarded to itself, again and again"
        )
    try:
        check_backend(settings.backend)
    except ConfigError as exc:
        given = _given_as(option("--backend"), args)
        raise Refused(f"sse-cache proxy: {given}: {exc}") from None
    try:
        warnings = plan_workers(settings)
        app = build_app(settings)
    except ConfigError as exc:
        raise Refused(f"sse-cache proxy: {_naming_the_option(str(exc), args)}") from None
    for warning in warnings:
        logger.warning("sse_cache: %s", warning)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": log_config,
        "log_level": LOG_LEVELS[settings.log_level],
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.graceful_timeout,
        # A deadline for each request's head, which uvicorn has not (see _head_deadline).
        "http": http_protocol(settings.header_timeout),
        # (Not uvicorn's limit_concurrency: it counts open connections, idle keep-alive ones
        # and the new request's own included, and refuses the health check when busy. The
        # app counts requests itself: --limit-concurrency there.)
    }
    if settings.workers == 1:
        freeze_startup_objects()
        # With --workers N, uvicorn's supervisor restarts its workers on SIGHUP; one process
        # has no one to restart it, and SIGHUP's default ended it at once, cutting every
        # stream without a word (helper-81). It stops as on SIGTERM instead: gracefully.
        if hasattr(signal, "SIGHUP"):  # (not on Windows)
            signal.signal(signal.SIGHUP, _stop_gracefully)
        uvicorn.run(app, **options)
        return 0
    # The app was built above only to check the configuration; each worker builds its own
    # from the environment it inherits.
    import anyio

    anyio.run(app.aclose)
    for opt in OPTIONS:
        value = getattr(settings, opt.dest)
        if value is None:
            os.environ.pop(opt.env, None)
        else:
            os.environ[opt.env] = opt.to_text(value)
    logger.info(
        "sse_cache: %d workers on %s:%d, backend %s, cross-process single-flight %s",
        settings.workers,
        settings.host,
        settings.port,
        redact_url(settings.backend),
        "on" if settings.cross_process else "off",
    )
    # The workers' metrics meet in a directory of this run's own: any worker's scrape
    # shows them all.
    import tempfile

    metrics_dir = tempfile.mkdtemp(prefix="sse-cache-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        config = uvicorn.Config(
            f"{__name__}:app_from_environment", factory=True, workers=settings.workers, **options
        )
        serve_workers(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def serve_workers(config: Any) -> None:
    """Run uvicorn's supervisor of ``config.workers`` processes (as ``uvicorn.run`` does),
    one that stops accepting connections as soon as it is told to exit.

    uvicorn's supervisor keeps its copy of the listening socket open until it exits: after a
    ``SIGTERM`` the workers close theirs and drain their streams, while the kernel goes on
    accepting new connections into the socket's backlog, where they hang unanswered until
    the last stream ended, then are reset. One process refuses them at once, and so does
    this supervisor: it closes its copy on ``SIGTERM``/``SIGINT`` (a balancer sees the
    refusal and retries elsewhere). ``SIGHUP`` (a restart) keeps it: the new workers
    inherit it.

    A restart (``SIGHUP``) replaces the workers one at a time, and one fewer (``SIGTTOU``)
    retires one, each time waiting for an old worker to drain its streams (up to the grace
    period), and uvicorn's supervisor looks at its signals only between those waits: a
    ``SIGTERM`` or ``SIGINT`` then went unheard until the restart was over — new
    connections served, the exit ~(busy workers + 1) x the grace later, past a container's
    kill deadline (helper-142). This one looks at its queue of signals during each wait (on
    its main thread: the signal handler stays uvicorn's, which only queues — work done in a
    handler, which runs between any two bytecodes, deadlocked on the exit event's lock and
    closed the socket under a worker's spawn; helper-145, helper-146): told to exit, it stops
    accepting, tells every worker to stop at once (the one draining goes on within its
    grace; a new worker not yet ready is let stop, not killed) and starts no other."""
    from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process

    log = logging.getLogger("uvicorn.error")
    exit_signals = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK")
                    if hasattr(signal, name)}  # fmt: skip

    class Supervisor(Multiprocess):
        def __init__(self, config: Any, sockets: list[Any]) -> None:
            super().__init__(config, sockets)
            self._starting: Process | None = None  # a restart's new worker, not yet swapped in
            self._retiring: Process | None = None  # the old worker being waited for
            outer = self

            class ExitAsked(threading.Event):
                # What uvicorn's wait for a new worker looks at (its ``should_exit``).
                def is_set(self) -> bool:
                    return outer._exit_asked()

            self._exit_asked_event = ExitAsked()

        def _exit_asked(self) -> bool:
            """Whether the supervisor is to exit; an exit signal queued meanwhile is acted on
            now (see serve_workers)."""
            if self.should_exit.is_set():
                return True
            queued = [sig for sig in self.signal_queue if sig in exit_signals]
            if not queued:
                return False
            for sig in queued:
                self.signal_queue.remove(sig)
            log.info("Received %s, exiting.", signal.Signals(queued[0]).name)
            self.should_exit.set()
            self.stop_accepting()
            for process in (*self.processes, self._starting):
                if process is None or process is self._retiring or process.pid is None:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
            return True

        def _join(self, process: Process) -> None:
            # An old worker draining its streams (up to the grace): the queue is looked at
            # meanwhile (a tenth of a second, as uvicorn's workers look at their own state).
            self._retiring = process
            log.info("Waiting for child process [%s]", process.pid)  # (uvicorn's line)
            try:
                while process.process.is_alive():
                    process.process.join(0.1)
                    self._exit_asked()
                process.process.join()
            finally:
                self._retiring = None

        def restart_all(self) -> None:
            # uvicorn's (0.51-0.55), looking at the queue while it waits.
            for idx, old_process in enumerate(self.processes):
                if self._exit_asked():
                    return
                new_process = self._starting = Process(self.config, self.sockets)
                try:
                    new_process.start()
                    timeout = self.config.timeout_worker_healthcheck
                    if not new_process.wait_until_ready(timeout, self._exit_asked_event):
                        self._retire(new_process)
                        if not self.should_exit.is_set():
                            log.error(
                                "New child process [%s] was not ready in time; keeping worker "
                                "[%s] and aborting the restart.",
                                new_process.pid,
                                old_process.pid,
                            )
                        return
                    old_process.terminate()
                    self._join(old_process)
                    self.processes[idx] = new_process
                finally:
                    self._starting = None

        def _retire(self, new_process: Process) -> None:
            # A new worker the restart does not keep. Told to exit meanwhile, it was told
            # too, and it may have begun serving: it is let stop as the others do (within
            # the grace), not killed with its connections (helper-145).
            if self.should_exit.is_set():
                new_process.terminate()
                new_process.process.join(self.config.timeout_graceful_shutdown)
            if new_process.process.is_alive() or not self.should_exit.is_set():
                new_process.kill()
            new_process.join()

        def handle_ttou(self) -> None:
            # uvicorn's, looking at the queue while the retired worker drains.
            if self._exit_asked():
                return
            log.info("Received SIGTTOU, decreasing number of processes.")
            if self.processes_num <= 1:
                log.info("Already reached one process, cannot decrease the number anymore.")
                return
            self.processes_num -= 1
            process = self.processes.pop()
            process.terminate()
            self._join(process)

        def handle_signals(self) -> None:
            # uvicorn's, one signal at a time: _exit_asked may take exit signals off the
            # queue while a handler waits (uvicorn's went through a copy of the queue, and
            # removed each signal of it).
            while self.signal_queue:
                name = SIGNALS[self.signal_queue.pop(0)]
                handler = getattr(self, f"handle_{name.lower()}", None)
                if handler is not None:
                    handler()

        def handle_int(self) -> None:
            self.stop_accepting()
            super().handle_int()

        def handle_term(self) -> None:
            self.stop_accepting()
            super().handle_term()

        def handle_break(self) -> None:  # pragma: no cover - Windows
            self.stop_accepting()
            super().handle_break()

        def handle_hup(self) -> None:
            # A restart (or one more worker) asked for once told to exit: a worker started
            # now would get the closed socket (helper-99: SIGTERM then SIGTTIN raised in the
            # supervisor's loop, which then never stopped its workers nor exited); so with
            # an exit signal queued behind it (`kill -HUP; kill -TERM`; helper-144).
            if not self._exit_asked():
                super().handle_hup()

        def handle_ttin(self) -> None:
            if not self._exit_asked():
                super().handle_ttin()

        def stop_accepting(self) -> None:
            # (The workers have their own copies: they close them as they shut down.)
            for sock in self.sockets:
                sock.close()

    sock = config.bind_socket()
    try:
        Supervisor(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # (as uvicorn.run)
        pass
    finally:
        sock.close()

"""The options of ``sse-cache proxy``: :data:`OPTIONS`, the one list of them, each a flag and
an ``SSE_CACHE_<OPTION>`` environment variable, with the parsers of their values;
:func:`add_options` puts them on a parser and :func:`resolve` reads a flag, else its
variable, else the default (:func:`value_of`, which the inspection commands use for
``--backend`` too)."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._checks import MAX_TTL, MAX_TTL_SHOWN, is_header_name
from .._logging import LOG_LEVELS
from ..backends._common import byte_count
from ..errors import ConfigError
from ..http.options import MAX_CROSS_PROCESS_LEASE
from ..http.policy import base_url_of

__all__ = [
    "ENV_PREFIX",
    "LOOPBACK_NAMES",
    "OPTIONS",
    "Option",
    "Refused",
    "add_options",
    "check_backend",
    "option",
    "process_private",
    "resolve",
    "secret_bytes",
    "value_of",
]

ENV_PREFIX = "SSE_CACHE_"


class Refused(SystemExit):
    """A command's refusal of how it was asked to run (a bad option value, as a flag or as a
    variable; a missing extra): ``message`` on stderr (:func:`sse_cache.cli.main` prints
    it) and exit status 2, as argparse's own refusals. A bad ``SSE_CACHE_PORT`` exited 1
    where the same ``--port`` exited 2 (helper-101)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- values ---------------------------------------------------------------------------------
# Each parser takes the text of a flag or a variable and returns the value, or raises
# ArgumentTypeError saying what was expected (argparse prints it after the flag's name; the
# environment's errors name the variable).


def _port(text: str) -> int:
    value = _integer(text, "a port number")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return value


def _bytes(text: str) -> int:
    """A byte count of at least 1: ``4194304``, ``4MiB``, ``512KiB``, as backend URLs take
    sizes (``4MiB`` was refused here; helper-156)."""
    value = byte_count(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number of bytes >= 1 (e.g. 4194304 or 4MiB), got {text!r}"
        )
    return value


def _at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text, what)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {text!r}")
        return value

    return parse


#: The most ``--workers`` a proxy may run per CPU it can use (:func:`usable_cpus`). Each
#: worker is a Python process with its own app, upstream connections and decoded-entry
#: memory (``--decoded-cache-mb``, 64 MiB by default), and one keeps a CPU busy on its own:
#: past a few per CPU they add memory and context switches, no throughput. Eight per CPU is
#: four times the usual ``2 * CPUs + 1``, and still refuses a mistyped ``--workers 100000``
#: before it forks a process per worker (which once took a VM to the OOM killer).
WORKERS_PER_CPU = 8


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where there is one (``taskset``,
    a container's cpuset), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # (no affinity on macOS and Windows)
        return os.cpu_count() or 1


def _workers(text: str) -> int:
    value = _integer(text, "a number of workers")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers >= 1, got {text!r}")
    cpus = usable_cpus()
    most = WORKERS_PER_CPU * cpus
    if value > most:
        raise argparse.ArgumentTypeError(
            f"expected at most {most} workers ({WORKERS_PER_CPU} per CPU, {cpus} CPU"
            f"{'s' if cpus > 1 else ''} here), got {text!r}"
        )
    return value


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _seconds(
    *, zero: bool = False, most: float | None = None, shown: str = ""
) -> Callable[[str], float]:
    """Seconds > 0 (>= 0 with ``zero``), finite; at most ``most`` (said as ``shown``)."""
    what = "a number of seconds >= 0" if zero else "a positive number of seconds"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if math.isnan(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if most is not None and value > most:
            limit = f"{most:.0f}" + (f" ({shown})" if shown else "")
            raise argparse.ArgumentTypeError(f"expected {what} of at most {limit}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _secret(text: str) -> str:
    # The codec takes 1 to 64 bytes (a keyed BLAKE2b); the text is their UTF-8. No space at
    # either end: a variable's value is read as it is, but a value that differs only there
    # from another keys another MAC, silently (every entry then a miss, deleted as corrupt).
    size = len(text.encode("utf-8", "surrogateescape"))
    if not 1 <= size <= 64:
        raise argparse.ArgumentTypeError(f"expected a secret of 1 to 64 bytes, got {size} bytes")
    if text != text.strip():
        raise argparse.ArgumentTypeError("a secret cannot begin or end with whitespace")
    return text


def secret_bytes(text: str | None) -> bytes | None:
    """The codec's secret for ``--secret``'s value (None: no secret)."""
    return None if text is None else text.encode("utf-8", "surrogateescape")


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of MiB >= 0, got {text!r}")
    return value


def _upstream(text: str) -> str:
    # The checks Forwarder makes (an http(s):// base URL with a host, a good port, no query
    # or fragment), made here so that a bad value is a usage error naming the flag. Their
    # messages show the URL without its password.
    try:
        base_url_of(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def host(text: str) -> str:
    """An address to listen on, as ``--host`` takes it (argparse ``type``)."""
    # An empty address is uvicorn's "every interface": a `--host "$HOST"` with HOST unset
    # must not open a proxy that forwards its callers' API keys to the network.
    host = text.strip()
    # A name or address (IPv6 without brackets, as uvicorn takes it): anything else failed
    # only once uvicorn had started, naming neither the flag nor the variable (helper-87).
    if not _HOST.fullmatch(host):
        raise argparse.ArgumentTypeError(
            f"expected an address to listen on (127.0.0.1, 0.0.0.0, ::1, a host name), got {text!r}"
        )
    return host


_HOST = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9_.-]+)?")


#: The names of this machine's loopback interface (``localhost`` names 127.0.0.1 or ::1).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def check_backend(url: str) -> None:
    """Raise :class:`ConfigError` for a backend URL that cannot be used, before any server
    starts (creating a backend does no I/O: it is made and closed)."""
    import anyio

    from ..backends import from_url

    anyio.run(from_url(url).aclose)


def process_private(backend: Any) -> str:
    """The URL of ``backend`` when it is a cache that lives inside its process (``memory://``,
    ``sqlite:///:memory:``), which no other process, nor another worker, can see; else ""."""
    from ..backends import MemoryBackend, SQLiteBackend

    if isinstance(backend, MemoryBackend):
        return "memory://"
    if isinstance(backend, SQLiteBackend) and backend.path in ("", ":memory:"):
        return "sqlite:///:memory:"
    return ""


def _backend(text: str) -> str:
    if "://" not in text:
        raise argparse.ArgumentTypeError(
            f"expected a backend URL (sqlite:///cache.db, redis://host:6379/0, memory://, "
            f"...), got {text!r}"
        )
    return text


def _route(text: str) -> tuple[str, str]:
    from ..adapters import ADAPTERS

    path, sep, name = text.partition("=")
    name = name.strip()
    if not sep or not path.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected /PATH=ADAPTER, got {text!r}")
    if re.search(r"[,\s]", path):
        # SSE_CACHE_ROUTE (how --workers hands the routes to its workers) is a list split on
        # commas and spaces: such a path would be cut in two there. (A request's path never
        # holds a space, so that route could never match anyway.)
        raise argparse.ArgumentTypeError(
            f"a route path cannot hold a comma or whitespace, got {path!r} in {text!r}"
        )
    if name not in ADAPTERS:
        known = ", ".join(sorted(ADAPTERS))
        raise argparse.ArgumentTypeError(f"unknown adapter {name!r} in {text!r}; known: {known}")
    return path, name


def _header_name(text: str) -> str:
    name = text.strip()
    if not is_header_name(name):
        raise argparse.ArgumentTypeError(f"expected a header name, got {text!r}")
    return name.lower()


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _switch(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (1/0, yes/no, on/off), got {text!r}")


# -- the options ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of ``sse-cache proxy``: its flag, what it means, its default (``shown`` as
    the help and the docs write it), and how its text is read (None: a switch, on when given
    or when its variable is true). ``repeat``: the flag may be given several times; its
    variable is then a comma- or space-separated list."""

    flag: str
    help: str
    default: Any = None
    shown: str = "none"
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    repeat: bool = False
    #: Its variable's text is read as it is (not stripped), and set but blank is an error
    #: (not unset): a secret.
    verbatim: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        """The environment variable: ``SSE_CACHE_`` and the flag in upper case."""
        return ENV_PREFIX + self.dest.upper()

    def from_text(self, text: str) -> Any:
        """The value of the variable's ``text`` (raises ArgumentTypeError)."""
        if self.parse is None:
            return _switch(text)
        if self.repeat:
            return [self.parse(item) for item in re.split(r"[,\s]+", text.strip()) if item]
        return self.parse(text)

    def to_text(self, value: Any) -> str:
        """``value`` as this option's variable would say it (:meth:`from_text` reads it back)."""
        if self.parse is None:
            return "true" if value else "false"
        if self.repeat:  # (a route is a pair: PATH=ADAPTER)
            return ",".join(item if isinstance(item, str) else "=".join(item) for item in value)
        return str(value)


OPTIONS: tuple[Option, ...] = (
    Option(
        "--upstream",
        "base URL of the API; the request path and query are appended (http(s):// only)",
        shown="required",
        parse=_upstream,
        metavar="URL",
    ),
    Option(
        "--backend",
        "cache backend URL (docs/backends.md)",
        default="sqlite:///./sse-cache.db",
        shown="sqlite:///./sse-cache.db",
        parse=_backend,
        metavar="URL",
    ),
    Option(
        "--host",
        "address to listen on (0.0.0.0: every interface, as in a container)",
        default="127.0.0.1",
        shown="127.0.0.1",
        parse=host,
        metavar="H",
    ),
    Option("--port", "port to listen on", default=8000, shown="8000", parse=_port, metavar="P"),
    Option(
        "--workers",
        "processes serving the port; with more than one, identical streamed requests share "
        "one upstream stream across them when the backend supports it (Redis); at most "
        f"{WORKERS_PER_CPU} per CPU",
        default=1,
        shown="1",
        parse=_workers,
        metavar="N",
    ),
    Option(
        "--ttl",
        f"entry lifetime in seconds, at most {MAX_TTL} ({MAX_TTL_SHOWN})",
        shown="none (no expiry)",
        parse=_seconds(most=MAX_TTL, shown=MAX_TTL_SHOWN),
        metavar="S",
    ),
    Option(
        "--shared-tenant",
        "let all callers share entries (default: one scope per API key)",
        default=False,
        shown="off",
    ),
    Option(
        "--route",
        "cache this path (suffix) with an adapter (openai-responses, openai-chat, "
        "anthropic-messages, gemini, generic); repeatable; when given, only the listed "
        "routes are cached",
        default=[],
        shown="the default routes",
        parse=_route,
        metavar="PATH=ADAPTER",
        repeat=True,
    ),
    Option(
        "--credential-header",
        "a request header that carries a caller's credential (a gateway's own), part of the "
        "tenant scope beside Authorization, x-api-key and the others (docs/asgi.md, Tenant "
        "scope); repeatable",
        default=[],
        shown="the known ones",
        parse=_header_name,
        metavar="NAME",
        repeat=True,
    ),
    Option(
        "--key-header",
        "a request header that changes the answer (a gateway's choice of provider or "
        "account), part of every key; repeatable",
        default=[],
        shown="the adapters' own",
        parse=_header_name,
        metavar="NAME",
        repeat=True,
    ),
    Option(
        "--finish-on-disconnect",
        "when a client leaves a streamed miss, finish it in the background to fill the cache",
        default=False,
        shown="off",
    ),
    Option(
        "--resume-window",
        "when a client leaves a streamed miss, keep reading its upstream this many seconds so "
        "that the client can come back and resume it (Last-Event-ID, or GET "
        "/v1/responses/{id}?stream=true&starting_after=N); docs/single-flight.md",
        shown="none (abandoned at once)",
        parse=_seconds(),
        metavar="S",
    ),
    Option(
        "--cross-process",
        "share live streams between proxy processes on one Redis backend (on by itself with "
        "--workers > 1 on Redis)",
        default=False,
        shown="off",
    ),
    Option(
        "--cross-process-lease",
        "with --cross-process: seconds a producer's lease lasts unless renewed; a killed "
        f"producer's followers take over within this long; at most {MAX_CROSS_PROCESS_LEASE:.0f}",
        default=3.0,
        shown="3",
        parse=_seconds(most=MAX_CROSS_PROCESS_LEASE),
        metavar="S",
    ),
    Option(
        "--breaker-failures",
        "consecutive backend failures after which the backend is skipped for "
        "--breaker-cooldown seconds, then probed (0: never skip)",
        default=5,
        shown="5",
        parse=_at_least(0, "a number of failures"),
        metavar="N",
    ),
    Option(
        "--breaker-cooldown",
        "seconds an open backend breaker skips the backend",
        default=10.0,
        shown="10",
        parse=_seconds(),
        metavar="S",
    ),
    Option(
        "--max-body-bytes",
        "larger request bodies pass through uncached (bypass)",
        default=4 * 1024 * 1024,
        shown="4194304 (4 MiB)",
        parse=_bytes,
        metavar="N",
    ),
    Option(
        "--upstream-timeout",
        "seconds one upstream read may take before the proxy answers 504",
        default=600.0,
        shown="600",
        parse=_seconds(),
        metavar="S",
    ),
    Option(
        "--upstream-connections",
        "connections open to the upstream at once; a request past them waits for one (0: no limit)",
        default=0,
        shown="0 (no limit)",
        parse=_at_least(0, "a number of connections"),
        metavar="N",
    ),
    Option(
        "--limit-concurrency",
        "requests each process serves at once, each counted until its response's end (a "
        "stream's last byte); past it, a new request is answered 503 with retry-after at "
        "once (0: no limit). Idle keep-alive connections do not count, and "
        "/_sse_cache/health and /_sse_cache/metrics always answer. Bounds what slow or "
        "stalled clients can hold",
        default=0,
        shown="0 (no limit)",
        parse=_at_least(0, "a number of requests"),
        metavar="N",
    ),
    Option(
        "--body-timeout",
        "seconds a request's body may go without a byte arriving; then it is answered 408 and "
        "its connection closed (0: no limit). A client that sends its request's head and "
        "then nothing would otherwise hold its place for good",
        default=60.0,
        shown="60",
        parse=_seconds(zero=True),
        metavar="S",
    ),
    Option(
        "--header-timeout",
        "seconds a connection may wait for a request's head (a new connection, or one whose "
        "last response ended); then it is closed, answered 408 if part of a head came (0: "
        "no limit). A client that connects and sends nothing, or its head a byte at a time, "
        "would otherwise hold its connection, and a file descriptor, for good",
        default=60.0,
        shown="60",
        parse=_seconds(zero=True),
        metavar="S",
    ),
    Option(
        "--decoded-cache-mb",
        "memory per process for recently decoded entries, so hot entries are not decoded on "
        "every hit (0 turns it off)",
        default=64.0,
        shown="64",
        parse=_megabytes,
        metavar="N",
    ),
    Option(
        "--secret",
        "the entries' checksum becomes a MAC keyed with this text (MsgpackCodec(secret=...)): "
        "entries written without it are not read (misses, deleted as corrupt). Give it by "
        "its variable, not on a command line that `ps` shows; sse-cache ls/show read it too",
        shown="none (a checksum, not a MAC)",
        parse=_secret,
        metavar="TEXT",
        verbatim=True,
    ),
    Option(
        "--graceful-timeout",
        "on SIGTERM or SIGINT, seconds to let streams in flight finish; then they are cut "
        "(their clients see a failed response, nothing partial is stored) and the process exits",
        default=30.0,
        shown="30",
        parse=_seconds(zero=True),
        metavar="S",
    ),
    Option(
        "--log-level",
        "level of the proxy's log lines, its own and uvicorn's: critical, error, warning, "
        "info, debug or trace",
        default="info",
        shown="info",
        parse=_log_level,
        metavar="L",
    ),
)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`OPTIONS` to ``parser``. Each is None when not given, so
    that :func:`resolve` can tell a flag from its variable and its default."""
    for opt in OPTIONS:
        text = f"{opt.help} (env {opt.env}; default {opt.shown})"
        if opt.parse is None:
            parser.add_argument(opt.flag, action="store_const", const=True, default=None, help=text)
        else:
            parser.add_argument(
                opt.flag,
                type=opt.parse,
                default=None,
                metavar=opt.metavar,
                action="append" if opt.repeat else "store",
                help=text,
            )


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> argparse.Namespace:
    """Every option's value: the flag's if given, else its ``SSE_CACHE_*`` variable's (an
    empty variable counts as unset), else the default. Raises :class:`ConfigError` naming the
    variable and what was expected for a bad value, and for a missing upstream."""
    out = argparse.Namespace()
    for opt in OPTIONS:
        setattr(out, opt.dest, value_of(opt, getattr(args, opt.dest, None), environ))
    if out.upstream is None:
        raise ConfigError("an upstream is required: --upstream URL or SSE_CACHE_UPSTREAM=URL")
    return out


def option(flag: str) -> Option:
    """The option of :data:`OPTIONS` whose flag is ``flag`` (``"--backend"``)."""
    return next(opt for opt in OPTIONS if opt.flag == flag)


def value_of(opt: Option, given: Any, environ: Mapping[str, str]) -> Any:
    """One option's value: ``given`` (its flag's, already parsed) unless None, else its
    ``SSE_CACHE_*`` variable's (an empty variable counts as unset), else its default.
    Raises :class:`ConfigError` naming the variable and what was expected for a bad value.
    (:func:`resolve` reads every option so; the inspection commands read ``--backend`` so.)"""
    if given is not None:
        return given
    raw = environ.get(opt.env, "")
    text = raw if opt.verbatim else raw.strip()
    if opt.verbatim and raw and not raw.strip():
        raise ConfigError(f"{opt.env}: set but blank: unset it, or give a value")
    if text:
        try:
            return opt.from_text(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{opt.env}: {exc}") from None
    return list(opt.default) if isinstance(opt.default, list) else opt.default


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``SSE_CACHE_*`` variables that look like a misspelt option (other
    ``SSE_CACHE_*`` variables are left alone: other tools read some)."""
    known = [opt.env for opt in OPTIONS]
    warnings = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                warnings.append(f"ignoring {name}: not an option (did you mean {close[0]}?)")
    return warnings

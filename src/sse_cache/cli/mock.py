"""``sse-cache mock-upstream``: serve :class:`~sse_cache.testing.MockUpstream` with uvicorn.

A deterministic OpenAI/Anthropic/Gemini-compatible upstream on loopback, for trying the proxy,
for demos and for tests: ``POST /v1/responses``, ``/v1/chat/completions``, ``/v1/messages`` and
Gemini's ``.../models/{model}:streamGenerateContent`` / ``:generateContent``, streamed and not,
paced like a model, with error modes selected by request headers.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import socket
import sys
from typing import Any

from ..testing import DEFAULT_DELTAS, DEFAULT_SUMMARIES, ERROR_MODES, MockUpstream
from ._options import LOOPBACK_NAMES, Refused, host

__all__ = ["milliseconds", "register"]

# The exit code of a server that did not start (its port taken, say): uvicorn.run's.
_STARTUP_FAILURE = 3


def milliseconds(text: str) -> float:
    """A delay in milliseconds, as a flag gives it: a finite number >= 0 (``inf`` waits for
    ever; ``nan`` passes any ``value < 0`` check unnoticed)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds >= 0, got {text!r}")
    return value


def register(sub: Any) -> None:
    """Add the ``mock-upstream`` subcommand to the argparse subparsers ``sub``."""
    parser = sub.add_parser(
        "mock-upstream",
        help="serve a deterministic mock of the OpenAI, Anthropic and Gemini streaming APIs",
        description=(
            "Serves POST /v1/responses, /v1/chat/completions, /v1/messages and Gemini's "
            ".../models/{model}:streamGenerateContent?alt=sse / :generateContent (streamed and "
            "not), GET /v1/models, and GET /_mock/stats / POST /_mock/reset (request "
            "counters). The same request always gets the same answer. Per-request headers: "
            "x-mock-delay-ms, x-mock-first-ms, x-mock-deltas, x-mock-summaries, "
            f"x-mock-error ({' | '.join(sorted(ERROR_MODES))}), x-mock-error-after."
        ),
    )
    parser.add_argument(
        "--host", type=host, default="127.0.0.1", help="bind address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port (default 8001; 0: a free one, printed)"
    )
    parser.add_argument(
        "--delay-ms", type=milliseconds, default=20.0, help="gap between events in ms (default 20)"
    )
    parser.add_argument(
        "--first-ms",
        type=milliseconds,
        default=None,
        help="time to the first event in ms (default: the --delay-ms value)",
    )
    parser.add_argument("--seed", type=int, default=0, help="mixed into every answer (default 0)")
    parser.add_argument(
        "--deltas",
        type=int,
        default=DEFAULT_DELTAS,
        help=f"words (text deltas) per answer (default {DEFAULT_DELTAS})",
    )
    parser.add_argument(
        "--summaries",
        type=int,
        default=DEFAULT_SUMMARIES,
        help=f"reasoning summary parts per Responses answer (default {DEFAULT_SUMMARIES})",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default warning)",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.deltas < 1 or args.summaries < 0:
        raise Refused("sse-cache mock-upstream: --deltas must be >= 1, --summaries >= 0")
    if not 0 <= args.port <= 65535:
        raise Refused(
            f"sse-cache mock-upstream: argument --port: expected a port number from 0 to "
            f"65535 (0: a free one), got {args.port}"
        )
    try:
        import uvicorn  # lazily: only this subcommand needs a server
    except ImportError:
        print(
            "sse-cache mock-upstream needs uvicorn: pip install 'sse-cache[proxy]'",
            file=sys.stderr,
        )
        return 2
    app = MockUpstream(
        delay=args.delay_ms / 1000,
        first_delay=None if args.first_ms is None else args.first_ms / 1000,
        seed=args.seed,
        deltas=args.deltas,
        summaries=args.summaries,
    )
    options: dict[str, Any] = {"log_level": args.log_level, "lifespan": "on"}
    # Bound here, before the banner says where it serves (helper-126: with the port taken,
    # it printed its address, then uvicorn's error). Port 0 asks the system for a free
    # port, and is given to learn which one. (uvicorn would bind without saying, or with
    # "localhost" bind two sockets on two different ports.)
    config = uvicorn.Config(app, host=args.host, port=args.port, **options)
    try:
        listeners = _bind(config)
    except SystemExit as exc:  # (uvicorn has logged why: the address in use, say)
        return exc.code if isinstance(exc.code, int) else 1
    # Listening from now: a client that read the port connects (and waits in the backlog
    # for uvicorn to start) rather than being refused.
    for listener in listeners:
        listener.listen(config.backlog)
    port = listeners[0].getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"sse-cache mock-upstream on http://{host}:{port}", flush=True)
    print(
        "  POST /v1/responses  /v1/chat/completions  /v1/messages"
        "  /v1beta/models/{model}:generateContent  :streamGenerateContent"
        "  |  GET /v1/models  |  GET /_mock/stats  POST /_mock/reset",
        flush=True,
    )
    if args.host not in LOOPBACK_NAMES:
        # A mock answers anyone without credentials: say so when it leaves loopback.
        print(f"  warning: listening on {args.host}, not loopback only", file=sys.stderr)
    # What uvicorn.run does, on the sockets bound above (uvicorn.run takes none).
    server = uvicorn.Server(config)
    try:
        with contextlib.ExitStack() as stack:
            for listener in listeners:
                stack.enter_context(listener)
            server.run(sockets=listeners)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn raises it again once it has shut down
        pass
    return 0 if server.started else _STARTUP_FAILURE


def _bind(config: Any) -> list[socket.socket]:
    """The sockets to serve on: uvicorn's (the host's first address), and one on the same
    port for each other address a host name resolves to (``localhost``: ``::1`` too, where
    the system names it so), as ``uvicorn.run`` binds them (helper-129). Exits as uvicorn
    does, having logged why, when one cannot be bound."""
    first = config.bind_socket()
    sockets = [first]
    host, port = config.host, first.getsockname()[1]
    try:
        ipaddress.ip_address(host)
        return sockets  # an address: that one
    except ValueError:
        pass
    taken = {first.getsockname()[0]}
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if address[0] in taken:
            continue
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            for bound in (*sockets, sock):
                bound.close()
            logging.getLogger("uvicorn.error").error(exc)
            raise SystemExit(_STARTUP_FAILURE) from None
        sock.set_inheritable(True)
        sockets.append(sock)
        taken.add(address[0])
    return sockets

"""``sse-cache proxy``: a caching reverse proxy in front of an LLM API."""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from ..errors import ConfigError

__all__ = ["register"]


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "proxy",
        help="run a caching reverse proxy in front of an LLM API",
        description=(
            "Serves POST /v1/responses, /v1/chat/completions and /v1/messages through the "
            "cache (streamed and not) and passes everything else to the upstream unchanged. "
            "GET /_sse_cache/health and /_sse_cache/metrics report on the proxy."
        ),
    )
    parser.add_argument(
        "--upstream", required=True, help="upstream base URL, e.g. https://api.openai.com"
    )
    parser.add_argument(
        "--backend",
        default="sqlite:///./sse-cache.db",
        help="cache backend URL (default sqlite:///./sse-cache.db)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--ttl", type=float, default=None, help="entry lifetime in seconds")
    parser.add_argument(
        "--shared-tenant",
        action="store_true",
        help="let all callers share entries (default: one scope per API key)",
    )
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="PATH=ADAPTER",
        help=(
            "cache another route (path suffix) with an adapter: openai-responses, openai-chat, "
            "anthropic-messages or generic; repeatable (replaces the default routes, which "
            "are then listed explicitly)"
        ),
    )
    parser.add_argument(
        "--finish-on-disconnect",
        action="store_true",
        help="when a client leaves a streamed miss, finish it in the background to fill the cache",
    )
    parser.add_argument(
        "--cross-process",
        action="store_true",
        help="share live streams between proxy processes on one Redis backend",
    )
    parser.add_argument(
        "--cross-process-lease",
        type=float,
        default=3.0,
        metavar="S",
        help="with --cross-process: seconds a producer's lease lasts unless renewed; a killed "
        "producer's followers take over within this long (default 3)",
    )
    parser.add_argument(
        "--breaker-failures",
        type=int,
        default=5,
        metavar="N",
        help="consecutive backend failures after which the backend is skipped for "
        "--breaker-cooldown seconds, then probed (default 5; 0: never skip)",
    )
    parser.add_argument(
        "--breaker-cooldown",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds an open backend breaker skips the backend (default 10)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="larger request bodies pass through uncached (default 4 MiB)",
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=600.0,
        help="seconds an upstream read may take before the proxy answers 504 (default 600)",
    )
    parser.add_argument(
        "--decoded-cache-mb",
        type=float,
        default=64.0,
        help="memory for recently decoded entries, so hot entries are not decoded on every "
        "hit (default 64; 0 turns it off)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("sse-cache proxy needs uvicorn: pip install 'sse-cache[proxy]'") from None
    from ..adapters import by_name
    from ..proxy import create_proxy_app

    try:
        routes = None
        if args.route:
            routes = {}
            for spec in args.route:
                path, sep, name = spec.partition("=")
                if not sep or not path.startswith("/"):
                    raise ConfigError(f"--route must be /PATH=ADAPTER, got {spec!r}")
                routes[path] = by_name(name.strip())
        app = create_proxy_app(
            args.upstream,
            args.backend,
            ttl=args.ttl,
            tenant="shared" if args.shared_tenant else None,
            routes=routes,
            finish_on_disconnect=args.finish_on_disconnect,
            cross_process=args.cross_process,
            cross_process_lease=args.cross_process_lease,
            breaker_failures=args.breaker_failures,
            breaker_cooldown=args.breaker_cooldown,
            max_body_bytes=args.max_body_bytes,
            upstream_timeout=args.upstream_timeout,
            decoded_cache_bytes=_megabytes(args.decoded_cache_mb),
        )
    except ConfigError as exc:
        raise SystemExit(f"sse-cache proxy: {exc}") from None
    # uvicorn's access log prints each request's query string: never a ?key= credential.
    logging.getLogger("uvicorn.access").addFilter(RedactQueryKey())
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    return 0


_QUERY_KEY = re.compile(r"([?&]key=)[^&\s\"]*")


class RedactQueryKey(logging.Filter):
    """Replaces the value of a ``key=`` query parameter (Gemini's API key) in log records
    with ``***``: in the message and in its arguments (uvicorn's access log passes the path
    as an argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _QUERY_KEY.sub(r"\1***", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY_KEY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def _megabytes(value: float) -> int:
    if not value >= 0:
        raise SystemExit(f"sse-cache proxy: --decoded-cache-mb must be >= 0, got {value}")
    return int(value * 1024 * 1024)

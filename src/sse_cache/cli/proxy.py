"""``sse-cache proxy``: a caching reverse proxy in front of an LLM API."""

from __future__ import annotations

import argparse
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
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("sse-cache proxy needs uvicorn: pip install 'sse-cache[proxy]'") from None
    from ..proxy import create_proxy_app

    try:
        app = create_proxy_app(
            args.upstream,
            args.backend,
            ttl=args.ttl,
            tenant="shared" if args.shared_tenant else None,
        )
    except ConfigError as exc:
        raise SystemExit(f"sse-cache proxy: {exc}") from None
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    return 0

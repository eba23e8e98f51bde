"""The ``sse-cache`` command: ``demo``, ``proxy``, ``mock-upstream`` and cache inspection
(``ls``, ``show``, ``purge``, ``stats``). Each subcommand lives in its own module and registers
itself on the parser here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import demo, inspect, mock, proxy

    parser = argparse.ArgumentParser(
        prog="sse-cache",
        description="Record, store and replay streamed (SSE) LLM responses.",
    )
    parser.add_argument("--version", action="version", version=f"sse-cache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(sub)
    proxy.register(sub)
    mock.register(sub)
    inspect.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

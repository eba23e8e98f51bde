"""The ``sse-cache`` command: ``demo``, ``proxy``, ``mock-upstream`` and cache inspection
(``ls``, ``show``, ``purge``, ``stats``). Each subcommand lives in its own module and registers
itself on the parser here."""

from __future__ import annotations

import argparse
import os
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


#: The exit code of a command whose reader went away: what a shell reports for a tool
#: ended by SIGPIPE (128 + 13), as ``ls | head`` ends ``ls``.
BROKEN_PIPE_EXIT = 141
#: The exit code of a command stopped by Ctrl-C: what a shell reports for a tool ended by
#: SIGINT (128 + 2).
INTERRUPTED_EXIT = 130


def main(argv: Sequence[str] | None = None) -> int:
    from ._options import Refused

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not at the exit
    except BrokenPipeError:
        # ``sse-cache ls | head``: stop where the reader stopped, without a traceback, and
        # without another one when Python flushes stdout at the exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    except Refused as refused:
        print(refused.message, file=sys.stderr)
        raise
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a command, not a failure to show as a traceback.
        print("sse-cache: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

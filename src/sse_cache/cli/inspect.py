"""``sse-cache ls | show KEY | purge [--yes] | stats`` — inspect and manage a cache.

Every subcommand takes ``--backend URL`` (default ``sqlite:///./sse-cache.db``). Exit codes:
0 done, 1 failed (key not found, corrupt entry, storage error, purge not confirmed),
2 the request cannot be served (bad URL or option, or a backend that cannot list keys).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread

from ..codec import MsgpackCodec
from ..entry import Entry
from ..errors import ConfigError, CorruptEntry, SSECacheError
from ..events import serialize_sse
from ..protocols import Backend, ScanningBackend, StatsBackend

__all__ = ["DEFAULT_BACKEND", "register"]

#: The backend every inspection command uses unless ``--backend`` says otherwise.
DEFAULT_BACKEND = "sqlite:///./sse-cache.db"

EXIT_OK, EXIT_FAILED, EXIT_UNSUPPORTED = 0, 1, 2


def register(sub: Any) -> None:
    """Add ``ls``, ``show``, ``purge`` and ``stats`` to the ``sse-cache`` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        metavar="URL",
        help=f"cache backend URL (default: {DEFAULT_BACKEND})",
    )

    ls = sub.add_parser("ls", parents=[common], help="list the keys in a cache")
    ls.add_argument("--prefix", default="", help="only keys starting with this")
    ls.add_argument(
        "-l", "--long", action="store_true", help="also show size, schema, events and age"
    )
    ls.set_defaults(run=_sync(_ls))

    show = sub.add_parser("show", parents=[common], help="print one entry: metadata and events")
    show.add_argument("key", help="the entry's key (as `sse-cache ls` prints it)")
    show.add_argument(
        "--sse-only", action="store_true", help="print only the events, as SSE (no metadata)"
    )
    show.set_defaults(run=_sync(_show))

    purge = sub.add_parser("purge", parents=[common], help="delete every entry of a cache")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=_sync(_purge))

    stats = sub.add_parser("stats", parents=[common], help="count entries and bytes")
    stats.set_defaults(run=_sync(_stats))


def _sync(
    command: Callable[[argparse.Namespace, Backend], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Open the backend, run ``command`` on asyncio (Redis needs it), close, map errors."""

    def run(args: argparse.Namespace) -> int:
        from ..backends import from_url

        try:
            backend = from_url(args.backend)
        except ConfigError as exc:
            return _fail(f"bad --backend: {exc}", EXIT_UNSUPPORTED)

        async def main() -> int:
            try:
                return await command(args, backend)
            finally:
                await backend.aclose()

        try:
            return anyio.run(main)
        except SSECacheError as exc:
            return _fail(f"{args.command} on {_redact(args.backend)}: {exc}", EXIT_FAILED)

    return run


def _fail(message: str, code: int, stream: TextIO | None = None) -> int:
    print(f"sse-cache: {message}", file=stream or sys.stderr)
    return code


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _cannot_list(args: argparse.Namespace, backend: Backend) -> int:
    name = type(backend).__name__
    hint = (
        "memcached has no way to list its keys"
        if "Memcached" in name
        else f"{name} does not support listing keys"
    )
    return _fail(
        f"{args.command}: {hint}. Use `sse-cache show KEY` for a known key, or `sse-cache stats`.",
        EXIT_UNSUPPORTED,
    )


async def _ls(args: argparse.Namespace, backend: Backend) -> int:
    if not isinstance(backend, ScanningBackend):
        return _cannot_list(args, backend)
    codec = MsgpackCodec()
    now = time.time()
    count = 0
    async for key in backend.scan(args.prefix):
        count += 1
        if not args.long:
            print(key)
            continue
        data = await backend.get(key)
        if data is None:
            continue  # expired or deleted since the scan saw it
        try:
            entry = codec.decode(data)
        except CorruptEntry:
            print(f"{key}\t{len(data)}\tCORRUPT")
            continue
        kind = f"{len(entry.events)} events" if entry.events is not None else "body"
        print(f"{key}\t{len(data)}\t{entry.schema}\t{kind}\t{_age(now - entry.created_at)}")
    if args.long:
        print(f"{count} entries", file=sys.stderr)
    return EXIT_OK


async def _show(args: argparse.Namespace, backend: Backend) -> int:
    data = await backend.get(args.key)
    if data is None:
        return _fail(f"no entry with key {args.key!r} in {_redact(args.backend)}", EXIT_FAILED)
    try:
        entry = MsgpackCodec().decode(data)
    except CorruptEntry as exc:
        return _fail(f"entry {args.key!r} is corrupt: {exc}", EXIT_FAILED)
    out = sys.stdout
    if not args.sse_only:
        _print_metadata(out, args.key, entry, len(data))
        out.write("\n")
    if entry.events is not None:
        out.write(serialize_sse(entry.events).decode("utf-8", "replace"))
    elif entry.body is not None:
        out.write(entry.body.decode("utf-8", "replace"))
        out.write("\n")
    out.flush()
    return EXIT_OK


def _print_metadata(out: TextIO, key: str, entry: Entry, stored: int) -> None:
    created = dt.datetime.fromtimestamp(entry.created_at, dt.UTC)
    rows = [
        ("key", key),
        ("schema", entry.schema),
        ("status", str(entry.status)),
        ("content-type", entry.content_type),
        (
            "created",
            f"{created.isoformat(timespec='seconds')} ({_age(time.time() - entry.created_at)} ago)",
        ),
        ("format", f"v{entry.version}"),
    ]
    expires: float | None = getattr(entry, "expires_at", None)
    if expires is not None:
        left = expires - time.time()
        when = dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(timespec="seconds")
        rows.append(("expires", f"{when} ({'in ' + _age(left) if left > 0 else 'expired'})"))
    rows.append(("stored bytes", str(stored)))
    if entry.events is not None:
        duration = entry.events[-1].at if entry.events else 0.0
        rows.append(("events", f"{len(entry.events)} over {duration:.3f} s"))
    else:
        rows.append(("body bytes", str(len(entry.body or b""))))
    rows.extend((f"meta.{name}", value) for name, value in sorted(entry.meta.items()))
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        out.write(f"{name + ':':<{width}} {value}\n")


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


async def _purge(args: argparse.Namespace, backend: Backend) -> int:
    if not isinstance(backend, ScanningBackend):
        return _cannot_list(args, backend)
    where = _redact(args.backend)
    if not args.yes:
        try:
            answer = await anyio.to_thread.run_sync(input, f"Delete every entry in {where}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            return _fail("purge cancelled (nothing deleted); pass --yes to skip the question", 1)
    count = await backend.clear()
    print(f"purged {count} entries from {where}")
    return EXIT_OK


async def _stats(args: argparse.Namespace, backend: Backend) -> int:
    if not isinstance(backend, StatsBackend):
        return _fail(f"stats: {type(backend).__name__} cannot count its entries", 2)
    figures = await backend.stats()
    print(f"backend: {_redact(args.backend)}")
    width = max((len(name) for name in figures), default=0) + 1
    for name, value in figures.items():
        print(f"{name + ':':<{width}} {value}")
    return EXIT_OK

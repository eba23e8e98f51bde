"""``sse-cache ls | show KEY | purge [KEY...] | stats`` — inspect and manage a cache.

Every subcommand takes ``--backend URL``, else reads ``SSE_CACHE_BACKEND`` as ``sse-cache
proxy`` does (the flag wins; default ``sqlite:///./sse-cache.db``), and never creates a
cache: a ``sqlite://`` file is opened with ``create=false``. A cache holds entries and index
rows (aliases, ``alias-…``: another name of an entry, whose value is the entry's
key); these commands show each as what it is. Exit codes: 0 done, 1 failed (key not found,
corrupt entry, missing file, storage error, purge not confirmed), 2 the request cannot be
served (bad URL or option, a backend that cannot list keys, or one that lives inside each
process: ``memory://``, ``sqlite:///:memory:``), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TextIO
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import anyio.to_thread

from .._logging import redact_userinfo
from ..backends._common import check_key
from ..codec import MsgpackCodec, WireEntry
from ..entry import Entry
from ..errors import BackendFull, ConfigError, CorruptEntry, SSECacheError, UnreadableEntry
from ..events import serialize_sse
from ..keys import ALIAS_PREFIX, parse_live_alias_target
from ..protocols import Backend, ScanningBackend, StatsBackend
from . import INTERRUPTED_EXIT
from ._options import option, process_private, secret_bytes, unknown_variables, value_of

__all__ = ["DEFAULT_BACKEND", "register"]

#: The proxy's ``--backend`` option: its ``SSE_CACHE_BACKEND`` variable and its default.
_BACKEND = option("--backend")
#: The proxy's ``--secret`` option: the codec's secret, from ``SSE_CACHE_SECRET`` too.
_SECRET = option("--secret")
#: The backend every inspection command uses unless ``--backend`` or ``SSE_CACHE_BACKEND``
#: says otherwise: the proxy's default.
DEFAULT_BACKEND: str = _BACKEND.default

EXIT_OK, EXIT_FAILED, EXIT_UNSUPPORTED = 0, 1, 2

# An entry key is at most this long: a longer alias value is not a key (a corrupt row).
_MAX_KEY_CHARS = 1024
# The length of the keys the default keyer makes (hex BLAKE2b-256 digests), which the
# proxy's access lines shorten to their first 12 characters.
_KEY_CHARS = 64


def register(sub: Any) -> None:
    """Add ``ls``, ``show``, ``purge`` and ``stats`` to the ``sse-cache`` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        default=None,  # then SSE_CACHE_BACKEND, then DEFAULT_BACKEND: see _sync
        metavar="URL",
        help=f"cache backend URL (env {_BACKEND.env}, as for sse-cache proxy; default: "
        f"{DEFAULT_BACKEND}); never created by these commands",
    )
    common.add_argument(
        "--secret",
        default=None,  # then SSE_CACHE_SECRET, as for sse-cache proxy
        type=_SECRET.from_text,
        metavar="TEXT",
        help=f"the secret the entries were written with (MsgpackCodec(secret=...); env "
        f"{_SECRET.env}, as for sse-cache proxy: prefer it to the flag, which ps shows); "
        "entries written with another secret, or with none, are unreadable here",
    )

    ls = sub.add_parser("ls", parents=[common], help="list the keys of the entries in a cache")
    ls.add_argument("--prefix", default="", help="only keys starting with this")
    ls.add_argument(
        "-l", "--long", action="store_true", help="also show size, schema, events and age"
    )
    ls.add_argument(
        "-a",
        "--all",
        action="store_true",
        help="also list the index rows (aliases: another name of an entry)",
    )
    ls.set_defaults(run=_sync(_ls))

    show = sub.add_parser("show", parents=[common], help="print one entry: metadata and events")
    show.add_argument(
        "key",
        help="the entry's key (as `sse-cache ls` prints it), the start of one (as the proxy's "
        "access lines print it), or a whole alias",
    )
    show.add_argument(
        "--sse-only",
        action="store_true",
        help="print only the events, as SSE (no metadata; a stored non-stream answer: its body)",
    )
    show.set_defaults(run=_sync(_show))

    purge = sub.add_parser(
        "purge",
        parents=[common],
        help="delete every entry of a cache, or the given ones and the aliases naming them",
    )
    purge.add_argument(
        "keys", nargs="*", metavar="KEY", help="only these entries (default: everything)"
    )
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=_sync(_purge))

    stats = sub.add_parser("stats", parents=[common], help="count entries, aliases and bytes")
    stats.set_defaults(run=_sync(_stats))


def _sync(
    command: Callable[[argparse.Namespace, Backend], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Open the backend, run ``command`` on asyncio (Redis needs it), close, map errors."""

    def run(args: argparse.Namespace) -> int:
        from ..backends import from_url

        bad_key = _bad_key(args)
        if bad_key:
            return _fail(bad_key, EXIT_UNSUPPORTED)
        # The flag, else SSE_CACHE_BACKEND, else the default: as `sse-cache proxy` reads
        # it, so that these commands look at the cache the proxy beside them uses. (A
        # misspelt SSE_CACHE_BACKEND looked at the default cache without a word.)
        for warning in unknown_variables(os.environ):
            print(f"sse-cache: {warning}", file=sys.stderr)
        from_env = args.backend is None and bool(os.environ.get(_BACKEND.env, "").strip())
        source = _BACKEND.env if from_env else "--backend"
        try:
            args.backend = value_of(_BACKEND, args.backend, os.environ)
            args.secret = value_of(_SECRET, getattr(args, "secret", None), os.environ)
        except ConfigError as exc:  # (it names the variable)
            return _fail(f"bad {exc}", EXIT_UNSUPPORTED)
        try:
            backend = from_url(args.backend, **_existing_only(args.backend, args.command))
        except ConfigError as exc:
            return _fail(f"bad {source}: {exc}", EXIT_UNSUPPORTED)

        async def main() -> int:
            try:
                private = process_private(backend)
                if private:
                    # Opened here it would be a new, empty cache of this command's own, not
                    # the proxy's: every answer about it ("purged 0 entries") about nothing.
                    return _fail(
                        f"{args.command}: {private} lives inside each process: there is "
                        "nothing another process can inspect (a cache to inspect is a "
                        "sqlite:// file or a Redis or memcached server)",
                        EXIT_UNSUPPORTED,
                    )
                return await command(args, backend)
            finally:
                await backend.aclose()

        try:
            return anyio.run(main)
        except BackendFull as exc:
            if args.command != "purge" or not args.backend.lower().startswith("sqlite:"):
                return _fail(f"{args.command} on {_redact(args.backend)}: {exc}", EXIT_FAILED)
            # (The backend's own hint, lowering ?max_bytes=, is the proxy's way out, not
            # this one: helper-164.)
            return _fail(
                f"purge on {_redact(args.backend)}: its disk is full, and deleting needs room "
                f"too (SQLite writes the change to its -wal file first: {exc.__cause__ or exc}); "
                "free some space on that disk, or stop every process that uses the file and "
                "delete it with its -wal and -shm files to start empty",
                EXIT_FAILED,
            )
        except SSECacheError as exc:
            return _fail(f"{args.command} on {_redact(args.backend)}: {exc}", EXIT_FAILED)

    return run


def _bad_key(args: argparse.Namespace) -> str:
    """Why a key or prefix on the command line can be no key, or "". Bytes that are not
    UTF-8 reach Python as lone surrogates (``a\\udcff``), which every backend refuses with a
    ValueError: said here as a usage error, before a backend is opened."""
    given = [("key", getattr(args, "key", None)), ("--prefix", getattr(args, "prefix", None))]
    given += [("KEY", key) for key in getattr(args, "keys", None) or ()]
    for what, key in given:
        if key is not None:
            try:
                check_key(key, what)
            except ValueError as exc:
                return str(exc)
    return ""


#: The commands that only read: they open a SQLite file read-only.
_READING = frozenset({"ls", "show", "stats"})


def _existing_only(url: str, command: str) -> dict[str, Any]:
    # Inspecting a cache must not create one: a mistyped SQLite path is an error, not a new
    # empty file. Only sqlite:// has files to create; an explicit ``create=`` in the URL wins.
    # A command that only reads opens the file read-only: it changes nothing in it (not the
    # access times that order its evictions, nor its journal mode), and reads a file it may
    # not write. An explicit ``readonly=`` or ``create=`` in the URL wins (a cache to create
    # is a file to write).
    try:
        parts = urlsplit(url)
    except ValueError:
        return {}  # (unreadable: from_url says why, as a ConfigError)
    if parts.scheme.lower() != "sqlite":
        return {}
    given = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    options: dict[str, Any] = {}
    if "create" in given:
        return options
    options["create"] = False
    if command in _READING and "readonly" not in given:
        options["readonly"] = True
    return options


def _fail(message: str, code: int, stream: TextIO | None = None) -> int:
    print(f"sse-cache: {message}", file=stream or sys.stderr)
    return code


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_userinfo(url)  # unreadable: all of its user info goes
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
    # (`stats` only where the backend counts its entries: a plugin's may not; helper-156.)
    stats = ", or `sse-cache stats`" if isinstance(backend, StatsBackend) else ""
    return _fail(
        f"{args.command}: {hint}. Use `sse-cache show KEY` for a known key{stats}.",
        EXIT_UNSUPPORTED,
    )


# -- what a stored row is (no I/O) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One stored row, read for what it is: an ``entry`` (``entry`` set, or ``listed`` when
    read for a listing), an ``alias`` (``target``: the key of the entry it names; ``live``:
    a cross-process stream's, which names its producer too, and its entry once stored),
    ``corrupt`` or ``unreadable`` (a sound entry this installation cannot read, e.g.
    zstd-compressed without ``sse-cache[zstd]``: not to be purged as corrupt); ``error`` says
    why."""

    kind: Literal["entry", "alias", "corrupt", "unreadable"]
    entry: Entry | None = None
    listed: WireEntry | None = None
    target: str = ""
    error: str = ""
    live: bool = False


def is_alias(key: str) -> bool:
    """Whether ``key`` is an alias (index row) by its name; :func:`read_row` checks its value."""
    return key.startswith(ALIAS_PREFIX)


def _codec(args: argparse.Namespace) -> MsgpackCodec:
    """The codec that reads the entries as the proxy given the same ``--secret`` does: an
    entry written without it is not read (the proxy deletes it as corrupt)."""
    return MsgpackCodec(secret=secret_bytes(getattr(args, "secret", None)))


def read_row(key: str, data: bytes, codec: MsgpackCodec, *, listing: bool = False) -> Row:
    """What the value ``data`` stored under ``key`` is. ``listing`` reads an entry as an
    instant hit does (:meth:`MsgpackCodec.decode_wire`: its head and its SSE bytes, no
    ``Event`` built), which is what a listing needs: a whole decode of a 43 MB entry took
    ~90 MB of Python objects (helper-96)."""
    if is_alias(key):
        try:
            target = data.decode("ascii")
        except UnicodeDecodeError:
            return Row("corrupt", error="an alias whose value is not an ASCII key")
        if not target or len(target) > _MAX_KEY_CHARS or not target.isprintable():
            return Row("corrupt", error="an alias whose value is not a key")
        # A live alias (a Responses stream produced by another process, for a resume by
        # id) holds its stream's key and its producer's lease token: it names that entry.
        # (By the token's form: a key of a custom keyer may hold a space.)
        channel = parse_live_alias_target(target)
        if channel is not None:
            return Row("alias", target=channel[0], live=True)
        return Row("alias", target=target)
    try:
        if listing:
            return Row("entry", listed=codec.decode_wire(data))
        return Row("entry", entry=codec.decode(data))
    except UnreadableEntry as exc:
        return Row("unreadable", error=str(exc))
    except CorruptEntry as exc:
        if codec.checksum_refused(data):
            # Sound but for its checksum: written with a secret this codec does not have (a
            # MAC, not a checksum), which the processes that wrote it read, or altered. Not
            # called corrupt: it may be a fleet's entry, not one to purge.
            return Row("unreadable", error=_MAC_MISMATCH)
        return Row("corrupt", error=str(exc))


#: Why a sound entry whose checksum does not match is unreadable here.
_MAC_MISMATCH = (
    "its checksum does not match: altered since it was written, or written with a secret "
    f"not given here (MsgpackCodec(secret=...): give it with {_SECRET.env} or --secret)"
)


async def stored(
    backend: Backend, key: str, codec: MsgpackCodec, *, listing: bool = False
) -> tuple[bytes, Row] | None:
    """The value stored under ``key`` and what it is (``listing``: see :func:`read_row`);
    None when there is none. A value the backend cannot return as bytes (another writer's
    text column or Redis list) is a corrupt row with no bytes."""
    try:
        data = await backend.get(key)
    except CorruptEntry as exc:
        return b"", Row("corrupt", error=str(exc))
    return None if data is None else (data, read_row(key, data, codec, listing=listing))


async def present(backend: Backend, key: str) -> bool:
    """Whether anything is stored under ``key`` (read, not decoded; a value the backend
    cannot return as bytes is there too)."""
    try:
        return await backend.get(key) is not None
    except CorruptEntry:
        return True


# -- the commands -----------------------------------------------------------------------------


async def _ls(args: argparse.Namespace, backend: Backend) -> int:
    if not isinstance(backend, ScanningBackend):
        return _cannot_list(args, backend)
    codec = _codec(args)
    now = time.time()
    entries = aliases = corrupt = unreadable = 0
    async for key in backend.scan(args.prefix):
        alias = is_alias(key)
        if alias and not args.all:
            aliases += 1  # (by its name: not read, so not known to be corrupt)
            continue
        foreign = _not_a_key(key)
        if not args.long:
            print(_shown(key) if foreign else key)
            continue
        if foreign:
            # A key under the prefix that another program wrote, not UTF-8 (helper-97:
            # its read raised ValueError, a traceback that ended the listing).
            unreadable += 1
            print(f"{_shown(key)}\t-\tUNREADABLE\t{foreign}")
            continue
        found = await stored(backend, key, codec, listing=True)
        if found is None:
            continue  # expired or deleted since the scan saw it
        # Each row read is counted once, as what it is: a corrupt alias is corrupt.
        data, row = found
        if row.kind == "alias":
            aliases += 1
            gone = not await present(backend, row.target)
            kind = "live-alias" if row.live else "alias"
            print(f"{key}\t{len(data)}\t{kind}\t{row.target}" + ("\tdangling" if gone else ""))
        elif row.listed is not None:
            entries += 1
            entry = row.listed
            kind = f"{entry.count} events" if entry.is_stream else "body"
            print(f"{key}\t{len(data)}\t{entry.schema}\t{kind}\t{_age(now - entry.created_at)}")
        elif row.kind == "unreadable":
            unreadable += 1
            print(f"{key}\t{len(data)}\tUNREADABLE\t{row.error}")
        else:
            corrupt += 1
            print(f"{key}\t{len(data)}\tCORRUPT")
    if args.long:
        summary = _plural(entries, "entry", "entries")
        if corrupt:
            summary += f", {corrupt} corrupt"
        if unreadable:
            summary += f", {unreadable} unreadable here"
        if aliases:
            summary += f", {_plural(aliases, 'alias', 'aliases')}"
            summary += "" if args.all else " (not listed; -a lists them)"
        print(summary, file=sys.stderr)
    return EXIT_OK


def _not_a_key(key: str) -> str:
    """Why ``key`` (as a backend listed it) cannot be read through it, or "": bytes that
    are not UTF-8 come as lone surrogates, which no backend takes."""
    try:
        check_key(key)
    except ValueError:
        return "its key is not UTF-8 (another program's?): no cache reads or writes it"
    return ""


def _shown(key: str) -> str:
    """``key`` printable whatever its bytes: those that are not UTF-8 as ``\\xff``."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


async def _unique_key(backend: Backend, prefix: str) -> str | list[str]:
    """The one entry key starting with ``prefix`` (as the proxy's access lines print keys:
    12 characters), or the keys found when there are none or several (at most 3)."""
    found: list[str] = []
    if prefix and isinstance(backend, ScanningBackend):
        async for key in backend.scan(prefix):
            # (Not a key that is not UTF-8, another program's: no backend reads it.)
            if not is_alias(key) and not _not_a_key(key):
                found.append(key)
                if len(found) == 3:
                    break
    return found[0] if len(found) == 1 else found


def _may_be_a_key_start(text: str) -> bool:
    """Whether ``text`` may be the start of a key, as the access lines print keys: hex
    digits, fewer than a whole key has."""
    return 0 < len(text) < _KEY_CHARS and all(c in "0123456789abcdef" for c in text)


async def _find(
    args: argparse.Namespace,
    backend: Backend,
    given: str,
    codec: MsgpackCodec,
    *,
    listing: bool = False,
    told: str = "",
) -> tuple[str, tuple[bytes, Row]] | int:
    """The row ``given`` names — a whole key, an alias, or the start of one key as the
    access lines print keys — with its whole key; else the exit code of the failure, said
    (``told`` ends each message)."""
    key = given
    found = await stored(backend, key, codec, listing=listing)
    if found is None:
        unique = await _unique_key(backend, key)
        if isinstance(unique, str):
            key, found = unique, await stored(backend, unique, codec, listing=listing)
        elif unique:
            return _fail(
                f"key {given!r} is the start of several entries' keys ({', '.join(unique[:2])}"
                f"{', ...' if len(unique) > 2 else ''}): give more of it{told}",
                EXIT_FAILED,
            )
    if found is None and not isinstance(backend, ScanningBackend) and _may_be_a_key_start(key):
        # Not "no entry": the entry may well be there, under the whole key.
        scheme = urlsplit(args.backend).scheme.lower()
        return _fail(
            f"{scheme}:// cannot resolve a key prefix (it cannot list keys): give the whole "
            f"key, as the x-sse-cache-key header has it{told}",
            EXIT_UNSUPPORTED,
        )
    if found is None:
        return _fail(f"no entry with key {given!r} in {_redact(args.backend)}{told}", EXIT_FAILED)
    return key, found


async def _show(args: argparse.Namespace, backend: Backend) -> int:
    codec = _codec(args)
    key = args.key
    resolved = await _find(args, backend, key, codec)
    if isinstance(resolved, int):
        return resolved
    key, (data, row) = resolved
    out = sys.stdout
    if row.kind == "alias":
        if not args.sse_only:
            kind = (
                "live alias (names a stream another process produced, for a resume by id: "
                "its entry once stored)"
                if row.live
                else "alias (another name of the entry it names)"
            )
            _print_rows(out, [("key", key), ("kind", kind), ("names", row.target)])
            out.write("\n")
            out.flush()
        key, named = row.target, await stored(backend, row.target, codec)
        if named is None:
            why = (
                "not stored (yet: its stream may still be live; or it failed, or expired)"
                if row.live
                else "not in the cache (expired, evicted or purged)"
            )
            return _fail(
                f"alias {args.key!r} names entry {row.target!r}, which is {why}", EXIT_FAILED
            )
        data, row = named
    if row.entry is None:
        return _fail(f"entry {key!r} is {row.kind}: {row.error}", EXIT_FAILED)
    entry = row.entry
    if not args.sse_only:
        _print_metadata(out, key, entry, len(data))
        out.write("\n")
    if entry.events is not None:
        sse = entry.wire if entry.wire is not None else serialize_sse(entry.events)
        _write_in_slices(out, sse.decode("utf-8", "replace"))
    elif entry.body is not None:
        _write_in_slices(out, entry.body.decode("utf-8", "replace"))
        out.write("\n")
    out.flush()
    return EXIT_OK


#: Characters written to stdout at a time by ``show``.
_SLICE = 64 * 1024


def _write_in_slices(out: TextIO, text: str) -> None:
    # One write of megabytes into a pipe whose reader leaves (`show KEY --sse-only | head`)
    # ended the process with 0 and the output cut (helper-97): written a slice at a time,
    # the next write after the reader left raises BrokenPipeError (exit 141, as `ls | head`).
    for start in range(0, len(text), _SLICE):
        out.write(text[start : start + _SLICE])


def _print_metadata(out: TextIO, key: str, entry: Entry, stored: int) -> None:
    rows = [
        ("key", key),
        ("schema", entry.schema),
        ("status", str(entry.status)),
        ("content-type", entry.content_type),
        (
            "created",
            f"{_when(entry.created_at)} ({_age(time.time() - entry.created_at)} ago)",
        ),
        ("format", f"v{entry.version}"),
    ]
    if entry.expires_at is not None:
        left = entry.expires_at - time.time()
        due = f"in {_age(left)}" if left > 0 else "expired"
        rows.append(("expires", f"{_when(entry.expires_at)} ({due})"))
    rows.append(("stored bytes", str(stored)))
    if entry.events is not None:
        duration = entry.events[-1].at if entry.events else 0.0
        rows.append(("events", f"{len(entry.events)} over {duration:.3f} s"))
        framing = "canonical, " + entry.eol.upper() if entry.wire is None else "as received"
        rows.append(("framing", framing))
    else:
        rows.append(("body bytes", str(len(entry.body or b""))))
    rows.extend((f"meta.{name}", value) for name, value in sorted(entry.meta.items()))
    _print_rows(out, rows)


def _print_rows(out: TextIO, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        out.write(f"{name + ':':<{width}} {value}\n")


def _when(timestamp: float) -> str:
    # An entry's times are finite (the codec checks), but anyone who can write to the cache
    # can store a sound entry dated in the year 10^12.
    try:
        return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{timestamp!r} (not a date)"


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


async def _count_aliases(backend: ScanningBackend) -> int:
    # By name: an alias row's key says what it is, so its value need not be read.
    return sum([1 async for _ in backend.scan(ALIAS_PREFIX)])


async def _confirm(question: str) -> bool | None:
    """Whether the answer to ``question`` is yes (the end of input is no); None when Ctrl-C
    was pressed instead."""
    prompt = f"{question} [y/N] "
    loop = asyncio.get_running_loop()
    # The line typed, or None for Ctrl-C: whichever comes first.
    answer: asyncio.Future[str | None] = loop.create_future()
    typed = bytearray()

    def on_readable() -> None:
        try:
            chunk = os.read(stdin, 1024)
        except (BlockingIOError, InterruptedError):
            return  # (a stdin another process made non-blocking: read again when ready)
        except OSError as exc:
            if not answer.done():
                answer.set_exception(exc)
            return
        typed.extend(chunk)
        if (not chunk or b"\n" in chunk) and not answer.done():
            answer.set_result(typed.split(b"\n", 1)[0].decode(errors="replace"))

    def on_ctrl_c() -> None:
        if not answer.done():
            answer.set_result(None)

    # The answer is read by the event loop, not by input() in a thread: input() cannot be
    # interrupted, and after Ctrl-C its thread kept the process alive until Enter or the end
    # of input (and a daemon thread blocked in sys.stdin aborts the interpreter's exit).
    try:
        stdin = sys.stdin.fileno()
        loop.add_reader(stdin, on_readable)
    except (AttributeError, OSError, ValueError, NotImplementedError):
        # Not something to wait on: a file (epoll refuses those: they never block), no file
        # at all (a test's StringIO), or an event loop that cannot watch it (Windows).
        try:
            return _is_yes(await anyio.to_thread.run_sync(input, prompt))
        except EOFError:
            return False
    # Ctrl-C is taken as an answer, from before the question is seen. Left to asyncio, it
    # would cancel the command and raise KeyboardInterrupt.
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
        catching = True
    except (NotImplementedError, RuntimeError, ValueError):
        catching = False  # (not the main thread: Ctrl-C stays a KeyboardInterrupt)
    try:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        line = await answer
    finally:
        loop.remove_reader(stdin)
        if catching:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)
    return None if line is None else _is_yes(line)


def _is_yes(line: str) -> bool:
    return line.strip().lower() in ("y", "yes")


async def _declined(args: argparse.Namespace, question: str) -> int | None:
    """Ask ``question`` unless ``--yes`` was given: None to go on, else the exit code of a
    purge that stops here, with nothing deleted."""
    if args.yes:
        return None
    answer = await _confirm(question)
    if answer is None:
        print(flush=True)  # ends the prompt's line
        return _fail("interrupted: nothing deleted", INTERRUPTED_EXIT)
    if not answer:
        return _fail("purge cancelled (nothing deleted); pass --yes to skip the question", 1)
    return None


async def _purge(args: argparse.Namespace, backend: Backend) -> int:
    if args.keys:
        return await _purge_keys(args, backend)
    if not isinstance(backend, ScanningBackend):
        return _cannot_list(args, backend)
    where = _redact(args.backend)
    declined = await _declined(args, f"Delete every entry in {where}?")
    if declined is not None:
        return declined
    aliases = await _count_aliases(backend)
    # clear() removes every row, aliases with their entries: nothing is left dangling.
    count = await backend.clear()
    aliases = min(aliases, count)
    print(
        f"purged {_plural(count - aliases, 'entry', 'entries')} "
        f"and {_plural(aliases, 'alias', 'aliases')} from {where}"
    )
    return EXIT_OK


async def _purge_keys(args: argparse.Namespace, backend: Backend) -> int:
    # On a backend that cannot list its keys (memcached) the keys given go, and the entry an
    # alias given names; other aliases naming them cannot be found: they are left to expire
    # (a resume by id through one finds no entry, and the upstream answers). It refused
    # every purge, and nothing else deletes a known bad entry there (helper-126).
    codec = _codec(args)
    where = _redact(args.backend)
    # Every key first: an alias given stands for the entry it names; a key that is not in
    # the cache stops the purge before anything is deleted.
    entries: dict[str, None] = {}  # ordered sets
    aliases: dict[str, None] = {}
    named: set[str] = set()  # the keys whose aliases go too
    for given in args.keys:
        # The start of a key too, as the access lines print it (12 characters), as `show`
        # takes it: refused as "no entry" before, though one was there (helper-156).
        resolved = await _find(args, backend, given, codec, listing=True, told=" (nothing deleted)")
        if isinstance(resolved, int):
            return resolved
        key, (_, row) = resolved
        if key != given:
            print(f"{given}: {key}", file=sys.stderr)  # (the whole key it stands for)
        if row.kind == "alias":
            aliases[key] = None
            named.add(row.target)
            if await present(backend, row.target):
                entries[row.target] = None
        else:
            entries[key] = None
            named.add(key)
    if isinstance(backend, ScanningBackend):
        async for alias in backend.scan(ALIAS_PREFIX):
            if _not_a_key(alias):
                continue  # not UTF-8, another program's: no backend reads it (nor wrote it)
            found = None if alias in aliases else await stored(backend, alias, codec)
            if found is not None and found[1].target in named:
                aliases[alias] = None
    else:
        print(
            f"sse-cache: {type(backend).__name__} cannot list its keys: other aliases naming "
            "these entries are not found, and expire with their TTL",
            file=sys.stderr,
        )
    what = (
        f"{_plural(len(entries), 'entry', 'entries')} "
        f"and {_plural(len(aliases), 'alias', 'aliases')}"
    )
    declined = await _declined(args, f"Delete {what} from {where}?")
    if declined is not None:
        return declined
    # Aliases first: if a delete fails midway, no alias is left naming a deleted entry.
    for alias in aliases:
        await backend.delete(alias)
    for key in entries:
        await backend.delete(key)
    print(f"purged {what} from {where}")
    return EXIT_OK


async def _stats(args: argparse.Namespace, backend: Backend) -> int:
    if not isinstance(backend, StatsBackend):
        return _fail(f"stats: {type(backend).__name__} cannot count its entries", 2)
    figures = dict(await backend.stats())
    if isinstance(backend, ScanningBackend):
        # Counted as `ls` lists them: live rows (the backend's own count has the expired
        # ones not purged yet: SQLite's did, helper-97), aliases apart from entries.
        rows = aliases = 0
        async for key in backend.scan():  # (one pass: aliases are known by their keys)
            rows += 1
            aliases += is_alias(key)
        figures.pop("entries", None)
        figures = {"entries": max(rows - aliases, 0), "aliases": aliases} | figures
    print(f"backend: {_redact(args.backend)}")
    width = max((len(name) for name in figures), default=0) + 1
    for name, value in figures.items():
        print(f"{name + ':':<{width}} {value}")
    return EXIT_OK

"""``sse-cache ls | show | purge | stats | --version`` against real SQLite files (Redis for the
index rows on another backend, memcached for the "cannot list keys" answer)."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from sse_cache import StreamCache
from sse_cache.adapters import OpenAIResponses
from sse_cache.backends import from_url
from sse_cache.cli import inspect, main
from sse_cache.codec import MsgpackCodec
from sse_cache.entry import Entry
from sse_cache.errors import SSECacheError
from sse_cache.events import Event, serialize_sse
from sse_cache.http.service import alias_key

EVENTS = (
    Event(data='{"type":"response.created"}', event="response.created", at=0.0),
    Event(data='{"delta":"Hel"}', event="response.output_text.delta", at=0.01),
    Event(data="line one\nline two", id="7", at=0.02),
    Event(data='{"type":"response.completed"}', event="response.completed", at=0.25),
)


# Entries gained an optional expiry time; show prints it when the entry has one.
EXPIRY = (
    {"expires_at": time.time() + 3 * 3600 + 60} if "expires_at" in Entry.__struct_fields__ else {}
)


def run_cli(*argv: str) -> int:
    # Only the inspection subcommands: the real parser also registers the demo and proxy.
    parser = argparse.ArgumentParser(prog="sse-cache")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect.register(sub)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


def store(url: str, entries: dict[str, bytes]) -> None:
    async def main() -> None:
        backend = from_url(url)
        try:
            for key, value in entries.items():
                await backend.set(key, value, None)
        finally:
            await backend.aclose()

    anyio.run(main)


@pytest.fixture
def db(tmp_path: Path) -> str:
    codec = MsgpackCodec()
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    store(
        url,
        {
            "aaa111": codec.encode(
                Entry(
                    schema="openai.responses",
                    created_at=time.time() - 90,
                    events=EVENTS,
                    meta={"response_id": "resp_1"},
                    **EXPIRY,
                )
            ),
            "bbb222": codec.encode(
                Entry(
                    schema="openai.chat",
                    created_at=time.time(),
                    content_type="application/json",
                    body=b'{"id":"chatcmpl-1"}',
                )
            ),
            "ccc333": b"not an entry at all",
        },
    )
    return url


def test_ls_lists_keys(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["aaa111", "bbb222", "ccc333"]
    assert run_cli("ls", "--backend", db, "--prefix", "bb") == 0
    assert capsys.readouterr().out.split() == ["bbb222"]


def test_ls_long(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("ls", "-l", "--backend", db) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("aaa111\t") and "openai.responses\t4 events\t90s" in lines[0]
    assert "openai.chat\tbody" in lines[1]
    assert lines[2].endswith("CORRUPT")


def test_ls_long_holds_one_entrys_bytes_not_its_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An operator lists a cache of long answers: each entry is read as a hit reads it (its
    # SSE bytes), not rebuilt as Event objects, which took three times its SSE size
    # (helper-96: three 43 MB entries, 265 MB of RSS).
    url = f"sqlite:///{tmp_path / 'long.db'}"
    events = tuple(
        Event(data=f'{{"delta":"word {i}"}}', event="response.output_text.delta", at=i / 1e3)
        for i in range(50_000)
    )
    sse_size = len(serialize_sse(events))
    entry = Entry(
        schema="openai.responses",
        created_at=time.time(),
        status=200,
        content_type="text/event-stream",
        events=events,
    )
    store(url, {"long": MsgpackCodec().encode(entry)})
    del events, entry
    tracemalloc.start()
    try:
        assert run_cli("ls", "-l", "--backend", url) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "openai.responses\t50000 events" in capsys.readouterr().out
    assert peak < 2 * sse_size, (peak, sse_size)


def test_show_prints_metadata_then_sse(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("show", "aaa111", "--backend", db) == 0
    out = capsys.readouterr().out
    head, _, sse = out.partition("\n\n")
    assert "schema:" in head and "openai.responses" in head
    assert "events:" in head and "4 over 0.250 s" in head
    assert "meta.response_id: resp_1" in head
    assert "status:" in head and "200" in head
    if EXPIRY:
        assert "expires:" in head and "(in 3h)" in head
    assert sse.encode() == serialize_sse(EVENTS)


def test_show_sse_only_and_body(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("show", "aaa111", "--sse-only", "--backend", db) == 0
    assert capsys.readouterr().out.encode() == serialize_sse(EVENTS)
    assert run_cli("show", "bbb222", "--backend", db) == 0
    out = capsys.readouterr().out
    assert "application/json" in out and out.rstrip().endswith('{"id":"chatcmpl-1"}')


def test_show_gives_a_stream_stored_as_its_bytes_as_they_came(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wire = b"data: a\nid: 1\n\n: ping\n\ndata: b\n\n"
    entry = Entry(
        schema="generic", created_at=0.0, events=(Event("a", id="1"), Event("b")), wire=wire
    )
    store(db, {"ddd444": MsgpackCodec().encode(entry)})
    assert run_cli("show", "ddd444", "--sse-only", "--backend", db) == 0
    assert capsys.readouterr().out.encode() == wire
    assert run_cli("show", "ddd444", "--backend", db) == 0
    assert "framing:" in capsys.readouterr().out.split("\n\n")[0]
    assert run_cli("show", "aaa111", "--backend", db) == 0
    assert "\nframing:          canonical, LF\n" in capsys.readouterr().out


def test_show_takes_the_start_of_a_key_as_access_lines_print_it(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("show", "aaa1", "--sse-only", "--backend", db) == 0
    assert capsys.readouterr().out.encode() == serialize_sse(EVENTS)
    assert run_cli("show", "bb", "--backend", db) == 0
    assert "key:          bbb222" in capsys.readouterr().out
    # The start of several keys names none of them: never the wrong entry.
    store(db, {"aaa122": MsgpackCodec().encode(Entry(schema="x", created_at=0.0, body=b"{}"))})
    assert run_cli("show", "aaa1", "--backend", db) == 1
    err = capsys.readouterr().err
    assert "'aaa1' is the start of several entries' keys (aaa111, aaa122): give more" in err
    assert run_cli("show", "aaa12", "--sse-only", "--backend", db) == 0
    assert capsys.readouterr().out == "{}\n"


def test_purge_takes_the_start_of_a_key_as_access_lines_print_it(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The access line's 12 characters were refused as "no entry with key" though the entry
    # was there (helper-156). The start of several keys deletes nothing.
    store(db, {"aaa122": MsgpackCodec().encode(Entry(schema="x", created_at=0.0, body=b"{}"))})
    assert run_cli("purge", "aaa1", "--yes", "--backend", db) == 1
    err = capsys.readouterr().err
    assert "'aaa1' is the start of several entries' keys (aaa111, aaa122)" in err
    assert "nothing deleted" in err
    assert run_cli("purge", "aaa12", "--yes", "--backend", db) == 0
    captured = capsys.readouterr()
    assert "purged 1 entry and 0 aliases" in captured.out and "aaa12: aaa122" in captured.err
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["aaa111", "bbb222", "ccc333"]


def test_show_missing_and_corrupt(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("show", "nope", "--backend", db) == 1
    assert "no entry with key 'nope'" in capsys.readouterr().err
    assert run_cli("show", "ccc333", "--backend", db) == 1
    assert "corrupt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text", ["'text'", "CAST(X'53534543ff' AS TEXT)"], ids=["utf-8", "not-utf-8"]
)
def test_a_row_another_program_gave_other_types_is_listed_shown_and_purged(
    db: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A text value written over an entry by the sqlite3 shell: every command goes on, and
    # purge can remove it. (Text that is not UTF-8, what a bit flipped on disk makes of a
    # value, stopped `ls -l` at that row: sqlite3 could not decode it; helper-148.)
    path = db.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as raw, raw:
        raw.execute(f"UPDATE sse_cache_entries SET value = {text} WHERE key = 'aaa111'")
    assert run_cli("ls", "-l", "--backend", db) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "aaa111\t0\tCORRUPT" and "openai.chat\tbody" in lines[1]
    assert run_cli("show", "aaa111", "--backend", db) == 1
    assert "aaa111' is corrupt: the row of 'aaa111' holds str" in capsys.readouterr().err
    assert run_cli("purge", "aaa111", "--yes", "--backend", db) == 0
    assert "purged 1 entry" in capsys.readouterr().out
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["bbb222", "ccc333"]


def test_an_entry_this_installation_cannot_read_is_listed_unreadable_not_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written by a process with zstandard, inspected by a CLI without it: sound, and the
    # writers' to read; not one to purge as corrupt.
    import sse_cache.codec

    url = f"sqlite:///{tmp_path / 'cache.db'}"
    entry = Entry(schema="generic", created_at=time.time(), body=b"x" * 5000)
    store(url, {"k": MsgpackCodec(compression="zstd").encode(entry)})
    monkeypatch.setattr(sse_cache.codec, "_zstd", None)
    assert run_cli("ls", "-l", "--backend", url) == 0
    captured = capsys.readouterr()
    assert captured.out.split("\t")[2:] == [
        "UNREADABLE",
        "entry is zstd-compressed; install sse-cache[zstd]\n",
    ]
    assert "1 unreadable here" in captured.err
    assert run_cli("show", "k", "--backend", url) == 1
    assert "entry 'k' is unreadable: entry is zstd-compressed" in capsys.readouterr().err


def test_entries_written_with_a_secret_are_unreadable_without_it_and_read_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache written with MsgpackCodec(secret=...): its sound entries were listed CORRUPT
    # (inviting a purge of a healthy cache), and nothing could give the commands the secret
    # (helper-97). Given as the proxy takes it (SSE_CACHE_SECRET, or --secret), they read.
    monkeypatch.delenv("SSE_CACHE_SECRET", raising=False)
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    secret = MsgpackCodec(secret=b"fleet secret")
    entry = Entry(schema="generic", created_at=time.time(), events=EVENTS)
    store(
        url,
        {
            "k1": secret.encode(entry),
            "k2": MsgpackCodec().encode(entry),  # (the proxy with the secret deletes it)
            "k3": secret.encode(entry)[:-1],  # truncated: corrupt whatever the secret
        },
    )
    assert run_cli("ls", "-l", "--backend", url) == 0
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0][2] == "UNREADABLE" and "SSE_CACHE_SECRET" in rows[0][3]
    assert rows[1][2:4] == ["generic", "4 events"]
    assert rows[2][2] == "CORRUPT"
    assert err == "1 entry, 1 corrupt, 1 unreadable here\n"
    assert run_cli("show", "k1", "--backend", url) == 1
    assert "entry 'k1' is unreadable: its checksum does not match" in capsys.readouterr().err
    for given in (["--secret", "fleet secret"], []):
        if not given:
            monkeypatch.setenv("SSE_CACHE_SECRET", "fleet secret")
        assert run_cli("ls", "-l", *given, "--backend", url) == 0
        out, err = capsys.readouterr()
        # As the proxy given the secret reads them (helper-99: k2 was listed sound, which
        # that proxy deletes as corrupt).
        assert [line.split("\t")[2] for line in out.splitlines()] == [
            "generic",
            "UNREADABLE",
            "CORRUPT",
        ]
        assert run_cli("show", "k1", "--sse-only", *given, "--backend", url) == 0
        assert capsys.readouterr().out == serialize_sse(EVENTS).decode()
    # Another secret: unreadable again, never corrupt.
    assert run_cli("ls", "-l", "--secret", "another", "--backend", url) == 0
    assert capsys.readouterr().out.split("\n")[0].split("\t")[2] == "UNREADABLE"
    monkeypatch.setenv("SSE_CACHE_SECRET", "x" * 65)
    assert run_cli("ls", "--backend", url) == 2
    assert "SSE_CACHE_SECRET: expected a secret of 1 to 64 bytes" in capsys.readouterr().err
    # Space at either end would key another MAC than the same text without it (the
    # variable's value was stripped, the flag's not: with --workers N the flag reaches the
    # workers by the variable, and the cache was emptied one request at a time; helper-99).
    monkeypatch.setenv("SSE_CACHE_SECRET", " fleet secret ")
    assert run_cli("ls", "--backend", url) == 2
    assert "a secret cannot begin or end with whitespace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        run_cli("ls", "--secret", " fleet secret", "--backend", url)
    assert usage.value.code == 2
    assert "cannot begin or end with whitespace" in capsys.readouterr().err
    monkeypatch.setenv("SSE_CACHE_SECRET", "   ")  # set but blank: not "no secret"
    assert run_cli("ls", "--backend", url) == 2
    assert "bad SSE_CACHE_SECRET: set but blank" in capsys.readouterr().err


def test_show_an_entry_dated_past_any_calendar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Sound, finite, and no date: anyone who can write to the cache can store it.
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    entry = Entry(
        schema="generic", created_at=1e20, body=b"{}", **({"expires_at": 2e20} if EXPIRY else {})
    )
    store(url, {"k": MsgpackCodec().encode(entry)})
    assert run_cli("show", "k", "--backend", url) == 0
    assert "created:      1e+20 (not a date)" in capsys.readouterr().out


def test_stats(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("stats", "--backend", db) == 0
    out = capsys.readouterr().out
    figures = dict(line.split(":", 1) for line in out.splitlines()[1:])
    assert int(figures["entries"]) == 3
    assert int(figures["bytes"]) > 100


def test_stats_counts_what_ls_lists_not_expired_rows(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rows expired but not purged yet (SQLite deletes them at a later write) were counted as
    # entries, and expired aliases as entries too (helper-97).
    value = MsgpackCodec().encode(Entry(schema="g", created_at=time.time(), body=b"b"))

    async def write_in_the_past() -> None:
        backend = from_url(db, clock=lambda: time.time() - 100)
        try:
            for i in range(4):
                await backend.set(f"old{i}", value, 1)  # expired 99 s ago
                alias = alias_key(OpenAIResponses().name, "t:tenant", f"resp_old{i}")
                await backend.set(alias, f"old{i}".encode(), 1)
        finally:
            await backend.aclose()

    add_aliases(db, {"resp_live": "aaa111"})
    anyio.run(write_in_the_past)  # (last: a write with today's clock purges them)
    assert run_cli("ls", "-a", "--backend", db) == 0
    listed = capsys.readouterr().out.split()
    assert len(listed) == 4  # aaa111, bbb222, ccc333 and the live alias
    assert run_cli("stats", "--backend", db) == 0
    figures = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert (int(figures["entries"]), int(figures["aliases"])) == (3, 1)


def test_purge_with_yes(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("purge", "--yes", "--backend", db) == 0
    assert "purged 3 entries" in capsys.readouterr().out
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("answer", "code", "left"), [("y\n", 0, 0), ("n\n", 1, 3), ("", 1, 3)])
def test_purge_asks_first(
    db: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    code: int,
    left: int,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(answer))
    assert run_cli("purge", "--backend", db) == code
    assert "Delete every entry" in capsys.readouterr().out
    run_cli("ls", "--backend", db)
    assert len(capsys.readouterr().out.split()) == left


def test_default_backend_is_sqlite_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    store(inspect.DEFAULT_BACKEND, {"k1": b"x"})
    assert (tmp_path / "sse-cache.db").exists()
    assert run_cli("ls") == 0
    assert capsys.readouterr().out.split() == ["k1"]


@pytest.mark.parametrize("command", [("ls",), ("show", "aaa111"), ("stats",), ("purge", "-y")])
def test_the_backend_is_read_from_sse_cache_backend_as_the_proxy_reads_it(
    command: tuple[str, ...],
    db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An operator who ran the proxy with SSE_CACHE_BACKEND=... and then `sse-cache ls`
    # inspected the default SQLite file of the working directory instead.
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SSE_CACHE_BACKEND", db)
    assert run_cli(*command) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    # ls and show print the entry; stats and purge name the cache they looked at.
    assert "aaa111" in out if command[0] in ("ls", "show") else db in out, out
    assert not (workdir / "sse-cache.db").exists()


def test_a_misspelt_sse_cache_backend_is_said(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # It looked at the default cache of the working directory without a word (helper-126).
    monkeypatch.delenv("SSE_CACHE_BACKEND", raising=False)
    monkeypatch.setenv("SSE_CACHE_BACKNED", db)
    monkeypatch.chdir(tmp_path)
    assert run_cli("ls") == 1
    err = capsys.readouterr().err
    assert "ignoring SSE_CACHE_BACKNED: not an option (did you mean SSE_CACHE_BACKEND?)" in err
    assert "sse-cache.db' does not exist" in err


def test_the_backend_flag_wins_over_sse_cache_backend(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    store(other, {"zzz999": b"x"})
    monkeypatch.setenv("SSE_CACHE_BACKEND", db)
    assert run_cli("ls", "--backend", other) == 0
    assert capsys.readouterr().out.split() == ["zzz999"]
    monkeypatch.setenv("SSE_CACHE_BACKEND", "")  # empty: unset, as for the proxy
    monkeypatch.chdir(tmp_path)
    assert run_cli("ls") == 1
    assert "sse-cache.db' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cache.db", "bad SSE_CACHE_BACKEND: expected a backend URL (sqlite:///cache.db"),
        ("nosuch://x", "bad SSE_CACHE_BACKEND: unknown backend URL scheme 'nosuch'"),
        ("redis://:hunter2@[::1", "bad SSE_CACHE_BACKEND: redis:// URL: "),
    ],
)
def test_a_bad_sse_cache_backend_is_a_usage_error_naming_it(
    value: str, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SSE_CACHE_BACKEND", value)
    assert run_cli("stats") == inspect.EXIT_UNSUPPORTED
    err = capsys.readouterr().err
    assert err.startswith(f"sse-cache: {expected}") and "hunter2" not in err


def test_bad_backend_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("ls", "--backend", "nosuch://x") == 2
    err = capsys.readouterr().err
    assert "unknown backend URL scheme 'nosuch'" in err and "sqlite://" in err


def test_storage_error_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database file" * 100)
    assert run_cli("stats", "--backend", f"sqlite:///{bad}") == 1
    assert "stats on sqlite:///" in capsys.readouterr().err


def test_memcached_cannot_list(memcached_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memcached://{memcached_server.address}?prefix=clitest:"
    assert run_cli("ls", "--backend", url) == 2
    assert "memcached has no way to list its keys" in capsys.readouterr().err
    assert run_cli("purge", "--yes", "--backend", url) == 2
    assert "memcached has no way to list its keys" in capsys.readouterr().err
    store(url, {"known": MsgpackCodec().encode(Entry(schema="g", created_at=0.0, body=b"b"))})
    assert run_cli("show", "known", "--backend", url) == 0
    assert "schema:" in capsys.readouterr().out
    assert run_cli("stats", "--backend", url) == 0
    assert "entries:" in capsys.readouterr().out


def test_purge_of_known_keys_where_keys_cannot_be_listed(
    memcached_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every purge was refused: nothing deleted a known bad entry on memcached (helper-126).
    # The keys given go (an alias given: with the entry it names); other aliases naming
    # them cannot be found, and it says so.
    url = f"memcached://{memcached_server.address}?prefix=clipurge:"
    entry = MsgpackCodec().encode(Entry(schema="g", created_at=0.0, body=b"b"))
    store(url, {"k1": entry, "k2": entry, "k3": entry})
    (alias,) = add_aliases(url, {"resp_2": "k2"}).values()
    assert run_cli("purge", "k1", "nope", "--yes", "--backend", url) == 1
    assert "no entry with key 'nope'" in capsys.readouterr().err
    assert run_cli("show", "k1", "--backend", url) == 0  # nothing deleted
    capsys.readouterr()
    assert run_cli("purge", "k1", alias, "--yes", "--backend", url) == 0
    out, err = capsys.readouterr()
    assert "purged 2 entries and 1 alias" in out
    assert "cannot list its keys: other aliases naming these entries are not found" in err
    for gone in ("k1", "k2", alias):
        assert run_cli("show", gone, "--backend", url) == 1
    assert run_cli("show", "k3", "--backend", url) == 0


def test_redis_password_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    # An unreachable Redis: the error names the URL without its password.
    url = "redis://user:s3cret@127.0.0.1:1/0?timeout=0.2"
    assert run_cli("stats", "--backend", url) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err and "***" in err


# -- index rows (aliases) ---------------------------------------------------------------------


def add_aliases(url: str, names: dict[str, str]) -> dict[str, str]:
    """Store aliases as the Responses resume index does (the engine's ``alias``): response
    id -> entry key. Returns response id -> alias key."""
    keys = {rid: alias_key(OpenAIResponses().name, "t:tenant", rid) for rid in names}

    async def main() -> None:
        async with StreamCache(url, OpenAIResponses()) as cache:
            for rid, target in names.items():
                assert await cache.alias(keys[rid], target)

    anyio.run(main)
    return keys


@pytest.fixture
def aliased(db: str) -> tuple[str, dict[str, str]]:
    # resp_1 names aaa111 (there), resp_gone names an entry evicted since.
    return db, add_aliases(db, {"resp_1": "aaa111", "resp_gone": "fff999"})


def test_ls_hides_aliases_and_lists_them_as_their_own_kind(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, aliases = aliased
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["aaa111", "bbb222", "ccc333"]

    assert run_cli("ls", "-l", "--backend", db) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == ["aaa111", "bbb222", "ccc333"]
    assert err.strip() == "2 entries, 1 corrupt, 2 aliases (not listed; -a lists them)"

    assert run_cli("ls", "-a", "--backend", db) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(
        ["aaa111", "bbb222", "ccc333", *aliases.values()]
    )

    assert run_cli("ls", "-la", "--backend", db) == 0
    out, err = capsys.readouterr()
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    assert rows[aliases["resp_1"]][1:] == ["alias", "aaa111"]
    assert rows[aliases["resp_gone"]][1:] == ["alias", "fff999", "dangling"]
    assert rows["ccc333"][1:] == ["CORRUPT"]  # a row that is neither stays corrupt
    assert [r for r in rows.values() if "CORRUPT" in r] == [["19", "CORRUPT"]]
    assert err.strip() == "2 entries, 1 corrupt, 2 aliases"


def test_a_live_alias_is_read_by_its_token(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A cross-process proxy's live alias holds "KEY TOKEN" (its producer's lease token,
    # uuid4 hex): it names KEY. A value with a space and no such token is a plain alias of
    # the whole value (a custom keyer's key may hold a space).
    token = "0123456789abcdef0123456789abcdef"
    values = {
        "resp_live": f"aaa111 {token}",
        "resp_gone": f"fff999 {token}",
        "resp_spaced": "a key with spaces",
        "resp_short": "aaa111 0123",
    }
    aliases = add_aliases(db, values)
    assert run_cli("ls", "-la", "--backend", db) == 0
    rows = {
        line.split("\t")[0]: line.split("\t")[2:] for line in capsys.readouterr().out.splitlines()
    }
    assert rows[aliases["resp_live"]] == ["live-alias", "aaa111"]
    assert rows[aliases["resp_gone"]] == ["live-alias", "fff999", "dangling"]
    assert rows[aliases["resp_spaced"]] == ["alias", "a key with spaces", "dangling"]
    assert rows[aliases["resp_short"]] == ["alias", "aaa111 0123", "dangling"]
    assert run_cli("show", aliases["resp_gone"], "--backend", db) == 1
    assert "which is not stored (yet: its stream may still be live" in capsys.readouterr().err


def test_show_an_alias_prints_what_it_names(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, aliases = aliased
    assert run_cli("show", aliases["resp_1"], "--backend", db) == 0
    alias_part, entry_part = capsys.readouterr().out.split("\n\n", 1)
    assert "kind:  alias" in alias_part and "names: aaa111" in alias_part
    head, _, sse = entry_part.partition("\n\n")
    assert "key:" in head and "aaa111" in head and "meta.response_id: resp_1" in head
    assert sse.encode() == serialize_sse(EVENTS)
    assert run_cli("show", aliases["resp_1"], "--sse-only", "--backend", db) == 0
    assert capsys.readouterr().out.encode() == serialize_sse(EVENTS)

    assert run_cli("show", aliases["resp_gone"], "--backend", db) == 1
    out, err = capsys.readouterr()
    assert "names: fff999" in out
    assert "names entry 'fff999', which is not in the cache" in err


def test_stats_counts_aliases_apart_from_entries(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = aliased
    assert run_cli("stats", "--backend", db) == 0
    figures = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert (int(figures["entries"]), int(figures["aliases"])) == (3, 2)


def test_purge_everything_counts_entries_and_aliases(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = aliased
    assert run_cli("purge", "--yes", "--backend", db) == 0
    assert "purged 3 entries and 2 aliases from" in capsys.readouterr().out
    assert run_cli("ls", "-a", "--backend", db) == 0
    assert capsys.readouterr().out == ""


def test_purge_keys_takes_the_aliases_naming_them(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, aliases = aliased
    more = add_aliases(db, {"resp_b": "bbb222", "resp_b2": "bbb222"})
    assert run_cli("purge", "aaa111", "--yes", "--backend", db) == 0
    assert "purged 1 entry and 1 alias" in capsys.readouterr().out
    # An alias given stands for its entry: the entry and every alias naming it go.
    assert run_cli("purge", more["resp_b"], "--yes", "--backend", db) == 0
    assert "purged 1 entry and 2 aliases" in capsys.readouterr().out
    # A dangling alias given goes alone.
    assert run_cli("purge", aliases["resp_gone"], "--yes", "--backend", db) == 0
    assert "purged 0 entries and 1 alias" in capsys.readouterr().out
    assert run_cli("ls", "-a", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["ccc333"]


def test_purge_keys_checks_every_key_first(
    aliased: tuple[str, dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db, aliases = aliased
    assert run_cli("purge", "aaa111", "nope", "--yes", "--backend", db) == 1
    assert "no entry with key 'nope'" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert run_cli("purge", "aaa111", "--backend", db) == 1
    assert "Delete 1 entry and 1 alias from" in capsys.readouterr().out
    run_cli("ls", "-a", "--backend", db)
    assert len(capsys.readouterr().out.split()) == 3 + len(aliases)  # nothing deleted


@pytest.mark.parametrize("backend_kind", ["redis"])
def test_aliases_on_redis(backend_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    codec = MsgpackCodec()
    store(backend_url, {"k1": codec.encode(Entry(schema="g", created_at=0.0, body=b"b"))})
    add_aliases(backend_url, {"resp_1": "k1"})
    assert run_cli("ls", "-l", "--backend", backend_url) == 0
    out, err = capsys.readouterr()
    assert out.split("\t")[0] == "k1" and "1 entry, 1 alias (not listed" in err
    assert run_cli("stats", "--backend", backend_url) == 0
    figures = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert (int(figures["entries"]), int(figures["aliases"])) == (1, 1)
    assert run_cli("purge", "k1", "--yes", "--backend", backend_url) == 0
    assert "purged 1 entry and 1 alias" in capsys.readouterr().out
    assert run_cli("ls", "-a", "--backend", backend_url) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("backend_kind", ["redis"])
def test_a_key_that_is_not_utf8_is_reported_and_the_listing_goes_on(
    backend_url: str, redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another program wrote a key under the cache's prefix whose bytes are not UTF-8: `ls -l`
    # ended in a ValueError traceback (helper-97). It is reported, and the listing goes on.
    import redis

    codec = MsgpackCodec()
    entry = codec.encode(Entry(schema="g", created_at=0.0, body=b"b"))
    store(backend_url, {"k1": entry, "k3": entry})
    prefix = backend_url.split("prefix=", 1)[1].split("&", 1)[0]
    raw = redis.Redis(host="127.0.0.1", port=int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    try:
        raw.set(prefix.encode() + b"e:k2\xff", b"hello")
    finally:
        raw.close()
    assert run_cli("ls", "-l", "--backend", backend_url) == 0
    out, err = capsys.readouterr()
    rows = sorted(line.split("\t") for line in out.splitlines())
    assert [row[0] for row in rows] == ["k1", "k2\\xff", "k3"]
    assert rows[1][2] == "UNREADABLE" and "not UTF-8" in rows[1][3]
    assert err == "2 entries, 1 unreadable here\n"
    assert run_cli("ls", "--backend", backend_url) == 0
    assert sorted(capsys.readouterr().out.split()) == ["k1", "k2\\xff", "k3"]


def test_rows_are_read_for_what_they_are() -> None:
    codec = MsgpackCodec()
    entry = codec.encode(Entry(schema="g", created_at=0.0, body=b"b"))
    assert inspect.read_row("k", entry, codec).kind == "entry"
    assert inspect.read_row("alias-1", b"0123abcd", codec) == inspect.Row(
        "alias", target="0123abcd"
    )
    for value in (b"", b"\xff\xfe", b"two\nlines", b"x" * 5000):
        assert inspect.read_row("alias-1", value, codec).kind == "corrupt"
    # A row named like a key but holding an alias's value is a corrupt entry, not an alias.
    assert inspect.read_row("0123", b"0123abcd", codec).kind == "corrupt"


# -- never creating a cache -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["ls"], ["ls", "-l"], ["show", "k"], ["stats"], ["purge", "--yes"]]
)
def test_inspection_never_creates_a_cache(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for backend in (["--backend", "sqlite:///./typo.db"], []):  # and the default
        assert run_cli(*argv, *backend) == 1
        err = capsys.readouterr().err
        name = "typo.db" if backend else "sse-cache.db"
        assert f"SQLite file '{tmp_path / name}' does not exist" in err
    assert os.listdir(tmp_path) == []


def test_inspection_leaves_a_foreign_database_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "app.db"
    with closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    before = other.read_bytes()
    assert run_cli("ls", "--backend", f"sqlite:///{other}") == 1
    assert "is not an sse_cache database" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_an_explicit_create_in_the_url_wins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}?create=true"
    assert run_cli("stats", "--backend", url) == 0
    figures = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert int(figures["entries"]) == 0
    assert (tmp_path / "new.db").is_file()


# -- reading commands read only ---------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` and its bytes."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def access_times(path: Path) -> list[tuple[str, float]]:
    uri = f"file:{path}?mode=ro&immutable=1"  # (reads without a trace)
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        return conn.execute(
            "SELECT key, accessed_at FROM sse_cache_entries ORDER BY key"
        ).fetchall()


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_reading_commands_change_nothing_in_a_sqlite_cache(
    db: str, journal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `show` and `ls -l` wrote the access times of what they read at exit (changing which
    # entry the proxy's size budget evicts next), and every command switched a
    # rollback-journal file to WAL (helper-97). They change nothing now: not a byte of the
    # file, no file beside it.
    path = tmp_path / "cache.db"
    if journal == "delete":
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = DELETE")
    before, times = snapshot(tmp_path), access_times(path)
    time.sleep(0.01)  # a clock that has moved on: any access time written would differ
    for argv in (["show", "aaa111"], ["show", "aaa", "--sse-only"], ["ls", "-l", "-a"], ["ls"]):
        assert run_cli(*argv, "--backend", db) == 0, argv
    assert run_cli("stats", "--backend", db) == 0
    assert capsys.readouterr().err == "2 entries, 1 corrupt\n"  # (ls -l's summary)
    assert snapshot(tmp_path) == before
    assert access_times(path) == times
    # Purging writes, as it must.
    assert run_cli("purge", "--yes", "bbb222", "--backend", db) == 0
    assert [key for key, _ in access_times(path)] == ["aaa111", "ccc333"]


def as_operator(command: list[str]) -> list[str]:
    """``command`` as a user whom file modes apply to: root without its DAC override (which
    writes to a 0444 file anyway), else as it is."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes do not apply to root")
    dropped = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", "--bounding-set", dropped, "--", *command]


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_reading_commands_read_a_file_they_may_not_write(
    db: str, journal: str, tmp_path: Path
) -> None:
    # A cache file the operator may read but not write, in a directory they may not write
    # either (the proxy stopped: no -wal or -shm beside it). Every reading command failed
    # with "attempt to write a readonly database" (helper-97).
    path = tmp_path / "cache.db"
    if journal == "delete":
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = DELETE")
    before = snapshot(tmp_path)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        runs = {
            " ".join(argv): subprocess.run(
                as_operator([sys.executable, "-m", "sse_cache", *argv, "--backend", db]),
                capture_output=True,
                text=True,
                timeout=60,
            )
            for argv in (["ls", "-l"], ["show", "aaa111"], ["stats"])
        }
        purge = subprocess.run(
            as_operator([sys.executable, "-m", "sse_cache", "purge", "--yes", "--backend", db]),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)
    for command, run in runs.items():
        assert run.returncode == 0, (command, run.stderr)
    assert runs["ls -l"].stdout.splitlines()[0].startswith("aaa111\t")
    assert "4 over 0.250 s" in runs["show aaa111"].stdout
    assert "entries:    3" in runs["stats"].stdout
    # Writing it is refused, and says why.
    assert purge.returncode == 1 and "readonly" in purge.stderr, purge.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("only", [[], ["--sse-only"]], ids=["show", "sse-only"])
def test_a_reader_that_goes_away_ends_the_output_without_a_traceback(
    tmp_path: Path, only: list[str]
) -> None:
    # ``sse-cache show KEY | head``: an entry of 20,000 events is far more than the pipe
    # holds, so the command is still writing when its reader closes the pipe. (With
    # --sse-only, the events were one write of it all: exit 0, the output cut; helper-97.)
    url = f"sqlite:///{tmp_path / 'big.db'}"
    events = [Event(data=f'{{"delta":"{i}"}}', event="delta", at=0.0) for i in range(20_000)]
    entry = Entry(schema="generic", created_at=time.time(), events=tuple(events))
    store(url, {"big": MsgpackCodec().encode(entry)})
    command = [sys.executable, "-m", "sse_cache", "show", *only, "--backend", url, "big"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as head does once it has its lines
        errors = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    assert first and errors == ""
    assert code == 141  # as a shell reports a tool that SIGPIPE ended


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"sse-cache {importlib.metadata.version('sse-cache')}\n"


@pytest.mark.parametrize(
    "argv",
    [("show", "a\udcff"), ("purge", "-y", "k", "a\udcff"), ("ls", "--prefix", "a\udcff")],
)
def test_a_key_no_backend_can_hold_is_a_usage_error(
    argv: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bytes that are not UTF-8 on the command line (a lone surrogate) were a traceback.
    url = f"sqlite:///{tmp_path / 'c.db'}"
    store(url, {"k": b"x"})
    assert run_cli(*argv, "--backend", url) == inspect.EXIT_UNSUPPORTED
    err = capsys.readouterr().err
    assert err.startswith("sse-cache: ") and "not encodable as UTF-8" in err
    assert err.count("\n") == 1


def test_an_unreadable_backend_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # A NUL in the SQLite path and an unclosed IPv6 bracket were tracebacks.
    assert run_cli("ls", "--backend", "sqlite:///y%00.db") == inspect.EXIT_UNSUPPORTED
    assert "NUL" in capsys.readouterr().err
    assert run_cli("ls", "--backend", "redis://:hunter2@[::1") == inspect.EXIT_UNSUPPORTED
    err = capsys.readouterr().err
    assert err.startswith("sse-cache: bad --backend") and "hunter2" not in err


# -- Ctrl-C at the purge prompt ---------------------------------------------------------------


def read_until(fd: int, marker: bytes | None) -> bytes:
    """What ``fd`` gives up to and including ``marker`` (the prompt), or (None) up to its
    end: blocking reads, no timing. Raises when the writer closes before the marker."""
    seen = b""
    while marker is None or marker not in seen:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # (a terminal whose other side closed: EIO)
            chunk = b""
        if not chunk:
            if marker is None:
                return seen
            raise AssertionError(f"{marker!r} never came; got {seen!r}")
        seen += chunk
    return seen


@pytest.mark.parametrize("stdin", ["terminal", "pipe"])
def test_ctrl_c_at_the_purge_prompt_exits_at_once_deleting_nothing(
    db: str, stdin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The prompt's input() ran in an anyio worker thread: Ctrl-C printed a KeyboardInterrupt
    # traceback, then the process waited in input() for Enter (a terminal) or for the end of
    # input (a pipe, which here never comes: the test holds it open).
    import pty

    command = [sys.executable, "-m", "sse_cache", "purge", "--backend", db]
    if stdin == "terminal":
        # All three a terminal, as in a shell (input() then writes its prompt to stderr).
        output, terminal = pty.openpty()
        proc = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal)
        os.close(terminal)
        errors_fd = output
    else:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        output, errors_fd = proc.stdout.fileno(), proc.stderr.fileno()
    try:
        assert b"Delete every entry in" in read_until(output, b"[y/N] ")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)  # (a guard against a hang, not a timing assertion)
        errors = read_until(errors_fd, None).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if stdin == "terminal":
            os.close(output)
    assert code == 130, errors
    assert "Traceback" not in errors
    assert errors.strip().splitlines()[-1] == "sse-cache: interrupted: nothing deleted"
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["aaa111", "bbb222", "ccc333"]


# -- caches that live inside each process -----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("memory://", "memory://"),
        ("memory://?max_bytes=1MiB", "memory://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
    ],
)
@pytest.mark.parametrize(
    "argv", [["ls"], ["ls", "-l"], ["show", "k"], ["stats"], ["purge", "--yes"], ["purge", "k"]]
)
def test_a_cache_inside_each_process_is_refused_not_reported_empty(
    url: str,
    named: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A proxy run with SSE_CACHE_BACKEND=memory:// keeps its cache in its own memory: these
    # commands opened a new, empty one of their own ("purged 0 entries", exit 0).
    for backend in (["--backend", url], []):
        monkeypatch.setenv("SSE_CACHE_BACKEND", url)
        assert run_cli(*argv, *backend) == inspect.EXIT_UNSUPPORTED
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            f"sse-cache: {argv[0]}: {named} lives inside each process: there is nothing "
            "another process can inspect (a cache to inspect is a sqlite:// file or a Redis "
            "or memcached server)\n"
        )


# -- counting each row once -------------------------------------------------------------------


def test_a_corrupt_alias_row_is_counted_once_as_corrupt(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # An alias row whose value is no key was counted both as corrupt and as an alias.
    db, _ = aliased
    path = db.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as raw, raw:
        raw.execute("INSERT INTO sse_cache_entries VALUES ('alias-bad', 3, 0, 0, NULL, X'FFFE00')")
    assert run_cli("ls", "-la", "--backend", db) == 0
    out, err = capsys.readouterr()
    assert "alias-bad\t3\tCORRUPT" in out.splitlines()
    assert len(out.splitlines()) == 6
    assert err.strip() == "2 entries, 2 corrupt, 2 aliases"  # 6 rows
    # Without -a the aliases are not read: counted by their names.
    assert run_cli("ls", "-l", "--backend", db) == 0
    assert capsys.readouterr().err.strip() == (
        "2 entries, 1 corrupt, 3 aliases (not listed; -a lists them)"
    )


def test_an_alias_holding_text_that_is_not_utf8_is_corrupt_and_purged(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # `purge KEY` of such an alias, or of any entry (every alias is read, to find those
    # naming it), failed: sqlite3 could not decode the value (helper-148).
    db, aliases = aliased
    path = db.removeprefix("sqlite:///")
    bad = aliases["resp_gone"]
    with closing(sqlite3.connect(path)) as raw, raw:
        raw.execute(
            "UPDATE sse_cache_entries SET value = CAST(X'616161ff' AS TEXT) WHERE key = ?", (bad,)
        )
    assert run_cli("ls", "-la", "--backend", db) == 0
    out, err = capsys.readouterr()
    assert f"{bad}\t0\tCORRUPT" in out.splitlines() and len(out.splitlines()) == 5
    assert err.strip() == "2 entries, 2 corrupt, 1 alias"
    assert run_cli("purge", "aaa111", "--yes", "--backend", db) == 0
    assert "purged 1 entry and 1 alias" in capsys.readouterr().out
    assert run_cli("purge", bad, "--yes", "--backend", db) == 0
    assert "purged 1 entry and 0 aliases" in capsys.readouterr().out
    assert run_cli("ls", "-a", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["bbb222", "ccc333"]


def test_a_sqlite_key_that_is_not_utf8_is_listed_unreadable_and_the_listing_goes_on(
    aliased: tuple[str, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # A key that is not UTF-8 (another program's, or a bit flipped on disk) failed `ls` and
    # `stats` as a whole: sqlite3 could not decode it (helper-148). As on Redis, it is
    # listed UNREADABLE and the listing goes on; the other commands pass it by.
    db, _ = aliased
    path = db.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as raw, raw:
        for key in ("6b32ff", "616c6961732dff"):  # k2\xff and alias-\xff
            raw.execute(
                f"INSERT INTO sse_cache_entries VALUES (CAST(X'{key}' AS TEXT), 1, 0, 0, NULL,"
                " CAST('aaa111' AS BLOB))"
            )
    assert run_cli("ls", "--backend", db) == 0
    assert capsys.readouterr().out.split() == ["aaa111", "bbb222", "ccc333", "k2\\xff"]
    assert run_cli("ls", "-l", "-a", "--backend", db) == 0
    out, err = capsys.readouterr()
    rows = {line.split("\t", 1)[0]: line.split("\t")[1:] for line in out.splitlines()}
    assert len(rows) == 7  # 3 entries, 2 aliases and those two
    assert list(rows)[-4:] == ["alias-\\xff", "bbb222", "ccc333", "k2\\xff"]  # (key order)
    for key in ("alias-\\xff", "k2\\xff"):
        assert rows[key][:2] == ["-", "UNREADABLE"] and "not UTF-8" in rows[key][2]
    assert err == "2 entries, 1 corrupt, 2 unreadable here, 2 aliases\n"
    assert run_cli("stats", "--backend", db) == 0
    figures = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert (int(figures["entries"]), int(figures["aliases"])) == (4, 3)
    # `show` of a start of keys that only such a key has: none to show (it was a ValueError
    # traceback: no backend takes that key).
    assert run_cli("show", "k2", "--backend", db) == 1
    assert "no entry with key 'k2'" in capsys.readouterr().err
    assert run_cli("purge", "aaa111", "--yes", "--backend", db) == 0
    assert "purged 1 entry and 1 alias" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["ls"], ["ls", "-l"], ["show", "k"], ["stats"], ["purge", "--yes"]]
)
def test_a_sqlite_path_that_names_a_fifo_fails_at_once_naming_it(
    tmp_path: Path, argv: list[str]
) -> None:
    # The reading commands open the file read-only, and looked at its header first with a
    # plain open(), which waits for a writer when the path is a FIFO: `sse-cache ls` hung for
    # ever (helper-148). (The timeout only guards against that hang.)
    fifo = tmp_path / "cache.db"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "sse_cache", *argv, "--backend", f"sqlite:///{fifo}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert f"SQLite file {str(fifo)!r} is not a regular file: it is a FIFO" in done.stderr
    assert "Traceback" not in done.stderr


# -- a key prefix where keys cannot be listed -------------------------------------------------


def test_show_says_a_key_prefix_cannot_be_resolved_where_keys_cannot_be_listed(
    memcached_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The access lines print 12 characters of a key; memcached cannot list keys to find the
    # one they start, and `show` said "no entry".
    url = f"memcached://{memcached_server.address}?prefix=cliprefix:"
    key = "e5273d1298d8b35ad8e629b617cf3d318a0112a819a33b8b6079e1e76ca4b392"
    store(url, {key: MsgpackCodec().encode(Entry(schema="g", created_at=0.0, body=b"b"))})
    assert run_cli("show", key[:12], "--backend", url) == inspect.EXIT_UNSUPPORTED
    assert capsys.readouterr().err == (
        "sse-cache: memcached:// cannot resolve a key prefix (it cannot list keys): give the "
        "whole key, as the x-sse-cache-key header has it\n"
    )
    assert run_cli("show", key, "--backend", url) == 0
    assert f"key:          {key}" in capsys.readouterr().out
    assert run_cli("purge", key[:12], "--yes", "--backend", url) == inspect.EXIT_UNSUPPORTED
    assert "cannot resolve a key prefix" in capsys.readouterr().err
    # A whole key that is not there, or a name that is no key's start, is simply not there.
    for missing in ("f" * 64, "nope"):
        assert run_cli("show", missing, "--backend", url) == 1
        assert f"no entry with key {missing!r}" in capsys.readouterr().err


# -- a file of a newer sse_cache --------------------------------------------------------------


def test_a_file_of_a_newer_sse_cache_is_named_so_and_left_as_it_is(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was "not an sse_cache database (user_version 2; ...)".
    from sse_cache.backends._sqlite_store import SCHEMA_VERSION

    path = Path(db.removeprefix("sqlite:///"))
    with closing(sqlite3.connect(path)) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        raw.execute("PRAGMA journal_mode = DELETE")  # (one file to compare, no -wal)
    before = path.read_bytes()
    expected = (
        f"SQLite file '{path}' was written by a newer sse_cache (schema {SCHEMA_VERSION + 1}; "
        f"this version reads {SCHEMA_VERSION}): upgrade sse-cache to read it"
    )
    assert run_cli("ls", "--backend", db) == 1
    assert expected in capsys.readouterr().err

    async def write() -> None:  # a backend that may create: refused the same way
        backend = from_url(db)
        try:
            with pytest.raises(SSECacheError, match=re.escape(expected)):
                await backend.set("k", b"v", None)
        finally:
            await backend.aclose()

    anyio.run(write)
    assert path.read_bytes() == before


def test_purge_on_a_full_disk_says_how_to_make_room(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Deleting writes to SQLite's -wal file first: on a full disk purge failed with the
    # proxy's hint (lower ?max_bytes=), which frees nothing here (helper-164). A real full
    # disk: a 1 MiB tmpfs the cache fills (CI runs as root).
    from servers import in_ci

    cannot = pytest.fail if in_ci() else pytest.skip
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        cannot("no mount command: cannot make a small filesystem")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        cannot(f"mount -t tmpfs: {done.stderr.decode().strip()}")
    try:
        db = f"sqlite:///{disk / 'c.db'}"
        entries: dict[str, bytes] = {}
        with pytest.raises(SSECacheError, match="full"):  # until the disk is full
            for i in range(64):
                entries[f"k{i}"] = os.urandom(60_000)
                store(db, {f"k{i}": entries[f"k{i}"]})
        capsys.readouterr()
        assert run_cli("purge", "k1", "--yes", "--backend", db) == 1
        err = capsys.readouterr().err
        assert "its disk is full, and deleting needs room too" in err
        assert "delete it with its -wal and -shm files" in err and "max_bytes" not in err
    finally:
        subprocess.run(["umount", str(disk)], check=True)

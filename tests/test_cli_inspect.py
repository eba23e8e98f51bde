"""``sse-cache ls | show | purge | stats`` against real SQLite files (and memcached for the
"cannot list keys" answer)."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from sse_cache.backends import from_url
from sse_cache.cli import inspect
from sse_cache.codec import MsgpackCodec
from sse_cache.entry import Entry
from sse_cache.events import Event, serialize_sse

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


def test_show_missing_and_corrupt(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("show", "nope", "--backend", db) == 1
    assert "no entry with key 'nope'" in capsys.readouterr().err
    assert run_cli("show", "ccc333", "--backend", db) == 1
    assert "corrupt" in capsys.readouterr().err


def test_stats(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("stats", "--backend", db) == 0
    out = capsys.readouterr().out
    figures = dict(line.split(":", 1) for line in out.splitlines()[1:])
    assert int(figures["entries"]) == 3
    assert int(figures["bytes"]) > 100


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


def test_redis_password_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    # An unreachable Redis: the error names the URL without its password.
    url = "redis://user:s3cret@127.0.0.1:1/0?timeout=0.2"
    assert run_cli("stats", "--backend", url) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err and "***" in err

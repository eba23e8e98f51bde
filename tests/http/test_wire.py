"""Pieces of HTTP every edge needs (sse_cache.http._wire): whether a body's end can be told
from a cut."""

from __future__ import annotations

import pytest

from sse_cache.http._wire import body_ends_by_itself


@pytest.mark.parametrize(
    ("version", "headers", "ends"),
    [
        (b"HTTP/1.1", {}, False),  # delimited by the connection's close alone
        ("HTTP/1.0", {}, False),
        (b"HTTP/1.1", {"content-length": "12"}, True),
        (b"HTTP/1.1", {"transfer-encoding": "chunked"}, True),
        (b"HTTP/1.1", {"transfer-encoding": "gzip, Chunked"}, True),
        (b"HTTP/1.1", {"transfer-encoding": "gzip"}, False),  # (not chunked last: by close)
        (b"HTTP/2", {}, True),  # frames end the stream
        ("HTTP/3", {}, True),
        (None, {}, True),  # an in-process transport: taken at its word
    ],
)
def test_a_body_ends_by_itself_where_its_framing_says_so(
    version: str | bytes | None, headers: dict[str, str], ends: bool
) -> None:
    assert body_ends_by_itself(version, headers) is ends

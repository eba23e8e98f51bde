"""Small pieces of HTTP every edge needs the same way: our headers over the upstream's, the
provider-shaped JSON error, whether a body's end can be told from a cut, and closing an
iterator of chunks for sure."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping

import anyio


def merge_headers(
    upstream: Iterable[tuple[bytes, bytes]], ours: Iterable[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """The upstream's raw headers with ours after them. An upstream header that we also set
    is dropped, so a client never sees two values, and so is any other of our namespace
    (``x-sse-cache-*``): another cache's in front of the upstream (its ``x-sse-cache-ttl``
    on this cache's miss) would be taken for this one's."""
    ours = list(ours)
    names = {k.lower() for k, _ in ours}
    return [
        *(
            (k, v)
            for k, v in upstream
            if (name := k.decode("latin-1").lower()) not in names
            and not name.startswith(_OUR_PREFIX)
        ),
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in ours),
    ]


_OUR_PREFIX = "x-sse-cache"


def body_ends_by_itself(http_version: str | bytes | None, headers: Mapping[str, str]) -> bool:
    """Whether an upstream response's body has an end of its own, by which a cut is told
    from its end: a length, chunked framing, or HTTP/2 or later (``headers`` with lower-case
    names). False for an HTTP/1 body delimited by the connection's close alone. An unknown
    version (an in-process transport) is trusted."""
    if http_version is None:
        return True
    version = (
        http_version.decode("ascii", "replace") if isinstance(http_version, bytes) else http_version
    )
    if not version.upper().startswith("HTTP/1"):
        return True
    if "content-length" in headers:
        return True
    return "chunked" in headers.get("transfer-encoding", "").lower()


def json_error_body(message: str, kind: str = "invalid_request_error") -> bytes:
    """``{"error": {"message", "type", "code"}}``, as the providers shape theirs, so an SDK
    raises its usual error. The code is ``sse_cache`` for a request this library refused."""
    code = "sse_cache" if kind == "invalid_request_error" else kind
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


async def close_iterator(iterator: object, *, quiet: bool = False) -> None:
    """Close an async iterator that has ``aclose`` (a generator of chunks, an upstream's
    body), shielded: a cancelled request must still release what it read from. ``quiet``
    swallows what closing raises (for iterators of a stream that has failed already)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        if quiet:
            with contextlib.suppress(Exception):
                await aclose()
        else:
            await aclose()

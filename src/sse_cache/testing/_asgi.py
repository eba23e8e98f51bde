"""ASGI plumbing shared by the test upstreams: reading the request, lifespan, JSON answers, and
sending a body while watching for the client to go away."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import anyio

from ..errors import SSECacheError

__all__ = [
    "Message",
    "Receive",
    "Scope",
    "Send",
    "UpstreamCut",
    "Watch",
    "json_start",
    "lifespan",
    "read_body",
    "send_json",
    "watched",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class UpstreamCut(SSECacheError, ConnectionError):
    """Raised by a test upstream on purpose after part of a response body was sent
    (:class:`MockUpstream` with ``x-mock-error: cut``, :class:`GatedUpstream` with
    ``cut_after``): an HTTP server then drops the connection mid-body. In-process (httpx2's
    ``ASGITransport``) the client sees this exception."""


async def read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """The whole request body, or None when it is larger than ``limit`` (drained anyway)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if limit is None or size <= limit:
            parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts) if limit is None or size <= limit else None


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer a lifespan scope: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def json_start(status: int, length: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> Message:
    """``http.response.start`` of a JSON answer of ``length`` bytes."""
    head = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {"type": "http.response.start", "status": status, "headers": [*head, *headers]}


async def send_json(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await send(json_start(status, len(body), headers))
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Watch:
    """How a response watched by :func:`watched` went: ``done`` once the work says it has
    sent everything that matters, ``disconnected`` when the client left before that."""

    __slots__ = ("disconnected", "done")

    def __init__(self) -> None:
        self.done = False
        self.disconnected = False


async def watched(
    receive: Receive, work: Callable[[Watch], Awaitable[None]], on_gone: Callable[[], None]
) -> Watch:
    """Run ``work`` while watching ``receive`` for the client going away (the request body
    must have been read in full). A client that leaves (or a send that fails with
    :class:`OSError`, as some servers do on a closed connection) before ``work`` set
    ``watch.done`` cancels it and calls ``on_gone`` once."""
    watch = Watch()

    def gone() -> None:
        if not (watch.done or watch.disconnected):
            watch.disconnected = True
            on_gone()

    async def watch_receive(scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not watch.done:
            gone()
            scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_receive, tg.cancel_scope)
        try:
            await work(watch)
        except OSError:
            gone()
        tg.cancel_scope.cancel()
    return watch

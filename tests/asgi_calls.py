"""Calling an ASGI app in process, as a server would: the ``receive`` and the app pieces the
middleware tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = ["Answered", "body_then", "call", "start_sse", "stopped_when_the_client_leaves"]


@dataclass
class Answered:
    """What a client was sent: the status, the head's headers, the body, and whether it
    ended."""

    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False


async def call(app: Any, scope: dict[str, Any], receive: Any) -> Answered:
    """Call ``app`` for one request, as a server would, keeping what it sends."""
    answered = Answered()
    body = bytearray()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answered.status = message["status"]
            answered.headers.update(message["headers"])
            return
        body.extend(message.get("body", b""))
        answered.ended = not message.get("more_body", False)

    try:
        await app(scope, receive, send)
    finally:
        answered.body = bytes(body)
    return answered


def body_then(body: bytes, until: Callable[[], Awaitable[object]] = anyio.sleep_forever) -> Any:
    """An ASGI ``receive``: the whole request ``body``, then ``http.disconnect`` once ``until``
    returns (by default, never)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await until()
        return {"type": "http.disconnect"}

    return receive


@asynccontextmanager
async def stopped_when_the_client_leaves(receive: Any) -> AsyncIterator[None]:
    """For an app: its block runs until it ends or the client leaves, as the proxy's
    forwarder stops reading its upstream then."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        yield
        tg.cancel_scope.cancel()


async def start_sse(receive: Any, send: Any, pieces: list[bytes]) -> None:
    """For an app: read the request's body, then send an SSE response's head and ``pieces``,
    the body not ended."""
    while (await receive()).get("more_body"):
        pass
    head = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    for piece in pieces:
        await send({"type": "http.response.body", "body": piece, "more_body": True})

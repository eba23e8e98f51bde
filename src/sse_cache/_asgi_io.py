"""The ASGI plumbing the middleware and the proxy share: the ASGI types, an outbox that
sends a client's messages from a task of its own (so a slow reader never paces the app),
sending an answer from the cache while the client is connected, a task group that raises
what failed in it, request headers, and the provider-shaped JSON error."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .http._answers import Answer
from .http._wire import close_iterator, json_error_body
from .http.policy import path_as_sent

logger = logging.getLogger("sse_cache")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


#: A key of an ``http.response.start`` message from the proxy's forwarder to the cache
#: middleware around it: False when the upstream's body ends only as its connection closes
#: (:func:`~sse_cache.http._wire.body_ends_by_itself`). Servers ignore it.
ENDS_BY_ITSELF = "sse_cache.ends_by_itself"

#: At most this many body bytes queued for a client are joined into one message.
_MERGED_BYTES = 256 * 1024


class _Outbox:
    """The messages for one client, sent by a task of their own (:meth:`run`), so that the
    app producing them never waits on that client's socket. What waits is bounded by the
    request (:meth:`_Request._keep_up`): :attr:`size` counts the body bytes queued."""

    def __init__(self, send: Send, failed: Callable[[Exception], None]) -> None:
        self._send = send
        self._failed = failed
        self._messages: deque[Message] = deque()
        self.size = 0
        self._closed = False  # nothing more will be put
        self._stopped = False  # nothing more is sent: the client is gone or was cut off
        self._more = anyio.Event()
        self._room = anyio.Event()
        self._scope = anyio.CancelScope()

    def put(self, message: Message) -> None:
        if self._stopped:
            return
        self._messages.append(message)
        self.size += len(message.get("body", b""))
        self._more.set()

    def close(self) -> None:
        """Nothing more will be put: :meth:`run` returns once the client has everything."""
        self._closed = True
        self._more.set()

    def stop(self) -> None:
        """Send nothing more (the client is gone)."""
        self._stopped = True
        self._messages.clear()
        self.size = 0
        self._more.set()
        self._wake()

    def cut(self) -> None:
        """Send nothing more, and give up a send blocked on a client that does not read."""
        self.stop()
        self._scope.cancel()

    @property
    def behind(self) -> int:
        """Body bytes queued past the oldest queued message: how far behind the client is,
        as a follower's lag is measured (one message larger than the bound is not falling
        behind)."""
        messages = self._messages
        return self.size - len(messages[0].get("body", b"")) if messages else 0

    async def room(self, limit: int) -> None:
        """Wait until at most ``limit`` body bytes wait to be sent (or none will be)."""
        while self.size > limit and not self._stopped:
            await self._room.wait()

    def _wake(self) -> None:
        self._room.set()
        self._room = anyio.Event()

    def _next(self) -> Message:
        # Body messages queued one after another go out as one (up to _MERGED_BYTES): a client
        # that the app outpaces gets fewer, larger writes, not one per message.
        message = self._messages.popleft()
        if message["type"] != "http.response.body" or not message.get("more_body", False):
            return message
        parts = [message.get("body", b"")]
        size = len(parts[0])
        last = message
        while self._messages and size < _MERGED_BYTES:
            following = self._messages[0]
            if following["type"] != "http.response.body":
                break
            last = self._messages.popleft()
            parts.append(last.get("body", b""))
            size += len(parts[-1])
            if not last.get("more_body", False):
                break
        if last is message:
            return message
        more = last.get("more_body", False)
        return {"type": "http.response.body", "body": b"".join(parts), "more_body": more}

    async def run(self) -> None:
        try:
            with self._scope:
                while True:
                    while self._messages:
                        message = self._next()
                        self.size -= len(message.get("body", b""))
                        try:
                            await self._send(message)
                        except Exception as exc:
                            self.stop()
                            self._failed(exc)
                        self._wake()
                    if self._closed or self._stopped:
                        return
                    await self._more.wait()
                    self._more = anyio.Event()
        finally:
            # Nothing is sent after this: let go of the request's bound methods, a reference
            # cycle (request -> outbox -> request) that would leave the whole request for the
            # cycle collector.
            self.stop()
            self._send, self._failed = _send_nothing, _ignore_failure


async def _send_nothing(message: Message) -> None:
    pass


def _ignore_failure(exc: Exception) -> None:
    pass


async def _send_answer_while_connected(receive: Receive, send: Send, answer: Answer) -> None:
    # A paced replay runs as long as the recorded stream did, a live one as long as its
    # upstream: stop when the client leaves, instead of sending into a closed connection.
    # (An instant hit is in memory: sent at once, it needs no watching.)
    if answer.instant:
        await _send_answer(send, answer)
        return
    async with task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
        await _send_answer(send, answer)
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """An anyio task group that raises what failed in it, not a group of that one error: the
    task group is the caller's implementation detail (a client sees the stream's own error,
    uvicorn logs it as it is)."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def until_disconnect(receive: Receive) -> None:
    """Return once the client has left (``http.disconnect``). What else comes meanwhile is
    dropped: a request's body has been read whole by the time anyone waits here."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    await until_disconnect(receive)
    scope.cancel()


#: The most of an instant answer's body sent in one message (see _send_answer).
INSTANT_SLICE_BYTES = 256 * 1024


async def _send_answer(send: Send, answer: Answer) -> None:
    # (A failed send leaves the answer to its holder, who closes it: see Answer.aclose.)
    await send(
        {"type": "http.response.start", "status": answer.status, "headers": _encode(answer.headers)}
    )
    if answer.instant:
        # All in memory: in one message, the end of the response with it, up to a slice;
        # a larger body slice by slice. The server copies what it is sent into the
        # connection's buffer and awaits its draining after each message: in one message,
        # every client that stopped reading held a whole copy of the answer for as long as
        # it kept the connection (helper-83: 20 of them, 560 MiB for a 30 MB answer).
        # (Taking the body ends its chunks: there is nothing left to close.)
        body = answer.take_body()
        size = len(body)
        start = 0
        while size - start > INSTANT_SLICE_BYTES:
            piece = body[start : start + INSTANT_SLICE_BYTES]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            start += INSTANT_SLICE_BYTES
            # A send that fits the socket's buffers never yields: a client that reset the
            # connection would be written every slice before the server heard it left
            # (asyncio then logs a warning for each write past the fifth; helper-95).
            await anyio.lowlevel.checkpoint()
        last = body[start:] if start else body
        await send({"type": "http.response.body", "body": last, "more_body": False})
        return
    async for chunk in answer.chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await close_iterator(answer.chunks)  # (before the end: a hit's bytes are counted so)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def request_path(scope: Scope) -> str:
    """The path a request is matched and keyed by (:func:`~sse_cache.http.policy.path_as_sent`;
    some test clients put the query in ``raw_path`` too)."""
    return path_as_sent(scope.get("raw_path"), scope["path"])


def _headers(scope: Scope) -> dict[str, str]:
    raw = scope.get("headers", ())
    if not isinstance(raw, list | tuple):  # (ASGI allows any iterable)
        raw = list(raw)
    # Names seldom repeat: one comprehension, and the loop that joins repeated names only
    # when they do (a request from an SDK carries ~17 headers; this is every request's path).
    out = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}
    if len(out) == len(raw):
        return out
    out = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _error(send: Send, status: int, message: str) -> None:
    await send_json_error(
        send, status, message, "invalid_request_error", headers=[(b"x-sse-cache", b"bypass")]
    )


async def send_json_error(
    send: Send,
    status: int,
    message: str,
    kind: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with a provider-shaped JSON error: ``{"error": {"message", "type", "code"}}``."""
    body = json_error_body(message, kind)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})

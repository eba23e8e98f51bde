"""A deadline for a request's head on the proxy's connections (nginx's
``client_header_timeout``): uvicorn's own protocols, given one.

uvicorn times a connection out only after a response (its keep-alive timeout), and every
byte received cancels that: a connection that sends nothing, or trickles its request's head
a byte at a time, is held for ever, with its file descriptor (helper-132: 300 such sockets
took a proxy limited to 256 descriptors off the air, its health check included). The
proxy's ``--body-timeout`` starts once a head has come; ``--limit-concurrency`` counts
requests, and these are none yet. Here a connection waiting for a request's head — a new
one, or one whose last response ended — is closed ``head_timeout`` seconds after it began
waiting, answered ``408`` first if part of a head came. (A head that came in pieces while
the previous response was still going out is closed without it: the wait began after. An
upload still moving after its request was answered early is waited for.)

Imported by the proxy's command only (it needs uvicorn). The protocol classes are
module-level (the workers of ``--workers N`` are spawned, and get them by name)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .._logging import RateLimitedLog
from .._notices import Hook, Notice, emit

logger = logging.getLogger("sse_cache")

_warnings = RateLimitedLog(logger)


class _Topic:
    """What the rate-limited warnings are about: every connection of this process."""


_CONNECTIONS = _Topic()

#: Who is told of each connection closed (the metrics of the proxy this process serves):
#: the protocol is built by uvicorn, per connection, and does not reach the app.
_told: list[Hook] = []


def tell_closes_to(hook: Hook) -> None:
    """Tell ``hook`` of each connection this process closes for its head's deadline (a
    ``head_timeout`` notice), in place of whoever was told before: a process serves one
    proxy app."""
    _told[:] = [hook]


_SAID = b"the request's head did not come in time"
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n%s" % (len(_SAID), _SAID)
)


class _HeadDeadline:
    """The deadline, for a uvicorn HTTP/1 protocol class (its ``cycle``: the latest
    request's, None before the first; ``loop``; ``transport``; ``connections``: the
    server's).

    A connection notes when it began to wait for a head; one task per server looks at them
    every quarter of the deadline (at most every second) and closes those past it. A timer
    per response cost ~25k instructions a hit (+2.6 %, counted by bench_instructions.py);
    the note costs an attribute or two."""

    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._waiting_since: float | None = None  # when the wait for a head began
        self._waited_after: Any = None  # the request whose end the wait began at
        self._head_bytes = False  # bytes came since the wait began

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._await_head()
        _sweeping(self.loop, self.connections, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        self._head_bytes = True
        super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        self._await_head()  # (before: a pipelined request may start at once, in there)
        super().on_response_complete()  # type: ignore[misc]

    def _await_head(self) -> None:
        self._waiting_since = self.loop.time()
        self._waited_after = self.cycle
        self._head_bytes = False

    def head_overdue(self, now: float) -> None:
        """Close this connection if it has waited for a head for longer than the deadline
        (the sweeper asks)."""
        since = self._waiting_since
        if since is None or now - since < self._head_timeout:
            return
        cycle = self.cycle
        if cycle is not self._waited_after or (cycle is not None and not cycle.response_complete):
            self._waiting_since = None  # a request came (and is served, or was): in time
            return
        if self.transport.is_closing():
            return
        if self._head_bytes and cycle is not None and cycle.more_body:
            # What came may be the rest of a request answered before its body was all in (a
            # 503, a 400): an upload whose answer went out is not cut while it moves
            # (helper-133); the wait begins again. (uvicorn leaves more_body set once the
            # answer went first: a connection that then goes quiet is closed at the next.)
            self._await_head()
            return
        if self._head_bytes:
            self.transport.write(_TIMED_OUT)
        self.transport.close()
        emit(
            _told,
            Notice(
                kind="head_timeout", key="", detail="partial" if self._head_bytes else "nothing"
            ),
        )
        _warnings.warning(
            _CONNECTIONS,
            "head_timeout",
            "sse_cache: closed a connection whose request's head did not come within "
            "--header-timeout %g s (%s)",
            self._head_timeout,
            "part of it came" if self._head_bytes else "nothing came",
        )


#: The sweeper of each server's connections (by its set of them), while it runs.
_SWEEPERS: dict[int, asyncio.Task[None]] = {}


def _sweeping(loop: asyncio.AbstractEventLoop, connections: set[Any], head_timeout: float) -> None:
    # Started with the server's first connection; it holds the set, so its id stays its own.
    if id(connections) in _SWEEPERS:
        return
    task = loop.create_task(_sweep(loop, connections, head_timeout), name="sse-cache head deadline")
    _SWEEPERS[id(connections)] = task
    task.add_done_callback(lambda _: _SWEEPERS.pop(id(connections), None))


async def _sweep(
    loop: asyncio.AbstractEventLoop, connections: set[Any], head_timeout: float
) -> None:
    interval = min(1.0, head_timeout / 4)
    while True:
        await asyncio.sleep(interval)
        now = loop.time()
        for connection in list(connections):
            overdue = getattr(connection, "head_overdue", None)
            if overdue is not None:
                overdue(now)


class HeadTimedH11Protocol(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol, with the deadline."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # (httptools is not installed: uvicorn uses h11)
    HeadTimedHttpToolsProtocol: Any = None
else:

    class HeadTimedHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):  # type: ignore[no-redef]
        """uvicorn's httptools protocol, with the deadline."""


def http_protocol(head_timeout: float) -> Any:
    """uvicorn's ``http`` setting for the proxy: its HTTP/1 protocol as ``"auto"`` picks it
    (httptools where it is installed, else h11), with a deadline of ``head_timeout`` seconds
    for each request's head; uvicorn's own (``"auto"``) for 0."""
    if not head_timeout:
        return "auto"
    base = HeadTimedHttpToolsProtocol or HeadTimedH11Protocol
    return functools.partial(base, head_timeout=head_timeout)

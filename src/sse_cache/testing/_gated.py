""":class:`GatedUpstream`: an SSE upstream for tests that serves a given stream and lets the
test decide when it goes on, or where it breaks."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from ..events import Event, serialize_sse
from ._asgi import Receive, Scope, Send, UpstreamCut, Watch, lifespan, read_body, watched
from ._pacing import pause

__all__ = ["GatedUpstream"]


def _piece(item: object) -> bytes:
    if isinstance(item, Event):
        return serialize_sse([item])
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    raise TypeError(
        f"GatedUpstream: a stream piece must be bytes or an Event, not {type(item).__name__}"
    )


def _position(name: str, value: int | None, pieces: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= pieces:
        raise ValueError(f"GatedUpstream: {name} must be an int in 0..{pieces}, got {value!r}")
    return value


class GatedUpstream:
    """A small SSE upstream for tests, as a plain ASGI 3 application: every HTTP request gets
    the same stream, sent as the test says.

    ``stream`` is the response body: ``bytes`` (sent in one piece) or a sequence of pieces,
    each ``bytes`` or an :class:`~sse_cache.Event` (sent in SSE form), one
    ``http.response.body`` message per piece. The response head (``status``,
    ``content_type``) goes out at once, after the request body was read in full.

    - ``hold_after=n`` holds every response after its first ``n`` pieces (``0`` to
      ``len(pieces)``; at ``len(pieces)`` the body is complete but not ended) until the test
      sets :attr:`gate`, an :class:`anyio.Event`, from the event loop serving the app.
    - ``cut_after=n`` sends the first ``n`` pieces, then raises :class:`UpstreamCut`: an HTTP
      server drops the connection, so the client sees a body without its end (in process,
      through httpx2's ``ASGITransport``, the client gets the exception).
    - ``delay``: seconds between two pieces (the upstream's own pace).

    A client that goes away ends its response at once, also while it is held at the gate
    (counted in :attr:`disconnects`). :attr:`calls` counts the HTTP requests, :attr:`bodies`
    keeps their bodies in arrival order, and :meth:`wait_sent` waits until a response has sent
    a number of pieces. Raises :class:`TypeError` for a piece that is neither ``bytes`` nor an
    ``Event`` and :class:`ValueError` for a position outside the stream, ``hold_after`` after
    ``cut_after``, a negative ``delay`` or a ``status`` that is not an HTTP status.

    Example, a stream held after its first event until every follower has joined::

        upstream = GatedUpstream(responses_stream("hi"), hold_after=1)
        ...  # start the requests; once they have all joined the stream:
        upstream.gate.set()
    """

    def __init__(
        self,
        stream: bytes | Sequence[bytes | Event],
        *,
        hold_after: int | None = None,
        cut_after: int | None = None,
        delay: float = 0.0,
        status: int = 200,
        content_type: str = "text/event-stream",
    ) -> None:
        if isinstance(stream, str):
            raise TypeError("GatedUpstream: stream must be bytes or a sequence of pieces, not str")
        items = [stream] if isinstance(stream, bytes | bytearray | memoryview) else list(stream)
        #: The pieces of the body, in SSE form, one body message each.
        self.pieces: list[bytes] = [_piece(item) for item in items]
        self.hold_after = _position("hold_after", hold_after, len(self.pieces))
        self.cut_after = _position("cut_after", cut_after, len(self.pieces))
        held, cut = self.hold_after, self.cut_after
        if held is not None and cut is not None and held > cut:
            raise ValueError("GatedUpstream: hold_after must not come after cut_after")
        if not delay >= 0:
            raise ValueError(f"GatedUpstream: delay must be >= 0 seconds, got {delay!r}")
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"GatedUpstream: status must be an HTTP status, got {status!r}")
        self.delay = delay
        self.status = status
        self.content_type = content_type
        #: Set it to let held responses go on (and later ones pass the gate at once).
        self.gate = anyio.Event()
        #: HTTP requests received.
        self.calls = 0
        #: The request bodies, in the order the requests arrived.
        self.bodies: list[bytes] = []
        #: Responses whose client went away before their end.
        self.disconnects = 0
        self._most_sent = 0
        self._waiters: list[tuple[int, anyio.Event]] = []

    @property
    def body(self) -> bytes:
        """The whole stream: what a response that is neither cut nor left carries."""
        return b"".join(self.pieces)

    async def wait_sent(self, pieces: int) -> None:
        """Return once a response has sent at least ``pieces`` pieces."""
        if self._most_sent >= pieces:
            return
        reached = anyio.Event()
        self._waiters.append((pieces, reached))
        await reached.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"GatedUpstream serves HTTP only, not {scope['type']!r}")
        self.calls += 1
        self.bodies.append(await read_body(receive) or b"")
        pieces = self.pieces if self.cut_after is None else self.pieces[: self.cut_after]
        head = [(b"content-type", self.content_type.encode("latin-1"))]
        await send({"type": "http.response.start", "status": self.status, "headers": head})

        async def work(watch: Watch) -> None:
            for i, piece in enumerate(pieces):
                await self._before(i, len(pieces))
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await self._before(len(pieces), len(pieces))
            watch.done = True  # from here on, a disconnect is the normal end of the exchange
            if self.cut_after is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        watch = await watched(receive, work, self._gone)
        if self.cut_after is not None and watch.done:
            raise UpstreamCut(f"GatedUpstream cut the stream after {len(pieces)} pieces")

    async def _before(self, index: int, total: int) -> None:
        # Called before piece `index` is sent (and with index == total before the end).
        self._sent(index)
        if index == self.hold_after:
            await self.gate.wait()
        if 0 < index < total:
            await pause(self.delay)

    def _sent(self, pieces: int) -> None:
        if pieces <= self._most_sent:
            return
        self._most_sent = pieces
        waiting = []
        for wanted, reached in self._waiters:
            if wanted <= pieces:
                reached.set()
            else:
                waiting.append((wanted, reached))
        self._waiters = waiting

    def _gone(self) -> None:
        self.disconnects += 1

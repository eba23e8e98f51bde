"""Sending the mock's :class:`~._request.Answer`: as a stream (SSE, or Gemini's JSON array) or
at once, paced like a model, with the ``x-mock-error`` fault applied."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from ..events import serialize_sse
from ._asgi import Receive, Send, UpstreamCut, Watch, json_start, watched
from ._pacing import pause
from ._request import Answer, Options

__all__ = ["send_stream", "send_unary"]

# What `bad-sse` sends: invalid UTF-8 inside a data line whose JSON is cut short.
_BAD_SSE: Final = b'data: {"type":"response.output_text.delta","delta":"\xff\xfe\xfd\n\n'


def _cut_point(answer: Answer, opts: Options) -> int:
    """How many events go out before the fault."""
    total = len(answer.events)
    after = opts.error_after if opts.error_after is not None else total // 2
    return max(0, min(after, total - 1))  # never the whole stream: the end must be missing


async def send_stream(
    answer: Answer,
    opts: Options,
    head: Sequence[tuple[bytes, bytes]],
    receive: Receive,
    send: Send,
    on_gone: Callable[[], None],
    *,
    array: bool = False,
) -> None:
    """Stream ``answer``'s events, one body message each, ``opts.first_delay`` before the first
    and ``opts.delay`` between the others. ``array``: as one JSON array (Gemini's
    ``streamGenerateContent`` without ``alt=sse``). Raises :class:`UpstreamCut` for ``cut``."""
    mode = opts.error
    events = answer.events
    if mode is not None:
        after = _cut_point(answer, opts)
        events = events[:after]
        if mode == "fail-mid-stream":
            events = events + answer.failure(after)
    if array:
        chunks = [
            (b"[" if i == 0 else b",\r\n") + e.data.encode("utf-8") for i, e in enumerate(events)
        ]
        if mode in (None, "fail-mid-stream"):
            chunks.append(b"]" if chunks else b"[]")
    else:
        chunks = [serialize_sse([e]) for e in events]
    if mode == "bad-sse":
        chunks.append(_BAD_SSE)
    media = b"application/json; charset=UTF-8" if array else b"text/event-stream; charset=utf-8"
    headers = [
        (b"content-type", media),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        *head,
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def work(watch: Watch) -> None:
        for i, chunk in enumerate(chunks):
            await pause(opts.first_delay if i == 0 else opts.delay)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # Set before the last send: once the body is complete, a disconnect is the normal end
        # of the exchange, not a client leaving mid-stream.
        watch.done = True
        if mode != "cut":
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    watch = await watched(receive, work, on_gone)
    if mode == "cut" and watch.done:
        raise UpstreamCut(f"mock upstream cut the stream after {len(chunks)} events")


async def send_unary(
    answer: Answer,
    opts: Options,
    head: Sequence[tuple[bytes, bytes]],
    receive: Receive,
    send: Send,
    on_gone: Callable[[], None],
) -> None:
    """Send ``answer``'s non-stream body after the time its stream would have taken, with the
    fault applied. Raises :class:`UpstreamCut` for ``cut``."""
    mode = opts.error
    status, body = 200, answer.body
    events = len(answer.events) if mode is None else _cut_point(answer, opts)
    if mode == "fail-mid-stream":
        status, body = answer.failed_unary

    async def work(watch: Watch) -> None:
        # A non-stream answer takes as long as its stream would have: generation time.
        await pause(opts.first_delay + opts.delay * max(0, events - 1))
        watch.done = True

    if (await watched(receive, work, on_gone)).disconnected:
        return
    try:
        if mode == "cut":
            await send(json_start(200, len(body), head))
            half = {"type": "http.response.body", "body": body[: len(body) // 2]}
            await send({**half, "more_body": True})
        else:
            if mode == "bad-sse":
                body = body[: len(body) // 2]
            await send(json_start(status, len(body), head))
            await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        return  # the client left while the answer was being sent
    if mode == "cut":
        raise UpstreamCut("mock upstream cut the response body in half")

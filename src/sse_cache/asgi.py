"""``CacheMiddleware``: caches the LLM routes of any ASGI app (a FastAPI gateway, a LiteLLM
proxy), streamed and not.

A plain ASGI 3 class in the shape of Starlette's ``GZipMiddleware``: per-request state lives
in a :class:`_Request` created per call; on a miss ``send`` is wrapped so every body message
goes out first and is recorded second. When others may read the same live stream, the
client's messages go out through an :class:`_Outbox`, sent by a task of their own: a client
that reads slowly then never paces the app (and with it the upstream and every follower).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from contextlib import AbstractAsyncContextManager
from functools import partial
from types import FrameType, TracebackType
from typing import Any

import anyio
import anyio.abc

from ._asgi_io import (
    ENDS_BY_ITSELF,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    _error,
    _headers,
    _Outbox,
    _send_answer_while_connected,
    request_path,
    task_group,
    until_disconnect,
)
from ._checks import boolean, integer, positive_number
from ._notices import Notice, emit
from .errors import ConfigError
from .flight import SharedStreamAborted
from .http._slots import BackgroundSlots
from .http._wire import merge_headers
from .http.options import CacheOptions
from .http.service import CacheService, Exchange, FollowerLeft, ResponseTee
from .protocols import Backend

__all__ = ["CacheMiddleware"]

logger = logging.getLogger("sse_cache")


class CacheMiddleware:
    """Cache the streamed (and non-streamed) answers of ``app``'s LLM routes.

    ``backend``: a :class:`~sse_cache.protocols.Backend` or a URL (``sqlite:///cache.db``,
    ``redis://...``). The caching options (:class:`~sse_cache.http.options.CacheOptions`) come as
    keywords, or as one ``options=``: ``routes``: path (suffix) → adapter; default
    ``POST /v1/responses``, ``/v1/chat/completions``, ``/v1/messages``, Gemini's
    ``/models/{model}:generateContent`` and ``:streamGenerateContent`` (also under prefixes
    such as ``/openai/v1/...``). ``tenant``: None (hash of the request's credential), a callable of
    the lower-cased request headers, or ``"shared"`` (explicit opt-in to share entries
    between tenants). ``ttl``: default entry lifetime in seconds. ``max_body_bytes``: larger
    request bodies pass through uncached. ``decoded_cache_bytes``: memory for recently
    decoded entries (64 MiB; 0 turns it off). Other options as for
    :class:`~sse_cache.engine.StreamCache`.

    ``cross_process``: identical streamed requests share one upstream stream across
    processes too (several proxy workers on one Redis): the first takes a lease and publishes
    its response as it passes, the others follow it live (``shared``). The lease lasts
    ``cross_process_lease`` seconds and is renewed while its holder lives: a follower that
    hears nothing for that long takes over (docs/single-flight.md). Needs a backend with
    leases and fan-out (Redis).

    ``breaker_failures`` / ``breaker_cooldown``: after that many consecutive backend failures
    (errors or timeouts: 5 by default) the backend is skipped for that many seconds (10), then
    probed by one request; meanwhile a request pays nothing for the cache (0 failures: never
    skip). See :mod:`sse_cache.breaker`.

    ``resume_window``: when a streamed miss's client leaves midway, the app streams on for
    up to that many seconds (and then for as long as anyone reads it) so that the client can
    come back and resume it — ``Last-Event-ID``, or Responses' ``GET /v1/responses/{id}?
    stream=true&starting_after=N`` — and the complete answer is stored. Off (None) by default.

    ``finish_on_disconnect``: when a client leaves a streamed miss midway, let the app finish
    the stream anyway (its disconnect is hidden from it, its output goes nowhere) so that the
    answer is stored for the next request — at most ``max_background`` at once, each for at
    most ``background_timeout`` seconds after the client left. Off by default: the upstream
    call is then abandoned with the client, and nothing partial is stored.

    Every response on a cached route carries ``x-sse-cache: hit | miss | bypass | refresh |
    shared`` and ``x-sse-cache-key``; hits also ``age`` and ``x-sse-cache-ttl``. An invalid
    control header is answered ``400`` with a JSON error naming it.
    """

    def __init__(
        self,
        app: ASGIApp,
        backend: Backend | str,
        *,
        options: CacheOptions | None = None,
        finish_on_disconnect: bool = False,
        max_background: int = 8,
        background_timeout: float = 120.0,
        **keywords: Any,
    ) -> None:
        # Checked as the caching options are (a string such as "no" is not taken as true,
        # NaN or infinity never turns the limits off), each error naming the option.
        boolean("finish_on_disconnect", finish_on_disconnect)
        self.app = app
        self.finish_on_disconnect = finish_on_disconnect
        bound = integer("max_background", max_background, minimum=0, what="a whole number >= 0")
        self.background_timeout = positive_number("background_timeout", background_timeout)
        self._outer_checked = False
        own = ("finish_on_disconnect", "max_background", "background_timeout")
        self.service = CacheService(backend, CacheOptions.of(options, keywords, own))
        #: Streams read on without their client (background completions, resume windows).
        self.slots = BackgroundSlots(bound, self.service.hooks)

    @property
    def max_background(self) -> int:
        """At most this many streams are read on without their client at once."""
        return self.slots.bound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._outer_checked:
            self._outer_checked = True
            _warn_if_inside_base_http_middleware(send)
        path = request_path(scope)
        if scope["method"] == "GET":
            # A client resuming a stream by its id (Responses): answered from its live stream
            # while it is produced here, from the cache once stored.
            query = scope.get("query_string", b"").decode("latin-1")
            answer = await self.service.resume("GET", path, query, _headers(scope))
            if answer is not None:
                # No exchange holds a resume's answer: closed here however its send ends
                # (a client gone before its head left its place in the live stream taken,
                # and its upstream read to the end after the resume window; helper-122).
                async with contextlib.aclosing(answer):
                    await _send_answer_while_connected(receive, send, answer)
                return
        if self.service.policy.match(scope["method"], path) is None:
            await self.app(scope, receive, send)
            return
        # The headers as they came with the request's head, for the key and for the app
        # alike: uvicorn's httptools adds a chunked body's trailer fields to the scope's list
        # as they arrive, after the head (helper-157: a trailer ``Connection: openai-beta``,
        # sent late, dropped that header from what the proxy forwarded, but not from the key).
        # A new list in the same scope: a copy of the scope hid what the app's router writes
        # into it (its route, endpoint) from middleware around the cache (helper-159).
        scope["headers"] = list(scope["headers"])
        await _Request(self, scope, receive, send).run(path)

    async def aclose(self) -> None:
        """Close the backend if the middleware opened it from a URL."""
        await self.service.aclose()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Pass the lifespan protocol through, and close our backend at shutdown (opened again
        # at the next startup: an app served again, as a test client serves it once per
        # ``with`` block, found its cache closed for good; helper-95).
        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.service.reopen()
            return message

        async def sending(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        await self.app(scope, receiving, sending)


#: Why a request passed through uncached when its client left before sending all of its body
#: (the ``bypass`` notice's ``detail``: the access log's reason).
LEFT_MID_BODY = "the client left before its request body was complete"
#: ... and why a request following a live stream was not answered.
LEFT_WAITING = "the client left while it waited for the head of the live stream it follows"


def _declared_length(headers: list[tuple[str, str]]) -> int | None:
    """A response's ``content-length``, or None (none, or not one number)."""
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _warn_if_inside_base_http_middleware(send: Send) -> None:
    """Warn (once per middleware) when it runs inside Starlette's ``BaseHTTPMiddleware``
    (FastAPI's ``@app.middleware("http")``): that layer ends a response cleanly when the app
    inside it raises mid-stream, so every stream the cache aborts (a follower whose
    producer's upstream failed, an upstream cut mid-answer) would reach the client as a
    clean, truncated end: a partial answer that looks complete."""
    if "BaseHTTPMiddleware" in getattr(send, "__qualname__", "") or _under_base_http_middleware():
        logger.warning(
            "sse_cache: CacheMiddleware runs inside Starlette's BaseHTTPMiddleware (FastAPI's "
            "@app.middleware('http')), which ends a response cleanly when the app inside it "
            "fails mid-stream: a stream cut short would reach clients as a clean, truncated "
            "answer. Write that layer as a pure ASGI middleware, or, if it need not run for "
            "hits, add CacheMiddleware after it (outside it) (docs/asgi.md, 'Order matters')."
        )


def _under_base_http_middleware() -> bool:
    """This request runs inside Starlette's ``BaseHTTPMiddleware``, also with layers between
    (GZip's or CORS's own ``send`` hides its ``send``): the app task it starts runs a
    function of ``starlette/middleware/base.py``, which is on this task's stack. (Looked at
    once, at the middleware's first request.)"""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if name.endswith("/starlette/middleware/base.py"):
            return True
        frame = frame.f_back
    return False


class _Leaving:
    """``async with`` it leaves an exchange already entered, as ``async with`` the exchange
    would have (what an ``AsyncExitStack``'s ``pop_all`` does, for less on every hit)."""

    __slots__ = ("_exchange", "whole")

    def __init__(self, exchange: AbstractAsyncContextManager[Exchange]) -> None:
        self._exchange: AbstractAsyncContextManager[Exchange] | None = exchange
        #: The answer was whole before the app ended: left as such whatever ends the block
        #: (the app raising or stopped after it), the error going on.
        self.whole = False

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return None  # left already: the answer was whole before the app returned
        if self.whole:
            # Shielded: it may run inside the app's send, in its cancel scopes (Starlette
            # cancels a response's send when its client leaves), and a cut exit would drop
            # the answer's index (its response id) with the stored entry kept. (The
            # backend's timeout bounds it.)
            with anyio.CancelScope(shield=True):
                await exchange.__aexit__(None, None, None)
            return None
        return await exchange.__aexit__(exc_type, exc, tb)


class _Request:
    """The state of one request through the middleware."""

    def __init__(self, mw: CacheMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self.receive = receive
        self.client_send = send
        self._hooked = bool(mw.service.hooks)
        self.started = time.monotonic()  # the request arrived
        self.first_byte_sent = False
        self.buffered: list[Message] = []  # request body messages, re-delivered to the app
        self.tee: ResponseTee | None = None
        self.exchange: Exchange | None = None
        self.disconnected = False  # the client is gone (it disconnected, or a send failed)
        self.held_end = False
        # The bytes the response's declared length still counts (its content-length): the
        # byte that completes it is held with the end (see _send). None: no length.
        self.length_left: int | None = None
        self.held_tail = b""  # ... that byte, once sent by the app
        self.detached = False  # the client left; the app goes on for followers or the cache
        self.teed = False  # the response's head went through the tee (or was not teed)
        self.left_before_head = False  # ... the client left before, unknown to the app
        self.background = False  # ... counted against max_background (finish_on_disconnect)
        self.holding = False  # ... counted against it too: read on for a resume window
        self.app_done = False  # the app has returned or raised: the counts are given back
        self.slot_refused = False  # a slot was refused it: said once (_take_slot)
        self.abandoned = False  # the last follower left: the app was cancelled
        self.app_scope: anyio.CancelScope | None = None
        self.tasks: anyio.abc.TaskGroup | None = None
        self.outbox: _Outbox | None = None  # the client's messages, while others may follow
        self.send_error: Exception | None = None  # sending to the client failed: for the app
        self.cut = ""  # why the client was cut off (it fell too far behind the stream, the
        # app ended its body short of its length)
        self.hold_scope: anyio.CancelScope | None = None  # the resume window, while it runs
        self.leaving: _Leaving | None = None  # leaves a miss's exchange (stores its answer)

    @property
    def send(self) -> Send:
        """What sends to the client: with hooks, by way of :meth:`_send_first`, which notes the
        first bytes. (Made on each use, not kept: a bound method kept on this object would
        make a reference cycle, and every request's objects garbage for the cycle
        collector.)"""
        return self._send_first if self._hooked else self.client_send

    async def run(self, path: str) -> None:
        """Answer the request to ``path`` (:func:`request_path` of its scope)."""
        scope = self.scope
        body = await self._read_body()
        service = self.mw.service
        if body is None and self.buffered[-1]["type"] == "http.disconnect":
            # The client left before its body was complete: there is no one to answer, and
            # the part of a request that came must never reach the app (the upstream) as a
            # request. (Said to the hooks: the access log's reason, the bypass count.)
            emit(service.hooks, Notice(kind="bypass", key="", detail=LEFT_MID_BODY))
            return
        try:
            decision = service.decide(
                scope["method"],
                path,
                _headers(scope),
                body,
                scope.get("query_string", b"").decode("latin-1"),
            )
        except ConfigError as exc:
            await _error(self.send, 400, str(exc))
            return
        # The joined body is decided: the app gets the messages as they came (kept in
        # self.buffered), and a body of many is not held twice while the answer streams.
        del body
        # (Not a bound method of this request: the exchange keeps it, and a cycle would leave
        # every request's objects to the cycle collector; see `send`.)
        gone = partial(until_disconnect, self.receive)
        exchange = service.exchange(decision, publish=True, client_gone=gone)
        del decision  # (the exchange keeps what it needs of it: not the decoded body)
        try:
            ex = self.exchange = await exchange.__aenter__()
        except FollowerLeft:
            # Its client left while it waited for the head of the live stream it follows:
            # no one to answer (its place there is given back). Counted as what it was, a
            # follower, with why it has no answer (a "bypass" it was counted as: uncacheable
            # traffic rose as users gave up on a slow first token; helper-154).
            notice = Notice(kind="shared", key=exchange.key, detail=LEFT_WAITING)
            emit(service.hooks, notice)
            return
        leave = _Leaving(exchange)
        if ex.answer is not None:
            # A hit, or another request's live stream: sent from here, with nothing
            # running beside it (so no task group: most requests are hits).
            async with leave:
                await _send_answer_while_connected(self.receive, self.send, ex.answer)
            return
        # A miss: the app answers, teed. The exchange is left (the answer stored) inside the
        # task group, before it waits for the tasks that may still send to the client.
        self.leaving = leave
        producing = False
        raised_after: Exception | None = None  # the app's error after its whole answer
        try:
            async with task_group() as self.tasks:
                producing = True  # from here on, _produce leaves the exchange
                try:
                    await self._produce(leave)
                except Exception as exc:
                    if not leave.whole:
                        await self._send_held_tail()
                        raise
                    # After its whole answer was stored and ended (a background task that
                    # failed): the client still gets all of it, then the error is raised.
                    raised_after = exc
                else:
                    await self._send_held_tail()
                if self.hold_scope is not None:
                    self.hold_scope.cancel()  # the stream is over: nothing more to hold
                outbox = self.outbox
                if outbox is not None:
                    # The app is done; the client gets the rest at its own pace (the end of
                    # the response only after the answer was stored, as below).
                    if self.held_end:
                        outbox.put(self._end())
                    outbox.close()
        except BaseException as exc:
            if not producing:
                # The task group failed to open: leave the exchange here, failed, or its
                # live flight would never end and every later identical request would wait
                # on it.
                await leave.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if raised_after is not None:
            raise raised_after
        if self.cut:
            # Visible to the client: its response is aborted, never ended cleanly.
            raise SharedStreamAborted(self.cut)
        if self.held_end and not self.disconnected and self.outbox is None:
            # The answer is stored (and indexed) now: end the response. A client that sends
            # the same request right after this one finished is sure to find it.
            with contextlib.suppress(Exception):
                await self.send(self._end())

    async def _produce(self, exchange: _Leaving) -> None:
        # The app's response to a miss, through the tee; leaving ``exchange`` stores it.
        try:
            async with exchange:
                with anyio.CancelScope() as self.app_scope:
                    try:
                        await self.mw.app(self.scope, self._receive, self._send)
                    except BaseException as exc:
                        # After its last body message, an error (Starlette's
                        # BaseHTTPMiddleware sends that message, then re-raises the app's
                        # error) is not an end. (Stopped by us after it, say at the background
                        # deadline, the response was whole: it ends below.)
                        stopped = self.app_scope.cancel_called
                        if self.held_end and self.tee is not None and not stopped:
                            self.tee.fail(f"the app raised after its last body message: {exc!r}")
                        raise
                tee = self.tee
                if tee is not None:
                    if self.held_end:
                        # The response's end counts once the app has returned: until then
                        # an error may still undo it (see _send).
                        tee.end()
                    elif self.app_scope.cancelled_caught:
                        # Stopped before its end: complete if what was read holds the
                        # completing event (every reader stopped at chat's [DONE], as the
                        # SDKs do), else failed.
                        tee.stop(
                            "every reader left before the stream ended"
                            if self.abandoned
                            else "the background completion ran out of time"
                        )
        finally:
            slots = self.mw.slots
            for _ in range(self.background + self.holding):
                slots.give()
            self.app_done = True  # nothing left to finish or hold: never counted again

    async def _send_first(self, message: Message) -> None:
        if (
            not self.first_byte_sent
            and message["type"] == "http.response.body"
            and message.get("body")
        ):
            self.first_byte_sent = True
            self._first_byte()
        await self.client_send(message)

    def _first_byte(self) -> None:
        # The time to first byte, by cache status (metrics): what the client waited for.
        ex = self.exchange
        if ex is not None:
            ex.first_byte(time.monotonic() - self.started)

    async def _read_body(self) -> bytes | None:
        """The whole request body, or None when it is over the limit (then the messages read
        so far are kept and re-delivered; the rest is read by the app itself)."""
        limit = self.mw.service.policy.max_body_bytes
        size = 0
        while True:
            message = await self.receive()
            self.buffered.append(message)
            if message["type"] != "http.request":
                return None  # disconnected before the body was complete
            size += len(message.get("body", b""))
            if size > limit:
                return None
            if not message.get("more_body", False):
                break
        if len(self.buffered) == 1:  # (most bodies come in one message)
            return bytes(message.get("body", b""))  # (no copy of bytes)
        return b"".join(m.get("body", b"") for m in self.buffered)

    async def _receive(self) -> Message:
        if self.buffered:
            return self.buffered.pop(0)
        message = await self.receive()
        if message["type"] == "http.disconnect" and self._client_gone():
            # Hide the disconnect: the app streams on, to a client that is gone, for the
            # followers of this stream or to store the complete answer.
            await anyio.sleep_forever()
        return message

    def _client_gone(self, *, resumable: bool = True) -> bool:
        """The client disconnected, or a send to it failed. True when the app goes on.
        ``resumable``: False for a client that left before the head (judged once it came),
        which has nothing to resume by: no resume window holds its stream."""
        self.disconnected = True
        if self.outbox is not None:
            self.outbox.stop()
        if self.detached:
            return True
        tee = self.tee
        if tee is None:
            return False if self.teed else self._gone_before_head()
        if tee.ended or tee.cut:
            return False
        if self.held_end:
            # The app sent all of its body and works on after it (a background task): it
            # finishes, and its end counts then, whoever still reads.
            self.detached = True
            return True
        if tee.answered:
            # The client left with the whole answer (the SDKs close at chat's [DONE]).
            tee.stop("the client left after the completing event")
        if tee.ended:
            self._leave_now()
            return False
        if tee.cut:
            # Stopped, and failed (a failure event after the answer): nothing to finish or
            # hold (helper-140: a slot was taken to run it out for nothing).
            return False
        window = tee.resume_window if resumable else None
        keep = self._finish_in_background  # (asked when the last follower leaves)
        if window is None and tee.followed and tee.client_left(self._abandon, keep=keep):
            self.detached = True  # for as long as followers read
            return True
        if self._finish_in_background():
            # For the flight, the producer is still reading (followers keep joining).
            self.detached = True
            return True
        if window is not None and self.tasks is not None and self._take_slot():
            # The client may come back for the rest (it resumes): the app streams on for the
            # resume window, and after it for as long as anyone reads the stream. At most
            # max_background at once, with the background completions: each holds an
            # upstream call and up to two copies of max_entry_bytes (helper-83: 20 clients
            # leaving at once passed 1.5 GB). Past that, as without a window.
            if not tee.client_left(self._abandon, hold=True, keep=keep):
                self.mw.slots.give()
                return False
            self.holding = True  # (its slot is given back when the app is done: _produce)
            self.detached = True
            self.hold_scope = anyio.CancelScope()
            self.tasks.start_soon(self._hold, tee, self.hold_scope)
            return True
        if tee.client_left(self._abandon, keep=keep):
            self.detached = True  # for as long as followers read
            return True
        return False

    def _gone_before_head(self) -> bool:
        """The client left before the response's head went through the tee: the app waits
        for its upstream's head (the time to first byte, when clients time out and herds
        gather). The app goes on (True) when others wait for this stream, or it is to be
        finished in the background (a slot taken, its deadline set): judged again once the
        head has come (_send), as after it. Not for a resume window: a client gone before
        the head has nothing to resume by (no event, no response id), and holding for it
        took no slot and had no deadline (helper-138). Otherwise the app is told, and
        nothing it sends after that is shared or stored: an app may answer a client that
        left with a clean end (Starlette's BaseHTTPMiddleware does), which is no end of the
        upstream's (helper-135: a truncated stream stored, and followers ended cleanly on
        it)."""
        ex = self.exchange
        if ex is None or self.tasks is None or self.app_done:
            return False
        keep = self._finish_in_background  # (asked when the last follower leaves)
        if ex.read_on_for_others(self._abandon, keep) or (
            ex.may_store and self._finish_in_background()
        ):
            self.detached = True
            self.left_before_head = True
            return True
        ex.let_go("the client left before the response began")
        return False

    def _leave_now(self) -> None:
        """The stream ended, whole, before the app did: it is stored and the followers'
        streams end now, not once the app returns (it learns its client left, but may take
        its time: a sync generator in a thread stops only at its upstream's next chunk)."""
        leaving = self.leaving
        if leaving is None or self.tasks is None or leaving.whole:
            return
        leaving.whole = True
        self.tasks.start_soon(leaving.__aexit__, None, None, None)

    async def _hold(self, tee: ResponseTee, scope: anyio.CancelScope) -> None:
        with scope:  # cancelled when the stream ends first
            await tee.release_after_window()

    def _take_slot(self) -> bool:
        """Take one of the ``max_background`` slots (background completions and resume
        windows share them), if one is free: never once the app is done, whose end gave the
        counts back (_produce). (The last follower of a failed stream leaves after the app: a
        slot taken then was never given back; helper-86: after eight, no stream was finished
        in the background any more.)"""
        if self.app_done:
            return False
        # One stream asks up to three times (background completion, resume window, its last
        # follower leaving): its refusal is told once (helper-133: counted thrice).
        taken = self.mw.slots.take(tell=not self.slot_refused)
        self.slot_refused = self.slot_refused or not taken
        return taken

    def _finish_in_background(self) -> bool:
        """With ``finish_on_disconnect``, while fewer than ``max_background`` do: the app
        finishes this stream, that no client reads any more, to store it, within
        ``background_timeout``. False otherwise."""
        mw = self.mw
        if self.background:
            return True
        if not mw.finish_on_disconnect or not self._take_slot():
            return False
        self.background = True  # (its slot is given back when the app is done: _produce)
        if self.app_scope is not None:
            self.app_scope.deadline = anyio.current_time() + mw.background_timeout
        return True

    async def _abandon(self) -> None:
        # The last follower left before the end (the producer's client had left already),
        # and the stream is not finished in the background: the flight asked that first
        # (``keep``), unless it had failed — then there is nothing to finish. Stop the app
        # (and its upstream call).
        self._stop_app()

    def _stop_app(self) -> None:
        # No one reads this stream any more: the app is stopped (and its upstream call).
        self.abandoned = True
        if self.app_scope is not None:
            self.app_scope.cancel()

    async def _send(self, message: Message) -> None:
        ex = self.exchange
        assert ex is not None
        if self.send_error is not None:
            raise self.send_error  # the client is gone and no one else reads: stop the app
        if message["type"] == "http.response.start":
            raw = message.get("headers", [])
            decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
            ends = message.get(ENDS_BY_ITSELF, True)  # (the proxy's forwarder says)
            self.tee = await ex.tee(message["status"], decoded, ends_by_itself=ends)
            self.teed = True
            if self.tee is not None:
                self.length_left = _declared_length(decoded)
            if self.left_before_head:
                # Its client left before this head (while the tee was made, too): now that
                # the stream is known, the app goes on only if it is still wanted.
                self.left_before_head = self.detached = False
                if not self._client_gone(resumable=False):
                    self._stop_app()
                    return
            elif self.disconnected and self.tee is not None:
                # ... and the app was told (during the tee's making: let go since).
                self.tee.fail("the client left before the response began")
            message = dict(message)
            message["headers"] = merge_headers(raw, ex.headers())
            await self._deliver(message)
            tee = self.tee
            if tee is not None:
                limit = tee.lag_limit
                if limit is not None and self.tasks is not None and not self.disconnected:
                    # Others may read this stream: the client is sent to by its own task.
                    self.outbox = _Outbox(self.send, self._send_failed)
                    self.tasks.start_soon(self.outbox.run)
                await tee.flush()  # the head, to followers in other processes at once
            return
        if message["type"] == "http.response.body":
            tee = self.tee
            if tee is None:
                await self._deliver(message)
                return
            final = not message.get("more_body", False)
            chunk = sent = message.get("body", b"")
            if self.length_left is not None and chunk:
                sent = self._hold_completing_byte(chunk)
            if final and self.length_left:
                # The app ended its body short of its own content-length: a cut, as its
                # server would have it (the end fails there, the connection is closed).
                # It was stored as a whole answer, and its client waited for the rest, the
                # end's failure swallowed here (helper-165).
                self.cut = f"the app ended its body {self.length_left} bytes short of its length"
                self.length_left = None
                if sent:
                    await self._deliver({**message, "body": sent, "more_body": True})
                tee.relay(chunk)
                tee.fail(self.cut)
                return
            if final:
                # Deliver all of the body now, but hold the end of the response until the
                # exchange has stored the answer (read-your-writes for the next request).
                # For the followers and the recording too, the end is held until the app has
                # returned (_produce): an app may still raise after its last body message
                # (Starlette's BaseHTTPMiddleware sends one for an app that failed mid-way),
                # and that stream was cut, not complete.
                self.held_end = True
            if sent or not final:
                # Deliver first, pass on second.
                if final or sent is not chunk:
                    message = {**message, "body": sent, "more_body": True}
                await self._deliver(message)
            tee.relay(chunk)
            await tee.flush()
            if final and (self.length_left == 0 or tee.answered):
                await self._end_whole(tee)
            elif self.detached and tee.end_if_answered():
                # The producer's client left and followers read on: the answer is complete
                # (stored, their streams ended with it), whenever the app would end its body.
                # No one is left to read: the app is stopped (the proxy closes the upstream).
                assert self.app_scope is not None
                self.app_scope.cancel()
            return
        await self._deliver(message)

    def _hold_completing_byte(self, chunk: bytes) -> bytes:
        """What of ``chunk`` goes to the client now: all of it, but for the byte that
        completes the response's declared length, held with the end (:meth:`_end`). With a
        ``content-length``, that byte ends the response for the client, as the last chunk
        does for a chunked one: sent before the answer is stored, a client asking again
        right away could miss it (helper-73: 13 of 30 with two workers)."""
        left = self.length_left
        assert left is not None and self.tee is not None
        if len(chunk) > left:
            # More than it declared: the app broke its own length (the server refuses the
            # excess, and the response fails). No answer to store or share.
            # What it sent goes out as it was sent, the byte held first.
            self.length_left = None
            self.tee.fail("the app sent more than its content-length")
            tail, self.held_tail = self.held_tail, b""
            return tail + chunk
        self.length_left = left - len(chunk)
        if self.length_left:
            return chunk
        self.held_tail = chunk[-1:]
        return chunk[:-1]

    async def _send_held_tail(self) -> None:
        """The app stopped without its final body message, its whole declared length sent
        (it broke ASGI, or it raised there): the byte held goes out as the app sent it, not
        as an end. Its client had every byte without the middleware (uvicorn then closes
        the connection); nothing is stored, the response never ended."""
        if not self.held_tail or self.held_end:
            return  # none held, or it goes with the end (_end)
        tail, self.held_tail = self.held_tail, b""
        message = {"type": "http.response.body", "body": tail, "more_body": True}
        # Not through _deliver: the app is done, and a client found gone now must not be
        # given to the background (_client_gone), whose count _produce gave back already.
        if self.outbox is not None:
            self.outbox.put(message)
        elif not self.disconnected:
            with contextlib.suppress(Exception):  # (a client gone has nothing more to get)
                await self.send(message)

    async def _end_whole(self, tee: ResponseTee) -> None:
        """The app's last body message completed an answer that cannot be undone: all the
        bytes its ``content-length`` declared, or the schema's completing event, checked.
        It is stored and the response ended now, not once the app returns: work the app
        does after its body (Starlette's background tasks) does not hold the client's end.
        (An answer that may yet be undone — generic SSE, which has no completing event —
        ends once the app has returned: see _produce.)"""
        if self.cut or self.leaving is None:
            return
        tee.end()
        if not tee.ended:
            return
        self.held_end = False
        self.leaving.whole = True
        await self.leaving.__aexit__(None, None, None)  # stores it, ends the followers' reads
        await self._deliver(self._end())

    def _end(self) -> Message:
        # The response's end, held until the answer was stored: with the byte completing
        # its declared length, if it has one.
        tail, self.held_tail = self.held_tail, b""
        return {"type": "http.response.body", "body": tail, "more_body": False}

    async def _deliver(self, message: Message) -> None:
        if self.disconnected:
            return
        outbox = self.outbox
        if outbox is not None:
            outbox.put(message)
            await self._keep_up(outbox)
            return
        try:
            await self.send(message)
        except Exception:
            # The client is gone. If followers (or the cache) still want this stream, the app
            # goes on without it; otherwise the app learns it as usual.
            if not self._client_gone():
                if self.tee is not None:
                    self.tee.fail("sending to the client failed")
                raise

    async def _keep_up(self, outbox: _Outbox) -> None:
        """Bound what waits for a slow client: no more than a follower may fall behind (the
        flight's lag bound, measured as a follower's: past the oldest message it has not
        been sent). With followers, a client further behind is cut off, as a follower would
        be; alone, the app waits for it (the upstream is paced by its only reader)."""
        tee = self.tee
        assert tee is not None
        limit = tee.lag_limit
        if limit is None or outbox.behind <= limit:
            return
        if tee.followed:
            self.cut = f"the client fell more than {limit} bytes behind the stream"
            assert self.exchange is not None  # (a tee is the exchange's)
            logger.info("sse_cache: %s: %s", self.exchange.key, self.cut)
            outbox.cut()
            if not self._client_gone():
                tee.fail(self.cut)
                raise SharedStreamAborted(self.cut)
            return
        await outbox.room(limit)

    def _send_failed(self, exc: Exception) -> None:
        # The client's own task could not send to it: the client is gone.
        if not self._client_gone():
            if self.tee is not None:
                self.tee.fail("sending to the client failed")
            self.send_error = exc

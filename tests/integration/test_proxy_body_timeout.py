"""The proxy's bound on a request body that stops coming (``body_timeout``), on the ASGI
``receive`` it wraps: a piece already there is taken at once, one that comes while the
receive waits is taken when it comes, nothing for ``body_timeout`` is a stall, and once the
body is complete a receive may wait as long as it likes (for the client's disconnect). On
asyncio and trio: a receive that waits is driven on by hand (``_go_on``) and must pass the
event loop's waits and cancellations through as ``await`` would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from sse_cache.proxy import _body_in_time, _BodyStalled

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _receiving(body_timeout: float) -> AsyncIterator[tuple[Any, Any]]:
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](10)
    async with send, receive:
        yield send, _body_in_time(receive.receive, body_timeout)


async def test_pieces_there_and_pieces_that_come_are_taken_then_waits_are_unbounded() -> None:
    async with _receiving(body_timeout=0.5) as (send, receive):
        await send.send({"type": "http.request", "body": b"a", "more_body": True})
        assert (await receive())["body"] == b"a"  # there already
        got: list[dict[str, Any]] = []
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:

                async def take() -> None:
                    got.append(await receive())

                tg.start_soon(take)
                await anyio.wait_all_tasks_blocked()  # it waits for the next piece
                await send.send({"type": "http.request", "body": b"b", "more_body": False})
            assert got == [{"type": "http.request", "body": b"b", "more_body": False}]
            # The body is complete: a wait for the disconnect is not bounded.
            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                await anyio.sleep(0.7)  # (longer than body_timeout: no stall)
                await send.send({"type": "http.disconnect"})
        assert got[-1] == {"type": "http.disconnect"}


async def test_a_body_that_stops_coming_is_a_stall_and_the_wait_is_given_up() -> None:
    async with _receiving(body_timeout=0.2) as (send, receive):
        await send.send({"type": "http.request", "body": b"part", "more_body": True})
        await receive()
        with anyio.fail_after(30), pytest.raises(_BodyStalled, match="for 0.2 s"):  # a guard
            await receive()
        # The receive given up took nothing: what comes next is there for the next one.
        await send.send({"type": "http.request", "body": b"late", "more_body": False})
        assert (await receive())["body"] == b"late"


async def test_a_cancelled_receive_is_cancelled() -> None:
    # A cancellation from outside (the client left, the server stops) reaches the receive
    # waiting inside, as through await: not a stall, and the caller's scope catches it.
    async with _receiving(body_timeout=30) as (send, receive):
        with anyio.fail_after(30):  # a deadlock guard
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
        assert scope.cancelled_caught
        await send.send({"type": "http.request", "body": b"x", "more_body": False})
        assert (await receive())["body"] == b"x"

"""A follower's wait for the head of the live stream it follows, cut short when its client
leaves: here (a local producer's head) or in another process (its channel's head)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

#: Returns once the request's client has left (an ASGI server's ``http.disconnect``).
ClientGone = Callable[[], Awaitable[object]]


class FollowerLeft(Exception):
    """Raised entering an exchange whose client left while it waited for the head of the live
    stream it follows (:meth:`CacheService.exchange`'s ``client_gone``): nothing to answer."""


async def unless_gone(
    wait: Callable[[], Awaitable[T]],
    gone: ClientGone | None,
    what: str,
    *,
    others: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """``await wait()``, while the client is watched (``gone``, if it can be): its leaving
    first cancels the wait and raises :class:`FollowerLeft` naming ``what`` — once
    ``others()`` has returned, if given: it returns when no one else waits on this wait
    (until then it goes on for them). What ``wait()`` raises is raised as it is.

    A follower whose client left before the head held its place until it came, kept a
    producer whose own client had left running for no one, and after ``join_timeout`` asked
    the upstream for a client long gone (helper-138). (A task group on this path only: hits
    never wait for a head.)"""
    if gone is None:
        return await wait()
    left = False
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal left
            await gone()
            if others is not None:
                await others()
            left = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await wait()
        except Exception as exc:
            # Raised after the group, as it is: from inside, the task group would raise it
            # in an ExceptionGroup, which the caller's handlers do not catch (helper-143: a
            # follower whose producer stayed silent past join_timeout failed its request
            # instead of going round).
            failure = exc
        tg.cancel_scope.cancel()
    if left:
        raise FollowerLeft(f"the client left while it waited for {what}")
    if failure is not None:
        raise failure
    return result

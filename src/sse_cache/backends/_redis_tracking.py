"""The connection that carries Redis's invalidations to the Redis backend's near cache.

One connection per backend, outside the connection pool, in RESP2:

1. ``CLIENT ID``, then ``CLIENT TRACKING ON REDIRECT <that id> BCAST PREFIX <data prefix>``:
   Redis reports every key under the prefix that any client modifies, or that expires or is
   evicted, to this same connection (a connection may redirect to itself; in RESP2 the
   reports arrive as Pub/Sub messages, so it must be subscribed);
2. ``SUBSCRIBE __redis__:invalidate``: from its confirmation on, the near cache is live.

A message carries the keys that changed, or nothing on ``FLUSHALL`` / ``FLUSHDB``. A
``PING`` every second that must be answered within the backend's ``timeout`` notices a
connection that died silently (a partition): whatever ends the connection turns the near
cache off and empties it, and the task reconnects with a growing delay (at most
:data:`MAX_RETRY_DELAY` seconds) until tracking is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from .._cancellation import checked
from ._fork import keep
from ._loop_task import LoopTask
from ._redis_near import TrackedValues

__all__ = ["CHANNEL", "MAX_RETRY_DELAY", "PING_INTERVAL", "InvalidationListener", "connection_for"]

logger = logging.getLogger("sse_cache.backends.redis")

CHANNEL: Final = "__redis__:invalidate"
#: Seconds of silence after which the connection is checked with a ``PING``.
PING_INTERVAL: Final = 1.0
FIRST_RETRY_DELAY: Final = 0.05
MAX_RETRY_DELAY: Final = 2.0


def connection_for(
    client: aioredis.Redis, name: str, timeout: float
) -> Callable[[], AbstractConnection]:
    """A factory of connections to ``client``'s server, made as its pool makes them (address,
    TLS, credentials, database), but in RESP2, named ``name`` and without redis-py's own
    health checks (a ``PING`` in Pub/Sub mode answers ``pong``, not ``PONG``)."""
    pool = client.connection_pool
    # Without redis-py's maintenance notifications (RESP3 only; they would also tie this
    # connection to the pool's handler) and their saved originals.
    kwargs: dict[str, Any] = {
        key: value
        for key, value in pool.connection_kwargs.items()
        if not key.startswith(("maint_notifications", "orig_"))
    }
    kwargs.update(
        protocol=2,
        client_name=name,
        health_check_interval=0,
        socket_timeout=timeout,
    )
    connection_class = pool.connection_class
    return lambda: connection_class(**kwargs)


class InvalidationListener:
    """Reads Redis's invalidations for keys starting with ``key_prefix`` into ``values``
    (``key_prefix`` stripped: the backend's own keys), in a task of the event loop that
    first calls :meth:`ensure_running`, until :meth:`aclose`."""

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        key_prefix: str,
        values: TrackedValues,
        *,
        timeout: float,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self._connect = connect
        self._prefix = key_prefix.encode()
        self._values = values
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._task = LoopTask(self._run, "sse-cache redis invalidations")
        self._conn: AbstractConnection | None = None
        self._closed = False

    def running_here(self) -> bool:
        """Whether the task runs on the running loop (False outside one): a value kept
        while it ran elsewhere — on a loop that ended without cancelling it, or in the
        parent of a forked child — is no longer known to be current."""
        return self._task.running_here()

    def forked(self) -> None:
        """In a child of a fork: the task and its connection are the parent's (the parent's
        listener alone reads that socket's invalidations); first use starts anew here."""
        if self._conn is not None:
            keep(self._conn)
        self._conn = None
        self._task.forget()
        self._values.tracking_lost()

    def ensure_running(self) -> None:
        """Start the task on the running loop unless it runs there already (a backend used
        from a new loop, after the old one ended, starts again)."""
        if self._closed or self._task.running_here():
            return
        self._values.tracking_lost()  # (whatever the old task knew does not hold here)
        self._task.ensure()

    def abandon(self) -> None:
        """Its backend was dropped unclosed: stop, from any thread, awaiting nothing."""
        self._closed = True
        self._task.cancel_soon()

    async def aclose(self) -> None:
        self._closed = True
        task = self._task.take_here()
        self._values.tracking_lost()
        if task is None:
            return
        # Closing the connection too ends a read at once (the task checks _closed), where a
        # cancellation that redis-py let through is only noticed after its next call.
        task.cancel()
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        await asyncio.wait([task], timeout=self._timeout * 4)

    async def _run(self) -> None:
        delay = FIRST_RETRY_DELAY
        failing = False
        while not self._closed:
            conn: AbstractConnection | None = None
            try:
                conn = self._conn = self._connect()
                async with asyncio.timeout(self._timeout * 4):
                    await self._subscribe(conn)
                if self._closed:
                    return
                self._values.tracking_up()
                if failing:
                    logger.info("Redis near cache: tracking connection back, near cache on")
                failing = False
                delay = FIRST_RETRY_DELAY
                await self._listen(conn)
            except Exception as exc:
                if not failing and not self._closed:
                    # The type and the message both: some of redis-py's errors have a repr
                    # without their message ("auth:NoPermissionError", with the command
                    # refused only in str()).
                    logger.warning(
                        "Redis near cache off until its tracking connection is back: %s: %s",
                        type(exc).__name__,
                        exc,
                    )
                failing = True
            finally:
                self._values.tracking_lost()
                self._conn = None
                if conn is not None:
                    await conn.disconnect(nowait=True)
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _subscribe(self, conn: AbstractConnection) -> None:
        await checked(conn.connect())  # type: ignore[no-untyped-call]
        await checked(conn.send_command("CLIENT", "ID"))
        client_id = await checked(conn.read_response())
        await checked(
            conn.send_command(
                "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self._prefix
            )
        )
        reply = await checked(conn.read_response())
        if reply not in (b"OK", "OK"):
            raise ConnectionError(f"CLIENT TRACKING answered {reply!r}")
        await checked(conn.send_command("SUBSCRIBE", CHANNEL))
        reply = await checked(conn.read_response())
        if not (isinstance(reply, list) and reply and reply[0] in (b"subscribe", "subscribe")):
            raise ConnectionError(f"SUBSCRIBE {CHANNEL} answered {reply!r}")

    async def _listen(self, conn: AbstractConnection) -> None:
        wait = self._ping_interval
        pinged = False
        while not self._closed:
            reply = await checked(conn.read_response(timeout=wait))
            if reply is None:  # silence for ``wait`` seconds
                if pinged:
                    raise TimeoutError(f"no answer to PING within {self._timeout} s")
                await checked(conn.send_command("PING"))
                pinged, wait = True, self._timeout
                continue
            kind = reply[0]
            if kind == b"message":
                self._invalidate(reply[2])
            elif kind == b"pong":
                pinged, wait = False, self._ping_interval

    def _invalidate(self, names: list[bytes] | None) -> None:
        values = self._values
        if names is None:  # FLUSHALL / FLUSHDB: every key may have changed
            values.flush()
            return
        prefix = self._prefix
        start = len(prefix)
        for name in names:
            if name.startswith(prefix):
                values.invalidate(name[start:].decode("utf-8", "surrogateescape"))

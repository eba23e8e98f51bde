"""Telling Redis which keys the Redis backend's near cache answered.

Redis chooses what to evict under memory pressure (``allkeys-lru``, ``allkeys-lfu`` and the
``volatile-*`` policies) by when each key was last used, or how often. A hit answered from
the near cache never reaches Redis, so the entries a process answers most looked the least
used there, and were evicted first: every near cache then dropped them (Redis reports an
eviction as a change), and the next request for the hottest answer went upstream. So the
keys the near cache answered are sent back to Redis every :data:`TOUCH_INTERVAL` seconds as
``TOUCH`` commands (a use that changes nothing, and that no tracking client is told of): a
round trip per 500 keys a second at most, whatever the traffic.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions as rexc

from .._cancellation import checked
from ._loop_task import LoopTask

__all__ = ["TOUCH_INTERVAL", "Toucher"]

logger = logging.getLogger("sse_cache.backends.redis")

#: Seconds between two rounds of ``TOUCH``: the resolution of Redis's own LRU clock.
TOUCH_INTERVAL: Final = 1.0
#: Keys named in one ``TOUCH`` command.
_BATCH: Final = 500
#: Keys noted between two rounds at most (a round that cannot run, on a loop that ended,
#: must not let the set grow with every key ever answered).
_MAX_KEYS: Final = 20_000


class Toucher:
    """Collects the keys answered from memory (:meth:`note`, synchronous and cheap: on the
    hit path) and ``TOUCH``\\ es them (``key_prefix`` + key) in a task of the event loop
    that last called :meth:`ensure_running`, until :meth:`aclose`. Best effort: a round
    that fails is logged once and dropped (a missed touch only ages a key)."""

    def __init__(
        self,
        client: aioredis.Redis,
        key_prefix: str,
        *,
        timeout: float,
        interval: float = TOUCH_INTERVAL,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._timeout = timeout
        self._interval = interval
        self._keys: set[str] = set()
        self._task = LoopTask(self._run, "sse-cache redis touches")
        self._closed = False
        self._failing = False

    def note(self, key: str) -> None:
        """``key`` was answered from memory: touch it in the next round."""
        keys = self._keys
        if len(keys) < _MAX_KEYS:
            keys.add(key)

    def ensure_running(self) -> None:
        """Start the task on the running loop unless it runs there already."""
        if not self._closed:
            self._task.ensure()

    def forked(self) -> None:
        """In a child of a fork: the task is the parent's; what it had noted is too."""
        self._task.forget()
        self._keys = set()

    @property
    def running(self) -> bool:
        """Whether the rounds go on (on the running loop)."""
        return self._task.running_here()

    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop its task runs on, None if it runs on none."""
        task = self._task.task
        return None if task is None or task.done() else task.get_loop()

    def abandon(self) -> None:
        """Its backend was dropped unclosed: stop, from any thread, awaiting nothing."""
        self._closed = True
        self._task.cancel_soon()

    async def aclose(self) -> None:
        self._closed = True
        task = self._task.take_here()
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task], timeout=self._timeout * 4)

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._interval)
            if self._keys:
                keys, self._keys = self._keys, set()
                await self._touch([self._prefix + key for key in keys])

    async def _touch(self, names: list[str]) -> None:
        try:
            for start in range(0, len(names), _BATCH):
                async with asyncio.timeout(self._timeout * 2 + 0.25):
                    await checked(self._client.touch(*names[start : start + _BATCH]))
        except rexc.NoPermissionError as exc:
            # The user's ACL refuses TOUCH: it will not change, so no more rounds (one
            # refused command a second, for ever, otherwise; helper-104).
            self._closed = True
            logger.warning(
                "Redis near cache: TOUCH is refused by the ACL (%s): Redis may evict the "
                "keys it answers as unused; allow +touch for this user",
                exc,
            )
        except Exception as exc:
            if not self._failing:
                logger.warning(
                    "Redis near cache: could not TOUCH the keys it answered (Redis may evict "
                    "them as unused): %s: %s",
                    type(exc).__name__,
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            logger.info("Redis near cache: TOUCH works again")
        self._failing = False

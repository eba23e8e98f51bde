"""Shared reads: lookups of one key that reach a SQLite backend's worker thread together share
one read of its row instead of queueing one read each on the backend's single connection.

That queue is what a commit causes on a busy proxy: any commit (a miss stored, an eviction, a
purge by another process) empties the near cache, and every hit of a hot key arriving until
the first re-read returns would otherwise go to the worker thread on its own, one at a time,
each copying the whole value out of SQLite.

A lookup joins a read only while that read has not *begun*: the worker thread marks it begun
(under a lock) right before its SELECT. So every lookup that shares a row arrived before the
row was read, and a commit completed before any of them is in it — the same guarantee as a
read of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

from ._fork import reopen_after_fork

__all__ = ["SharedReads"]

T = TypeVar("T")


class _Read(Generic[T]):
    """One read in flight: its result or error, once its owner has it."""

    __slots__ = ("began", "done", "error", "finished", "result")

    def __init__(self) -> None:
        self.began = False  # set on the worker thread, under SharedReads' lock
        self.done = anyio.Event()
        self.finished = False  # the read ran to a result or an error (not cancelled)
        self.result: T | None = None
        self.error: Exception | None = None


class SharedReads(Generic[T]):
    """Reads by key, each shared by the lookups that arrive before it begins. Used from the
    event loop's thread, except ``began`` callbacks, which run on the worker thread."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Read[T]] = {}
        self._lock = threading.Lock()
        reopen_after_fork(self)

    def _forked(self) -> None:
        # A child of a fork: the reads the parent had waiting run in its threads, not here;
        # a lookup that joined one would wait for ever.
        self._waiting = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Reads not begun yet (that a lookup may still join)."""
        return len(self._waiting)

    async def run(self, key: str, read: Callable[[Callable[[], None]], Awaitable[T]]) -> T:
        """The result of a read of ``key`` that begins after this call: one not begun yet
        that another lookup started, or ``read(began)`` started here, where ``began`` must be
        called on the worker thread right before the row is read. A shared read's error is
        raised to every lookup sharing it."""
        with self._lock:
            shared = self._waiting.get(key)
            owner = shared is None
            if shared is None:
                shared = self._waiting[key] = _Read()
        if not owner:
            await shared.done.wait()
            if not shared.finished:
                # Its owner was cancelled (waiting for the connection, or during the read,
                # whose result anyio then drops): read afresh.
                return await self.run(key, read)
            if shared.error is not None:
                raise shared.error
            return shared.result  # type: ignore[return-value]

        def began() -> None:
            with self._lock:
                shared.began = True
                if self._waiting.get(key) is shared:
                    del self._waiting[key]

        try:
            shared.result = await read(began)
        except Exception as exc:
            # (Also when it failed before beginning: the backend is failing for everyone.)
            shared.error, shared.finished = exc, True
            raise
        else:
            shared.finished = True
        finally:
            # Never left joinable: a read that never began (its owner cancelled while it
            # queued for the connection) would keep whoever joins it waiting.
            with self._lock:
                if self._waiting.get(key) is shared:
                    del self._waiting[key]
            shared.done.set()
        return shared.result

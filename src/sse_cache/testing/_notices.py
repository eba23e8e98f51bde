"""A hook that keeps what the cache said, for a test to wait on."""

from __future__ import annotations

import anyio

from .._notices import Notice

__all__ = ["NoticeLog"]


class NoticeLog:
    """A hook (``hooks=[log]``) that keeps every notice, in order (:attr:`seen`), and lets a
    test wait for one: what the cache did, not when, with no sleeps to order the test by."""

    def __init__(self) -> None:
        self.seen: list[Notice] = []
        self._more = anyio.Event()

    def __call__(self, notice: Notice) -> None:
        self.seen.append(notice)
        # Set, then replaced: every waiter holds the event of its own wait.
        self._more.set()
        self._more = anyio.Event()

    async def wait(self, kind: str, key: str | None = None) -> Notice:
        """The first notice of ``kind`` (about ``key``, if given), once there is one."""
        while True:
            for notice in self.seen:
                if notice.kind == kind and (key is None or notice.key == key):
                    return notice
            await self._more.wait()

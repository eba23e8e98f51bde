"""The Redis backend's near cache as a pure state machine: hot values kept in this process,
trusted only while Redis's invalidations are known to reach us (no I/O here; the connection
that carries them is :mod:`~sse_cache.backends._redis_tracking`).

Redis tells us about every change to a key under the backend's prefix (``CLIENT TRACKING
... BCAST``), but on another connection than the one a ``GET`` went out on. So an
invalidation for a write made *after* our ``GET`` ran on the server can be handled *before*
that ``GET``'s reply reaches us; keeping the reply then would keep a stale value until the
next write of that key, however long that is. Each read therefore takes a :class:`Ticket`
before it is sent: the state of a counter for the key's bucket, bumped by every invalidation
of a key in that bucket, and of an epoch bumped by a flush and by the loss of the tracking
connection. The reply is kept only if neither moved meanwhile. An invalidation that comes
*after* the reply was kept drops it as usual; one for a write made *before* the ``GET`` ran
costs at most a needless round trip.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ._near import NearCache

__all__ = ["BUCKETS", "Ticket", "TrackedValues"]

#: How many counters guard the reads: a read is refused only when a key of its bucket was
#: invalidated while it was in flight, so more buckets refuse fewer reads needlessly.
BUCKETS: Final = 4096
# NearCache trusts values under one version of the store; here that is simply "tracked".
_TRACKED: Final = "tracked"


class Ticket(NamedTuple):
    """What a read noted before it was sent (:meth:`TrackedValues.begin`)."""

    bucket: int
    epoch: int
    seen: int


class TrackedValues:
    """Values by key (at most ``max_bytes`` in all, least recently used dropped first) that
    Redis's invalidations keep current; ``max_bytes=0`` keeps nothing.

    Nothing is answered or kept while tracking is down (:meth:`tracking_lost` until
    :meth:`tracking_up`): invalidations missed meanwhile cannot leave a stale value. Not
    thread-safe: one event loop uses it."""

    def __init__(self, max_bytes: int, *, buckets: int = BUCKETS) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets!r}")
        self._near = NearCache(max_bytes)
        self._counts = [0] * buckets
        self._epoch = 0
        #: Whether the tracking connection is subscribed, so that invalidations reach us.
        self.live = False

    def __len__(self) -> int:
        return len(self._near)

    def __contains__(self, key: object) -> bool:
        return key in self._near

    @property
    def enabled(self) -> bool:
        return self._near.enabled

    @property
    def size(self) -> int:
        return self._near.size

    def get(self, key: str, now: float) -> bytes | None:
        """The value kept for ``key``, unexpired at ``now`` (the clock the deadlines were
        computed with), while tracking is up; else None."""
        if not self.live:
            return None
        return self._near.get(key, now)

    def begin(self, key: str) -> Ticket | None:
        """Note the state of ``key``'s bucket before a read of it is sent; None when its
        reply could not be kept anyway (tracking down, or no room at all)."""
        if not self.live or not self._near.enabled:
            return None
        bucket = hash(key) % len(self._counts)
        return Ticket(bucket, self._epoch, self._counts[bucket])

    def complete(
        self, key: str, ticket: Ticket | None, value: bytes, deadline: float | None
    ) -> bool:
        """Keep ``value``, the reply of the read that took ``ticket``, expiring at
        ``deadline``, unless an invalidation that may concern it, a flush or a loss of
        tracking happened since the ticket was taken. True when kept."""
        if (
            ticket is None
            or not self.live
            or ticket.epoch != self._epoch
            or ticket.seen != self._counts[ticket.bucket]
        ):
            return False
        self._near.put(key, value, deadline, _TRACKED)
        return True

    def invalidate(self, key: str) -> None:
        """``key`` changed (an invalidation from Redis, or a write of ours): drop it and
        refuse the replies of reads of its bucket in flight."""
        self._counts[hash(key) % len(self._counts)] += 1
        self._near.discard(key)

    def flush(self) -> None:
        """Everything may have changed (``FLUSHALL`` / ``FLUSHDB``, ``clear``): drop it all
        and refuse every reply in flight."""
        self._epoch += 1
        self._near.clear()

    def tracking_up(self) -> None:
        """The tracking connection is subscribed: from now on, every change is heard."""
        self._epoch += 1
        self.live = True

    def tracking_lost(self) -> None:
        """The tracking connection is gone: changes are no longer heard, so nothing kept
        can be trusted and nothing is kept until :meth:`tracking_up`."""
        self.live = False
        self.flush()

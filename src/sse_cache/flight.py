"""Live streams: one upstream answer being produced, read by its producer's client and by any
number of followers (single-flight).

:class:`Flight` is the sans-IO state machine of one such answer: the response head, the log of
the bytes the producer's client received, who still reads, and how it ended. It has no I/O and
no clock, and is tested with plain values (``tests/core/test_flight.py``, a hypothesis state
machine). :class:`LiveFlight` is its async shell: readers wait on it, and when the producer's
client has gone it can hand its upstream to the followers, who pull it in turn.
:class:`Flights` is the one registry of live streams of a cache: the first miss for a key
*claims* it (becomes the producer) before its upstream call is made, and every identical
request after it follows — atomically, with no ``await`` between the look and the claim.

The rules, which every integration relies on:

- Followers receive exactly the producer's bytes, in order (nothing parsed or re-encoded).
- A reader's stream ends cleanly only when the flight ended cleanly (:meth:`Flight.end`: the
  upstream's response ended by itself) and the reader has every byte before that end. Any
  other end (:meth:`Flight.fail`) is a failure for every reader still reading.
- The producer never waits for a follower: one shared log, no per-follower buffers. A
  follower that falls more than ``max_lag_bytes`` behind is cut (its stream fails), so it
  cannot hold an unbounded log. The log is offered to new followers until it outgrows
  ``max_log_bytes``; after that only the readers already there are served, and what they
  have all read is dropped.
- While anyone reads (the producer's client or a follower) the upstream keeps being read; when
  the last one leaves, the flight is *unwanted* and its upstream is abandoned.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from ._cancellation import on_asyncio
from .errors import SharedStreamAborted

logger = logging.getLogger("sse_cache")

__all__ = [
    "DEFAULT_MAX_LOG_BYTES",
    "Cursor",
    "Flight",
    "SharedStreamAborted",
    "Flights",
    "Head",
    "LiveChunks",
    "LiveFlight",
    "MAX_JOINED_BYTES",
    "Phase",
    "joined",
]

T = TypeVar("T")

#: Default bound of a flight's shared log (and of how far a follower may fall behind).
DEFAULT_MAX_LOG_BYTES = 32 * 1024 * 1024
#: At most this many bytes of the log are joined into one piece for a follower. The joined
#: piece is the follower's own copy, alive until its client has taken it: a follower that
#: catches up on a long log gets it slice by slice, each sent (and drained by a slow client)
#: before the next is made, rather than a copy of the whole log per follower.
MAX_JOINED_BYTES = 64 * 1024
#: Seconds a follower waits for a piece before it asks whether the producer's client stopped
#: reading (:attr:`LiveFlight.stalled`). A client that asked for nothing for a whole look's
#: time stopped: google-genai drops a stream it stops without closing it, and its followers
#: (and every identical request after them) would wait out their read timeout.
STALL_LOOK = 1.0


class Head(msgspec.Struct, frozen=True):
    """The response head the producer's client received."""

    status: int
    headers: list[tuple[str, str]]


class Phase(enum.Enum):
    WAITING = "waiting"
    """The producer has asked its upstream; no response yet."""
    STREAMING = "streaming"
    """The head is known; bytes are flowing."""
    ENDED = "ended"
    """The upstream's response ended by itself, after every byte in the log."""
    FAILED = "failed"
    """It stopped any other way: nothing more is coming, and what came is not whole."""


class Cursor:
    """One follower's place in a flight: the next chunk (an absolute index into the log) and
    the bytes read so far."""

    __slots__ = ("cut", "index", "offset", "reserved")

    def __init__(self) -> None:
        self.index = 0
        self.offset = 0
        self.cut = ""  # why this follower was cut off (fell too far behind)
        self.reserved = False  # (see Flight.follow_on)


class Flight(Generic[T]):
    """The state of one answer being produced (see the module docstring for the rules).

    Its log holds the pieces of the answer as the producer's client got them: chunks of
    bytes for the HTTP integrations, :class:`~sse_cache.events.Event` objects for the engine
    API. Sizes (for the bounds) are the pieces' lengths unless given."""

    __slots__ = (
        "base",
        "chunks",
        "cursors",
        "ends",
        "head",
        "joinable",
        "key",
        "max_lag_bytes",
        "max_log_bytes",
        "phase",
        "producer_reading",
        "reason",
        "reserved",
        "total",
    )

    def __init__(
        self,
        key: str,
        *,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        max_lag_bytes: int | None = None,
    ) -> None:
        if max_log_bytes < 0:
            raise ValueError(f"max_log_bytes must be >= 0, got {max_log_bytes!r}")
        self.key = key
        self.phase = Phase.WAITING
        self.head: Head | None = None
        self.reason = ""
        self.chunks: list[T] = []
        self.ends: list[int] = []  # the byte offset at which each piece of the log ends
        self.base = 0  # pieces dropped from the front of the log
        self.total = 0  # bytes delivered in all
        self.cursors: set[Cursor] = set()
        self.reserved = 0  # cursors kept for a reader that has not come back (follow_on)
        self.producer_reading = True
        self.joinable = True
        self.max_log_bytes = max_log_bytes
        self.max_lag_bytes = max_log_bytes if max_lag_bytes is None else max_lag_bytes

    # -- the producer's side -----------------------------------------------------------------

    def respond(self, head: Head) -> None:
        """The upstream answered: ``head`` is what the producer's client received."""
        if self.phase is Phase.WAITING:
            self.head = head
            self.phase = Phase.STREAMING

    def deliver(self, chunk: T, size: int = -1) -> None:
        """``chunk`` reached (or was handed to) the producer's client; ``size``: its size in
        bytes (default ``len(chunk)``)."""
        if self.phase is not Phase.STREAMING:
            return
        total = self.total = self.total + (len(chunk) if size < 0 else size)  # type: ignore[arg-type]
        if self.cursors or self.joinable:
            self.chunks.append(chunk)
            self.ends.append(total)
        if total > self.max_lag_bytes and self.cursors:
            floor = total - self.max_lag_bytes
            for cursor in self.cursors:
                if cursor.offset < floor and not cursor.cut and self._behind(cursor, floor):
                    cursor.cut = f"fell more than {self.max_lag_bytes} bytes behind the stream"
        if total > self.max_log_bytes:
            self.joinable = False
        if not self.joinable:
            # Closed to newcomers, the log keeps only what an uncut follower has not read:
            # not this piece when every follower is cut (by it or before it). (Checked here:
            # no call per piece while the flight is joinable, the common case.)
            self._trim()

    def _behind(self, cursor: Cursor, floor: int) -> bool:
        # Behind is what a follower has not read past the oldest piece it has not read: one
        # piece larger than the bound (an upstream's burst, or several events parsed from
        # one read and delivered at once) does not cut a follower that had everything before
        # it. What waits for a follower stays under the bound plus one piece.
        oldest = cursor.index - self.base
        return oldest < len(self.ends) and self.ends[oldest] < floor

    def end(self) -> None:
        """The upstream's response ended by itself (cleanly), after every delivered byte."""
        if self.phase is Phase.STREAMING:
            self.phase = Phase.ENDED

    def fail(self, reason: str) -> None:
        """The stream stopped any other way (before or after its head)."""
        if self.phase in (Phase.WAITING, Phase.STREAMING):
            self.phase = Phase.FAILED
            self.reason = reason
            self.joinable = False
            self._trim()

    def close_to_newcomers(self) -> None:
        """No new follower may join: what the followers there have read is dropped."""
        self.joinable = False
        self._trim()

    def producer_left(self) -> bool:
        """The producer's client has gone. True when followers still read: the upstream must
        keep being read for them."""
        self.producer_reading = False
        return len(self.cursors) > self.reserved

    @property
    def wanted(self) -> bool:
        """Someone still reads this flight (its producer's client or a follower; not a
        reserved place whose reader has not come back)."""
        return self.producer_reading or len(self.cursors) > self.reserved

    @property
    def done(self) -> bool:
        return self.phase is Phase.ENDED or self.phase is Phase.FAILED

    # -- followers ---------------------------------------------------------------------------

    def follow(self) -> Cursor | None:
        """A new follower from the first byte, or None when the flight cannot be joined (it
        failed, or its log outgrew ``max_log_bytes``)."""
        if not self.joinable or self.phase is Phase.FAILED:
            return None
        cursor = Cursor()
        self.cursors.add(cursor)
        return cursor

    def follow_on(self) -> Cursor | None:
        """A place for a reader from what was delivered so far on (the producer's client,
        which had it all and stopped reading, to read on as followers do if it comes back),
        also once closed to newcomers; None when the flight failed. Reserved: the log is
        kept for it, but until the reader comes back (:meth:`claim`) it wants nothing — the
        last follower to leave abandons the upstream, and the reader that comes back then
        finds the flight failed."""
        if self.phase is Phase.FAILED:
            return None
        cursor = Cursor()
        cursor.index = self.base + len(self.chunks)
        cursor.offset = self.total
        cursor.reserved = True
        self.cursors.add(cursor)
        self.reserved += 1
        return cursor

    def claim(self, cursor: Cursor) -> None:
        """The reader of a reserved place (:meth:`follow_on`) came back: it reads on."""
        if cursor.reserved and cursor in self.cursors:
            cursor.reserved = False
            self.reserved -= 1

    def unfollow(self, cursor: Cursor) -> None:
        """A follower left (done, or gone). Its cursor reads nothing more: a read still under
        way with it fails (the log may be trimmed past its place)."""
        if not cursor.cut:
            cursor.cut = "this reader left the stream"
        if cursor in self.cursors:
            self.cursors.discard(cursor)
            if cursor.reserved:
                cursor.reserved = False
                self.reserved -= 1
        self._trim()

    def read(self, cursor: Cursor) -> list[T]:
        """The pieces this follower has not read yet (empty: see :meth:`state`)."""
        if cursor.cut:
            return []
        start = cursor.index - self.base
        chunks = self.chunks[start:]
        if chunks:
            cursor.index += len(chunks)
            cursor.offset = self.ends[-1]
            if not self.joinable:
                self._trim()
        return chunks

    def state(self, cursor: Cursor) -> Phase:
        """After an empty :meth:`read`: ``STREAMING``/``WAITING`` (wait for more), ``ENDED``
        (the follower has everything: end cleanly) or ``FAILED`` (fail: :attr:`reason`, or the
        cursor's own ``cut``)."""
        return Phase.FAILED if cursor.cut else self.phase

    def why(self, cursor: Cursor) -> str:
        return cursor.cut or self.reason

    def _trim(self) -> None:
        # Keep what a follower still needs, and everything while new followers may join.
        if self.joinable:
            return
        if not self.cursors:
            self.base += len(self.chunks)
            self.chunks = []
            self.ends = []
            return
        reading = [c.index for c in self.cursors if not c.cut]
        low = min(reading) if reading else self.base + len(self.chunks)
        drop = low - self.base
        if drop > 0:
            del self.chunks[:drop]
            del self.ends[:drop]
            self.base = low


class LiveFlight(Generic[T]):
    """A :class:`Flight` that readers can wait on (the async shell).

    The producer's integration calls :meth:`respond`, :meth:`deliver`, :meth:`end` and
    :meth:`fail` as its response passes; followers iterate :meth:`chunks`. When the
    producer's client leaves while followers remain, the integration either keeps reading
    its upstream itself (the ASGI middleware: its app runs on) or hands over a ``source``
    (:meth:`hand_over`): an async callable that reads one more piece of the upstream into the
    flight and returns False at its end; followers then call it in turn. ``abandon`` is
    called once when the flight becomes unwanted before it is done.
    """

    __slots__ = (
        "_changed",
        "_done",
        "_flights",
        "_pull_task",
        "_waiting",
        "abandon",
        "entry",
        "flight",
        "held",
        "isolated",
        "judge",
        "keep",
        "producer_cursor",
        "production",
        "pulling",
        "remote",
        "settling",
        "source",
        "stalled",
    )

    def __init__(self, flight: Flight[T], flights: Flights | None = None) -> None:
        self.flight = flight
        self._flights = flights
        self._changed = anyio.Event()
        self._waiting = 0
        self._done: anyio.Event | None = None  # (see wait_done)
        self.source: Callable[[], Awaitable[bool]] | None = None
        self.abandon: Callable[[], Awaitable[None]] | None = None
        #: Asked once when the last reader leaves before the end, its upstream not handed
        #: over: True when its integration reads it on to the end itself (a background
        #: completion): the flight goes on as if its producer read it — new identical
        #: requests and resumes join it — instead of being abandoned.
        self.keep: Callable[[], bool] | None = None
        self.pulling = False
        self.isolated = False  # (see hand_over)
        self._pull_task: asyncio.Task[None] | None = None  # (see pull)
        #: The entry judged storable once the stream ended (being stored: a new request is
        #: answered from it), and ``judge``, which judges it on demand when that is deferred.
        self.entry: Any = None
        self.judge: Callable[[], None] | None = None
        #: What the producer keeps with its flight (the engine: its recording and upstream).
        self.production: Any = None
        #: Read to the end for readers elsewhere (followers in other processes): the flight
        #: is not abandoned when no one here reads it.
        self.remote = False
        #: The stream is whole (its upstream ended it, or its answer is complete): what is
        #: left is its producer's exchange (the answer stored, a lease released), then the
        #: followers' streams end (:meth:`end`).
        self.settling = False
        #: Kept being read while no one reads it, for a client that may come back and
        #: resume it (a resume window), until :meth:`release` — then abandoned if unread.
        self.held = False
        #: The producer's own cursor when it reads the log as a follower does (the engine).
        self.producer_cursor: Cursor | None = None
        #: Asked by a follower that waited :data:`STALL_LOOK` seconds for a piece (when set:
        #: the transports' producers): whether the producer's client stopped reading; if so
        #: the readers go on without it (True).
        self.stalled: Callable[[], Awaitable[bool]] | None = None

    @property
    def key(self) -> str:
        return self.flight.key

    @property
    def followers(self) -> int:
        """How many requests follow this stream (its producer not counted)."""
        cursors = self.flight.cursors
        return len(cursors) - (self.producer_cursor in cursors) - self.flight.reserved

    def _notify(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_done(self, seconds: float) -> bool:
        """Wait until the flight has ended or failed, for at most ``seconds``; True
        when it has. (Woken once, where :meth:`wait` is woken by every chunk.)"""
        if self.flight.done:
            return True
        if self._done is None:
            self._done = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._done.wait()
        return self.flight.done

    def _ended(self) -> None:
        if self._done is not None:
            self._done.set()
        if self._flights is not None and not self.pulling:
            # (Ended by a pull, which then leaves the exchange: listed until it returns.)
            self._flights.discard_handed_over(self)

    def pulled(self) -> None:
        """A pull has returned (whoever set :attr:`pulling`): a flight it ended or failed is
        no longer read on."""
        self.pulling = False
        if self.flight.done and self._flights is not None:
            self._flights.discard_handed_over(self)
        self._notify()

    async def wait(self, idle_timeout: float) -> bool:
        """Wait for a change; False when nothing changed for ``idle_timeout`` seconds."""
        self._waiting += 1
        try:
            with anyio.move_on_after(idle_timeout) as scope:
                await self._changed.wait()
        finally:
            self._waiting -= 1
        return not scope.cancelled_caught

    # -- the producer's side -----------------------------------------------------------------

    def respond(self, head: Head) -> None:
        self.flight.respond(head)
        self._notify()

    def deliver(self, chunk: T, size: int = -1) -> None:
        flight = self.flight
        flight.deliver(chunk, size)
        if self._waiting:
            self._notify()
        if not flight.joinable:
            self._unlist()

    def end(self) -> None:
        self.flight.end()
        self._notify()
        self._ended()

    def fail(self, reason: str) -> None:
        self.flight.fail(reason)
        self.source = None  # nothing more is read from it (its abandon closes it)
        self._unlist()
        self._notify()
        self._ended()

    def producer_left(self) -> bool:
        """See :meth:`Flight.producer_left`. When nobody reads any more, the flight fails
        (before the caller abandons its upstream), so that no one joins it — unless it is
        read for readers elsewhere (:attr:`remote`)."""
        if self.flight.producer_left() or self.remote or self.held:
            return True
        if not self.flight.done:
            self.fail("the producer's client left and no one else was reading")
        return False

    def hand_over(
        self,
        source: Callable[[], Awaitable[bool]],
        abandon: Callable[[], Awaitable[None]],
        *,
        isolated: bool = False,
    ) -> None:
        """The producer's client has gone: followers read the upstream through ``source``
        from now on; ``abandon`` closes it when the last of them leaves first.

        ``isolated``: on asyncio, each pull runs in a task of its own (see :meth:`pull`),
        for sources that read the network (an HTTP upstream's body,
        another process's stream), where a task per read costs little. The engine's sources
        give one event a pull, often without waiting: there a task per pull doubled the
        cost of a followed stream."""
        self.source = source
        self.abandon = abandon
        self.isolated = isolated
        if self._flights is not None and not self.flight.done:  # (listed until it ends)
            self._flights.add_handed_over(self)
        self._notify()  # a follower waiting for the producer pulls now

    def close(self, *, keep_readers: bool = False) -> None:
        """The producer is done with this flight (its response was stored or not): it is no
        longer offered to new requests; its readers finish what they hold. With
        ``keep_readers``, a flight still fed by a handed-over source goes on for the readers
        it has (the last of them to leave abandons the source); otherwise one that is not
        done fails."""
        fed = keep_readers and self.source is not None and bool(self.flight.cursors)
        if not self.flight.done and not fed:
            self.fail("the producer stopped before the stream ended")
        self.flight.close_to_newcomers()
        self._unlist()

    def _unlist(self) -> None:
        if self._flights is not None:
            self._flights.discard(self)

    # -- followers ---------------------------------------------------------------------------

    async def wait_head(self, idle_timeout: float) -> Head | None:
        """The head of the producer's response, or None when the flight failed before it had
        one (then the follower has been sent nothing and may ask the upstream itself).
        Raises :class:`SharedStreamAborted` when the producer stays silent ``idle_timeout``
        seconds."""
        flight = self.flight
        while flight.phase is Phase.WAITING:
            if self.source is not None and not self.pulling:
                await self.pull(idle_timeout)
                continue
            if not await self.wait(idle_timeout):
                raise SharedStreamAborted(
                    f"the producer of this stream answered nothing for {idle_timeout} s"
                )
        return flight.head

    async def next_batch(self, cursor: Cursor, idle_timeout: float) -> list[T] | None:
        """The follower's next pieces, in a list of what is ready; None where the flight ended
        cleanly; raises :class:`SharedStreamAborted` where it did not (the reader that was
        pulling the upstream when it failed gets the upstream's own error). A reader that
        waits ``idle_timeout`` seconds for a piece gives up (fails). The reader leaves
        (:meth:`leave`) when it is done, whatever ended it: :meth:`chunks` does."""
        flight = self.flight
        quiet = 0.0  # seconds waited for a piece, looking for a stalled producer meanwhile
        while True:
            chunks = flight.read(cursor)
            if chunks:
                return chunks
            phase = flight.state(cursor)
            if phase is Phase.ENDED:
                return None
            if phase is Phase.FAILED:
                raise SharedStreamAborted(f"the shared stream stopped: {flight.why(cursor)}")
            if self.source is not None and not self.pulling:
                await self.pull(idle_timeout)
                continue
            stalled = self.stalled
            if stalled is None:
                if not await self.wait(idle_timeout):
                    raise SharedStreamAborted(
                        f"the shared stream sent nothing for {idle_timeout} s"
                    )
                continue
            # Every STALL_LOOK seconds without a piece: has the producer's client stopped
            # reading (then the upstream is handed over, and this reader pulls)? The
            # flight's state is looked at again after each look (a change that came as a
            # look timed out wakes no one: the property test hung so).
            look = min(idle_timeout - quiet, STALL_LOOK)
            if await self.wait(look):
                quiet = 0.0
            elif not await stalled():
                quiet += look
                if quiet >= idle_timeout:
                    raise SharedStreamAborted(
                        f"the shared stream sent nothing for {idle_timeout} s"
                    )

    def chunks(self: LiveFlight[bytes], cursor: Cursor, idle_timeout: float) -> LiveChunks:
        """The follower's bytes as they come (:meth:`next_batch`), each batch joined into
        pieces of at most :data:`MAX_JOINED_BYTES` (a longer chunk goes alone, as it is).
        Leaving (closing the iterator) unfollows."""
        return LiveChunks(self, cursor, idle_timeout)

    @property
    def unread(self) -> bool:
        """The handed-over upstream has more to read (see :meth:`drain_turn`)."""
        return self.source is not None and not self.flight.done

    async def drain_turn(self) -> None:
        """One turn of reading the handed-over upstream whether or not anyone here reads it
        (followers in other processes do): wait for the follower that pulls, or pull. Call
        it while :attr:`unread`."""
        if self.pulling:
            await self.wait(math.inf)
        else:
            await self.pull()

    async def pull(self, bound: float = math.inf) -> None:
        """Read the next piece of the handed-over upstream into the flight, for everyone.

        A pull that brings nothing for ``bound`` seconds (the readers' idle timeout) fails
        the flight, whether one reader or several wait on it. When others share it, a reader
        cancelled midway does not cut it for them (an async generator cancelled inside
        ``__anext__`` is finished for good): a source handed over ``isolated`` is pulled in
        a task of its own, on asyncio — every pull, as others may join one begun alone —
        which goes on for the others while the reader leaves at once, whatever cancelled it
        — anyio, or asyncio itself (``task.cancel()``, ``asyncio.timeout``), which anyio's
        shield does not stop; when no one is left, it is stopped. Any other shared pull is
        shielded: the reader finishes it for the others, then leaves by its (anyio)
        cancellation; cancelled by asyncio itself, the upstream's read is cut midway and the
        flight fails, visibly, for everyone. The reader whose pull fails gets the upstream's
        own error; the others see the flight fail."""
        source = self.source
        assert source is not None
        if self.isolated and on_asyncio():
            # Every pull, also one begun alone: another reader may join while it waits.
            await anyio.lowlevel.checkpoint_if_cancelled()
            if self.pulling or self.source is not source:
                return
            self.pulling = True
            task = asyncio.get_running_loop().create_task(self._pull_apart(source, bound))
            self._pull_task = task
            task.add_done_callback(_retrieved)
            try:
                await asyncio.shield(task)  # (cancelled, the reader leaves; the pull goes on)
            except asyncio.CancelledError:
                # The pull itself was stopped (its flight ended at once: end_now), not this
                # reader, which sees the flight's failure rather than a cancellation no one
                # asked of it (helper-144: a follower's SDK call raised CancelledError, and
                # an asyncio.TaskGroup around it ended quietly on part of the answer).
                reader = asyncio.current_task()
                if task.cancelled() and reader is not None and not reader.cancelling():
                    return
                raise
            return
        # Shared too when the stream is read on for readers elsewhere (other processes) or
        # held for a client that may come back: a lone reader cancelled midway must not end
        # it for them.
        flight = self.flight
        shared = len(flight.cursors) > 1 or flight.producer_reading or self.remote or self.held
        if shared:
            await anyio.lowlevel.checkpoint_if_cancelled()
            if self.pulling or self.source is not source:
                return
        self.pulling = True
        try:
            if shared:
                with anyio.CancelScope(shield=True) as scope:
                    scope.deadline = anyio.current_time() + bound
                    more = await source()
                if scope.cancelled_caught:
                    self.fail(f"the upstream sent nothing for {bound} s")
                    # A reader cancelled meanwhile leaves by its cancellation, not this error.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    return
            else:
                with anyio.move_on_after(bound) as scope:
                    more = await source()
                if scope.cancelled_caught:
                    self.fail(f"the upstream sent nothing for {bound} s")
                    return
            if not more:
                self.source = None
        except Exception as exc:
            self.fail(f"the upstream failed: {exc!r}")
            raise
        except BaseException:
            # Cancelled inside an unshielded pull (it was alone when it began): the upstream
            # iterator is finished for good — its next pull would end "cleanly" — so the
            # stream ends here, as a failure, for anyone who joined meanwhile.
            self.fail("the reader pulling the upstream was cancelled mid-read")
            raise
        finally:
            self.pulled()

    async def _pull_apart(self, source: Callable[[], Awaitable[bool]], bound: float) -> None:
        # A pull of an isolated source, in a task of its own (see pull): cancelled only
        # when the flight is abandoned (_abandon_unread).
        try:
            with anyio.move_on_after(bound) as scope:
                more = await source()
            if scope.cancelled_caught:
                self.fail(f"the upstream sent nothing for {bound} s")
            elif not more:
                self.source = None
        except Exception as exc:
            self.fail(f"the upstream failed: {exc!r}")
            raise
        except BaseException:
            self.fail("the flight was abandoned while its upstream was read")
            raise
        finally:
            self._pull_task = None
            self.pulled()

    async def leave(self, cursor: Cursor) -> None:
        """A follower is done (read to the end, failed, or gone); idempotent. The last reader
        to leave a flight that is not done abandons its upstream."""
        self.flight.unfollow(cursor)
        self._notify()  # (a producer whose own client left may wait for no reader left)
        await self._abandon_unread("every reader left before the stream ended")

    async def release(self) -> None:
        """The resume window is over: a flight no one reads any more is abandoned."""
        self.held = False
        await self._abandon_unread("no one resumed the stream within its resume window")

    async def _abandon_unread(self, reason: str) -> None:
        flight = self.flight
        if flight.wanted or self.remote or self.held or flight.phase is Phase.ENDED:
            return
        if self.settling:
            # Whole, and being settled by whoever made it so (a pull storing the answer):
            # the last reader leaving — with the whole answer, as the SDKs leave at chat's
            # [DONE] — does not stop the store (it was cut, and nothing was stored).
            return
        keep, self.keep = self.keep, None
        if keep is not None and self.source is None and flight.phase is not Phase.FAILED and keep():
            # Read on to its end all the same (helper-166: abandoned here, the stream
            # finished for the cache could be neither joined nor resumed meanwhile; when
            # its producer's client had left alone, it could).
            flight.producer_reading = True
            return
        # The last reader left before the end (or after a failure): abandon the upstream.
        self.fail(reason)
        await self._abandon_source()

    async def end_now(self, reason: str) -> None:
        """Its cache is closing: a handed-over upstream is read no more, whoever reads it or
        would (followers here and in other processes, a resume window) — the flight fails
        now, for every reader, and ``abandon`` is called (it leaves the producer's
        exchange while the backend is still open).

        A stream already whole (:attr:`settling`), ended or failed is left to whoever made it
        so (a pull, or the producer's client's own read), which leaves the exchange: waited
        for, while the backend is open — the pull under way, and a whole stream's end (its
        answer stored). (The close failed a whole answer being stored, for its followers too,
        and stopped its store.)"""
        if not (self.flight.done or self.settling):
            self.fail(reason)
            await self._abandon_source()
            return
        with anyio.CancelScope(shield=True):
            while self.pulling or not self.flight.done:
                await self.wait(math.inf)

    async def _abandon_source(self) -> None:
        abandon, self.abandon, self.source = self.abandon, None, None
        with anyio.CancelScope(shield=True):
            task = self._pull_task
            if task is not None:
                # A pull its reader left goes on in its task: stopped before the upstream
                # it reads is closed.
                task.cancel()
                await asyncio.wait({task})
            if abandon is not None:
                await abandon()


def _retrieved(task: asyncio.Task[None]) -> None:
    # A pull whose reader left: its error, if any, was the flight's failure (asyncio would
    # log it as never retrieved).
    if not task.cancelled():
        task.exception()


class LiveChunks:
    """A follower's bytes of a live stream (:meth:`LiveFlight.chunks`): an async iterator
    that leaves the flight once it ends, fails or is closed (``aclose``: idempotent).

    A class, not an async generator: it is read inside the async generator of an answer
    (the hooks' count of the bytes sent), and a response dropped unclosed drops both in
    one collection; the event loop then closes each generator in a task of its own, at
    once, and the second found the first closing it (a follower that was the last reader
    waits there for its upstream to close) and logged "aclose(): asynchronous generator is
    already running" (helper-121). No loop finalizes this: whoever holds it closes it."""

    __slots__ = ("_cursor", "_idle_timeout", "_left", "_live", "_pieces")

    def __init__(self, live: LiveFlight[bytes], cursor: Cursor, idle_timeout: float) -> None:
        self._live = live
        self._cursor = cursor
        self._idle_timeout = idle_timeout
        self._pieces: Iterator[bytes] | None = None  # what is left of the last batch
        self._left = False

    def __aiter__(self) -> LiveChunks:
        return self

    async def __anext__(self) -> bytes:
        pieces = self._pieces
        if pieces is not None:
            piece = next(pieces, None)
            if piece is not None:
                return piece
            self._pieces = None
        if self._left:
            raise StopAsyncIteration
        try:
            batch = await self._live.next_batch(self._cursor, self._idle_timeout)
        except BaseException:
            await self.aclose()
            raise
        if batch is None:
            await self.aclose()
            raise StopAsyncIteration
        pieces = self._pieces = joined(batch, MAX_JOINED_BYTES)
        return next(pieces)

    async def aclose(self) -> None:
        # Also from another task while a read waits (a client's close cancels its read,
        # which may have been woken already): leaving cuts the cursor, so that read fails,
        # never gives a piece past a trimmed part of the log, nor a clean end.
        if not self._left:
            self._left = True
            self._pieces = None
            await self._live.leave(self._cursor)


def joined(chunks: list[bytes], limit: int) -> Iterator[bytes]:
    """``chunks`` in order, consecutive ones joined into pieces of at most ``limit`` bytes; a
    chunk longer than that is a piece of its own, not copied."""
    if len(chunks) == 1:
        yield chunks[0]
        return
    start, size = 0, 0
    for i, chunk in enumerate(chunks):
        if size and size + len(chunk) > limit:
            yield chunks[start] if i - start == 1 else b"".join(chunks[start:i])
            start, size = i, 0
        size += len(chunk)
    if start < len(chunks):
        yield chunks[start] if len(chunks) - start == 1 else b"".join(chunks[start:])


class Flights:
    """The live streams of one cache, by key: the single-flight state. :meth:`claim` is the
    only way in."""

    __slots__ = ("__weakref__", "_handed_over", "_live")  # (metrics hold it weakly)

    def __init__(self) -> None:
        self._live: dict[str, LiveFlight[Any]] = {}
        # Flights whose upstream was handed over (see LiveFlight.hand_over) and that have
        # not ended: listed or not (one whose log outgrew its bound is closed to newcomers,
        # and read on all the same).
        self._handed_over: set[LiveFlight[Any]] = set()

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[LiveFlight[Any]]:
        # Over a copy: metrics may read the registry from another thread while it changes.
        return iter(list(self._live.values()))

    def get(self, key: str) -> LiveFlight[Any] | None:
        return self._live.get(key)

    def claim(
        self, key: str, *, max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    ) -> tuple[LiveFlight[Any], Cursor | None]:
        """Follow the live stream of ``key`` (a cursor), or become its producer (None): the
        flight is registered here before the caller's upstream call, so every identical
        request from now on follows it. Synchronous, hence atomic in an event loop."""
        live = self._live.get(key)
        if live is not None:
            cursor = live.flight.follow()
            if cursor is not None:
                return live, cursor
        new: LiveFlight[Any] = LiveFlight(Flight(key, max_log_bytes=max_log_bytes), self)
        self._live[key] = new
        return new, None

    def discard(self, live: LiveFlight[Any]) -> None:
        if self._live.get(live.key) is live:
            del self._live[live.key]

    @property
    def handed_over(self) -> int:
        """How many flights are read on with no producer (:meth:`LiveFlight.hand_over`) and
        are not over yet (their last pull not returned)."""
        return len(self._handed_over)

    def add_handed_over(self, live: LiveFlight[Any]) -> None:
        self._handed_over.add(live)

    def discard_handed_over(self, live: LiveFlight[Any]) -> None:
        self._handed_over.discard(live)

    async def end_handed_over(self, reason: str) -> None:
        """End every flight whose upstream is read on with no producer (:meth:`LiveFlight.end_now`),
        also one handed over meanwhile: its integration is closing, and the upstream and
        backend they read and write are about to close under them. One whose end fails
        (its upstream's close, say) is logged, and the others are ended all the same."""
        while self._handed_over:
            live = self._handed_over.pop()
            try:
                await live.end_now(reason)
            except Exception as exc:
                logger.warning("sse_cache: ending the stream of %s failed: %r", live.key, exc)

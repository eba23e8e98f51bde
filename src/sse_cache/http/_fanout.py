"""Cross-process single-flight over a backend with leases and fan-out (Redis): the
producer's lease and heartbeats, its channel, and reading another process's stream. Its
Redis calls are timed for the hooks (:class:`TimedFanout`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import anyio
import msgspec

from .. import flight
from .._cancellation import checked
from .._logging import backend_warnings
from .._notices import Hook, Notice, emit
from ..engine import (
    StreamCache,
)
from ..errors import BackendTimeout
from ..flight import Cursor, Head, LiveFlight
from ..keys import new_lease_token
from ..protocols import (
    FanoutBackend,
    LeasingBackend,
)
from ._answers import Answer, _as_shared
from ._watch import ClientGone, FollowerLeft, unless_gone
from ._wire import close_iterator

logger = logging.getLogger("sse_cache")


_CHANNEL = "sf:"
_PRESENCE = "sfr:"
#: How long the name of another process's live stream (for a resume by response id) is
#: kept: past the longest answer; a finished one is resumed from its entry instead.
_LIVE_ALIAS_TTL = 3600.0
_FANOUT_TTL = 60.0  # a finished channel stays readable this long for late followers
_FANOUT_CLOSE_TIMEOUT = 5.0


_T = TypeVar("_T")


class _FanoutBackend(LeasingBackend, FanoutBackend, Protocol):
    """A backend with both capabilities cross-process single-flight needs."""


class TimedFanout:
    """The calls cross-process single-flight makes on ``backend``, each reported to ``hooks``
    as a ``backend`` notice: ``lock`` for the lease (:meth:`acquire`, :meth:`renew`,
    :meth:`release`, :meth:`holder`), ``publish`` for the producer's channel
    (:meth:`publish`, :meth:`finish`). A call that fails is reported too; one cancelled
    midway is not (its duration says nothing about the backend), as for the entry calls.

    :meth:`read` is not timed: a follower's read waits for the producer's next message, so
    its duration is the producer's pace, not the backend's latency."""

    __slots__ = ("backend", "hooks")

    def __init__(self, backend: _FanoutBackend, hooks: tuple[Hook, ...]) -> None:
        self.backend = backend
        self.hooks = hooks

    async def acquire(self, name: str, token: str, ttl: float) -> bool:
        return await self._timed("lock", self.backend.acquire(name, token, ttl))

    async def renew(self, name: str, token: str, ttl: float) -> bool:
        return await self._timed("lock", self.backend.renew(name, token, ttl))

    async def release(self, name: str, token: str) -> None:
        await self._timed("lock", self.backend.release(name, token))

    async def holder(self, name: str) -> str | None:
        return await self._timed("lock", self.backend.holder(name))

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        await self._timed("publish", self.backend.publish(channel, data, ttl=ttl))

    async def finish(self, channel: str, *, ttl: float) -> None:
        await self._timed("publish", self.backend.finish(channel, ttl=ttl))

    def read(self, channel: str, *, block: float) -> AsyncIterator[bytes]:
        return self.backend.read(channel, block=block)

    async def _timed(self, operation: str, call: Awaitable[_T]) -> _T:
        if not self.hooks:  # (no clock to read when no one listens)
            return await call
        started = time.monotonic()
        try:
            result = await call
        except Exception:
            self._report(operation, time.monotonic() - started)
            raise
        self._report(operation, time.monotonic() - started)
        return result

    def _report(self, operation: str, seconds: float) -> None:
        emit(self.hooks, Notice(kind="backend", key="", detail=operation, seconds=seconds))


def _channel(key: str, token: str) -> str:
    # One channel per producer: a follower that takes over from a dead producer publishes to
    # a fresh one, never after the dead one's partial messages.
    return f"{_CHANNEL}{key}:{token}"


def _presence(key: str, token: str) -> str:
    # The lock a process following producer ``token``'s channel holds while it reads it
    # (one per channel: whichever follower took it last), so that the producer knows it is
    # read elsewhere (see _Lease._followed_elsewhere). Named apart from every lease ("sf:").
    return f"{_PRESENCE}{key}:{token}"


class _Presence:
    """A follower process's hold on a channel's presence lock (:func:`_presence`): taken as
    it begins to read, renewed (or taken again, once another follower's hold ran out) every
    third of ``ttl`` while it reads, released when it stops. Fail-open: a Redis error costs
    the producer's knowing, nothing else (its client is then not gone on without)."""

    def __init__(self, fanout: TimedFanout, key: str, holder: str, ttl: float) -> None:
        self._fanout = fanout
        self._name = _presence(key, holder)
        self._token = uuid.uuid4().hex
        self._ttl = ttl
        self._kept_at = -math.inf

    async def keep(self) -> None:
        """Hold it now, unless held within the last third of ``ttl``."""
        now = time.monotonic()
        if now - self._kept_at < self._ttl / 3:
            return
        self._kept_at = now
        fanout, name, token, ttl = self._fanout, self._name, self._token, self._ttl
        try:
            if not await fanout.renew(name, token, ttl):
                await fanout.acquire(name, token, ttl)  # (False: another follower holds it)
        except Exception as exc:
            logger.debug("sse_cache: could not say %s is followed: %r", self._name, exc)

    async def release(self) -> None:
        try:
            await self._fanout.release(self._name, self._token)
        except Exception as exc:  # (it runs out by itself)
            logger.debug("sse_cache: could not release %s: %r", self._name, exc)


class _Lease:
    """Holds a cross-process producer's lock: renews it every third of ``ttl`` and publishes
    a heartbeat (``b"k"``) to its channel, so followers tell a producer that is still
    waiting for its upstream from one that died (no heartbeat for ``ttl``: take over).

    The keeper is an asyncio task: the only backend with leases and fan-out (Redis) runs on
    asyncio only, and the task must outlive the request task that took the lease (a
    transport's response is read by whoever reads it)."""

    def __init__(self, fanout: TimedFanout, lock: str, token: str, ttl: float) -> None:
        self.fanout = fanout
        self.lock = lock
        self.token = token
        self.ttl = ttl
        key = lock[len(_CHANNEL) :]
        self.channel = _channel(key, token)
        self._presence = _presence(key, token)
        # Whether a process follows this stream, and when that was last asked.
        self._followed = False
        self._followed_asked_at = -math.inf
        self._task: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._lost = False  # (said once: the keeper tries to take it back every round)
        #: The producer's client is watched (:meth:`ResponseTee.watch_client`): the keeper
        #: asks it every ``STALL_LOOK`` seconds whether the client stopped reading, for the
        #: followers in other processes, who cannot ask (their local followers ask too) —
        #: only while some process follows it (:meth:`_followed_elsewhere`).
        self.stalled: Callable[[], Awaitable[bool]] | None = None
        self._looking: asyncio.Task[None] | None = None
        # One write to the channel at a time, the response's and the heartbeats alike. A
        # write that timed out is sent again by redis-py while the first may still be
        # applied (a stalled server runs both once it resumes); the channel's append tells
        # a repeat only by the newest entry (_redis_fanout), so a heartbeat written between
        # the two made followers read that piece of the answer twice, and end cleanly.
        self._writing = asyncio.Lock()
        #: A publish failed (:meth:`failed`); and whether the failure marker was written since.
        self.failing = False
        self.told_failed = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio: the lease simply runs out
            return
        self._task = loop.create_task(self._keep(), name=f"sse-cache lease {lock}")

    async def publish(self, message: bytes) -> None:
        """Append ``message`` to the channel, after any write to it under way."""
        async with self._writing:
            await self.fanout.publish(self.channel, message, ttl=_FANOUT_TTL)

    async def finish(self) -> None:
        """Append the end marker, after any write to the channel under way."""
        async with self._writing:
            await self.fanout.finish(self.channel, ttl=_FANOUT_TTL)

    def failed(self) -> None:
        """A publish failed: the followers in other processes miss bytes. The keeper tells
        them (the failure marker ``b"x"``, in place of its next heartbeat) rather than keep
        them waiting, alive but silent, until the response ends — minutes for a long answer
        (helper-150)."""
        self.failing = True

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self.ttl / 3
        while not self._stopping.is_set():
            wait = renew_at - loop.time()
            if self.stalled is not None:
                wait = min(wait, flight.STALL_LOOK)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(wait, 0.0))
                return
            if self.stalled is not None:
                self._look()
            if loop.time() < renew_at:
                continue
            renew_at = loop.time() + self.ttl / 3
            try:
                # (checked: the keeper is cancelled once, and must not go on renewing)
                held = await checked(self._hold())
            except Exception as exc:  # Redis hiccup: try again next round, the lease may hold
                backend_warnings.warning(
                    self.fanout.backend,
                    "renew_failed",
                    "sse_cache: could not renew %s: %r",
                    self.lock,
                    exc,
                )
                continue
            if not held:
                # Another process leads the key now; this one still answers its own
                # followers, on its own channel, so its heartbeats go on.
                lost, self._lost = not self._lost, True
                if lost:
                    logger.warning("sse_cache: lost the cross-process lease of %s", self.lock)
            if self._writing.locked() or self.told_failed:
                continue  # (a write under way shows life enough; or nothing more to say)
            failed = self.failing
            try:
                # Bounded by a round: a stalled Redis gets the same append again until its
                # bound, and a heartbeat past the next round's is no use (it went on for a
                # channel's minute, after the lead had ended; helper-153).
                async with asyncio.timeout(self.ttl / 3):
                    await checked(self.publish(b"x" if failed else b"k"))
                self.told_failed = failed
            except Exception as exc:  # (said apart: a full Redis refuses it, the lease held)
                backend_warnings.warning(
                    self.fanout.backend,
                    "heartbeat_failed",
                    "sse_cache: could not write a heartbeat to %s: %r",
                    self.channel,
                    exc,
                )

    def _look(self) -> None:
        # In a task of its own: going on without the client may end this stream, and its
        # exchange stops this keeper (and waits for it) as it leaves.
        stalled = self.stalled
        if stalled is None or (self._looking is not None and not self._looking.done()):
            return

        async def look() -> None:
            try:
                if await self._followed_elsewhere() and await stalled():
                    self.stalled = None  # (the followers went on without the client)
            except Exception as exc:  # (the backend failed: the followers see it)
                logger.debug("sse_cache: looking at %s's client failed: %r", self.lock, exc)

        self._looking = asyncio.get_running_loop().create_task(
            look(), name=f"sse-cache look {self.lock}"
        )

    async def _followed_elsewhere(self) -> bool:
        """Whether a process follows this stream: its presence lock is held (:class:`_Presence`).
        Asked of Redis at most every third of ``ttl``, as a follower renews it. Else a
        merely slow client with no follower anywhere was gone on without: its upstream was
        read on at full speed into memory, where it lagged, and cut once it fell
        ``max_entry_bytes`` behind (helper-119)."""
        now = time.monotonic()
        if now - self._followed_asked_at >= self.ttl / 3:
            self._followed_asked_at = now
            self._followed = await self.fanout.holder(self._presence) is not None
        return self._followed

    async def _hold(self) -> bool:
        """Renew the lease, or take it again when it is gone: Redis evicts a lease like any
        key under memory pressure (``allkeys-lru``), and the keeper used to stop there, its
        heartbeats with it, so its followers in other processes failed on the next upstream
        pause of a lease's length (helper-94). False when another process holds it."""
        if await self.fanout.renew(self.lock, self.token, self.ttl):
            return True
        return await self.fanout.acquire(self.lock, self.token, self.ttl)

    def drain(self, live: LiveFlight[bytes]) -> None:
        """Read ``live``'s handed-over upstream to its end in a task of its own (the client
        that was reading it has gone; followers in other processes still need it)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(_drain(live), name=f"sse-cache drain {self.lock}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def stop(self) -> None:
        """Stop renewing (after the renewal under way, if any: cancelling a Redis call
        midway would cost its connection)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})


async def _drain(live: LiveFlight[bytes]) -> None:
    # Checked after each turn: a drain is cancelled once (by ``asyncio.run`` at its end), and
    # a cancellation that redis-py let through while publishing a piece would otherwise
    # keep it reading its upstream to the end.
    try:
        while live.unread:
            await checked(live.drain_turn())
    except Exception as exc:
        # The upstream failed (its transport closed under it, say): the flight has failed
        # with it, for every reader. No one awaits this task to be told again (helper-139:
        # asyncio printed "Task exception was never retrieved" with its traceback).
        logger.debug(
            "sse_cache: the handed-over stream of %s failed: %r", live.key, exc, exc_info=True
        )


async def _open_channel(
    fanout: TimedFanout,
    channel: str,
    lease: float,
    cache: StreamCache,
    presence: _Presence,
    *,
    gone: ClientGone | None = None,
    others: Callable[[], Awaitable[object]] | None = None,
) -> tuple[Head, bytes, AsyncIterator[bytes]] | None:
    """Start reading another process's live stream from ``channel``: its head, its first body
    bytes (``b""``: the body ended empty) and the reader, positioned after them. None when
    it cannot be followed: the producer failed before it answered, went silent (killed?)
    or too slow, or Redis failed. Its client's leaving meanwhile (``gone``) raises
    :class:`FollowerLeft`, once ``others()`` returned (see :func:`unless_gone`).

    A live producer sends heartbeats while its upstream thinks; one that sends nothing else
    for ``join_timeout`` is given up on like a silent local one. Nothing is sent to the
    reader's client before the first body bytes: a producer that dies while its upstream has
    not answered yet is taken over, not relayed as a failure.

    The channel's ``presence`` is held from the start: the producer's keeper looks at its
    client for followers elsewhere only while it is (its first bytes may wait for that
    look: a client that stopped reading before they were published)."""
    reader = fanout.read(channel, block=lease)
    head: Head | None = None
    first: bytes | None = None

    async def opening() -> None:
        nonlocal head, first
        with anyio.fail_after(cache.join_timeout):
            await presence.keep()
            async for message in reader:
                await presence.keep()  # (heartbeats come every third of the lease)
                kind = message[:1]
                if kind == b"h" and head is None:
                    head = _decode_head(message[1:])
                    if head is None:
                        break
                elif kind == b"d" and head is not None:
                    first = message[1:]
                    break
                elif kind != b"k":  # the producer failed before it answered
                    head = None
                    break
            else:
                first = b""  # the end marker: the body was empty

    opened = False
    try:
        await unless_gone(opening, gone, f"{channel}'s head", others=others)
        opened = head is not None and first is not None
    except FollowerLeft:
        raise
    except Exception as exc:  # silent (dead?), too slow, or Redis failed
        logger.info("sse_cache: not following %s: %r", channel, exc)
    finally:
        if not opened:  # (also when its client left: its presence is given back at once)
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(_FANOUT_CLOSE_TIMEOUT):
                    await _aclose(reader)
                with anyio.move_on_after(_FANOUT_CLOSE_TIMEOUT):
                    await presence.release()
    if not opened:
        return None
    assert head is not None and first is not None
    return head, first, reader


def _follow_channel(
    live: LiveFlight[bytes],
    head: Head,
    first: bytes,
    reader: AsyncIterator[bytes],
    idle_timeout: float,
    presence: _Presence,
) -> Cursor:
    """Make ``live`` this process's copy of another process's stream, opened by
    :func:`_open_channel`: it gets the head and first bytes, and its readers pull the rest
    from ``reader`` in turn, holding the channel's ``presence`` meanwhile. Returns the
    cursor of its first reader."""
    live.respond(head)
    # Following first: first bytes larger than the log's bound close the flight to
    # newcomers, not to the reader they were fetched for.
    cursor = live.flight.follow()
    assert cursor is not None  # (a new flight, not failed: joinable)
    live.deliver(first)
    live.producer_left()  # no producer here: the readers pull
    source = _ProcessSource(live, reader, idle_timeout, presence)
    live.hand_over(source, source.stop, isolated=True)  # (reads Redis)
    return cursor


class _ProcessSource:
    """Reads another process's live stream into this process's live flight, one message a
    call (the local readers pull it in turn)."""

    def __init__(
        self,
        live: LiveFlight[bytes],
        reader: AsyncIterator[bytes],
        idle_timeout: float,
        presence: _Presence,
    ) -> None:
        self._live = live
        self._reader = reader
        self._idle_timeout = idle_timeout
        self._presence = presence
        self._last = time.monotonic()

    async def __call__(self) -> bool:
        live = self._live
        try:
            # (The producer's heartbeats come every third of its lease: a call at least as
            # often, while it lives.)
            await self._presence.keep()
            message = await self._reader.__anext__()
            kind = message[:1]
            if kind == b"d":
                live.deliver(message[1:])
                self._last = time.monotonic()
                return True
            if kind == b"k":  # alive, but silent: given up after idle_timeout, as locally
                if time.monotonic() - self._last < self._idle_timeout:
                    return True
                live.fail(f"the stream sent nothing for {self._idle_timeout} s")
            else:
                # (Its upstream failed, or its publishing did: it could not send all of it.)
                live.fail("the process producing this stream failed to deliver all of it")
        except StopAsyncIteration:
            live.end()  # the producer's end marker: its upstream ended cleanly
        except BackendTimeout as exc:
            # Its own silence for the read's block (killed?), or Redis not answering a
            # command in time (a stalled Redis): the error tells which (they read alike,
            # and a Redis stall of a second was logged as a producer gone; helper-128).
            live.fail(f"following the producing process timed out: {exc}")
        except Exception as exc:
            live.fail(f"following the producing process failed: {exc!r}")
        await self.stop()
        return False

    async def stop(self) -> None:
        """Stop reading the channel (its end, or every reader here left)."""
        try:
            await _aclose(self._reader)
        finally:
            await self._presence.release()


def _encode_head(head: Head) -> bytes:
    return msgspec.json.encode(head)


def _decode_head(data: bytes) -> Head | None:
    try:
        return msgspec.json.decode(data, type=Head)
    except msgspec.ValidationError:
        return None


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    await close_iterator(iterator, quiet=True)


async def lead_or_follow(
    backend: _FanoutBackend,
    key: str,
    live: LiveFlight[bytes],
    cache: StreamCache,
    lease_seconds: float,
    *,
    hooks: tuple[Hook, ...],
    gone: ClientGone | None = None,
) -> tuple[_Lease | None, Answer | None]:
    """Take the key's lease (then this request leads: its response is published as it
    passes; the lease is returned) or, when another process holds it, follow that process's
    live stream through ``live`` (this process's own readers of the key follow it, and it
    pulls the other process's messages in turn; the answer is returned). Neither when the
    lock failed (no single-flight across processes this time).

    A follower that hears nothing from its producer for a lease's length (a killed process
    stops renewing it and sending heartbeats) takes over: it takes the lease itself, or
    follows whoever did. Its calls on the lease and the channel are reported to ``hooks``
    (:class:`TimedFanout`).

    Its client's leaving while it waits for the other process's head (``gone``) raises
    :class:`FollowerLeft` once no reader here follows ``live`` (until then it waits on for
    them)."""
    fanout = TimedFanout(backend, hooks)
    lock = _CHANNEL + key

    async def unfollowed() -> None:
        # (Looked at again as each reader leaves: helper-143 found it looked once, and a
        # request whose own readers all left after it held its place until the head.)
        while live.followers:
            await live.wait(math.inf)

    for _attempt in range(3):
        token = new_lease_token()
        try:
            if await fanout.acquire(lock, token, lease_seconds):
                return _Lease(fanout, lock, token, lease_seconds), None
            holder = await fanout.holder(lock)
        except Exception as exc:  # fail open
            backend_warnings.warning(
                backend, "lock_failed", "sse_cache: cross-process lock failed for %s: %r", key, exc
            )
            return None, None
        if holder is None:
            continue
        presence = _Presence(fanout, key, holder, lease_seconds)
        channel = _channel(key, holder)
        opened = await _open_channel(
            fanout,
            channel,
            lease_seconds,
            cache,
            presence,
            gone=gone,
            others=unfollowed,
        )
        if opened is None:
            continue
        head, first, reader = opened
        shared = Head(head.status, _as_shared(head.headers))
        cursor = _follow_channel(live, shared, first, reader, cache.join_timeout, presence)
        chunks = live.chunks(cursor, cache.join_timeout)
        return None, Answer(status=head.status, headers=_as_shared(head.headers), chunks=chunks)
    return None, None


async def end_lead(
    lease: _Lease,
    key: str,
    publish_rest: Callable[[], Awaitable[bool]] | None,
) -> None:
    """Stop leading: stop renewing the lease, publish what is left (``publish_rest``, the
    tee's: True when the whole completed response reached the channel) or else the failure
    marker ``b"x"``, finish the channel, release the lock. Shielded and bounded: followers in
    other processes must hear the end."""
    fanout = lease.fanout
    # Bounded by the lease too: followers wait no longer than that for the next message, so
    # writing on past it helps no one, and the response's end may wait for this (a stalled
    # Redis: its appends are sent again until their bound). After a publish that failed
    # (Redis did not take it within a lease), a third of that: one more try, not a lease's
    # wait on a Redis already known to hang.
    bound = min(_FANOUT_CLOSE_TIMEOUT, lease.ttl / 3 if lease.failing else lease.ttl)
    with anyio.CancelScope(shield=True), anyio.move_on_after(bound):
        try:
            await lease.stop()
            whole = publish_rest is not None and await publish_rest()
            if not whole and not lease.told_failed:
                await lease.publish(b"x")
            await lease.finish()
        except Exception as exc:
            logger.warning("sse_cache: could not end the fan-out of %s: %r", key, exc)
        finally:
            with contextlib.suppress(Exception):
                await fanout.release(lease.lock, lease.token)

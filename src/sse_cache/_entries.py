"""The engine's backend calls: :class:`EntryStore` reads, decodes, checks and writes the
entries of one :class:`~sse_cache.engine.StreamCache`.

Every call goes through the breaker and is bounded by the backend timeout, and fails open: a
backend that is down, slow or returns garbage costs a miss (or a skipped store) and a
rate-limited warning with a notice, never an error; a corrupt entry is deleted. Decoded
entries are kept in the shared :class:`~sse_cache._decoded.DecodedEntries` budget.
"""

from __future__ import annotations

import logging
import operator
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec

from ._decoded import DECODED_EVENT_BYTES, DecodedEntries
from ._logging import backend_warnings
from ._notices import Hook, Notice, emit
from .breaker import Breaker, BreakerState
from .codec import WireEntry
from .entry import Entry
from .errors import (
    BackendBusy,
    BackendCorrupt,
    BackendFull,
    BackendReadOnly,
    CorruptEntry,
    UnreadableEntry,
    ValueTooLarge,
)
from .events import serialize_sse
from .keys import check_key
from .protocols import Backend, EventCodec, NearCachingBackend, WireCodec

__all__ = ["EntryStore"]

logger = logging.getLogger("sse_cache")

_E = TypeVar("_E", Entry, WireEntry)
_R = TypeVar("_R")


#: Why an entry was not stored when the backend write failed ...
_WRITE_FAILED = "the backend write failed"
#: ... or was not tried: the breaker had turned the backend off for a while.
_SKIPPED = "the backend was skipped (its circuit breaker is open)"


#: Why an answer was not stored: an entry was stored under its key after its request began
#: (a refresh's, say), and is kept (see :meth:`EntryStore.save`).
SUPERSEDED = "a newer answer was stored while this one streamed (a refresh, say)"
#: How far in the future an entry's creation time may be and still count as newer: a time
#: further ahead is another host's clock, which must not keep every answer from being stored.
_CLOCK_SLACK = 5.0


class _Skipped(Exception):
    """The backend's breaker is open: the call was not made."""


class EntryStore:
    """Entries by key on ``backend``, for the adapter named ``schema``, encoded by ``codec``;
    ``decoded`` keeps hot decodings, ``breaker`` skips a backend that keeps failing, each call
    may take ``timeout`` seconds; ``hooks`` receive a :class:`Notice` for each backend call,
    store, breaker change and failure."""

    def __init__(
        self,
        backend: Backend,
        *,
        schema: str,
        codec: EventCodec,
        decoded: DecodedEntries[Entry | WireEntry],
        breaker: Breaker,
        timeout: float,
        hooks: tuple[Hook, ...],
    ) -> None:
        self.backend = backend
        # A backend that knows some values at once is asked first (no timeout scope, no
        # breaker, no thread: what it answers is current by its contract).
        self._cached: Callable[[str], bytes | None] | None = (
            backend.cached if isinstance(backend, NearCachingBackend) else None
        )
        self.schema = schema
        self.codec = codec
        # Decided once: a runtime protocol check costs more than the rest of a hot lookup.
        self._decode_wire: Callable[[bytes], WireEntry] = (
            codec.decode_wire
            if isinstance(codec, WireCodec)
            else lambda data: _to_wire(codec.decode(data))
        )
        self.decoded = decoded
        self.breaker = breaker
        self.timeout = timeout
        self._hooks = hooks
        # Names in the decoded cache carry the codec: caches sharing one budget but not one
        # codec (another secret, say) never use each other's decodings.
        tag = f"{id(codec):x}"
        self._names = (f"e{tag}:", f"w{tag}:")
        if breaker.on_change is None:
            breaker.on_change = self._breaker_changed

    async def lookup(self, key: str, max_age: float | None) -> Entry | None:
        """The fresh entry stored for ``key`` (see :meth:`StreamCache.lookup`)."""
        raw = await self._fetch(key)
        if raw is None:
            return None
        entry = await self._decoded(self._names[0], key, raw, Entry, self.codec.decode)
        return None if entry is None else self._fresh(key, entry, max_age)

    async def lookup_wire(
        self, key: str, max_age: float | None, *, verdict: bool = True
    ) -> WireEntry | None:
        """The fresh entry stored for ``key`` as SSE bytes (see :meth:`StreamCache.lookup_wire`).
        ``verdict``: as for :meth:`_use_backend`."""
        raw = await self._fetch(key, verdict=verdict)
        if raw is None:
            return None
        wire = await self._decoded(self._names[1], key, raw, WireEntry, self._decode_wire)
        return None if wire is None else self._fresh(key, wire, max_age)

    async def store(
        self, key: str, entry: Entry, ttl: float | None, began: float | None = None
    ) -> bool:
        """Encode and store ``entry`` for ``ttl`` seconds (None: no expiry); False (logged)
        when it could not be encoded, or the backend failed or was skipped, or an entry
        newer than ``began`` is stored (see :meth:`save`)."""
        return not await self.save(key, entry, ttl, began)

    async def save(
        self, key: str, entry: Entry, ttl: float | None, began: float | None = None
    ) -> str:
        """:meth:`store`, returning why ``entry`` was not stored (``""``: it was). An entry
        the codec refuses (an event of wrong field types, from the caller's upstream) is not
        a backend failure: the backend is not called, and the reason says so.

        ``began``: when the request ``entry`` answers began (``time.time()``). Then it is not
        stored over an entry created since (in any process): an answer is never replaced by
        an older one. Else a request still streaming when a refresh of the same request
        ended, or begun in the provider's bad minute an operator refreshed to evict, put its
        answer back for the entry's whole lifetime (helper-89). One read more a store."""
        check_key(key)  # (the caller's mistake: raised, never counted against the backend)
        if began is not None and await self._newer_stored(key, began, entry.events is not None):
            self._notify(Notice(kind="not_stored", key=key, detail=SUPERSEDED))
            return SUPERSEDED
        if ttl is not None:
            entry = msgspec.structs.replace(entry, expires_at=time.time() + ttl)
        self._forget_decoded(key)
        try:
            data = self.codec.encode(entry)
        except Exception as exc:
            why = f"the entry could not be encoded: {_unencodable(entry, exc)}"
            backend_warnings.warning(
                self.codec, "encode_failed", "sse_cache: %s (key %s)", why, key
            )
            self._notify(Notice(kind="not_stored", key=key, detail=why))
            return why
        try:
            await self._use_backend("set", lambda: self.backend.set(key, data, ttl))
        except _Skipped:
            self._notify(Notice(kind="store_skipped", key=key, detail="backend circuit open"))
            return _SKIPPED
        except (ValueTooLarge, BackendFull, BackendReadOnly, BackendCorrupt) as exc:
            why = f"the backend refused it: {exc}"
            self._warn("not_stored", key, why)
            return why
        except Exception as exc:
            self._warn("store_failed", key, f"backend write failed: {exc!r}")
            return _WRITE_FAILED
        self._notify(Notice(kind="store", key=key, events=len(entry.events or ()), bytes=len(data)))
        return ""

    async def _newer_stored(self, key: str, began: float, stream: bool) -> bool:
        # (Fails open: a store that cannot look is tried, as before.)
        try:
            current = await self.lookup_wire(key, None, verdict=False)
        except Exception:
            return False
        if current is None or not began < current.created_at <= time.time() + _CLOCK_SLACK:
            return False
        # A recorded stream still replaces a non-stream body stored meanwhile: it answers
        # both kinds of request, a stream with its original bytes (so a non-streamed refresh
        # can be undone by a stream of the same request begun before it).
        return not (stream and current.sse is None)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (fail open: a backend failure is logged)."""
        check_key(key)
        self._forget_decoded(key)
        try:
            await self._use_backend("delete", lambda: self.backend.delete(key))
        except _Skipped:
            pass
        except Exception as exc:
            backend_warnings.warning(
                self.backend, "delete_failed", "sse_cache: could not delete %s: %r", key, exc
            )

    async def alias(self, name: str, key: str, expires_at: float | None) -> bool:
        """Store ``name`` as another name of ``key`` (see :meth:`StreamCache.alias`)."""
        check_key(name, "alias name")
        check_key(key)
        ttl = None if expires_at is None else max(1.0, expires_at - time.time())
        try:
            value = key.encode("ascii")
            await self._use_backend("set", lambda: self.backend.set(name, value, ttl))
        except _Skipped:
            return False
        except Exception as exc:
            self._warn("store_failed", name, f"backend write of an alias failed: {exc!r}")
            return False
        return True

    async def resolve(self, name: str) -> str | None:
        """The key an :meth:`alias` names, or None (missing, or the backend failed)."""
        raw = await self._fetch(name)
        if raw is None:
            return None
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None

    async def _decoded(
        self, name: str, key: str, raw: bytes, kind: type[_E], decode: Callable[[bytes], _E]
    ) -> _E | None:
        """``raw`` decoded by ``decode``, or the form kept from an earlier decode of the same
        bytes; None (logged, and deleted unless other processes may read it) when it cannot be
        decoded here."""
        kept = self.decoded.get(name + key, raw)
        if isinstance(kept, kind):
            return kept
        try:
            value = decode(raw)
        except UnreadableEntry as exc:
            self._warn("unreadable", key, f"cannot read stored entry (left stored): {exc}")
            return None
        except CorruptEntry as exc:
            await self._drop_corrupt(key, exc)
            return None
        self.decoded.put(name + key, raw, value, _decoded_size)
        return value

    async def _fetch(self, key: str, *, verdict: bool = True) -> bytes | None:
        # A key no backend takes (not a str, a lone surrogate) is the caller's mistake:
        # raised to it. Counted as the backend's failure, a few such requests turned the
        # cache off for every other caller (helper-82). (Inline for the engine's own keys,
        # ASCII strs: every lookup passes here.)
        if key.__class__ is not str or not key.isascii():
            check_key(key)
        if self._cached is not None:
            try:
                value = self._cached(key)
            except Exception:  # against the contract: then ask the backend as usual
                value = None
            if value is not None:
                return value
        try:
            return await self._use_backend("get", lambda: self.backend.get(key), verdict)
        except _Skipped:
            return None  # a miss, at no cost
        except CorruptEntry as exc:  # a stored value the backend cannot return as bytes
            await self._drop_corrupt(key, exc)
            return None
        except Exception as exc:
            self._warn("read_failed", key, f"backend read failed: {exc!r}")
            return None

    async def _use_backend(
        self, operation: str, call: Callable[[], Awaitable[_R]], verdict: bool = True
    ) -> _R:
        """``call()`` on the backend, bounded by the timeout, through the breaker: raises
        :class:`_Skipped` while it is open, and the call's own error otherwise. Its duration
        is reported as a ``backend`` notice for ``operation``. ``verdict=False``: a success
        says nothing to the breaker (a read made only to decide a write, between a lookup and
        that write, would reset its count of failing writes; a failure still counts)."""
        breaker = self.breaker
        started = time.monotonic()
        if not breaker.allow(started):
            raise _Skipped
        try:
            with anyio.fail_after(self.timeout):
                result = await call()
        except BackendBusy:
            # This process is asking more at once than its pool holds: no verdict on the
            # backend itself (see BackendBusy).
            breaker.cancelled()
            self._timed(operation, time.monotonic() - started)
            raise
        except (CorruptEntry, ValueTooLarge, BackendFull, BackendReadOnly, BackendCorrupt):
            # The backend answered: what it holds under the key is not ours (a value of
            # another type, written by another program), or it refused a value over its
            # size limit, or because it is full, or read-only to this process, or its index
            # leads the key elsewhere (helper-167: a corrupt key index). Counted as
            # failures, a few lookups of one such key, or a burst of large answers or of
            # stores to a full or read-only backend, would turn the whole cache off, its
            # reads too (helper-72: five at once did; helper-94: a Redis at its maxmemory
            # with noeviction).
            breaker.success()
            self._timed(operation, time.monotonic() - started)
            raise
        except Exception as exc:
            ended = time.monotonic()
            breaker.failure(ended, repr(exc))
            self._timed(operation, ended - started)
            raise
        except BaseException:
            breaker.cancelled()  # says nothing about the backend
            raise
        if verdict:
            breaker.success()
        else:
            breaker.cancelled()  # (the breaker's probe, if this was one, is left to others)
        self._timed(operation, time.monotonic() - started)
        return result

    async def _drop_corrupt(self, key: str, exc: CorruptEntry) -> None:
        self._warn("corrupt", key, f"deleting corrupt entry: {exc}")
        await self.delete(key)

    def _timed(self, operation: str, seconds: float) -> None:
        if self._hooks:  # (no notice to build when no one listens)
            self._notify(Notice(kind="backend", key="", detail=operation, seconds=seconds))

    def _breaker_changed(self, state: BreakerState, why: str) -> None:
        # One line per transition, not one per skipped request.
        log = logger.info if state is BreakerState.CLOSED else logger.warning
        log("sse_cache: backend circuit %s (%s)", state.value, why)
        self._notify(Notice(kind="breaker", key="", detail=state.value))

    def _forget_decoded(self, key: str) -> None:
        self.decoded.discard(self._names[0] + key)
        self.decoded.discard(self._names[1] + key)

    def _fresh(self, key: str, entry: _E, max_age: float | None) -> _E | None:
        if entry.schema != self.schema:
            # The key includes the schema: another schema's entry here is a collision or
            # tampering. Not served (and not deleted: it may be valid for its own schema).
            self._warn("corrupt", key, f"entry is of schema {entry.schema!r}")
            return None
        now = time.time()
        if too_old(entry, max_age, now):
            return None
        # Backends expire entries themselves, some at a coarse granularity (memcached:
        # whole seconds); never serve one past its recorded end.
        if entry.expires_at is not None and now >= entry.expires_at:
            return None
        return entry

    def _notify(self, notice: Notice) -> None:
        emit(self._hooks, notice)

    def _warn(self, kind: str, key: str, message: str) -> None:
        # A backend that is down fails every request: one line per kind per 10 s, counted.
        backend_warnings.warning(self.backend, kind, "sse_cache: %s (key %s)", message, key)
        self._notify(Notice(kind=kind, key=key, detail=message))


_data_of = operator.attrgetter("data")


# The types an Event's fields must have (the codec relies on them).
_EVENT_FIELDS = (
    ("data", (str,), "a str"),
    ("event", (str, type(None)), "a str or None"),
    ("id", (str, type(None)), "a str or None"),
    ("retry", (int, type(None)), "an int or None"),
    ("at", (float, int), "a number"),
)


def too_old(entry: Entry | WireEntry, max_age: float | None, now: float) -> bool:
    """``entry`` is older than a request's ``max_age`` seconds (None: any age will do)."""
    return max_age is not None and now - entry.created_at > max_age


def _unencodable(entry: Entry, exc: Exception) -> str:
    """Why the codec refused ``entry`` (only on that path): the first event field of a wrong
    type, else the codec's error."""
    for number, event in enumerate(entry.events or ()):
        for name, types, what in _EVENT_FIELDS:
            value = getattr(event, name, None)
            if not isinstance(value, types) or isinstance(value, bool):
                shown = repr(value)
                shown = shown if len(shown) <= 80 else shown[:80] + "..."
                return f"event {number} has {name}={shown}, it must be {what} ({exc!r})"
    return repr(exc)


def _decoded_size(entry: Entry | WireEntry) -> int:
    if isinstance(entry, WireEntry):
        return len(entry.sse or b"") + len(entry.body or b"")
    events = entry.events
    if events is None:
        return len(entry.body or b"")
    # getsizeof: the memory of each text as CPython holds it (1, 2 or 4 bytes a character).
    texts = sum(map(sys.getsizeof, map(_data_of, events)))
    # A stream stored as its bytes holds them too.
    return texts + DECODED_EVENT_BYTES * len(events) + len(entry.wire or b"")


def _to_wire(entry: Entry) -> WireEntry:
    events = entry.events
    return WireEntry(
        schema=entry.schema,
        created_at=entry.created_at,
        status=entry.status,
        content_type=entry.content_type,
        meta=entry.meta,
        count=len(events) if events is not None else 0,
        duration=events[-1].at if events else 0.0,
        sse=(
            None
            if events is None
            else entry.wire
            if entry.wire is not None
            else serialize_sse(events, eol=entry.eol)
        ),
        body=entry.body,
        expires_at=entry.expires_at,
        eol=entry.eol,
    )

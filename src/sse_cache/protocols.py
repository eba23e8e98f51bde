"""The contracts between the layers: keyer, codec, backend (and its optional capabilities) and
stream adapter. Implementations live elsewhere; the engine knows only these."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .entry import Entry

if TYPE_CHECKING:
    from .codec import WireEntry
from .events import Event
from .keys import CacheRequest

__all__ = [
    "Backend",
    "CacheKeyer",
    "EventCodec",
    "FanoutBackend",
    "KeyHeadersAdapter",
    "LeasingBackend",
    "LockingBackend",
    "NearCachingBackend",
    "Outcome",
    "ResumingAdapter",
    "ScanningBackend",
    "ScreeningAdapter",
    "StatsBackend",
    "StreamAdapter",
    "VerifyingAdapter",
    "WireCodec",
]


@runtime_checkable
class CacheKeyer(Protocol):
    """Maps a request to the key of its answer. Equal requests give equal keys; requests
    whose answers may differ (another tenant, model, input...) give different keys."""

    def key(self, request: CacheRequest) -> str: ...


@runtime_checkable
class EventCodec(Protocol):
    """Turns an :class:`Entry` into bytes and back. ``decode`` raises
    :class:`~sse_cache.errors.CorruptEntry` for any bytes it cannot trust, never another
    exception and never an entry other than the one encoded."""

    def encode(self, entry: Entry) -> bytes: ...

    def decode(self, data: bytes) -> Entry: ...


@runtime_checkable
class WireCodec(EventCodec, Protocol):
    """A codec that can also return a stream entry as its canonical SSE bytes without
    building events (:class:`~sse_cache.codec.WireEntry`): HTTP integrations send those
    bytes as they are on an instant replay."""

    def decode_wire(self, data: bytes) -> WireEntry: ...


@runtime_checkable
class Backend(Protocol):
    """Bytes in, bytes out, by string key. The contract every backend meets:

    - ``get`` returns the bytes of the last *complete* ``set`` of that key, or ``None`` when the
      key is missing or expired; never a mix of two writes or a partial value. A value that
      another program stored at the key and that is not bytes (a text column, a Redis list)
      raises :class:`~sse_cache.errors.CorruptEntry`: the engine deletes it, as a corrupt
      entry, and does not count it as a backend failure.
    - ``set`` stores ``value`` for ``ttl`` seconds (``None``: no expiry, though a size-bounded
      backend may still evict it); it overwrites any previous value.
    - ``delete`` removes the key; deleting a missing key is not an error.
    - ``aclose`` releases connections; any operation after it raises
      :class:`~sse_cache.errors.BackendUnavailable`.
    - failures raise :class:`~sse_cache.errors.BackendError` subclasses, promptly (backends
      have per-operation timeouts): the engine turns them into misses.
    """

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ScanningBackend(Backend, Protocol):
    """A backend that can list its keys (for ``sse-cache ls`` and ``purge``)."""

    def scan(self, prefix: str = "") -> AsyncIterator[str]: ...

    async def clear(self) -> int:
        """Delete every entry of this backend (its namespace only); return how many."""
        ...


@runtime_checkable
class StatsBackend(Backend, Protocol):
    """A backend that can count what it holds."""

    async def stats(self) -> Mapping[str, int]:
        """At least ``entries`` and ``bytes``."""
        ...


@runtime_checkable
class LockingBackend(Backend, Protocol):
    """A backend with an atomic lock with expiry (for cross-process single-flight)."""

    async def acquire(self, name: str, token: str, ttl: float) -> bool:
        """Take the lock ``name`` for ``token`` unless someone holds it; True when taken."""
        ...

    async def release(self, name: str, token: str) -> None:
        """Release ``name`` if ``token`` still holds it."""
        ...


@runtime_checkable
class LeasingBackend(LockingBackend, Protocol):
    """A lock that is a lease: taken for a short ``ttl``, renewed by its holder while it
    works, and gone within ``ttl`` seconds of its holder's death (cross-process
    single-flight: a killed producer must not hold its followers for long)."""

    async def renew(self, name: str, token: str, ttl: float) -> bool:
        """Extend ``name`` to ``ttl`` seconds from now if ``token`` still holds it; False when
        it does not (expired, or taken by another)."""
        ...

    async def holder(self, name: str) -> str | None:
        """The token holding ``name``, or None."""
        ...


@runtime_checkable
class FanoutBackend(Backend, Protocol):
    """A backend with append-only channels for live fan-out across processes (one producer
    streams, any number of readers in any process follow it).

    - Ordering: a reader gets the messages of a channel in the order they were published.
    - From the start: a reader that starts with ``start="0"``, even after publishing began,
      gets every message from the first one, then follows live; nothing published between
      joining and the first read is lost. If the channel lost messages a reader still needs
      (trimmed, expired), the reader raises :class:`~sse_cache.errors.BackendError` rather
      than skip them silently. Delivery is at-least-once: a backend must not duplicate a
      message itself (a transparently retried append is applied once), but a ``publish``
      that raised may or may not have been applied, so publishing it again may repeat it.
    - End: ``finish`` appends an end marker; a reader stops at it (its iterator ends).
    - Liveness: a reader raises :class:`~sse_cache.errors.BackendTimeout` when no message
      arrives for ``block`` seconds, so a dead producer never hangs its readers.
    - Lifetime: a channel lives ``ttl`` seconds after its last ``publish`` / ``finish``.
    - Failures of any call raise :class:`~sse_cache.errors.BackendError` subclasses promptly.
    """

    async def publish(self, channel: str, data: bytes, *, ttl: float) -> None:
        """Append ``data`` to ``channel`` (created if missing), keeping it ``ttl`` seconds."""
        ...

    async def finish(self, channel: str, *, ttl: float) -> None:
        """Append the end marker to ``channel``, keeping it ``ttl`` more seconds for late
        readers."""
        ...

    def read(self, channel: str, *, start: str = "0", block: float = 5.0) -> AsyncIterator[bytes]:
        """Every message of ``channel`` after position ``start`` (``"0"``: from the first),
        waiting up to ``block`` seconds for each next one, until the end marker."""
        ...


@runtime_checkable
class NearCachingBackend(Backend, Protocol):
    """A backend that can answer some lookups at once, from this process's memory, without
    I/O that waits (the engine asks it first, and calls ``get`` only when it says None).

    ``cached(key)`` returns bytes only when they are what ``get(key)`` returns: unexpired,
    never older than a ``set`` or ``delete`` made through this backend object before the call,
    and never older than a change made elsewhere once the backend can know of it — at once
    where it asks a version first (SQLite: the last commit of any process, ``sse-cache
    purge`` included), or once the store's own report of the change has arrived (Redis:
    its invalidation message, ~0.2 ms after another process's write returned; the near
    cache is emptied and off while the connection carrying them is lost). None whenever that
    is not known right away. It never raises and never blocks on a lock, a thread or the
    network. See docs/backends.md for each backend's contract."""

    def cached(self, key: str) -> bytes | None: ...


class Outcome(enum.Enum):
    """What one event (or the end of a stream) means for storing it."""

    CONTINUE = "continue"
    """Keep recording; the stream has not finished yet."""
    COMPLETE = "complete"
    """The stream finished successfully: it may be stored."""
    FAIL = "fail"
    """The stream reports a failure: it must not be stored."""


@runtime_checkable
class StreamAdapter(Protocol):
    """Knows one event schema (OpenAI Responses, Chat Completions, Anthropic Messages, ...).

    Adapters are pure: no I/O, no clock, no state between calls, so one instance serves every
    request. They must be lenient: an event of an unknown type or shape is passed through and
    recorded (``CONTINUE``), never an error.
    """

    @property
    def name(self) -> str:
        """Schema name, part of every key and stored in every entry."""
        ...

    def key_fields(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The request fields that define the answer (transport-only fields removed)."""
        ...

    def is_streaming(self, body: Mapping[str, Any]) -> bool:
        """Whether this request asks for a streamed answer."""
        ...

    def outcome(self, event: Event) -> Outcome:
        """What ``event`` means: keep going, completed, or failed."""
        ...

    def end_outcome(self) -> Outcome:
        """What a clean end of the stream means when no event said COMPLETE or FAIL:
        ``COMPLETE`` for schemas without a completing event (generic SSE), else ``FAIL``."""
        ...

    def body_outcome(self, body: bytes) -> Outcome:
        """Whether a 2xx non-stream answer may be stored (``COMPLETE``) or not (``FAIL``)."""
        ...

    def final_body(self, events: Sequence[Event]) -> bytes | None:
        """The non-stream JSON answer recovered from a recorded stream, or None when this
        schema cannot recover one."""
        ...

    def synthesize(self, body: bytes) -> list[Event] | None:
        """A stream equivalent to a stored non-stream answer, or None when this schema
        cannot synthesise one."""
        ...

    def meta(self, events: Sequence[Event]) -> Mapping[str, str]:
        """Small facts to keep with a recorded stream (e.g. a response id for resume)."""
        ...


@runtime_checkable
class VerifyingAdapter(StreamAdapter, Protocol):
    """An adapter with a whole-stream check, run once before a completed stream is stored
    (e.g. every Chat choice got a ``finish_reason``; Responses sequence numbers have no
    gaps). Optional: the recorder calls ``verify`` when an adapter has it."""

    def verify(self, events: Sequence[Event]) -> Outcome: ...


@runtime_checkable
class ResumingAdapter(StreamAdapter, Protocol):
    """An adapter whose streams can be resumed by position (OpenAI Responses:
    ``GET .../responses/{id}?stream=true&starting_after=N``, by sequence number). Optional:
    the HTTP integrations answer such requests from the live stream or the stored entry."""

    def events_after(self, events: Sequence[Event], starting_after: int) -> list[Event]:
        """The events a client resuming after position ``starting_after`` still needs."""
        ...


@runtime_checkable
class ScreeningAdapter(StreamAdapter, Protocol):
    """An adapter that passes some requests through uncached: those whose answer it could
    not key or replay faithfully (a ``stream`` flag that is neither true nor false, which an
    upstream may read either way), or that change state upstream (a Responses request that
    continues a ``conversation``). Optional: the HTTP integrations call ``uncached_reason``
    when an adapter has it."""

    def uncached_reason(self, body: Mapping[str, Any]) -> str:
        """Why the request with this decoded body is passed through uncached, or ``""``."""
        ...


@runtime_checkable
class KeyHeadersAdapter(StreamAdapter, Protocol):
    """An adapter whose answers also depend on request headers (``anthropic-version``,
    ``anthropic-beta``, ``openai-beta``). Optional: the HTTP integrations put the values of
    the ``key_headers`` a request carries into its key."""

    key_headers: tuple[str, ...]

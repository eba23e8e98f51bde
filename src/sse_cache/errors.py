"""The exception hierarchy: everything sse_cache raises derives from :class:`SSECacheError`."""

from __future__ import annotations

__all__ = [
    "BackendBusy",
    "BackendCorrupt",
    "BackendError",
    "BackendTimeout",
    "BackendFull",
    "BackendReadOnly",
    "BackendUnavailable",
    "ConfigError",
    "CorruptEntry",
    "SSECacheError",
    "SSEError",
    "SharedStreamAborted",
    "UnreadableEntry",
    "ValueTooLarge",
]


class SSECacheError(Exception):
    """Root of every exception sse_cache raises on purpose."""


class SSEError(SSECacheError, ValueError):
    """A byte stream is not valid Server-Sent Events (bad UTF-8, an event over the size guard)
    or an event cannot be written as SSE (a line break inside its ``event`` or ``id``)."""


class CorruptEntry(SSECacheError, ValueError):
    """Stored bytes cannot be trusted as a cache entry: truncated, altered or foreign (also a
    stored value a backend cannot return as bytes: a text column, a Redis list). The engine
    deletes such entries and treats them as a miss."""


class UnreadableEntry(CorruptEntry):
    """A sound entry that this process cannot read: compressed with zstd where
    ``sse-cache[zstd]`` is not installed, larger than this codec's ``max_decoded_bytes``, or
    of a format version this release does not know. A miss here, but the engine does not
    delete it: other processes of the same cache (another configuration) may read it, until
    this process's own answer replaces it."""


class ConfigError(SSECacheError, ValueError):
    """A configuration value (URL, option, header value) is invalid; the message names it."""


class BackendError(SSECacheError):
    """A storage backend failed. The engine turns this into a miss (read) or a skipped store
    (write) and logs a warning: it never reaches the client of a stream."""


class ValueTooLarge(BackendError, ValueError):
    """The backend refused a value larger than it may hold (its ``max_bytes``, memcached's
    item size limit). It answered: the breaker does not count this as a failure (a burst of
    large answers would turn the whole cache off); the answer is not stored, and the
    warning says which limit to change."""


class BackendFull(BackendError):
    """The backend refused to store a value because it is full: Redis at its ``maxmemory``
    with a policy that evicts nothing, memcached out of memory (``-M``), SQLite's disk full.
    It answered, and it still reads: the breaker does not count this as a failure (a burst
    of refused stores would send every stored answer upstream for the breaker's cooldown);
    the answer is not stored, and the warning says the backend is full."""


class BackendReadOnly(BackendError):
    """The backend refused to store a value because this process may only read it: an SQLite
    file it may not write (the file's owner and mode, a read-only mount, ``readonly=true``),
    a Redis replica (``READONLY``). It answered, and it still reads: as for
    :class:`BackendFull`, the breaker does not count this as a failure (else every stored
    answer went upstream for the breaker's cooldown); the answer is not stored, and the
    warning says why."""


class BackendCorrupt(BackendError):
    """The backend's own structure is damaged where a key is found: an SQLite file whose key
    index leads the key to another key's row. Nothing is read, written or deleted by that
    key (a whole entry of another key would pass its checksum, and answer for it); the
    message says how to repair it. The rest of the backend answers: the breaker does not
    count this as a failure (one damaged key asked again would turn the whole cache off)."""


class BackendUnavailable(BackendError, ConnectionError):
    """The backend cannot be reached (server down, connection refused, closed backend)."""


class BackendTimeout(BackendError, TimeoutError):
    """The backend did not answer within its per-operation timeout."""


class BackendBusy(BackendTimeout):
    """Every connection of this process's pool to the backend stayed in use for the whole
    timeout: more operations at once than the pool holds. The server may be healthy, so the
    breaker does not count it as a failure (skipping a busy backend would send every stored
    answer upstream under load); the operation is still a miss or a skipped store."""


class SharedStreamAborted(SSECacheError):
    """A live stream this request had joined stopped before the upstream completed it (the
    upstream was cut, the producer failed, was cancelled or its process died, the reader fell
    too far behind): what the reader holds is a part of an answer, never a whole one. (Also
    importable from :mod:`sse_cache.flight`, where single-flight raises it.)"""

"""What the response bodies of the httpx / httpx2 cache transports share
(:mod:`sse_cache._async_bodies`, :mod:`sse_cache._sync_bodies`): the errors their readers see,
as the HTTP library's own."""

from __future__ import annotations

import weakref
from types import ModuleType
from typing import Any

from .flight import SharedStreamAborted
from .http._tee import ResponseTee


def _timed_out(lib: ModuleType, seconds: float) -> Exception:
    """What a hit's or a follower's client sees when no chunk came within its read timeout:
    the library's own error for that (the SDKs raise their timeout error)."""
    return lib.ReadTimeout(  # type: ignore[no-any-return]
        f"sse-cache: no chunk of the shared stream came within the read timeout ({seconds:g} s)"
    )


def _aborted(lib: ModuleType, exc: SharedStreamAborted) -> Exception:
    """What a follower's client sees when the live stream it read stopped before its end: the
    library's error for a response cut short, as when a server drops the connection (the
    SDKs raise their connection error)."""
    return lib.RemoteProtocolError(f"sse-cache: {exc}")  # type: ignore[no-any-return]


def _closed_under(lib: ModuleType) -> Exception:
    """What a sync response's reader sees when its transport was closed while it read (from
    another thread): the library's error for a connection closed under a reader (the SDKs
    raise their connection error), not the portal's bare ``RuntimeError``."""
    return lib.ReadError(  # type: ignore[no-any-return]
        "sse-cache: the CacheTransport was closed while this response was read"
    )


def _closed_by_client(lib: ModuleType) -> Exception:
    """What a response's reader sees when the response was closed (from another task or
    thread: a stop handler) while it read: the library's error for a connection closed under
    a reader, as without the cache (the SDKs raise their connection error), never a clean end
    of part of the answer."""
    return lib.ReadError(  # type: ignore[no-any-return]
        "sse-cache: the response was closed while it was read"
    )


class _ClosedUnderReader(Exception):
    """A client's read of a miss ended after the client closed the response from another
    task: the reader gets the library's ReadError."""


class _TransportClosed(Exception):
    """A call into the portal of a transport that is closing or closed (see
    :meth:`_SyncOpen.call`); the bodies turn it into :func:`_closed_under`."""


def watch_client(tee: ResponseTee, body: Any) -> None:
    """Have ``tee``'s followers (and its lease's keeper) ask ``body._stalled()`` whether the
    producer's client stopped reading (both transports' tee bodies). Through a weak
    reference: a body lives as long as its client's side (its shell) and what it still
    reads for its followers, not as long as the flight."""
    ref = weakref.ref(body)

    async def stalled() -> bool:
        this = ref()
        return this is not None and bool(await this._stalled())

    tee.watch_client(stalled)

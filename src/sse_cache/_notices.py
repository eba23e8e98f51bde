"""What the cache tells its hooks (:class:`Notice`), how a request was answered
(:class:`CacheStatus`), and handing a notice to hooks (:func:`emit`). Shared by the engine,
the HTTP layer, logging and metrics; re-exported by :mod:`sse_cache.engine` and
:mod:`sse_cache`."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from ._logging import RateLimitedLog

if TYPE_CHECKING:
    from .flight import Flights

__all__ = ["CacheStatus", "Hook", "LiveStreamsHook", "Notice", "emit"]

logger = logging.getLogger("sse_cache")
_hook_errors = RateLimitedLog(logger)


class CacheStatus(enum.StrEnum):
    """How a request was answered; the value of the ``x-sse-cache`` response header."""

    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"
    REFRESH = "refresh"
    SHARED = "shared"


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """What a hook receives. ``kind`` is one of ``hit``, ``miss``, ``bypass``, ``refresh``,
    ``shared``, ``store``, ``not_stored``, ``store_failed``, ``read_failed``, ``corrupt``
    (deleted), ``unreadable`` (a sound entry this process cannot read: a miss, not deleted),
    ``breaker`` (the backend's breaker changed state: ``detail`` is the new one),
    ``store_skipped`` (not written: the breaker is open), ``backend`` (one backend call:
    ``detail`` is the operation, ``get``, ``set`` or ``delete``, or with cross-process
    single-flight ``lock`` or ``publish``; ``seconds`` how long it took, failed or not), and
    from the HTTP integrations ``replayed`` (bytes sent from the cache), ``invalid`` (a
    request answered 400 for a bad control header), ``first_byte`` (a response's first
    body bytes went out: ``detail`` is its cache status, ``seconds`` the time since the
    request arrived), ``resumed`` (a client reconnected to a live stream and gets the
    rest of it) and ``background_full`` (a stream whose client left was not read on,
    neither held for its resume window nor finished to be stored: ``max_background`` were
    already); from the proxy ``refused`` (a request answered 503: the proxy serves its
    ``--limit-concurrency``, ``detail`` ``limit_concurrency``; or 408: its body stopped
    coming, ``detail`` ``body_timeout``); from the ``sse-cache proxy`` command's server
    ``head_timeout`` (a connection closed: a request's head did not come within
    ``--header-timeout``; ``detail`` ``partial`` when part of it had, answered 408, else
    ``nothing``).
    ``events``/``bytes``/``seconds`` are filled where they mean something (``seconds`` of a
    ``hit``: the recorded duration of the replayed stream, i.e. upstream time saved). A
    ``shared`` with a ``detail`` (from the ASGI middleware) is a follower whose client left
    before its live stream's head: no response was sent, and ``detail`` says so."""

    kind: str
    key: str
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


Hook = Callable[[Notice], None]


@runtime_checkable
class LiveStreamsHook(Protocol):
    """A hook that also reads a cache's live streams (metrics report them as gauges): a
    :class:`StreamCache` given one in ``hooks`` hands it its :class:`~sse_cache.flight.Flights`
    once, when it is built."""

    def __call__(self, notice: Notice) -> None: ...

    def watch(self, live: Flights) -> None: ...


@runtime_checkable
class BackgroundHook(Protocol):
    """A hook that also reads how many streams an integration reads on without their client
    (metrics report them as a gauge): an integration's bound on them (its ``max_background``)
    hands it itself once, when it is built."""

    def __call__(self, notice: Notice) -> None: ...

    def watch_background(self, slots: Any) -> None: ...


def emit(hooks: Iterable[Hook], notice: Notice) -> None:
    """Give ``notice`` to every hook; a hook that raises is logged and ignored."""
    for hook in hooks:
        try:
            hook(notice)
        except Exception:
            # With its traceback, at most once every 10 s a hook: one that always fails
            # wrote one for every notice, ~5 a miss (helper-156).
            _hook_errors.log(
                logging.ERROR, hook, "failed", "sse_cache: hook %r failed", hook, exc_info=True
            )

"""Counters fed by the engine's hooks, rendered in the Prometheus text format.

A :class:`Metrics` instance is a hook: pass it in ``hooks=[metrics]`` to a
:class:`~sse_cache.engine.StreamCache`, :class:`~sse_cache.asgi.CacheMiddleware` or
transport, and serve :meth:`Metrics.render` (the proxy does, at ``/_sse_cache/metrics``).
"""

from __future__ import annotations

import threading
from collections import Counter

from .engine import Notice

__all__ = ["Metrics"]

_STATUSES = ("hit", "miss", "bypass", "refresh", "shared")
_BREAKER_STATES = ("closed", "open", "half-open")


class Metrics:
    """Thread-safe counters of requests by cache status, stores, failures, bytes replayed
    and upstream time saved (the recorded duration of every replayed stream)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._replayed_bytes = 0
        self._saved_seconds = 0.0
        self._breaker = "closed"  # the backend breaker's state, from its last notice

    def __call__(self, notice: Notice) -> None:
        with self._lock:
            self._counts[notice.kind] += 1
            if notice.kind == "replayed":
                self._replayed_bytes += notice.bytes
            elif notice.kind == "hit":
                self._saved_seconds += notice.seconds
            elif notice.kind == "breaker":
                self._breaker = notice.detail
                self._counts["breaker:" + notice.detail] += 1

    def count(self, kind: str) -> int:
        """How many notices of ``kind`` were seen (``hit``, ``store``, ...)."""
        with self._lock:
            return self._counts[kind]

    def render(self) -> str:
        """The counters in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            counts = dict(self._counts)
            replayed, saved = self._replayed_bytes, self._saved_seconds
            breaker = self._breaker
        lines = [
            "# HELP sse_cache_requests_total Requests on cached routes, by x-sse-cache status.",
            "# TYPE sse_cache_requests_total counter",
            *(f'sse_cache_requests_total{{status="{s}"}} {counts.get(s, 0)}' for s in _STATUSES),
        ]
        for name, kind, text in (
            ("stores", "store", "Entries stored."),
            ("store_failures", "store_failed", "Stores that failed in the backend."),
            ("not_stored", "not_stored", "Streams not stored (failed, cut, too large)."),
            ("read_failures", "read_failed", "Backend reads that failed (served as misses)."),
            ("corrupt_entries", "corrupt", "Corrupt entries found and deleted."),
            ("invalid_requests", "invalid", "Requests answered 400 for an invalid control header."),
        ):
            lines += [
                f"# HELP sse_cache_{name}_total {text}",
                f"# TYPE sse_cache_{name}_total counter",
                f"sse_cache_{name}_total {counts.get(kind, 0)}",
            ]
        lines += [
            "# HELP sse_cache_replayed_bytes_total Bytes of answers served from the cache.",
            "# TYPE sse_cache_replayed_bytes_total counter",
            f"sse_cache_replayed_bytes_total {replayed}",
            "# HELP sse_cache_upstream_seconds_saved_total Recorded upstream duration of "
            "the streams replayed from the cache.",
            "# TYPE sse_cache_upstream_seconds_saved_total counter",
            f"sse_cache_upstream_seconds_saved_total {saved:.6f}",
            "# HELP sse_cache_backend_breaker_state The backend breaker's state (1: current).",
            "# TYPE sse_cache_backend_breaker_state gauge",
            *(
                f'sse_cache_backend_breaker_state{{state="{state}"}} {int(state == breaker)}'
                for state in _BREAKER_STATES
            ),
            "# HELP sse_cache_backend_breaker_transitions_total Times the backend breaker "
            "entered each state.",
            "# TYPE sse_cache_backend_breaker_transitions_total counter",
            *(
                f'sse_cache_backend_breaker_transitions_total{{state="{state}"}} '
                f"{counts.get('breaker:' + state, 0)}"
                for state in _BREAKER_STATES
            ),
        ]
        return "\n".join(lines) + "\n"

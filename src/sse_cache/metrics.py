"""Prometheus metrics, fed by the engine's hooks and exposed with ``prometheus_client`` (in the
``proxy`` extra: ``pip install 'sse-cache[proxy]'``).

A :class:`Metrics` instance is a hook: pass it in ``hooks=[metrics]`` to a
:class:`~sse_cache.engine.StreamCache`, :class:`~sse_cache.asgi.CacheMiddleware` or
transport. It counts what the notices say (requests by cache status, stores, failures, bytes
replayed), keeps histograms of the time to first byte and of backend calls, and reads the
caches it was given to for the live-stream gauges when it is collected.

The backend calls are labelled by operation: ``get``, ``set`` and ``delete`` for the entries,
and, with cross-process single-flight, ``lock`` (taking, renewing, releasing and asking
about a producer's lease) and ``publish`` (appending to its channel and ending it). A
follower's wait for the next message of another process's stream is not a backend call.

Its :attr:`Metrics.collector` is a ``prometheus_client`` collector: by default it is
registered in a registry of the instance's own (:attr:`Metrics.registry`, never the global
``prometheus_client.REGISTRY``), so that two instances in one process never clash;
``Metrics(registry=app_registry)`` registers it in an application's registry instead, and
``app_registry.register(metrics.collector)`` adds it to one more. :meth:`Metrics.render` is
the registry in the Prometheus text format (the proxy serves it at ``/_sse_cache/metrics``).

Several processes serving one port (``sse-cache proxy --workers N``) share their figures
through a directory (``share_dir``): each writes its own there every ``share_interval``
seconds, whenever it is scraped and as it shuts down (:meth:`Metrics.publish`), and the one
that is scraped adds the others' to its own, so every scrape shows the whole proxy (at most
``share_interval`` seconds old for the other workers). Counters of a worker that has exited
stay counted (a counter never goes down); its gauges do not: a file whose process is gone,
or not rewritten for ``3 * share_interval`` seconds, is a worker that no longer runs. (So
the directory is for the processes of one host and one pid namespace: a process is looked
up by its pid.)

A worker that has exited (its file not rewritten for ``3 * share_interval`` seconds, and no
process of its pid left) is folded, at the next scrape or periodic write of any worker, into
one file of retired totals (``metrics.retired.json``: its counters and histograms added, its
gauges dropped), and its own file is deleted: however many workers were replaced (crashes,
``SIGHUP`` restarts), the directory holds one file per running worker, the retired totals and
a lock file (``metrics.lock``), and a scrape reads no more. A fold holds the lock
(``flock``; a worker that finds it held leaves the fold to its holder) and replaces the
retired file atomically, naming in it the files it absorbed until they are gone (deleted
after): no count is lost or counted twice, also with two folds at once or one cut short (its
process killed). A scrape never waits for the lock: it reads the retired file before and
after the others', and again if a fold ended in between. Without ``fcntl`` (Windows),
nothing is folded.

This module imports without ``prometheus_client``; building a :class:`Metrics` then raises a
:class:`~sse_cache.errors.ConfigError` naming the extra.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import itertools
import json
import math
import os
import secrets
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from ._notices import CacheStatus, Notice
from .backends._fork import hold_over_fork
from .errors import ConfigError
from .flight import Flights

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from prometheus_client.metrics_core import HistogramMetricFamily, Metric
    from prometheus_client.registry import CollectorRegistry

    from .http._slots import BackgroundSlots

__all__ = ["BACKEND_BUCKETS", "CONTENT_TYPE", "FIRST_BYTE_BUCKETS", "Metrics"]


class RequestCounter(Protocol):
    """A server whose requests in progress :meth:`Metrics.watch_requests` reports."""

    @property
    def requests_in_progress(self) -> int: ...


#: The media type of :meth:`Metrics.render` (the Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Default buckets (seconds) of the time to first byte: replays answer in about a
#: millisecond, upstreams in tenths of a second to tens of seconds.
FIRST_BYTE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: Default buckets (seconds) of backend calls: memory and a local Redis take tens of
#: microseconds, SQLite and remote servers milliseconds; ``backend_timeout`` is 2 s.
BACKEND_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
)  # fmt: skip

_STATUSES = tuple(status.value for status in CacheStatus)
_OPERATIONS = ("get", "set", "delete", "lock", "publish")
_BREAKER_STATES = ("closed", "open", "half-open")
# Counters without labels: (name, notice kind, help).
_COUNTERS = (
    ("sse_cache_stores", "store", "Entries stored."),
    ("sse_cache_store_failures", "store_failed", "Stores that failed in the backend."),
    ("sse_cache_store_skipped", "store_skipped", "Stores skipped: the backend breaker was open."),
    ("sse_cache_not_stored", "not_stored", "Streams not stored (failed, cut, too large)."),
    ("sse_cache_read_failures", "read_failed", "Backend reads that failed (served as misses)."),
    ("sse_cache_corrupt_entries", "corrupt", "Corrupt entries found and deleted."),
    (
        "sse_cache_unreadable_entries",
        "unreadable",
        "Sound entries this process cannot read (served as misses, left stored).",
    ),
    (
        "sse_cache_resumes",
        "resumed",
        "Clients that came back for the rest of an answer (live or stored).",
    ),
    (
        "sse_cache_invalid_requests",
        "invalid",
        "Requests answered 400 for an invalid control header.",
    ),
    (
        "sse_cache_background_refused",
        "background_full",
        "Streams whose client left that were not read on (held for a resume window, or"
        " finished to be stored): max_background were already.",
    ),
    (
        "sse_cache_refused_requests",
        "refused",
        "Requests the proxy refused: 503 at its --limit-concurrency, 408 for a request body"
        " that stopped coming (body_timeout).",
    ),
    (
        "sse_cache_head_timeouts",
        "head_timeout",
        "Connections the proxy closed because a request's head did not come within"
        " --header-timeout (answered 408 when part of it had come).",
    ),
)
_REQUESTS = ("sse_cache_requests", "Requests on cached routes, by x-sse-cache status.")
_REPLAYED = ("sse_cache_replayed_bytes", "Bytes of answers served from the cache.")
_SAVED = (
    "sse_cache_upstream_seconds_saved",
    "Recorded upstream duration of the streams replayed from the cache.",
)
_TRANSITIONS = (
    "sse_cache_backend_breaker_transitions",
    "Times the backend breaker entered each state.",
)
_BREAKER = ("sse_cache_backend_breaker_state", "The backend breaker's state (1: current).")
_FIRST_BYTE = (
    "sse_cache_time_to_first_byte_seconds",
    "Seconds from a request's arrival to its first body bytes, by x-sse-cache status.",
)
_BACKEND = (
    "sse_cache_backend_operation_seconds",
    "Seconds a backend call took (failed ones too), by operation: get, set, delete; "
    "lock, publish (cross-process single-flight).",
)
_LIVE = (
    "sse_cache_live_streams",
    "Streams being produced that identical requests can join (single-flight).",
)
_FOLLOWERS = ("sse_cache_live_stream_followers", "Requests following a live stream.")
_BACKGROUND = (
    "sse_cache_background_streams",
    "Streams read on without their client: finished in the background, or held for a "
    "resume window (at most max_background each cache).",
)
_IN_PROGRESS = (
    "sse_cache_requests_in_progress",
    "HTTP requests the proxy is handling (a stream until its last byte, or until it ends "
    "when it is read on for others after its client left).",
)

_INSTALL = "pip install 'sse-cache[proxy]'"


class _Histogram:
    """Counts per bucket (not cumulative: the last one is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0


class Metrics:
    """A hook that turns notices into Prometheus metrics (see the module docstring).

    ``registry``: the ``prometheus_client`` registry to register :attr:`collector` in (None:
    a new one of this instance's own). ``first_byte_buckets`` / ``backend_buckets``: the upper
    bounds (seconds, increasing) of the histograms' buckets. ``share_dir``: a directory the
    processes of one server share their figures through (see the module docstring), every
    ``share_interval`` seconds: processes of one host and pid namespace (not a volume that
    containers share: a worker elsewhere would read as gone, its gauges left out).

    ``sse_cache_backend_operation_seconds`` has a series per operation from the start, at 0:
    ``get``, ``set``, ``delete``, ``lock`` and ``publish`` (the last two only move with
    cross-process single-flight).

    Thread-safe: notices may come from several threads (a sync transport's portal) while a
    scrape collects from another.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        first_byte_buckets: Sequence[float] = FIRST_BYTE_BUCKETS,
        backend_buckets: Sequence[float] = BACKEND_BUCKETS,
        share_dir: str | os.PathLike[str] | None = None,
        share_interval: float = 1.0,
    ) -> None:
        try:
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            raise ConfigError(f"Metrics needs prometheus_client: {_INSTALL}") from None
        self._first_byte_bounds = _bounds("first_byte_buckets", first_byte_buckets)
        self._backend_bounds = _bounds("backend_buckets", backend_buckets)
        # Reentrant, and held over a fork by the forking thread (hold_over_fork): another
        # thread holding it at the fork left it held for ever in the child, whose transports
        # report their fresh places here as they are renewed (helper-174: the child hung).
        self._lock = threading.RLock()
        hold_over_fork(self)
        self._counts: Counter[str] = Counter()
        self._replayed_bytes = 0
        self._saved_seconds = 0.0
        self._breaker = "closed"  # the backend breaker's state, from its last notice
        self._first_byte = {s: _Histogram(len(self._first_byte_bounds)) for s in _STATUSES}
        self._backend = {op: _Histogram(len(self._backend_bounds)) for op in _OPERATIONS}
        self._live: weakref.WeakSet[Flights] = weakref.WeakSet()
        self._background: weakref.WeakSet[BackgroundSlots] = weakref.WeakSet()
        self._servers: weakref.WeakSet[RequestCounter] = weakref.WeakSet()
        #: The ``prometheus_client`` collector of these metrics: register it in any registry.
        self.collector = _Collector(self)
        #: The registry :attr:`collector` was registered in when this instance was built.
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self.collector)
        self._shared: _SharedFigures | None = None
        if share_dir is not None:
            if not share_interval > 0:
                raise ConfigError(f"share_interval must be > 0 seconds, got {share_interval!r}")
            self._shared = _SharedFigures(Path(share_dir), share_interval, self._figures)

    # -- the hook --------------------------------------------------------------------------

    def __call__(self, notice: Notice) -> None:
        kind = notice.kind
        with self._lock:
            self._counts[kind] += 1
            if kind == "backend":
                self._observe(self._backend, self._backend_bounds, notice.detail, notice.seconds)
            elif kind == "first_byte":
                bounds = self._first_byte_bounds
                self._observe(self._first_byte, bounds, notice.detail, notice.seconds)
            elif kind == "replayed":
                self._replayed_bytes += notice.bytes
            elif kind == "hit":
                self._saved_seconds += notice.seconds
            elif kind == "breaker":
                self._breaker = notice.detail
                self._counts["breaker:" + notice.detail] += 1

    def _fork_begins(self) -> None:
        self._lock.acquire()

    def _fork_ended(self) -> None:
        self._lock.release()

    def watch(self, live: Flights) -> None:
        """Report the live streams of ``live`` (a cache's registry) in the gauges. A
        :class:`~sse_cache.engine.StreamCache` given this hook calls it itself; the registry is
        held weakly (a cache that is gone is no longer reported)."""
        with self._lock:
            self._live.add(live)

    def watch_background(self, slots: BackgroundSlots) -> None:
        """Report the streams ``slots`` counts (read on without their client) in
        ``sse_cache_background_streams``: the middleware's and the transports' bound on them
        (their ``max_background``) calls it itself when given this hook. Held weakly."""
        with self._lock:
            self._background.add(slots)

    def watch_requests(self, server: RequestCounter) -> None:
        """Report ``server.requests_in_progress`` in ``sse_cache_requests_in_progress`` (the
        proxy calls it for itself). Held weakly."""
        with self._lock:
            self._servers.add(server)

    def forget(self, watched: object) -> None:
        """Report no more what :meth:`watch`, :meth:`watch_background` or
        :meth:`watch_requests` was given: a transport in a forked child forgets its parent's
        live streams and slots, which it replaced with its own (those the child goes on
        using, a middleware's built before the fork, stay reported)."""
        with self._lock:
            self._live.discard(watched)  # type: ignore[arg-type]
            self._background.discard(watched)  # type: ignore[arg-type]
            self._servers.discard(watched)  # type: ignore[arg-type]

    @staticmethod
    def _observe(
        histograms: dict[str, _Histogram], bounds: Sequence[float], label: str, value: float
    ) -> None:
        histogram = histograms.get(label)
        if histogram is None:  # an operation or status first seen now
            histogram = histograms[label] = _Histogram(len(bounds))
        # bisect_left: a value equal to a bound belongs to that bucket (``le`` is inclusive).
        histogram.counts[bisect.bisect_left(bounds, value)] += 1
        histogram.sum += value

    # -- reading ---------------------------------------------------------------------------

    def count(self, kind: str) -> int:
        """How many notices of ``kind`` were seen (``hit``, ``store``, ...)."""
        with self._lock:
            return self._counts[kind]

    def render(self) -> str:
        """:attr:`registry` in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry).decode()

    def publish(self) -> None:
        """Write this process's figures for the others sharing ``share_dir`` now (they are
        written every ``share_interval`` seconds anyway); nothing to do without one. A server
        calls it as it shuts down: what it counted since its last periodic write would
        otherwise be lost to the others (the proxy does, at its lifespan shutdown)."""
        if self._shared is not None:
            self._shared.write()

    def _figures(self) -> dict[str, Any]:
        """This process's figures, as plain values (what it shares with the others)."""
        with self._lock:  # one consistent snapshot
            figures: dict[str, Any] = {
                "counts": dict(self._counts),
                "replayed": self._replayed_bytes,
                "saved": self._saved_seconds,
                "breaker": {self._breaker: 1},
                "first_byte": _snapshot(self._first_byte),
                "backend": _snapshot(self._backend),
            }
            watched = list(self._live)
            background = list(self._background)
            servers = list(self._servers)
        streams = followers = 0
        for flights in watched:
            for live in flights:
                streams += 1
                followers += live.followers
        figures["streams"], figures["followers"] = streams, followers
        figures["background"] = sum(slots.taken for slots in background)
        figures["in_progress"] = sum(server.requests_in_progress for server in servers)
        return figures

    def _collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        figures = self._figures()
        if self._shared is not None:
            self._shared.write()
            for other, running in self._shared.others():
                _add(figures, other, gauges=running)
        counts: dict[str, int] = figures["counts"]
        replayed, saved = figures["replayed"], figures["saved"]
        breaker: dict[str, int] = figures["breaker"]  # how many processes are in each state
        first_byte, backend = figures["first_byte"], figures["backend"]
        requests = CounterMetricFamily(*_REQUESTS, labels=["status"])
        for status in _STATUSES:
            requests.add_metric([status], counts.get(status, 0))
        yield requests
        for name, kind, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=counts.get(kind, 0))
        yield CounterMetricFamily(*_REPLAYED, value=replayed)
        yield CounterMetricFamily(*_SAVED, value=saved)
        state = GaugeMetricFamily(*_BREAKER, labels=["state"])
        transitions = CounterMetricFamily(*_TRANSITIONS, labels=["state"])
        for name in _BREAKER_STATES:
            state.add_metric([name], breaker.get(name, 0))
            transitions.add_metric([name], counts.get("breaker:" + name, 0))
        yield state
        yield transitions
        yield _histogram(_FIRST_BYTE, "status", self._first_byte_bounds, first_byte)
        yield _histogram(_BACKEND, "operation", self._backend_bounds, backend)
        yield GaugeMetricFamily(*_LIVE, value=figures["streams"])
        yield GaugeMetricFamily(*_FOLLOWERS, value=figures["followers"])
        yield GaugeMetricFamily(*_BACKGROUND, value=figures["background"])
        yield GaugeMetricFamily(*_IN_PROGRESS, value=figures["in_progress"])

    def _describe(self) -> Iterator[Metric]:
        # The names, for the registry's duplicate check (two Metrics in one registry clash).
        from prometheus_client.metrics_core import Metric

        for name, _, text in _COUNTERS:
            yield Metric(name, text, "counter")
        for name, text in (_REQUESTS, _REPLAYED, _SAVED, _TRANSITIONS):
            yield Metric(name, text, "counter")
        for name, text in (_BREAKER, _LIVE, _FOLLOWERS, _BACKGROUND, _IN_PROGRESS):
            yield Metric(name, text, "gauge")
        for name, text in (_FIRST_BYTE, _BACKEND):
            yield Metric(name, text, "histogram")


class _Collector:
    """The ``prometheus_client`` collector of one :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics._collect())

    def describe(self) -> Iterable[Metric]:
        return list(self._metrics._describe())


#: In the shared directory: the figures of the workers that have exited, added up, and the
#: lock a fold holds (see the module docstring).
_RETIRED = "metrics.retired.json"
_LOCK = "metrics.lock"


class _Retired(NamedTuple):
    """The retired totals: the figures of the processes that have exited, added up; the
    names of the files absorbed that may still be there; and how many folds wrote them."""

    figures: dict[str, Any]
    absorbed: frozenset[str]
    generation: int


class _SharedFigures:
    """One process's figures in the directory the processes of one server share: written
    (atomically) every ``interval`` seconds by a daemon thread and at each scrape; the
    others' read at each scrape, those of the processes that have exited folded into the
    retired totals first (:meth:`fold`, also after each periodic write)."""

    def __init__(
        self, directory: Path, interval: float, figures: Callable[[], dict[str, Any]]
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.interval = interval
        # The pid says which process; the token, which instance (tests run several in one).
        self.path = directory / f"metrics-{os.getpid()}-{secrets.token_hex(4)}.json"
        self.retired = directory / _RETIRED
        self._figures = figures
        self._writing = threading.Lock()
        threading.Thread(target=self._run, name="sse-cache metrics", daemon=True).start()

    def write(self) -> None:
        # The figures are taken and written under one lock: writes from the thread, a scrape
        # and the shutdown never land out of order (a snapshot taken before the last one,
        # written after it, would undo the counts in between: the shutdown's, for ever).
        with self._writing:
            data = json.dumps(self._figures())
            partial = self.path.with_suffix(".part")
            with contextlib.suppress(OSError):  # a full or vanished directory: figures go stale
                partial.write_text(data)
                os.replace(partial, self.path)

    def others(self) -> list[tuple[dict[str, Any], bool]]:
        """The other processes' figures, and whether each still runs (wrote lately); the
        retired totals among them (not running). Those of the processes that have exited are
        folded first, unless another process is folding them.

        A scrape reads without the lock (it runs on a server's event loop, which must not
        wait for another process): the retired file, the others', the retired file again.
        Each fold writes it with a new generation: the same one twice means that no fold
        ended in between, and that the files its totals absorbed which the scrape read are
        named in it (passed over). Otherwise it reads again, and after three tries (folds
        ending one after another as fast as it reads) reads holding the lock."""
        self.fold()
        for _ in range(3):
            found = self._read(consistent=True)
            if found is not None:
                return found
        with self._locked(wait=True):  # pragma: no cover - folds as fast as it reads
            return self._read(consistent=False) or []

    def fold(self) -> None:
        """Fold the figures of the processes that have exited into the retired totals and
        delete their files, unless another process holds the lock (it is folding them).
        Takes the lock only when there is such a file."""
        now = time.time()
        if not any(self._exited(path, now) for path in self._leftovers()):
            return
        with self._locked(wait=False) as locked:
            retired = self._read_retired()
            if locked and retired is not None:
                self._fold(retired, time.time())

    def _read(self, *, consistent: bool) -> list[tuple[dict[str, Any], bool]] | None:
        """The others' figures (:meth:`others`); None if ``consistent`` and a fold ended
        meanwhile."""
        retired = self._read_retired()
        now = time.time()
        found: list[tuple[str, dict[str, Any], bool]] = []
        for path in self.directory.glob("metrics-*.json"):
            if path == self.path:
                continue
            try:
                running = now - path.stat().st_mtime < 3 * self.interval
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours
            if running and _gone(path):
                # Exited since its last write (a worker stopping writes its figures as it
                # goes): its gauges drop out now, not once the file is old (helper-154: a
                # restart's old workers kept their gauges in the totals ~3 s).
                running = False
            if isinstance(other, dict):
                found.append((path.name, other, running))
        if consistent:
            again = self._read_retired()
            if (None if retired is None else retired.generation) != (
                None if again is None else again.generation
            ):
                return None
        if retired is None:  # unreadable: nothing absorbed that can be told
            return [(figures, running) for _, figures, running in found]
        others = [(f, running) for name, f, running in found if name not in retired.absorbed]
        if retired.generation:
            others.append((retired.figures, False))
        return others

    def _fold(self, retired: _Retired, now: float) -> None:
        """Fold, holding the lock: add the exited processes' figures to the retired totals,
        then delete their files.

        The order makes a fold cut short harmless. The totals and the names of the files
        they absorbed are written as one file, atomically (a temporary file, then
        ``os.replace``), and only then are those files deleted: a fold that dies before the
        replace leaves the retired file as it was and the exited files in place (the next
        fold does it all again); one that dies after it leaves files the retired file names,
        which every reader passes over and the next fold deletes without adding them again.
        A name is kept while its file is there, and dropped by the first fold that finds it
        gone (its process has exited: nothing writes it again)."""
        figures = retired.figures
        names = {path.name for path in self.directory.glob("metrics-*.json")}
        taken: list[str] = []
        for name in sorted(names - retired.absorbed):
            path = self.directory / name
            if not self._exited(path, now):
                continue
            try:
                other = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except OSError:
                continue  # unreadable for now: left to a later fold
            except ValueError:
                other = None  # not ours: nothing to add, and deleted
            if isinstance(other, dict):
                added = _added(figures, other, gauges=False)
                figures = figures if added is None else added
            taken.append(name)
        kept = (retired.absorbed & names).union(taken)
        if taken or kept != retired.absorbed:
            data = {"generation": retired.generation + 1, "figures": figures}
            data["absorbed"] = sorted(kept)
            partial = self.retired.with_suffix(".part")  # (only the lock's holder writes it)
            try:
                partial.write_text(json.dumps(data))
                os.replace(partial, self.retired)
            except OSError:
                return  # nothing written: nothing deleted either
        for name in kept:
            path = self.directory / name
            for leftover in (path, path.with_suffix(".part")):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
        # A process killed as it wrote its file the first time left only the temporary one.
        for path in self.directory.glob("metrics-*.part"):
            if path.with_suffix(".json").name not in names and self._exited(path, now):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    def _leftovers(self) -> Iterator[Path]:
        yield from self.directory.glob("metrics-*.json")
        yield from self.directory.glob("metrics-*.part")

    def _exited(self, path: Path, now: float) -> bool:
        """Whether the process that wrote ``path`` (``metrics-<pid>-<token>``) has exited:
        the file not rewritten for as long as makes it not running (its gauges drop out),
        and no process of its pid left. A process of that pid (a zombie not yet reaped, the
        pid taken again) keeps its file: folded later, never too early."""
        try:
            if now - path.stat().st_mtime < 3 * self.interval:
                return False
        except OSError:
            return False
        return _gone(path)

    def _read_retired(self) -> _Retired | None:
        """The retired totals (before the first fold: none, generation 0); None when the
        file is unreadable (then nothing is folded into it)."""
        try:
            data = json.loads(self.retired.read_text())
        except FileNotFoundError:
            return _Retired(_no_figures(), frozenset(), 0)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        figures, absorbed, generation = (data.get(k) for k in ("figures", "absorbed", "generation"))
        if (
            not isinstance(figures, dict)
            or not isinstance(absorbed, list)
            or not isinstance(generation, int)
        ):
            return None
        return _Retired(figures, frozenset(n for n in absorbed if isinstance(n, str)), generation)

    @contextlib.contextmanager
    def _locked(self, *, wait: bool) -> Iterator[bool]:
        """Hold the directory's lock (exclusively; ``wait``: for as long as another holds
        it): True, or False if not held (held by another, no ``fcntl``, a directory gone).
        The system releases it when its process exits, however it exits."""
        if sys.platform == "win32":  # pragma: no cover
            yield False
            return
        try:
            fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # (BlockingIOError: another holds it)
                locked = False
            else:
                locked = True
            yield locked
        finally:
            os.close(fd)  # (releases the lock)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)  # a period, not an ordering: figures are this stale
            self.write()
            self.fold()


def _gone(path: Path) -> bool:
    """Whether no process has the pid that wrote ``path`` (``metrics-<pid>-<token>``): it
    has exited and was reaped. (A zombie, or the pid taken again, counts as there.)"""
    try:
        pid = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # (signal 0: only whether there is such a process)
    except ProcessLookupError:
        return True
    except OSError:  # there is one, of another user
        return False
    return False


def _no_figures() -> dict[str, Any]:
    """Figures with nothing counted: the retired totals before the first fold."""
    return {
        "counts": {},
        "replayed": 0,
        "saved": 0.0,
        "breaker": {},
        "first_byte": {},
        "backend": {},
        "streams": 0,
        "followers": 0,
        "background": 0,
        "in_progress": 0,
    }


def _add(into: dict[str, Any], other: dict[str, Any], *, gauges: bool) -> None:
    """Add another process's figures to ``into``: its counters and histograms always, its
    gauges (live streams, followers, background streams, requests in progress, breaker
    state) only while it runs. All or nothing: a
    file of another version, or torn, adds nothing."""
    added = _added(into, other, gauges=gauges)
    if added is not None:
        into.update(added)


def _added(mine: dict[str, Any], other: dict[str, Any], *, gauges: bool) -> dict[str, Any] | None:
    """New figures: ``mine`` with ``other`` added (:func:`_add`); None when ``other`` cannot
    be read."""
    into = copy.deepcopy(mine)
    try:
        for kind, count in other["counts"].items():
            into["counts"][kind] = into["counts"].get(kind, 0) + count
        into["replayed"] += other["replayed"]
        into["saved"] += other["saved"]
        for name in ("first_byte", "backend"):
            histograms = into[name]
            for label, (counts, total) in other[name].items():
                if label not in histograms:
                    histograms[label] = (list(counts), total)
                elif len(histograms[label][0]) == len(counts):  # the same buckets
                    histograms[label] = (
                        [a + b for a, b in zip(histograms[label][0], counts, strict=True)],
                        histograms[label][1] + total,
                    )
        if gauges:
            for gauge in ("streams", "followers", "background", "in_progress"):
                into[gauge] += other[gauge]
            for state, n in other["breaker"].items():
                into["breaker"][state] = into["breaker"].get(state, 0) + n
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return into


def _bounds(option: str, buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if (
        not bounds
        or not all(0 < b < math.inf for b in bounds)
        or any(a >= b for a, b in itertools.pairwise(bounds))
    ):
        raise ConfigError(
            f"{option} must be positive, finite, strictly increasing seconds, got {buckets!r}"
        )
    return bounds


def _snapshot(histograms: dict[str, _Histogram]) -> dict[str, tuple[list[int], float]]:
    return {label: (list(h.counts), h.sum) for label, h in histograms.items()}


def _histogram(
    meta: tuple[str, str],
    label: str,
    bounds: Sequence[float],
    values: dict[str, tuple[list[int], float]],
) -> HistogramMetricFamily:
    from prometheus_client.metrics_core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    go_string = cast(Callable[[float], str], floatToGoString)  # (untyped upstream)
    les = [go_string(b) for b in bounds] + ["+Inf"]
    histogram = HistogramMetricFamily(*meta, labels=[label])
    for value, (counts, total) in values.items():
        cumulative: list[tuple[str, float]] = []
        running = 0
        for le, count in zip(les, counts, strict=True):
            running += count
            cumulative.append((le, float(running)))
        histogram.add_metric([value], cumulative, total)
    return histogram

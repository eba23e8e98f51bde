"""Metrics: the notices become Prometheus metrics with the names dashboards already use, the
histograms bucket what they observe, the gauges show live streams and their followers, and
the collector lives in whichever registry the application chooses (never the global one
unless asked)."""

from __future__ import annotations

import gc
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forked import forked, received
from sse_cache import ConfigError, Event
from sse_cache.adapters import GenericSSE
from sse_cache.engine import CacheStatus, LiveStreamsHook, Notice, StreamCache
from sse_cache.http._slots import BackgroundSlots
from sse_cache.metrics import BACKEND_BUCKETS, FIRST_BYTE_BUCKETS, Metrics
from sse_cache.testing import responses_stream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of the exposition text, as prometheus_client's own parser reads it."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


# -- counters: as before ------------------------------------------------------------------

# The series the hand-written exposition had (dashboards query these).
SERIES_BEFORE = {
    *(("sse_cache_requests_total", (("status", s.value),)) for s in CacheStatus),
    *(
        (f"sse_cache_{name}_total", ())
        for name in (
            "stores",
            "store_failures",
            "not_stored",
            "read_failures",
            "corrupt_entries",
            "invalid_requests",
            "replayed_bytes",
            "upstream_seconds_saved",
        )
    ),
    *(
        (name, (("state", state),))
        for name in (
            "sse_cache_backend_breaker_state",
            "sse_cache_backend_breaker_transitions_total",
        )
        for state in ("closed", "open", "half-open")
    ),
}


def test_counters_keep_their_names_labels_and_meaning() -> None:
    metrics = Metrics()
    for kind in ("hit", "hit", "miss", "shared", "store", "store_failed", "not_stored"):
        metrics(Notice(kind=kind, key="k", seconds=1.5))
    for kind in ("read_failed", "corrupt", "invalid", "store_skipped"):
        metrics(Notice(kind=kind, key="k"))
    metrics(Notice(kind="replayed", key="k", bytes=1234))
    metrics(Notice(kind="breaker", key="", detail="open"))
    text = metrics.render()
    got = samples(text)
    assert set(got) >= SERIES_BEFORE
    assert got[("sse_cache_requests_total", (("status", "hit"),))] == 2
    assert got[("sse_cache_requests_total", (("status", "miss"),))] == 1
    assert got[("sse_cache_requests_total", (("status", "shared"),))] == 1
    assert got[("sse_cache_requests_total", (("status", "bypass"),))] == 0
    for name in ("stores", "store_failures", "not_stored", "read_failures", "corrupt_entries"):
        assert got[(f"sse_cache_{name}_total", ())] == 1, name
    assert got[("sse_cache_invalid_requests_total", ())] == 1
    assert got[("sse_cache_store_skipped_total", ())] == 1
    assert got[("sse_cache_replayed_bytes_total", ())] == 1234
    # The recorded duration of each replayed stream (two hits of 1.5 s).
    assert got[("sse_cache_upstream_seconds_saved_total", ())] == 3.0
    assert value(text, "sse_cache_backend_breaker_state", state="open") == 1
    assert value(text, "sse_cache_backend_breaker_state", state="closed") == 0
    assert value(text, "sse_cache_backend_breaker_transitions_total", state="open") == 1
    assert metrics.count("hit") == 2
    # One TYPE line per family, the text format 0.0.4 (what the proxy says it serves).
    assert text.count("# TYPE sse_cache_requests_total counter") == 1


# -- histograms ---------------------------------------------------------------------------


def test_histograms_bucket_each_observation_by_its_label() -> None:
    metrics = Metrics(first_byte_buckets=[0.1, 1.0], backend_buckets=[0.001, 0.01])
    for seconds in (0.05, 0.1, 0.5, 3.0):  # 0.1 lands in le="0.1": the bound is inclusive
        metrics(Notice(kind="first_byte", key="k", detail="miss", seconds=seconds))
    metrics(Notice(kind="first_byte", key="k", detail="hit", seconds=0.0004))
    for op, seconds in (("get", 0.0002), ("get", 0.02), ("set", 0.005)):
        metrics(Notice(kind="backend", key="", detail=op, seconds=seconds))
    text = metrics.render()
    ttfb = "sse_cache_time_to_first_byte_seconds"
    assert value(text, ttfb + "_bucket", status="miss", le="0.1") == 2
    assert value(text, ttfb + "_bucket", status="miss", le="1.0") == 3
    assert value(text, ttfb + "_bucket", status="miss", le="+Inf") == 4
    assert value(text, ttfb + "_count", status="miss") == 4
    assert value(text, ttfb + "_sum", status="miss") == pytest.approx(3.65)
    assert value(text, ttfb + "_bucket", status="hit", le="0.1") == 1
    # Every status has its series from the start (a dashboard sees zeros, not gaps).
    for status in CacheStatus:
        assert (ttfb + "_count", (("status", status.value),)) in samples(text)
    assert value(text, ttfb + "_count", status="shared") == 0
    backend = "sse_cache_backend_operation_seconds"
    assert value(text, backend + "_bucket", operation="get", le="0.001") == 1
    assert value(text, backend + "_bucket", operation="get", le="0.01") == 1
    assert value(text, backend + "_count", operation="get") == 2
    assert value(text, backend + "_bucket", operation="set", le="0.01") == 1
    assert value(text, backend + "_count", operation="delete") == 0


def test_default_buckets_cover_replays_and_upstreams() -> None:
    assert FIRST_BYTE_BUCKETS[0] <= 0.001 and FIRST_BYTE_BUCKETS[-1] >= 30
    assert BACKEND_BUCKETS[0] <= 0.0001 and BACKEND_BUCKETS[-1] >= 2.0  # backend_timeout


@pytest.mark.parametrize("buckets", [[], [0.1, 0.1], [1.0, 0.5], [0.0, 1.0], [1.0, float("inf")]])
def test_bad_buckets_are_refused_by_name(buckets: list[float]) -> None:
    with pytest.raises(ConfigError, match="first_byte_buckets"):
        Metrics(first_byte_buckets=buckets)
    with pytest.raises(ConfigError, match="backend_buckets"):
        Metrics(backend_buckets=buckets)


# -- registries ---------------------------------------------------------------------------


def test_instances_have_registries_of_their_own_not_the_global_one() -> None:
    one, two = Metrics(), Metrics()
    one(Notice(kind="hit", key="k"))
    assert value(one.render(), "sse_cache_requests_total", status="hit") == 1
    assert value(two.render(), "sse_cache_requests_total", status="hit") == 0
    assert one.registry is not two.registry
    assert "sse_cache_requests_total" not in generate_latest(prometheus_client.REGISTRY).decode()


def test_an_application_registry_exposes_its_own_metrics_and_ours() -> None:
    registry = CollectorRegistry()
    jobs = Counter("app_jobs", "The application's own counter.", registry=registry)
    metrics = Metrics(registry=registry)
    jobs.inc()
    metrics(Notice(kind="miss", key="k"))
    text = generate_latest(registry).decode()
    assert value(text, "app_jobs_total") == 1
    assert value(text, "sse_cache_requests_total", status="miss") == 1
    assert metrics.render() == text  # render() is the registry it was registered in
    # The collector may be added to one more registry as it is ...
    other = CollectorRegistry()
    other.register(Metrics().collector)
    assert "sse_cache_live_streams" in generate_latest(other).decode()
    # ... but two instances in one registry would report the same series twice: refused.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry=registry)


def test_without_prometheus_client_the_module_imports_and_using_it_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if the extra were not installed
        import sse_cache.metrics, sse_cache.asgi, sse_cache.proxy
        from sse_cache import ConfigError
        try:
            sse_cache.metrics.Metrics()
        except ConfigError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "prometheus_client" in done.stdout
    assert "pip install 'sse-cache[proxy]'" in done.stdout


# -- gauges -------------------------------------------------------------------------------

EVENTS = responses_stream(text_deltas=20)
BODY = {"model": "m", "input": "herd", "stream": True}


def test_metrics_is_a_hook_that_watches_live_streams() -> None:
    assert isinstance(Metrics(), LiveStreamsHook)
    assert not isinstance(print, LiveStreamsHook)


@pytest.mark.anyio
async def test_gauges_show_a_live_stream_and_its_followers_while_it_is_in_flight() -> None:
    followers = 4
    metrics = Metrics()
    cache = StreamCache("memory://", GenericSSE(), hooks=[metrics])
    release = anyio.Event()
    calls = 0

    async def upstream() -> AsyncIterator[Event]:
        nonlocal calls
        calls += 1
        yield EVENTS[0]
        await release.wait()  # the stream stays in flight until the gauges were read
        for event in EVENTS[1:]:
            yield event

    go = anyio.Event()
    started = 0
    everyone_reads = anyio.Event()
    answers: list[tuple[CacheStatus, list[Event]]] = []

    async def one() -> None:
        nonlocal started
        await go.wait()
        async with cache.stream(cache.request(BODY, shared=True), upstream) as stream:
            events: list[Event] = []
            async for event in stream:
                events.append(event)
                if len(events) == 1:
                    started += 1  # a follower gets its first event only once it has joined
                    if started == followers + 1:
                        everyone_reads.set()
        answers.append((stream.status, events))

    async with anyio.create_task_group() as tg:
        for _ in range(followers + 1):
            tg.start_soon(one)
        go.set()  # released together
        await everyone_reads.wait()
        during = metrics.render()
        release.set()
    after = metrics.render()

    assert calls == 1
    assert value(during, "sse_cache_live_streams") == 1
    # The producer reads the stream too, but it is not one of its followers.
    assert value(during, "sse_cache_live_stream_followers") == followers
    assert value(after, "sse_cache_live_streams") == 0
    assert value(after, "sse_cache_live_stream_followers") == 0
    statuses = sorted(status.value for status, _ in answers)
    assert statuses == ["miss"] + ["shared"] * followers
    assert all(events == list(EVENTS) for _, events in answers)
    assert value(after, "sse_cache_requests_total", status="shared") == followers
    # Every request looked the key up once; the one answer was stored once, after one more
    # read (is a newer entry stored?).
    backend = "sse_cache_backend_operation_seconds_count"
    assert value(after, backend, operation="get") == followers + 2
    assert value(after, backend, operation="set") == 1
    await cache.aclose()


@pytest.mark.anyio
async def test_metrics_do_not_keep_a_cache_that_is_gone_alive() -> None:
    metrics = Metrics()
    cache = StreamCache("memory://", GenericSSE(), hooks=[metrics])
    watched = weakref.ref(cache.live)
    await cache.aclose()
    del cache
    gc.collect()
    assert watched() is None
    assert value(metrics.render(), "sse_cache_live_streams") == 0


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: threads
def test_a_cache_built_before_a_fork_reports_its_live_streams_in_the_child() -> None:
    # gunicorn --preload: the app (its cache, its metrics) is built in the master, and the
    # workers forked from it serve; a worker's live stream read 0 when the gauges kept only
    # what their own process had registered (helper-173).
    metrics = Metrics()
    cache = StreamCache("memory://", GenericSSE(), hooks=[metrics])

    def child(conn: Any) -> None:
        async def main() -> float:
            release = anyio.Event()

            async def upstream() -> AsyncIterator[Event]:
                yield EVENTS[0]
                await release.wait()
                for event in EVENTS[1:]:
                    yield event

            async with cache.stream(cache.request(BODY, shared=True), upstream) as stream:
                seen = 0.0
                async for _ in stream:
                    if not release.is_set():
                        seen = value(metrics.render(), "sse_cache_live_streams")
                        release.set()
            return seen

        conn.send(anyio.run(main))

    with forked(child) as conn:
        assert received(conn) == 1


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: threads
def test_a_fork_while_another_thread_holds_the_metrics_lock_leaves_the_child_free() -> None:
    # A scrape in another thread held the lock at the fork: the child, whose transports
    # report their renewed places as they start, waited on it for ever (helper-174). The
    # fork now waits for it, and the child has it.
    import threading

    metrics = Metrics()
    holding, forking = threading.Event(), threading.Event()

    def scrape() -> None:
        with metrics._lock:
            holding.set()
            forking.wait(30)  # (held until the fork has begun to wait for it)

    begins = metrics._fork_begins

    def fork_begins() -> None:
        forking.set()
        begins()

    metrics._fork_begins = fork_begins  # type: ignore[method-assign]
    scraper = threading.Thread(target=scrape)
    scraper.start()
    assert holding.wait(30)

    def child(conn: Any) -> None:
        slots = BackgroundSlots(1, [metrics])  # (reports itself: takes the lock)
        assert slots.take()
        conn.send(value(metrics.render(), "sse_cache_background_streams"))

    try:
        with forked(child) as conn:
            assert received(conn) == 1
    finally:
        scraper.join(30)
    assert metrics._lock.acquire(blocking=False)  # the parent's is free again
    metrics._lock.release()


class Server:
    """What the proxy hands Metrics.watch_requests: its requests in progress."""

    def __init__(self) -> None:
        self.requests_in_progress = 0


def test_gauges_show_streams_read_on_in_the_background_and_requests_in_progress() -> None:
    metrics = Metrics()
    slots = BackgroundSlots(2, [metrics])  # (it hands itself to the hook that watches)
    server = Server()
    metrics.watch_requests(server)
    assert value(metrics.render(), "sse_cache_background_streams") == 0
    assert slots.take() and slots.take() and not slots.take(tell=False)
    server.requests_in_progress = 7
    text = metrics.render()
    assert value(text, "sse_cache_background_streams") == 2
    assert value(text, "sse_cache_requests_in_progress") == 7
    slots.give()
    assert value(metrics.render(), "sse_cache_background_streams") == 1
    # Held weakly: a cache (its slots) or a server that is gone is no longer reported.
    del slots, server
    gc.collect()
    text = metrics.render()
    assert value(text, "sse_cache_background_streams") == 0
    assert value(text, "sse_cache_requests_in_progress") == 0


# -- several processes sharing their figures (sse-cache proxy --workers N) ---------------------


def test_processes_sharing_a_directory_each_report_all_of_them(tmp_path: Any) -> None:
    one = Metrics(share_dir=tmp_path, share_interval=60)
    two = Metrics(share_dir=tmp_path, share_interval=60)
    for kind in ("hit", "hit", "miss"):
        one(Notice(kind=kind, key="k"))
    one(Notice(kind="first_byte", key="k", detail="hit", seconds=0.002))
    two(Notice(kind="hit", key="k"))
    two(Notice(kind="first_byte", key="k", detail="hit", seconds=0.004))
    two(Notice(kind="breaker", key="", detail="open"))
    held = BackgroundSlots(8, [two])
    assert held.take()
    serving = Server()
    serving.requests_in_progress = 3
    two.watch_requests(serving)
    two.publish()
    text = one.render()  # one's scrape: its own figures and two's
    assert value(text, "sse_cache_requests_total", status="hit") == 3
    assert value(text, "sse_cache_requests_total", status="miss") == 1
    assert value(text, "sse_cache_time_to_first_byte_seconds_count", status="hit") == 2
    assert value(text, "sse_cache_time_to_first_byte_seconds_sum", status="hit") == 0.006
    # The breaker gauge counts processes per state: one closed, one open.
    assert value(text, "sse_cache_backend_breaker_state", state="closed") == 1
    assert value(text, "sse_cache_backend_breaker_state", state="open") == 1
    assert value(text, "sse_cache_background_streams") == 1
    assert value(text, "sse_cache_requests_in_progress") == 3
    # A process that stopped writing (exited): its counters stay, its gauges go.
    (path,) = [p for p in tmp_path.glob("metrics-*.json") if p != one._shared.path]  # type: ignore[union-attr]
    os.utime(path, (0, 0))
    text = one.render()
    assert value(text, "sse_cache_requests_total", status="hit") == 3
    assert value(text, "sse_cache_backend_breaker_state", state="open") == 0
    assert value(text, "sse_cache_background_streams") == 0
    assert value(text, "sse_cache_requests_in_progress") == 0
    # A file that is not ours, or torn, is passed over.
    (tmp_path / "metrics-0-bad.json").write_text("{not json")
    assert value(one.render(), "sse_cache_requests_total", status="hit") == 3


def test_a_bad_share_interval_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="share_interval"):
        Metrics(share_dir=tmp_path, share_interval=0)


# -- workers that exit: folded into the retired totals -----------------------------------------


def count(metrics: Metrics, n: int) -> None:
    """What a worker below counts: ``n`` hits, and some of every kind of figure (the values
    are sums of powers of two: added in any order, they add up exactly)."""
    for i in range(n):
        metrics(Notice(kind="hit", key="k", seconds=0.5))
        metrics(Notice(kind="first_byte", key="k", detail="hit", seconds=0.25 * (i % 4)))
        metrics(Notice(kind="backend", key="k", detail="get", seconds=0.0625 * (i % 3)))
        metrics(Notice(kind="replayed", key="k", bytes=100 + i))
    metrics(Notice(kind="miss", key="k"))
    metrics(Notice(kind="breaker", key="", detail="open"))


# Runs workers in processes of their own, as uvicorn's supervisor does: each counts, shares
# its figures (an hour between its periodic writes: it writes when told) and then, as the
# plan says, exits, is killed (SIGKILL) mid-run, is scraped at the same moment as the other
# "scrape" workers (a barrier), or dies (SIGKILL) in the fold its scrape starts, before or
# after it replaced the retired file. Prints the exit codes and the scrapes.
WORKERS = """
import json, multiprocessing, os, pathlib, signal, sys
from sse_cache.engine import Notice
from sse_cache.metrics import Metrics

COUNT

def work(n, how, directory, started, barrier, scrapes):
    metrics = Metrics(share_dir=directory, share_interval=3600)
    count(metrics, n)
    metrics.publish()
    if how == "kill":
        count(metrics, 1000)  # counted, never written: lost with the process
        started.set()
        signal.pause()
    elif how == "scrape":
        barrier.wait(timeout=60)
        scrapes.put(metrics.render())
    elif how == "die-after-replace":  # before deleting what the retired file absorbed
        pathlib.Path.unlink = lambda *_, **__: os.kill(os.getpid(), signal.SIGKILL)
        metrics.render()
    elif how == "die-before-replace":
        replace = os.replace
        def dying(src, dst):
            if pathlib.Path(dst).name == "metrics.retired.json":
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        os.replace = dying
        metrics.render()

directory, plan = sys.argv[1], json.loads(sys.argv[2])
fork = multiprocessing.get_context("fork")  # (this process has no other thread)
started, scrapes = fork.Event(), fork.SimpleQueue()
barrier = fork.Barrier(sum(how == "scrape" for _, how in plan) or 1)
processes = []
for n, how in plan:
    process = fork.Process(target=work, args=(n, how, directory, started, barrier, scrapes))
    process.start()
    processes.append(process)
    if how == "kill":
        assert started.wait(timeout=60)
        started.clear()
        process.kill()
    if how != "scrape":
        process.join()
texts = [scrapes.get() for _, how in plan if how == "scrape"]
for process in processes:
    process.join()
print(json.dumps({"exitcodes": [p.exitcode for p in processes], "scrapes": texts}))
"""
RETIRED = "metrics.retired.json"
LOCK = "metrics.lock"


def workers(directory: Path, *plan: tuple[int, str]) -> dict[str, Any]:
    script = WORKERS.replace("COUNT", textwrap.dedent(inspect.getsource(count)))
    done = subprocess.run(
        [sys.executable, "-c", script, str(directory), json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def counted(text: str) -> Samples:
    """The counters and histograms of a scrape (the gauges left out)."""
    return {
        key: sample
        for key, sample in samples(text).items()
        if key[0].endswith(("_total", "_bucket", "_count", "_sum"))
    }


def expected(*ns: int) -> Samples:
    """What one process counting what each worker shared scrapes."""
    metrics = Metrics()
    for n in ns:
        count(metrics, n)
    return counted(metrics.render())


def stop_writing(directory: Path, *keep: Path) -> None:
    """As if the processes of the files had not written for long: a file is taken for an
    exited worker's once ``3 * share_interval`` has passed (and its pid is gone); aged here
    rather than waited for."""
    for path in directory.glob("metrics-*"):
        if path not in keep:
            os.utime(path, (0, 0))


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def shared_path(metrics: Metrics) -> Path:
    assert metrics._shared is not None
    return metrics._shared.path


@pytest.mark.skipif(sys.platform == "win32", reason="fork() and flock() are POSIX")
def test_exited_and_killed_workers_are_folded_into_one_file_and_counted_exactly_once(
    tmp_path: Path,
) -> None:
    scraper = Metrics(share_dir=tmp_path, share_interval=3600)
    own = shared_path(scraper)
    shared: list[int] = []
    for first in (1, 9, 17, 25):  # 32 workers come and go, one in three killed
        plan = [(n, "kill" if n % 3 == 0 else "exit") for n in range(first, first + 8)]
        done = workers(tmp_path, *plan)
        assert done["exitcodes"] == [-signal.SIGKILL if how == "kill" else 0 for _, how in plan]
        shared += [n for n, _ in plan]
        # Written lately: not taken for exited yet, read as they are — but their gauges
        # are gone at once, their processes being gone (helper-154: a restart's old workers
        # kept theirs in the totals ~3 s, the breaker "open" in 8 workers of none).
        text = scraper.render()
        assert counted(text) == expected(*shared)
        assert value(text, "sse_cache_backend_breaker_state", state="open") == 0
        assert len(list(tmp_path.glob("metrics-*.json"))) == 1 + len(plan)
        stop_writing(tmp_path, own)
        # Folded: the same totals, and the directory holds the scraped worker's file, the
        # retired totals and the lock, however many workers have come and gone.
        assert counted(scraper.render()) == expected(*shared)
        assert files(tmp_path) == sorted([own.name, RETIRED, LOCK])
        assert counted(scraper.render()) == expected(*shared)  # scraped again: once still
    text = scraper.render()  # their gauges are gone, the scraped worker's stay
    assert value(text, "sse_cache_backend_breaker_state", state="open") == 0
    assert value(text, "sse_cache_backend_breaker_state", state="closed") == 1
    # Another worker folds the same way, and scrapes what the first does.
    other = Metrics(share_dir=tmp_path, share_interval=3600)
    assert counted(other.render()) == expected(*shared)


@pytest.mark.skipif(sys.platform == "win32", reason="fork() and flock() are POSIX")
def test_two_workers_folding_at_the_same_moment_count_each_exited_one_once(
    tmp_path: Path,
) -> None:
    exited = [(n, "exit" if n % 2 else "kill") for n in range(1, 13)]
    workers(tmp_path, *exited)
    stop_writing(tmp_path)
    done = workers(tmp_path, (20, "scrape"), (30, "scrape"))  # released together
    shared = [n for n, _ in exited] + [20, 30]
    assert done["exitcodes"] == [0, 0]
    for text in done["scrapes"]:
        assert counted(text) == expected(*shared)
    # Their own two files are left (their processes have exited: folded at the next fold).
    assert len(list(tmp_path.glob("metrics-*.json"))) == 2
    stop_writing(tmp_path)
    scraper = Metrics(share_dir=tmp_path, share_interval=3600)
    assert counted(scraper.render()) == expected(*shared)
    assert files(tmp_path) == sorted([shared_path(scraper).name, RETIRED, LOCK])


@pytest.mark.skipif(sys.platform == "win32", reason="fork() and flock() are POSIX")
@pytest.mark.parametrize("where", ["before-replace", "after-replace"])
def test_a_fold_killed_midway_loses_and_doubles_no_count(tmp_path: Path, where: str) -> None:
    import fcntl

    workers(tmp_path, (3, "exit"), (4, "kill"))
    stop_writing(tmp_path)
    exited = sorted(path.name for path in tmp_path.glob("metrics-*.json"))
    done = workers(tmp_path, (5, "die-" + where))
    assert done["exitcodes"] == [-signal.SIGKILL]
    # The two exited workers' files are still there; after the replace, the retired file
    # has their figures and names them.
    assert set(exited) <= {path.name for path in tmp_path.glob("metrics-*.json")}
    if where == "after-replace":
        retired = json.loads((tmp_path / RETIRED).read_text())
        assert retired["absorbed"] == exited
        assert retired["figures"]["counts"]["hit"] == 3 + 4
    else:
        assert not (tmp_path / RETIRED).exists()
    scraper = Metrics(share_dir=tmp_path, share_interval=3600)
    with (tmp_path / LOCK).open("a") as lock:  # another worker folding: read as they are
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert counted(scraper.render()) == expected(3, 4, 5)
    assert counted(scraper.render()) == expected(3, 4, 5)  # folded now
    stop_writing(tmp_path, shared_path(scraper))
    assert counted(scraper.render()) == expected(3, 4, 5)
    assert files(tmp_path) == sorted([shared_path(scraper).name, RETIRED, LOCK])

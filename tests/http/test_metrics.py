"""Metrics: the notices become Prometheus metrics with the names dashboards already use, the
histograms bucket what they observe, the gauges show live streams and their followers, and
the collector lives in whichever registry the application chooses (never the global one
unless asked)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sse_cache import ConfigError, Event
from sse_cache.adapters import GenericSSE
from sse_cache.engine import CacheStatus, LiveStreamsHook, Notice, StreamCache
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
        async with cache.stream(cache.request(BODY), upstream) as stream:
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


# -- several processes sharing their figures (sse-cache proxy --workers N) ---------------------


def test_processes_sharing_a_directory_each_report_all_of_them(tmp_path: Any) -> None:
    import os

    one = Metrics(share_dir=tmp_path, share_interval=60)
    two = Metrics(share_dir=tmp_path, share_interval=60)
    for kind in ("hit", "hit", "miss"):
        one(Notice(kind=kind, key="k"))
    one(Notice(kind="first_byte", key="k", detail="hit", seconds=0.002))
    two(Notice(kind="hit", key="k"))
    two(Notice(kind="first_byte", key="k", detail="hit", seconds=0.004))
    two(Notice(kind="breaker", key="", detail="open"))
    two.publish()
    text = one.render()  # one's scrape: its own figures and two's
    assert value(text, "sse_cache_requests_total", status="hit") == 3
    assert value(text, "sse_cache_requests_total", status="miss") == 1
    assert value(text, "sse_cache_time_to_first_byte_seconds_count", status="hit") == 2
    assert value(text, "sse_cache_time_to_first_byte_seconds_sum", status="hit") == 0.006
    # The breaker gauge counts processes per state: one closed, one open.
    assert value(text, "sse_cache_backend_breaker_state", state="closed") == 1
    assert value(text, "sse_cache_backend_breaker_state", state="open") == 1
    # A process that stopped writing (exited): its counters stay, its gauges go.
    (path,) = [p for p in tmp_path.glob("metrics-*.json") if p != one._shared.path]  # type: ignore[union-attr]
    os.utime(path, (0, 0))
    text = one.render()
    assert value(text, "sse_cache_requests_total", status="hit") == 3
    assert value(text, "sse_cache_backend_breaker_state", state="open") == 0
    # A file that is not ours, or torn, is passed over.
    (tmp_path / "metrics-0-bad.json").write_text("{not json")
    assert value(one.render(), "sse_cache_requests_total", status="hit") == 3


def test_a_bad_share_interval_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="share_interval"):
        Metrics(share_dir=tmp_path, share_interval=0)

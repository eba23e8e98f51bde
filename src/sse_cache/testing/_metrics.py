"""Reading a scrape of the metrics (``/_sse_cache/metrics``, :meth:`Metrics.render
<sse_cache.metrics.Metrics.render>`) in a test, as Prometheus reads it."""

from __future__ import annotations


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` in the Prometheus exposition ``text``, as
    ``prometheus_client``'s own parser reads it (``sse_cache_requests_total``,
    ``status="hit"``). Raises :class:`AssertionError` naming the sample when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels} in the metrics")

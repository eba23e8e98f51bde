"""The sans-IO recorder's store decision, and pacing parsing. No event loop needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from sse_cache import ConfigError, Event, Outcome
from sse_cache.adapters import GenericSSE
from sse_cache.pacing import Pacing
from sse_cache.recorder import Recorder, RecorderState


class Completing(GenericSSE):
    """A schema with a completing ("done") and a failing ("error") event."""

    name = "completing"

    def outcome(self, event: Event) -> Outcome:
        return {"done": Outcome.COMPLETE, "error": Outcome.FAIL}.get(
            event.event or "", Outcome.CONTINUE
        )

    def end_outcome(self) -> Outcome:
        return Outcome.FAIL

    def meta(self, events: Sequence[Event]) -> Mapping[str, Any]:
        return {"count": str(len(events))}


def test_generic_clean_end_is_stored() -> None:
    rec = Recorder(GenericSSE())
    for i in range(3):
        rec.add(Event(str(i)), i / 10)
    entry = rec.finish(clean_end=True, status=200)
    assert entry is not None and entry.events == (
        Event("0"),
        Event("1", at=0.1),
        Event("2", at=0.2),
    )
    assert entry.schema == "generic" and entry.content_type == "text/event-stream"


def test_cut_stream_is_not_stored() -> None:
    rec = Recorder(GenericSSE())
    rec.add(Event("x"), 0.0)
    assert rec.finish(clean_end=False) is None
    assert rec.state is RecorderState.FAILED and "cut" in rec.reason


@pytest.mark.parametrize("status", [199, 300, 404, 500])
def test_non_2xx_is_not_stored(status: int) -> None:
    rec = Recorder(GenericSSE())
    rec.add(Event("x"), 0.0)
    assert rec.finish(clean_end=True, status=status) is None
    assert str(status) in rec.reason


def test_schema_without_completing_event_is_not_stored() -> None:
    rec = Recorder(Completing())
    rec.add(Event("x", "delta"), 0.0)
    assert rec.finish(clean_end=True) is None
    assert "completing event" in rec.reason


def test_completing_event_stores_even_if_the_reader_leaves_after_it() -> None:
    rec = Recorder(Completing())
    rec.add(Event("x", "delta"), 0.0)
    rec.add(Event("y", "done"), 0.0)
    entry = rec.finish(clean_end=False)  # the reader left after completion: harmless
    assert entry is not None and entry.meta == {"count": "2"}


def test_failing_event_drops_the_recording() -> None:
    rec = Recorder(Completing())
    rec.add(Event("x", "delta"), 0.0)
    rec.add(Event("e", "error"), 0.0)
    rec.add(Event("y", "done"), 0.0)  # a late "completion" cannot revive it
    assert rec.finish(clean_end=True) is None
    assert "failure (error)" in rec.reason and rec.events == [] and not rec.active


def test_fail_is_final() -> None:
    rec = Recorder(GenericSSE())
    rec.add(Event("x"), 0.0)
    rec.fail("no-store")
    rec.add(Event("y"), 0.1)
    assert rec.finish(clean_end=True) is None and rec.reason == "no-store"


def test_oversize_stops_recording_and_frees_memory() -> None:
    rec = Recorder(GenericSSE(), max_entry_bytes=1000)
    for _ in range(100):
        rec.add(Event("x" * 50), 0.0)
    assert rec.state is RecorderState.OVERSIZE and rec.events == []
    assert rec.finish(clean_end=True) is None
    assert "max_entry_bytes" in rec.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("instant", Pacing("instant")),
        ("original", Pacing("original")),
        ("2x", Pacing("original", factor=2.0)),
        ("0.5x", Pacing("original", factor=0.5)),
        ("20ms", Pacing("fixed", gap=0.02)),
        (" Original ", Pacing("original")),
        (3, Pacing("original", factor=3.0)),
    ],
)
def test_pacing_parse(text: str | float, expected: Pacing) -> None:
    assert Pacing.parse(text) == expected


@pytest.mark.parametrize("bad", ["fast", "0x", "-1x", "ms", "1.2.3x", 0, -2.0, ""])
def test_bad_pacing_is_a_config_error_naming_the_value(bad: str | float) -> None:
    with pytest.raises(ConfigError, match="pacing|factor"):
        Pacing.parse(bad)


class Verifying(Completing):
    def verify(self, events: Sequence[Event]) -> Outcome:
        return Outcome.COMPLETE if len(events) >= 2 else Outcome.FAIL


def test_whole_stream_check_runs_before_storing() -> None:
    short = Recorder(Verifying())
    short.add(Event("y", "done"), 0.0)
    assert short.finish(clean_end=True) is None and "whole-stream" in short.reason
    ok = Recorder(Verifying())
    ok.add(Event("x", "delta"), 0.0)
    ok.add(Event("y", "done"), 0.0)
    assert ok.finish(clean_end=True) is not None

"""The bound on streams read on without their client (sse_cache.http._slots): a refusal is
said and counted, since a resume by id of a stream not held is answered by the upstream."""

from __future__ import annotations

import logging

import pytest

from sse_cache._notices import Notice
from sse_cache.http._slots import BackgroundSlots


def test_a_refused_slot_is_said_once_per_interval_and_told_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # helper-130: a resume answered from the upstream (404) because its stream was not held
    # (eight others were); nothing in the log or metrics said so.
    told: list[Notice] = []
    slots = BackgroundSlots(2, [told.append])
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert slots.take() and slots.take()
        assert caplog.records == [] and told == []
        assert not slots.take() and not slots.take()
        slots.give()
        assert slots.take()
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "sse_cache: a stream whose client left is not read on (held for its resume window, "
        "or finished in the background): max_background=2 already are"
    ]
    assert [n.kind for n in told] == ["background_full", "background_full"]
    assert slots.taken == 2


def test_no_slot_wanted_is_not_a_refusal(caplog: pytest.LogCaptureFixture) -> None:
    told: list[Notice] = []
    slots = BackgroundSlots(0, [told.append])  # max_background=0: the operator's choice
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert not slots.take()
    assert caplog.records == [] and told == []

"""The bound on streams read on without their client (sse_cache.http._slots): a refusal is
said, since a resume by id of a stream not held is answered by the upstream."""

from __future__ import annotations

import logging

import pytest

from sse_cache.http._slots import BackgroundSlots


def test_a_refused_slot_is_said_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    # helper-130: a resume answered from the upstream (404) because its stream was not held
    # (eight others were); nothing in the log or metrics said so.
    slots = BackgroundSlots(2)
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert slots.take() and slots.free() and slots.take()
        assert caplog.records == []
        assert not slots.take() and not slots.free() and not slots.take()
        slots.give()
        assert slots.free()
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "sse_cache: a stream whose client left is not read on (held for its resume window, "
        "or finished in the background): max_background=2 already are"
    ]
    assert slots.taken == 1


def test_no_slot_wanted_is_not_a_refusal(caplog: pytest.LogCaptureFixture) -> None:
    slots = BackgroundSlots(0)  # max_background=0: the operator's choice
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert not slots.take() and not slots.free()
    assert caplog.records == []

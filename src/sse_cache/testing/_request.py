"""What one request to the mock asks for: its per-request options (``x-mock-*`` headers), the
lenient readers of its JSON body, and :class:`Answer`, everything it can be answered with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..events import Event

__all__ = [
    "ERROR_MODES",
    "Answer",
    "BadRequest",
    "Options",
    "as_dict",
    "as_list",
    "fails_with",
    "header_number",
    "last_item",
    "positive_int",
]

#: Values of the ``x-mock-error`` request header.
ERROR_MODES: Final = frozenset({"fail-mid-stream", "cut", "bad-sse", "500", "429"})
_MAX_HEADER_COUNT: Final = 100_000


class BadRequest(Exception):
    """A request the mock answers with 400; ``param`` names the field or header at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Options:
    """The app's defaults with the request's ``x-mock-*`` headers applied."""

    delay: float
    first_delay: float
    deltas: int
    summaries: int
    error: str | None
    error_after: int | None
    retry_after: str

    def words_within(self, limit: int | None) -> int:
        """Words in the answer: ``deltas``, capped by the request's token ``limit``."""
        return self.deltas if limit is None else max(1, min(self.deltas, limit))


@dataclass(frozen=True, slots=True)
class Answer:
    """Everything one request can be answered with; which part is sent depends on the mode."""

    events: list[Event]  # the complete stream
    body: bytes  # the non-stream answer
    failure: Callable[[int], list[Event]]  # fail-mid-stream events after n events were sent
    failed_unary: tuple[int, bytes]  # fail-mid-stream answer to a non-stream request


def fails_with(event: Event) -> Callable[[int], list[Event]]:
    """An :attr:`Answer.failure` that is the same event wherever the stream breaks."""
    return lambda _sent: [event]


def header_number(headers: Mapping[str, str], name: str, *, integer: bool) -> float | None:
    """The number in header ``name`` (None when absent); :class:`BadRequest` when it is not a
    number in 0..100,000."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise BadRequest(f"header {name} must be a number, got {raw!r}", name) from None
    if not 0 <= value <= _MAX_HEADER_COUNT:
        raise BadRequest(f"header {name} must be between 0 and {_MAX_HEADER_COUNT}", name)
    return value


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def positive_int(value: Any) -> int | None:
    """``value`` when it is a positive integer (a token limit, a count), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def last_item(body: Mapping[str, Any], key: str) -> Any:
    """The last element of the list ``body[key]`` (the conversation's last turn), or None."""
    items = body.get(key)
    return items[-1] if isinstance(items, list) and items else None

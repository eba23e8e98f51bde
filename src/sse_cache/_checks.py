"""The option checkers of the constructors (:class:`~sse_cache.http.options.CacheOptions`,
:class:`~sse_cache.engine.StreamCache`, :class:`~sse_cache.http.policy.CachePolicy`).

Each takes the option's name and value and raises :class:`~sse_cache.errors.ConfigError`
``"{name} must be ..., got {value!r}"`` (``got the string '5'`` for text) when the value
is wrong: of the wrong type (a string from an environment variable, a bool where a number
is meant), NaN (which passes every
``x <= 0`` check and would silently turn a limit off) or out of range. They run once, at
construction: nothing here is on a request's path.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ConfigError
from .pacing import Pacing

__all__ = [
    "BYTES",
    "MAX_TTL",
    "MAX_TTL_SHOWN",
    "POSITIVE_BYTES",
    "boolean",
    "callables",
    "instance_of",
    "integer",
    "mapping",
    "pacing_of",
    "positive_number",
    "text",
    "ttl_of",
]

#: What a byte limit must be, in the errors of :func:`integer`.
POSITIVE_BYTES = "a positive whole number of bytes"
#: What a byte budget must be, in the errors of :func:`integer` (0 turns it off).
BYTES = "a whole number of bytes >= 0 (0 turns it off)"

#: The longest lifetime an entry may be given, in seconds: one year (365 days), for every
#: ``ttl`` option, ``--ttl`` / ``SSE_CACHE_TTL`` and the ``x-sse-cache-ttl`` header; also the
#: largest ``x-sse-cache-max-age``. Longer values are refused, not cut: a "1e308 seconds"
#: lifetime is a mistake, not an intention (no expiry is ``ttl=None``). A year is what HTTP
#: itself allowed for an ``Expires`` date (RFC 2616 §14.21), and every backend keeps it as
#: asked: memcached cannot be given an expiry past January 2038 (it would end sooner),
#: Redis's ``PX`` and SQLite's expiry times are far from their limits.
MAX_TTL = 365 * 86400
#: :data:`MAX_TTL` as the errors say it.
MAX_TTL_SHOWN = "one year"


def positive_number(
    name: str,
    value: object,
    *,
    finite: bool = True,
    maximum: float | None = None,
    what: str = "a positive number of seconds",
) -> float:
    """``value`` as a float, checked to be a real number (an int, a float, a numpy scalar; not
    a bool) ``> 0``: finite unless ``finite=False``, at most ``maximum`` when given."""
    number = float(value) if isinstance(value, numbers.Real) else math.nan
    if (
        isinstance(value, bool)
        or not number > 0  # (NaN included: not a number at all, too)
        or (finite and not math.isfinite(number))
        or (maximum is not None and number > maximum)
    ):
        at_most = "" if maximum is None else f" of at most {maximum:g}"
        raise ConfigError(f"{name} must be {what}{at_most}, got {_as_given(value)}")
    return number


def integer(name: str, value: object, *, minimum: int = 1, what: str = "") -> int:
    """``value`` as an int, checked to be a whole number ``>= minimum``: an int (a numpy
    integer too) or a float with nothing after the point (``1e6``); never a bool, never
    rounded (``1.5`` is refused). ``what`` says what it must be in the error (by default: a
    positive integer, an integer >= minimum)."""
    whole = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    number: int | None = int(value) if whole else None  # type: ignore[call-overload]
    if number is None or number < minimum:
        what = what or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise ConfigError(f"{name} must be {what}, got {_as_given(value)}")
    return number


def _as_given(value: object) -> str:
    """A wrong value as an error shows it: a number given as text says so (``ttl="5"`` read
    as a range error, "got '5'"; helper-126)."""
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


def boolean(name: str, value: object) -> None:
    """Check that ``value`` is a bool: a string such as ``"false"`` (from an environment
    variable) is not taken as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {_as_given(value)}")


def text(name: str, value: object) -> None:
    """Check that ``value`` is a str."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {_as_given(value)}")


def mapping(name: str, value: object, *, what: str = "a mapping") -> None:
    """Check that ``value`` is a :class:`~collections.abc.Mapping` (a dict)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be {what}, got {_as_given(value)}")


def callables(name: str, value: object) -> tuple[Callable[..., Any], ...]:
    """``value`` as a tuple: an iterable (a list) of plain callables. One callable alone, a
    non-callable item, or an ``async def`` one (its coroutine would never be awaited) is
    refused."""
    if callable(value) or isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{name} must be a list of callables, got {_as_given(value)}")
    items = tuple(value)
    for item in items:
        if not callable(item):
            raise ConfigError(f"{name} must be a list of callables, got {item!r} in it")
        if _is_async(item):
            raise ConfigError(
                f"{name} must be plain (not async) callables: they are called, never "
                f"awaited, got {item!r}"
            )
    return items


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token


def is_header_name(text: object) -> bool:
    """Whether ``text`` is a header name (RFC 9110's token)."""
    return isinstance(text, str) and _HEADER_NAME.fullmatch(text) is not None


def header_names(name: str, value: object) -> tuple[str, ...]:
    """``value`` as a tuple of lower-case header names, without repeats: an iterable (a
    list) of names. One name alone (a ``str``: its letters would be taken for names) or an
    item that is no header name is refused."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{name} must be a list of header names, got {_as_given(value)}")
    items = tuple(value)
    for item in items:
        if not is_header_name(item):
            raise ConfigError(f"{name} must be a list of header names, got {item!r} in it")
    return tuple(dict.fromkeys(item.lower() for item in items))


def _is_async(item: object) -> bool:
    # An ``async def`` function (also behind functools.partial), or an object whose
    # ``__call__`` is one.
    call = inspect.getattr_static(type(item), "__call__", None)
    return inspect.iscoroutinefunction(item) or inspect.iscoroutinefunction(call)


def instance_of(name: str, value: object, kind: type, *, optional: bool = False) -> None:
    """Check that ``value`` is an instance of ``kind`` (a class, or a runtime-checkable
    protocol); None too when ``optional``. A class is refused even when it has every
    attribute the protocol asks for (an adapter class given where its instance is meant)."""
    if value is None and optional:
        return
    if isinstance(value, type):
        raise ConfigError(
            f"{name} must be {_a(kind.__name__)} instance, got the class {value.__name__} "
            f"(call it: {value.__name__}())"
        )
    if not isinstance(value, kind):
        none = " or None" if optional else ""
        raise ConfigError(f"{name} must be {_a(kind.__name__)}{none}, got {_as_given(value)}")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "AEIOU" else f"a {noun}"


def pacing_of(name: str, value: object) -> Pacing:
    """``value`` read as a :class:`~sse_cache.pacing.Pacing` (a pacing string, a finite
    positive speed factor, or a Pacing), the error naming the option."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        positive_number(name, value, what="a pacing string or a positive speed factor")
    try:
        return Pacing.parse(value)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def ttl_of(name: str, value: object) -> float:
    """A lifetime given as an option: a positive number of seconds, at most :data:`MAX_TTL`
    (infinity too is refused: no expiry is None, which the caller lets through)."""
    seconds = positive_number(name, value, finite=False)
    if seconds > MAX_TTL:
        raise ConfigError(
            f"{name} must be at most {MAX_TTL} seconds ({MAX_TTL_SHOWN}) or None for no "
            f"expiry, got {value!r}"
        )
    return seconds

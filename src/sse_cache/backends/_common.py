"""Helpers shared by the built-in backends: URL option parsing and validation, TTL handling."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import BackendUnavailable, ConfigError
from ..keys import check_key as check_key  # (every backend refuses such keys alike)

__all__ = [
    "MAX_TIMEOUT",
    "Options",
    "check_key",
    "check_open",
    "expires_at",
    "netloc_for_errors",
    "parse_hosts",
    "to_bytes",
]

#: The longest timeout option a backend takes, in seconds (one day). Longer ones are refused
#: when the backend is created: deadlines past what the platform's clocks and sockets count
#: (``?timeout=1e300``) would otherwise fail every operation with an OverflowError.
MAX_TIMEOUT: Final = 86400.0

_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def byte_count(text: str) -> int | None:
    """A byte count as written in a URL or on a command line: ``1048576``, ``512KiB``,
    ``64MiB``, ``1G`` (binary units); None for anything else."""
    match = _SIZE_RE.match(text)
    if match is None:
        return None
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()[:1]]


class Options:
    """The options of one backend URL: its query parameters, overridden by keyword arguments.

    Each ``take_*`` call consumes one option and validates it; :meth:`finish` then rejects any
    option nobody took, so a misspelt parameter is an error instead of being silently ignored.
    Every error is a :class:`ConfigError` naming the parameter and the URL scheme.
    """

    def __init__(self, url: str, overrides: Mapping[str, Any] | None = None) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        self._values: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in self._values:
                raise ConfigError(f"{self.scheme}:// URL: parameter {name!r} given twice")
            self._values[name] = value
        self._values.update(overrides or {})

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def _error(self, name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.scheme}:// option {name!r}: expected {expected}, got {value!r}")

    def take_raw(self, name: str) -> Any:
        """Consume ``name`` and return it unconverted (None when absent)."""
        return self._values.pop(name, None)

    def take_str(self, name: str, default: str) -> str:
        value = self._values.pop(name, default)
        if not isinstance(value, str):
            raise self._error(name, value, "a string")
        return value

    def take_float(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        allow_zero: bool = False,
        maximum: float = math.inf,
    ) -> float:
        """A finite number, ``> minimum`` (``>= minimum`` with ``allow_zero``) and
        ``<= maximum`` (timeouts: :data:`MAX_TIMEOUT`)."""
        value = self._values.pop(name, default)
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise self._error(name, value, "a number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise self._error(name, value, "a finite number")
        if number < minimum or (number == minimum and not allow_zero):
            bound = f">= {minimum}" if allow_zero else f"> {minimum}"
            raise self._error(name, value, f"a number {bound}")
        if number > maximum:
            raise self._error(name, value, f"a number <= {maximum:g}")
        return number

    def take_timeout(self, name: str, default: float) -> float:
        """A number of seconds, ``> 0`` and at most :data:`MAX_TIMEOUT` (one day)."""
        return self.take_float(name, default, maximum=MAX_TIMEOUT)

    def take_int(
        self, name: str, default: int, *, minimum: int = 1, maximum: int | None = None
    ) -> int:
        """An integer ``>= minimum`` (and ``<= maximum`` when given): an ``int``, a string of
        digits, or an integral number (``2.0``); never rounded (``1.9``, ``inf``: errors)."""
        value = self._values.pop(name, default)
        if isinstance(value, bool):
            raise self._error(name, value, "an integer")
        try:
            number = int(value)  # (a string must be digits: int("1.9") fails)
        except (TypeError, ValueError, OverflowError):
            raise self._error(name, value, "an integer") from None
        if not isinstance(value, int | str) and number != value:
            raise self._error(name, value, "an integer")  # 1.9 -> 1: refused, not rounded
        if number < minimum or (maximum is not None and number > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise self._error(name, value, f"an integer {bound}")
        return number

    def take_opt_int(self, name: str, *, minimum: int = 1) -> int | None:
        """Like :meth:`take_int`, with None (or ``none``) when absent."""
        value = self._values.get(name)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            self._values.pop(name, None)
            return None
        return self.take_int(name, 0, minimum=minimum)

    def take_size(self, name: str, default: int | None, *, minimum: int = 1) -> int | None:
        """A byte count: ``1048576``, ``512KiB``, ``64MiB``, ``1G`` (binary units), or ``none``."""
        value = self._values.pop(name, default)
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and (counted := byte_count(value)) is not None:
            number = counted
        else:
            raise self._error(name, value, "a size such as 1048576, 512KiB or 64MiB")
        if number < minimum:
            raise self._error(name, value, f"a size >= {minimum} bytes")
        return number

    def take_bool(self, name: str, default: bool) -> bool:
        value = self._values.pop(name, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise self._error(name, value, "true or false")

    def remaining(self) -> dict[str, Any]:
        """Consume and return every option not taken yet."""
        rest, self._values = self._values, {}
        return rest

    def finish(self) -> None:
        """Raise :class:`ConfigError` if an option was given that no ``take_*`` consumed."""
        if self._values:
            names = ", ".join(sorted(repr(n) for n in self._values))
            raise ConfigError(f"{self.scheme}:// URL: unknown option(s) {names}")


def parse_hosts(scheme: str, netloc: str, default_port: int) -> list[tuple[str, int]]:
    """``h1:p1,h2:p2`` (``[v6]:port`` allowed, port optional) -> ``[(host, port), ...]``."""
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"{scheme}:// URL: empty host in {netloc!r}")
        parts = urlsplit(f"//{item}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{scheme}:// URL: bad port in {item!r}") from None
        if not parts.hostname:
            raise ConfigError(f"{scheme}:// URL: missing host in {item!r}")
        if port == 0:
            raise ConfigError(f"{scheme}:// URL: port 0 in {item!r}")
        hosts.append((unquote(parts.hostname), port if port is not None else default_port))
    return hosts


def netloc_for_errors(url: str) -> str:
    """The ``host:port`` part of ``url`` without its user info, for an error message."""
    rest = url.partition("://")[2] or url
    return re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)[0]


def check_open(closed: bool, name: str) -> None:
    """The contract: any operation on a closed backend raises BackendUnavailable."""
    if closed:
        raise BackendUnavailable(f"{name} is closed")


def expires_at(now: float, ttl: float | None) -> float | None:
    """Absolute expiry time for ``ttl`` seconds from ``now`` (None: never, for ``None`` and
    ``math.inf`` alike)."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or math.isnan(ttl):
        raise ConfigError(f"ttl must be a number of seconds or None, got {ttl!r}")
    return None if ttl == math.inf else now + ttl


def to_bytes(value: bytes | bytearray | memoryview) -> bytes:
    """Backends store immutable ``bytes``; accept the other buffer types too."""
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"value must be bytes, got {type(value).__name__}")


def chunked(items: list[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

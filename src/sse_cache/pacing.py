"""Replay pacing: how fast a cached stream is played back."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from .errors import ConfigError

__all__ = ["Pacing"]

_FACTOR = re.compile(r"^(\d+(?:\.\d+)?)x$")
_GAP = re.compile(r"^(\d+(?:\.\d+)?)ms$")


class Pacing(msgspec.Struct, frozen=True):
    """``instant`` (as fast as the client reads), ``original`` (the recorded gaps between
    events, divided by ``factor``) or ``fixed`` (``gap`` seconds between events).

    :meth:`parse` reads the ``x-sse-cache-replay`` header forms: ``instant``, ``original``,
    ``<x>x`` (original gaps at x times the speed: ``2x``, ``0.5x``) and ``<ms>ms`` (a fixed
    gap per event).
    """

    mode: Literal["instant", "original", "fixed"] = "instant"
    factor: float = 1.0
    gap: float = 0.0

    @classmethod
    def parse(cls, value: str | float | Pacing) -> Pacing:
        """A :class:`Pacing` from a header value, a speed factor, or a Pacing (returned as is).
        Raises :class:`ConfigError` naming the bad value."""
        if isinstance(value, Pacing):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value <= 0:
                raise ConfigError(f"replay speed factor must be positive, got {value!r}")
            return cls("original", factor=float(value))
        if not isinstance(value, str):
            raise ConfigError(f"invalid replay pacing {value!r}")
        text = value.strip().lower()
        if text in ("instant", "original"):
            return cls(text)  # type: ignore[arg-type]
        if m := _FACTOR.match(text):
            factor = float(m.group(1))
            if factor > 0:
                return cls("original", factor=factor)
        elif m := _GAP.match(text):
            return cls("fixed", gap=float(m.group(1)) / 1000.0)
        raise ConfigError(
            f"invalid replay pacing {value!r}: expected instant, original, <x>x or <ms>ms"
        )

    @property
    def instant(self) -> bool:
        return self.mode == "instant"

    def delay(self, at: float) -> float:
        """Offset from the replay's start at which an event recorded at ``at`` is due
        (``fixed``: callers space events by :attr:`gap` instead)."""
        return at / self.factor

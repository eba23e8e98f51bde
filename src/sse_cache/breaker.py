"""A circuit breaker for a backend: a sans-IO state machine (the clock is passed in).

A backend that hangs costs every request its whole ``backend_timeout``, for as long as it
hangs; one that is down costs a connection error each time. After ``failures`` consecutive
failures (errors or timeouts) the breaker *opens*: for ``cooldown`` seconds the cache skips
the backend altogether (a lookup is a miss, a store is skipped) and a request pays nothing
for it. Then it is *half-open*: one call is let through as a probe — its success closes the
breaker, its failure opens it for another ``cooldown``. Every transition is reported once
(the engine logs it and emits a ``breaker`` notice: metrics, health).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

from .errors import ConfigError

__all__ = ["DEFAULT_BREAKER_COOLDOWN", "DEFAULT_BREAKER_FAILURES", "Breaker", "BreakerState"]

#: Consecutive backend failures that open the breaker (0: never).
DEFAULT_BREAKER_FAILURES = 5
#: Seconds an open breaker skips the backend before it lets one probe through.
DEFAULT_BREAKER_COOLDOWN = 10.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    """The backend is used."""
    OPEN = "open"
    """The backend is skipped until the cooldown has passed."""
    HALF_OPEN = "half-open"
    """One probe is under way; other calls skip the backend until it answers."""


class Breaker:
    """See the module docstring. ``on_change(state, why)`` is called at every transition."""

    __slots__ = ("_failed", "_opened_at", "_probing", "cooldown", "failures", "on_change", "state")

    def __init__(
        self,
        failures: int = DEFAULT_BREAKER_FAILURES,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        *,
        on_change: Callable[[BreakerState, str], None] | None = None,
    ) -> None:
        if not isinstance(failures, int) or failures < 0:
            raise ConfigError(f"breaker failures must be an integer >= 0, got {failures!r}")
        if not (cooldown > 0 and math.isfinite(cooldown)):
            raise ConfigError(f"breaker cooldown must be positive seconds, got {cooldown!r}")
        self.failures = failures
        self.cooldown = cooldown
        self.on_change = on_change
        self.state = BreakerState.CLOSED
        self._failed = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        """Whether a backend call may be made now (False: skip the backend). In the
        half-open state exactly one caller gets True: the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            if now - self._opened_at < self.cooldown:
                return False
            self._set(BreakerState.HALF_OPEN, f"probing after {self.cooldown:g} s")
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        """The call that :meth:`allow` let through succeeded."""
        self._failed = 0
        if self.state is not BreakerState.CLOSED:
            self._probing = False
            self._set(BreakerState.CLOSED, "the backend answered")

    def cancelled(self) -> None:
        """The call that :meth:`allow` let through was cancelled: it tells nothing about the
        backend (a half-open breaker lets the next caller probe)."""
        self._probing = False

    def failure(self, now: float, why: str = "") -> None:
        """The call that :meth:`allow` let through failed (an error or a timeout)."""
        if self.state is BreakerState.CLOSED:
            self._failed += 1
            if self.failures and self._failed >= self.failures:
                self._open(now, f"{self._failed} consecutive backend failures, the last: {why}")
        else:
            self._probing = False
            self._open(now, f"the probe failed: {why}")

    def _open(self, now: float, why: str) -> None:
        self._opened_at = now
        self._failed = 0
        self._set(BreakerState.OPEN, why)

    def _set(self, state: BreakerState, why: str) -> None:
        if state is self.state:
            return
        self.state = state
        if self.on_change is not None:
            self.on_change(state, why)

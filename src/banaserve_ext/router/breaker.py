# SPDX-License-Identifier: Apache-2.0
"""Per-worker circuit breaker and health tracker: pure state machines, time passed in.

Breaker: ``closed`` → ``open`` after ``failure_threshold`` consecutive failures; after
``timeout_s`` it lets trial requests through (``half_open``); ``success_threshold`` consecutive
successes close it, any failure reopens it. 4xx answers are the client's fault and are not
recorded by the caller.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    __slots__ = (
        "failure_threshold",
        "success_threshold",
        "timeout_s",
        "enabled",
        "state",
        "failures",
        "successes",
        "opened_at_s",
        "transitions",
    )

    def __init__(
        self,
        failure_threshold: int = 10,
        success_threshold: int = 3,
        timeout_s: float = 60.0,
        enabled: bool = True,
    ) -> None:
        if failure_threshold < 1 or success_threshold < 1 or timeout_s < 0:
            raise InvalidArgumentError(
                "circuit breaker needs failure_threshold >= 1, success_threshold >= 1, "
                f"timeout_s >= 0; got {failure_threshold}, {success_threshold}, {timeout_s}"
            )
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_s = timeout_s
        self.enabled = enabled
        self.state = CLOSED
        self.failures = 0
        self.successes = 0
        self.opened_at_s = 0.0
        self.transitions = 0

    def allows(self, now_s: float) -> bool:
        """May a request go to this worker now?"""
        if not self.enabled or self.state == CLOSED:
            return True
        if self.state == OPEN and now_s - self.opened_at_s >= self.timeout_s:
            self._to(HALF_OPEN)
            self.successes = 0
        return self.state == HALF_OPEN

    def record(self, ok: bool, now_s: float) -> None:
        if not self.enabled:
            return
        if ok:
            self.failures = 0
            if self.state == HALF_OPEN:
                self.successes += 1
                if self.successes >= self.success_threshold:
                    self._to(CLOSED)
            return
        self.successes = 0
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self._to(OPEN)
            self.opened_at_s = now_s

    def _to(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.transitions += 1


class HealthTracker:
    """Healthy/unhealthy with hysteresis: ``failure_threshold`` consecutive failed checks mark a
    worker unhealthy, ``success_threshold`` consecutive good ones bring it back."""

    __slots__ = ("failure_threshold", "success_threshold", "healthy", "_fails", "_oks")

    def __init__(self, failure_threshold: int = 3, success_threshold: int = 2) -> None:
        if failure_threshold < 1 or success_threshold < 1:
            raise InvalidArgumentError("health thresholds must be >= 1")
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.healthy = True
        self._fails = 0
        self._oks = 0

    def record(self, ok: bool) -> bool:
        """Record one check; returns the (possibly new) health."""
        if ok:
            self._fails = 0
            self._oks += 1
            if not self.healthy and self._oks >= self.success_threshold:
                self.healthy = True
        else:
            self._oks = 0
            self._fails += 1
            if self.healthy and self._fails >= self.failure_threshold:
                self.healthy = False
        return self.healthy

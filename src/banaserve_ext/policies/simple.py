# SPDX-License-Identifier: Apache-2.0
"""Baseline policies with SGLang router semantics: ``round_robin``, ``random``, ``power_of_two``."""

from __future__ import annotations

from collections.abc import Sequence

from .base import PolicyBase, RequestInfo, WorkerLoad


class RoundRobinPolicy(PolicyBase):
    """A global counter modulo the number of candidates."""

    name = "round_robin"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self._next = 0

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        i = self._next % len(workers)
        self._next += 1
        return i


class RandomPolicy(PolicyBase):
    """Uniform over the candidates."""

    name = "random"

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        return self._rng.randrange(len(workers))


class PowerOfTwoPolicy(PolicyBase):
    """Draw two distinct candidates, keep the lower load (``load1 <= load2`` keeps the first).

    As in SGLang: the polled engine loads are compared when both workers have one, otherwise the
    runtime's in-flight leg counts. Polled loads go stale between polls, which herds traffic;
    this is the baseline that ``load_aware`` fixes."""

    name = "power_of_two"

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        n = len(workers)
        if n == 1:
            return 0
        a, b = self._rng.sample(range(n), 2)
        wa, wb = workers[a], workers[b]
        if wa.polled_load is not None and wb.polled_load is not None:
            la, lb = wa.polled_load, wb.polled_load
        else:
            la, lb = wa.active_requests, wb.active_requests
        return a if la <= lb else b

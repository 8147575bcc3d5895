# SPDX-License-Identifier: Apache-2.0
"""``load_aware``: BanaServe's default policy, routing on load the router itself accounts.

Prefill (and colocated) workers: the load is the prompt tokens the runtime has dispatched and
whose prefill has not finished (``inflight_prefill_tokens``, updated at dispatch, not on a poll),
plus a small per-request cost, divided by the worker's relative speed. A polled engine load only
adds what the router cannot see (tokens from other clients): ``max(0, polled − inflight at poll
time)``, fading linearly to 0 over ``poll_stale_s``. With a global KV store every prefill instance
has the same hit rate, so load is all that matters.

Decode workers: active requests plus ``kv_weight ×`` the KV usage fraction; workers at or over
``overload_queue`` waiting requests or ``overload_kv_frac`` KV usage are excluded while another
worker is under both. When all are over, the least loaded still wins, unless
``shed_when_overloaded`` is set: then :class:`ResourceExhaustedError` (→ 503).

The least-loaded worker wins, ties broken at random. Above ``sample_threshold`` workers only
``sample_size`` random candidates are compared (power-of-d), so a pick is O(1) in fleet size.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidArgumentError, ResourceExhaustedError
from .base import PREFILL_ROLES, PolicyBase, RequestInfo, WorkerLoad, argmin_random_ties


class LoadAwarePolicy(PolicyBase):
    name = "load_aware"

    def __init__(
        self,
        seed: int | None = None,
        *,
        per_request_tokens: float = 32.0,
        poll_stale_s: float = 10.0,
        kv_weight: float = 4.0,
        overload_queue: int = 8,
        overload_kv_frac: float = 0.8,
        shed_when_overloaded: bool = False,
        sample_threshold: int = 16,
        sample_size: int = 4,
    ) -> None:
        super().__init__(seed)
        if sample_size < 1 or sample_threshold < sample_size:
            raise InvalidArgumentError(
                f"need 1 <= sample_size <= sample_threshold, got {sample_size}, {sample_threshold}"
            )
        if poll_stale_s <= 0:
            raise InvalidArgumentError(f"poll_stale_s must be > 0, got {poll_stale_s}")
        self.per_request_tokens = float(per_request_tokens)
        self.poll_stale_s = float(poll_stale_s)
        self.kv_weight = float(kv_weight)
        self.overload_queue = int(overload_queue)
        self.overload_kv_frac = float(overload_kv_frac)
        self.shed_when_overloaded = bool(shed_when_overloaded)
        self.sample_threshold = int(sample_threshold)
        self.sample_size = int(sample_size)

    # -- loads -------------------------------------------------------------------------------
    def prefill_load(self, w: WorkerLoad, now_s: float) -> float:
        """Tokens this prefill worker still has to process, as far as the router knows."""
        load = w.inflight_prefill_tokens + self.per_request_tokens * w.active_requests
        if w.polled_load is not None and w.polled_at_s is not None:
            age = now_s - w.polled_at_s
            if age < self.poll_stale_s:
                unseen = w.polled_load - w.inflight_at_poll
                if unseen > 0:
                    load += unseen * (1.0 - max(0.0, age) / self.poll_stale_s)
        return load / (w.speed if w.speed > 0 else 1.0)

    def decode_load(self, w: WorkerLoad) -> float:
        load = float(w.active_requests)
        if w.kv_capacity_tokens > 0:
            load += self.kv_weight * (w.kv_used_tokens / w.kv_capacity_tokens)
        return load / (w.speed if w.speed > 0 else 1.0)

    def overloaded(self, w: WorkerLoad) -> bool:
        if w.queued_requests >= self.overload_queue:
            return True
        return (
            w.kv_capacity_tokens > 0
            and w.kv_used_tokens >= self.overload_kv_frac * w.kv_capacity_tokens
        )

    # -- selection ---------------------------------------------------------------------------
    def _candidates(self, n: int) -> Sequence[int]:
        if n <= self.sample_threshold:
            return range(n)
        return self._rng.sample(range(n), self.sample_size)

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        idx = self._candidates(len(workers))
        if workers[0].role in PREFILL_ROLES:
            keys = [self.prefill_load(workers[i], now_s) for i in idx]
            return idx[argmin_random_ties(keys, self._rng)]
        under = [i for i in idx if not self.overloaded(workers[i])]
        if not under and len(idx) < len(workers):
            # the sample was all overloaded: look at everyone before giving up
            idx = range(len(workers))
            under = [i for i in idx if not self.overloaded(workers[i])]
        if not under:
            if self.shed_when_overloaded:
                raise ResourceExhaustedError(
                    f"all {len(workers)} {workers[0].role} workers are overloaded "
                    f"(>= {self.overload_queue} queued or >= {self.overload_kv_frac:.0%} KV)"
                )
            under = list(idx)
        keys = [self.decode_load(workers[i]) for i in under]
        return under[argmin_random_ties(keys, self._rng)]

# SPDX-License-Identifier: Apache-2.0
"""BanaServe's starting P:D split from a short online profile.

The profile is what a live deployment sees in its first minute: the request rate, the mean
prompt and output lengths, the prefill time per request and the decode step time as a function
of the batch (measured on the serving engines, or from the simulator's cost model). For every
split ``P + D = n`` it predicts the two tiers' load and picks the split whose busier tier is the
least loaded:

* prefill: ``rate * prefill_s / P`` (compute-bound, 1 = saturated);
* decode: the batch each decode instance settles at is the fixed point of Little's law,
  ``B = (rate / D) * out * step_s(B)`` (each token takes one step); its load is the larger of
  ``step_s(B) / step_budget_s`` (the TBT the SLO allows) and ``B * context / kv_capacity``
  (memory). No fixed point below the batch cap means the tier cannot keep up (load > 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class WorkloadProfile:
    rate: float  # requests per second over the profile window
    prefill_s: float  # mean prefill time of one request on one instance (s)
    out_tokens: float  # mean output tokens
    context_tokens: float  # mean KV tokens a running decode holds (prompt + half the output)
    window_s: float = 60.0


def decode_batch(demand_tok_s: float, step_s: Callable[[int], float], max_batch: int) -> int | None:
    """Smallest batch ``B`` with ``B / step_s(B) >= demand`` (tokens/s), None if none."""
    for b in range(1, max_batch + 1):
        if b / step_s(b) >= demand_tok_s:
            return b
    return None


def choose_prefill_count(
    n: int,
    prof: WorkloadProfile,
    step_s: Callable[[int, int], float],
    step_budget_s: float,
    kv_capacity: int,
    max_batch: int = 256,
) -> tuple[int, str]:
    """(P, reason): the split that minimises the busier tier's predicted load.

    ``step_s(batch, total_context)`` is the decode step time."""
    if n < 2:
        raise InvalidArgumentError(f"need >= 2 instances to split, got {n}")
    if prof.rate <= 0 or step_budget_s <= 0 or kv_capacity <= 0:
        raise InvalidArgumentError("rate, step_budget_s and kv_capacity must be > 0")
    best: tuple[float, int, str] | None = None
    for p in range(1, n):
        d = n - p
        up = prof.rate * prof.prefill_s / p
        demand = prof.rate * max(0.0, prof.out_tokens - 1) / d
        ctx = max(1, int(prof.context_tokens))
        b = decode_batch(demand, lambda x, c=ctx: step_s(x, x * c), max_batch) if demand > 0 else 0
        if b is None:
            ud = 2.0
        elif b == 0:
            ud = 0.0
        else:
            ud = max(step_s(b, b * ctx) / step_budget_s, b * ctx / kv_capacity)
        load = max(up, ud)
        why = f"P={p}: prefill {up:.2f}, decode {ud:.2f} (batch {b})"
        if best is None or load < best[0] - 1e-9:
            best = (load, p, why)
    assert best is not None
    return best[1], (
        f"profile {prof.window_s:.0f} s: {prof.rate:.2f} req/s, prefill "
        f"{prof.prefill_s * 1e3:.0f} ms/req, {prof.out_tokens:.0f} out tokens; "
        f"best {best[2]}"
    )

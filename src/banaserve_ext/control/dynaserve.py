# SPDX-License-Identifier: Apache-2.0
"""DynaServe's global scheduler (APS), as a plain object: split each request at one token
boundary into at most two segments on different instances.

Our reading of the paper (its exact formula was not reachable): segment 1 runs the prefill and
the first ``s`` output tokens on instance A, segment 2 the remaining ``O - s`` tokens on
instance B, with A = the instance with the least predicted prefill backlog and B = the one with
the least predicted decode backlog. ``s`` is found by a bounded binary search that balances the
two instances' predicted busy time after taking the segments:

    f(s) = (backlog_A + T_prefill + s * t_tok_A) - (backlog_B + (O - s) * t_tok_B)

``f`` is increasing in ``s``, so the root is found in ``ceil(log2(O)) <= max_iters`` steps. The
prefill/decode time ratio of the request enters through ``T_prefill`` against ``O * t_tok``.
No split (``s = O``) when A == B, when the predicted gain is below ``min_gain_s``, or when a
segment would be shorter than ``min_segment`` tokens (the KV handover would not pay).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class LoadView:
    idx: int
    prefill_backlog_s: float  # predicted time to drain queued prefill work
    decode_backlog_s: float  # predicted busy time of running decodes
    tok_s: float  # predicted time per output token at the current batch


@dataclass(frozen=True)
class SplitPlan:
    first: int
    second: int | None
    split_after: int  # output tokens made on ``first``; == output tokens when not split


@dataclass
class DynaServeSplitter:
    min_segment: int = 32
    min_gain_s: float = 0.05
    max_iters: int = 12

    def __post_init__(self) -> None:
        if self.min_segment < 1 or self.max_iters < 1:
            raise InvalidArgumentError("min_segment and max_iters must be >= 1")

    def split(self, prefill_s: float, out_tokens: int, views: Sequence[LoadView]) -> SplitPlan:
        if not views:
            raise InvalidArgumentError("no instances to split over")
        a = min(views, key=lambda v: v.prefill_backlog_s + v.decode_backlog_s)
        rest = [v for v in views if v.idx != a.idx]
        if not rest or out_tokens < 2 * self.min_segment:
            return SplitPlan(a.idx, None, out_tokens)
        b = min(rest, key=lambda v: v.decode_backlog_s + v.prefill_backlog_s)

        def f(s: int) -> float:
            end_a = a.prefill_backlog_s + a.decode_backlog_s + prefill_s + s * a.tok_s
            end_b = b.prefill_backlog_s + b.decode_backlog_s + (out_tokens - s) * b.tok_s
            return end_a - end_b

        lo, hi = self.min_segment, out_tokens - self.min_segment
        if f(hi) <= 0:
            return SplitPlan(a.idx, None, out_tokens)  # A finishes first anyway: keep it whole
        if f(lo) >= 0:
            s = lo
        else:
            for _ in range(self.max_iters):
                if hi - lo <= 1:
                    break
                mid = (lo + hi) // 2
                if f(mid) < 0:
                    lo = mid
                else:
                    hi = mid
            s = hi
        whole = a.prefill_backlog_s + a.decode_backlog_s + prefill_s + out_tokens * a.tok_s
        split_end = max(
            a.prefill_backlog_s + a.decode_backlog_s + prefill_s + s * a.tok_s,
            b.prefill_backlog_s + b.decode_backlog_s + (out_tokens - s) * b.tok_s,
        )
        if whole - split_end < self.min_gain_s:
            return SplitPlan(a.idx, None, out_tokens)
        return SplitPlan(a.idx, b.idx, s)


def with_handoff_cost(views: Sequence[LoadView], handoff_s: float) -> list[LoadView]:
    """The views with the hand-off charged to segment 2: every instance but the one
    :meth:`DynaServeSplitter.split` takes as A (least total backlog) starts its segment
    ``handoff_s`` later (the KV move), so the split point and the gain check account for it.
    A and B stay the splitter's choice (the same offset on every candidate for B)."""
    if handoff_s < 0:
        raise InvalidArgumentError(f"hand-off cost must be >= 0, got {handoff_s}")
    if not views or handoff_s == 0:
        return list(views)
    a = min(views, key=lambda v: v.prefill_backlog_s + v.decode_backlog_s)
    return [
        v if v.idx == a.idx else replace(v, prefill_backlog_s=v.prefill_backlog_s + handoff_s)
        for v in views
    ]

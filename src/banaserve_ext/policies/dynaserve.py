# SPDX-License-Identifier: Apache-2.0
"""DynaServe routing for the HTTP router: the simulator's split policy object
(:class:`banaserve_ext.control.DynaServeSplitter`, run unchanged) fed with the router's live
view of its workers.

A plan names two instances and one token boundary ``s``: instance A computes the tokens
``[0, s)`` of the request (its prompt, and when ``s > n`` the first ``s - n`` output tokens),
instance B continues from there (see :mod:`banaserve_ext.router.handoff`). The splitter only
splits after output tokens; a boundary inside the prompt (``s <= n``) comes from an explicit
override (the ``X-Banaserve-Handoff-At`` request header, for operators and tests).

Predictions come from a linear cost model, the same shape the simulator uses: prefill time
``prompt_tokens * prefill_s_per_token``, time per output token
``decode_s_per_token * (1 + batch_slope * running_requests)``, both divided by the worker's
relative ``speed``; a worker's prefill backlog is its in-flight prompt tokens through the
prefill model, its decode backlog its running requests times ``decode_tokens_per_request``
output tokens. The hand-off itself costs ``handoff_fixed_s + tokens * handoff_s_per_token``
(``tokens`` = the prompt plus half the output, the expected boundary), charged to every
candidate for B (:func:`~banaserve_ext.control.dynaserve.with_handoff_cost`), so a split that
the move would eat is not made.

The defaults are the measured ones in ``banaserve_ext/data/costs.json`` (entry ``handoff``,
fitted by ``bench/handoff/bench_handoff.py`` on the tiny CPU model; see docs/handoff-bench.md);
``batch_slope`` and ``decode_tokens_per_request`` are not measured. Refit them on the target
hardware and pass them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..control.costs import HandoffCost, measured_costs
from ..control.dynaserve import DynaServeSplitter, LoadView, with_handoff_cost
from ..errors import InvalidArgumentError
from .base import WorkerLoad

#: used only when the costs file has no ``handoff`` entry
_UNMEASURED = HandoffCost(fixed_s=0.0, per_token_s=0.0)


def _measured() -> HandoffCost:
    return measured_costs().handoff or _UNMEASURED


@dataclass(frozen=True)
class HandoffPlan:
    """``first`` and ``second`` index the candidate list; ``split`` is the token boundary
    (``second is None``: no hand-off, the whole request runs on ``first``)."""

    first: int
    second: int | None
    split: int


@dataclass
class DynaServePlanner:
    splitter: DynaServeSplitter = field(default_factory=DynaServeSplitter)
    prefill_s_per_token: float = field(default_factory=lambda: _measured().prefill_s_per_token)
    decode_s_per_token: float = field(default_factory=lambda: _measured().decode_s_per_token)
    batch_slope: float = 0.05
    decode_tokens_per_request: int = 64
    handoff_fixed_s: float = field(default_factory=lambda: _measured().fixed_s)
    handoff_s_per_token: float = field(default_factory=lambda: _measured().per_token_s)

    def __post_init__(self) -> None:
        if min(self.prefill_s_per_token, self.decode_s_per_token) <= 0:
            raise InvalidArgumentError("DynaServe cost model: per-token times must be > 0")
        if self.batch_slope < 0 or self.decode_tokens_per_request < 0:
            raise InvalidArgumentError("DynaServe cost model: slope and tokens must be >= 0")
        if min(self.handoff_fixed_s, self.handoff_s_per_token) < 0:
            raise InvalidArgumentError("DynaServe cost model: hand-off costs must be >= 0")

    def handoff_s(self, tokens: int) -> float:
        """Predicted hand-off time of a boundary at ``tokens`` tokens."""
        return self.handoff_fixed_s + max(0, tokens) * self.handoff_s_per_token

    def views(self, prompt_tokens: int, out_tokens: int,
              workers: Sequence[WorkerLoad]) -> list[LoadView]:  # fmt: skip
        """What the splitter sees: the workers' loads, B's side charged the hand-off."""
        views = [self.view(i, w) for i, w in enumerate(workers)]
        return with_handoff_cost(views, self.handoff_s(prompt_tokens + out_tokens // 2))

    def view(self, idx: int, w: WorkerLoad) -> LoadView:
        speed = w.speed if w.speed > 0 else 1.0
        running = w.active_requests
        tok_s = self.decode_s_per_token * (1.0 + self.batch_slope * running) / speed
        return LoadView(
            idx=idx,
            prefill_backlog_s=w.inflight_prefill_tokens * self.prefill_s_per_token / speed,
            decode_backlog_s=running * self.decode_tokens_per_request * tok_s,
            tok_s=tok_s,
        )

    def plan(
        self,
        prompt_tokens: int,
        out_tokens: int,
        workers: Sequence[WorkerLoad],
        split_at: int | None = None,
    ) -> HandoffPlan:
        """Where to run a request of ``prompt_tokens`` + ``out_tokens`` tokens. ``split_at``
        forces the boundary (``1 <= split_at < prompt_tokens + out_tokens``); A and B are then
        still the splitter's choice."""
        if prompt_tokens < 1 or out_tokens < 1:
            raise InvalidArgumentError("a request needs >= 1 prompt and >= 1 output token")
        views = self.views(prompt_tokens, out_tokens, workers)
        prefill_s = prompt_tokens * self.prefill_s_per_token
        if split_at is None:
            sp = self.splitter.split(prefill_s, out_tokens, views)
            if sp.second is None:
                return HandoffPlan(sp.first, None, prompt_tokens + out_tokens)
            return HandoffPlan(sp.first, sp.second, prompt_tokens + sp.split_after)
        end = prompt_tokens + out_tokens
        if not 1 <= split_at < end:
            raise InvalidArgumentError(f"hand-off point {split_at} is outside [1, {end})")
        if len(views) < 2:
            raise InvalidArgumentError("a hand-off needs two usable workers")
        # the splitter's instance choice, with the boundary given
        first = min(views, key=lambda v: v.prefill_backlog_s + v.decode_backlog_s)
        second = min(
            (v for v in views if v.idx != first.idx),
            key=lambda v: v.decode_backlog_s + v.prefill_backlog_s,
        )
        return HandoffPlan(first.idx, second.idx, split_at)

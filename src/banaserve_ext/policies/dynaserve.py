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
output tokens. Plain numbers: fit them with ``banaserve bench`` on the target hardware.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..control.dynaserve import DynaServeSplitter, LoadView
from ..errors import InvalidArgumentError
from .base import WorkerLoad


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
    prefill_s_per_token: float = 1e-4
    decode_s_per_token: float = 2e-2
    batch_slope: float = 0.05
    decode_tokens_per_request: int = 64

    def __post_init__(self) -> None:
        if min(self.prefill_s_per_token, self.decode_s_per_token) <= 0:
            raise InvalidArgumentError("DynaServe cost model: per-token times must be > 0")
        if self.batch_slope < 0 or self.decode_tokens_per_request < 0:
            raise InvalidArgumentError("DynaServe cost model: slope and tokens must be >= 0")

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
        views = [self.view(i, w) for i, w in enumerate(workers)]
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

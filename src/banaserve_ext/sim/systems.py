# SPDX-License-Identifier: Apache-2.0
"""Named systems (the controllers and the baselines), built from the plain controller objects
and their simulator-side actuators (:mod:`.actuators`).

=============  ===========================================================================
system         what is simulated
=============  ===========================================================================
vllm           N colocated instances, chunked prefill (2048), load-aware routing
distserve      static P/D, the best P:D ratio found by search, load-aware routing
sglang-pd      P/D at N/2:N/2, SGLang cache-aware routing on prefill, per-instance caches
llumnix        colocated + Llumnix request migration (KV-balance triggered)
banaserve      P/D + global KV store + load-aware routing + BanaServe controller
               (layer migration, attention migration, role flip)
dynaserve      colocated instances, each request split in <= 2 segments (APS) and
               SLO-aware local batch formation
semi-pd        every GPU group runs a prefill and a decode engine with an SM split,
               Algorithm 1 repartitions it every window
=============  ===========================================================================
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..control import (
    BanaServeConfig,
    BanaServeController,
    DynaServeSplitter,
    LlumnixMigrator,
    WorkloadProfile,
    choose_prefill_count,
    measured_costs,
)
from ..errors import InvalidArgumentError
from ..policies import make_policy
from .actuators import (
    BanaServeActuator,
    DynaServePlacer,
    LlumnixActuator,
    SemiPDActuator,
)
from .cluster import Simulator
from .cost import CostModel, load_fit_cost_model
from .engine import ClusterConfig
from .metrics import Slo, slo_attainment, summarize
from .models import ModelSpec, get_gpu, get_model, kv_capacity_tokens
from .traces import TraceRequest, default_traces_dir, load_lengths_poisson, load_trace, scale_rate

SYSTEMS = ("vllm", "distserve", "sglang-pd", "llumnix", "banaserve", "dynaserve", "semi-pd")


# ------------------------------------------------------------------------------------------------
# building a system
# ------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: ModelSpec
    gpu_name: str
    tp: int
    instances: int
    slo: Slo
    cost: CostModel
    has_hashes: bool
    seed: int = 0
    #: prefix-cache tokens per instance when the trace has hashes (default: 2x the KV capacity)
    cache_tokens: int | None = None
    pd_prefill: int | None = None  # P count for PD systems (default N/2)
    #: (mean input, mean output) of the workload, for BanaServe's initial P:D split
    workload_hint: tuple[float, float] | None = None
    #: colocated engines' token budget per iteration (vLLM's chunk size)
    chunk: int = 2048
    #: BanaServe: the short online profile its starting P:D split comes from
    profile: WorkloadProfile | None = None
    #: BanaServe: no action before this time (s)
    warmup_s: float = 60.0


def build(system: str, s: Setup) -> Simulator:
    if system not in SYSTEMS:
        raise InvalidArgumentError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS)}")
    gpu = get_gpu(s.gpu_name)
    n = s.instances
    if n < 2:
        raise InvalidArgumentError(f"--instances must be >= 2, got {n}")
    cap = kv_capacity_tokens(s.model, gpu, s.tp)
    cache_tokens = s.cache_tokens if s.cache_tokens is not None else 2 * cap
    base = ClusterConfig(
        s.model,
        gpu,
        s.tp,
        max_num_seqs=256,
        max_batched_tokens=s.chunk,
        cache_mode="local" if s.has_hashes else "none",
        cache_tokens_per_instance=cache_tokens,
    )
    n_p = s.pd_prefill if s.pd_prefill is not None else max(1, n // 2)
    n_p = min(max(1, n_p), n - 1)
    load_aware = make_policy("load_aware", seed=s.seed)
    tick = 1.0
    controller: Any = None
    splitter: Any = None
    decode_policy: Any = None
    policy: Any = load_aware
    if system == "vllm":
        cfg = replace(base, n_colocated=n)
    elif system == "distserve":
        cfg = replace(base, n_prefill=n_p, n_decode=n - n_p)
    elif system == "sglang-pd":
        cfg = replace(base, n_prefill=n_p, n_decode=n - n_p)
        policy = make_policy("cache_aware", seed=s.seed)
        decode_policy = make_policy("load_aware", seed=s.seed + 1)
    elif system == "llumnix":
        cfg = replace(base, n_colocated=n)
        controller = LlumnixActuator(LlumnixMigrator())
    elif system == "banaserve":
        why = f"P={n_p} given"
        if s.pd_prefill is None and s.profile is not None:
            n_p, why = choose_prefill_count(
                n,
                s.profile,
                lambda b, ctx: s.cost.decode_step_s(b, ctx),
                s.slo.step_budget_s,
                cap,
                base.max_num_seqs,
            )
        elif s.pd_prefill is None and s.workload_hint is not None:
            n_p = initial_prefill_instances(s.cost, n, *s.workload_hint)
            why = f"P={n_p} from mean lengths (no profile)"
        cfg = replace(
            base, n_prefill=n_p, n_decode=n - n_p, cache_mode="global" if s.has_hashes else "none"
        )
        decode_policy = make_policy("load_aware", seed=s.seed + 1)
        bw = (cfg.link_gbps or gpu.nic_gbps * s.tp) * 1e9
        costs = measured_costs()
        controller = BanaServeActuator(
            BanaServeController(
                s.model.layers,
                s.model.weight_bytes_per_layer,
                s.model.kv_bytes_per_token_layer,
                BanaServeConfig(
                    bandwidth_Bps=bw,
                    persist=5,
                    cooldown_s=30.0,
                    warmup_s=s.warmup_s,
                    budget_s=5.0,
                    layer_link=costs.layer_link,
                    attention_link=costs.attention_link,
                    flip_queue_s=0.25 * s.slo.ttft_s,
                    flip_persist=10,
                    flip_cost_s=costs.flip_cost_s,
                    step_budget_s=s.slo.step_budget_s,
                ),
            ),
            s.slo,
        )
        controller.events.append((0.0, f"start P:D {n_p}:{n - n_p} | {why}"))
    elif system == "dynaserve":
        handoff = measured_costs().handoff
        cfg = replace(base, n_colocated=n, tbt_budget_s=s.slo.step_budget_s, handoff_cost=handoff)
        splitter = DynaServePlacer(DynaServeSplitter(), seed=s.seed, handoff=handoff)
    else:  # semi-pd
        cfg = replace(base, n_split=n, split_prefill_share=0.5)
        controller = SemiPDActuator(
            s.slo.ttft_s, s.slo.step_budget_s, tail_tbt=s.slo.mode == "p99-tbt"
        )
    return Simulator(
        cfg,
        s.cost,
        policy=policy,
        decode_policy=decode_policy,
        controller=controller,
        splitter=splitter,
        tick_s=tick,
    )


def initial_prefill_instances(
    cost: CostModel, n: int, mean_in: float, mean_out: float, batch: int = 64
) -> int:
    """P instances in proportion to the predicted prefill and decode GPU time per request
    (decode at a typical batch); the controller corrects it online."""
    pre = cost.prefill_s(int(mean_in))
    dec = mean_out * cost.decode_step_s(batch, int(batch * (mean_in + mean_out / 2))) / batch
    return min(n - 1, max(1, round(n * pre / (pre + dec))))


def profile_from_trace(
    trace: Sequence[TraceRequest], cost: CostModel, window_s: float = 60.0
) -> WorkloadProfile:
    """The short online profile: what the first ``window_s`` of arrivals show (rate, lengths,
    the prefill time per request on this cost model). Only requests that arrived in the window
    are looked at, as a live system would."""
    if not trace:
        raise InvalidArgumentError("empty trace: nothing to profile")
    t0 = trace[0].arrival_s
    seen = [r for r in trace if r.arrival_s - t0 <= window_s]
    if len(seen) < 2:
        seen = list(trace[:2]) if len(trace) > 1 else list(trace)
    span = max(1e-9, seen[-1].arrival_s - t0) if len(seen) > 1 else window_s
    rate = (len(seen) - 1) / span if len(seen) > 1 else 1.0 / window_s
    pre = float(
        np.mean(
            [cost.prefill_s(min(r.input_len, 16384)) * max(1, r.input_len / 16384) for r in seen]
        )
    )
    out = float(np.mean([r.output_len for r in seen]))
    ctx = float(np.mean([r.input_len + r.output_len / 2 for r in seen]))
    return WorkloadProfile(rate, pre, out, ctx, window_s)


def simulate(
    system: str,
    s: Setup,
    trace: Sequence[TraceRequest],
    progress: Callable[[float], None] | None = None,
    summary: bool = True,
) -> tuple[dict, Simulator]:
    """Run one system; ``summary=False`` skips the latency summary (the caller computes its
    own) and returns an empty dict."""
    if system == "distserve" and s.pd_prefill is None:
        best = None
        for n_p in range(1, s.instances):
            sim = build(system, replace(s, pd_prefill=n_p))
            reqs = sim.run(trace)
            att = slo_attainment(reqs, s.slo)
            key = (att, -float(np.mean([r.t_done - r.arrival for r in reqs])))
            if best is None or key > best[0]:
                best = (key, n_p, reqs, sim)
        assert best is not None
        res = summarize(best[2], s.slo)
        res["best_prefill_instances"] = float(best[1])
        return res, best[3]
    if system == "banaserve" and s.profile is None and s.pd_prefill is None and trace:
        s = replace(s, profile=profile_from_trace(trace, s.cost))
    if s.workload_hint is None and trace:
        s = replace(
            s,
            workload_hint=(
                float(np.mean([r.input_len for r in trace])),
                float(np.mean([r.output_len for r in trace])),
            ),
        )
    sim = build(system, s)
    sim.progress = progress
    reqs = sim.run(trace)
    if not summary:
        return {}, sim
    res = summarize(reqs, s.slo)
    if isinstance(sim.controller, BanaServeActuator):
        res["control_actions"] = float(len(sim.controller.events))
    if isinstance(sim.splitter, DynaServePlacer):
        res["split_requests"] = float(sim.splitter.splits)
    if isinstance(sim.controller, LlumnixActuator):
        res["migrated_requests"] = float(sim.controller.migrated)
    return res, sim


def default_slo(model: ModelSpec) -> Slo:
    """DistServe/semi-PD-style SLOs: 8B-class 0.4 s / 0.1 s... scaled for 70B."""
    if model.layers >= 80:
        return Slo(ttft_s=2.0, tpot_s=0.15)
    return Slo(ttft_s=1.0, tpot_s=0.1)


def make_cost(model: ModelSpec, gpu_name: str, tp: int) -> CostModel:
    return load_fit_cost_model(model, get_gpu(gpu_name).table_name, tp)


def load_workload(
    name: str, limit: int | None, rate: float | None, seed: int = 0
) -> list[TraceRequest]:
    if name == "sharegpt":
        path = (
            default_traces_dir()
            / "sharegpt_lengths"
            / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
        )
        return load_lengths_poisson(path, rate or 4.0, limit or 2000, seed)
    trace = load_trace(name, limit)
    if rate is not None and len(trace) > 1:
        span = trace[-1].arrival_s - trace[0].arrival_s
        cur = (len(trace) - 1) / span if span > 0 else rate
        trace = scale_rate(trace, rate / cur)
    return trace


def run_system(args: argparse.Namespace, progress: Callable[[float], None] | None = None) -> dict:
    model = get_model(args.model)
    cost = make_cost(model, args.gpu, args.tp)
    slo = default_slo(model)
    if args.ttft_slo or args.tpot_slo:
        slo = Slo(args.ttft_slo or slo.ttft_s, args.tpot_slo or slo.tpot_s)
    trace = load_workload(args.trace, args.limit, args.rate)
    setup = Setup(
        model,
        args.gpu,
        args.tp,
        args.instances,
        slo,
        cost,
        has_hashes=any(r.hash_ids for r in trace[:100]),
    )
    t0 = time.monotonic()
    res, _ = simulate(args.system, setup, trace, progress)
    res["wall_s"] = time.monotonic() - t0
    return res


__all__ = [
    "SYSTEMS",
    "Setup",
    "build",
    "default_slo",
    "load_workload",
    "make_cost",
    "run_system",
    "simulate",
]

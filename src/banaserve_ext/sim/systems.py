# SPDX-License-Identifier: Apache-2.0
"""Named systems (the controllers and the baselines) and the simulator-side actuators that
carry out the plain controller objects' decisions.

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
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..control import (
    BanaServeConfig,
    BanaServeController,
    DynaServeSplitter,
    FlipRole,
    HandoffCost,
    InstanceView,
    LlumnixMigrator,
    LoadView,
    MigrateAttention,
    MigrateLayers,
    Revert,
    SemiPDController,
    WorkloadProfile,
    choose_prefill_count,
    measured_costs,
    with_handoff_cost,
)
from ..errors import InvalidArgumentError
from ..policies import make_policy
from .cache import PrefixCache
from .cluster import Simulator
from .cost import CostModel, load_fit_cost_model
from .engine import ClusterConfig, Instance, SimRequest
from .metrics import Slo, slo_attainment, summarize, tbt_gaps
from .models import ModelSpec, get_gpu, get_model, kv_capacity_tokens
from .traces import TraceRequest, default_traces_dir, load_lengths_poisson, load_trace, scale_rate

SYSTEMS = ("vllm", "distserve", "sglang-pd", "llumnix", "banaserve", "dynaserve", "semi-pd")


# ------------------------------------------------------------------------------------------------
# actuators
# ------------------------------------------------------------------------------------------------
def load_utils(sim: Simulator, busy: Sequence[float], slo: Slo) -> list[float]:
    """Utilisation as BanaServe balances it: prefill (compute-bound) = busy share plus the
    queued prefill work relative to the TTFT SLO; decode (memory-bound, busy whenever it has a
    batch) = the largest of KV use, batch occupancy and step time relative to the TPOT SLO."""
    out = []
    for inst, b in zip(sim.instances, busy, strict=True):
        if inst.kind == "decode":
            step = inst.iteration_s((), inst.n_dec, inst.dec_ctx) if inst.n_dec else 0.0
            u = max(inst.pool.frac, inst.n_dec / inst.max_num_seqs, step / slo.step_budget_s)
            # requests waiting for decode memory are load the running batch cannot take
            u *= 1.0 + len(inst.pending) / max(1, inst.n_dec)
        else:
            q = inst.queued_prefill_tokens()
            backlog = inst.cost.prefill_s(q) * inst._scale() if q else 0.0
            u = b + backlog / slo.ttft_s
        out.append(min(4.0, u))
    return out


def _views(
    sim: Simulator, utils: Sequence[float], preempted: Sequence[int] | None = None
) -> list[InstanceView]:
    """What a live runtime would report per instance (see :mod:`banaserve_ext.control`)."""
    out = []
    L = sim.model.layers
    now = sim.now
    for i, (inst, u) in enumerate(zip(sim.instances, utils, strict=True)):
        attn = 0.0
        step = inst.iteration_s((), inst.n_dec, inst.dec_ctx) if inst.n_dec else 0.0
        if inst.kind == "decode" and inst.n_dec:
            full = inst.cost.decode_step_s(inst.n_dec, inst.dec_ctx)
            bare = inst.cost.decode_step_s(inst.n_dec, 0)
            attn = max(0.0, (full - bare) / full) if full > 0 else 0.0
        if inst.kind == "decode":
            qlen = len(inst.pending)
            # how long the oldest request has waited for decode memory (capped: a preempted
            # request's first token is long past)
            qdel = min(10.0, now - inst.pending[0].t_first) if inst.pending else 0.0
        else:
            qlen = len(inst.waiting)
            q = inst.queued_prefill_tokens()
            qdel = inst.cost.prefill_s(q) * inst._scale() if q else 0.0
        out.append(
            InstanceView(
                inst.idx,
                inst.kind,
                u,
                inst.pool.frac,
                inst.pool.used,
                int(round(inst.layer_frac * L)),
                attn,
                inst.accepting,
                queue_len=qlen,
                queue_delay_s=max(0.0, qdel),
                running=inst.n_dec,
                step_s=step,
                preempted=preempted[i] if preempted else 0,
            )
        )
    return out


class BanaServeActuator:
    """Applies :class:`BanaServeController` decisions inside the simulator."""

    def __init__(
        self, ctrl: BanaServeController, slo: Slo, hop_s: float = 0.0002, ema_alpha: float = 0.2
    ) -> None:
        self.ctrl = ctrl
        self.slo = slo
        self.ema_alpha = ema_alpha
        self._ema: list[float] | None = None
        self.hop_s = hop_s
        self.links: list[tuple[int, int, str, float]] = []  # (src, dst, kind, share)
        self.draining: dict[int, str] = {}
        self.switching: set[int] = set()
        self.events: list[tuple[float, str]] = []
        self._preempt_mark: list[int] = []

    def on_tick(self, sim: Simulator, now: float, utils: list[float]) -> None:
        insts = sim.instances
        for inst in insts:
            inst.assist = 0.0
        for src, dst, _kind, share in self.links:
            insts[dst].assist = min(0.8, insts[dst].assist + utils[src] * share)
        for idx, role in list(self.draining.items()):
            inst = insts[idx]
            if not (
                inst.waiting
                or inst.prefilling
                or inst.pending
                or inst.n_dec
                or inst.busy
                or inst.pool.used
            ):
                del self.draining[idx]
                self.switching.add(idx)
                cost = self.ctrl._flip_cost
                self._event(sim, now, f"drained {idx}; role switch to {role} takes {cost:.1f} s")
                sim.call_at(now + cost, self._switched(sim, idx, role))
        if len(self._preempt_mark) != len(insts):
            self._preempt_mark = [i.preemptions for i in insts]
        pre = [i.preemptions - m for i, m in zip(insts, self._preempt_mark, strict=True)]
        self._preempt_mark = [i.preemptions for i in insts]
        raw = load_utils(sim, utils, self.slo)
        if self._ema is None or len(self._ema) != len(raw):
            self._ema = raw
        else:
            a = self.ema_alpha
            self._ema = [a * x + (1 - a) * e for x, e in zip(raw, self._ema, strict=True)]
        lu = self._ema
        for src, dst, _kind, _share in self.links:
            insts[src].remote_slow = min(3.0, 1.0 / max(0.2, 1.0 - min(lu[dst], 0.8)))
        views = _views(sim, lu, pre)
        for v in views:
            if v.idx in self.switching:
                v.accepting = False
        for act in self.ctrl.plan(views, now):
            if isinstance(act, FlipRole):
                insts[act.idx].accepting = False
                self.draining[act.idx] = act.new_role
                self._event(sim, now, f"drain {act.idx} for {act.new_role} | {act.reason}")
            elif isinstance(act, MigrateLayers):
                sim.call_at(now + act.latency_s, self._layers_done(sim, act))
                self._event(sim, now, f"layers {act.layers} {act.src}->{act.dst} | {act.reason}")
            elif isinstance(act, MigrateAttention):
                sim.call_at(now + act.latency_s, self._attn_done(sim, act))
                self._event(
                    sim, now, f"attention {act.fraction:.2f} {act.src}->{act.dst} | {act.reason}"
                )
            elif isinstance(act, Revert):
                self._revert(sim, act, now)

    def _switched(self, sim: Simulator, idx: int, role: str) -> Callable[[float], None]:
        def apply(now: float) -> None:
            inst = sim.instances[idx]
            inst.kind = role
            inst.load.role = role
            inst.max_tokens = (
                sim.cfg.prefill_max_tokens if role == "prefill" else sim.cfg.max_batched_tokens
            )
            if role == "prefill" and inst.cache is None and sim.cfg.cache_mode != "none":
                inst.cache = PrefixCache(sim.cfg.cache_tokens_per_instance // 512)
            inst.accepting = True
            self.switching.discard(idx)
            self._event(sim, now, f"flip {idx}->{role} done")

        return apply

    def _event(self, sim: Simulator, now: float, what: str) -> None:
        self.events.append((now, what))
        sim.log("control", what)

    def _layers_done(self, sim: Simulator, act: MigrateLayers) -> Callable[[float], None]:
        def apply(now: float) -> None:
            L = sim.model.layers
            src, dst = sim.instances[act.src], sim.instances[act.dst]
            share = act.layers / L
            src.layer_frac = max(0.1, src.layer_frac - share)
            src.pipe_frac = 1.0 - src.layer_frac
            src.step_extra_s += self.hop_s
            held = max(1, int(round(src.layer_frac * L)))
            src.pool.capacity = max(src.pool.capacity, _capacity(sim, held, 0))
            wbytes = act.layers * sim.model.weight_bytes_per_layer
            per_tok = sim.model.kv_bytes_per_token
            dst.pool.capacity = max(dst.pool.used, dst.pool.capacity - wbytes // per_tok)
            self.links.append((act.src, act.dst, "layers", share))
            src.kick(now)

        return apply

    def _attn_done(self, sim: Simulator, act: MigrateAttention) -> Callable[[float], None]:
        def apply(now: float) -> None:
            src, dst = sim.instances[act.src], sim.instances[act.dst]
            src.attn_frac *= 1.0 - act.fraction
            src.step_extra_s += self.hop_s * 2
            moved = int(src.pool.used * act.fraction)
            src.pool.capacity += moved
            dst.pool.capacity = max(dst.pool.used, dst.pool.capacity - moved)
            full = src.cost.decode_step_s(max(1, src.n_dec), src.dec_ctx)
            bare = src.cost.decode_step_s(max(1, src.n_dec), 0)
            share = act.fraction * max(0.0, (full - bare) / full) if full > 0 else 0.0
            self.links.append((act.src, act.dst, "attention", share))
            src.kick(now)

        return apply

    def _revert(self, sim: Simulator, act: Revert, now: float) -> None:
        keep = []
        for link in self.links:
            if link[0] == act.src and link[1] == act.dst:
                src, dst = sim.instances[act.src], sim.instances[act.dst]
                if link[2] == "layers":
                    src.layer_frac = min(1.0, src.layer_frac + link[3])
                    src.pipe_frac = 1.0 - src.layer_frac
                    src.step_extra_s = max(0.0, src.step_extra_s - self.hop_s)
                else:
                    src.attn_frac = 1.0
                    src.remote_slow = 1.0
                    src.step_extra_s = max(0.0, src.step_extra_s - 2 * self.hop_s)
                cap = _capacity(sim, None, 0)
                src.pool.capacity = max(src.pool.used, cap)
                dst.pool.capacity = max(dst.pool.used, cap)
                self._event(sim, now, f"revert {link[2]} {act.src}->{act.dst} | {act.reason}")
            else:
                keep.append(link)
        self.links = keep


def _capacity(sim: Simulator, held: int | None, extra: int) -> int:
    if sim.cfg.kv_capacity_tokens is not None:
        return sim.cfg.kv_capacity_tokens
    return kv_capacity_tokens(sim.model, sim.cfg.gpu, sim.cfg.tp, held, extra)


class SemiPDActuator:
    """Runs Algorithm 1 per semi-PD instance every ``window_s`` of simulated time."""

    def __init__(
        self,
        ttft_slo_s: float,
        tpot_slo_s: float,
        window_s: float = 10.0,
        percentile: float = 90.0,
        start_share: float = 50.0,
        tail_tbt: bool = False,
    ) -> None:
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        #: judge decode by each request's P99 TBT (a TBT SLO) instead of its mean TPOT
        self.tail_tbt = tail_tbt
        self.window_s = window_s
        self.percentile = percentile
        self.start_share = start_share
        self.ctrls: dict[int, SemiPDController] = {}
        self.shares: dict[int, float] = {}
        self._next = window_s
        self._seen = 0
        self.events: list[tuple[float, str]] = []

    def on_tick(self, sim: Simulator, now: float, utils: list[float]) -> None:
        if now < self._next:
            return
        self._next = now + self.window_s
        new = sim.finished[self._seen :]
        self._seen = len(sim.finished)
        by_inst: dict[int, list[SimRequest]] = {}
        for r in new:
            if r.pinst is not None:
                by_inst.setdefault(r.pinst.idx, []).append(r)
        for inst in sim.instances:
            if inst.partner is None or inst.kind != "prefill":
                continue
            ctrl = self.ctrls.setdefault(
                inst.idx, SemiPDController(self.ttft_slo_s, self.tpot_slo_s)
            )
            x = self.shares.get(inst.idx, self.start_share)
            reqs = by_inst.get(inst.idx, [])
            ttft = tpot = None
            if reqs:
                t = np.array([r.t_first - r.arrival for r in reqs])
                ttft = float(np.percentile(t, self.percentile))
                if self.tail_tbt:
                    tp = [float(np.percentile(g, 99)) for g in map(tbt_gaps, reqs) if len(g)]
                else:
                    tp = [
                        (r.t_done - r.t_first) / (r.output_len - 1)
                        for r in reqs
                        if r.output_len > 1
                    ]
                if tp:
                    tpot = float(np.percentile(tp, self.percentile))
            nx = ctrl.update(x, ttft, tpot, now)
            if nx != x:
                self.shares[inst.idx] = nx
                sim.set_split(inst, nx / 100.0)
                inst.kick(now)
                if inst.partner is not None:
                    inst.partner.kick(now)
                why = (
                    f"window P{self.percentile:.0f} TTFT "
                    f"{ttft if ttft is not None else float('nan'):.2f} s (SLO "
                    f"{self.ttft_slo_s:.2f}), decode "
                    f"{tpot * 1e3 if tpot is not None else float('nan'):.0f} ms (SLO "
                    f"{self.tpot_slo_s * 1e3:.0f})"
                )
                self.events.append((now, f"split {inst.idx} x={x:.0f}->{nx:.0f} | {why}"))
                sim.log("control", f"semi-pd {inst.idx} x={nx:.0f}")


class LlumnixActuator:
    def __init__(self, migrator: LlumnixMigrator) -> None:
        self.migrator = migrator
        self.migrated = 0
        self.events: list[tuple[float, str]] = []

    def on_tick(self, sim: Simulator, now: float, utils: list[float]) -> None:
        for m in self.migrator.plan(_views(sim, utils)):
            self.events.append((now, f"migrate {m.requests} {m.src}->{m.dst} | {m.reason}"))
            src, dst = sim.instances[m.src], sim.instances[m.dst]
            src.at_boundary(now, self._move(sim, src, dst, m.requests))

    def _move(
        self, sim: Simulator, src: Instance, dst: Instance, n: int
    ) -> Callable[[float], None]:
        def op(now: float) -> None:
            live = sorted(
                (
                    e
                    for e in src.heap
                    if e[2].alive and e[2].dinst is src and e[2].finish_step == e[0]
                ),
                key=lambda e: -e[0],
            )
            seen: set[int] = set()
            for _, _, r in live:
                if len(seen) >= n:
                    break
                # a request that came back may have two current entries: move it once
                if r.rid in seen or not r.alive or r.dinst is not src:
                    continue
                seen.add(r.rid)
                if r.finish_step - src.step_count < 8:
                    continue
                src.remove_decode(r)
                if not r.seg2:
                    sim.policy.on_complete(r.info, src.load, now)
                else:
                    src.load.active_requests = max(0, src.load.active_requests - 1)
                r.seg2 = True
                r.migrations += 1
                dst.load.active_requests += 1
                # live migration: copied while it keeps running; only the last stage is exposed
                sim._transfer(src, dst, r, now, r.input_len + r.generated, 1e9)
                self.migrated += 1

        return op


class DynaServePlacer:
    """Places requests with :class:`DynaServeSplitter` (the global scheduler)."""

    def __init__(
        self,
        splitter: DynaServeSplitter,
        predictor_sigma: float = 50.0,
        seed: int = 0,
        handoff: HandoffCost | None = None,
    ) -> None:
        self.splitter = splitter
        self.sigma = predictor_sigma
        self.rng = random.Random(seed)
        self.splits = 0
        #: the measured hand-off cost, charged to B's side of the split (None: free)
        self.handoff = handoff

    def place(self, sim: Simulator, cands: list[Instance], r: SimRequest, now: float) -> Instance:
        views = []
        for inst in cands:
            scale = inst._scale()
            pre = inst.queued_prefill_tokens()
            pb = inst.cost.prefill_s(pre) * scale if pre else 0.0
            step = inst.cost.decode_step_s(inst.n_dec + 1, inst.dec_ctx + r.input_len) * scale
            db = inst.decode_remaining_tokens() * step / max(1, inst.n_dec)
            views.append(LoadView(inst.idx, pb, db, step))
        pred = max(1, int(round(r.output_len + self.rng.gauss(0.0, self.sigma))))
        pf = sim.cost.prefill_s(r.input_len)
        if self.handoff is not None:
            views = with_handoff_cost(views, self.handoff.seconds(r.input_len + pred // 2))
        plan = self.splitter.split(pf, pred, views)
        first = sim.instances[plan.first]
        if plan.second is not None and plan.split_after < r.output_len:
            r.handover_to = sim.instances[plan.second]
            r.handover_after = plan.split_after
            self.splits += 1
        sim.policy.on_dispatch(r.info, first.load, now)
        return first


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

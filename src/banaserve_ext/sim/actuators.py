# SPDX-License-Identifier: Apache-2.0
"""The simulator-side actuators: they read a :class:`~.cluster.Simulator` into the plain
controller objects' views and carry out their decisions (BanaServe's migrations and flips,
semi-PD's SM repartition, Llumnix's request migration, DynaServe's split placement). The same
controller objects run live (:mod:`banaserve_ext.live`); :mod:`.systems` wires them into named
systems."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from ..control import (
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
    with_handoff_cost,
)
from .cache import PrefixCache
from .cluster import Simulator
from .engine import Instance, SimRequest
from .metrics import Slo, tbt_gaps
from .models import kv_capacity_tokens


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

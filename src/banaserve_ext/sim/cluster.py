# SPDX-License-Identifier: Apache-2.0
"""The cluster around the instances of :mod:`.engine`: building it from a
:class:`~.engine.ClusterConfig`, the event loop, routing, prefix-cache lookups, P->D KV transfer
and each request's life from arrival to its last token."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from .cache import PrefixCache
from .cost import CostModel
from .engine import (
    _EV_ARRIVAL,
    _EV_CALL,
    _EV_READY,
    _EV_STEP,
    _EV_TICK,
    _EV_TRANSFER,
    ClusterConfig,
    Instance,
    KVPool,
    SimRequest,
)
from .traces import MOONCAKE_BLOCK_TOKENS, TraceRequest


class Simulator:
    """Replays requests through a cluster under a routing policy and optional controller."""

    def __init__(
        self,
        cfg: ClusterConfig,
        cost: CostModel,
        *,
        policy: Any,
        decode_policy: Any | None = None,
        controller: Any | None = None,
        splitter: Any | None = None,
        tick_s: float = 1.0,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.cost = cost
        self.model = cfg.model
        self.policy = policy
        self.decode_policy = decode_policy or policy
        self.controller = controller
        self.splitter = splitter
        self.tick_s = tick_s
        self.progress = progress
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.instances: list[Instance] = []
        self.events_log: list[tuple[float, str, str]] = []
        self.finished: list[SimRequest] = []
        self.util_trace: list[tuple[float, list[float]]] = []
        self._busy_mark: list[float] = []
        self._build()

    # -- construction --------------------------------------------------------------------------
    def _capacity(self, layers_held: int | None = None) -> int:
        from .models import kv_capacity_tokens

        if self.cfg.kv_capacity_tokens is not None:
            return self.cfg.kv_capacity_tokens
        return kv_capacity_tokens(self.model, self.cfg.gpu, self.cfg.tp, layers_held)

    def _new(self, kind: str, pool: KVPool) -> Instance:
        cfg = self.cfg
        max_tokens = cfg.prefill_max_tokens if kind == "prefill" else cfg.max_batched_tokens
        inst = Instance(
            self, len(self.instances), kind, pool, self.cost, cfg.max_num_seqs, max_tokens
        )
        self.instances.append(inst)
        return inst

    def _build(self) -> None:
        cfg = self.cfg
        cap = self._capacity()
        for _ in range(cfg.n_colocated):
            self._new("colocated", KVPool(cap))
        for _ in range(cfg.n_prefill):
            self._new("prefill", KVPool(cap))
        for _ in range(cfg.n_decode):
            self._new("decode", KVPool(cap))
        for _ in range(cfg.n_split):
            pool = KVPool(cap)
            p = self._new("prefill", pool)
            d = self._new("decode", pool)
            p.partner, d.partner = d, p
            p.max_tokens = cfg.max_batched_tokens
            self.set_split(p, cfg.split_prefill_share)
        blocks = cfg.cache_tokens_per_instance // MOONCAKE_BLOCK_TOKENS
        if cfg.cache_mode != "none":
            for inst in self.instances:
                if inst.kind != "decode":
                    inst.cache = PrefixCache(blocks)
        n_front = sum(1 for i in self.instances if i.kind != "decode")
        self.global_store = PrefixCache(blocks * n_front) if cfg.cache_mode == "global" else None
        self._busy_mark = [0.0] * len(self.instances)
        gbps = cfg.link_gbps if cfg.link_gbps is not None else cfg.gpu.nic_gbps * cfg.tp
        self.link_Bps = gbps * 1e9

    def set_split(self, prefill_half: Instance, share: float) -> None:
        """semi-PD: give the prefill half ``share`` of the SMs and the decode half the rest.

        Prefill is compute-bound: its time scales as 1/x (semi-PD's ``l_x = (100/x) l_100``).
        Decode is mostly memory-bound: its time follows semi-PD's own fitted shape
        ``TPOT_y = a2/y + b2`` (a2 = 0.6284, b2 = 0.3818 on Llama3-8B/ShareGPT), normalised to
        1 at y = 1, so half the SMs cost a decode step 1.62x rather than 2x.
        """
        share = min(0.95, max(0.05, share))
        prefill_half.time_scale = 1.0 / share
        if prefill_half.partner is not None:
            y = 1.0 - share
            prefill_half.partner.time_scale = (0.6284 / y + 0.3818) / (0.6284 + 0.3818)
        prefill_half.load.extra["sm_share"] = share

    # -- events --------------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, kind, self._seq, payload))

    def call_at(self, t: float, fn: Callable[[float], None]) -> None:
        self.push(t, _EV_CALL, fn)

    def log(self, what: str, detail: str) -> None:
        self.events_log.append((self.now, what, detail))

    @property
    def front(self) -> list[Instance]:
        return [i for i in self.instances if i.kind != "decode" and i.accepting]

    @property
    def decoders(self) -> list[Instance]:
        return [i for i in self.instances if i.kind == "decode" and i.accepting]

    def run(self, trace: Sequence[TraceRequest]) -> list[SimRequest]:
        reqs = [SimRequest(tr) for tr in trace]
        for r in reqs:
            self.push(r.arrival, _EV_ARRIVAL, r)
        self.total = len(reqs)
        if self.controller is not None or self.tick_s > 0:
            self.push(self.tick_s, _EV_TICK, None)
        next_progress = 0.0
        events = self._events
        pop = heapq.heappop
        while events:
            t, kind, _, payload = pop(events)
            self.now = t
            if kind == _EV_STEP:
                payload[0].on_step_end(t, payload[1])
            elif kind == _EV_ARRIVAL:
                self._route(payload, t)
            elif kind == _EV_TRANSFER:
                inst, r = payload
                inst.transfers_active = max(0, inst.transfers_active - 1)
                self._deliver(r, t)
            elif kind == _EV_READY:
                payload.kick(t)
            elif kind == _EV_CALL:
                payload(t)
            elif kind == _EV_TICK:
                self._tick(t)
                stuck = not events and not any(i.busy for i in self.instances)
                if len(self.finished) < self.total and not stuck:
                    self.push(t + self.tick_s, _EV_TICK, None)
            if self.progress is not None and len(self.finished) >= next_progress:
                self.progress(len(self.finished) / max(1, self.total))
                next_progress = len(self.finished) + max(1, self.total // 100)
        unfinished = [r for r in reqs if r.t_done < 0]
        if unfinished:
            raise InvalidArgumentError(
                f"{len(unfinished)} requests never finished (first: request {unfinished[0].rid}, "
                f"input {unfinished[0].input_len} tokens): does the KV capacity hold one request? "
                f"({self.instances[0].pool.capacity} tokens per instance)"
            )
        return reqs

    def _tick(self, now: float) -> None:
        utils = []
        for i, inst in enumerate(self.instances):
            busy = inst.busy_s
            if inst.busy:  # count the running step pro rata
                busy += now - inst.step_start
            utils.append(min(1.0, (busy - self._busy_mark[i]) / self.tick_s))
            self._busy_mark[i] = busy
        self.util_trace.append((now, utils))
        if self.controller is not None:
            self.controller.on_tick(self, now, utils)

    # -- request lifecycle ---------------------------------------------------------------------
    def _route(self, r: SimRequest, now: float) -> None:
        cands = self.front
        loads = [i.load for i in cands]
        for inst in cands:
            inst.load.queued_requests = len(inst.waiting)
            inst.load.kv_used_tokens = inst.pool.used
            inst.load.extra["queue_s"] = None
        if self.splitter is not None:
            inst = self.splitter.place(self, cands, r, now)
        else:
            inst = cands[self.policy.select(r.info, loads, now)]
        self.policy.on_dispatch(r.info, inst.load, now)
        r.pinst = inst
        self._prefix_lookup(inst, r, now)
        inst.waiting.append(r)
        inst.waiting_tokens += r.input_len - r.prefilled
        if r.ready_at > now:
            self.push(r.ready_at, _EV_READY, inst)
        inst.kick(now)

    def _prefix_lookup(self, inst: Instance, r: SimRequest, now: float) -> None:
        if inst.cache is None or not r.hash_ids:
            return
        local = inst.cache.match(r.hash_ids, record=True)
        remote = 0
        if self.global_store is not None:
            remote = self.global_store.match(r.hash_ids, record=True)
        blocks = max(local, remote)
        hit = min(blocks * MOONCAKE_BLOCK_TOKENS, r.input_len - 1)
        if hit <= 0:
            return
        r.prefix_hit = hit
        r.prefilled = hit
        kvb = self.model.kv_bytes_per_token
        local_tok = min(local * MOONCAKE_BLOCK_TOKENS, hit)
        remote_tok = hit - local_tok
        t_load = local_tok * kvb / (self.cfg.local_cache_gbps * 1e9)
        if remote_tok:
            t_load += self.cfg.link_base_s + remote_tok * kvb / self.link_Bps
        # layer-wise: the load overlaps the prefill of the suffix; only the excess and the last
        # layer are exposed
        compute = self.cost.prefill_s(r.input_len - hit, hit) * inst._scale()
        exposed = t_load / self.model.layers + max(0.0, t_load - compute)
        r.ready_at = now + exposed

    def _on_admit(self, inst: Instance, r: SimRequest, now: float) -> None:
        r.t_prefill_start = now

    def _on_prefill_done(self, inst: Instance, r: SimRequest, now: float) -> None:
        if inst.pipe_frac > 0.0:
            now += inst.tail_s
        r.t_first = now
        r.generated = 1
        self.policy.on_prefill_done(r.info, inst.load, now)
        if inst.cache is not None and r.hash_ids:
            inst.cache.insert(r.hash_ids)
            if self.global_store is not None:
                self.global_store.insert(r.hash_ids)
        if r.output_len <= 1:
            self._finish(inst, r, now, prefill_side=True)
            return
        if inst.kind == "colocated":
            extra = r.input_len + r.generated - r.kv  # the first output token's KV
            inst.pool.used += extra
            r.kv += extra
            inst._join(r)
            return
        if inst.partner is not None:  # semi-PD: same memory, no transfer
            self.policy.on_complete(r.info, inst.load, now)
            d = inst.partner
            d.load.active_requests += 1
            r.pinst = inst
            d.pending.append(r)
            d.kick(now)
            return
        # PD: pick a decode instance, move the KV
        decs = self.decoders or [i for i in self.instances if i.kind == "decode"]
        for d in decs:
            d.load.kv_used_tokens = d.pool.used
            d.load.queued_requests = len(d.pending)
        idx = self.decode_policy.select(r.info, [d.load for d in decs], now)
        d = decs[idx]
        self.decode_policy.on_dispatch(r.info, d.load, now)
        self._transfer(inst, d, r, now, r.input_len, now - r.t_prefill_start)

    def _transfer(
        self,
        src: Instance,
        dst: Instance,
        r: SimRequest,
        now: float,
        tokens: int,
        overlap_s: float,
        extra_s: float = 0.0,
    ) -> None:
        nbytes = tokens * self.model.kv_bytes_per_token
        src.transfers_active += 1
        share = self.link_Bps / max(1, src.transfers_active, dst.transfers_active + 1)
        total = nbytes / share
        if self.cfg.layerwise_transfer:
            exposed = total / self.model.layers + max(0.0, total - overlap_s)
        else:
            exposed = total
        r.dinst = dst
        self.push(now + self.cfg.link_base_s + exposed + extra_s, _EV_TRANSFER, (src, r))

    def _deliver(self, r: SimRequest, now: float) -> None:
        src = r.pinst
        if src is not None and src.kind == "prefill" and not r.seg2:
            src.pool.used -= r.kv
            r.kv = 0
            self.policy.on_complete(r.info, src.load, now)
            src.kick(now)
        d = r.dinst
        assert d is not None
        d.pending.append(r)
        d.kick(now)

    def _on_decode_segment_done(self, inst: Instance, r: SimRequest, now: float) -> None:
        if (
            r.handover_to is not None
            and 0 < r.handover_after < r.output_len
            and r.generated < r.output_len
            and not r.seg2
        ):
            # DynaServe: the second segment continues on another instance
            dst = r.handover_to
            r.seg2 = True
            self.policy.on_complete(r.info, inst.load, now)
            dst.load.active_requests += 1
            tokens = r.input_len + r.generated
            ho = self.cfg.handoff_cost
            self._transfer(inst, dst, r, now, tokens, 0.0, ho.seconds(tokens) if ho else 0.0)
            return
        self._finish(inst, r, now)

    def _finish(
        self, inst: Instance, r: SimRequest, now: float, prefill_side: bool = False
    ) -> None:
        r.t_done = now
        r.generated = r.output_len
        inst.completed += 1
        if prefill_side:
            inst.pool.used -= r.kv
            r.kv = 0
            self.policy.on_complete(r.info, inst.load, now)
        else:  # its KV was freed when it left the batch
            if inst.kind == "colocated" and not r.seg2:
                self.policy.on_complete(r.info, inst.load, now)
            elif inst.kind == "decode" and inst.partner is None and not r.seg2:
                self.decode_policy.on_complete(r.info, inst.load, now)
            else:
                inst.load.active_requests = max(0, inst.load.active_requests - 1)
        self.finished.append(r)
        if inst.partner is not None:  # semi-PD: memory freed for the other half
            inst.partner.kick(now)


@dataclass
class RunResult:
    requests: list[SimRequest]
    sim: Simulator
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

# SPDX-License-Identifier: Apache-2.0
"""The discrete-event core: requests, KV pools, the cluster's configuration and the instances
(iteration-level batching, KV memory on demand with preemption, the step machine). The cluster
around them (event loop, routing, transfers) is :mod:`.cluster`.

Instances run vLLM-V1-like iterations: running decodes first (one token each), then the chunks
of partially prefilled requests, then new requests FCFS while ``max_num_seqs``, the token budget
and KV memory allow. A decode-only stretch is simulated as one *macro step* up to the next
request completion (step time is linear in the batch's total context, so the sum is closed-form);
anything that changes the batch (an arrival, a KV handover, a controller action) cuts the macro
step at the next iteration boundary. That keeps the cost per simulated request O(log n) rather
than O(output tokens).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from ..policies.base import RequestInfo, WorkerLoad
from .cache import PrefixCache
from .cost import CostModel
from .models import GpuSpec, ModelSpec
from .traces import TraceRequest

if TYPE_CHECKING:
    from ..control.costs import HandoffCost
    from .cluster import Simulator

KINDS = ("colocated", "prefill", "decode")

# event kinds (ordered: at equal times, completions before arrivals)
_EV_STEP, _EV_TRANSFER, _EV_READY, _EV_ARRIVAL, _EV_TICK, _EV_CALL = range(6)


class SimRequest:
    __slots__ = (
        "rid",
        "arrival",
        "input_len",
        "output_len",
        "hash_ids",
        "info",
        "prefilled",
        "prefix_hit",
        "ready_at",
        "t_first",
        "t_done",
        "t_prefill_start",
        "pinst",
        "dinst",
        "join_step",
        "tokens_at_join",
        "finish_step",
        "alive",
        "handover_after",
        "handover_to",
        "generated",
        "migrations",
        "seg2",
        "kv",
        "segs",
        "preemptions",
        "order",
        "recompute",
    )

    def __init__(self, tr: TraceRequest) -> None:
        self.rid = tr.rid
        self.arrival = tr.arrival_s
        self.input_len = tr.input_len
        self.output_len = tr.output_len
        self.hash_ids = tr.hash_ids
        self.info = RequestInfo(str(tr.rid), tr.input_len, tr.hash_ids, None, tr.output_len)
        self.prefilled = 0
        self.prefix_hit = 0
        self.ready_at = 0.0
        self.t_first = -1.0
        self.t_done = -1.0
        self.t_prefill_start = -1.0
        self.pinst: Instance | None = None
        self.dinst: Instance | None = None
        self.join_step = 0
        self.tokens_at_join = 0  # output tokens generated before joining the current decode set
        self.finish_step = 0
        self.alive = False  # entry in a decode heap is current
        self.handover_after = 0  # DynaServe: output tokens to make before moving (0 = never)
        self.handover_to: Instance | None = None
        self.generated = 0
        self.migrations = 0
        self.seg2 = False
        self.kv = 0  # KV tokens this request holds in its current instance's pool
        #: decode segments (instance, first step, last step): the steps that made its tokens
        self.segs: list[tuple[Instance, int, int]] = []
        self.preemptions = 0
        self.order = 0
        self.recompute = False

    def token_times(self) -> list[float]:
        """Times of every output token (first token included), in order."""
        out = [self.t_first] if self.t_first >= 0 else []
        for inst, a, b in self.segs:
            out.extend(inst.tok_times[a:b])
        return out


def _valid(entry: tuple[int, int, SimRequest], inst: Instance) -> bool:
    r = entry[2]
    return r.alive and r.dinst is inst and r.finish_step == entry[0]


class KVPool:
    """KV memory of one GPU group, in tokens; shared by the two halves of a semi-PD instance."""

    __slots__ = ("capacity", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0

    def fits(self, tokens: int) -> bool:
        return self.used + tokens <= self.capacity

    @property
    def frac(self) -> float:
        return self.used / self.capacity if self.capacity else 1.0


@dataclass
class ClusterConfig:
    """A cluster: how many instances of each kind, their engine limits and the network."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    n_colocated: int = 0
    n_prefill: int = 0
    n_decode: int = 0
    #: semi-PD instances (one prefill and one decode engine on the same GPUs)
    n_split: int = 0
    split_prefill_share: float = 0.5
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    #: prefill-instance token budget per iteration (long prompts are chunked by it)
    prefill_max_tokens: int = 16384
    #: KV capacity override (tokens per instance); None = from GPU memory and weights
    kv_capacity_tokens: int | None = None
    #: P->D KV transfer: per-transfer base latency and NIC bandwidth per instance (GB/s);
    #: None = the GPU's inter-node bandwidth x TP
    link_base_s: float = 0.0005
    link_gbps: float | None = None
    layerwise_transfer: bool = True
    #: prefix caching: "none", "local" (per-instance caches) or "global" (Mooncake-style pool)
    cache_mode: str = "none"
    #: tokens of prefix cache per instance (CPU DRAM); the global pool is the sum
    cache_tokens_per_instance: int = 0
    #: bandwidth to load a cached prefix from local DRAM (GB/s per instance)
    local_cache_gbps: float = 64.0
    #: DynaServe local scheduler: cap each iteration so its predicted time stays under this
    tbt_budget_s: float | None = None
    #: DynaServe hand-off: measured store overhead (``fixed_s + tokens * per_token_s``, see
    #: ``banaserve_ext/data/costs.json``) added to the link time of segment 2's KV
    handoff_cost: HandoffCost | None = None

    def validate(self) -> None:
        if self.tp < 1:
            raise InvalidArgumentError(f"--tp must be >= 1, got {self.tp}")
        if min(self.n_colocated, self.n_prefill, self.n_decode, self.n_split) < 0:
            raise InvalidArgumentError("instance counts must be >= 0")
        if self.n_colocated + self.n_prefill + self.n_split == 0:
            raise InvalidArgumentError("the cluster has no instance that can run a prefill")
        if self.n_prefill and not self.n_decode:
            raise InvalidArgumentError(
                f"{self.n_prefill} prefill instances need >= 1 decode instance (--decode)"
            )
        if self.cache_mode not in ("none", "local", "global"):
            raise InvalidArgumentError(
                f"cache_mode must be none|local|global, got {self.cache_mode!r}"
            )
        if not 0.05 <= self.split_prefill_share <= 0.95:
            raise InvalidArgumentError("split_prefill_share must be in [0.05, 0.95]")
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1:
            raise InvalidArgumentError("max_num_seqs and max_batched_tokens must be >= 1")


class Instance:
    """One serving engine (a TP group, or one half of a semi-PD GPU group)."""

    def __init__(
        self,
        sim: Simulator,
        idx: int,
        kind: str,
        pool: KVPool,
        cost: CostModel,
        max_num_seqs: int,
        max_tokens: int,
    ) -> None:
        self.sim = sim
        self.idx = idx
        self.kind = kind
        self.pool = pool
        self.cost = cost
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_tokens
        self.load = WorkerLoad(f"sim://{idx}", "colocated" if kind == "colocated" else kind)
        self.load.kv_capacity_tokens = pool.capacity
        self.load.extra["instance"] = idx
        self.waiting: deque[SimRequest] = deque()
        self.waiting_tokens = 0  # prompt tokens still to compute in ``waiting`` (O(1) query)
        self.prefilling: list[SimRequest] = []
        self.pending: deque[SimRequest] = deque()  # decode work waiting to join the batch
        self.heap: list[tuple[int, int, SimRequest]] = []
        self.n_dec = 0
        self.dec_ctx = 0
        self.finish_sum = 0  # sum of alive decodes' finish steps (remaining tokens in O(1))
        self.step_count = 0
        self.boundary_ops: list[Callable[[float], None]] = []
        # the step in flight
        self.busy = False
        self.version = 0
        self.step_start = 0.0
        self.step_k = 0
        self.step_alpha = 0.0
        self.step_beta = 0.0
        self.step_chunks: list[tuple[SimRequest, int]] = []
        # knobs the controllers turn
        self.time_scale = 1.0  # semi-PD: 1 / SM share
        self.layer_frac = 1.0  # layers held / model layers (layer migration)
        self.pipe_frac = 0.0  # share of layers running on another instance
        self.remote_slow = 1.0  # slowdown of the instance holding our layers / attention
        self.tail_s = 0.0  # pipeline tail of the last prefill step (layer migration)
        self.assist = 0.0  # busy share lent to another instance's layers / attention
        self.attn_frac = 1.0  # share of decode attention kept here (attention migration)
        self.step_extra_s = 0.0  # per-iteration sync cost of split layers / attention
        self.accepting = True  # False while draining for a role flip
        self.partner: Instance | None = None  # semi-PD: the other half
        self.cache: PrefixCache | None = None
        self.transfers_active = 0
        self.busy_s = 0.0
        self.prefill_busy_s = 0.0
        self.tokens_prefilled = 0
        self.tokens_decoded = 0
        self.completed = 0
        #: end time of every decode step, indexed by step number - 1 (per-token TBT)
        self.tok_times = array("d")
        self.preemptions = 0
        self.recompute_s = 0.0  # recompute prefill owed by re-admitted preempted requests
        self._order = 0  # join order (vLLM preempts the latest-joined request first)

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.n_dec + len(self.prefilling)

    def queued_prefill_tokens(self) -> int:
        return self.waiting_tokens + sum(r.input_len - r.prefilled for r in self.prefilling)

    def _scale(self) -> float:
        return self.time_scale / max(1e-6, 1.0 - self.assist)

    def iteration_s(self, chunks: Sequence[tuple[int, int]], n_dec: int, dec_ctx: int) -> float:
        t = self.cost.iteration_s(chunks, n_dec, dec_ctx)
        if self.attn_frac < 1.0 and n_dec:
            # attention-level migration: the two KV parts are attended in parallel, then merged
            bare = self.cost.iteration_s(chunks, n_dec, 0)
            attn = t - bare
            t = bare + max(attn * self.attn_frac, attn * (1.0 - self.attn_frac) * self.remote_slow)
        if self.pipe_frac > 0.0:
            # layer-level migration: the last pipe_frac of the layers run on another instance.
            # Prefill chunks pipeline across the two (throughput = slower stage, one tail per
            # request); a decode step cannot pipeline with itself.
            if chunks and self.kind == "prefill":
                remote = t * self.pipe_frac * self.remote_slow
                self.tail_s = remote
                t = max(t * (1.0 - self.pipe_frac), remote)
            else:
                t = t * (1.0 + self.pipe_frac * (self.remote_slow - 1.0))
        return (t + self.step_extra_s) * self._scale()

    # -- the step machine ----------------------------------------------------------------------
    def kick(self, now: float) -> None:
        """Something arrived: start a step if idle, or cut a decode macro step short."""
        if not self.busy:
            self._start_step(now)
        elif self.step_k > 1:
            self._truncate(now)

    def _steps_time(self, k: int) -> float:
        return k * self.step_alpha + self.step_beta * k * (k - 1) / 2.0

    def _truncate(self, now: float) -> None:
        elapsed = now - self.step_start
        k = self.step_k
        # smallest j with T(j) >= elapsed: solve the quadratic, then fix rounding
        a, b = self.step_alpha, self.step_beta
        if b > 1e-15:
            j = math.ceil((-(a - b / 2) + math.sqrt((a - b / 2) ** 2 + 2 * b * elapsed)) / b)
        else:
            j = math.ceil(elapsed / a) if a > 0 else 1
        j = max(1, j)
        while j > 1 and self._steps_time(j - 1) >= elapsed:
            j -= 1
        while self._steps_time(j) < elapsed and j < k:
            j += 1
        if j >= k:
            return
        self.step_k = j
        self.version += 1
        self.sim.push(self.step_start + self._steps_time(j), _EV_STEP, (self, self.version))

    def _admit_decodes(self) -> None:
        pend = self.pending
        while pend and self.n_dec < self.max_num_seqs:
            r = pend[0]
            need = r.input_len + r.generated - r.kv
            # on-demand KV: admit while one more token per running decode still fits
            if need > 0 and not self.pool.fits(need + self.n_dec + 1):
                break
            pend.popleft()
            self.pool.used += need
            r.kv += need
            if r.recompute:
                # recompute (vLLM/SGLang preemption): the KV is rebuilt by a prefill pass
                r.recompute = False
                self.recompute_s += self.cost.prefill_s(r.input_len + r.generated)
            self._join(r)

    def _join(self, r: SimRequest) -> None:
        r.dinst = self
        r.join_step = self.step_count
        r.tokens_at_join = r.generated
        if r.handover_to is not None and not r.seg2 and 0 < r.handover_after < r.output_len:
            left = r.handover_after - r.generated
        else:
            left = r.output_len - r.generated
        if left <= 0:
            left = 1
        r.finish_step = self.step_count + left
        r.alive = True
        self._order += 1
        r.order = self._order
        self.finish_sum += r.finish_step
        self.n_dec += 1
        self.dec_ctx += r.input_len + r.generated
        self.sim._seq += 1
        heapq.heappush(self.heap, (r.finish_step, self.sim._seq, r))

    def remove_decode(self, r: SimRequest) -> None:
        """Take a running decode out of this instance's batch (request migration); its KV is
        freed here."""
        r.generated = r.tokens_at_join + (self.step_count - r.join_step)
        r.segs.append((self, r.join_step, self.step_count))
        r.alive = False
        self.finish_sum -= r.finish_step
        self.n_dec -= 1
        self.dec_ctx -= r.input_len + r.generated
        # on-demand KV: the request holds its prompt and every token made so far
        self.pool.used -= r.input_len + r.generated
        r.kv = 0

    def _preempt_latest(self) -> None:
        """Out of KV for the next step: preempt the latest-joined decode (vLLM's order) for
        recompute; it rejoins first, once its whole context fits again."""
        victim = None
        for e in self.heap:
            r = e[2]
            if _valid(e, self) and (victim is None or r.order > victim.order):
                victim = r
        if victim is None:
            return
        self.remove_decode(victim)
        victim.recompute = True
        victim.preemptions += 1
        self.preemptions += 1
        self.pending.appendleft(victim)

    def decode_remaining_tokens(self) -> int:
        return self.finish_sum - self.n_dec * self.step_count

    def at_boundary(self, now: float, op: Callable[[float], None]) -> None:
        """Run ``op`` at the next iteration boundary (now, when idle)."""
        if not self.busy:
            op(now)
            return
        self.boundary_ops.append(op)
        if self.step_k > 1:
            self._truncate(now)

    def _start_step(self, now: float) -> None:
        self._admit_decodes()
        if self.n_dec and self.kind != "prefill":
            while self.n_dec and not self.pool.fits(self.n_dec):
                self._preempt_latest()
        chunks: list[tuple[SimRequest, int]] = []
        budget = self.max_tokens - (self.n_dec if self.kind != "prefill" else 0)
        if self.kind != "decode":
            for r in self.prefilling:
                if budget <= 0:
                    break
                c = min(r.input_len - r.prefilled, budget)
                chunks.append((r, c))
                budget -= c
            wait = self.waiting
            # preempted requests go first (vLLM puts them at the head of the queue)
            while (
                wait
                and budget > 0
                and self.num_running < self.max_num_seqs
                and not (self.pending and self.kind == "colocated")
            ):
                r = wait[0]
                if r.ready_at > now:
                    break
                # on-demand KV: the prompt now, one token per step later; keep room for the
                # running decodes' next token
                need = r.input_len
                if not self.pool.fits(need + self.n_dec):
                    break
                wait.popleft()
                self.waiting_tokens -= r.input_len - r.prefilled
                self.pool.used += need
                r.kv = need
                self.sim._on_admit(self, r, now)
                self.prefilling.append(r)
                c = min(r.input_len - r.prefilled, budget)
                chunks.append((r, c))
                budget -= c
        tbt = self.sim.cfg.tbt_budget_s
        if chunks and tbt is not None and self.n_dec:
            chunks = self._fit_budget(chunks, tbt)
        if not chunks and self.n_dec == 0:
            self.busy = False
            return
        self.busy = True
        self.version += 1
        self.step_start = now
        self.step_chunks = chunks
        if chunks:
            spec = [(c, r.prefilled) for r, c in chunks]
            t = self.iteration_s(spec, self.n_dec, self.dec_ctx) + self.recompute_s
            self.recompute_s = 0.0
            self.step_k, self.step_alpha, self.step_beta = 1, t, 0.0
            self.prefill_busy_s += t
            end = now + t
        else:
            heap = self.heap
            while not _valid(heap[0], self):
                heapq.heappop(heap)
            k = max(1, heap[0][0] - self.step_count)
            # on-demand KV: stop the macro step where the pool fills (preemption point)
            k = max(1, min(k, (self.pool.capacity - self.pool.used) // self.n_dec))
            if self.recompute_s:
                k = 1
            a = self.iteration_s((), self.n_dec, self.dec_ctx)
            a2 = self.iteration_s((), self.n_dec, self.dec_ctx + self.n_dec * min(k, 64))
            self.step_alpha = a
            self.step_beta = (a2 - a) / min(k, 64) if k > 1 else 0.0
            self.step_k = k
            end = now + self._steps_time(k) + self.recompute_s
            self.step_alpha += self.recompute_s
            self.recompute_s = 0.0
        self.sim.push(end, _EV_STEP, (self, self.version))

    def _fit_budget(
        self, chunks: list[tuple[SimRequest, int]], tbt: float
    ) -> list[tuple[SimRequest, int]]:
        """DynaServe's local scheduler: shrink the prefill part until the step fits ``tbt``."""
        spec = [(c, r.prefilled) for r, c in chunks]
        if self.iteration_s(spec, self.n_dec, self.dec_ctx) <= tbt:
            return chunks
        total = sum(c for _, c in chunks)
        lo, hi = 0, total
        for _ in range(12):
            mid = (lo + hi) // 2
            left, out = mid, []
            for r, c in chunks:
                if left <= 0:
                    break
                out.append((r.prefilled, min(c, left)))
                left -= min(c, left)
            if self.iteration_s([(c, p) for p, c in out], self.n_dec, self.dec_ctx) <= tbt:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 16:
                break
        keep = max(lo, 16)
        res = []
        for r, c in chunks:
            if keep <= 0:
                break
            res.append((r, min(c, keep)))
            keep -= min(c, keep)
        return res

    def on_step_end(self, now: float, version: int) -> None:
        if version != self.version or not self.busy:
            return
        k = self.step_k
        dt = now - self.step_start
        self.busy_s += dt
        sim = self.sim
        if self.n_dec:
            tt = self.tok_times
            for j in range(1, k):
                tt.append(self.step_start + self._steps_time(j))
            tt.append(now)
            self.step_count += k
            self.dec_ctx += k * self.n_dec
            self.pool.used += k * self.n_dec
            self.tokens_decoded += k * self.n_dec
            heap = self.heap
            while heap and heap[0][0] <= self.step_count:
                entry = heapq.heappop(heap)
                if not _valid(entry, self):
                    continue
                r = entry[2]
                self.remove_decode(r)
                sim._on_decode_segment_done(self, r, now)
        done_prefill = []
        for r, c in self.step_chunks:
            r.prefilled += c
            self.tokens_prefilled += c
            if r.prefilled >= r.input_len:
                done_prefill.append(r)
        if done_prefill:
            self.prefilling = [r for r in self.prefilling if r.prefilled < r.input_len]
            for r in done_prefill:
                sim._on_prefill_done(self, r, now)
        self.step_chunks = []
        self.busy = False
        if self.boundary_ops:
            ops, self.boundary_ops = self.boundary_ops, []
            for op in ops:
                op(now)
        if not self.busy:
            self._start_step(now)

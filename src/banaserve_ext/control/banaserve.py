# SPDX-License-Identifier: Apache-2.0
"""BanaServe's rebalancing controller, as a plain object.

It sees per-instance views (utilisation over the last window, KV use, layers held) and returns
actions; a runtime (the simulator's actuator, later the live controller) carries them out.

Decision per tick:

1. **Role flip** (coarse, the Splitwise/TetriInfer move: drain, then switch the role, which
   costs ``flip_cost_s``, measured live, see :mod:`.costs`). With ``flip_queue_s`` set, on a
   *persistent queueing signal*: one tier's mean queueing delay (``InstanceView.queue_delay_s``,
   plus preemptions and decode steps slower than ``step_budget_s``) stays above
   ``flip_queue_s`` and twice the other tier's for ``flip_persist`` windows, the queue is worth
   the flip cost, and the donor tier's load after losing one instance stays below the busy
   tier's after gaining it (the min-max objective). Without it, the older utilisation
   trigger: one tier above ``flip_high`` for ``persist`` windows while the other would stay
   below ``flip_low`` (``U * n / (n - 1)``). Nothing fires before ``warmup_s``.
2. Otherwise, when the busiest and the idlest instance stay more than ``high`` apart for
   ``persist`` windows, solve ``min over plans of max_g U_g(plan)`` subject to
   ``migration_latency(plan) <= budget_s`` over

   * **layer-level migration** of a contiguous block of ``k`` layers with their weights and KV
     (``latency = k * (W_layer + KV_layer) / bandwidth + fixed``; the donor's iteration time falls
     by ``k/L``, the receiver lends that share of its time), and
   * **attention-level migration** of a share ``phi`` of a decode instance's KV and attention
     (``latency = phi * KV / bandwidth + fixed``; per step the two exchange partial outputs and
     softmax statistics, a fixed ``exchange_s``).

3. **Hysteresis and cool-down**: nothing fires until the imbalance persisted, no two actions
   within ``cooldown_s``, and a migration is undone only when the imbalance has reversed by more
   than ``low`` (not as soon as it shrinks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError


def _measured_flip_cost() -> float:
    from .costs import measured_costs

    return measured_costs().flip_cost_s


@dataclass(frozen=True)
class LinkCost:
    """Time one migration takes to move ``n`` bytes: ``fixed_s + n / bandwidth_Bps``.

    ``fixed_s`` is what a migration pays whatever its size (control round trips, setting up the
    receiver). The two mechanisms differ (a layer migration ships weights into fresh memory and
    rebinds parameters; a KV migration writes into a pre-allocated arena), so the controller keeps
    one link cost per mechanism; :meth:`fit` derives them from a benchmark's measurements
    (``banaserve bench layer-migration``, ``bench/migration/bench_kv_migration.py``).
    """

    bandwidth_Bps: float
    fixed_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_Bps > 0:
            raise InvalidArgumentError(f"bandwidth_Bps must be > 0, got {self.bandwidth_Bps}")
        if not self.fixed_s >= 0:
            raise InvalidArgumentError(f"fixed_s must be >= 0, got {self.fixed_s}")

    def seconds(self, nbytes: float) -> float:
        return self.fixed_s + nbytes / self.bandwidth_Bps

    @classmethod
    def fit(cls, nbytes: Sequence[float], seconds: Sequence[float]) -> LinkCost:
        """``seconds = fixed_s + nbytes / bandwidth_Bps`` with the least relative error (weights
        ``1 / seconds**2``) over measurements of at least two sizes; a negative intercept is
        refitted through the origin."""
        if len(nbytes) != len(seconds):
            raise InvalidArgumentError("nbytes and seconds differ in length")
        if len(set(nbytes)) < 2:
            raise InvalidArgumentError("a fit needs measurements of at least two sizes")
        if any(x < 0 for x in nbytes) or any(not y > 0 for y in seconds):
            raise InvalidArgumentError("sizes must be >= 0 and times > 0")
        pts = list(zip(nbytes, seconds, strict=True))
        w = [1.0 / (y * y) for _, y in pts]
        sw = sum(w)
        mx = sum(wi * x for wi, (x, _) in zip(w, pts, strict=True)) / sw
        my = sum(wi * y for wi, (_, y) in zip(w, pts, strict=True)) / sw
        sxx = sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, pts, strict=True))
        sxy = sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, pts, strict=True))
        slope = sxy / sxx
        fixed = my - slope * mx
        if fixed < 0:
            slope = sum(wi * x * y for wi, (x, y) in zip(w, pts, strict=True)) / sum(
                wi * x * x for wi, (x, _) in zip(w, pts, strict=True)
            )
            fixed = 0.0
        if not slope > 0:
            raise InvalidArgumentError("time does not grow with size: no bandwidth to fit")
        return cls(bandwidth_Bps=1.0 / slope, fixed_s=fixed)

    def relative_error(self, nbytes: float, measured_s: float) -> float:
        """(predicted − measured) / measured."""
        return (self.seconds(nbytes) - measured_s) / measured_s


@dataclass
class InstanceView:
    """One instance as the controller sees it at a tick. Everything here is observable on a live
    SGLang server (``/get_load``-style counters, the scheduler's queue, the last step time), so a
    live process can fill it in; fields after ``accepting`` are optional additions (0 = unknown)."""

    idx: int
    role: str  # "prefill" | "decode" | "colocated"
    util: float  # busy share of the last window, 0..1
    kv_frac: float = 0.0
    kv_tokens: int = 0
    layers_held: int = 0
    #: share of this instance's step time that is decode attention (for attention migration)
    attn_share: float = 0.0
    accepting: bool = True
    #: requests waiting: prefill queue (prefill/colocated) or KV-transferred requests waiting
    #: for decode memory (decode)
    queue_len: int = 0
    #: predicted seconds to drain the queued work (prefill: queued tokens x prefill rate;
    #: decode: how long the oldest waiting request has waited)
    queue_delay_s: float = 0.0
    #: running decode requests and the last decode step's time (s)
    running: int = 0
    step_s: float = 0.0
    #: requests preempted (KV exhausted) during the last window
    preempted: int = 0
    #: migrations this instance can hand away / take in ("layers", "attention"); a live
    #: deployment narrows them (no layer server beside it, radix cache on, ...)
    can_send: tuple[str, ...] = ("layers", "attention")
    can_receive: tuple[str, ...] = ("layers", "attention")


@dataclass(frozen=True)
class MigrateLayers:
    src: int
    dst: int
    layers: int
    latency_s: float
    reason: str = ""


@dataclass(frozen=True)
class MigrateAttention:
    src: int
    dst: int
    fraction: float
    latency_s: float
    reason: str = ""


@dataclass(frozen=True)
class FlipRole:
    idx: int
    new_role: str
    reason: str = ""
    #: what the flip is predicted to cost (drain excluded): the instance serves nothing for it
    cost_s: float = 0.0


@dataclass(frozen=True)
class Revert:
    """Undo the migration ``index`` of :attr:`BanaServeController.active`."""

    src: int
    dst: int
    reason: str = ""


@dataclass
class BanaServeConfig:
    high: float = 0.3
    low: float = 0.1
    flip_high: float = 0.9
    flip_low: float = 0.7
    persist: int = 3
    cooldown_s: float = 10.0
    budget_s: float = 1.0
    bandwidth_Bps: float = 50e9
    sync_s: float = 0.005
    max_layer_frac: float = 0.5
    attn_fractions: tuple[float, ...] = (0.25, 0.5)
    min_gain: float = 0.05
    #: no action before this time (the first windows are the warm-up transient)
    warmup_s: float = 0.0
    #: measured link costs per mechanism (see :class:`LinkCost`); ``None`` falls back to
    #: ``sync_s + bytes / bandwidth_Bps`` for that mechanism
    layer_link: LinkCost | None = None
    attention_link: LinkCost | None = None
    #: role flips: a flip fires when one tier's mean queueing delay stays above
    #: ``flip_queue_s`` (and twice the other tier's) for ``flip_persist`` windows, and the
    #: other tier's load after losing one instance stays below the busy tier's load after
    #: gaining it (min-max) or below ``flip_low``.
    #: ``flip_queue_s = None`` keeps the older utilisation trigger (``flip_high``).
    flip_queue_s: float | None = None
    flip_persist: int = 10
    #: role-switch time after the drain (s); None = the measured value in
    #: ``banaserve_ext/data/costs.json`` (see :func:`banaserve_ext.control.costs.measured_costs`)
    flip_cost_s: float | None = None
    #: a flip is worth it only if the queue it relieves is worth this many flip costs
    flip_cost_factor: float = 1.0
    #: decode step time the SLO allows (the TBT budget); a decode instance stepping slower
    #: counts as queueing in proportion (None: ignore step times)
    step_budget_s: float | None = None

    def layer_cost(self) -> LinkCost:
        return self.layer_link or LinkCost(self.bandwidth_Bps, self.sync_s)

    def attention_cost(self) -> LinkCost:
        return self.attention_link or LinkCost(self.bandwidth_Bps, self.sync_s)

    def validate(self) -> None:
        if not 0 <= self.low < self.high:
            raise InvalidArgumentError(f"need 0 <= low < high, got {self.low}, {self.high}")
        if self.persist < 1 or self.cooldown_s < 0 or self.budget_s <= 0:
            raise InvalidArgumentError("persist >= 1, cooldown_s >= 0, budget_s > 0 required")
        if self.bandwidth_Bps <= 0:
            raise InvalidArgumentError("bandwidth_Bps must be > 0")


@dataclass
class _Active:
    action: MigrateLayers | MigrateAttention
    since: float


@dataclass
class BanaServeController:
    total_layers: int
    weight_bytes_per_layer: int
    kv_bytes_per_token_layer: int
    config: BanaServeConfig = field(default_factory=BanaServeConfig)
    active: list[_Active] = field(default_factory=list)
    decisions: list[tuple[float, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config.validate()
        if self.total_layers < 1:
            raise InvalidArgumentError("total_layers must be >= 1")
        self._imb_ticks = 0
        self._flip_ticks = 0
        self._rev_ticks = 0
        self._last_action = float("-inf")
        self._flip_cost = (
            self.config.flip_cost_s
            if self.config.flip_cost_s is not None
            else _measured_flip_cost()
        )

    # -- costs -------------------------------------------------------------------------------
    def layer_latency(self, k: int, kv_tokens: int) -> float:
        c = self.config
        nbytes = k * (self.weight_bytes_per_layer + self.kv_bytes_per_token_layer * kv_tokens)
        return c.layer_cost().seconds(nbytes)

    def attention_latency(self, fraction: float, kv_tokens: int) -> float:
        nbytes = fraction * kv_tokens * self.kv_bytes_per_token_layer * self.total_layers
        return self.config.attention_cost().seconds(nbytes)

    # -- the decision ------------------------------------------------------------------------
    def plan(self, views: Sequence[InstanceView], now_s: float) -> list[object]:
        c = self.config
        live = [v for v in views if v.accepting]
        if len(live) < 2:
            return []
        if now_s - self._last_action < c.cooldown_s or now_s < c.warmup_s:
            return []
        acts = (
            self._maybe_flip_queue(live, now_s)
            if c.flip_queue_s is not None
            else self._maybe_flip(live)
        )
        if acts:
            return self._commit(acts, now_s)
        acts = self._maybe_revert(views)
        if acts:
            return self._commit(acts, now_s)
        hi = max(live, key=lambda v: v.util)
        # layers move within a tier (a prefill hot spot to the idlest prefill instance); a hot
        # decode instance lends attention to the idlest instance of any role
        peers = [v for v in live if v.idx != hi.idx and (v.role == hi.role or hi.role == "decode")
                 and set(hi.can_send) & set(v.can_receive)]  # fmt: skip
        if not peers:
            self._imb_ticks = 0
            return []
        lo = min(peers, key=lambda v: v.util)
        if hi.util - lo.util > c.high:
            self._imb_ticks += 1
        else:
            self._imb_ticks = 0
        if self._imb_ticks < c.persist:
            return []
        if any(a.action.src == hi.idx or a.action.dst == lo.idx for a in self.active):
            return []
        best = self.solve(live, hi, lo)
        if best is None:
            return []
        self._imb_ticks = 0
        return self._commit([best], now_s)

    def solve(
        self, views: Sequence[InstanceView], hi: InstanceView, lo: InstanceView
    ) -> MigrateLayers | MigrateAttention | None:
        """min over plans of max_g U_g(plan), subject to latency(plan) <= budget."""
        c = self.config
        others = max((v.util for v in views if v.idx not in (hi.idx, lo.idx)), default=0.0)
        current = max(hi.util, lo.util, others)
        best: tuple[float, float, MigrateLayers | MigrateAttention] | None = None
        held = hi.layers_held or self.total_layers
        # layer migration pipelines prefill chunks across two instances; a decode step cannot
        # pipeline with itself, so hot decode instances get attention migration instead
        max_k = max(0, int(held * c.max_layer_frac)) if hi.role != "decode" else 0
        if "layers" not in hi.can_send or "layers" not in lo.can_receive:
            max_k = 0
        for k in range(1, max_k + 1):
            lat = self.layer_latency(k, hi.kv_tokens)
            if lat > c.budget_s:
                break
            moved = hi.util * k / self.total_layers
            peak = max(hi.util - moved, lo.util + moved, others)
            why = (
                f"util {hi.util:.2f} on {hi.idx} vs {lo.util:.2f} on {lo.idx} for "
                f"{c.persist} windows; peak {current:.2f} -> {peak:.2f}; {k} layers in "
                f"{lat:.2f} s (LinkCost)"
            )
            cand = (peak, lat, MigrateLayers(hi.idx, lo.idx, k, lat, why))
            if best is None or cand[:2] < best[:2]:
                best = cand
        attn_ok = "attention" in hi.can_send and "attention" in lo.can_receive
        if hi.role == "decode" and hi.attn_share > 0 and attn_ok:
            for phi in c.attn_fractions:
                lat = self.attention_latency(phi, hi.kv_tokens)
                if lat > c.budget_s:
                    continue
                moved = hi.util * phi * hi.attn_share
                peak = max(hi.util - moved, lo.util + moved, others)
                why = (
                    f"decode util {hi.util:.2f} on {hi.idx} vs {lo.util:.2f} on {lo.idx} "
                    f"for {c.persist} windows; attention share {hi.attn_share:.2f}; peak "
                    f"{current:.2f} -> {peak:.2f}; {phi:.2f} of the KV in {lat:.2f} s"
                )
                cand = (peak, lat, MigrateAttention(hi.idx, lo.idx, phi, lat, why))
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None or current - best[0] < c.min_gain:
            return None
        return best[2]

    def _maybe_flip(self, live: Sequence[InstanceView]) -> list[object]:
        pre = [v for v in live if v.role == "prefill"]
        dec = [v for v in live if v.role == "decode"]
        if not pre or not dec:
            return []
        c = self.config
        up = sum(v.util for v in pre) / len(pre)
        ud = sum(v.util for v in dec) / len(dec)
        after_d = ud * len(dec) / (len(dec) - 1) if len(dec) > 1 else float("inf")
        after_p = up * len(pre) / (len(pre) - 1) if len(pre) > 1 else float("inf")
        if up > c.flip_high and after_d < c.flip_low:
            donor_tier, role = dec, "prefill"
        elif ud > c.flip_high and after_p < c.flip_low:
            donor_tier, role = pre, "decode"
        else:
            self._flip_ticks = 0
            return []
        self._flip_ticks += 1
        if self._flip_ticks < c.persist:
            return []
        busy = {a.action.src for a in self.active} | {a.action.dst for a in self.active}
        cands = [v for v in donor_tier if v.idx not in busy]
        if not cands:
            return []
        self._flip_ticks = 0
        why = (
            f"util prefill {up:.2f} / decode {ud:.2f} for {c.persist} windows "
            f"(flip_high {c.flip_high}, flip_low {c.flip_low})"
        )
        return [FlipRole(min(cands, key=lambda v: v.util).idx, role, why, self._flip_cost)]

    def _maybe_flip_queue(self, live: Sequence[InstanceView], now_s: float) -> list[object]:
        """Flip on a persistent queueing signal: one tier's requests wait (prefill queue, or
        decode requests waiting for KV memory / being preempted) while the other tier has
        slack. The flip costs a drain plus ``flip_cost_s`` of role switch, so it fires only
        after ``flip_persist`` windows and when the queued delay is worth ``flip_cost_factor``
        flip costs spread over the receiving tier."""
        c = self.config
        assert c.flip_queue_s is not None
        pre = [v for v in live if v.role == "prefill"]
        dec = [v for v in live if v.role == "decode"]
        if not pre or not dec:
            self._flip_ticks = 0
            return []

        def pressure(tier: Sequence[InstanceView]) -> float:
            tot = 0.0
            for v in tier:
                tot += v.queue_delay_s + (v.preempted > 0) * c.flip_queue_s
                if c.step_budget_s and v.role == "decode" and v.step_s > c.step_budget_s:
                    tot += c.flip_queue_s * v.step_s / c.step_budget_s
            return tot / len(tier)

        qp, qd = pressure(pre), pressure(dec)
        up = sum(v.util for v in pre) / len(pre)
        ud = sum(v.util for v in dec) / len(dec)

        def worth(u_hot: float, n_hot: int, u_donor: float, n_donor: int) -> float | None:
            """The donor tier's load after giving one instance, if that keeps the busier tier
            less loaded than now (min-max) or under ``flip_low``; else None."""
            if n_donor < 2:
                return None
            after_d = u_donor * n_donor / (n_donor - 1)
            after_h = u_hot * n_hot / (n_hot + 1)
            return after_d if after_d < max(c.flip_low, after_h) else None

        u_after = None
        if qp > c.flip_queue_s and qp > 2 * qd:
            u_after = worth(up, len(pre), ud, len(dec))
            donor_tier, role, hot, q = dec, "prefill", "prefill", qp
        elif qd > c.flip_queue_s and qd > 2 * qp:
            u_after = worth(ud, len(dec), up, len(pre))
            donor_tier, role, hot, q = pre, "decode", "decode", qd
        if u_after is None:
            self._flip_ticks = 0
            return []
        self._flip_ticks += 1
        if self._flip_ticks < c.flip_persist:
            return []
        # the queue, spread over the enlarged tier, must outweigh the instance's lost time
        n_hot = len(pre) if hot == "prefill" else len(dec)
        if q * n_hot < c.flip_cost_factor * self._flip_cost:
            return []
        busy = {a.action.src for a in self.active} | {a.action.dst for a in self.active}
        cands = [v for v in donor_tier if v.idx not in busy]
        if not cands:
            return []
        self._flip_ticks = 0
        donor = min(cands, key=lambda v: (v.queue_len, v.util))
        why = (
            f"{hot} queueing {q:.2f} s > {c.flip_queue_s:.2f} s for {c.flip_persist} "
            f"windows; {'decode' if hot == 'prefill' else 'prefill'} queue "
            f"{qd if hot == 'prefill' else qp:.2f} s, util {u_after:.2f} after losing "
            f"{donor.idx} (load prefill {up:.2f} / decode {ud:.2f}); flip cost "
            f"{self._flip_cost:.1f} s + drain"
        )
        return [FlipRole(donor.idx, role, why, self._flip_cost)]

    def _maybe_revert(self, views: Sequence[InstanceView]) -> list[object]:
        by = {v.idx: v for v in views}
        for a in self.active:
            s, d = by.get(a.action.src), by.get(a.action.dst)
            if s is None or d is None:
                continue
            if d.util - s.util > self.config.low + self.config.high / 2:
                self._rev_ticks += 1
                if self._rev_ticks >= self.config.persist:
                    self._rev_ticks = 0
                    why = (
                        f"imbalance reversed: util {d.util:.2f} on receiver {d.idx} vs "
                        f"{s.util:.2f} on donor {s.idx} for {self.config.persist} windows"
                    )
                    return [Revert(a.action.src, a.action.dst, why)]
                return []
        self._rev_ticks = 0
        return []

    def _commit(self, acts: list[object], now_s: float) -> list[object]:
        self._last_action = now_s
        for a in acts:
            self.decisions.append((now_s, a))
            if isinstance(a, (MigrateLayers, MigrateAttention)):
                self.active.append(_Active(a, now_s))
            elif isinstance(a, Revert):
                self.active = [
                    x for x in self.active if not (x.action.src == a.src and x.action.dst == a.dst)
                ]
        return acts

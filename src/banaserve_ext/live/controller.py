# SPDX-License-Identifier: Apache-2.0
"""One live control loop: signals → views → :class:`BanaServeController` → actions.

Each :meth:`LiveController.tick`

1. lists the router's workers (their serving role and in-flight counts) and reads every
   instance's ``signals`` (cumulative counters; differences over the window give the busy share
   and the decode-attention share);
2. **repairs** the deployment first: an instance that stopped answering ``dead_after`` windows in
   a row is removed from the router and from the views; a live, idle instance that is missing
   from the router (a flip cut short by a dead controller) or listed in a role it no longer has
   is put back in the role it reports itself — so a restarted controller picks up the current
   state from the deployment, not from memory, and no worker stays out of rotation;
3. builds one :class:`~banaserve_ext.control.InstanceView` per live instance and runs the same
   controller object the simulator runs;
4. carries the decisions out (:meth:`flip`) and logs each one as a JSON line with its inputs,
   predicted and measured cost, and outcome.

A **role flip** takes the instance out of the router (no new work; its in-flight requests keep
their connections and finish, except those on the router's hand-off path, which the router
moves to other instances at once: ``POST /handoff/migrate``), waits until its scheduler reports
itself fully idle on two reads ``settle_s`` apart, runs SGLang's ``POST /pd_role_switch``, and
adds it back in the new role. A step that fails puts the instance back in its old role (SGLang's
switch refuses busy instances with ``safe_to_restore``); an instance the switch left unhealthy
is taken out and reported dead.

Besides the controller's decisions, :mod:`.kv_pressure` moves part of a decode instance's KV to
an attention peer when its KV use crosses ``kv_pressure.high``, and back below ``low``.

Layer- and attention-level migrations decided by :class:`BanaServeController` (on busy-share
imbalance) and their reverts are carried out by :mod:`.actuators` to the layer server / attention
peer beside the receiving instance (:class:`~.actuators.Targets`); one that fails is dropped from
the controller's active list. The link costs of its cost model come from ``link_costs`` or a
short calibration at start (:mod:`.calibrate`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import IO, Any

from ..control import (
    BanaServeConfig,
    BanaServeController,
    FlipRole,
    InstanceView,
    MigrateAttention,
    MigrateLayers,
    Revert,
)
from ..control.banaserve import _Active
from ..errors import BanaserveError, InvalidArgumentError
from .actuators import Actuators, Targets
from .clients import InstanceClient, InstanceSpec, RouterClient
from .kv_pressure import KvPressure, KvPressureConfig

log = logging.getLogger("banaserve_ext.live")

ROLES = ("prefill", "decode")


@dataclass
class LiveConfig:
    router: str
    instances: tuple[InstanceSpec, ...]
    control: BanaServeConfig = field(default_factory=BanaServeConfig)
    window_s: float = 2.0
    #: longest wait for a flipped instance's in-flight requests to finish
    drain_timeout_s: float = 120.0
    settle_s: float = 0.3
    #: windows without an answer before an instance counts as dead
    dead_after: int = 3
    #: predicted drain + switch time of a flip (logged next to the measured one)
    flip_cost_s: float = 1.0
    decisions_path: Path | None = None
    #: attention-level KV migration on KV pressure (off without peers)
    kv_pressure: KvPressureConfig = field(default_factory=KvPressureConfig)
    #: model geometry for the controller's migration cost model
    total_layers: int = 2
    weight_bytes_per_layer: int = 0
    kv_bytes_per_token_layer: int = 0
    #: where each instance receives migrations (layer server, attention peer)
    targets: Targets = field(default_factory=Targets)
    #: link costs from a file (:func:`.calibrate.load_link_costs`); else, with ``calibrate``,
    #: measured at start against the targets
    link_costs: Path | None = None
    calibrate: bool = False

    def validate(self) -> None:
        if not self.instances:
            raise InvalidArgumentError("the controller needs at least one instance")
        urls = [i.url for i in self.instances]
        if len(set(urls)) != len(urls):
            raise InvalidArgumentError(f"instance listed twice: {urls}")
        missing = [i.url for i in self.instances if i.bootstrap_port is None]
        if missing:
            raise InvalidArgumentError(
                f"instances without a bootstrap port cannot be flipped to prefill: {missing}; "
                "give each as URL,BOOTSTRAP_PORT (start SGLang with --enable-pd-role-switch and "
                "a distinct --disaggregation-bootstrap-port)"
            )
        if self.window_s <= 0 or self.drain_timeout_s <= 0 or self.dead_after < 1:
            raise InvalidArgumentError("window_s > 0, drain_timeout_s > 0, dead_after >= 1")
        if not self.control.flip_low < self.control.flip_high:
            raise InvalidArgumentError(
                f"flip_low ({self.control.flip_low}) must be below flip_high "
                f"({self.control.flip_high}): without that gap a flip can undo itself"
            )
        self.control.validate()
        self.kv_pressure.validate()
        self.targets.validate(set(urls))
        both = set(self.kv_pressure.peers) & {a for _, a in self.targets.attn_peers}
        if both:
            raise InvalidArgumentError(
                f"attention peers {sorted(both)} are both in the KV-pressure pool and an "
                "instance's migration target: give each role its own peers"
            )


@dataclass
class InstanceState:
    idx: int
    client: InstanceClient
    last: dict | None = None  # previous signals
    current: dict | None = None
    failures: int = 0
    dead: bool = False
    router_role: str | None = None
    router_inflight: int = 0
    util: float = 0.0
    attn_share: float = 0.0
    #: why the instance cannot serve (its migrated layers were lost); out of the router
    unusable: str | None = None
    #: decode requests SGLang retracted for lack of KV in the last window
    preempted: int = 0

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def mode(self) -> str | None:
        return None if self.current is None else str(self.current.get("mode"))

    def row(self) -> dict:
        s = self.current or {}
        total = max(1, int(s.get("kv_total", 0) or 0))
        return {
            "idx": self.idx, "url": self.url, "mode": self.mode, "router_role": self.router_role,
            "dead": self.dead, "busy": round(self.util, 3),
            "attn_share": round(self.attn_share, 3),
            "kv_used": s.get("kv_used"), "kv_frac": round(int(s.get("kv_used", 0) or 0) / total, 3),
            "waiting": s.get("waiting"), "running": s.get("running"),
            "router_inflight": self.router_inflight, "unusable": self.unusable,
        }  # fmt: skip


def _action_dict(act: object) -> dict:
    d = asdict(act) if is_dataclass(act) and not isinstance(act, type) else {"repr": repr(act)}
    return {"type": type(act).__name__, **d}


class LiveController:
    """Constructor stores config; :meth:`start` validates it against the live deployment."""

    def __init__(self, config: LiveConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.config = config
        self.clock = clock
        self.router = RouterClient(config.router)
        self.instances = [
            InstanceState(i, InstanceClient(spec)) for i, spec in enumerate(config.instances)
        ]
        self.policy = BanaServeController(
            total_layers=config.total_layers,
            weight_bytes_per_layer=config.weight_bytes_per_layer,
            kv_bytes_per_token_layer=config.kv_bytes_per_token_layer,
            config=config.control,
        )
        self.kv = KvPressure(config.kv_pressure, self._record)
        self.actuators = Actuators(config.targets, config.total_layers, self._record)
        self.link_report: dict = {}
        self.recent: deque[dict] = deque(maxlen=50)
        self.counts: dict[tuple[str, str], int] = {}
        self.ticks = 0
        self.flip_seconds: list[float] = []
        self._t0 = 0.0
        self._log: IO[str] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LiveController:
        self.config.validate()
        workers = self.router.workers()  # raises if the router is not there
        known = {i.url for i in self.instances}
        foreign = [w["url"] for w in workers if w.get("url") not in known]
        if foreign:
            raise InvalidArgumentError(
                f"the router serves workers the controller was not given: {foreign}"
            )
        if self.config.decisions_path is not None:
            self.config.decisions_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.config.decisions_path, "a")  # noqa: SIM115 - closed in close()
        self._link_costs()
        self._t0 = self.clock()
        return self

    def _link_costs(self) -> None:
        from .calibrate import calibrate, load_link_costs

        c, t = self.config, self.config.targets
        if c.link_costs is not None:
            links, source = load_link_costs(c.link_costs), str(c.link_costs)
            report: dict = {"file": source}
        elif c.calibrate and (t.layer_servers or t.attn_peers):
            first = lambda pairs: pairs[0][1] if pairs else None  # noqa: E731
            links, report = calibrate(first(t.layer_servers), first(t.attn_peers))
            source = "calibration"
        else:
            return
        for name, link in links.items():
            setattr(c.control, name, link)
        self.link_report = {"source": source} | {
            n: {"fixed_s": v.fixed_s, "bandwidth_Bps": v.bandwidth_Bps} for n, v in links.items()
        }
        self._record("LinkCosts", report, "ok" if links else "defaults",
                     detail=None if links else "nothing measured: default link costs")  # fmt: skip

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- one window --------------------------------------------------------------------------
    def tick(self) -> list[dict]:
        """Reads, repairs, decides, acts; returns the decision records of this window."""
        self.ticks += 1
        try:
            workers = self.router.workers()
        except BanaserveError as exc:
            return [self._record("observe", {}, "router_unavailable", detail=str(exc))]
        self._read(workers)
        records = self._repair()
        records += self._watch()
        views = self.views()
        now = self.clock() - self._t0
        for act in self.policy.plan(views, now):
            records.append(self._execute(act, views))
        for inst in self.instances:
            if not inst.dead and not inst.failures and inst.current is not None:
                records += self.kv.step(inst.url, inst.current)
        return records

    def _read(self, workers: list[dict]) -> None:
        by_url = {w.get("url"): w for w in workers}
        for inst in self.instances:
            w = by_url.get(inst.url)
            inst.router_role = None if w is None else str(w.get("worker_type"))
            inst.router_inflight = 0 if w is None else int(w.get("active_requests", 0) or 0)
            try:
                sig = inst.client.signals()
            except BanaserveError:
                inst.failures += 1
                continue
            inst.failures = 0
            inst.dead = False
            inst.last, inst.current = inst.current, sig
            prev = inst.last
            if prev is not None and sig["t"] > prev["t"] and sig["started"] == prev["started"]:
                dt = sig["t"] - prev["t"]
                inst.util = min(1.0, max(0.0, (sig["busy_s"] - prev["busy_s"]) / dt))
                dd = sig["decode_s"] - prev["decode_s"]
                inst.attn_share = (sig["decode_attn_s"] - prev["decode_attn_s"]) / dd if dd else 0.0
                retracted = int(sig.get("retracted", 0)) - int(prev.get("retracted", 0))
                inst.preempted = max(0, retracted)
            if sig.get("mode") == "prefill" and int(sig.get("waiting", 0) or 0) > 0:
                # a prefill server with a queue is saturated, whatever its finished forward
                # passes say (a long prefill spanning the window adds no busy time until it ends)
                inst.util = 1.0

    def _repair(self) -> list[dict]:
        out = []
        for inst in self.instances:
            if inst.failures >= self.config.dead_after and not inst.dead:
                inst.dead = True
                inst.util = 0.0
                if inst.router_role is not None:
                    try:
                        self.router.remove(inst.url)
                        outcome = "removed"
                    except BanaserveError as exc:
                        outcome = f"remove_failed: {exc}"
                    inst.router_role = None
                else:
                    outcome = "not_in_router"
                out.append(self._record("remove_dead", {"url": inst.url}, outcome))
            if inst.dead or inst.failures or inst.current is None or inst.unusable:
                continue
            mode = inst.mode
            if mode not in ROLES or inst.router_role == mode:
                continue
            if inst.router_role is None and not inst.current.get("idle"):
                continue  # a flip may be draining it (another controller): leave it
            out.append(self._readd(inst, mode))
        return out

    def _readd(self, inst: InstanceState, mode: str) -> dict:
        inputs = {"url": inst.url, "mode": mode, "router_role": inst.router_role}
        try:
            if inst.router_role is not None:
                self.router.remove(inst.url, inst.router_role)
            self.router.add(inst.url, mode, inst.client.spec.bootstrap_port)
            inst.router_role = mode
            return self._record("readd", inputs, "ok")
        except BanaserveError as exc:
            return self._record("readd", inputs, "failed", detail=str(exc))

    def views(self) -> list[InstanceView]:
        views = []
        for inst in self.instances:
            s = inst.current
            if inst.dead or s is None or inst.mode not in ROLES or inst.unusable:
                continue
            total = max(1, int(s.get("kv_total", 0) or 0))
            send, receive = self.actuators.capabilities(inst.url, str(inst.mode))
            views.append(InstanceView(
                idx=inst.idx, role=str(inst.mode), util=inst.util,
                kv_frac=int(s.get("kv_used", 0)) / total, kv_tokens=int(s.get("kv_used", 0)),
                layers_held=self.config.total_layers, attn_share=inst.attn_share,
                accepting=inst.router_role == inst.mode, can_send=send, can_receive=receive,
                preempted=inst.preempted, queue_len=int(s.get("waiting", 0) or 0),
                running=int(s.get("running", 0) or 0),
            ))  # fmt: skip
        return views

    # -- actions -----------------------------------------------------------------------------
    def _execute(self, act: object, views: list[InstanceView]) -> dict:
        inputs = {"views": [asdict(v) for v in views], "action": _action_dict(act)}
        if isinstance(act, FlipRole):
            return self.flip(self.instances[act.idx], act.new_role, inputs)
        if isinstance(act, (MigrateLayers, MigrateAttention)):
            src, dst = self.instances[act.src].url, self.instances[act.dst].url
            run = (self.actuators.migrate_layers if isinstance(act, MigrateLayers)
                   else self.actuators.migrate_attention)  # fmt: skip
            rec = run(act, src, dst, inputs)
            if rec["outcome"] not in ("ok", "partial"):
                # not in place: the controller must not wait for its revert
                self.policy.active = [a for a in self.policy.active if a.action is not act]
            return rec
        if isinstance(act, Revert):
            undo = self.actuators.placed.get((act.src, act.dst))
            rec, undone = self.actuators.revert(act, inputs)
            if not undone and undo is not None:
                # still in place: keep it in the active list (the controller reverts it again)
                orig = next((a for t, a in reversed(self.policy.decisions)
                             if isinstance(a, (MigrateLayers, MigrateAttention))
                             and (a.src, a.dst) == (act.src, act.dst)), None)  # fmt: skip
                if orig is not None:
                    self.policy.active.append(_Active(orig, self.clock() - self._t0))
            return rec
        return self._record(type(act).__name__, inputs, "unknown_action")

    def flip(self, inst: InstanceState, new_role: str, inputs: dict | None = None) -> dict:
        """Drain ``inst`` out of the router, switch its role, add it back; rolls back on a
        failed step. Returns the decision record."""
        inputs = inputs or {"action": {"type": "FlipRole", "idx": inst.idx, "new_role": new_role}}
        old = inst.mode
        pred = self.config.flip_cost_s
        if new_role not in ROLES or old not in ROLES or old == new_role:
            return self._record(
                "FlipRole",
                inputs,
                "refused",
                predicted_s=pred,
                detail=f"cannot flip {inst.url} from {old} to {new_role}",
            )
        same = [i for i in self.instances
                if i is not inst and not i.dead and i.router_role == old]  # fmt: skip
        if not same:
            return self._record(
                "FlipRole",
                inputs,
                "refused",
                predicted_s=pred,
                detail=f"{inst.url} is the last {old} worker in the router",
            )
        t0 = time.perf_counter()
        try:
            self.router.remove(inst.url, old)
        except BanaserveError as exc:
            return self._record(
                "FlipRole", inputs, "failed", predicted_s=pred, detail=f"router remove: {exc}"
            )
        inst.router_role = None
        handed_off = self._hand_off(inst)
        drained = self._wait_idle(inst)
        t_drain = time.perf_counter() - t0
        if not drained:
            self._rollback(inst, old)
            return self._record(
                "FlipRole",
                inputs,
                "rolled_back",
                predicted_s=pred,
                measured_s=t_drain,
                detail="drain timed out",
            )
        t1 = time.perf_counter()
        try:
            status, ans = inst.client.role_switch(new_role)
        except BanaserveError as exc:
            status, ans = 0, {"message": str(exc), "safe_to_restore": True}
        t_switch = time.perf_counter() - t1
        costs = {"drain_s": t_drain, "switch_s": t_switch, "handed_off": handed_off}
        if status != 200 or not ans.get("success"):
            if ans.get("safe_to_restore", False) or self._mode_now(inst) == old:
                self._rollback(inst, old)
                outcome = "rolled_back"
            else:
                inst.dead = True
                outcome = "instance_unhealthy"
            return self._record("FlipRole", inputs, outcome, predicted_s=pred,
                                measured_s=t_drain + t_switch, costs=costs,
                                detail=str(ans.get("message")))  # fmt: skip
        try:
            self.router.add(inst.url, new_role, inst.client.spec.bootstrap_port)
            inst.router_role = new_role
        except BanaserveError as exc:
            # back to the old role, so the router's view and the instance's agree
            inst.client.role_switch(old)
            self._rollback(inst, old)
            return self._record(
                "FlipRole",
                inputs,
                "rolled_back",
                predicted_s=pred,
                costs=costs,
                detail=f"router add: {exc}",
            )
        total = time.perf_counter() - t0
        self.flip_seconds.append(t_drain + t_switch)
        if inst.current is not None:
            inst.current["mode"] = new_role
        return self._record(
            "FlipRole",
            inputs,
            "ok",
            predicted_s=pred,
            measured_s=t_drain + t_switch,
            costs=costs | {"total_s": total},
        )

    def _watch(self) -> list[dict]:
        """A lost layer server: the donor is back on its own layers (``keep_local``); one that
        cannot be (its layers are gone) is out of the router and the views until restarted."""
        out = []
        for (s, d), why, rolled_back in self.actuators.watch():
            self.policy.active = [a for a in self.policy.active
                                  if (a.action.src, a.action.dst) != (s, d)]  # fmt: skip
            inst = self.instances[s]
            outcome = "rolled_back" if rolled_back else "taken_out"
            if not rolled_back:
                inst.unusable = why
            if not rolled_back and inst.router_role is not None:
                try:
                    self.router.remove(inst.url, inst.router_role)
                    inst.router_role = None
                except BanaserveError as exc:
                    outcome = f"remove_failed: {exc}"
            out.append(self._record("LayersLost", {"src": inst.url, "dst": self.instances[d].url},
                                    outcome, detail=why))  # fmt: skip
        return out

    def _mode_now(self, inst: InstanceState) -> str | None:
        try:
            return str(inst.client.signals().get("mode"))
        except BanaserveError:
            return None

    def _hand_off(self, inst: InstanceState) -> int | None:
        """Drain step: ask the router to move the instance's running hand-off requests to
        other instances now (docs/handoff.md) instead of waiting for them; None when the router
        cannot (no hand-off path, or the call failed): the drain waits for them to finish, as it
        does for requests not on the hand-off path."""
        try:
            return self.router.hand_off(inst.url)
        except BanaserveError as exc:
            log.warning("hand-off of %s's requests failed, waiting for them: %s", inst.url, exc)
            return None

    def _wait_idle(self, inst: InstanceState) -> bool:
        deadline = time.monotonic() + self.config.drain_timeout_s
        idle_since: float | None = None
        while time.monotonic() < deadline:
            try:
                s = inst.client.signals()
                idle = bool(s.get("idle")) and not s.get("waiting") and not s.get("running")
            except BanaserveError:
                idle = False
            now = time.monotonic()
            if not idle:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.config.settle_s:
                return True
            time.sleep(0.05)
        return False

    def _rollback(self, inst: InstanceState, old: str) -> None:
        for _ in range(3):
            try:
                self.router.add(inst.url, old, inst.client.spec.bootstrap_port)
                inst.router_role = old
                return
            except BanaserveError as exc:
                log.warning("rollback of %s to %s failed: %s", inst.url, old, exc)
                time.sleep(0.2)
        # the next window's repair step puts it back once the router answers

    # -- records -----------------------------------------------------------------------------
    def _record(self, action: str, inputs: dict, outcome: str, *, predicted_s: float | None = None,
                measured_s: float | None = None, costs: dict | None = None,
                detail: str | None = None) -> dict:  # fmt: skip
        rec: dict[str, Any] = {
            "t": round(time.time(), 3), "window": self.ticks, "action": action,
            "inputs": inputs, "predicted_cost_s": predicted_s, "measured_cost_s": measured_s,
            "outcome": outcome,
        }  # fmt: skip
        if costs:
            rec["costs"] = costs
        if detail:
            rec["detail"] = detail
        key = (action, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.recent.append(rec)
        line = json.dumps(rec, default=str)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        log.info("decision %s", line)
        return rec

    def status(self) -> dict:
        return {
            "router": self.config.router, "window": self.ticks,
            "instances": [i.row() for i in self.instances],
            "recent": [{k: r.get(k) for k in ("t", "window", "action", "outcome",
                                               "measured_cost_s", "detail")}
                       for r in list(self.recent)[-10:]],
            "flip_seconds": self.flip_seconds[-20:],
            "link_costs": self.link_report,
            "migrations": [{"src": s, "dst": d} | p
                           for (s, d), p in self.actuators.placed.items()],
        }  # fmt: skip

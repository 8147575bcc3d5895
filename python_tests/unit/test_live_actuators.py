# SPDX-License-Identifier: Apache-2.0
"""The controller's migration actuators with fake instances and router (no SGLang): which call
goes to which server with which target, what a failure leaves in the controller's active list,
and the link costs from a file. The real mechanism runs in
python_tests/sglang/test_sglang_live_migrate.py."""

from __future__ import annotations

import json

import pytest

from banaserve_ext.control import BanaServeConfig, InstanceView, MigrateLayers
from banaserve_ext.control.banaserve import BanaServeController
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.live.actuators import Targets, parse_target
from banaserve_ext.live.calibrate import load_link_costs
from banaserve_ext.live.clients import InstanceSpec
from banaserve_ext.live.controller import LiveConfig, LiveController

P0, P1, D0 = "http://p0:1", "http://p1:1", "http://d0:1"


class FakeServer:
    """One SGLang instance's admin channel: signals with a settable busy share, the migration
    kinds with a recorded call log."""

    def __init__(self, url: str, mode: str) -> None:
        self.url, self.mode = url, mode
        self.busy_s = 0.0
        self.t = 0.0
        self.split: dict | None = None
        self.splits: list[dict] = []
        self.calls: list[dict] = []
        self.fail_layers = False
        self.back_fails = False
        #: the layer server of this server's split is gone (found at the next step)
        self.lost = False
        self.waiting = 0
        #: requests that finish between the status read and the ``kv`` call (404)
        self.finishing: set[str] = set()

    def step(self, util: float) -> None:
        self.t += 1.0
        self.busy_s += util

    def handle(self, body: dict) -> tuple[int, dict]:
        self.calls.append(body)
        kind = body["kind"]
        if kind == "layers_status":
            failed = "layer server lost" if self.lost and self.split is not None else None
            return 200, {"split": self.split is not None, "blocked": None, "failed": failed}
        if kind == "layers":
            if self.fail_layers:
                return 503, {"error": "layer server unreachable"}
            self.split = body
            return 200, {"moved": {"total_s": 0.02, "transfer_s": 0.01}, "duration_ms": 25.0}
        if kind == "layers_back":
            if self.back_fails:
                return 503, {"error": "cannot migrate back: layer server lost"}
            if self.split is None:
                return 400, {"error": "no layers are migrated"}
            self.split, self.lost = None, False
            return 200, {"moved": {"total_s": 0.03}, "split_steps": 7}
        if kind == "kv_splits":
            return 200, {"blocked": None if self.mode == "decode" else "radix", "splits":
                         self.splits}  # fmt: skip
        if kind == "status":
            return 200, {"running": [{"rid": "a", "kv_committed_len": 10},
                                     {"rid": "b", "kv_committed_len": 30}]}  # fmt: skip
        if kind == "kv":
            if body["rid"] in self.finishing:
                return 404, {"error": f"no running request with rid {body['rid']!r}"}
            self.splits.append({"rid": body["rid"], "peer": body["peer"], "start": 0, "end": 5})
            return 200, {"duration_ms": 5.0, "bytes": 100}
        if kind == "kv_back":
            self.splits = [s for s in self.splits if s["rid"] != body["rid"]]
            return 200, {"duration_ms": 2.0, "bytes": 100}
        raise AssertionError(kind)

    def signals(self) -> dict:
        return {"t": self.t, "started": 1.0, "busy_s": self.busy_s, "decode_s": 0.0,
                "decode_attn_s": 0.0, "mode": self.mode, "kv_total": 100, "kv_used": 10,
                "idle": False, "waiting": self.waiting, "running": 1}  # fmt: skip


class FakeRouter:
    def __init__(self, servers: dict[str, FakeServer]) -> None:
        self.servers = servers
        self.removed: list[str] = []

    def workers(self) -> list[dict]:
        return [{"url": u, "worker_type": s.mode, "active_requests": 0}
                for u, s in self.servers.items() if u not in self.removed]  # fmt: skip

    def remove(self, url: str, role: str | None = None) -> None:
        self.removed.append(url)


class FakeClient:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.spec = InstanceSpec(server.url, 9)

    @property
    def url(self) -> str:
        return self.server.url

    def signals(self) -> dict:
        return self.server.signals()


def _controller(targets: Targets) -> tuple[LiveController, dict]:
    servers = {u: FakeServer(u, m) for u, m in ((P0, "prefill"), (P1, "prefill"),
                                                 (D0, "decode"))}  # fmt: skip
    cfg = LiveConfig(
        router="http://r:1", instances=tuple(InstanceSpec(u, 9) for u in servers),
        control=BanaServeConfig(flip_high=0.99, flip_low=0.98, high=0.3, low=0.1, persist=2,
                                cooldown_s=0.0, flip_cost_s=1.0),
        total_layers=4, weight_bytes_per_layer=1000, kv_bytes_per_token_layer=10,
        targets=targets,
    )  # fmt: skip
    ctl = LiveController(cfg, clock=lambda: float(servers[P0].t))
    ctl.router = FakeRouter(servers)  # type: ignore[assignment]
    for inst in ctl.instances:
        inst.client = FakeClient(servers[inst.url])  # type: ignore[assignment]
    ctl.actuators.call = lambda url, body, timeout_s=0: servers[url].handle(body)
    ctl.actuators.clock = lambda: float(servers[P0].t)
    return ctl, servers


def _run(ctl: LiveController, servers: dict, utils: dict[str, float], n: int) -> list[dict]:
    recs = []
    for _ in range(n):
        for u, s in servers.items():
            s.step(utils[u])
        recs += ctl.tick()
    return recs


def test_layer_migration_goes_to_the_receivers_layer_server_and_comes_back() -> None:
    targets = Targets(layer_servers=((P0, "127.0.0.1:7000"), (P1, "127.0.0.1:7001")))
    ctl, servers = _controller(targets)
    recs = _run(ctl, servers, {P0: 0.95, P1: 0.05, D0: 0.1}, 5)
    mig = [r for r in recs if r["action"] == "MigrateLayers"]
    assert len(mig) == 1 and mig[0]["outcome"] == "ok", recs
    # P0 is the hot one: it hands its last layers to P1's layer server
    assert servers[P0].split == {"kind": "layers", "first": 4 - mig[0]["inputs"]["action"]
                                 ["layers"], "host": "127.0.0.1", "port": 7001,
                                 "keep_local": True}  # fmt: skip
    assert mig[0]["predicted_cost_s"] == mig[0]["inputs"]["action"]["latency_s"]
    assert mig[0]["measured_cost_s"] == 0.02
    assert [a.action for a in ctl.policy.active] == [MigrateLayers(**{
        k: v for k, v in mig[0]["inputs"]["action"].items() if k != "type"})]  # fmt: skip
    assert ctl.status()["migrations"][0]["target"] == "127.0.0.1:7001"
    # the imbalance reverses: the layers come back from P0's split
    recs = _run(ctl, servers, {P0: 0.05, P1: 0.95, D0: 0.1}, 5)
    rev = [r for r in recs if r["action"] == "Revert"]
    assert rev and rev[0]["outcome"] == "ok" and rev[0]["inputs"]["kind"] == "layers", recs
    assert servers[P0].split is None and {"kind": "layers_back"} in servers[P0].calls
    # (then P1, now the hot one, may lend to P0: nothing of P0's split is active any more)
    assert all(a.action.src == 1 for a in ctl.policy.active)


def test_a_failed_layer_migration_leaves_nothing_active() -> None:
    targets = Targets(layer_servers=((P1, "127.0.0.1:7001"),))
    ctl, servers = _controller(targets)
    servers[P0].fail_layers = True
    recs = _run(ctl, servers, {P0: 0.95, P1: 0.05, D0: 0.1}, 8)
    mig = [r for r in recs if r["action"] == "MigrateLayers"]
    assert mig and mig[0]["outcome"] == "failed" and "nothing moved" in mig[0]["detail"]
    assert not ctl.policy.active and not ctl.actuators.placed
    # the target is not offered again for suspend_s (30 windows here): no retry storm
    assert len(mig) == 1 and ctl.views()[1].can_receive == ()
    servers[P0].fail_layers = False
    recs = _run(ctl, servers, {P0: 0.95, P1: 0.05, D0: 0.1}, 30)
    assert [r["outcome"] for r in recs if r["action"] == "MigrateLayers"] == ["ok"]


def test_lost_layer_server_rolls_the_donor_back_onto_its_own_layers() -> None:
    targets = Targets(layer_servers=((P1, "127.0.0.1:7001"),))
    ctl, servers = _controller(targets)
    _run(ctl, servers, {P0: 0.95, P1: 0.05, D0: 0.1}, 3)
    assert ctl.actuators.placed and servers[P0].split is not None
    servers[P0].lost = True  # the layer server died; P0's next step found it
    recs = _run(ctl, servers, {P0: 0.5, P1: 0.05, D0: 0.1}, 1)
    lost = [r for r in recs if r["action"] == "LayersLost"]
    assert lost and lost[0]["outcome"] == "rolled_back" and "lost" in lost[0]["detail"]
    assert servers[P0].split is None and not ctl.policy.active and not ctl.actuators.placed
    assert P0 not in ctl.router.removed and not ctl.instances[0].unusable  # type: ignore[attr-defined]


def test_lost_layers_that_cannot_come_back_take_the_donor_out_of_rotation() -> None:
    targets = Targets(layer_servers=((P1, "127.0.0.1:7001"),))
    ctl, servers = _controller(targets)
    _run(ctl, servers, {P0: 0.95, P1: 0.05, D0: 0.1}, 3)
    assert ctl.actuators.placed
    servers[P0].lost = True
    servers[P0].back_fails = True
    recs = _run(ctl, servers, {P0: 0.5, P1: 0.05, D0: 0.1}, 1)
    lost = [r for r in recs if r["action"] == "LayersLost"]
    assert lost and lost[0]["outcome"] == "taken_out" and "lost" in lost[0]["detail"]
    assert P0 in ctl.router.removed and not ctl.policy.active  # type: ignore[attr-defined]
    assert P0 not in {v.idx for v in ctl.views()} and ctl.instances[0].unusable
    # the repair step does not put it back while its layers are lost
    recs = _run(ctl, servers, {P0: 0.0, P1: 0.05, D0: 0.1}, 2)
    assert not [r for r in recs if r["action"] == "readd"]


def test_no_layer_migration_is_planned_without_a_target() -> None:
    ctl, servers = _controller(Targets())
    recs = _run(ctl, servers, {P0: 0.95, P1: 0.05, D0: 0.1}, 5)
    assert not [r for r in recs if r["action"].startswith("Migrate")], recs
    views = ctl.views()
    assert all(v.can_receive == () for v in views)
    assert [v.can_send for v in views] == [("layers",), ("layers",), ("layers", "attention")]


def test_attention_migration_moves_running_requests_to_the_receivers_peer() -> None:
    c = BanaServeController(4, 1000, 10, BanaServeConfig(persist=1, cooldown_s=0.0,
                                                         flip_cost_s=1.0))  # fmt: skip
    hot = InstanceView(0, "decode", 0.95, kv_tokens=100, attn_share=0.8)
    cold = InstanceView(1, "prefill", 0.05, can_receive=("layers",))
    assert c.plan([hot, cold], 0.0) == []  # the idle one has no attention peer
    targets = Targets(attn_peers=((P1, "127.0.0.1:7101"),))
    ctl, servers = _controller(targets)
    from banaserve_ext.control import MigrateAttention

    act = MigrateAttention(src=2, dst=1, fraction=0.5, latency_s=0.01)
    rec = ctl._execute(act, [])
    assert rec["outcome"] == "ok" and rec["costs"]["requests"] == 2
    assert [b["peer"] for b in servers[D0].calls if b["kind"] == "kv"] == ["127.0.0.1:7101"] * 2
    from banaserve_ext.control import Revert

    ctl.policy.active.clear()
    rec = ctl._execute(Revert(2, 1), [])
    assert rec["outcome"] == "ok" and servers[D0].splits == []


def test_a_request_finishing_before_it_moves_is_not_a_failure() -> None:
    """A running request that ends between the status read and its ``kv`` call (404) is
    reported as finished: the others still move, and a target that moved nothing only because
    the requests ended is not suspended."""
    from banaserve_ext.control import MigrateAttention

    ctl, servers = _controller(Targets(attn_peers=((P1, "127.0.0.1:7101"),)))
    servers[D0].finishing = {"b"}
    rec = ctl._execute(MigrateAttention(src=2, dst=1, fraction=0.5, latency_s=0.01), [])
    assert rec["outcome"] == "ok" and rec["costs"]["requests"] == 1
    assert rec["inputs"]["requests"]["b"]["outcome"] == "request_finished"
    servers[D0].splits.clear()
    ctl.actuators.placed.clear()
    servers[D0].finishing = {"a", "b"}
    rec = ctl._execute(MigrateAttention(src=2, dst=1, fraction=0.5, latency_s=0.01), [])
    assert rec["outcome"] == "failed" and rec["detail"] == "no running request to move"
    assert "127.0.0.1:7101" not in ctl.actuators._suspended


def test_targets_and_link_costs_are_checked(tmp_path) -> None:
    assert parse_target("http://a:1/=127.0.0.1:5") == ("http://a:1", "127.0.0.1:5")
    for bad in ("a=1:2", "http://a:1", "http://a:1=host"):
        with pytest.raises(InvalidArgumentError):
            parse_target(bad)
    with pytest.raises(InvalidArgumentError, match="not one of"):
        Targets(layer_servers=(("http://x:1", "h:1"),)).validate({P0})
    with pytest.raises(InvalidArgumentError, match="share one attention peer"):
        Targets(attn_peers=((P0, "h:1"), (P1, "h:1"))).validate({P0, P1})
    f = tmp_path / "links.json"
    f.write_text(json.dumps({"layer_link": {"fixed_s": 0.004, "bandwidth_Bps": 2e9}}))
    links = load_link_costs(f)
    assert links["layer_link"].seconds(2e9) == pytest.approx(1.004)
    f.write_text(json.dumps({"layer_link": {"bandwidth_Bps": 2e9}}))
    with pytest.raises(InvalidArgumentError, match="fixed_s"):
        load_link_costs(f)
    f.write_text(json.dumps({"layer_link": {"fixed_s": 0.0, "bandwidth_Bps": 0}}))
    with pytest.raises(InvalidArgumentError, match="bandwidth"):
        load_link_costs(f)


def test_cli_takes_targets_and_link_costs(tmp_path) -> None:
    import argparse

    from banaserve_ext.live import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    f = tmp_path / "links.json"
    f.write_text(json.dumps({"attention_link": {"fixed_s": 0.001, "bandwidth_Bps": 1e9}}))
    args = p.parse_args(["--router", "http://r:1", "--instance", f"{P0},5", "--instance",
                         f"{P1},6", "--layer-server", f"{P1}=127.0.0.1:7001", "--attn-target",
                         f"{P0}=127.0.0.1:7100", "--link-costs", str(f)])  # fmt: skip
    cfg = cli.config_from_args(args)
    cfg.validate()
    assert cfg.targets.layer_server(P1) == "127.0.0.1:7001" and cfg.targets.attn_peer(P0)
    assert cfg.link_costs == f and not cfg.calibrate
    args = p.parse_args(["--router", "http://r:1", "--instance", f"{P0},5", "--attn-peer",
                         "127.0.0.1:7100", "--attn-target", f"{P0}=127.0.0.1:7100"])  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="give each role its own"):
        cli.config_from_args(args).validate()


def test_a_prefill_server_with_a_queue_counts_as_saturated() -> None:
    """A long prefill that spans the window adds no busy time until it ends: a prefill server
    with requests waiting is busy whatever its finished forward passes say (a launch run flipped
    such a server to decode on 'util 0.00' and drained its queue for 105 s)."""
    ctl, servers = _controller(Targets())
    servers[P0].waiting = 5
    _run(ctl, servers, {P0: 0.0, P1: 0.0, D0: 0.5}, 2)
    views = {v.idx: v for v in ctl.views()}
    assert views[0].util == 1.0 and views[0].queue_len == 5 and views[0].running == 1
    assert views[1].util == 0.0 and views[1].queue_len == 0
    servers[P0].waiting = 0
    _run(ctl, servers, {P0: 0.0, P1: 0.0, D0: 0.5}, 1)
    assert ctl.views()[0].util == 0.0

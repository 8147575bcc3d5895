# SPDX-License-Identifier: Apache-2.0
"""Every named system end to end on trace slices, and the controllers acting in the simulator."""

from __future__ import annotations

from dataclasses import replace

import pytest

from banaserve_ext.control import HandoffCost, LlumnixMigrator, measured_costs
from banaserve_ext.sim import TraceRequest, get_model
from banaserve_ext.sim.metrics import Slo, tbt_gaps
from banaserve_ext.sim.systems import (
    SYSTEMS,
    LlumnixActuator,
    Setup,
    build,
    load_workload,
    make_cost,
    simulate,
)

M = get_model("llama-3.1-8b")
COST = make_cost(M, "h100", 1)


DEFAULT_SLO = Slo(1.0, 0.1)


def _setup(n: int = 4, slo: Slo = DEFAULT_SLO, hashes: bool = False) -> Setup:
    return Setup(M, "h100", 1, n, slo, COST, hashes)


@pytest.mark.parametrize("system", SYSTEMS)
def test_system_runs_every_request(system: str) -> None:
    trace = load_workload("azure-conv", 300, 12.0)
    res, sim = simulate(system, _setup(), trace)
    assert res["requests"] == 300
    assert all(r.t_first >= r.arrival and r.t_done >= r.t_first for r in sim.finished)
    assert sum(i.tokens_decoded for i in sim.instances) == sum(r.output_len - 1 for r in trace)
    assert all(i.pool.used == 0 for i in sim.instances)
    assert all(i.load.active_requests == 0 for i in sim.instances), system


def test_unknown_system() -> None:
    from banaserve_ext.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="unknown system"):
        build("orca", _setup())


def test_banaserve_initial_split_follows_work_ratio() -> None:
    from banaserve_ext.sim.systems import initial_prefill_instances

    assert initial_prefill_instances(COST, 8, 12000, 20) == 7  # prefill-heavy
    assert initial_prefill_instances(COST, 8, 200, 1500) == 1  # decode-heavy


def test_mooncake_slice_with_global_store() -> None:
    trace = load_workload("mooncake-conv", 300, 2.0)
    res, sim = simulate("banaserve", _setup(hashes=True), trace)
    assert sim.global_store is not None and sim.global_store.hit_blocks > 0
    assert res["requests"] == 300


def _prefill_heavy(n: int, rate: float) -> list[TraceRequest]:
    return [TraceRequest(i, i / rate, 6000, 4) for i in range(n)]


def test_banaserve_flips_a_decode_instance_to_prefill() -> None:
    trace = _prefill_heavy(1500, 30.0)
    # a bad initial split; a short warm-up for a 50 s trace
    start = replace(_setup(n=4, slo=Slo(0.5, 0.1)), pd_prefill=2, warmup_s=5.0)
    _, sim = simulate("banaserve", start, trace)
    flips = [d for _, w, d in sim.events_log if w == "control" and d.startswith("flip")]
    assert any(d.endswith("->prefill done") for d in flips), sim.events_log
    drains = [d for _, w, d in sim.events_log if w == "control" and d.startswith("drain ")]
    assert drains and all("prefill queueing" in d for d in drains)
    # nothing inside the warm-up; the switch itself takes the measured flip cost
    assert all(t >= 5.0 for t, w, _ in sim.events_log if w == "control")
    static, _ = simulate("distserve", replace(_setup(n=4, slo=Slo(0.5, 0.1)), pd_prefill=2), trace)
    dyn, _ = simulate("banaserve", start, trace)
    assert dyn["ttft_ms_mean"] < static["ttft_ms_mean"]


def test_semipd_moves_sms_to_the_violating_prefill() -> None:
    trace = _prefill_heavy(800, 20.0)
    _, sim = simulate("semi-pd", _setup(n=2, slo=Slo(0.3, 0.5)), trace)
    shares = [i.load.extra["sm_share"] for i in sim.instances if "sm_share" in i.load.extra]
    assert shares and all(s > 0.5 for s in shares)


def test_dynaserve_splits_requests_across_instances() -> None:
    trace = [TraceRequest(i, i * 0.05, 500, 600) for i in range(200)]
    res, sim = simulate("dynaserve", _setup(n=4, slo=Slo(1.0, 0.05)), trace)
    assert res["split_requests"] > 0
    moved = [r for r in sim.finished if r.seg2]
    assert moved and all(r.dinst is not r.pinst for r in moved)
    assert sum(i.tokens_decoded for i in sim.instances) == sum(r.output_len - 1 for r in trace)


def test_dynaserve_charges_the_measured_handoff_cost() -> None:
    """The hand-off of segment 2 costs the measured store overhead on top of the link time:
    with a 3 s fixed cost every moved request has one gap of >= 3 s between its tokens (the
    splitter is left uncharged here so that it still splits)."""
    trace = [TraceRequest(i, i * 0.05, 500, 600) for i in range(200)]
    assert measured_costs().handoff is not None  # the simulator charges the measured one
    sim = build("dynaserve", _setup(n=4, slo=Slo(1.0, 0.05)))
    sim.cfg = replace(sim.cfg, handoff_cost=HandoffCost(fixed_s=3.0, per_token_s=0.0))
    sim.splitter.handoff = None
    reqs = sim.run(trace)
    moved = [r for r in reqs if r.seg2]
    assert moved and all(tbt_gaps(r).max() >= 3.0 for r in moved)
    assert all(tbt_gaps(r).max() < 3.0 for r in reqs if not r.seg2 and len(tbt_gaps(r)))


def test_llumnix_migration_keeps_every_token() -> None:
    trace = [TraceRequest(i, 0.0 if i < 40 else 5.0, 300, 400 if i % 2 else 30) for i in range(60)]
    sim = build("llumnix", _setup(n=2))
    sim.controller = LlumnixActuator(LlumnixMigrator(gap=0.01, per_tick=4))
    sim.policy = __import__("banaserve_ext.policies", fromlist=["make_policy"]).make_policy(
        "round_robin"
    )
    reqs = sim.run(trace)
    assert sim.controller.migrated > 0
    assert sum(i.tokens_decoded for i in sim.instances) == sum(r.output_len - 1 for r in reqs)
    assert all(i.pool.used == 0 for i in sim.instances)

# SPDX-License-Identifier: Apache-2.0
"""BanaServe's queue-driven role flip, warm-up, reasons, measured costs and starting split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banaserve_ext.control import (
    BanaServeConfig,
    BanaServeController,
    FlipRole,
    InstanceView,
    MigrateLayers,
    WorkloadProfile,
    choose_prefill_count,
    measured_costs,
)
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.sim import get_model

M = get_model("llama-3.1-8b")


def _ctrl(**kw) -> BanaServeController:
    kw.setdefault("flip_queue_s", 1.0)
    kw.setdefault("flip_persist", 3)
    kw.setdefault("flip_cost_s", 5.0)
    kw.setdefault("cooldown_s", 0.0)
    return BanaServeController(
        M.layers, M.weight_bytes_per_layer, M.kv_bytes_per_token_layer, BanaServeConfig(**kw)
    )


def _views(q: list[float], util: list[float], roles: list[str]) -> list[InstanceView]:
    return [
        InstanceView(
            i,
            r,
            u,
            0.1,
            10_000,
            M.layers,
            0.5 if r == "decode" else 0.0,
            queue_len=int(d * 10),
            queue_delay_s=d,
        )
        for i, (d, u, r) in enumerate(zip(q, util, roles, strict=True))
    ]


ROLES = ["prefill", "prefill", "decode", "decode", "decode"]


def test_flip_needs_a_persistent_queue_and_names_why() -> None:
    c = _ctrl()
    hot = _views([4.0, 3.0, 0.0, 0.0, 0.1], [1.0, 1.0, 0.3, 0.4, 0.2], ROLES)
    assert c.plan(hot, 0.0) == [] and c.plan(hot, 1.0) == []
    (act,) = c.plan(hot, 2.0)
    assert isinstance(act, FlipRole) and act.new_role == "prefill"
    assert act.idx == 2  # the decode instance with the shortest queue, then the idlest
    assert "prefill queueing 3.50 s > 1.00 s for 3 windows" in act.reason
    assert "flip cost 5.0 s" in act.reason and act.cost_s == 5.0


def test_a_queue_that_clears_resets_the_count() -> None:
    c = _ctrl()
    hot = _views([4.0, 3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.3, 0.3, 0.3], ROLES)
    calm = _views([0.0] * 5, [0.5] * 5, ROLES)
    for t, v in enumerate([hot, hot, calm, hot, hot]):
        assert c.plan(v, float(t)) == []


def test_no_flip_when_the_donor_tier_is_busy_or_the_queue_too_small_for_its_cost() -> None:
    busy = _views([4.0, 3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.8, 0.8, 0.8], ROLES)
    c = _ctrl()
    assert all(c.plan(busy, float(t)) == [] for t in range(6))
    # a 1.2 s queue over two prefill instances is not worth a 30 s role switch
    small = _views([1.2, 1.2, 0.0, 0.0, 0.0], [1.0, 1.0, 0.2, 0.2, 0.2], ROLES)
    c2 = _ctrl(flip_cost_s=30.0)
    assert all(c2.plan(small, float(t)) == [] for t in range(6))
    c3 = _ctrl(flip_cost_s=1.0)
    assert any(c3.plan(small, float(t)) for t in range(6))


def test_decode_pressure_flips_a_prefill_instance() -> None:
    c = _ctrl()
    v = _views([0.0, 0.1, 2.0, 3.0, 2.5], [0.2, 0.3, 1.0, 1.0, 1.0], ROLES)
    acts = [a for t in range(3) for a in c.plan(v, float(t))]
    assert acts and acts[0].new_role == "decode" and acts[0].idx == 0


def test_nothing_inside_warm_up() -> None:
    c = _ctrl(warmup_s=60.0, persist=1)
    hot = _views([4.0, 3.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.3, 0.3, 0.3], ROLES)
    assert all(c.plan(hot, float(t)) == [] for t in range(60))
    assert c.plan(hot, 60.0) != []


def test_migrations_carry_a_reason_and_use_the_measured_link() -> None:
    link = measured_costs().layer_link
    c = _ctrl(persist=1, flip_queue_s=None, budget_s=5.0, layer_link=link)
    (act,) = c.plan(_views([0.0] * 2, [0.95, 0.1], ["prefill", "prefill"]), 0.0)
    assert isinstance(act, MigrateLayers)
    assert "util 0.95 on 0 vs 0.10 on 1" in act.reason and "LinkCost" in act.reason
    assert act.latency_s == pytest.approx(
        link.seconds(act.layers * (M.weight_bytes_per_layer + M.kv_bytes_per_token_layer * 10_000))
    )


def test_costs_file_is_read_and_checked(tmp_path: Path) -> None:
    costs = measured_costs()
    assert costs.flip_cost_s > 0 and "source" not in costs.sources  # per-entry notes only
    assert set(costs.sources) == {"flip_cost_s", "layer_link", "attention_link", "handoff"}
    ho = costs.handoff
    assert ho is not None and ho.seconds(1000) == pytest.approx(ho.fixed_s + 1000 * ho.per_token_s)
    assert "bench/handoff" in costs.sources["handoff"]
    good = {
        "flip_cost_s": {"value": 7.5, "source": "measured: drain 2.1 s + switch 5.4 s"},
        "layer_link": {"bandwidth_Bps": 1e9, "fixed_s": 0.001},
        "attention_link": {"bandwidth_Bps": 2e9, "fixed_s": 0.0},
    }
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(good))
    got = measured_costs(str(p))
    assert got.flip_cost_s == 7.5 and got.flip_measured
    assert got.layer_link.seconds(1e9) == pytest.approx(1.001)
    assert got.handoff is None  # optional entry
    with_handoff = dict(
        good,
        handoff={
            "fixed_s": 0.05,
            "per_token_s": 1e-5,
            "prefill_s_per_token": 1e-4,
            "decode_s_per_token": 0.01,
        },
    )
    p.write_text(json.dumps(with_handoff))
    assert measured_costs(str(p)).handoff.seconds(100) == pytest.approx(0.051)  # type: ignore[union-attr]
    with_handoff["handoff"] = {
        "fixed_s": -1.0,
        "per_token_s": 0.0,
        "prefill_s_per_token": 1e-4,
        "decode_s_per_token": 0.01,
    }
    p.write_text(json.dumps(with_handoff))
    with pytest.raises(InvalidArgumentError, match="handoff"):
        measured_costs(str(p))
    p.write_text(json.dumps({"flip_cost_s": {}}))
    with pytest.raises(InvalidArgumentError, match="malformed"):
        measured_costs(str(p))


def test_starting_split_follows_the_workload() -> None:
    def step(b: int, ctx: int) -> float:  # 10 ms + 0.1 ms per request
        return 0.010 + 0.0001 * b

    # prefill-heavy: 1 s of prefill per request at 2 req/s needs most instances on prefill
    heavy = WorkloadProfile(rate=2.0, prefill_s=1.0, out_tokens=20, context_tokens=4000)
    p, why = choose_prefill_count(8, heavy, step, 0.1, 1_000_000)
    assert p >= 5 and f"best P={p}" in why
    # decode-heavy: tiny prompts, long outputs
    light = WorkloadProfile(rate=20.0, prefill_s=0.01, out_tokens=2000, context_tokens=2000)
    p2, _ = choose_prefill_count(8, light, step, 0.1, 1_000_000)
    assert p2 <= 2
    with pytest.raises(InvalidArgumentError):
        choose_prefill_count(1, heavy, step, 0.1, 1)

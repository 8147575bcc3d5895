# SPDX-License-Identifier: Apache-2.0
"""The controllers as plain objects: decisions from views, no simulator involved."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext.control import (
    BanaServeConfig,
    BanaServeController,
    DynaServeSplitter,
    FlipRole,
    InstanceView,
    LinkCost,
    LlumnixMigrator,
    LoadView,
    MigrateAttention,
    MigrateLayers,
    SemiPDController,
    with_handoff_cost,
)
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.sim import get_model

M = get_model("llama-3.1-8b")


def _ctrl(**kw) -> BanaServeController:
    return BanaServeController(
        M.layers, M.weight_bytes_per_layer, M.kv_bytes_per_token_layer, BanaServeConfig(**kw)
    )


def _views(u: list[float], roles: list[str] | None = None, kv: int = 10_000) -> list[InstanceView]:
    roles = roles or ["prefill"] * len(u)
    return [
        InstanceView(i, r, x, 0.1, kv, M.layers, 0.5 if r == "decode" else 0.0)
        for i, (x, r) in enumerate(zip(u, roles, strict=True))
    ]


def test_layer_migration_after_persistence_minimises_peak() -> None:
    c = _ctrl(persist=3, cooldown_s=5, budget_s=1.0, bandwidth_Bps=50e9)
    v = _views([0.95, 0.2, 0.5])
    assert c.plan(v, 0.0) == [] and c.plan(v, 1.0) == []
    (act,) = c.plan(v, 2.0)
    assert isinstance(act, MigrateLayers) and (act.src, act.dst) == (0, 1)
    # the plan equalises 0.95 - m and 0.2 + m (m = 0.95 k/32) as closely as whole layers allow
    k_best = min(range(1, 17), key=lambda k: max(0.95 * (1 - k / 32), 0.2 + 0.95 * k / 32))
    assert act.layers == k_best
    assert act.latency_s == pytest.approx(
        act.layers * (M.weight_bytes_per_layer + 10_000 * M.kv_bytes_per_token_layer) / 50e9 + 0.005
    )
    assert c.plan(v, 3.0) == []  # cool-down


def test_budget_limits_the_plan() -> None:
    one_layer = M.weight_bytes_per_layer / 50e9
    c = _ctrl(persist=1, budget_s=one_layer * 2.5 + 0.005, bandwidth_Bps=50e9)
    (act,) = c.plan(_views([0.95, 0.1], kv=0), 0.0)
    assert act.layers == 2
    c2 = _ctrl(persist=1, budget_s=one_layer * 0.5 + 0.005, bandwidth_Bps=50e9)
    assert c2.plan(_views([0.95, 0.1], kv=0), 0.0) == []


def test_hot_decode_gets_attention_migration() -> None:
    c = _ctrl(persist=1)
    (act,) = c.plan(_views([0.9, 0.1], ["decode", "decode"]), 0.0)
    assert isinstance(act, MigrateAttention) and act.src == 0 and act.dst == 1
    assert act.fraction == 0.5


def test_small_imbalance_does_nothing() -> None:
    c = _ctrl(persist=1)
    for t in range(5):
        assert c.plan(_views([0.5, 0.4, 0.45]), float(t)) == []


def test_role_flip_when_tiers_diverge() -> None:
    c = _ctrl(persist=2, cooldown_s=0)
    v = _views([0.95, 0.9, 0.1, 0.2], ["prefill", "prefill", "decode", "decode"])
    assert c.plan(v, 0.0) == []
    (act,) = c.plan(v, 1.0)
    assert isinstance(act, FlipRole) and (act.idx, act.new_role) == (2, "prefill")
    assert "util prefill 0.93" in act.reason and act.cost_s > 0
    # no flip when the donor tier would be overloaded after losing an instance
    c2 = _ctrl(persist=1, cooldown_s=0)
    v2 = _views([0.95, 0.95, 0.5, 0.5], ["prefill", "prefill", "decode", "decode"])
    assert not any(isinstance(a, FlipRole) for a in c2.plan(v2, 0.0))


def test_controller_config_validated() -> None:
    with pytest.raises(InvalidArgumentError):
        _ctrl(low=0.5, high=0.2)


def test_semipd_fit_recovers_model() -> None:
    a1, lam, b1 = 8.0, 20.0, 0.1
    xs = [30.0, 40.0, 50.0, 60.0, 70.0]
    samples = [(x, a1 / (x - lam) + b1) for x in xs]
    fit = SemiPDController.fit_ttft(samples)
    assert fit is not None
    pred = [fit[0] / (x - fit[1]) + fit[2] for x in xs]
    assert np.allclose(pred, [s[1] for s in samples], rtol=0.02)
    a2, b2 = SemiPDController.fit_tpot([(y, 3.0 / y + 0.02) for y in (30.0, 50.0, 70.0)])
    assert a2 == pytest.approx(3.0) and b2 == pytest.approx(0.02)


def test_semipd_algorithm1_steps_the_violating_phase() -> None:
    c = SemiPDController(ttft_slo_s=1.0, tpot_slo_s=0.1, step=5)
    assert c.update(50, ttft_p=2.0, tpot_p=0.05) == 55  # prefill violates: more SMs
    assert c.update(55, ttft_p=0.5, tpot_p=0.2) == 50  # decode violates: fewer for prefill
    assert c.update(50, ttft_p=2.0, tpot_p=0.2) == 50  # both: keep
    assert c.update(50, ttft_p=0.5, tpot_p=0.05) == 50  # neither: keep


def test_semipd_uses_fit_to_take_several_steps() -> None:
    c = SemiPDController(ttft_slo_s=0.55, tpot_slo_s=1.0, step=5, max_steps=8)
    for x in (30.0, 40.0, 50.0):
        c.samples_x.append((x, 8.0 / (x - 20.0) + 0.1))
    # est TTFT(x) <= 0.55 needs x >= 40 (35 gives 0.63); from 30 the loop takes two steps at once
    assert c.update(30.0, ttft_p=0.9, tpot_p=0.1) == 40.0


def test_dynaserve_split_balances_two_instances() -> None:
    sp = DynaServeSplitter(min_segment=8)
    views = [LoadView(0, 0.0, 0.0, 0.02), LoadView(1, 0.0, 2.0, 0.02)]
    plan = sp.split(prefill_s=0.2, out_tokens=400, views=views)
    assert plan.first == 0 and plan.second == 1

    def f(s: int) -> float:
        return (0.2 + s * 0.02) - (2.0 + (400 - s) * 0.02)

    assert f(plan.split_after) >= 0 > f(plan.split_after - 1)


def test_dynaserve_no_split_when_not_worth_it() -> None:
    sp = DynaServeSplitter()
    assert sp.split(0.1, 400, [LoadView(0, 0.0, 0.0, 0.02)]).second is None
    views = [LoadView(0, 0.0, 0.0, 0.02), LoadView(1, 30.0, 30.0, 0.02)]
    assert sp.split(0.1, 400, views).second is None  # the other instance is far busier
    assert sp.split(0.1, 10, views[:1] + [LoadView(1, 0, 0, 0.02)]).second is None


def test_handoff_cost_is_charged_to_b_and_moves_the_split_towards_a() -> None:
    sp = DynaServeSplitter(min_segment=8)
    views = [LoadView(0, 0.0, 0.0, 0.02), LoadView(1, 0.0, 2.0, 0.02)]
    charged = with_handoff_cost(views, 0.5)
    assert charged[0] == views[0]  # A (least backlog) pays nothing
    assert charged[1].prefill_backlog_s == 0.5 and charged[1].decode_backlog_s == 2.0
    free, paid = sp.split(0.2, 400, views), sp.split(0.2, 400, charged)
    assert (paid.first, paid.second) == (free.first, free.second) == (0, 1)
    assert paid.split_after > free.split_after  # B starts later, so A keeps more tokens
    # a hand-off dearer than the gain: no split
    assert sp.split(0.2, 400, with_handoff_cost(views, 60.0)).second is None
    assert with_handoff_cost(views, 0.0) == views
    with pytest.raises(InvalidArgumentError):
        with_handoff_cost(views, -1.0)


def test_llumnix_moves_from_fullest_to_emptiest() -> None:
    m = LlumnixMigrator(gap=0.2)
    views = [
        InstanceView(0, "colocated", 0.5, 0.9),
        InstanceView(1, "colocated", 0.5, 0.3),
        InstanceView(2, "colocated", 0.5, 0.1),
    ]
    (mig,) = m.plan(views)
    assert (mig.src, mig.dst) == (0, 2)
    assert (
        m.plan([InstanceView(0, "colocated", 0.5, 0.5), InstanceView(1, "colocated", 0.5, 0.4)])
        == []
    )


def test_link_cost_fit_recovers_fixed_and_bandwidth() -> None:
    truth = LinkCost(bandwidth_Bps=1.5e9, fixed_s=0.030)
    sizes = [2e6, 8e6, 32e6, 128e6]
    fit = LinkCost.fit(sizes, [truth.seconds(x) for x in sizes])
    assert fit.bandwidth_Bps == pytest.approx(1.5e9, rel=1e-9)
    assert fit.fixed_s == pytest.approx(0.030, rel=1e-9)
    assert fit.relative_error(64e6, truth.seconds(64e6)) == pytest.approx(0.0, abs=1e-12)


def test_link_cost_fit_with_negative_intercept_goes_through_origin() -> None:
    # time that grows faster than linearly from 0: the line's intercept is negative
    fit = LinkCost.fit([1.0, 2.0, 3.0], [1.0, 4.0, 9.0])
    assert fit.fixed_s == 0.0
    # weights 1/y^2: slope = sum(w x y) / sum(w x^2) = (1 + 8/16 + 27/81) / (1 + 4/16 + 9/81)
    assert fit.bandwidth_Bps == pytest.approx((1 + 4 / 16 + 9 / 81) / (1 + 8 / 16 + 27 / 81))


@pytest.mark.parametrize(
    ("sizes", "times"),
    [
        ([1.0], [1.0]),
        ([1.0, 1.0], [1.0, 2.0]),
        ([1.0, 2.0], [1.0]),
        ([1.0, 2.0], [0.0, 1.0]),
        ([1.0, 2.0], [2.0, 1.0]),
    ],
)
def test_link_cost_fit_refuses_what_it_cannot_fit(sizes: list[float], times: list[float]) -> None:
    with pytest.raises(InvalidArgumentError):
        LinkCost.fit(sizes, times)


def test_controller_uses_the_measured_link_of_each_mechanism() -> None:
    layer = LinkCost(bandwidth_Bps=1e9, fixed_s=0.03)
    attn = LinkCost(bandwidth_Bps=5e9, fixed_s=0.002)
    c = _ctrl(layer_link=layer, attention_link=attn)
    w, kvt = M.weight_bytes_per_layer, M.kv_bytes_per_token_layer
    assert c.layer_latency(2, 1000) == pytest.approx(0.03 + 2 * (w + kvt * 1000) / 1e9)
    kv_bytes = 0.5 * 1000 * kvt * M.layers
    assert c.attention_latency(0.5, 1000) == pytest.approx(0.002 + kv_bytes / 5e9)
    plain = _ctrl(bandwidth_Bps=50e9, sync_s=0.005)
    assert plain.layer_latency(1, 0) == pytest.approx(0.005 + w / 50e9)
    with pytest.raises(InvalidArgumentError):
        LinkCost(bandwidth_Bps=0.0)

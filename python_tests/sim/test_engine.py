# SPDX-License-Identifier: Apache-2.0
"""The event core against hand-computed timelines from the same cost model."""

from __future__ import annotations

import math

import pytest

from banaserve_ext.policies import make_policy
from banaserve_ext.sim import ClusterConfig, Simulator, TraceRequest, get_gpu, get_model
from banaserve_ext.sim.cost import load_fit_cost_model
from banaserve_ext.sim.metrics import Slo, goodput, summarize

M = get_model("llama-3.1-8b")
G = get_gpu("h100")


def _cost():
    return load_fit_cost_model(M, "h100", 1)


def _sim(**kw) -> Simulator:
    kw.setdefault("max_batched_tokens", 2048)
    cfg = ClusterConfig(M, G, 1, **kw)
    return Simulator(
        cfg,
        _cost(),
        policy=make_policy("round_robin"),
        decode_policy=make_policy("round_robin"),
        tick_s=0,
    )


def test_single_request_colocated_timeline() -> None:
    cost = _cost()
    r = TraceRequest(0, 1.0, 3000, 5)
    (out,) = _sim(n_colocated=1).run([r])
    # 3000 tokens in chunks of 2048 + 952, then 4 decode steps at growing context
    pre = cost.iteration_s([(2048, 0)], 0, 0) + cost.iteration_s([(952, 2048)], 0, 0)
    assert out.t_first == pytest.approx(1.0 + pre)
    dec = sum(cost.decode_step_s(1, 3000 + i) for i in range(1, 5))
    assert out.t_done - out.t_first == pytest.approx(dec, rel=1e-3)


def test_decode_macro_step_is_cut_by_arrival() -> None:
    cost = _cost()
    a = TraceRequest(0, 0.0, 100, 200)
    b = TraceRequest(1, 0.5, 100, 3)
    sim = _sim(n_colocated=1)
    ra, rb = sim.run([a, b])
    # b is admitted at the first iteration boundary after its arrival, not after a finishes
    assert rb.t_first - rb.arrival < 0.05
    assert rb.t_done < ra.t_done
    alone = _sim(n_colocated=1).run([a])[0]
    assert ra.t_done > alone.t_done  # a shared some steps with b
    step = cost.decode_step_s(1, 150)
    assert ra.t_done - alone.t_done < 10 * step


def test_pd_transfer_adds_exposed_time() -> None:
    cost = _cost()
    r = TraceRequest(0, 0.0, 4096, 3)
    sims = {}
    for lw in (True, False):
        sim = _sim(n_prefill=1, n_decode=1, layerwise_transfer=lw, link_gbps=10.0)
        sims[lw] = sim.run([r])[0]
    nbytes = 4096 * M.kv_bytes_per_token
    total = nbytes / 10e9
    dec = sum(cost.decode_step_s(1, 4096 + i) for i in range(1, 3))
    prefill = cost.iteration_s([(4096, 0)], 0, 0)
    exposed_lw = total / M.layers + max(0.0, total - prefill)
    assert sims[False].t_done - sims[False].t_first == pytest.approx(0.0005 + total + dec, rel=1e-3)
    assert sims[True].t_done - sims[True].t_first == pytest.approx(
        0.0005 + exposed_lw + dec, rel=1e-3
    )


def test_kv_capacity_limits_concurrency() -> None:
    reqs = [TraceRequest(i, 0.0, 1000, 100) for i in range(10)]
    sim = _sim(n_colocated=1, kv_capacity_tokens=3 * 1100)
    peak = 0

    def watch(frac: float) -> None:
        nonlocal peak
        peak = max(peak, sim.instances[0].pool.used)

    sim.progress = watch
    out = sim.run(reqs)
    assert all(r.t_done > 0 for r in out)
    assert peak <= 3 * 1100
    firsts = sorted(r.t_first for r in out)
    assert firsts[3] > firsts[2] + 50 * _cost().decode_step_s(3, 3000)  # waited for a slot


def test_request_larger_than_memory_is_reported() -> None:
    from banaserve_ext.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="never finished"):
        _sim(n_colocated=1, kv_capacity_tokens=2000).run([TraceRequest(0, 0.0, 5000, 10)])


def test_prefix_cache_hits_skip_compute() -> None:
    h = tuple(range(8))
    reqs = [TraceRequest(0, 0.0, 4096, 2, h), TraceRequest(1, 10.0, 4096, 2, h)]
    out = _sim(n_colocated=1, cache_mode="local", cache_tokens_per_instance=1 << 20).run(reqs)
    assert out[0].prefix_hit == 0
    assert out[1].prefix_hit == 4095  # all but the last token
    assert out[1].t_first - out[1].arrival < 0.3 * (out[0].t_first - out[0].arrival)


def test_global_store_shares_across_instances() -> None:
    h = tuple(range(8))
    reqs = [TraceRequest(0, 0.0, 4096, 2, h), TraceRequest(1, 10.0, 4096, 2, h)]
    for mode, hit in (("local", 0), ("global", 4095)):
        out = _sim(n_colocated=2, cache_mode=mode, cache_tokens_per_instance=1 << 20).run(reqs)
        assert out[1].pinst is not out[0].pinst  # round robin
        assert out[1].prefix_hit == hit


def test_all_tokens_accounted() -> None:
    reqs = [TraceRequest(i, i * 0.01, 200 + 37 * i, 1 + (i * 13) % 90) for i in range(120)]
    sim = _sim(n_colocated=2)
    out = sim.run(reqs)
    assert sum(i.tokens_prefilled for i in sim.instances) == sum(r.input_len for r in reqs)
    # the first output token comes from the prefill step
    assert sum(i.tokens_decoded for i in sim.instances) == sum(r.output_len - 1 for r in reqs)
    assert all(i.pool.used == 0 for i in sim.instances)
    s = summarize(out)
    assert s["requests"] == 120 and s["ttft_ms_mean"] > 0


def test_goodput_bisection_finds_threshold() -> None:
    slo = Slo(1.0, 1.0, 0.9)
    got = goodput(lambda rate: 1.0 if rate <= 7.3 else 0.5, slo, 1.0, 2.0, iters=20)
    assert math.isclose(got, 7.3, rel_tol=1e-3)
    assert goodput(lambda rate: 0.0, slo, 1.0, 2.0) == 0.0


def test_stuck_cluster_with_ticks_reports_instead_of_hanging() -> None:
    from banaserve_ext.errors import InvalidArgumentError

    cfg = ClusterConfig(M, G, 1, n_colocated=1, kv_capacity_tokens=2000)
    sim = Simulator(cfg, _cost(), policy=make_policy("round_robin"), tick_s=1.0)
    with pytest.raises(InvalidArgumentError, match="never finished"):
        sim.run([TraceRequest(0, 0.0, 5000, 10)])

# SPDX-License-Identifier: Apache-2.0
"""Per-token TBT, the SLO modes and on-demand KV with preemption, against hand-computed
timelines (a cost model with constant step times makes every token time exact)."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.policies import make_policy
from banaserve_ext.sim import ClusterConfig, Simulator, TraceRequest, get_gpu, get_model
from banaserve_ext.sim.metrics import (
    Slo,
    attainments,
    goodput_from_points,
    summarize,
    tbt_gaps,
    tbt_stats,
)

M = get_model("llama-3.1-8b")
G = get_gpu("h100")
PRE, DEC = 0.05, 0.01  # a step with a prefill chunk / a decode-only step (s)


class ConstCost:
    """Steps cost PRE with a prefill chunk in them and DEC without; nothing else matters."""

    layers = 1

    def iteration_s(self, chunks, n_decode, decode_ctx, layer_frac=1.0):  # noqa: ANN001
        if chunks:
            return PRE
        return DEC if n_decode else 0.0

    def decode_step_s(self, n_decode, decode_ctx, layer_frac=1.0):  # noqa: ANN001
        return DEC if n_decode else 0.0

    def prefill_s(self, tokens, prefix=0, layer_frac=1.0):  # noqa: ANN001
        return PRE


def _run(reqs, **kw):  # noqa: ANN001, ANN202
    cfg = ClusterConfig(M, G, 1, n_colocated=1, **kw)
    sim = Simulator(cfg, ConstCost(), policy=make_policy("round_robin"), tick_s=0)
    return sim.run(reqs), sim


def test_token_times_of_a_lone_request() -> None:
    (r,), _ = _run([TraceRequest(0, 0.0, 100, 5)])
    assert r.token_times() == pytest.approx([0.05, 0.06, 0.07, 0.08, 0.09])
    assert tbt_gaps(r) == pytest.approx([DEC] * 4)


def test_a_prefill_chunk_shows_up_as_one_long_gap() -> None:
    # a decodes from 0.05; b arrives at 0.075 and is prefilled in the step 0.08..0.13, which
    # also makes a's token: a's gaps are 10, 10, 50, 10 ... ms
    (a, b), _ = _run([TraceRequest(0, 0.0, 100, 8), TraceRequest(1, 0.075, 100, 3)])
    g = tbt_gaps(a)
    assert g == pytest.approx([DEC, DEC, DEC, PRE, DEC, DEC, DEC])
    p99, gaps = tbt_stats([a, b])
    assert len(gaps) == 7 + 2
    # P99 of a's 7 gaps by linear interpolation: index 0.99 * 6 = 5.94 in the sorted gaps
    assert p99[0] == pytest.approx(DEC + (PRE - DEC) * 0.94)
    assert tbt_gaps(b) == pytest.approx([DEC, DEC])
    # the mean of the gaps is the request's TPOT
    assert np.mean(g) == pytest.approx((a.t_done - a.t_first) / (a.output_len - 1))


def test_slo_modes_judge_mean_and_tail_differently() -> None:
    (a, b), _ = _run([TraceRequest(0, 0.0, 100, 8), TraceRequest(1, 0.075, 100, 3)])
    slos = {
        # a's mean TPOT is (6 * 10 + 50) / 7 = 15.7 ms: passes 20 ms mean TPOT
        "tpot": Slo(1.0, 0.020),
        # a's P99 gap is 47.6 ms: fails a 30 ms P99 TBT, b passes (gaps 10 ms)
        "tbt": Slo(1.0, 0.020, mode="p99-tbt", tbt_s=0.030),
        "ttft": Slo(0.01, 1.0),  # TTFTs 50 and 55 ms: both fail
    }
    att = attainments([a, b], slos)
    assert att == {"tpot": 1.0, "tbt": 0.5, "ttft": 0.0}
    s = summarize([a, b])
    assert s["tbt_ms_p50"] == pytest.approx(10.0)
    assert s["tbt_ms_mean"] == pytest.approx((8 * 10 + 50) / 9)


def test_slo_rejects_a_tbt_mode_without_a_bound() -> None:
    with pytest.raises(InvalidArgumentError, match="tbt_s"):
        Slo(1.0, 0.1, mode="p99-tbt")
    with pytest.raises(InvalidArgumentError, match="mode"):
        Slo(1.0, 0.1, mode="p50")


def test_goodput_from_points_interpolates_the_crossing() -> None:
    assert goodput_from_points([(1, 1.0), (2, 0.95), (3, 0.85), (4, 0.99)], 0.9) == pytest.approx(
        2.5
    )
    assert goodput_from_points([(1, 0.5), (2, 0.95)], 0.9) == 0.0
    assert goodput_from_points([(1, 1.0), (2, 0.95)], 0.9) == 2.0


def test_on_demand_kv_preempts_the_latest_and_recomputes() -> None:
    # 300 tokens of KV: two 100-token prompts fit, but their decodes grow until the pool is
    # full; the later one is preempted, waits for the first to finish, and is recomputed
    reqs = [TraceRequest(0, 0.0, 100, 80), TraceRequest(1, 0.01, 100, 80)]
    (a, b), sim = _run(reqs, kv_capacity_tokens=300)
    inst = sim.instances[0]
    assert inst.preemptions >= 1
    assert b.preemptions >= 1 and a.preemptions == 0
    assert a.t_done < b.t_done
    assert inst.pool.used == 0  # every token handed back
    assert len(b.token_times()) == b.output_len  # no token lost or made twice
    # the recompute is one prefill step inside b's decode: a gap of at least PRE
    assert max(tbt_gaps(b)) >= PRE
    assert summarize([a, b])["preemptions"] == b.preemptions


def test_no_preemption_when_memory_is_ample() -> None:
    (a, b), sim = _run(
        [TraceRequest(0, 0.0, 100, 80), TraceRequest(1, 0.01, 100, 80)], kv_capacity_tokens=10_000
    )
    assert sim.instances[0].preemptions == 0
    assert max(tbt_gaps(a)) == pytest.approx(PRE)  # b's prefill, nothing else

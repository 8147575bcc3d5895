# SPDX-License-Identifier: Apache-2.0
"""The pure parts of bench/live/bench_launch.py: table rows, medians, same-repeat ratios, the
controller's actions and flip costs, the costs-file update."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from banaserve_ext.control.costs import measured_costs

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "live" / "bench_launch.py"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_launch", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_launch"] = mod
    spec.loader.exec_module(mod)
    return mod


def _record(ttft: float, hit_local: float, busiest: float | None) -> dict:
    summary = {"failed": 0.0, "ttft_p50_s": ttft, "ttft_p99_s": 2 * ttft, "tpot_p50_s": 0.1,
               "tpot_p99_s": 0.2, "output_tokens_per_s": 10.0, "wall_s": 30.0,
               "requests": 8.0}  # fmt: skip
    cache = {"hit_rate": hit_local, "hit_rate_local": hit_local, "hit_rate_store": 0.0,
             "prompt_tokens": 1000.0}  # fmt: skip
    counters = {"servers": {"p": {"hit_host": 100.0}, "d": None}}
    return {"summary": summary, "cache": cache, "counters": counters,
            "prefill_load": {"busiest_share": busiest}}  # fmt: skip


def test_rows_medians_and_same_repeat_ratios(bench) -> None:  # type: ignore[no-untyped-def]
    ours = [bench.row_of(_record(t, 0.4, 1.0)) for t in (1.0, 2.0, 6.0)]
    base = [bench.row_of(_record(t, 0.2, None)) for t in (2.0, 2.0, 3.0)]
    med = bench.medians(ours)
    assert med["ttft_p50_s"] == 2.0 and med["hit_rate_local"] == 0.4
    assert med["hit_rate_l2"] == pytest.approx(0.1)  # 100 host-hit tokens of 1000
    assert bench.medians(base)["busiest_share"] is None  # no number in any repeat
    rat = bench.ratios(ours, base)
    assert rat["ttft_p50_s"] == pytest.approx(1.0)  # median of 0.5, 1.0, 2.0
    assert rat["hit_rate_local"] == pytest.approx(2.0)
    assert rat["hit_rate_store"] is None  # baseline 0: no ratio
    table = bench.markdown(
        {"median": {"banaserve": med, "sglang": bench.medians(base)},
         "complete_repeats": 3, "ratio_banaserve_over_sglang": rat}
    )  # fmt: skip
    assert table.count("\n") == 5 and "n/a" in table and "| 2.00 |" in table


def test_actions_and_flip_costs(bench) -> None:  # type: ignore[no-untyped-def]
    decisions = [
        {"action": "MigrateAttention", "outcome": "not_actuated"},
        {"action": "FlipRole", "outcome": "ok", "measured_cost_s": 1.0,
         "costs": {"drain_s": 0.6, "switch_s": 0.4, "total_s": 1.1}},
        {"action": "FlipRole", "outcome": "ok", "measured_cost_s": 3.0,
         "costs": {"drain_s": 2.0, "switch_s": 1.0, "total_s": 3.1}},
        {"action": "FlipRole", "outcome": "rolled_back",
         "costs": {"drain_s": 9.0, "switch_s": 9.0}},
    ]  # fmt: skip
    acts = bench.actions_of(decisions)
    assert [a["outcome"] for a in acts] == ["ok", "ok", "rolled_back"]
    flip = bench.flip_costs(acts)
    assert flip == {"drain_s": 1.3, "switch_s": 0.7, "total_s": 2.0, "n": 2}
    assert bench.flip_costs(acts[2:]) is None


def test_update_costs_keeps_the_schema(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = Path(measured_costs().path)
    p = tmp_path / "costs.json"
    p.write_text(src.read_text())
    bench.update_costs(p, {"drain_s": 1.3, "switch_s": 0.7, "total_s": 2.0, "n": 2}, "x.json")
    costs = measured_costs(str(p))
    assert costs.flip_cost_s == 0.7 and costs.flip_measured
    assert "x.json" in costs.sources["flip_cost_s"]
    assert costs.layer_link == measured_costs().layer_link
    data = json.loads(p.read_text())
    assert data["flip_live"]["drain_plus_switch_s"] == 2.0
    assert (
        data["flip_cost_s"]["previous"]["value"]
        == json.loads(src.read_text())["flip_cost_s"]["value"]
    )


def test_aggregate_recomputes_rows_from_the_replay_records(bench) -> None:  # type: ignore[no-untyped-def]
    flip = {"action": "FlipRole", "outcome": "ok",
            "costs": {"drain_s": 1.0, "switch_s": 0.5}}  # fmt: skip

    def run(kind: str, ttft: float, actions: list) -> dict:
        return {"replay": _record(ttft, 0.3, 1.0) | {"transfer_backend": kind},
                "actions": actions}  # fmt: skip

    result = bench.aggregate({"runs": {"banaserve": [run("banaserve", 1.0, [flip])],
                                       "sglang": [run("mooncake", 4.0, [])]}})  # fmt: skip
    assert result["ratio_banaserve_over_sglang"]["ttft_p50_s"] == pytest.approx(0.25)
    assert result["transfer_backend"] == {"banaserve": "banaserve", "sglang": "mooncake"}
    assert result["flip_costs"] == {"drain_s": 1.0, "switch_s": 0.5, "total_s": 1.5, "n": 1}
    assert result["complete_repeats"] == 1
    # a repeat whose deployment left no record (it failed to start) is not paired
    failed = {"replay": None, "actions": []}
    result = bench.aggregate(
        {
            "runs": {
                "banaserve": [run("banaserve", 1.0, []), failed],
                "sglang": [run("mooncake", 4.0, []), run("m", 1.0, [])],
            }
        }
    )
    assert result["complete_repeats"] == 1
    assert result["ratio_banaserve_over_sglang"]["ttft_p50_s"] == pytest.approx(0.25)

# SPDX-License-Identifier: Apache-2.0
"""The report's bookkeeping: best variant per SLO and seed, medians, target lines; the shifting
workloads; and one tiny end-to-end run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from banaserve_ext.sim.report import MODES, aggregate, report, targets
from banaserve_ext.sim.workloads import WorkloadSpec, build_workload


def _run(wl: str, system: str, variant: str, seed: int, pts: list[tuple[float, float]]) -> dict:
    return {
        "task": {"workload": wl, "system": system, "variant": variant, "seed": seed},
        "points": [{"rate": r, "att": dict.fromkeys(MODES, a)} for r, a in pts],
        "events": [],
    }


def test_aggregate_takes_each_seeds_best_variant_then_the_median() -> None:
    runs = [
        # seed 0: chunk 512 crosses 0.9 at 2.5, chunk 2048 at 1.5
        _run("w", "vllm", "chunk=512", 0, [(1, 1.0), (2, 0.95), (3, 0.85)]),
        _run("w", "vllm", "chunk=2048", 0, [(1, 0.95), (2, 0.85)]),
        _run("w", "vllm", "chunk=512", 1, [(1, 0.5)]),  # 0
        _run("w", "vllm", "chunk=2048", 1, [(1, 1.0), (2, 1.0)]),  # passes the top: capped
        _run("w", "vllm", "chunk=512", 2, [(1, 1.0), (2, 0.8)]),  # 1 + 0.1 / 0.2
        _run("w", "vllm", "chunk=2048", 2, [(1, 0.8)]),
    ]
    cell = aggregate(runs)["w"]["vllm"]["p99-tbt"]
    assert cell["per_seed"] == pytest.approx({0: 2.5, 1: 2.0, 2: 1.5})
    assert cell["variant"] == {0: "chunk=512", 1: "chunk=2048", 2: "chunk=512"}
    assert cell["median"] == pytest.approx(2.0) and cell["capped"]


def test_target_lines_say_holds_or_misses() -> None:
    runs = [
        _run("mooncake-conv", s, "", 0, [(1, 1.0), (g, 0.9), (g + 1, 0.0)])
        for s, g in (
            ("vllm", 2),
            ("distserve", 3),
            ("sglang-pd", 2),
            ("banaserve", 4),
            ("dynaserve", 3),
        )
    ]
    lines = "\n".join(targets(aggregate(runs)))
    assert "banaserve >= 1.3x vLLM" in lines and "= 2.00x -> HOLDS" in lines
    assert "sglang-pd >= 1.0x vLLM at its best chunk: 2.00 vs 2.00 = 1.00x -> HOLDS" in lines
    assert "on 1 of 1 (mooncake-conv) -> MISSES" in lines


def test_shifting_mix_alternates_sources_by_phase() -> None:
    reqs = build_workload(WorkloadSpec("shift-azure", 960.0, 240.0), 2.0)
    assert reqs and reqs[-1].arrival_s < 960.0
    out = {
        k: [r.output_len for r in reqs if k * 240 <= r.arrival_s < (k + 1) * 240] for k in range(4)
    }
    mean = {k: sum(v) / len(v) for k, v in out.items()}
    # code (phases 0, 2) has short outputs (mean 28), conversation (1, 3) long ones (211)
    assert mean[0] < 60 and mean[2] < 60 and mean[1] > 120 and mean[3] > 120
    again = build_workload(WorkloadSpec("shift-azure", 960.0, 240.0), 2.0)
    assert [r.arrival_s for r in again] == [r.arrival_s for r in reqs]
    other = build_workload(WorkloadSpec("shift-azure", 960.0, 240.0), 2.0, seed=1)
    assert [r.input_len for r in other[:50]] != [r.input_len for r in reqs[:50]]


def test_report_end_to_end(tmp_path: Path) -> None:
    text = report(
        tmp_path, seeds=1, duration_s=30.0, stationary_s=30.0, jobs=1, workloads=("mooncake-conv",)
    )
    assert (tmp_path / "report.md").read_text().startswith("Llama-3.1-70B")
    assert (tmp_path / "report.json").is_file()
    for s in ("vllm", "distserve", "sglang-pd", "llumnix", "banaserve", "dynaserve", "semi-pd"):
        assert s in text
    assert "Targets:" in text and "MISSES" in text or "HOLDS" in text
    log = tmp_path / "actions" / "mooncake-conv_banaserve.log"
    assert log.is_file() and "start P:D" in log.read_text() and "|" in log.read_text()


def test_report_cli_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "banaserve_ext", "sim", "report", "--seeds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--seeds" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "banaserve_ext",
            "sim",
            "report",
            "--workloads",
            "nope",
            "--out",
            "/tmp/never-written",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "unknown workload 'nope'" in out.stderr

# SPDX-License-Identifier: Apache-2.0
"""The trust anchor: replay LLMServingSim's measured vLLM run and land within 10 % of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _measured(path: Path) -> tuple[float, float]:
    ttft, tpot = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ttft.append((r["first_token_ts"] - r["queued_ts"]) * 1e3)
        if r["output_toks"] > 1:
            tpot.append((r["last_token_ts"] - r["first_token_ts"]) * 1e3 / (r["output_toks"] - 1))
    return float(np.mean(ttft)), float(np.mean(tpot))


def test_replay_matches_measured_vllm(traces_dir: Path) -> None:
    fx = traces_dir / "calibration" / "llmservingsim_rtxpro6000_llama31_8b"
    reqs = fx / "vllm_measured" / "requests.jsonl"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "banaserve_ext",
            "sim",
            "replay",
            "--requests",
            str(reqs),
            "--profile",
            str(fx / "profile"),
            "--max-num-seqs",
            "128",
            "--max-num-batched-tokens",
            "2048",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    sim = json.loads(out.stdout)
    ttft_meas, tpot_meas = _measured(reqs)
    ttft_err = sim["ttft_ms_mean"] / ttft_meas - 1
    tpot_err = sim["tpot_ms_mean"] / tpot_meas - 1
    print(
        f"TTFT mean sim {sim['ttft_ms_mean']:.1f} vs measured {ttft_meas:.1f} ({ttft_err:+.1%});"
        f" TPOT mean sim {sim['tpot_ms_mean']:.2f} vs measured {tpot_meas:.2f} ({tpot_err:+.1%})"
    )
    assert sim["requests"] == 300
    assert abs(ttft_err) <= 0.10
    assert abs(tpot_err) <= 0.10


def test_replay_rejects_missing_profile(tmp_path: Path, traces_dir: Path) -> None:
    fx = traces_dir / "calibration" / "llmservingsim_rtxpro6000_llama31_8b"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "banaserve_ext",
            "sim",
            "replay",
            "--requests",
            str(fx / "vllm_measured" / "requests.jsonl"),
            "--profile",
            str(tmp_path / "nope"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--profile" in out.stderr and "nope" in out.stderr


@pytest.mark.parametrize(
    "model,gpu,msg", [("gpt-5", None, "unknown model"), (None, "tpu-v9", "unknown GPU")]
)
def test_replay_unknown_model_or_gpu(
    traces_dir: Path, model: str | None, gpu: str | None, msg: str
) -> None:
    fx = traces_dir / "calibration" / "llmservingsim_rtxpro6000_llama31_8b"
    cmd = [
        sys.executable,
        "-m",
        "banaserve_ext",
        "sim",
        "replay",
        "--requests",
        str(fx / "vllm_measured" / "requests.jsonl"),
        "--profile",
        str(fx / "profile"),
    ]
    cmd += ["--model", model] if model else []
    cmd += ["--gpu", gpu] if gpu else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert msg in out.stderr

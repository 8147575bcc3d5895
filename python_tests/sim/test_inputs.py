# SPDX-License-Identifier: Apache-2.0
"""Bad input: a clear error naming the line or the setting, never a silent default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banaserve_ext.errors import InvalidArgumentError, NotFoundError
from banaserve_ext.sim import (
    ClusterConfig,
    Simulator,
    get_gpu,
    get_model,
    load_azure,
    load_mooncake,
)
from banaserve_ext.sim.cost import load_fit_cost_model
from banaserve_ext.sim.models import kv_capacity_tokens
from banaserve_ext.sim.traces import load_llmservingsim_requests


def _write(tmp_path: Path, lines: list[str], name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]})


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"timestamp": 1, "input_length": 10}), "missing field 'output_length'"),
        (json.dumps({"timestamp": 1, "input_length": -5, "output_length": 2}), "input_length"),
        (
            json.dumps({"timestamp": 1, "input_length": 1000, "output_length": 2, "hash_ids": [1]}),
            "hash_ids",
        ),
        (json.dumps({"timestamp": "x", "input_length": 10, "output_length": 2}), "timestamp"),
    ],
)
def test_mooncake_bad_line_names_line(tmp_path: Path, bad: str, needle: str) -> None:
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(InvalidArgumentError) as ei:
        load_mooncake(p)
    assert f"{p}:2" in str(ei.value)
    assert needle in str(ei.value)


def test_mooncake_unsorted(tmp_path: Path) -> None:
    late = json.dumps({"timestamp": 100, "input_length": 10, "output_length": 2})
    early = json.dumps({"timestamp": 5, "input_length": 10, "output_length": 2})
    with pytest.raises(InvalidArgumentError, match="arrives before"):
        load_mooncake(_write(tmp_path, [late, early]))


def test_azure_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,100,5\n2023-11-16 18:17:04.1,abc,5\n"
    )
    with pytest.raises(InvalidArgumentError, match=rf"{p}:3"):
        load_azure(p)


def test_llmservingsim_missing_field(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps({"arrival_time": 1.0, "input_toks": 5})])
    with pytest.raises(InvalidArgumentError, match="output_toks"):
        load_llmservingsim_requests(p)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="trace file not found"):
        load_mooncake(tmp_path / "none.jsonl")


def test_unknown_model_gpu() -> None:
    with pytest.raises(NotFoundError, match="unknown model 'llama-9'"):
        get_model("llama-9")
    with pytest.raises(NotFoundError, match="unknown GPU 'v100'"):
        get_gpu("v100")


def test_missing_calibration_names_setting() -> None:
    with pytest.raises(NotFoundError, match="gpu=h100 model=llama-3.1-70b tp=1"):
        load_fit_cost_model(get_model("llama-3.1-70b"), "h100", 1)


def test_cluster_cannot_hold_model() -> None:
    with pytest.raises(InvalidArgumentError, match="--tp 1"):
        kv_capacity_tokens(get_model("llama-3.1-70b"), get_gpu("h100"), 1)
    cost = load_fit_cost_model(get_model("llama-3.1-70b"), "h100", 4)
    cfg = ClusterConfig(get_model("llama-3.1-70b"), get_gpu("h100"), 1, n_colocated=1)
    from banaserve_ext.policies import make_policy

    with pytest.raises(InvalidArgumentError, match="cannot hold"):
        Simulator(cfg, cost, policy=make_policy("round_robin"))


def test_cluster_config_errors() -> None:
    m, g = get_model("llama-3.1-8b"), get_gpu("h100")
    with pytest.raises(InvalidArgumentError, match="decode"):
        ClusterConfig(m, g, n_prefill=2).validate()
    with pytest.raises(InvalidArgumentError, match="no instance"):
        ClusterConfig(m, g, n_decode=2).validate()
    with pytest.raises(InvalidArgumentError, match="cache_mode"):
        ClusterConfig(m, g, n_colocated=1, cache_mode="everywhere").validate()

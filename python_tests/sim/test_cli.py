# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import json

import pytest

from banaserve_ext.cli import main


def test_sim_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "sim",
            "run",
            "--system",
            "vllm",
            "--trace",
            "azure-code",
            "--limit",
            "200",
            "--instances",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["requests"] == 200 and res["ttft_ms_mean"] > 0 and "slo_attainment" in res


def test_sim_run_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "sim",
            "run",
            "--system",
            "vllm",
            "--trace",
            "azure-code",
            "--limit",
            "10",
            "--model",
            "llama-3.1-70b",
            "--tp",
            "1",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "tp=1" in err or "--tp 1" in err


def test_sim_run_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "sim",
            "run",
            "--system",
            "semi-pd",
            "--trace",
            "azure-conv",
            "--limit",
            "100",
            "--instances",
            "2",
            "--progress",
        ]
    )
    assert rc == 0
    assert "100%" in capsys.readouterr().err

# SPDX-License-Identifier: Apache-2.0
"""The live controller's configuration checks and parsing (no SGLang; the controller itself is
tested on real servers in python_tests/sglang/test_sglang_live.py)."""

from __future__ import annotations

import argparse

import pytest

from banaserve_ext.control import BanaServeConfig
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.live import cli
from banaserve_ext.live.clients import InstanceSpec
from banaserve_ext.live.controller import LiveConfig
from banaserve_ext.live.kv_pressure import KvPressureConfig
from banaserve_ext.live.status import one_line, render


def test_instance_spec_parses_url_and_bootstrap_port() -> None:
    assert InstanceSpec.parse("http://127.0.0.1:30000,8998") == InstanceSpec(
        "http://127.0.0.1:30000", 8998
    )
    assert InstanceSpec.parse("http://h:1/").bootstrap_port is None
    for bad in ("127.0.0.1:30000,1", "http://h:1,x"):
        with pytest.raises(InvalidArgumentError):
            InstanceSpec.parse(bad)


def _cfg(**kw: object) -> LiveConfig:
    base = dict(
        router="http://r:1",
        instances=(InstanceSpec("http://a:1", 2), InstanceSpec("http://b:1", 3)),
    )
    return LiveConfig(**(base | kw))  # type: ignore[arg-type]


def test_impossible_controller_configs_are_refused() -> None:
    _cfg().validate()
    cases = {
        "at least one instance": _cfg(instances=()),
        "listed twice": _cfg(instances=(InstanceSpec("http://a:1", 2),) * 2),
        "bootstrap port": _cfg(instances=(InstanceSpec("http://a:1"),)),
        "window_s": _cfg(window_s=0.0),
        "flip_low": _cfg(control=BanaServeConfig(flip_high=0.5, flip_low=0.6)),
        "low < high": _cfg(control=BanaServeConfig(high=0.1, low=0.2)),
        "kv_low < kv_high": _cfg(kv_pressure=KvPressureConfig(high=0.5, low=0.6)),
        "kv_fraction": _cfg(kv_pressure=KvPressureConfig(fraction=1.0)),
    }
    for match, cfg in cases.items():
        with pytest.raises(InvalidArgumentError, match=match):
            cfg.validate()


def test_cli_builds_the_controller_config(tmp_path) -> None:
    model = tmp_path / "config.json"
    model.write_text(
        '{"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,'
        ' "num_key_value_heads": 2, "intermediate_size": 256}'
    )
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(
        [
            "--router",
            "http://r:1",
            "--instance",
            "http://a:1,5",
            "--flip-high",
            "0.6",
            "--persist",
            "4",
            "--model-config",
            str(model),
            "--attn-peer",
            "127.0.0.1:9",
            "--kv-high",
            "0.7",
        ]
    )
    cfg = cli.config_from_args(args)
    assert cfg.instances == (InstanceSpec("http://a:1", 5),)
    assert cfg.control.flip_high == 0.6 and cfg.control.persist == 4
    assert cfg.kv_pressure.peers == ("127.0.0.1:9",) and cfg.kv_pressure.high == 0.7
    # 2 layers; K+V of 2 heads x 32 dims x 4 bytes per token and layer
    assert (cfg.total_layers, cfg.kv_bytes_per_token_layer) == (2, 2 * 2 * 32 * 4)
    assert cfg.weight_bytes_per_layer > 0


def test_status_rendering() -> None:
    st = {
        "router": "http://r:1",
        "window": 3,
        "instances": [
            {
                "idx": 0,
                "url": "http://a:1",
                "mode": "prefill",
                "router_role": "prefill",
                "dead": False,
                "busy": 0.5,
                "attn_share": 0.0,
                "kv_used": 10,
                "kv_frac": 0.1,
                "waiting": 2,
                "running": 1,
                "router_inflight": 3,
            },
            {
                "idx": 1,
                "url": "http://b:1",
                "mode": None,
                "router_role": None,
                "dead": True,
                "busy": 0.0,
                "attn_share": 0.0,
                "kv_used": None,
                "kv_frac": 0.0,
                "waiting": None,
                "running": None,
                "router_inflight": 0,
            },
        ],
        "recent": [{"window": 2, "action": "FlipRole", "outcome": "ok", "measured_cost_s": 1.5}],
    }
    table = render(st)
    assert "a:1" in table and "DEAD" in table and "FlipRole -> ok (1.50s)" in table
    assert one_line(st).startswith("[w3] P0:50% kv10% q2/1  dead1:")
    assert one_line(st).endswith("last FlipRole->ok")

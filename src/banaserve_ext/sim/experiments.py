# SPDX-License-Identifier: Apache-2.0
"""Canned experiments: Mooncake's routing ablation, and the controller comparison."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..policies import make_policy
from ..policies.global_cache_aware import GlobalCacheAwarePolicy
from .engine import ClusterConfig, Simulator
from .metrics import summarize
from .models import get_gpu, get_model, kv_capacity_tokens
from .traces import default_traces_dir, load_mooncake, scale_rate

#: Mooncake FAST'25, routing ablation, mean TTFT (s) on the conversation trace
MOONCAKE_MEASURED_TTFT_S = {
    "random": 19.65,
    "load_balancing": 5.27,
    "local_cache_aware": 3.58,
    "global_cache_aware": 3.07,
}


def ablation_cluster(mode: str, n: int = 16) -> tuple[ClusterConfig, Any, Any]:
    """16 prefill instances of 8 x A800 (LLaMA3-70B, TP8), 4 x 200 Gb/s RDMA per node."""
    from .cost import load_fit_cost_model

    model = get_model("llama-3.1-70b")
    gpu = get_gpu("a800")
    cost = load_fit_cost_model(model, gpu.table_name, 8)
    cap = kv_capacity_tokens(model, gpu, 8)
    # Mooncake keeps the cache in each node's DRAM: size it at 2x the HBM KV capacity
    cfg = ClusterConfig(model, gpu, 8, n_prefill=n, n_decode=n, max_num_seqs=256,
                        prefill_max_tokens=16384, link_gbps=100.0,
                        cache_mode="global" if mode == "global_cache_aware" else "local",
                        cache_tokens_per_instance=2 * cap)
    if mode == "random":
        pol = make_policy("random", seed=0)
    elif mode == "load_balancing":
        pol = make_policy("load_aware", seed=0)
    elif mode == "local_cache_aware":
        pol = make_policy("cache_aware", seed=0)
    else:
        pol = GlobalCacheAwarePolicy(
            0, prefill_s=lambda n_tok, p: cost.prefill_s(n_tok, p),
            kv_bytes_per_token=model.kv_bytes_per_token, transfer_Bps=100e9,
            capacity_blocks=2 * cap // 512)
    return cfg, cost, pol


def routing_ablation(limit: int | None = None, rate_scale: float | None = None,
                     progress: bool = False) -> dict[str, Any]:
    path = default_traces_dir() / "mooncake_fast25" / "conversation_trace.jsonl"
    trace = load_mooncake(path, limit)
    scale = rate_scale if rate_scale is not None else 1.0
    if scale != 1.0:
        trace = scale_rate(trace, scale)
    rows: dict[str, Any] = {}
    for mode in MOONCAKE_MEASURED_TTFT_S:
        cfg, cost, pol = ablation_cluster(mode)
        sim = Simulator(cfg, cost, policy=pol, decode_policy=make_policy("load_aware", seed=1),
                        tick_s=0)
        t0 = time.monotonic()
        reqs = sim.run(trace)
        s = summarize(reqs)
        hit = [r.prefix_hit / r.input_len for r in reqs]
        rows[mode] = {"ttft_s_mean": s["ttft_ms_mean"] / 1e3, "ttft_s_p90": s["ttft_ms_p90"] / 1e3,
                      "prefix_hit_mean": float(np.mean(hit)), "wall_s": time.monotonic() - t0}
    base = rows["global_cache_aware"]["ttft_s_mean"]
    mbase = MOONCAKE_MEASURED_TTFT_S["global_cache_aware"]
    lines = ["| routing | measured mean TTFT (s) | ratio to global | simulated mean TTFT (s) "
             "| ratio to global | prefix hit |", "|---|---|---|---|---|---|"]
    for mode, row in rows.items():
        m = MOONCAKE_MEASURED_TTFT_S[mode]
        row["ratio"] = row["ttft_s_mean"] / base if base > 0 else float("nan")
        row["measured_ratio"] = m / mbase
        lines.append(f"| {mode} | {m:.2f} | {m / mbase:.2f} | {row['ttft_s_mean']:.2f} | "
                     f"{row['ratio']:.2f} | {row['prefix_hit_mean']:.1%} |")
    return {"requests": len(trace), "rate_scale": scale, "rows": rows, "table": "\n".join(lines)}

# SPDX-License-Identifier: Apache-2.0
"""Mooncake's routing ablation (FAST'25): random >> load balancing > local cache-aware >
global cache-aware in mean TTFT, on a slice of the conversation trace."""

from __future__ import annotations

from pathlib import Path

from banaserve_ext.sim.experiments import MOONCAKE_MEASURED_TTFT_S, routing_ablation


def test_routing_ablation_order(traces_dir: Path) -> None:
    res = routing_ablation(limit=2000, rate_scale=2.5)
    rows = res["rows"]
    print("\n" + res["table"])
    t = {k: v["ttft_s_mean"] for k, v in rows.items()}
    order = sorted(MOONCAKE_MEASURED_TTFT_S, key=MOONCAKE_MEASURED_TTFT_S.get, reverse=True)
    assert [k for k in sorted(t, key=t.get, reverse=True)] == order
    # the global store must raise the hit rate over load balancing with local caches
    assert (
        rows["global_cache_aware"]["prefix_hit_mean"]
        > 1.5 * rows["load_balancing"]["prefix_hit_mean"]
    )

# SPDX-License-Identifier: Apache-2.0
"""Canned experiments: Mooncake's routing ablation, and the controller comparison."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..policies import make_policy
from ..policies.global_cache_aware import GlobalCacheAwarePolicy
from .cluster import Simulator
from .engine import ClusterConfig
from .metrics import summarize
from .models import get_gpu, get_model, kv_capacity_tokens
from .traces import load_trace, scale_rate

#: Mooncake FAST'25, routing ablation, mean TTFT (s) on the conversation trace
MOONCAKE_MEASURED_TTFT_S = {
    "random": 19.65,
    "load_balancing": 5.27,
    "local_cache_aware": 3.58,
    "global_cache_aware": 3.07,
}


DEFAULT_ABLATION_RATE_SCALE = 2.5


def ablation_cluster(mode: str, n: int = 16) -> tuple[ClusterConfig, Any, Any]:
    """16 prefill instances of 8 x A800 (LLaMA3-70B, TP8), 4 x 200 Gb/s RDMA per node."""
    from .cost import load_fit_cost_model

    model = get_model("llama-3.1-70b")
    gpu = get_gpu("a800")
    cost = load_fit_cost_model(model, gpu.table_name, 8)
    cap = kv_capacity_tokens(model, gpu, 8)
    # Mooncake keeps the cache in each node's DRAM: size it at 2x the HBM KV capacity
    cfg = ClusterConfig(
        model,
        gpu,
        8,
        n_prefill=n,
        n_decode=n,
        max_num_seqs=256,
        prefill_max_tokens=16384,
        link_gbps=100.0,
        cache_mode="global" if mode == "global_cache_aware" else "local",
        cache_tokens_per_instance=2 * cap,
    )
    if mode == "random":
        pol = make_policy("random", seed=0)
    elif mode == "load_balancing":
        pol = make_policy("load_aware", seed=0)
    elif mode == "local_cache_aware":
        pol = make_policy("cache_aware", seed=0)
    else:
        pol = GlobalCacheAwarePolicy(
            0,
            prefill_s=lambda n_tok, p: cost.prefill_s(n_tok, p),
            kv_bytes_per_token=model.kv_bytes_per_token,
            transfer_Bps=100e9,
            capacity_blocks=2 * cap // 512,
        )
    return cfg, cost, pol


def routing_ablation(
    limit: int | None = None, rate_scale: float | None = None, progress: bool = False
) -> dict[str, Any]:
    trace = load_trace("mooncake-conv", limit)
    # Mooncake's ablation ran at a load where random routing reached ~20 s of mean TTFT; the
    # trace's native 3.4 req/s is far lighter than that on 16 TP8 nodes in our cost model, so by
    # default it is replayed at 2.5x its rate (inter-arrival times / 2.5)
    scale = rate_scale if rate_scale is not None else DEFAULT_ABLATION_RATE_SCALE
    if scale != 1.0:
        trace = scale_rate(trace, scale)
    rows: dict[str, Any] = {}
    for mode in MOONCAKE_MEASURED_TTFT_S:
        cfg, cost, pol = ablation_cluster(mode)
        sim = Simulator(
            cfg, cost, policy=pol, decode_policy=make_policy("load_aware", seed=1), tick_s=0
        )
        t0 = time.monotonic()
        reqs = sim.run(trace)
        s = summarize(reqs)
        hit = [r.prefix_hit / r.input_len for r in reqs]
        rows[mode] = {
            "ttft_s_mean": s["ttft_ms_mean"] / 1e3,
            "ttft_s_p90": s["ttft_ms_p90"] / 1e3,
            "prefix_hit_mean": float(np.mean(hit)),
            "wall_s": time.monotonic() - t0,
        }
    base = rows["global_cache_aware"]["ttft_s_mean"]
    mbase = MOONCAKE_MEASURED_TTFT_S["global_cache_aware"]
    lines = [
        "| routing | measured mean TTFT (s) | ratio to global | simulated mean TTFT (s) "
        "| ratio to global | prefix hit |",
        "|---|---|---|---|---|---|",
    ]
    for mode, row in rows.items():
        m = MOONCAKE_MEASURED_TTFT_S[mode]
        row["ratio"] = row["ttft_s_mean"] / base if base > 0 else float("nan")
        row["measured_ratio"] = m / mbase
        lines.append(
            f"| {mode} | {m:.2f} | {m / mbase:.2f} | {row['ttft_s_mean']:.2f} | "
            f"{row['ratio']:.2f} | {row['prefix_hit_mean']:.1%} |"
        )
    return {"requests": len(trace), "rate_scale": scale, "rows": rows, "table": "\n".join(lines)}


# ------------------------------------------------------------------------------------------------
# controllers vs baselines
# ------------------------------------------------------------------------------------------------
WORKLOADS = ("mooncake-conv", "azure-code", "azure-conv", "sharegpt")
#: (model, TP, instances): 8 GPUs of H100 for 8B, 16 for 70B
MODELS = (("llama-3.1-8b", 1, 8), ("llama-3.1-70b", 4, 4))

PAPER_RANGES = {
    "banaserve": "1.2-3.9x vs vLLM, 1.1-2.8x vs DistServe (throughput) [abstract]",
    "dynaserve": "1.15-3.07x capacity; goodput up to 1.91x vs colocated, 1.61x vs PD [abstract]",
    "semi-pd": "1.55-1.72x more requests within SLO (vs vLLM-S / vLLM-D, Llama) [paper]",
}


def workload_slo(trace: list, model_name: str, tp: int) -> Any:
    """semi-PD's rule for its tight SLOs: 7.5x the single-request latency of the mean request
    (TTFT of an idle instance; TPOT at batch 1), from the same cost model."""
    from .metrics import Slo
    from .systems import make_cost

    model = get_model(model_name)
    cost = make_cost(model, "h100", tp)
    mean_in = int(np.mean([r.input_len for r in trace]))
    mean_out = int(np.mean([r.output_len for r in trace]))
    ttft = cost.prefill_s(min(mean_in, 16384), 0) * max(1, mean_in // 16384)
    tpot = cost.decode_step_s(1, mean_in + mean_out // 2)
    return Slo(ttft_s=7.5 * ttft, tpot_s=7.5 * tpot)


def _capacity_guess(trace: list, model_name: str, tp: int, n: int) -> float:
    from .systems import make_cost

    model = get_model(model_name)
    cost = make_cost(model, "h100", tp)
    mean_in = float(np.mean([r.input_len for r in trace]))
    mean_out = float(np.mean([r.output_len for r in trace]))
    per_req = (
        cost.prefill_s(int(min(mean_in, 16384)))
        + mean_out * cost.decode_step_s(64, int(64 * mean_in)) / 64
    )
    return n / per_req


def compare(
    out: Path,
    limit: int = 1500,
    plots: bool = False,
    quick: bool = False,
    workloads: tuple[str, ...] = WORKLOADS,
    models: tuple = MODELS,
    systems: tuple[str, ...] | None = None,
) -> str:
    """Goodput (max rate at 90 % SLO attainment) per system, workload and model."""
    from dataclasses import replace as dc_replace

    from .metrics import goodput, slo_attainment
    from .systems import SYSTEMS, Setup, build, load_workload, make_cost

    systems = systems or SYSTEMS
    if plots:
        _require_matplotlib()  # fail before the long runs, not after
    out.mkdir(parents=True, exist_ok=True)
    iters = 4 if quick else 6
    results: dict[str, Any] = {}
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for wl in workloads:
        base_trace = load_workload(wl, limit, None)
        for model_name, tp, n in models:
            key = f"{wl} / {model_name} TP{tp} x{n}"
            model = get_model(model_name)
            cost = make_cost(model, "h100", tp)
            slo = workload_slo(base_trace, model_name, tp)
            has_hashes = any(r.hash_ids for r in base_trace[:100])
            guess = _capacity_guess(base_trace, model_name, tp, n)
            hint = (
                float(np.mean([r.input_len for r in base_trace])),
                float(np.mean([r.output_len for r in base_trace])),
            )
            setup = Setup(model, "h100", tp, n, slo, cost, has_hashes, workload_hint=hint)
            row: dict[str, float] = {}
            curves[key] = {}
            for system in systems:
                pts: list[tuple[float, float]] = []
                ratios = range(1, n) if system == "distserve" else [None]
                best = 0.0
                for n_p in ratios:
                    st = dc_replace(setup, pd_prefill=n_p) if n_p else setup

                    def at(
                        rate: float,
                        st: Setup = st,
                        system: str = system,
                        wl: str = wl,
                        slo: Any = slo,
                        pts: list = pts,
                    ) -> float:
                        trace = load_workload(wl, limit, rate)
                        reqs = build(system, st).run(trace)
                        att = slo_attainment(reqs, slo)
                        pts.append((rate, att))
                        return att

                    g = goodput(at, slo, guess * 0.1, guess * 0.5, iters=iters)
                    best = max(best, g)
                row[system] = best
                curves[key][system] = sorted(pts)
            results[key] = {"slo": (slo.ttft_s, slo.tpot_s), "goodput": row}
            print(f"{key}: " + ", ".join(f"{s} {g:.2f}" for s, g in row.items()), flush=True)
    table = _table(results, systems)
    (out / "comparison.md").write_text(table + "\n")
    import json

    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    if plots:
        _plots(out, curves, setup_for_timeline=(workloads[0], models[0]), limit=limit)
    return table


def _table(results: dict[str, Any], systems: tuple[str, ...]) -> str:
    head = "| workload / model | SLO TTFT / TPOT | " + " | ".join(systems) + " |"
    lines = [head, "|" + "---|" * (len(systems) + 2)]
    for key, res in results.items():
        g = res["goodput"]
        v = g.get("vllm") or float("nan")
        d = g.get("distserve") or float("nan")
        cells = []
        for s in systems:
            x = g[s]
            cells.append(f"{x:.2f} ({x / v:.2f}x / {x / d:.2f}x)" if v and d else f"{x:.2f}")
        t, p = res["slo"]
        lines.append(f"| {key} | {t:.2f} s / {p * 1e3:.0f} ms | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Goodput = highest request rate (req/s) with >= 90 % of requests within both "
        "SLOs; in brackets: ratio to vLLM / to DistServe (best static P:D ratio)."
    )
    for s, r in PAPER_RANGES.items():
        lines.append(f"- {s}, published: {r}")
    return "\n".join(lines)


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional extra
        from ..errors import NotSupportedError

        raise NotSupportedError(
            "--plots needs matplotlib: pip install 'banaserve-ext[sim]'"
        ) from exc
    return plt


def _plots(out: Path, curves: dict, setup_for_timeline: tuple, limit: int) -> None:
    plt = _require_matplotlib()
    from .metrics import request_latencies
    from .systems import SYSTEMS, Setup, build, load_workload, make_cost

    for key, per_sys in curves.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for s, pts in per_sys.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=s)
        ax.axhline(0.9, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"goodput_{_slug(key)}.png", dpi=110)
        plt.close(fig)
    wl, (model_name, tp, n) = setup_for_timeline
    model = get_model(model_name)
    cost = make_cost(model, "h100", tp)
    trace0 = load_workload(wl, limit, None)
    slo = workload_slo(trace0, model_name, tp)
    rate = 0.6 * _capacity_guess(trace0, model_name, tp, n)
    trace = load_workload(wl, limit, rate)
    hint = (
        float(np.mean([r.input_len for r in trace])),
        float(np.mean([r.output_len for r in trace])),
    )
    setup = Setup(
        model, "h100", tp, n, slo, cost, any(r.hash_ids for r in trace[:100]), workload_hint=hint
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sims = {}
    for s in SYSTEMS:
        sim = build(s, setup)
        reqs = sim.run(trace)
        sims[s] = sim
        ttft, tpot, _ = request_latencies(reqs)
        tp_ = np.sort(tpot[~np.isnan(tpot)])
        axes[0].plot(np.sort(ttft), np.linspace(0, 1, len(ttft)), label=s)
        axes[1].plot(tp_ * 1e3, np.linspace(0, 1, len(tp_)), label=s)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("TTFT (s)")
    axes[1].set_xlabel("TPOT (ms)")
    for ax in axes:
        ax.set_ylabel("CDF")
        ax.legend(fontsize=7)
    fig.suptitle(f"{wl}, {model_name} TP{tp} x{n}, {rate:.2f} req/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    sim = sims["banaserve"]
    fig, ax = plt.subplots(figsize=(10, 4))
    ts = [t for t, _ in sim.util_trace]
    for i in range(len(sim.instances)):
        ax.plot(ts, [u[i] for _, u in sim.util_trace], lw=0.8, label=f"inst {i}")
    for t, what, detail in sim.events_log:
        if what == "control":
            ax.axvline(t, color="red", lw=0.6, ls=":")
            ax.text(t, 1.02, detail, rotation=90, fontsize=5, va="bottom")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("busy share per 1 s window")
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=6, ncol=4)
    ax.set_title(
        f"BanaServe, {wl}, {model_name}: per-instance utilisation; red = control actions",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "banaserve_utilisation.png", dpi=110)
    plt.close(fig)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower()

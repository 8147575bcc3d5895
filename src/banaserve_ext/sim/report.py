# SPDX-License-Identifier: Apache-2.0
"""``banaserve sim report``: the whole comparison in one command.

Every system runs every workload (sustained time windows, see :mod:`.workloads`) on the same
cluster (Llama-3.1-70B, H100 TP4 x 4 instances = 16 GPUs) on one shared ladder of request
rates, from low to high, until it misses every SLO. Each run is judged under every SLO mode at
once (:func:`.metrics.attainments`), so one ladder gives the goodput under each:

* ``tpot``: DistServe's per-request rule (TTFT and mean TPOT), semi-PD's values (7.5x the
  single-request latency of the workload's mean request);
* ``p99-tbt``: the same TTFT and each request's P99 time-between-tokens <= 100 ms (DynaServe);
* ``mooncake-100/200/300``: TTFT <= 30 s and P99 TBT <= 100/200/300 ms (Mooncake's tiers).

Goodput = the highest rate with >= 90 % of requests within the SLO (interpolated between the
last passing and the first failing rung). Baselines at their best, per SLO and seed: vLLM over
chunk sizes, DistServe and SGLang-PD over every static P:D (the oracle split). The table cells
are medians over the seeds. Controller action logs (with reasons) go to ``actions/``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import Slo, attainments, goodput_from_points, tbt_stats
from .models import get_model
from .workloads import SHIFTS, WorkloadSpec, build_workload, preload

MODEL, GPU, TP, N = "llama-3.1-70b", "h100", 4, 4
MODES = ("tpot", "p99-tbt", "mooncake-100", "mooncake-200", "mooncake-300")
WORKLOADS = ("mooncake-conv", "azure-conv", "shift-azure", "shift-sharegpt-arxiv")
CHUNKS = (512, 1024, 2048)
#: rate ladder, as multiples of the workload's capacity guess
LADDER = tuple(1.35**k for k in range(-8, 3))
#: where the ladder walk starts, relative to the cost-model capacity guess (from a 1-seed,
#: 5-minute trial of this report); the walk goes as far down / up as the SLOs need either way
START_AT = {
    "mooncake-conv": 0.5,
    "azure-conv": 1.3,
    "shift-azure": 0.3,
    "shift-sharegpt-arxiv": 1.0,
}
PD = ("distserve", "sglang-pd", "banaserve")
#: the ladder climbs while one of these passes
CLIMB = ("tpot", "p99-tbt", "mooncake-100")
START_RUNG = 8  # index of 1.35 ** 0 in LADDER


@dataclass(frozen=True)
class Task:
    workload: str
    system: str
    variant: str  # "" | "chunk=512" | "P=2"
    seed: int
    rates: tuple[float, ...]
    duration_s: float


def slos_for(workload: str) -> dict[str, Slo]:
    from .experiments import workload_slo

    base = workload_slo(build_workload(WorkloadSpec(workload), 1.0), MODEL, TP)
    out = {
        "tpot": Slo(base.ttft_s, base.tpot_s, name="tpot"),
        "p99-tbt": Slo(base.ttft_s, base.tpot_s, mode="p99-tbt", tbt_s=0.1, name="p99-tbt"),
    }
    for tier in (100, 200, 300):
        out[f"mooncake-{tier}"] = Slo(
            30.0, base.tpot_s, mode="p99-tbt", tbt_s=tier / 1e3, name=f"mooncake-{tier}"
        )
    return out


def capacity_guess(workload: str) -> float:
    from .systems import make_cost

    cost = make_cost(get_model(MODEL), GPU, TP)
    reqs = build_workload(WorkloadSpec(workload), 1.0)
    mi = float(np.mean([min(r.input_len, 32768) for r in reqs]))
    mo = float(np.mean([r.output_len for r in reqs]))
    per = cost.prefill_s(int(mi)) + mo * cost.decode_step_s(32, int(32 * (mi + mo / 2))) / 32
    return N / per


def _setup(t: Task, slo: Slo, has_hashes: bool) -> Any:
    from .systems import Setup, make_cost

    model = get_model(MODEL)
    s = Setup(model, GPU, TP, N, slo, make_cost(model, GPU, TP), has_hashes, seed=t.seed)
    if t.variant.startswith("chunk="):
        s = replace(s, chunk=int(t.variant[6:]))
    elif t.variant.startswith("P="):
        s = replace(s, pd_prefill=int(t.variant[2:]))
    return s


def run_task(t: Task) -> dict:
    """One (workload, system variant, seed) up the rate ladder, stopping once every SLO
    misses."""
    from .systems import simulate

    slos = slos_for(t.workload)
    # controllers steer by the TBT SLO (DynaServe's own), the stricter of the two
    steer = slos["p99-tbt"]
    points: dict[int, dict] = {}
    events: list = []
    t0 = time.monotonic()

    def rung(i: int) -> dict:
        nonlocal events
        rate = t.rates[i]
        trace = build_workload(WorkloadSpec(t.workload, t.duration_s), rate, t.seed)
        s = _setup(t, steer, any(r.hash_ids for r in trace[:50]))
        _, sim = simulate(t.system, s, trace, summary=False)
        reqs = sim.finished
        p99, gaps = tbt_stats(reqs)
        att = attainments(reqs, slos, p99)
        ttft = np.array([r.t_first - r.arrival for r in reqs])
        points[i] = {
            "rate": len(trace) / t.duration_s,
            "att": att,
            "ttft_p90_s": float(np.percentile(ttft, 90)),
            "tbt_p99_ms": float(np.percentile(gaps, 99) * 1e3) if len(gaps) else 0.0,
            "preemptions": sum(r.preemptions for r in reqs),
        }
        ctrl = sim.controller
        if att["p99-tbt"] >= 0.9 and ctrl is not None and hasattr(ctrl, "events"):
            # the log of the busiest run that still meets the TBT SLO
            events = [(round(tt, 1), what) for tt, what in ctrl.events]
            events.insert(
                0, (0.0, f"(run at {len(trace) / t.duration_s:.2f} req/s, seed {t.seed})")
            )
        return att

    # walk the ladder from its middle: down until every SLO passes, up until every SLO misses
    start = min(START_RUNG, len(t.rates) - 1)
    att = rung(start)
    i = start
    while any(v < 0.9 for v in att.values()) and i > 0:
        i -= 1
        att = rung(i)
    i = start
    att = points[start]["att"]
    # up while a tight SLO still passes (the loose Mooncake tiers are capped, marked "≥", past
    # that point: the rungs up there are the most expensive to simulate)
    while any(att[m] >= 0.9 for m in CLIMB) and i + 1 < len(t.rates):
        i += 1
        att = rung(i)
    points = [points[k] for k in sorted(points)]  # type: ignore[assignment]
    return {
        "task": t.__dict__ | {"rates": list(t.rates)},
        "points": points,
        "events": events,
        "wall_s": time.monotonic() - t0,
    }


def tasks(
    workloads: tuple[str, ...], seeds: int, duration_s: float, stationary_s: float | None = None
) -> list[Task]:
    """Shifting-mix workloads run ``duration_s``, stationary ones ``stationary_s`` (default the
    same)."""
    out = []
    for wl in workloads:
        g = capacity_guess(wl) * START_AT.get(wl, 1.0)
        dur = duration_s if wl in SHIFTS or stationary_s is None else stationary_s
        rates = tuple(g * f for f in LADDER)
        hashes = wl.startswith("mooncake")
        for seed in range(seeds):
            variants = [("vllm", f"chunk={c}") for c in CHUNKS]
            variants += [("distserve", f"P={p}") for p in range(1, N)]
            if hashes:  # without prefix hashes SGLang's cache-aware routing has nothing to use
                variants += [("sglang-pd", f"P={p}") for p in range(1, N)]
            variants += [("llumnix", f"chunk={c}") for c in (512, 2048)]
            variants += [(s, "") for s in ("banaserve", "dynaserve", "semi-pd")]
            out += [Task(wl, s, v, seed, rates, dur) for s, v in variants]
    # the slowest first, so the pool's tail is short
    out.sort(key=lambda t: (t.workload != "mooncake-conv", t.system != "banaserve"))
    return out


def aggregate(results: list[dict]) -> dict:
    """goodput[workload][system][mode] = {median, per_seed, best_variant per seed, capped}."""
    per: dict = {}
    for r in results:
        t = r["task"]
        pts = r["points"]
        for m in MODES:
            g = goodput_from_points([(p["rate"], p["att"][m]) for p in pts], 0.9)
            capped = bool(pts) and pts[-1]["att"][m] >= 0.9
            key = (t["workload"], t["system"], m, t["seed"])
            best = per.get(key)
            if best is None or g > best[0]:
                per[key] = (g, t["variant"], capped)
    out: dict = {}
    for (wl, sysn, m, seed), (g, var, capped) in per.items():
        cell = (
            out.setdefault(wl, {})
            .setdefault(sysn, {})
            .setdefault(m, {"per_seed": {}, "variant": {}, "capped": False})
        )
        cell["per_seed"][seed] = g
        cell["variant"][seed] = var
        cell["capped"] |= capped
    for wl in out.values():
        for sysn in wl.values():
            for cell in sysn.values():
                cell["median"] = statistics.median(cell["per_seed"].values())
    return out


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "–"
    v = f"{cell['median']:.2f}"
    return ("≥" + v) if cell["capped"] else v


def tables(agg: dict, systems: tuple[str, ...]) -> str:
    lines = []
    for wl, per in agg.items():
        lines.append(f"\n#### {wl}\n")
        lines.append(
            "| SLO | " + " | ".join(systems) + " | best static PD | BanaServe / "
            "static PD | BanaServe / vLLM |"
        )
        lines.append("|---|" + "---|" * (len(systems) + 3))
        for m in MODES:
            cells = [_fmt(per.get(s, {}).get(m)) for s in systems]
            pd = max(
                (per[s][m]["median"] for s in ("distserve", "sglang-pd") if s in per),
                default=float("nan"),
            )
            b = per.get("banaserve", {}).get(m, {}).get("median", float("nan"))
            v = per.get("vllm", {}).get(m, {}).get("median", float("nan"))
            lines.append(
                f"| {m} | " + " | ".join(cells) + f" | {pd:.2f} | {_ratio(b, pd)} | "
                f"{_ratio(b, v)} |"
            )
        chosen = []
        for s in ("vllm", "distserve", "sglang-pd"):
            if s in per:
                chosen.append(
                    f"{s}: "
                    + ", ".join(
                        f"{m} {'/'.join(sorted(set(per[s][m]['variant'].values())))}" for m in MODES
                    )
                )
        lines.append("\nBest variant per SLO (over seeds): " + "; ".join(chosen))
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    if not (a == a and b == b):
        return "–"
    if b <= 0:
        return "∞" if a > 0 else "– (both 0)"
    return f"{a / b:.2f}x"


def targets(agg: dict) -> list[str]:
    out = []

    def g(wl: str, s: str, m: str) -> float:
        return agg.get(wl, {}).get(s, {}).get(m, {}).get("median", float("nan"))

    for wl in agg:
        pd = max(
            g(wl, "distserve", "p99-tbt"),
            g(wl, "sglang-pd", "p99-tbt") if "sglang-pd" in agg[wl] else 0.0,
        )
        b = g(wl, "banaserve", "p99-tbt")
        need = 1.2 if wl in SHIFTS else 1.0
        kind = "shifting-mix" if wl in SHIFTS else "stationary"
        out.append(
            f"- BanaServe >= {need}x best static PD ({kind}, {wl}, p99-tbt): "
            f"{b:.2f} vs {pd:.2f} = {_ratio(b, pd)} -> "
            f"{'HOLDS' if pd > 0 and b >= need * pd else 'MISSES'}"
        )
    wl = "mooncake-conv"
    if wl in agg:
        v = g(wl, "vllm", "p99-tbt")
        for s in PD:
            x = g(wl, s, "p99-tbt")
            need = 1.3 if s == "banaserve" else 1.0
            ok = x >= need * v if v > 0 else x > 0
            out.append(
                f"- {wl} p99-tbt: {s} >= {need}x vLLM at its best chunk: {x:.2f} vs "
                f"{v:.2f} = {_ratio(x, v)} -> {'HOLDS' if ok else 'MISSES'}"
            )
    wins = [
        wl
        for wl in agg
        if not wl.startswith("shift") and g(wl, "dynaserve", "p99-tbt") >= g(wl, "vllm", "p99-tbt")
    ]
    real = [wl for wl in agg if not wl.startswith("shift")]
    out.append(
        f"- DynaServe >= vLLM at its best (p99-tbt) on >= 2 real traces: on "
        f"{len(wins)} of {len(real)} ({', '.join(wins) or 'none'}) -> "
        f"{'HOLDS' if len(wins) >= 2 else 'MISSES'}"
    )
    return out


def report(
    out: Path,
    seeds: int = 3,
    duration_s: float = 1200.0,
    jobs: int = 2,
    stationary_s: float | None = 600.0,
    workloads: tuple[str, ...] = WORKLOADS,
    progress: Callable[[str], None] | None = None,
) -> str:
    from .systems import SYSTEMS

    out.mkdir(parents=True, exist_ok=True)
    preload(workloads, seeds)
    todo = tasks(workloads, seeds, duration_s, stationary_s)
    say = progress or (lambda s: None)
    t0 = time.monotonic()
    results = []
    say(f"{len(todo)} runs of a rate ladder ({len(LADDER)} rungs max), {jobs} processes")
    partial = (out / "runs.jsonl").open("w")  # one line per finished run, as they come
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for i, r in enumerate(pool.imap_unordered(run_task, todo), 1):
                results.append(r)
                partial.write(json.dumps(r, default=str) + "\n")
                partial.flush()
                _tick(say, i, len(todo), r, t0)
    else:
        for i, t in enumerate(todo, 1):
            r = run_task(t)
            results.append(r)
            partial.write(json.dumps(r, default=str) + "\n")
            partial.flush()
            _tick(say, i, len(todo), r, t0)
    partial.close()
    wall = time.monotonic() - t0
    agg = aggregate(results)
    systems = tuple(s for s in SYSTEMS if any(s in per for per in agg.values()))
    body = tables(agg, systems)
    tgt = targets(agg)
    pre = preemption_lines(results)
    slo_lines = []
    for wl in workloads:
        s = slos_for(wl)
        slo_lines.append(
            f"- {wl}: TTFT {s['tpot'].ttft_s:.2f} s, mean TPOT "
            f"{s['tpot'].tpot_s * 1e3:.0f} ms (tpot); TTFT {s['tpot'].ttft_s:.2f} s "
            "+ P99 TBT 100 ms (p99-tbt); TTFT 30 s + P99 TBT 100/200/300 ms "
            "(mooncake)"
        )
    st = stationary_s if stationary_s is not None else duration_s
    head = (
        f"Llama-3.1-70B, H100 TP4 x {N} instances (16 GPUs) for every system; "
        f"shifting mixes {duration_s / 60:.0f} minutes (phases of 4 minutes), stationary "
        f"traces a {st / 60:.0f}-minute window each (offset by the seed); goodput in "
        f"req/s at >= 90 % attainment, "
        f"median of {seeds} seeds; ≥ = still passing at the top rung. "
        f"Wall time {wall / 60:.1f} min on {os.cpu_count()} cores ({jobs} processes)."
    )
    text = "\n".join(
        [head, "", "SLOs:", *slo_lines, body, "", "Memory pressure:", *pre, "", "Targets:", *tgt]
    )
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(
        json.dumps({"aggregate": agg, "runs": results, "wall_s": wall}, indent=1, default=str)
    )
    adir = out / "actions"
    adir.mkdir(exist_ok=True)
    for r in results:
        t = r["task"]
        if r["events"] and t["seed"] == 0:
            lines = [f"{tt:8.1f} s  {what}" for tt, what in r["events"]]
            (adir / f"{t['workload']}_{t['system']}.log").write_text("\n".join(lines) + "\n")
    return text


def preemption_lines(results: list[dict]) -> list[str]:
    """Per workload and system: how many simulated rungs preempted at all, the most
    preemptions in one run, and whether any rung that met the TBT SLO preempted."""
    c: dict[tuple[str, str], list] = {}
    for r in results:
        t = r["task"]
        for p in r["points"]:
            v = c.setdefault((t["workload"], t["system"]), [0, 0, 0, 0])
            v[0] += 1
            v[1] += p["preemptions"] > 0
            v[2] = max(v[2], int(p["preemptions"]))
            v[3] += p["preemptions"] > 0 and p["att"]["p99-tbt"] >= 0.9
    out = []
    for wl in sorted({k[0] for k in c}):
        cells = [
            f"{s} {v[1]}/{v[0]} (max {v[2]}, {v[3]} within the TBT SLO)"
            for (w, s), v in sorted(c.items())
            if w == wl
        ]
        out.append(f"- {wl}: rungs with preemptions: " + "; ".join(cells))
    return out


def _tick(say: Callable[[str], None], i: int, n: int, r: dict, t0: float) -> None:
    el = time.monotonic() - t0
    t = r["task"]
    say(
        f"[{i}/{n}] {el / 60:5.1f} min, ETA {el / i * (n - i) / 60:4.1f} min: {t['workload']} "
        f"{t['system']} {t['variant']} seed {t['seed']} ({len(r['points'])} rungs, "
        f"{r['wall_s']:.0f} s)"
    )


def main_progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


__all__ = ["MODES", "WORKLOADS", "report", "run_task", "slos_for", "tasks"]

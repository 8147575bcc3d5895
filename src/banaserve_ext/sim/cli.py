# SPDX-License-Identifier: Apache-2.0
"""``banaserve sim``: replay measured requests, run a cluster, reproduce the routing ablation,
compare the controllers against the baselines.

    banaserve sim replay --requests REQ.jsonl --profile DIR --max-num-seqs 128 \\
        --max-num-batched-tokens 2048 --json
    banaserve sim run --trace mooncake-conv --system banaserve --model llama-3.1-70b --gpu h100
    banaserve sim ablation [--limit N] [--json]
    banaserve sim compare --out DIR [--plots]
    banaserve sim report [--out bench/sim/results] [--seeds 3] [--minutes 20] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from ..errors import BanaserveError, InvalidArgumentError


class ProgressBar:
    """A one-line progress bar on stderr (simulated fraction done, wall time)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last = -1

    def __call__(self, frac: float) -> None:
        if not self.enabled:
            return
        pct = int(frac * 100)
        if pct == self.last:
            return
        self.last = pct
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        sys.stderr.write(f"\r{self.label} [{bar}] {pct:3d}% {time.monotonic() - self.t0:6.1f}s")
        if pct >= 100:
            sys.stderr.write("\n")
        sys.stderr.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)

    rp = sub.add_parser("replay", help="replay measured requests through one vLLM-like instance")
    rp.add_argument("--requests", required=True, help="requests JSONL (LLMServingSim or Mooncake)")
    rp.add_argument("--profile", required=True, help="per-layer profile directory (meta.yaml)")
    rp.add_argument("--model", default=None, help="model name (default: from meta.yaml)")
    rp.add_argument("--gpu", default=None, help="GPU name (default: from meta.yaml)")
    rp.add_argument("--tp", type=int, default=1)
    rp.add_argument("--max-num-seqs", type=int, default=256)
    rp.add_argument("--max-num-batched-tokens", type=int, default=2048)
    rp.add_argument("--json", action="store_true", help="print the summary as JSON")
    rp.add_argument("--progress", action="store_true")

    run = sub.add_parser("run", help="simulate one system on one trace")
    _cluster_args(run)
    run.add_argument("--system", default="banaserve", help="one of: " + ", ".join(_systems()))
    run.add_argument("--json", action="store_true")
    run.add_argument("--progress", action="store_true")

    ab = sub.add_parser("ablation", help="Mooncake's routing ablation on the conversation trace")
    ab.add_argument("--limit", type=int, default=None, help="first N requests only")
    ab.add_argument("--rate-scale", type=float, default=None)
    ab.add_argument("--json", action="store_true")
    ab.add_argument("--progress", action="store_true")

    cp = sub.add_parser("compare", help="controllers vs baselines: tables and PNG plots")
    cp.add_argument("--out", default="sim-results", help="directory for tables and plots")
    cp.add_argument("--limit", type=int, default=2000, help="requests per trace")
    cp.add_argument("--plots", action="store_true", help="write PNG plots (needs matplotlib)")
    cp.add_argument("--quick", action="store_true", help="fewer bisection steps")

    rep = sub.add_parser(
        "report",
        help="the whole comparison: every system, workload and SLO "
        "mode (tables, action logs) under --out",
    )
    rep.add_argument("--out", default="bench/sim/results", help="output directory")
    rep.add_argument("--seeds", type=int, default=3, help="seeds per cell (median reported)")
    rep.add_argument(
        "--minutes",
        type=float,
        default=20.0,
        help="simulated minutes per run of a shifting-mix workload",
    )
    rep.add_argument(
        "--stationary-minutes",
        type=float,
        default=10.0,
        help="simulated minutes per run of a stationary trace window",
    )
    rep.add_argument("--jobs", type=int, default=2, help="worker processes")
    rep.add_argument(
        "--workloads",
        default=None,
        help="comma-separated subset (default: all of the report's workloads)",
    )


def _systems() -> list[str]:
    from .systems import SYSTEMS

    return sorted(SYSTEMS)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace",
        default="mooncake-conv",
        help="mooncake-conv | mooncake-synth | azure-code | azure-conv | sharegpt | PATH",
    )
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="target mean request rate (rescales the trace's arrivals)",
    )
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--instances", type=int, default=8, help="GPU groups in the cluster")
    p.add_argument("--ttft-slo", type=float, default=None, help="TTFT SLO (s)")
    p.add_argument("--tpot-slo", type=float, default=None, help="TPOT SLO (s)")


def _meta_field(profile: Path, key: str) -> str | None:
    meta = profile / "meta.yaml"
    if not meta.is_file():
        return None
    for line in meta.read_text().splitlines():
        m = re.match(rf"^{key}:\s*(\S+)", line)
        if m:
            return m.group(1).strip("'\"")
    return None


def _load_requests(path: str):  # -> list[TraceRequest]
    from .traces import load_llmservingsim_requests, load_mooncake

    p = Path(path)
    first = ""
    if p.is_file():
        with p.open() as f:
            first = f.readline()
    if "arrival_time" in first:
        return load_llmservingsim_requests(p)
    return load_mooncake(p)


def replay(args: argparse.Namespace) -> dict[str, float]:
    from ..policies import make_policy
    from .cluster import Simulator
    from .cost import ProfileCostModel
    from .engine import ClusterConfig
    from .metrics import summarize
    from .models import get_gpu, get_model

    profile = Path(args.profile)
    if not profile.is_dir():
        raise InvalidArgumentError(f"--profile {profile}: not a directory")
    model_name = args.model or (_meta_field(profile, "model") or "").split("/")[-1]
    if not model_name:
        raise InvalidArgumentError(f"--model not given and {profile}/meta.yaml names no model")
    gpu_name = args.gpu or _meta_field(profile, "hardware")
    if not gpu_name:
        raise InvalidArgumentError(f"--gpu not given and {profile}/meta.yaml names no hardware")
    model = get_model(model_name)
    gpu = get_gpu(gpu_name)
    reqs = _load_requests(args.requests)
    cost = ProfileCostModel(profile, model, args.tp)
    cfg = ClusterConfig(
        model,
        gpu,
        args.tp,
        n_colocated=1,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_num_batched_tokens,
    )
    sim = Simulator(
        cfg,
        cost,
        policy=make_policy("round_robin"),
        tick_s=0,
        progress=ProgressBar("replay", args.progress),
    )
    t0 = time.monotonic()
    out = sim.run(reqs)
    res = summarize(out)
    res["wall_s"] = time.monotonic() - t0
    return res


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "replay":
            res = replay(args)
            _print(res, args.json)
        elif args.action == "run":
            from .systems import run_system

            res = run_system(args, progress=ProgressBar(args.system, args.progress))
            _print(res, args.json)
        elif args.action == "ablation":
            from .experiments import routing_ablation

            res = routing_ablation(
                limit=args.limit, rate_scale=args.rate_scale, progress=args.progress
            )
            if args.json:
                print(json.dumps(res, indent=2))
            else:
                print(res["table"])
        elif args.action == "compare":
            from .experiments import compare

            print(compare(Path(args.out), limit=args.limit, plots=args.plots, quick=args.quick))
        elif args.action == "report":
            from .report import WORKLOADS, main_progress, report

            wls = tuple(w for w in args.workloads.split(",") if w) if args.workloads else WORKLOADS
            if args.seeds < 1 or args.jobs < 1 or min(args.minutes, args.stationary_minutes) <= 0:
                raise InvalidArgumentError("--seeds and --jobs must be >= 1, minutes > 0")
            print(
                report(
                    Path(args.out),
                    seeds=args.seeds,
                    duration_s=args.minutes * 60,
                    stationary_s=args.stationary_minutes * 60,
                    jobs=args.jobs,
                    workloads=wls,
                    progress=main_progress,
                )
            )
        return 0
    except BanaserveError as exc:
        print(f"banaserve sim: error: {exc}", file=sys.stderr)
        return 2


def _print(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return
    for k, v in res.items():
        print(f"{k:>22}: {v:.3f}" if isinstance(v, float) else f"{k:>22}: {v}")

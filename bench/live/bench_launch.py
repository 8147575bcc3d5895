# SPDX-License-Identifier: Apache-2.0
"""BanaServe vs the stock SGLang deployment, live, in one run (issue 14's benchmark).

    PYTHONPATH=src .venv/bin/python bench/live/bench_launch.py            # R=2, 24 requests
    PYTHONPATH=src .venv/bin/python bench/live/bench_launch.py --repeats 3 --requests 32

Each repeat starts ``banaserve launch`` (BanaServe: KV store, HiCache L3 on prefill, role switch,
``load_aware`` router, controller) and ``banaserve launch --baseline sglang`` (``sglang_router``
``cache_aware``, no store, no controller) one after the other, alternating which goes first, and
both replay the same slice: whole multi-turn conversations of the Mooncake conversation trace
(``--replay-conversations``), whose prefix hashes become identical token blocks, so the prefix
cache has real work. Every server runs with ``--enable-metrics``, so the replay record
(``--replay-out``) holds each server's prefilled tokens and cache counters.

Per deployment: TTFT and TPOT p50/p99, output tokens/s, failed requests, prefix hit rate (local:
radix tree incl. HiCache host memory; store: HiCache L3 from the KV store; from SGLang's per-request
``cached_tokens_details``), the busiest prefill worker's share of prompt tokens over its fair share,
the KV store's counters and the controller's actions with their measured costs (its decision log).
Reports medians over the repeats and the median of the same-repeat ratios BanaServe / baseline,
writes ``results/launch-<UTC time>.json`` and ``.md``. ``--update-costs`` writes a flip time this
run measured into ``banaserve_ext/data/costs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "traces" / "mooncake_fast25"
DEFAULT_TRACE = DEFAULT_TRACE / "conversation_trace.jsonl"
KINDS = ("banaserve", "sglang")
#: (key in the row, label, format) of the table
COLUMNS = (
    ("failed", "failed", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.2f}"),
    ("tpot_p50_s", "TPOT p50 (s)", "{:.3f}"),
    ("tpot_p99_s", "TPOT p99 (s)", "{:.3f}"),
    ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("hit_rate_local", "hit local", "{:.1%}"),
    ("hit_rate_l2", "of which L2", "{:.1%}"),
    ("hit_rate_store", "hit store", "{:.1%}"),
    ("busiest_share", "busiest P / fair", "{:.2f}"),
    ("wall_s", "replay wall (s)", "{:.0f}"),
)


def row_of(record: dict) -> dict:
    """The table row of one ``--replay-out`` record."""
    s, c = record["summary"], record["cache"]
    keys = ("failed", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
            "output_tokens_per_s", "wall_s", "requests")  # fmt: skip
    row = {k: s[k] for k in keys}
    row |= {k: c[k] for k in ("hit_rate", "hit_rate_local", "hit_rate_store", "prompt_tokens")}
    # the HiCache host-memory (L2) part of the local hits, from the servers' own counters
    servers = [x for x in record["counters"]["servers"].values() if x]
    host = sum(x.get("hit_host", 0.0) for x in servers)
    row["hit_rate_l2"] = host / c["prompt_tokens"] if servers and c["prompt_tokens"] else None
    row["busiest_share"] = record["prefill_load"]["busiest_share"]
    return row


def medians(rows: list[dict]) -> dict:
    """Per key, the median of the rows that have a number there (``None`` when none has)."""
    out: dict = {}
    for k in rows[0] if rows else ():
        vals = [r[k] for r in rows if isinstance(r.get(k), int | float)]
        out[k] = statistics.median(vals) if vals else None
    return out


def ratios(ours: list[dict], base: list[dict]) -> dict:
    """Median over repeats of ``ours[i][k] / base[i][k]`` (same repeat; skipped where the
    baseline value is 0 or missing)."""
    out: dict = {}
    for k in ours[0] if ours else ():
        vals = [
            a[k] / b[k]
            for a, b in zip(ours, base, strict=False)
            if isinstance(a.get(k), int | float) and isinstance(b.get(k), int | float) and b[k]
        ]
        out[k] = statistics.median(vals) if vals else None
    return out


def actions_of(decisions: list[dict]) -> list[dict]:
    """The controller's acted-on decisions (no ``not_actuated``), with their measured costs."""
    keep = ("action", "outcome", "predicted_cost_s", "measured_cost_s", "costs", "detail")
    return [{k: d.get(k) for k in keep} for d in decisions if d.get("outcome") != "not_actuated"]


def flip_costs(actions: list[dict]) -> dict | None:
    """Median drain, switch and drain + switch seconds of the successful flips (None if none)."""
    flips = [a["costs"] for a in actions
             if a["action"] == "FlipRole" and a["outcome"] == "ok" and a.get("costs")]  # fmt: skip
    if not flips:
        return None
    med = {k: statistics.median(f[k] for f in flips) for k in ("drain_s", "switch_s")}
    med["total_s"] = statistics.median(f["drain_s"] + f["switch_s"] for f in flips)
    med["n"] = len(flips)
    return med


def _fmt(v: object, f: str) -> str:
    return "n/a" if v is None else f.format(v)


def markdown(result: dict) -> str:
    head = "| deployment | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for kind in KINDS:
        med = result["median"][kind]
        lines.append(f"| {kind} (median of {result['complete_repeats']}) | "
                     + " | ".join(_fmt(med.get(k), f) for k, _, f in COLUMNS) + " |")  # fmt: skip
    rat = result["ratio_banaserve_over_sglang"]
    cells = " | ".join(_fmt(rat.get(k), "{:.2f}") for k, _, _ in COLUMNS)
    lines.append(f"| BanaServe / baseline (median of same-repeat ratios) | {cells} |")
    return "\n".join(lines) + "\n"


# -- running ------------------------------------------------------------------------------------


class LoadSampler:
    """1-minute load average every ``period_s`` seconds while running."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadSampler:
        def loop() -> None:
            while not self._stop.is_set():
                self.samples.append(os.getloadavg()[0])
                self._stop.wait(self.period_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [0.0]
        return {"mean": statistics.fmean(s), "max": max(s), "n": len(self.samples)}


def launch_once(kind: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """One ``banaserve launch --replay`` of ``kind``; its record, decisions and load."""
    out = run_dir / "replay.json"
    cmd = [sys.executable, "-m", "banaserve_ext", "launch", "--baseline", kind,
           "--prefill", str(args.prefill), "--decode", str(args.decode), "--dtype", args.dtype,
           "--replay", str(args.trace), "--replay-conversations",
           "--replay-requests", str(args.requests), "--replay-rate", str(args.rate),
           "--replay-max-output", str(args.max_output), "--server-arg=--enable-metrics",
           "--log-dir", str(run_dir), "--replay-out", str(out), "--json",
           "--status-interval", "0"]  # fmt: skip
    if kind == "banaserve" and args.hicache_size is not None:
        cmd.append(f"--server-arg=--hicache-size={args.hicache_size}")
    env = dict(os.environ)
    if kind == "sglang" and args.mooncake_path:
        # SGLang imports `mooncake` from here; `launch` then picks the mooncake backend
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"),
                                                           str(args.mooncake_path)]))  # fmt: skip
        env.setdefault("MOONCAKE_PROTOCOL", "tcp")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with LoadSampler() as load, (run_dir / "launch.err").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        try:
            stdout, _ = proc.communicate(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # launch stops every process it started
            stdout, _ = proc.communicate(timeout=120)
    rec: dict = {"kind": kind, "rc": proc.returncode, "total_s": time.monotonic() - t0,
                 "load_avg_1m": load.summary(), "log_dir": str(run_dir)}  # fmt: skip
    if not out.is_file():
        tail = (run_dir / "launch.err").read_text()[-1500:]
        print(
            f"  {kind}: no replay record (rc {proc.returncode}); stderr tail:\n{tail}", flush=True
        )
        return rec | {"replay": None, "actions": [], "error": tail}
    rec["replay"] = json.loads(out.read_text())
    dec = run_dir / "decisions.jsonl"
    decisions = [json.loads(x) for x in dec.read_text().splitlines() if x.strip()] if (
        dec.is_file()) else []  # fmt: skip
    rec["decisions_total"] = len(decisions)
    rec["not_actuated"] = sum(d.get("outcome") == "not_actuated" for d in decisions)
    rec["actions"] = actions_of(decisions)
    rec["row"] = row_of(rec["replay"])
    print(
        f"  {kind}: rc {proc.returncode}, {rec['total_s']:.0f}s incl. start, load "
        f"{rec['load_avg_1m']['mean']:.1f}, {json.dumps(rec['row'])}",
        flush=True,
    )
    return rec


def update_costs(path: Path, flip: dict, result_file: str) -> None:
    """Writes the measured SGLang switch time into ``flip_cost_s`` (the simulator charges the drain
    separately) and keeps the drain and drain + switch beside it, with their provenance."""
    data = json.loads(path.read_text())
    src = (f"measured live by bench/live/bench_launch.py ({result_file}): median of {flip['n']} "
           f"controller flips during a Mooncake conversation replay, SGLang 0.5.23 POST "
           f"/pd_role_switch after the drain, banaserve transfer backend, tiny Llama on a shared "
           f"2-core CPU box")  # fmt: skip
    prev = data.get("flip_cost_s", {})
    previous = {k: prev[k] for k in ("value", "source") if k in prev}
    data["flip_cost_s"] = {"value": round(flip["switch_s"], 3), "source": src, "previous": previous}
    data["flip_live"] = {
        "drain_s": round(flip["drain_s"], 3), "switch_s": round(flip["switch_s"], 3),
        "drain_plus_switch_s": round(flip["total_s"], 3), "n": flip["n"], "source": src,
    }  # fmt: skip
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=2.0, help="mean arrival rate, requests/s")
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--mooncake-path", type=Path, default=None,
                   help="a directory holding the `mooncake` package (pip install --target), put "
                   "on the baseline's PYTHONPATH only")  # fmt: skip
    p.add_argument(
        "--hicache-size",
        type=float,
        default=0,
        help="BanaServe prefill servers' HiCache host tier (L2) in GB; 0 (default): "
        "SGLang's hicache_ratio, 2x the device KV pool (launch's own 1 GB does not "
        "fit beside the other jobs on this box); L3 hits need an L2 that overflows",
    )
    p.add_argument("--run-timeout", type=float, default=420.0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--logs", type=Path, default=ROOT / "out" / "live-bench")
    p.add_argument("--update-costs", action="store_true",
                   help="write a measured flip time into data/costs.json")  # fmt: skip
    p.add_argument("--rerender", type=Path, default=None, metavar="RESULT_JSON",
                   help="recompute the table of an earlier run's JSON, run nothing")  # fmt: skip
    args = p.parse_args(argv)
    if args.rerender is not None:
        write(aggregate(json.loads(args.rerender.read_text())), args.rerender.with_suffix(""))
        return 0
    if not args.trace.is_file():
        raise SystemExit(f"trace not found: {args.trace}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")  # noqa: UP017
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    t0 = time.monotonic()
    with LoadSampler(10.0) as load:
        for r in range(args.repeats):
            order = KINDS if r % 2 == 0 else KINDS[::-1]
            print(f"repeat {r + 1}/{args.repeats}: {' then '.join(order)}", flush=True)
            for kind in order:
                runs[kind].append(launch_once(kind, args, args.logs / stamp / f"{r}-{kind}"))
                partial = args.logs / stamp / "partial.json"
                partial.write_text(json.dumps({"runs": runs, "argv": sys.argv[1:]}))
    result = {
        "stamp": stamp, "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(), "bench_wall_s": time.monotonic() - t0,
        "load_avg_1m": load.summary(), "runs": runs,
    }  # fmt: skip
    base = args.out / f"launch-{stamp}"
    write(aggregate(result), base)
    if args.update_costs and result["flip_costs"]:
        costs = ROOT / "src" / "banaserve_ext" / "data" / "costs.json"
        update_costs(costs, result["flip_costs"], base.with_suffix(".json").name)
        print(f"updated {costs}")
    return 0 if all(x["rc"] == 0 for v in runs.values() for x in v) else 1


def aggregate(result: dict) -> dict:
    """Adds the rows, medians, same-repeat ratios and controller actions to ``result``."""
    runs = result["runs"]
    for v in runs.values():
        for x in v:
            x["row"] = row_of(x["replay"]) if x.get("replay") else None
    # only repeats where both deployments produced a record count
    pairs = [(a, b) for a, b in zip(runs["banaserve"], runs["sglang"], strict=False)
             if a["row"] and b["row"]]  # fmt: skip
    rows = {"banaserve": [a["row"] for a, _ in pairs], "sglang": [b["row"] for _, b in pairs]}
    actions = [a for x in runs["banaserve"] for a in x["actions"]]
    return result | {
        "complete_repeats": len(pairs),
        "median": {k: medians(v) for k, v in rows.items()},
        "ratio_banaserve_over_sglang": ratios(rows["banaserve"], rows["sglang"]),
        "transfer_backend": {k: next((x["replay"]["transfer_backend"] for x in v if x["replay"]),
                                     None) for k, v in runs.items()},
        "controller_actions": actions, "flip_costs": flip_costs(actions),
    }  # fmt: skip


def write(result: dict, base: Path) -> None:
    """``base``.json (everything) and ``base``.md (the table), printed too."""
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    load = result["load_avg_1m"]
    table = markdown(result)
    cmd = " ".join(["bench/live/bench_launch.py", *result["argv"]])
    base.with_suffix(".md").write_text(
        f"`{cmd}`, {result['stamp']}, load average {load['mean']:.1f} (max {load['max']:.1f}) "
        f"on {result['cpus']} CPUs, transfer backends {result['transfer_backend']}\n\n{table}"
    )
    print(table)
    print(f"controller actions: {len(result['controller_actions'])}; "
          f"flips: {result['flip_costs']}")  # fmt: skip
    print(f"wrote {base.with_suffix('.json')} and .md")


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""Request hand-off through the global KV store on the CPU deployment (a benchmark, not a test).

Two unified SGLang servers (tiny Llama, float32, HiCache write-through with L3 on the banaserve
pool), as in ``python_tests/sglang/test_sglang_handoff.py``; the pool is reached through shared
memory (``"pool"``) or over the transfer engine's TCP path (``"pool_address"``, a
:class:`~banaserve_ext.kvpool.RemoteKVPool` per server against an in-process ``PoolServer``).

1. ``cost``: hand-off time against tokens moved. Per prefix length ``L`` and run, a fresh prompt:
   A computes it (``max_new_tokens=1``); the router's :class:`L3Watcher` polls the pool until all
   ``L`` pages are there (``store_wait``); B then answers the same prompt with one token
   (``ttft_warm``: its HiCache prefetches the prefix from the pool and computes one token) and,
   for comparison, another fresh prompt of ``L`` tokens cold (``ttft_cold``: full prefill). The
   hand-off time is ``store_wait + ttft_warm``; ``t = fixed + L * per_token`` is fitted on the
   medians. Also fitted: prefill seconds per token (``ttft_cold`` against ``L``).
2. ``e2e``: added latency per handed-off request. The same requests through our router with and
   without a forced boundary (``X-Banaserve-Handoff-At: n + k``), interleaved in one run, medians
   of ``--runs``; ratio split/whole. The whole runs also give the decode seconds per token.

``PYTHONPATH=src .venv/bin/python bench/handoff/bench_handoff.py [--pool shm,tcp] [--runs 3]``
writes ``bench/handoff/results/handoff-<pool>.json`` (one file per pool) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python_tests"))

from sglang_testbed.cluster import Cluster  # noqa: E402

from banaserve_ext.kvpool import KVPool  # noqa: E402
from banaserve_ext.kvpool.server import PoolServer  # noqa: E402
from banaserve_ext.launch.servers import http_json, kv_slot_leaks  # noqa: E402
from banaserve_ext.launch.tiny_model import create_tiny_llama  # noqa: E402
from banaserve_ext.router.config import RouterConfig, WorkerSpec  # noqa: E402
from banaserve_ext.router.handoff import SPLIT_HEADER, HandoffConfig, L3Watcher  # noqa: E402
from banaserve_ext.router.server import Router  # noqa: E402


def page_bytes(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4


_seed = [0]


def prompt(n: int) -> list[int]:
    """A prompt no earlier request shares a page with."""
    _seed[0] += 1
    rng = np.random.default_rng(_seed[0])
    return [int(t) for t in rng.integers(3, 1000, size=n)]


def gen(url: str, ids: list[int], new: int, headers: dict | None = None) -> tuple[float, dict]:
    import http.client

    host, port = url.removeprefix("http://").split(":")
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": new, "temperature": 0.0, "ignore_eos": True},
    }
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/generate", json.dumps(body),
                 {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    resp = conn.getresponse()
    raw = resp.read()
    dt = time.perf_counter() - t0
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{url}/generate answered {resp.status}: {raw[:300]!r}")
    return dt, json.loads(raw)


def gen_stream(url: str, ids: list[int], new: int, headers: dict | None = None) -> dict:
    """Streaming ``/generate``: total time, time to first token and the time each output
    token arrived (several tokens of one event share its time)."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": new, "temperature": 0.0, "ignore_eos": True},
    }
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/generate", json.dumps(body),
                 {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{url}/generate answered {resp.status}: {resp.read()[:300]!r}")
    at: list[float] = []
    last: dict = {}
    for line in resp:
        line = line.strip()
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            last = json.loads(line[5:])
            now = time.perf_counter() - t0
            at += [now] * (len(last["output_ids"]) - len(at))
    total = time.perf_counter() - t0
    conn.close()
    return {"total_s": total, "token_at": at, "final": last}


class RouterThread:
    def __init__(self, cfg: RouterConfig, handoff: HandoffConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.router = Router(cfg)
        self.router.enable_handoff(handoff)
        asyncio.run_coroutine_threadsafe(self.router.start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{self.router.bound_port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.router.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def fit(xs: list[float], ys: list[float]) -> dict:
    slope, icpt = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return {"fixed_s": round(float(icpt), 5), "per_token_s": float(f"{slope:.4g}")}


def med(v: list[float]) -> float:
    return round(statistics.median(v), 5)


def run(kind: str, lengths: list[int], runs: int, e2e_n: int, e2e_new: int, e2e_k: int,
        tmp: Path) -> dict:  # fmt: skip
    model = create_tiny_llama(tmp / "model")
    pb = page_bytes(model)
    name = f"bench-handoff-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pool = KVPool(name, create=True, capacity_bytes=256 << 20, page_size=pb).start()
    remote = PoolServer(pool, "127.0.0.1", 0).start() if kind == "tcp" else None
    extra: dict = {"backend_name": "banaserve", "interface_v1": 1, "prefetch_threshold": 1,
                   "module_path": "banaserve_ext.adapters.sglang.hicache",
                   "class_name": "BanaserveHiCacheStorage", "pool": name}  # fmt: skip
    if remote is not None:
        extra["pool_address"] = remote.address
    args = ("--dtype", "float32", "--enable-hierarchical-cache", "--hicache-io-backend", "direct",
            "--hicache-mem-layout", "layer_first", "--hicache-size", "1",
            "--hicache-write-policy", "write_through", "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", json.dumps(extra),
            "--hicache-storage-prefetch-policy", "wait_complete")  # fmt: skip
    cluster = Cluster(model, tmp / f"logs-{kind}")
    out: dict = {"pool": kind, "page_bytes": pb, "page_tokens": 1, "lengths": lengths,
                 "runs": runs, "load_before": os.getloadavg()}  # fmt: skip
    rt = None
    try:
        a, pa = cluster.server("single", wait=False, extra_args=args)
        b, pb_ = cluster.server("single", wait=False, extra_args=args)
        for proc in (pa, pb_):  # a loaded box: starting takes longer than the tests allow
            proc.wait_ready(900.0)
        watcher = L3Watcher(name)
        _, info = http_json(f"{a.url}/get_server_info")
        assert isinstance(info, dict)
        watcher.learn(info)
        out["server_page_size"] = watcher.page_size
        for url in (a.url, b.url):  # warm-up: first-request costs out of the numbers
            gen(url, prompt(32), 4)
        # -- 1. hand-off cost against tokens moved --------------------------------------------
        rows = []
        for n in lengths:
            rec: dict = {"tokens": n, "kv_bytes": n * pb}
            for k in ("a_prefill", "store_wait", "ttft_warm", "ttft_cold", "reused", "pages_found"):
                rec[k] = []
            for _ in range(runs):
                ids = prompt(n)
                dt, _ = gen(a.url, ids, 1)
                rec["a_prefill"].append(dt)
                t0 = time.perf_counter()
                found, wanted = asyncio.run(watcher.wait(ids, 60.0, 0.005))
                rec["store_wait"].append(time.perf_counter() - t0)
                rec["pages_found"].append(found / max(1, wanted))
                dt, ans = gen(b.url, ids, 1)
                rec["ttft_warm"].append(dt)
                rec["reused"].append(ans["meta_info"].get("cached_tokens"))
                dt, _ = gen(b.url, prompt(n), 1)
                rec["ttft_cold"].append(dt)
            for k in ("a_prefill", "store_wait", "ttft_warm", "ttft_cold"):
                rec[k + "_med"] = med(rec[k])
            rec["handoff_med"] = round(rec["store_wait_med"] + rec["ttft_warm_med"], 5)
            rows.append(rec)
            ms = {
                k: round(rec[k + "_med"] * 1e3, 1) for k in ("store_wait", "ttft_warm", "ttft_cold")
            }
            print(
                f"[{kind}] L={n} {ms} reused={rec['reused']} found={rec['pages_found']}", flush=True
            )
        out["cost"] = rows
        xs = [r["tokens"] for r in rows]
        out["fit_handoff"] = fit(xs, [r["handoff_med"] for r in rows])
        out["fit_store_wait"] = fit(xs, [r["store_wait_med"] for r in rows])
        out["fit_ttft_warm"] = fit(xs, [r["ttft_warm_med"] for r in rows])
        out["fit_ttft_cold"] = fit(xs, [r["ttft_cold_med"] for r in rows])
        # -- 2. added latency per handed-off request ------------------------------------------
        rcfg = RouterConfig(
            workers=[WorkerSpec(a.url, "colocated"), WorkerSpec(b.url, "colocated")],
            pd_disaggregation=False, port=0, prometheus_port=None, policy="round_robin",
            disable_health_check=True, load_monitor_interval=0.0, disable_retries=True,
        )  # fmt: skip
        rt = RouterThread(rcfg, HandoffConfig(kv_pool=name, l3_wait_s=60.0))
        whole, split, waits, gaps, itl = [], [], [], [], []
        for _ in range(runs):
            for forced in (False, True):  # interleaved; fresh prompts, nothing cached
                ids = prompt(e2e_n)
                hdr = {SPLIT_HEADER: str(e2e_n + e2e_k)} if forced else None
                res = gen_stream(rt.url, ids, e2e_new, hdr)
                ho = res["final"]["meta_info"]["handoff"]
                assert (ho["second"] is not None) == forced, ho
                at = res["token_at"]
                assert len(at) == e2e_new, len(at)
                (split if forced else whole).append(res["total_s"])
                if forced:
                    waits.append(ho.get("l3_wait_s"))
                    gaps.append(at[e2e_k] - at[e2e_k - 1])  # last of A -> first of B
                else:
                    itl.append(statistics.median(np.diff(at[1:])) if len(at) > 2 else 0.0)
        out["e2e"] = {
            "prompt_tokens": e2e_n, "new_tokens": e2e_new, "split_after_output": e2e_k,
            "whole_s": whole, "split_s": split, "l3_wait_s": waits,
            "handoff_gap_s": gaps, "whole_itl_s": itl,
            "whole_med": med(whole), "split_med": med(split),
            "added_med_s": round(med(split) - med(whole), 5),
            "ratio_med": round(med(split) / med(whole), 4),
            "handoff_gap_med": med(gaps), "itl_med": med(itl),
        }  # fmt: skip
        print(
            f"[{kind}] e2e n={e2e_n} new={e2e_new}: whole {med(whole):.3f} s, "
            f"split {med(split):.3f} s, ratio {med(split) / med(whole):.3f}, hand-off gap "
            f"{med(gaps) * 1e3:.0f} ms vs inter-token {med(itl) * 1e3:.0f} ms",
            flush=True,
        )
        out["leaks"] = kv_slot_leaks(a.url) + kv_slot_leaks(b.url)
        out["load_after"] = os.getloadavg()
    finally:
        if rt is not None:
            rt.close()
        cluster.close()
        if remote is not None:
            remote.stop()
        pool.close()
    return out


def table(outdir: Path) -> str:
    """Markdown tables of every ``handoff-*.json`` under ``outdir``."""
    lines = ["| pool | tokens moved | KV bytes | A prefill | store wait | B TTFT warm | "
             "B TTFT cold | hand-off (wait + warm) | warm / cold | reused |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    e2e = ["| pool | prompt | output | split after | whole (s) | split (s) | added (s) | "
           "split / whole | hand-off gap (ms) | inter-token (ms) | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fits = []
    for p in sorted(outdir.glob("handoff-*.json")):
        d = json.loads(p.read_text())
        for r in d["cost"]:
            ms = {k: r[k + "_med"] * 1e3 for k in ("a_prefill", "store_wait", "ttft_warm",
                                                   "ttft_cold")}  # fmt: skip
            lines.append(
                f"| {d['pool']} | {r['tokens']} | {r['kv_bytes']} | {ms['a_prefill']:.0f} ms | "
                f"{ms['store_wait']:.1f} ms | {ms['ttft_warm']:.0f} ms | {ms['ttft_cold']:.0f} ms"
                f" | {r['handoff_med'] * 1e3:.0f} ms"
                f" | {r['ttft_warm_med'] / r['ttft_cold_med']:.2f}"
                f" | {min(x or 0 for x in r['reused'])}/{r['tokens']} |"
            )
        e = d["e2e"]
        load = ", ".join(f"{x:.1f}" for x in d["load_before"]) + " → " + ", ".join(
            f"{x:.1f}" for x in d["load_after"])  # fmt: skip
        e2e.append(
            f"| {d['pool']} | {e['prompt_tokens']} | {e['new_tokens']} | "
            f"{e['split_after_output']} | {e['whole_med']:.2f} | {e['split_med']:.2f} | "
            f"{e['added_med_s']:.2f} | {e['ratio_med']:.2f} | {e['handoff_gap_med'] * 1e3:.0f} | "
            f"{e['itl_med'] * 1e3:.0f} | {load} |"
        )
        for k in ("fit_handoff", "fit_store_wait", "fit_ttft_warm", "fit_ttft_cold"):
            f = d[k]
            fits.append(f"- {d['pool']} {k[4:]}: {f['fixed_s'] * 1e3:.1f} ms + "
                        f"{f['per_token_s'] * 1e6:.1f} µs/token")  # fmt: skip
    return "\n".join(lines + [""] + e2e + [""] + fits) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default="shm,tcp", help="shm, tcp or shm,tcp")
    ap.add_argument("--lengths", default="32,256,1024,2048")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--e2e-prompt", type=int, default=512)
    ap.add_argument("--e2e-new", type=int, default=64)
    ap.add_argument("--e2e-split-after", type=int, default=8)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "handoff" / "results"))
    ap.add_argument(
        "--table", action="store_true", help="print the tables of --out-dir, run nothing"
    )
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out_dir)), end="")
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    outdir = Path(args.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    for kind in args.pool.split(","):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp:
            res = run(kind, lengths, args.runs, args.e2e_prompt, args.e2e_new,
                      args.e2e_split_after, Path(tmp))  # fmt: skip
        res["wall_s"] = round(time.monotonic() - t0, 1)
        res["cpu_count"] = os.cpu_count()
        path = outdir / f"handoff-{kind}.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(f"[{kind}] wrote {path} ({res['wall_s']} s; load {res['load_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

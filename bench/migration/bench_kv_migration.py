# SPDX-License-Identifier: Apache-2.0
"""Attention-level KV migration on the CPU deployment (a benchmark, not a test).

1. ``transfer``: migration time against bytes moved. A synthetic owner KV pool shaped like
   Llama-3.1-8B (32 layers, 8 KV heads, head dim 128, bf16: 128 KiB per token) is registered with
   the transfer engine; n scattered token slots go to a real attention-peer process exactly as the
   SGLang glue does it (``alloc`` RPC, one layout WRITE of all 64 buffers, ``free``), per backend
   the engine picks (shm on one host) and forced tcp. The fit ``t = bytes / bw + fixed`` is compared
   with the controller's cost model (``BanaServeController.attention_latency``).
2. ``step``: per-decode-step overhead of a split request. A real SGLang server (tiny Llama,
   float32) generates the same greedy request alone, unsplit and with half of its KV migrated
   after 2 tokens; (e2e_split − e2e_unsplit) / tokens is the overhead per step (2 layers → 2 peer
   round trips per step). Runs interleave; medians of ``--repeat``.

``.venv/bin/python bench/migration/bench_kv_migration.py [--repeat 5] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from banaserve_ext.migration.attn_peer import AttnPeerClient, AttnPeerProcess
from banaserve_ext.transfer import Op, TransferEngine

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
ROWS = 4096


def bench_transfer(repeat: int, backend: str | None, arena_mb: int) -> list[dict]:
    item = KV_HEADS * HEAD_DIM * 2
    bufs = [torch.zeros(ROWS, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2 * LAYERS)]
    for b in bufs:
        b.view(torch.int16).random_()
    out = []
    with (
        AttnPeerProcess(arena_mb=arena_mb) as peer,
        TransferEngine(force_backend=backend) as eng,
    ):
        regs = [eng.register(b.data_ptr(), b.numel() * b.element_size()) for b in bufs]
        local = eng.prepare_layout([b.data_ptr() for b in bufs], item, ROWS)
        client = AttnPeerClient(peer.address, timeout_s=60).start()
        rng = np.random.default_rng(0)
        for n in (16, 64, 256, 1024, 2048):
            totals, moves = [], []
            for _ in range(repeat):
                slots = rng.choice(ROWS, size=n, replace=False).astype(np.int64)
                t0 = time.perf_counter()
                meta = client.call({"op": "alloc", "layers": LAYERS, "tokens": n,
                                    "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                    "dtype": "bfloat16"})  # fmt: skip
                pid = eng.add_peer(meta["metadata"])
                remote = eng.prepare_layout(meta["bases"], meta["item_nbytes"], n, peer=pid)
                t1 = time.perf_counter()
                with eng.submit(Op.WRITE, local, slots, remote, np.arange(n)) as h:
                    h.wait(120)
                t2 = time.perf_counter()
                client.call({"op": "free", "slice": meta["slice"]})
                totals.append(t2 - t0)
                moves.append(t2 - t1)
            nbytes = 2 * LAYERS * n * item
            out.append({
                "backend": eng.backend_for(pid), "tokens": n, "bytes": nbytes,
                "move_ms": statistics.median(moves) * 1e3,
                "total_ms": statistics.median(totals) * 1e3,
                "GBps": nbytes / statistics.median(moves) / 1e9,
            })  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
        client.close()
        for r in regs:
            r.release()
    return out


def fit(rows: list[dict]) -> dict:
    x = np.array([r["bytes"] for r in rows], dtype=float)
    y = np.array([r["total_ms"] / 1e3 for r in rows])
    from banaserve_ext.control.banaserve import BanaServeConfig, LinkCost

    link = LinkCost.fit(x.tolist(), y.tolist())  # least relative error (attention_link=)
    cfg = BanaServeConfig()
    model = x / cfg.bandwidth_Bps + cfg.sync_s
    fitted = np.array([link.seconds(v) for v in x])
    return {
        "fit_bandwidth_GBps": link.bandwidth_Bps / 1e9, "fit_fixed_ms": link.fixed_s * 1e3,
        "model_default": {"bandwidth_GBps": cfg.bandwidth_Bps / 1e9, "sync_ms": cfg.sync_s * 1e3},
        "default_model_err_pct": [
            round(100 * (m - t) / t, 1) for m, t in zip(model, y, strict=True)
        ],
        "fit_err_pct": [round(100 * (f - t) / t, 1) for f, t in zip(fitted, y, strict=True)],
    }  # fmt: skip


def bench_step(repeat: int, server_env: dict[str, str]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python_tests"))
    from sglang_testbed.cluster import Cluster

    from banaserve_ext.launch.servers import http_json
    from banaserve_ext.launch.tiny_model import create_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="kvmig-bench-"))
    model = create_tiny_llama(tmp / "model")
    cluster = Cluster(model, tmp / "logs", env=server_env)
    prompt = [(7 * j + 3) % 1000 + 1 for j in range(512)]
    new = 256
    res: dict[str, list[float]] = {"unsplit": [], "split": []}
    counters: dict = {}
    migrate_ms: list[float] = []
    try:
        cfg, _ = cluster.server(
            extra_args=("--dtype", "float32", "--disable-radix-cache"), features=("kv_migration",)
        )
        with AttnPeerProcess(arena_mb=64) as peer, ThreadPoolExecutor(1) as pool:

            def gen(rid: str) -> float:
                body = {
                    "input_ids": prompt,
                    "rid": rid,
                    "sampling_params": {
                        "max_new_tokens": new,
                        "temperature": 0.0,
                        "ignore_eos": True,
                    },
                }
                t0 = time.perf_counter()
                status, reply = http_json(f"{cfg.url}/generate", body, timeout_s=300)
                assert status == 200, reply
                return time.perf_counter() - t0

            gen("warm")
            for i in range(repeat):
                res["unsplit"].append(gen(f"u{i}"))
                fut = pool.submit(gen, f"s{i}")
                while True:
                    _, st = http_json(f"{cfg.url}/banaserve/migrate", {"kind": "status"})
                    if any(r["rid"] == f"s{i}" and r["output_len"] >= 2 for r in st["running"]):
                        break
                _, r = http_json(
                    f"{cfg.url}/banaserve/migrate",
                    {"kind": "kv", "rid": f"s{i}", "peer": peer.address, "fraction": 0.5},
                )
                assert "tokens" in r, r
                migrate_ms.append(r["duration_ms"])
                res["split"].append(fut.result())
            _, counters = http_json(f"{cfg.url}/banaserve/migrate", {"kind": "kv_splits"})
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)
    u, s = statistics.median(res["unsplit"]), statistics.median(res["split"])
    return {
        "prompt": len(prompt), "new_tokens": new, "runs": res,
        "unsplit_step_ms": u / new * 1e3, "split_step_ms": s / new * 1e3,
        "overhead_per_step_ms": (s - u) / new * 1e3, "ratio": s / u,
        "migrate_256_tokens_ms": statistics.median(migrate_ms),
        "hook_counters": counters["counters"],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--skip-transfer", action="store_true")
    ap.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for SGLang")
    ap.add_argument("--arena-mb", type=int, default=600, help="peer arena (0: memory per slice)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report: dict = {}
    for backend in () if args.skip_transfer else (None, "tcp"):
        rows = bench_transfer(args.repeat, backend, args.arena_mb)
        report[f"transfer_{backend or 'auto'}"] = {"rows": rows, "fit": fit(rows)}
        print(json.dumps(report[f"transfer_{backend or 'auto'}"]["fit"]), flush=True)
    if not args.skip_step:
        env = dict(kv.split("=", 1) for kv in args.server_env)
        report["step"] = bench_step(args.repeat, env)
        report["step"]["server_env"] = env
        print(json.dumps({k: v for k, v in report["step"].items() if k != "runs"}), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""Per-request KV transfer time of PD backends in real SGLang, same prompts, same run.

    python -m banaserve_ext.launch.transfer_bench --backends banaserve,mooncake \\
        --python /work/scratch/mooncake-bench/bin/python

For each backend: a prefill and a decode server (``--enable-metrics``) behind ``sglang_router``,
a warm-up, then the same prompts one at a time; each request's transfer time is the delta of the
prefill's ``sglang:kv_transfer_latency_ms`` histogram (sum and count) around it. SGLang measures
it from the first chunk's enqueue to Success for backends that report it (banaserve) and from the
last chunk's enqueue to completion otherwise (mooncake); with prompts shorter than one prefill
chunk both are the same interval. Mooncake runs with ``MOONCAKE_PROTOCOL=tcp`` (no RDMA here);
``--python`` selects an interpreter whose environment has Mooncake (peers are never project
dependencies). Prints one line per backend: median/p90 per-request ms and the ratio.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .servers import RouterConfig, ServerProcess, SGLangServerConfig, free_port, http_json

_METRIC = re.compile(r"^sglang:kv_transfer_latency_ms_(sum|count)\{[^}]*\}\s+([0-9.eE+-]+)$", re.M)


def _transfer_totals(url: str) -> tuple[float, float]:
    status, body = http_json(f"{url}/metrics", timeout_s=30.0)
    text = body if isinstance(body, str) else json.dumps(body)
    vals = {"sum": 0.0, "count": 0.0}
    for kind, value in _METRIC.findall(text):
        vals[kind] += float(value)
    return vals["sum"], vals["count"]


def _generate(url: str, ids: list[int], n: int = 4) -> None:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0}}
    deadline = time.monotonic() + 60
    while True:
        status, out = http_json(f"{url}/generate", body, timeout_s=120.0)
        if status == 200:
            return
        if status != 503 or time.monotonic() > deadline:
            raise RuntimeError(f"/generate answered {status}: {out}")
        time.sleep(0.5)


def run_backend(args: argparse.Namespace, backend: str, prompts: list[list[int]]) -> list[float]:
    env = {"MOONCAKE_PROTOCOL": "tcp"} if backend == "mooncake" else {}
    common = dict(model_path=args.model, transfer_backend=backend,
                  extra_args=("--enable-metrics",))  # fmt: skip
    pre = SGLangServerConfig(port=free_port(), role="prefill", bootstrap_port=free_port(), **common)  # type: ignore[arg-type]
    dec = SGLangServerConfig(port=free_port(), role="decode", **common)  # type: ignore[arg-type]
    logs = Path(args.log_dir)
    procs = [
        ServerProcess(f"{backend}-{c.role}", c.command(args.python), f"{c.url}/health",
                      logs / f"{backend}-{c.role}.log", {**c.env(), **env})
        for c in (pre, dec)
    ]  # fmt: skip
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready(600.0)
        router = RouterConfig(port=free_port(), prefill=((pre.url, int(pre.bootstrap_port or 0)),),
                              decode=(dec.url,))  # fmt: skip
        rp = ServerProcess(f"{backend}-router", router.command(args.python), f"{router.url}/health",
                           logs / f"{backend}-router.log")  # fmt: skip
        procs.append(rp.start())
        rp.wait_ready(600.0)
        for ids in prompts[:3]:
            _generate(router.url, ids)  # warm-up
        per_request = []
        for ids in prompts:
            s0, c0 = _transfer_totals(pre.url)
            _generate(router.url, ids)
            for _ in range(50):  # the histogram is updated right after the transfer concludes
                s1, c1 = _transfer_totals(pre.url)
                if c1 > c0:
                    break
                time.sleep(0.05)
            if c1 > c0:
                per_request.append((s1 - s0) / (c1 - c0))
        return per_request
    finally:
        for p in reversed(procs):
            p.stop(2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="banaserve,mooncake")
    ap.add_argument("--model", default=None, help="default: the embedded tiny model")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the servers")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--log-dir", default="out/transfer_bench")
    args = ap.parse_args(argv)
    if args.model is None:
        from .cli import DEFAULT_MODEL_DIR
        from .tiny_model import create_tiny_llama

        args.model = str(create_tiny_llama(DEFAULT_MODEL_DIR))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 1000, size=args.prompt_tokens).tolist() for _ in range(args.prompts)]
    results = {}
    for backend in args.backends.split(","):
        ms = run_backend(args, backend, prompts)
        results[backend] = ms
        if ms:
            print(f"{backend:10s} requests {len(ms):3d}  per-request transfer median "
                  f"{statistics.median(ms):8.2f} ms  p90 {float(np.percentile(ms, 90)):8.2f} ms",
                  flush=True)  # fmt: skip
        else:
            print(f"{backend:10s} no transfer samples (see {args.log_dir})", flush=True)
    names = list(results)
    if len(names) == 2 and all(results[n] for n in names):
        a, b = (statistics.median(results[n]) for n in names)
        print(f"median ratio {names[1]}/{names[0]}: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""Per-request KV transfer time of PD backends in real SGLang, same prompts, same run.

    python -m banaserve_ext.launch.transfer_bench \\
        --backends banaserve,banaserve-chunk,mooncake --runs 3 \\
        --python /work/scratch/mooncake/bin/python      # an interpreter with Mooncake

Backends: ``banaserve`` (layer-wise overlap on, the default), ``banaserve-chunk`` (the same
backend with ``BANASERVE_SGLANG_LAYERWISE=0``: KV leaves per chunk after the forward pass) and
``mooncake`` (``MOONCAKE_PROTOCOL=tcp``: no RDMA here). For each: a prefill and a decode server
(``--enable-metrics``) behind ``sglang_router``, a warm-up, then ``--runs`` rounds of the same
prompts one request at a time. Per request:

* *transfer ms*: the delta of the prefill's ``sglang:kv_transfer_latency_ms`` histogram around
  it. SGLang starts that clock when the chunk is handed to the backend after the forward pass
  (first chunk for backends that report it, like banaserve; last chunk otherwise; the prompts fit
  in one chunk, so both are the same instant) and stops it at Success: the transfer time a
  request waits for after its prefill compute. With layer-wise overlap most bytes left during the
  forward pass, which is the point of it;
* for banaserve, from the prefill's per-request log line (``BANASERVE_SGLANG_TRANSFER_LOG=1``):
  the *tail* (last layer marked ready → every layer stream complete) and the stream time (first
  layer → complete). The tail is compared with one layer's transfer time, estimated from the
  same run as ``banaserve-chunk``'s per-request time / number of layers.

Per round: the median per request; the table reports the median of the round medians and of
the per-round ratios. ``--layers/--hidden/--kv-heads`` make a tiny Llama with more KV bytes per
token (stated in the output; the prefill compute grows with it). Peers are never tuned down:
Mooncake runs with SGLang's defaults for it.
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
_LINE = re.compile(
    r"banaserve transfer: room=\d+ layer_bytes=(\d+) late_layer_bytes=(\d+) chunk_bytes=(\d+) "
    r"tail_ms=([-0-9.]+) stream_ms=([-0-9.]+) chunk_write_ms=([-0-9.]+) backend_ms=([-0-9.]+)"
)
_CONFIGS = {
    "banaserve": ("banaserve", {"BANASERVE_SGLANG_TRANSFER_LOG": "1"}),
    "banaserve-chunk": ("banaserve", {"BANASERVE_SGLANG_TRANSFER_LOG": "1",
                                      "BANASERVE_SGLANG_LAYERWISE": "0"}),
    "mooncake": ("mooncake", {"MOONCAKE_PROTOCOL": "tcp"}),
}  # fmt: skip


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


def run_backend(
    args: argparse.Namespace, name: str, prompts: list[list[int]]
) -> tuple[list[list[float]], list[tuple[float, ...]], dict[str, int]]:
    """Per round, the per-request transfer ms; banaserve's per-request log figures (tail,
    stream, chunk WRITE and backend ms; -1 where not applicable); the byte totals of its log."""
    backend, env = _CONFIGS[name]
    common = dict(model_path=args.model, transfer_backend=backend,
                  max_total_tokens=args.max_total_tokens,
                  extra_args=("--enable-metrics",))  # fmt: skip
    pre = SGLangServerConfig(port=free_port(), role="prefill", bootstrap_port=free_port(), **common)  # type: ignore[arg-type]
    dec = SGLangServerConfig(port=free_port(), role="decode", **common)  # type: ignore[arg-type]
    logs = Path(args.log_dir)
    procs = [
        ServerProcess(f"{name}-{c.role}", c.command(args.python), f"{c.url}/health",
                      logs / f"{name}-{c.role}.log", {**c.env(), **env})
        for c in (pre, dec)
    ]  # fmt: skip
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready(600.0)
        router = RouterConfig(port=free_port(), prefill=((pre.url, int(pre.bootstrap_port or 0)),),
                              decode=(dec.url,))  # fmt: skip
        rp = ServerProcess(f"{name}-router", router.command(args.python), f"{router.url}/health",
                           logs / f"{name}-router.log")  # fmt: skip
        procs.append(rp.start())
        rp.wait_ready(600.0)
        for ids in prompts[:3]:
            _generate(router.url, [i + 1 for i in ids])  # warm-up (other ids: no cache hits)
        rounds = []
        lines_before = len(_LINE.findall(procs[0].log_path.read_text(errors="replace")))
        for r in range(args.runs):
            per_request = []
            for ids in prompts:
                ids = [(i + 7 * r) % 1000 + 4 for i in ids]  # fresh ids each round: no cache hit
                s0, c0 = _transfer_totals(pre.url)
                _generate(router.url, ids)
                for _ in range(50):  # the histogram is updated right after the transfer concludes
                    s1, c1 = _transfer_totals(pre.url)
                    if c1 > c0:
                        break
                    time.sleep(0.05)
                if c1 > c0:
                    per_request.append((s1 - s0) / (c1 - c0))
            rounds.append(per_request)
        time.sleep(0.5)
        lines = _LINE.findall(procs[0].log_path.read_text(errors="replace"))[lines_before:]
        tails = [tuple(float(x) for x in ln[3:]) for ln in lines]
        totals = {
            "layer_bytes": sum(int(x[0]) for x in lines),
            "late_layer_bytes": sum(int(x[1]) for x in lines),
            "chunk_bytes": sum(int(x[2]) for x in lines),
        }
        return rounds, tails, totals
    finally:
        for p in reversed(procs):
            p.stop(2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="banaserve,banaserve-chunk,mooncake")
    ap.add_argument("--model", default=None, help="default: a tiny Llama made locally")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the servers")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3, help="rounds of the prompts per backend")
    ap.add_argument("--layers", type=int, default=2, help="tiny model: decoder layers")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model: hidden size")
    ap.add_argument("--heads", type=int, default=4, help="tiny model: attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="tiny model: KV heads")
    ap.add_argument("--max-total-tokens", type=int, default=4096)
    ap.add_argument("--log-dir", default="out/transfer_bench")
    args = ap.parse_args(argv)
    names = args.backends.split(",")
    unknown = [n for n in names if n not in _CONFIGS]
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {sorted(_CONFIGS)}")
    if args.model is None:
        from .cli import DEFAULT_MODEL_DIR
        from .tiny_model import TinyModelSpec, create_tiny_llama

        spec = TinyModelSpec(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads)  # fmt: skip
        path = DEFAULT_MODEL_DIR.parent / f"bench-l{args.layers}-h{args.hidden}-kv{args.kv_heads}"
        args.model = str(create_tiny_llama(path, spec))
        kv_per_token = 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * 2
        print(f"model: tiny Llama, {args.layers} layers, hidden {args.hidden}, "
              f"{args.kv_heads} KV heads, bf16: {kv_per_token} B of KV per token, "
              f"{kv_per_token * args.prompt_tokens / 2**20:.2f} MiB per {args.prompt_tokens}-token "
              "prompt", flush=True)  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 1000, size=args.prompt_tokens).tolist() for _ in range(args.prompts)]
    medians: dict[str, list[float]] = {}
    tails: dict[str, list[tuple[float, ...]]] = {}
    for name in names:
        rounds, tl, totals = run_backend(args, name, prompts)
        medians[name] = [statistics.median(r) for r in rounds if r]
        tails[name] = tl
        per = " ".join(f"{m:.2f}" for m in medians[name])
        extra = ""
        if name.startswith("banaserve"):
            extra = (f"  bytes: layer {totals['layer_bytes']} (late {totals['late_layer_bytes']})"
                     f" chunk {totals['chunk_bytes']}")  # fmt: skip
        print(f"{name:16s} per-request transfer ms, median per round: {per}{extra}", flush=True)
    print("\n| backend | per-request transfer ms (median of round medians) | rounds |")
    print("|---|---|---|")
    for name in names:
        if medians[name]:
            print(f"| `{name}` | {statistics.median(medians[name]):.2f} | "
                  f"{len(medians[name])} |")  # fmt: skip
    if "mooncake" in medians:
        for name in names:
            if name != "mooncake" and medians[name] and medians["mooncake"]:
                ratios = [m / b for m, b in zip(medians["mooncake"], medians[name], strict=False)]
                print(f"ratio mooncake/{name}: median {statistics.median(ratios):.2f}x "
                      f"(per round {' '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
    for name in names:
        rows = tails.get(name) or []
        if rows:
            backend_ms = statistics.median(r[3] for r in rows)
            print(f"{name}: inside the backend (first chunk handed over -> Success posted) median "
                  f"{backend_ms:.3f} ms; the rest of the per-request figure is SGLang's "
                  "scheduler loop noticing it")  # fmt: skip
    lw = [r for r in tails.get("banaserve") or [] if r[0] >= 0]
    if lw:
        tail = statistics.median(r[0] for r in lw)
        stream = statistics.median(r[1] for r in lw)
        print(f"layer-wise: last layer ready -> transfer complete, median {tail:.3f} ms "
              f"(first layer ready -> complete {stream:.3f} ms, {len(lw)} requests)")  # fmt: skip
        writes = [r[2] for r in tails.get("banaserve-chunk") or [] if r[2] > 0]
        if writes:
            one_layer = statistics.median(writes) / args.layers
            print(f"one layer's transfer time (banaserve-chunk: WRITE of all layers, submit to "
                  f"completion, / {args.layers} layers): {one_layer:.3f} ms; "
                  f"tail / one layer = {tail / one_layer:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""``banaserve bench layer-migration``: layer-level weight migration on this host.

Two processes (this one, the owner, and a layer server started as a subprocess), the transfer
engine between them (shm on one host). Measures, each as the median of ``--repeat`` runs:

1. migration time against bytes moved: ``k`` layers of a Llama-shaped layer (``--hidden``,
   ``--inter``, heads) with ``t`` tokens of KV each, next to (a) a plain transfer-engine WRITE of
   the same bytes (the raw link) and (b) the simulator's cost model
   (:meth:`banaserve_ext.control.banaserve.BanaServeController.layer_latency`:
   ``k * (W_layer + KV_layer * t) / bandwidth + sync_s``) with its default constants and with the
   bandwidth measured here; the prediction error is reported for both;
2. per-step overhead of the split model: a decode step of all layers locally vs the first half
   locally and the second half on the layer server (the hidden-state hop), same batch, same
   process pair, as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

EXECUTOR = "banaserve_ext.migration.llama_stack:build"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[0, 2048, 8192])
    p.add_argument("--rows", type=int, default=16384, help="KV pool rows (token slots)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ctx", type=int, default=512, help="context per request in the step bench")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument(
        "--sglang",
        action="store_true",
        help="instead: a real CPU SGLang server (tiny Llama, float32): migration "
        "time of layer 1 and decode time per token unsplit vs split",
    )
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="unsplit/split rounds (--sglang)")


def _start_server() -> tuple[subprocess.Popen, int]:
    ready = Path(tempfile.mkdtemp()) / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "banaserve_ext.migration.layer_server", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("layer server did not start")
        time.sleep(0.05)
    return proc, int(ready.read_text())


def _layer(a: argparse.Namespace, g: Any) -> dict[str, Any]:
    import torch

    d = a.hidden // a.heads
    q, kv = a.heads * d, a.kv_heads * d
    pos = torch.arange(4096, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    def r(*shape: int) -> Any:
        return torch.randn(*shape, generator=g) * 0.05

    return {
        "input_layernorm.weight": 1 + r(a.hidden),
        "self_attn.qkv_proj.weight": r(q + 2 * kv, a.hidden),
        "self_attn.o_proj.weight": r(a.hidden, q),
        "post_attention_layernorm.weight": 1 + r(a.hidden),
        "mlp.gate_up_proj.weight": r(2 * a.inter, a.hidden),
        "mlp.down_proj.weight": r(a.hidden, a.inter),
        "self_attn.rotary_emb.cos_sin_cache": torch.cat(((pos * inv).cos(), (pos * inv).sin()), -1),
        "k_buffer": r(a.rows, a.kv_heads, d),
        "v_buffer": r(a.rows, a.kv_heads, d),
    }


def _cfg(a: argparse.Namespace, layers: list[int]) -> Any:
    from ..migration.llama_stack import StackConfig

    d = a.hidden // a.heads
    return StackConfig(layers=layers, num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=d,
                       rotary_dim=d, rms_eps=1e-6)  # fmt: skip


def _raw_write_s(client: Any, nbytes: int) -> float:
    """One plain WRITE of ``nbytes`` to a fresh server arena (the link alone)."""
    from ..migration import layer_server as ls
    from ..transfer import Op

    reply, _ = client.call(
        {
            "op": "prepare",
            "executor": EXECUTOR,
            "config": b"",
            "layers": [
                {"layer": 0, "tensors": [{"name": "blob", "dtype": "uint8", "shape": [nbytes]}]}
            ],
        }
    )
    client.engine.add_peer(reply["metadata"])
    src = np.ones(nbytes, np.uint8)
    import torch

    t = torch.from_numpy(src)
    return ls._move(client, Op.WRITE, {0: [ls.ShipTensor("blob", t)]},
                    {0: list(reply["addrs"][0])}, 60.0)  # fmt: skip


def _arena_bytes(tensors: dict, k: int, tok: int) -> int:
    from ..migration.layer_layout import align_up

    return sum(align_up(t.numel() * t.element_size()) for i in range(k)
               for t in tensors[i].values())  # fmt: skip


def bench_migration(a: argparse.Namespace, client: Any) -> list[dict]:
    import torch

    from ..control.banaserve import BanaServeConfig, BanaServeController, LinkCost
    from ..migration import layer_server as ls
    from ..migration.llama_stack import KV_NAMES, WEIGHT_NAMES

    g = torch.Generator().manual_seed(0)
    max_k = max(a.layers)
    tensors = {i: _layer(a, g) for i in range(max_k)}
    w_layer = sum(tensors[0][n].numel() * 4 for n in WEIGHT_NAMES)
    d = a.hidden // a.heads
    kv_tok_layer = 2 * a.kv_heads * d * 4
    rows: list[dict] = []
    warm = {
        0: [ls.ShipTensor(n, tensors[0][n]) for n in WEIGHT_NAMES]
        + [ls.ShipTensor(n, tensors[0][n], np.arange(1, 9)) for n in KV_NAMES]
    }
    ls.ship_layers(client, warm, EXECUTOR, msgspec.msgpack.encode(_cfg(a, [0])))
    client.call({"op": "release"})
    _raw_write_s(client, 1 << 20)
    client.call({"op": "release"})
    for k in a.layers:
        for tok in a.tokens:
            used = np.arange(1, tok + 1)
            times, warm_times, raws = [], [], []
            rep: dict = {}
            for _ in range(a.repeat):
                for reserved in (False, True):
                    if reserved:  # the target allocated its arena ahead of the migration
                        client.call({"op": "reserve", "nbytes": _arena_bytes(tensors, k, tok)})
                    ship = {i: [ls.ShipTensor(n, tensors[i][n]) for n in WEIGHT_NAMES]
                        + [ls.ShipTensor(n, tensors[i][n], used) for n in KV_NAMES]
                            for i in range(k)}  # fmt: skip
                    cfg = msgspec.msgpack.encode(_cfg(a, list(range(k))))
                    rep = ls.ship_layers(client, ship, EXECUTOR, cfg)
                    (warm_times if reserved else times).append(rep["total_s"])
                    client.call({"op": "release"})
                raws.append(_raw_write_s(client, rep["weight_bytes"] + rep["kv_bytes"]))
                client.call({"op": "release"})
            moved = rep["weight_bytes"] + rep["kv_bytes"]
            t_med, raw_med = statistics.median(times), statistics.median(raws)
            rows.append({"layers": k, "kv_tokens": tok, "bytes": moved,
                         "weight_bytes": rep["weight_bytes"], "kv_bytes": rep["kv_bytes"],
                         "migrate_s": t_med, "migrate_reserved_s": statistics.median(warm_times),
                         "raw_write_s": raw_med})  # fmt: skip
    # the cost model: default constants, and the bandwidth of the link measured here
    big = max(rows, key=lambda r: r["bytes"])
    bw = big["bytes"] / big["raw_write_s"]
    for cfg_name, cfg in (("default", BanaServeConfig()),
                          ("measured_bw", BanaServeConfig(bandwidth_Bps=bw))):  # fmt: skip
        ctl = BanaServeController(max_k, w_layer, kv_tok_layer, cfg)
        for r in rows:
            pred = ctl.layer_latency(r["layers"], r["kv_tokens"])
            r[f"pred_{cfg_name}_s"] = pred
            r[f"err_{cfg_name}"] = (pred - r["migrate_s"]) / r["migrate_s"]
            r[f"err_{cfg_name}_reserved"] = (pred - r["migrate_reserved_s"]) / r[
                "migrate_reserved_s"
            ]
    # the corrected model: fixed + bytes / bandwidth fitted to these measurements (LinkCost.fit);
    # BanaServeConfig(layer_link=...) makes the controller use it
    link = LinkCost.fit([float(r["bytes"]) for r in rows],
                        [r["migrate_reserved_s"] for r in rows])  # fmt: skip
    fit = {"sync_s": link.fixed_s, "bandwidth_Bps": link.bandwidth_Bps,
           "raw_bandwidth_Bps": bw, "weight_bytes_per_layer": w_layer,
           "kv_bytes_per_token_layer": kv_tok_layer}  # fmt: skip
    for r in rows:
        r["err_fit"] = link.relative_error(r["bytes"], r["migrate_reserved_s"])
    return rows + [{"fit": fit}]


def bench_step(a: argparse.Namespace, client: Any) -> list[dict]:
    import torch

    from ..migration import layer_server as ls
    from ..migration.llama_stack import KV_NAMES, WEIGHT_NAMES, LlamaStack, StepInputs

    g = torch.Generator().manual_seed(1)
    n = 4
    tensors = {i: _layer(a, g) for i in range(n)}
    full = LlamaStack(_cfg(a, list(range(n))), tensors)
    head = LlamaStack(_cfg(a, list(range(n // 2))), tensors)
    tail = list(range(n // 2, n))
    used = np.arange(1, a.rows)
    ship = {i: [ls.ShipTensor(nm, tensors[i][nm]) for nm in WEIGHT_NAMES]
            + [ls.ShipTensor(nm, tensors[i][nm], used) for nm in KV_NAMES]
            for i in tail}  # fmt: skip
    ls.ship_layers(client, ship, EXECUTOR, msgspec.msgpack.encode(_cfg(a, tail)))
    out = []
    for b in a.batch:
        lens = [a.ctx] * b
        rows_per = [np.arange(1 + i * a.ctx, 1 + (i + 1) * a.ctx) % (a.rows - 1) + 1
                    for i in range(b)]  # fmt: skip
        t = {
            "positions": torch.full((b,), a.ctx - 1, dtype=torch.int64),
            "out_cache_loc": torch.tensor([r[-1] for r in rows_per], dtype=torch.int64),
            "seq_lens": torch.tensor(lens, dtype=torch.int64),
            "extend_prefix_lens": None,
            "token_rows": torch.from_numpy(np.concatenate(rows_per).astype(np.int64)),
        }
        step = StepInputs("decode", t["positions"], t["out_cache_loc"], t["seq_lens"], None,
                          t["token_rows"])  # fmt: skip
        emb = torch.randn(b, a.hidden, generator=g)
        local, split, hop = [], [], []
        for _ in range(max(a.repeat, 5) * 3):
            t0 = time.perf_counter()
            full.run(step, emb, None)
            t1 = time.perf_counter()
            h, r = head.run(step, emb, None)
            t2 = time.perf_counter()
            reply_t0 = time.perf_counter()
            ls.remote_step(client, "decode", {**t, "hidden": h, "residual": r})
            t3 = time.perf_counter()
            local.append(t1 - t0)
            split.append((t2 - t1) + (t3 - reply_t0))
            hop.append(t3 - reply_t0 - client.last_compute_s)
        lm, sm = statistics.median(local), statistics.median(split)
        out.append({"batch": b, "ctx": a.ctx, "local_ms": lm * 1e3, "split_ms": sm * 1e3,
                    "hop_ms": statistics.median(hop) * 1e3, "ratio": sm / lm})  # fmt: skip
    client.call({"op": "release"})
    return out


def sglang_main(a: argparse.Namespace) -> int:
    """Tiny Llama in a real SGLang server: decode ms/token unsplit, split (layer 1 on the layer
    server), unsplit again, and what the migration endpoint reports."""
    from ..launch.servers import ServerProcess, SGLangServerConfig, free_port, http_json
    from ..launch.tiny_model import create_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="layermig-bench-"))
    model = create_tiny_llama(tmp / "model")
    cfg = SGLangServerConfig(
        model_path=str(model),
        port=free_port(),
        extra_args=("--dtype", "float32", "--disable-radix-cache"),
        features=("layer_migration",),
    )
    srv = ServerProcess("sglang", cfg.command(), f"{cfg.url}/health_generate",
                        tmp / "sglang.log", cfg.env())  # fmt: skip
    proc, port = _start_server()
    res: dict[str, Any] = {}
    try:
        srv.start()
        srv.wait_ready(300)

        def per_token_ms() -> float:
            vals = []
            for i in range(a.repeat):
                body = {
                    "input_ids": [5 + i] * 16,
                    "sampling_params": {
                        "max_new_tokens": a.new_tokens,
                        "temperature": 0.0,
                        "ignore_eos": True,
                    },
                }
                t0 = time.perf_counter()
                status, out = http_json(f"{cfg.url}/generate", body, timeout_s=300)
                assert status == 200, out
                vals.append((time.perf_counter() - t0) * 1e3 / a.new_tokens)
            return statistics.median(vals)

        def mig(body: dict) -> dict:
            status, out = http_json(f"{cfg.url}/banaserve/migrate", body, timeout_s=120)
            assert status == 200, out
            return out  # type: ignore[return-value]

        per_token_ms()  # warm-up
        # interleaved rounds, so that drifting load on the box hits both conditions alike
        unsplit, split, migs, backs = [], [], [], []
        for _ in range(a.rounds):
            unsplit.append(per_token_ms())
            migs.append(mig({"kind": "layers", "first": 1, "port": port}))
            split.append(per_token_ms())
            res["split_status"] = mig({"kind": "layers_status"})
            backs.append(mig({"kind": "layers_back"}))
        res["unsplit_ms_per_token"] = unsplit
        res["split_ms_per_token"] = split
        res["ratio_median"] = statistics.median(s / u for s, u in zip(split, unsplit, strict=True))
        res["migrate"] = migs
        res["back"] = backs
    finally:
        srv.stop(2.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def main(args: argparse.Namespace) -> int:
    from ..migration import layer_server as ls

    if args.sglang:
        return sglang_main(args)

    proc, port = _start_server()
    try:
        client = ls.LayerServerClient("127.0.0.1", port, timeout_s=120).start()
        try:
            mig = bench_migration(args, client)
            step = bench_step(args, client)
        finally:
            client.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    print(f"migration (median of {args.repeat}):")
    print(
        f"{'k':>2} {'tokens':>6} {'MB':>8} {'cold ms':>8} {'reserved ms':>11} {'raw ms':>7} "
        f"{'model(def) ms':>13} {'err':>6} {'model(bw) ms':>12} {'err':>6} {'fit err':>7}"
    )
    for r in mig[:-1]:
        print(f"{r['layers']:>2} {r['kv_tokens']:>6} {r['bytes'] / 1e6:>8.2f} "
              f"{r['migrate_s'] * 1e3:>8.2f} {r['migrate_reserved_s'] * 1e3:>11.2f} "
              f"{r['raw_write_s'] * 1e3:>7.2f} "
              f"{r['pred_default_s'] * 1e3:>13.2f} {r['err_default_reserved']:>+6.0%} "
              f"{r['pred_measured_bw_s'] * 1e3:>12.2f} {r['err_measured_bw_reserved']:>+6.0%} "
              f"{r['err_fit']:>+7.0%}")  # fmt: skip
    print("(errors against the reserved-arena time; cold includes the target's allocation)")
    print("fit:", json.dumps(mig[-1]["fit"]))
    print("split step (decode, 4 layers, 2 remote):")
    for r in step:
        print(f"  batch {r['batch']:>3} ctx {r['ctx']}: local {r['local_ms']:.2f} ms, split "
              f"{r['split_ms']:.2f} ms (hop without remote compute {r['hop_ms']:.2f} ms), "
              f"x{r['ratio']:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"migration": mig, "step": step}, indent=1))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(main(p.parse_args()))

# SPDX-License-Identifier: Apache-2.0
"""The standard transfer case between two processes, with verification and peer comparison.

    python -m banaserve_ext.bench transfer --backend {shm,tcp} --pages 1000 --page-kib 16 --json

The initiator (this process) and a target process (this module with ``--target``) each hold a
pool of ``pool_factor × pages`` pages; the pages of a batch sit at random slots on both sides.
Measured: write and read GB/s (median of --repeats batches), one-page op latency, and in the
same run the baselines (single-thread memcpy gather of the same pages, a raw TCP round trip of
one page), the prepared path's cost per descriptor, registration of 1 GiB, layer-wise streaming
with simulated compute, and — when installed in a scratch venv — Mooncake TE on the same
workload. Every transferred byte is verified.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import _env
from ..transfer import Op, TransferEngine
from ..transfer.testing import PeerProcess, digest, make_pool, pattern
from ._stats import gbps, median, print_table, time_calls

PEER_SCRIPT = Path(__file__).with_name("peers") / "mooncake_te.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["shm", "tcp", "ucx"], default="shm")
    p.add_argument("--pages", type=int, default=1000)
    p.add_argument("--page-kib", type=int, default=16)
    p.add_argument(
        "--pool-factor", type=int, default=4, help="pool = factor × pages (random slots)"
    )
    p.add_argument(
        "--memory",
        choices=["allocated", "user"],
        default="allocated",
        help="engine-allocated shared memory, or plain user memory (numpy) registered as is",
    )
    p.add_argument("--repeats", type=int, default=15, help="batches per measurement (median)")
    p.add_argument("--op-repeats", type=int, default=2000, help="single-page ops (median)")
    p.add_argument("--layers", type=int, default=8, help="layers of the streaming case")
    p.add_argument(
        "--compute",
        choices=["sleep", "spin"],
        default="sleep",
        help="simulated per-layer compute of the streaming case: 'sleep' leaves the CPU free "
        "(a GPU kernel), 'spin' occupies a core (CPU compute competing with CPU copies)",
    )
    p.add_argument(
        "--peer-python",
        default=None,
        help="python of a scratch venv with mooncake-transfer-engine-non-cuda "
        "(default: $BANASERVE_BENCH_PEER_PYTHON); the peer is skipped when absent",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the peer even when installed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--seed", type=int, default=0)


# ---- the initiator -------------------------------------------------------------------------
def _descs(base: int, pages: int, page: int) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    page = args.page_kib * 1024
    pool_pages = args.pages * args.pool_factor
    rng = np.random.default_rng(args.seed)
    local_slots = rng.choice(pool_pages, size=args.pages, replace=False).astype(np.int64)
    remote_slots = rng.choice(pool_pages, size=args.pages, replace=False).astype(np.int64)
    nbytes = args.pages * page
    res: dict[str, Any] = {
        "backend": args.backend, "pages": args.pages, "page_kib": args.page_kib,
        "memory": args.memory, "repeats": args.repeats,
    }  # fmt: skip
    target = PeerProcess(backend=args.backend, pool_nbytes=pool_pages * page, memory=args.memory)
    target.start()
    try:
        with TransferEngine(force_backend=args.backend) as eng:
            reg, pool = make_pool(eng, pool_pages * page, args.memory)
            peer = eng.add_peer(target.metadata)
            res["backend_chosen"] = eng.backend_for(peer)
            local = eng.prepare(_descs(reg.addr, pool_pages, page))
            remote = eng.prepare(_descs(target.addr, pool_pages, page), peer=peer)

            # write: pattern A from our random slots into the target's random slots
            pool.reshape(-1, page)[local_slots] = pattern(args.seed + 1, args.pages, page)

            def write() -> None:
                eng.submit(Op.WRITE, local, local_slots, remote, remote_slots).wait(60)

            w = time_calls(write, args.repeats)
            ok_w = target.digest(remote_slots, page) == digest(pool, local_slots, page)
            # read: pattern B filled by the target, read into our slots
            target.fill(args.seed + 2, remote_slots, page)
            pool.reshape(-1, page)[local_slots] = 0

            def read() -> None:
                eng.submit(Op.READ, local, local_slots, remote, remote_slots).wait(60)

            r = time_calls(read, args.repeats)
            expected = np.zeros(pool_pages * page, dtype=np.uint8)
            expected.reshape(-1, page)[local_slots] = pattern(args.seed + 2, args.pages, page)
            ok_r = digest(pool, local_slots, page) == digest(expected, local_slots, page)
            del expected

            one_l, one_r = local_slots[:1], remote_slots[:1]
            op_w = time_calls(
                lambda: eng.submit(Op.WRITE, local, one_l, remote, one_r).wait(10),
                args.op_repeats,
                50,
            )
            op_r = time_calls(
                lambda: eng.submit(Op.READ, local, one_l, remote, one_r).wait(10),
                args.op_repeats,
                50,
            )
            res.update(
                write_gbps=gbps(nbytes, median(w)),
                read_gbps=gbps(nbytes, median(r)),
                op_us=median(op_w) * 1e6,
                read_op_us=median(op_r) * 1e6,
                verified=bool(ok_w and ok_r),
            )
            res["streaming"] = _streaming(eng, args, reg.addr, target, peer, page, rng)
            reg.release()
    finally:
        target.close()
    return res


def _streaming(
    eng: TransferEngine,
    args: argparse.Namespace,
    local_base: int,
    target: PeerProcess,
    peer: str,
    page: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """L layers, each a buffer of pool_pages/L pages; a batch moves pages/L random pages of
    every layer. Simulated compute per layer = one layer's measured transfer time (the balanced
    case), either sleeping (host idle, as with GPU compute) or spinning a core. Reported: how long
    the transfer runs on after the last layer's compute, relative to one layer's transfer time."""
    layers = args.layers
    pool_pages = args.pages * args.pool_factor
    per_layer_items = pool_pages // layers
    per_batch = max(1, args.pages // layers)
    lb = local_base + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer_items * page)
    rb = target.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer_items * page)
    local = eng.prepare_layout(lb, page, per_layer_items)
    remote = eng.prepare_layout(rb, page, per_layer_items, peer=peer)
    li = rng.choice(per_layer_items, size=per_batch, replace=False).astype(np.int64)
    ri = rng.choice(per_layer_items, size=per_batch, replace=False).astype(np.int64)
    # One layer through the same path a stream layer takes (a notified batch), posted and
    # awaited alone.
    tids = iter(range(1 << 40, 1 << 41))
    one_layer = median(
        time_calls(
            lambda: eng.submit(
                Op.WRITE, local, li, remote, ri, buffers=(0, 1), notify=(next(tids), 0, 1)
            ).wait(30),
            31,
            3,
        )
    )

    def compute(seconds: float) -> None:
        end = time.perf_counter() + seconds
        if args.compute == "sleep":
            time.sleep(seconds)  # the host waits while the "kernel" runs
        while time.perf_counter() < end:
            pass

    tails = []
    for rep in range(7):
        tid = 1000 + rep
        s = eng.open_stream(tid, layers, local, li, remote, ri, buffers_per_layer=1, timeout_s=30)
        for layer in range(layers):
            compute(one_layer)  # "compute" of this layer
            s.mark_layer_ready(layer)
        t_last = time.perf_counter()
        s.wait(30)
        tails.append(time.perf_counter() - t_last)
    tail = median(tails)
    return {
        "compute": args.compute,
        "layers": layers,
        "pages_per_layer": per_batch,
        "one_layer_us": one_layer * 1e6,
        "tail_after_last_compute_us": tail * 1e6,
        "tail_over_one_layer": tail / one_layer if one_layer > 0 else float("nan"),
    }


def run_baselines(args: argparse.Namespace) -> dict[str, Any]:
    """Same-run baselines: a single-thread memcpy gather of the same page placement (the local
    backend: one memmove per page, C++), a raw loopback TCP round trip of one page, the
    prepared path's cost per descriptor, and registration of 1 GiB."""
    from .. import _core

    page = args.page_kib * 1024
    pool_pages = args.pages * args.pool_factor
    rng = np.random.default_rng(args.seed + 7)
    src = np.empty(pool_pages * page, dtype=np.uint8)
    dst = np.empty_like(src)
    src.fill(3)
    dst.fill(4)
    out: dict[str, Any] = {}
    with TransferEngine(backends=()) as eng:
        a, b = eng.register(src), eng.register(dst)
        la = eng.prepare(_descs(a.addr, pool_pages, page))
        lb = eng.prepare(_descs(b.addr, pool_pages, page), peer=eng.engine_id)
        si = rng.choice(pool_pages, size=args.pages, replace=False).astype(np.int64)
        di = rng.choice(pool_pages, size=args.pages, replace=False).astype(np.int64)
        t = time_calls(lambda: eng.submit(Op.WRITE, la, si, lb, di).wait(30), args.repeats)
        out["memcpy_gather_gbps"] = gbps(args.pages * page, median(t))

        # Prepared path: zero-length descriptors, so only binding + validation + planning count.
        n = 100_000
        zero = np.stack([np.full(n, a.addr, np.uint64), np.zeros(n, np.uint64)], axis=1)
        zl = eng.prepare(zero)
        zr = eng.prepare(zero, peer=eng.engine_id)
        idx = np.arange(n, dtype=np.int64)
        tz = time_calls(lambda: eng.submit(Op.WRITE, zl, idx, zr, idx).wait(30), 15, 2)
        out["prepared_ns_per_desc"] = median(tz) / n * 1e9
        tp = time_calls(lambda: eng.prepare(zero), 5, 1)
        out["prepare_ns_per_desc"] = median(tp) / n * 1e9

        gib = 1 << 30
        t0 = time.perf_counter()
        reg = eng.allocate(gib)
        out["allocate_1gib_s"] = time.perf_counter() - t0
        reg.release()
        big = np.empty(gib, dtype=np.uint8)
        t0 = time.perf_counter()
        big.fill(1)
        out["prefault_1gib_numpy_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        r2 = eng.register(big)
        out["register_1gib_s"] = time.perf_counter() - t0
        r2.release()
        del big
    out["tcp_round_trip_us"] = median(_core.baseline_tcp_round_trips_us(page, args.op_repeats))
    return out


def run_peer(args: argparse.Namespace) -> dict[str, Any] | None:
    peer_python = args.peer_python or _env.get(_env.BENCH_PEER_PYTHON)
    if args.no_peer or not peer_python:
        return None
    if not os.path.exists(peer_python):
        return {"error": f"peer python {peer_python} not found"}
    argv = [
        peer_python, str(PEER_SCRIPT), "--pages", str(args.pages), "--page-kib",
        str(args.page_kib), "--pool-factor", str(args.pool_factor), "--repeats",
        str(args.repeats), "--op-repeats", str(min(args.op_repeats, 500)), "--seed", str(args.seed),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": f"mooncake peer failed ({proc.returncode}): {proc.stderr[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    ours = run_ours(args)
    base = run_baselines(args)
    peer = run_peer(args)
    result: dict[str, Any] = {**ours, "baseline": base, "mooncake": peer}
    ratios: dict[str, float] = {}
    if peer and "write_gbps" in peer:
        ratios["write_vs_mooncake"] = ours["write_gbps"] / peer["write_gbps"]
        ratios["read_vs_mooncake"] = ours["read_gbps"] / peer["read_gbps"]
        ratios["op_vs_mooncake"] = ours["op_us"] / peer["op_us"]
    ratios["write_vs_memcpy_gather"] = ours["write_gbps"] / base["memcpy_gather_gbps"]
    ratios["read_vs_memcpy_gather"] = ours["read_gbps"] / base["memcpy_gather_gbps"]
    ratios["op_vs_tcp_round_trip"] = ours["op_us"] / base["tcp_round_trip_us"]
    result.update(ratios)
    # the names at the top level
    result["write_gbps"], result["read_gbps"] = ours["write_gbps"], ours["read_gbps"]
    if args.json:
        print(json.dumps(result, indent=None, sort_keys=True))
        return 0 if ours["verified"] else 1
    _print(result)
    return 0 if ours["verified"] else 1


def _print(r: dict[str, Any]) -> None:
    b, p, s = r["baseline"], r["mooncake"] or {}, r["streaming"]
    print(f"\n{r['pages']} × {r['page_kib']} KiB pages, random placement, backend "
          f"{r['backend_chosen']}, memory {r['memory']}, median of {r['repeats']} batches; "
          f"verified: {r['verified']}\n")  # fmt: skip
    rows = [
        ["banaserve " + r["backend_chosen"], r["write_gbps"], r["read_gbps"], r["op_us"]],
        ["Mooncake TE (tcp)", p.get("write_gbps", float("nan")), p.get("read_gbps", float("nan")),
         p.get("op_us", float("nan"))],
        ["memcpy gather, 1 thread", b["memcpy_gather_gbps"], b["memcpy_gather_gbps"], float("nan")],
        ["raw TCP round trip", float("nan"), float("nan"), b["tcp_round_trip_us"]],
    ]  # fmt: skip
    print_table(["path", "write GB/s", "read GB/s", "one page op µs"], rows)
    if "error" in p:
        print(f"\nMooncake peer: {p['error']}")
    print()
    extra = [
        ["write / Mooncake", r.get("write_vs_mooncake", float("nan"))],
        ["read / Mooncake", r.get("read_vs_mooncake", float("nan"))],
        ["write / memcpy gather", r["write_vs_memcpy_gather"]],
        ["op / raw TCP round trip", r["op_vs_tcp_round_trip"]],
        ["prepared path ns per descriptor", b["prepared_ns_per_desc"]],
        ["allocate 1 GiB (pre-faulted) s", b["allocate_1gib_s"]],
        ["register 1 GiB (user memory) s", b["register_1gib_s"]],
        ["streaming: tail after last layer / one layer", s["tail_over_one_layer"]],
    ]
    print_table(["figure", "value"], extra)

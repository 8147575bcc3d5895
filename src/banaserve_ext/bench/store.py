# SPDX-License-Identifier: Apache-2.0
"""Store benchmark: the shared-memory KV pool vs Mooncake Store on the same workload.

``python -m banaserve_ext.bench store --pages 1000 --page-kib 16 --json``

This process creates and owns the pool (as ``banaserve pool serve`` does); a second process
attaches by name and measures, per repeat with fresh 64-hex-character keys: ``batch_set`` of N
pages from its own memory (``put_gbps``), ``batch_get`` into its own memory (``get_gbps``, data
verified), ``batch_exists`` of the N keys (``exists_us``) and of N absent keys. The median over
repeats is reported. When a scratch venv with ``mooncake-transfer-engine-non-cuda`` is given
(``--peer-python`` or ``$BANASERVE_BENCH_PEER_PYTHON``), Mooncake Store (mooncake_master + a
storage process + a client, TCP on 127.0.0.1) runs the same case in the same run.

``--remote`` also measures the path of a host that cannot map the segment: this process serves
the pool (``PoolServer``, as ``banaserve pool serve --listen`` does) on 127.0.0.1 and a second
worker process goes through it with ``RemoteKVPool`` (control connection + transfer-engine TCP
batches); its figures are reported under ``remote``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .. import _env
from ._stats import gbps, median, print_table

PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "mooncake_store.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pages", type=int, default=1000)
    p.add_argument("--page-kib", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="batches per measurement (median)")
    p.add_argument("--exists-repeats", type=int, default=200)
    p.add_argument("--pool-size", default="1GiB", help="capacity of the pool under test")
    p.add_argument(
        "--peer-python",
        default=None,
        help="python of a scratch venv with mooncake-transfer-engine-non-cuda "
        "(default: $BANASERVE_BENCH_PEER_PYTHON); the peer is skipped when absent",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the peer even when installed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--remote",
        action="store_true",
        help="also measure a client going through the pool service over TCP (RemoteKVPool)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: pool name
    p.add_argument("--worker-address", default=None, help=argparse.SUPPRESS)  # internal: remote


def _keys(rep: int, n: int) -> list[str]:
    return [f"{rep:04x}{i:060x}" for i in range(n)]


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The measuring client: a separate process attached to the pool by name."""
    from ..kvpool import KVPool, RemoteKVPool

    page = args.page_kib * 1024
    pool: KVPool | RemoteKVPool
    if args.worker_address:
        pool = RemoteKVPool(args.worker_address, pool=args.worker, page_size=page).start()
    else:
        pool = KVPool.attach(args.worker)
    src = np.random.default_rng(args.seed).integers(0, 256, (args.pages, page), dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)
    put_s: list[float] = []
    get_s: list[float] = []
    verified = True
    for rep in range(args.repeats + 1):  # repeat 0 warms up
        keys = _keys(rep, args.pages)
        t0 = time.perf_counter()
        res = pool.batch_set(keys, src)
        t1 = time.perf_counter()
        if int(np.count_nonzero(res)) != 0:
            raise SystemExit(f"batch_set did not store every page: {np.bincount(res)}")
        dst.fill(0)
        t2 = time.perf_counter()
        found = pool.batch_get(keys, dst)
        t3 = time.perf_counter()
        verified = verified and bool(found.all()) and bool(np.array_equal(src, dst))
        if rep > 0:
            put_s.append(t1 - t0)
            get_s.append(t3 - t2)
        if rep < args.repeats:
            pool.remove(keys)
    keys = _keys(args.repeats, args.pages)
    absent = _keys(0xFFFF, args.pages)
    exist_s: list[float] = []
    miss_s: list[float] = []
    for _ in range(args.exists_repeats):
        t0 = time.perf_counter()
        hits = pool.batch_exists(keys)
        t1 = time.perf_counter()
        mask = pool.exists_mask(absent)
        t2 = time.perf_counter()
        exist_s.append(t1 - t0)
        miss_s.append(t2 - t1)
        verified = verified and hits == args.pages and not mask.any()
    stats = pool.stats()
    nbytes = args.pages * page
    return {
        "put_gbps": gbps(nbytes, median(put_s)),
        "get_gbps": gbps(nbytes, median(get_s)),
        "exists_us": median(exist_s) * 1e6,
        "exists_absent_us": median(miss_s) * 1e6,
        "put_gbps_all": [gbps(nbytes, s) for s in put_s],
        "get_gbps_all": [gbps(nbytes, s) for s in get_s],
        "index_overhead": stats["overhead_bytes"] / (stats["num_pages"] * stats["page_size"]),
        "pool_pages": stats["num_pages"],
        "verified": verified,
    }


def run_ours(args: argparse.Namespace, *, remote: bool = False) -> dict[str, Any]:
    from ..kvpool import KVPool, PoolServer, parse_size

    page = args.page_kib * 1024
    name = f"bench-store-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    owner = KVPool(name, create=True, capacity_bytes=parse_size(args.pool_size), page_size=page)
    with owner:
        argv = [
            sys.executable, "-m", "banaserve_ext.bench.store", "--worker", name,
            "--pages", str(args.pages), "--page-kib", str(args.page_kib),
            "--repeats", str(args.repeats), "--exists-repeats", str(args.exists_repeats),
            "--seed", str(args.seed),
        ]  # fmt: skip
        if remote:
            with PoolServer(owner, "127.0.0.1", 0) as server:
                argv += ["--worker-address", server.address]
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        else:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(
            f"store benchmark worker failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_peer(args: argparse.Namespace) -> dict[str, Any] | None:
    peer_python = args.peer_python or _env.get(_env.BENCH_PEER_PYTHON)
    if args.no_peer or not peer_python:
        return None
    if not os.path.exists(peer_python):
        return {"error": f"peer python {peer_python} not found"}
    argv = [
        peer_python, str(PEER_SCRIPT), "--pages", str(args.pages), "--page-kib",
        str(args.page_kib), "--repeats", str(args.repeats), "--seed", str(args.seed),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": f"mooncake store peer failed ({proc.returncode}): {proc.stderr[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return 0
    ours = run_ours(args)
    remote = run_ours(args, remote=True) if args.remote else None
    peer = run_peer(args)
    result: dict[str, Any] = {
        **ours,
        "pages": args.pages,
        "page_kib": args.page_kib,
        "repeats": args.repeats,
        "mooncake": peer,
        "remote": remote,
    }
    if peer and "put_gbps" in peer:
        result["put_vs_mooncake"] = ours["put_gbps"] / peer["put_gbps"]
        result["get_vs_mooncake"] = ours["get_gbps"] / peer["get_gbps"]
        result["exists_vs_mooncake"] = peer["exists_us"] / ours["exists_us"]
        if remote:
            remote["put_vs_mooncake"] = remote["put_gbps"] / peer["put_gbps"]
            remote["get_vs_mooncake"] = remote["get_gbps"] / peer["get_gbps"]
            remote["exists_vs_mooncake"] = peer["exists_us"] / remote["exists_us"]
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print(result)
    ok = ours["verified"] and (not remote or remote["verified"])
    return 0 if ok and (not peer or peer.get("verified", True)) else 1


def _print(r: dict[str, Any]) -> None:
    p = r["mooncake"] or {}
    q = r.get("remote") or {}
    nan = float("nan")
    print(f"\n{r['pages']} × {r['page_kib']} KiB pages, second process, median of "
          f"{r['repeats']} batches; verified: {r['verified']}\n")  # fmt: skip
    rows = [
        ["banaserve kvpool (shm)", r["put_gbps"], r["get_gbps"], r["exists_us"]],
        ["Mooncake Store (tcp)", p.get("put_gbps", nan), p.get("get_gbps", nan),
         p.get("exists_us", nan)],
        ["ratio", r.get("put_vs_mooncake", nan), r.get("get_vs_mooncake", nan),
         r.get("exists_vs_mooncake", nan)],
    ]  # fmt: skip
    if q:
        rows += [
            ["banaserve kvpool remote (tcp)", q["put_gbps"], q["get_gbps"], q["exists_us"]],
            ["remote ratio", q.get("put_vs_mooncake", nan), q.get("get_vs_mooncake", nan),
             q.get("exists_vs_mooncake", nan)],
        ]  # fmt: skip
    print_table(["store", "put GB/s", "get GB/s", f"exists µs ({r['pages']} keys)"], rows)
    if "error" in p:
        print(f"\nMooncake peer: {p['error']}")
    print(
        f"\nabsent-key lookup of {r['pages']} keys: {r['exists_absent_us']:.1f} µs; "
        f"index overhead {r['index_overhead']:.2%} of pool memory"
    )


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m banaserve_ext.bench.store")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))

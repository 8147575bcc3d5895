# SPDX-License-Identifier: Apache-2.0
"""Mooncake Transfer Engine (TCP, P2PHANDSHAKE) on the standard transfer case.

Runs under the python of a scratch venv that has ``mooncake-transfer-engine-non-cuda`` and numpy
(it must not import banaserve_ext). Same workload as ``banaserve_ext.bench.transfer``: pages at
random slots of a pool on both sides, write and read batches (median), one-page ops, verified.
Prints one JSON line. Started with --target it is the passive side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from mooncake.engine import TransferEngine


def pattern(seed: int, pages: int, page: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(pages, page), dtype=np.uint8)


def digest(pool: np.ndarray, slots: np.ndarray, page: int) -> str:
    return hashlib.blake2b(
        np.ascontiguousarray(pool.reshape(-1, page)[slots]).tobytes(), digest_size=16
    ).hexdigest()


def engine() -> TransferEngine:
    eng = TransferEngine()
    rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise SystemExit(f"mooncake initialize failed: {rc}")
    return eng


def target(args: argparse.Namespace) -> None:
    page = args.page_kib * 1024
    pool = np.empty(args.pages * args.pool_factor * page, dtype=np.uint8)
    pool.fill(1)
    eng = engine()
    if eng.register_memory(pool.ctypes.data, pool.nbytes) != 0:
        raise SystemExit("mooncake register_memory failed")
    print(json.dumps({"port": eng.get_rpc_port(), "addr": pool.ctypes.data}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "fill":
            slots = np.asarray(cmd["slots"], dtype=np.int64)
            pool.reshape(-1, page)[slots] = pattern(cmd["seed"], len(slots), page)
            reply = {"ok": True}
        elif cmd["cmd"] == "digest":
            reply = {"digest": digest(pool, np.asarray(cmd["slots"], dtype=np.int64), page)}
        else:
            break
        print(json.dumps(reply), flush=True)


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs)


def initiator(args: argparse.Namespace) -> None:
    page = args.page_kib * 1024
    pool_pages = args.pages * args.pool_factor
    proc = subprocess.Popen(
        [sys.executable, __file__, "--target", *sys.argv[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = json.loads(proc.stdout.readline())

        def call(**cmd):
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        remote_name = f"127.0.0.1:{hello['port']}"
        pool = np.empty(pool_pages * page, dtype=np.uint8)
        pool.fill(2)
        eng = engine()
        if eng.register_memory(pool.ctypes.data, pool.nbytes) != 0:
            raise SystemExit("mooncake register_memory failed")
        rng = np.random.default_rng(args.seed)
        ls = rng.choice(pool_pages, size=args.pages, replace=False).astype(np.int64)
        rs = rng.choice(pool_pages, size=args.pages, replace=False).astype(np.int64)
        local = [int(pool.ctypes.data + s * page) for s in ls]
        remote = [int(hello["addr"] + s * page) for s in rs]
        lens = [page] * args.pages
        pool.reshape(-1, page)[ls] = pattern(args.seed + 1, args.pages, page)

        def check(rc: int) -> None:
            if rc != 0:
                raise SystemExit(f"mooncake transfer failed: {rc}")

        w = timed(
            lambda: check(eng.batch_transfer_sync_write(remote_name, local, remote, lens)),
            args.repeats,
        )
        ok_w = call(cmd="digest", slots=rs.tolist())["digest"] == digest(pool, ls, page)
        call(cmd="fill", seed=args.seed + 2, slots=rs.tolist())
        pool.reshape(-1, page)[ls] = 0
        r = timed(
            lambda: check(eng.batch_transfer_sync_read(remote_name, local, remote, lens)),
            args.repeats,
        )
        exp = np.zeros_like(pool)
        exp.reshape(-1, page)[ls] = pattern(args.seed + 2, args.pages, page)
        ok_r = digest(pool, ls, page) == digest(exp, ls, page)
        op = timed(
            lambda: check(eng.transfer_sync_write(remote_name, local[0], remote[0], page)),
            args.op_repeats,
            20,
        )
        nbytes = args.pages * page
        print(
            json.dumps(
                {
                    "system": "mooncake-te-tcp",
                    "write_gbps": nbytes / w / 1e9,
                    "read_gbps": nbytes / r / 1e9,
                    "op_us": op * 1e6,
                    "verified": bool(ok_w and ok_r),
                }
            ),
            flush=True,
        )
    finally:
        try:
            proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=10)
        except Exception:
            proc.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="store_true")
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--page-kib", type=int, default=16)
    ap.add_argument("--pool-factor", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--op-repeats", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    target(a) if a.target else initiator(a)

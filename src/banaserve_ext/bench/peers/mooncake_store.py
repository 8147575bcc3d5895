# SPDX-License-Identifier: Apache-2.0
"""Mooncake Store (mooncake_master + TCP clients) on the standard store case.

Runs under the python of a scratch venv that has ``mooncake-transfer-engine-non-cuda`` and numpy
(it must not import banaserve_ext). Starts ``mooncake_master`` on 127.0.0.1, a storage process
that mounts the global segment, and measures from this (third) process, a pure client with its
own registered buffers: ``batch_put_from`` / ``batch_get_into`` of N pages (fresh keys every
repeat, data verified) and ``batch_is_exist`` of the N keys. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
from mooncake.store import MooncakeDistributedStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(master: str, segment_bytes: int, local_buffer: int) -> MooncakeDistributedStore:
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment_bytes, local_buffer, "tcp", "", master)
    if rc != 0:
        raise SystemExit(f"mooncake setup failed: {rc}")
    return store


def storage(args: argparse.Namespace) -> None:
    store = make_store(args.master, args.segment_mib << 20, 16 << 20)
    print("READY", flush=True)
    sys.stdin.read()  # until the client closes our stdin
    store.close()


def keys_for(rep: int, n: int) -> list[str]:
    return [f"{rep:04x}{i:060x}" for i in range(n)]


def client(args: argparse.Namespace) -> dict[str, object]:
    page = args.page_kib * 1024
    store = make_store(args.master, 0, 2 * args.pages * page + (64 << 20))
    src = np.random.default_rng(args.seed).integers(0, 256, (args.pages, page), dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)
    for buf in (src, dst):
        if store.register_buffer(buf.ctypes.data, buf.nbytes) != 0:
            raise SystemExit("mooncake register_buffer failed")
    src_ptrs = [src.ctypes.data + i * page for i in range(args.pages)]
    dst_ptrs = [dst.ctypes.data + i * page for i in range(args.pages)]
    sizes = [page] * args.pages
    put_s, get_s, exist_s = [], [], []
    verified = True
    for rep in range(args.repeats + 1):  # the first repeat warms up
        keys = keys_for(rep, args.pages)
        t0 = time.perf_counter()
        rc = store.batch_put_from(keys, src_ptrs, sizes)
        t1 = time.perf_counter()
        if any(r != 0 for r in rc):
            raise SystemExit(f"batch_put_from failed: {sorted(set(rc))}")
        dst.fill(0)
        t2 = time.perf_counter()
        rc = store.batch_get_into(keys, dst_ptrs, sizes)
        t3 = time.perf_counter()
        if any(r != page for r in rc):
            raise SystemExit(f"batch_get_into failed: {sorted(set(rc))[:5]}")
        verified = verified and bool(np.array_equal(src, dst))
        t4 = time.perf_counter()
        ex = store.batch_is_exist(keys)
        t5 = time.perf_counter()
        if any(e != 1 for e in ex):
            raise SystemExit("batch_is_exist missed stored keys")
        if rep > 0:
            put_s.append(t1 - t0)
            get_s.append(t3 - t2)
            exist_s.append(t5 - t4)
    nbytes = args.pages * page
    return {
        "system": "mooncake_store",
        "put_gbps": nbytes / statistics.median(put_s) / 1e9,
        "get_gbps": nbytes / statistics.median(get_s) / 1e9,
        "exists_us": statistics.median(exist_s) * 1e6,
        "put_gbps_all": [nbytes / s / 1e9 for s in put_s],
        "get_gbps_all": [nbytes / s / 1e9 for s in get_s],
        "verified": verified,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pages", type=int, default=1000)
    p.add_argument("--page-kib", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--segment-mib", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--role", choices=["run", "storage"], default="run")
    p.add_argument("--master", default="")
    args = p.parse_args()
    if args.role == "storage":
        storage(args)
        return 0
    bindir = os.path.dirname(sys.executable)
    master_bin = os.path.join(bindir, "mooncake_master")
    port, metrics = free_port(), free_port()
    master = subprocess.Popen(
        [master_bin, "--rpc_address=127.0.0.1", f"--rpc_port={port}",
         f"--metrics_port={metrics}", "--enable_http_metadata_server=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store_proc = None
    try:
        time.sleep(1.0)
        args.master = f"127.0.0.1:{port}"
        store_proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "storage", "--master", args.master,
             "--segment-mib", str(args.segment_mib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        line = store_proc.stdout.readline() if store_proc.stdout else ""
        if line.strip() != "READY":
            raise SystemExit("mooncake storage process did not start")
        result = client(args)
        result.update(pages=args.pages, page_kib=args.page_kib, repeats=args.repeats)
        print(json.dumps(result), flush=True)
    finally:
        if store_proc is not None:
            if store_proc.stdin:
                store_proc.stdin.close()
            try:
                store_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                store_proc.kill()
                store_proc.wait()
        master.terminate()
        try:
            master.wait(timeout=10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

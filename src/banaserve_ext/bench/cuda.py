# SPDX-License-Identifier: Apache-2.0
"""``banaserve bench cuda``: the GPU data paths, each against ``cudaMemcpy`` of the same bytes
measured in the same run (ratios, medians of ``--repeats`` runs).

1. D2D pages in one process: ``--pages-small`` × 16 KiB and ``--pages-large`` × 1 MiB scattered
   over a pool 4× as large, one engine batch vs one ``cudaMemcpy`` D2D of the same total bytes.
2. Two processes on one GPU host over CUDA IPC: the child registers a GPU pool, the parent writes
   scattered pages into it (backend ``cuda``, verified by digest), vs local ``cudaMemcpy``.
3. Layer-wise tail: ``--layers`` layers, a CUDA event recorded after each layer's (simulated)
   compute; the tail is the time from the last event's completion to the stream's completion.

Needs a build with ``-DBANASERVE_WITH_CUDA=ON`` and a CUDA device. NOT RUN YET: written and
checked on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np

from ..errors import NotSupportedError
from . import _cudart
from ._stats import gbps, median, print_table

KIB = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pages-small", type=int, default=1000, help="number of 16 KiB pages")
    p.add_argument("--pages-large", type=int, default=100, help="number of 1 MiB pages")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pool-nbytes", type=int, default=0, help=argparse.SUPPRESS)


def _runtime() -> Any:
    from .. import _core

    if not _core.build_info()["cuda"]:
        raise NotSupportedError("this build has no cuda backend (-DBANASERVE_WITH_CUDA=ON)")
    rt = _cudart.load()
    if rt is None or _cudart.device_count(rt) == 0:
        raise NotSupportedError("no CUDA device or libcudart on this machine")
    return rt


class _Gpu:
    """A cudaMalloc'd pool the façade can register (DLPack device + CUDA array interface)."""

    def __init__(self, rt: Any, nbytes: int) -> None:
        self.rt, self.nbytes = rt, nbytes
        self.ptr = _cudart.malloc(rt, nbytes)
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3,
        }  # fmt: skip

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)

    def fill_random(self, seed: int) -> None:
        host = np.random.default_rng(seed).integers(0, 256, self.nbytes, dtype=np.uint8)
        _cudart.memcpy(self.rt, self.ptr, host.ctypes.data, self.nbytes, _cudart.H2D)

    def pages(self, slots: np.ndarray, page: int) -> bytes:
        host = np.empty(self.nbytes, np.uint8)
        _cudart.memcpy(self.rt, host.ctypes.data, self.ptr, self.nbytes, _cudart.D2H)
        return np.ascontiguousarray(host.reshape(-1, page)[slots]).tobytes()


def _table(base: int, pages: int, page: int) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


def _memcpy_seconds(rt: Any, dst: int, src: int, nbytes: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        _cudart.memcpy(rt, dst, src, nbytes, _cudart.D2D)
        samples.append(time.perf_counter() - t0)
    return median(samples[1:])


def bench_d2d(rt: Any, pages: int, page: int, repeats: int) -> dict[str, float]:
    from ..transfer import Op, TransferEngine

    pool_pages = 4 * pages
    src, dst = _Gpu(rt, pool_pages * page), _Gpu(rt, pool_pages * page)
    try:
        src.fill_random(1)
        rng = np.random.default_rng(2)
        ls = rng.choice(pool_pages, pages, replace=False)
        rs = rng.choice(pool_pages, pages, replace=False)
        with TransferEngine() as eng:
            a, b = eng.register(src), eng.register(dst)
            local = eng.prepare(_table(a.addr, pool_pages, page), device=("cuda", 0))
            remote = eng.prepare(_table(b.addr, pool_pages, page), device=("cuda", 0))
            samples = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                assert eng.submit(Op.WRITE, local, ls, remote, rs).wait(60)
                samples.append(time.perf_counter() - t0)
            ours = median(samples[1:])
        if src.pages(ls, page) != dst.pages(rs, page):
            raise RuntimeError("D2D pages differ after the transfer")
        base = _memcpy_seconds(rt, dst.ptr, src.ptr, pages * page, repeats)
    finally:
        _cudart.free(rt, src.ptr)
        _cudart.free(rt, dst.ptr)
    nbytes = pages * page
    return {
        "ours_gbps": gbps(nbytes, ours),
        "memcpy_gbps": gbps(nbytes, base),
        "ratio": base / ours,
    }


def bench_ipc(rt: Any, pages: int, page: int, repeats: int) -> dict[str, float]:
    from ..transfer import Op, TransferEngine

    pool = 4 * pages * page
    child = subprocess.Popen(
        [sys.executable, "-m", "banaserve_ext.bench.cuda", "--child", "--pool-nbytes", str(pool)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        hello = json.loads(child.stdout.readline())
        src = _Gpu(rt, pool)
        src.fill_random(3)
        rng = np.random.default_rng(4)
        ls = rng.choice(4 * pages, pages, replace=False)
        rs = rng.choice(4 * pages, pages, replace=False)
        with TransferEngine() as eng:
            reg = eng.register(src)
            peer = eng.add_peer(base64.b64decode(hello["metadata"]))
            if eng.backend_for(peer) != "cuda":
                raise RuntimeError(f"expected the cuda backend, got {eng.backend_for(peer)}")
            local = eng.prepare(_table(reg.addr, 4 * pages, page), device=("cuda", 0))
            remote = eng.prepare(_table(hello["addr"], 4 * pages, page), peer=peer,
                                 device=("cuda", 0))  # fmt: skip
            samples = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                assert eng.submit(Op.WRITE, local, ls, remote, rs).wait(60)
                samples.append(time.perf_counter() - t0)
            ours = median(samples[1:])
        child.stdin.write(json.dumps({"slots": [int(s) for s in rs], "page": page}) + "\n")
        child.stdin.flush()
        theirs = json.loads(child.stdout.readline())["digest"]
        if theirs != hashlib.blake2b(src.pages(ls, page), digest_size=16).hexdigest():
            raise RuntimeError("pages differ in the peer process after the CUDA IPC transfer")
        scratch = _cudart.malloc(rt, pages * page)
        base = _memcpy_seconds(rt, scratch, src.ptr, pages * page, repeats)
        _cudart.free(rt, scratch)
        _cudart.free(rt, src.ptr)
    finally:
        child.kill()
        child.wait()
    nbytes = pages * page
    return {
        "ours_gbps": gbps(nbytes, ours),
        "memcpy_gbps": gbps(nbytes, base),
        "ratio": base / ours,
    }


def bench_layer_tail(rt: Any, layers: int, repeats: int) -> dict[str, float]:
    """Tail after the last layer's event; per-layer work simulated by a D2D copy on the default
    stream (the producer), the event recorded right after it."""
    from ..transfer import TransferEngine

    page, per_layer = 16 * KIB, 64
    src, dst = _Gpu(rt, layers * per_layer * page), _Gpu(rt, layers * per_layer * page)
    work = _Gpu(rt, 64 << 20)
    tails = []
    try:
        with TransferEngine() as eng:
            a, b = eng.register(src), eng.register(dst)
            lb = a.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * page)
            rb = b.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * page)
            local = eng.prepare_layout(lb, page, per_layer, device=("cuda", 0))
            remote = eng.prepare_layout(rb, page, per_layer, device=("cuda", 0))
            idx = np.arange(per_layer, dtype=np.int64)
            for rep in range(repeats + 1):
                send = eng.open_stream(100 + rep, layers, local, idx, remote, idx,
                                       buffers_per_layer=1, timeout_s=60)  # fmt: skip
                last = 0
                for layer in range(layers):
                    half = ctypes.c_size_t(32 << 20)
                    dst_w, src_w = ctypes.c_void_p(work.ptr), ctypes.c_void_p(work.ptr + (32 << 20))
                    rt.cudaMemcpyAsync(dst_w, src_w, half, _cudart.D2D, ctypes.c_void_p(0))
                    last = _cudart.event_record(rt)
                    send.mark_layer_ready_after_event(layer, last)
                rt.cudaEventSynchronize(ctypes.c_void_p(last))
                t0 = time.perf_counter()
                assert send.wait(60)
                if rep:
                    tails.append(time.perf_counter() - t0)
    finally:
        for g in (src, dst, work):
            _cudart.free(rt, g.ptr)
    return {"tail_us": median(tails) * 1e6, "layers": float(layers)}


def _child(args: argparse.Namespace) -> int:
    from ..transfer import TransferEngine

    rt = _runtime()
    pool = _Gpu(rt, args.pool_nbytes)
    with TransferEngine() as eng:
        reg = eng.register(pool)
        hello = {"metadata": base64.b64encode(eng.metadata()).decode(), "addr": reg.addr}
        print(json.dumps(hello), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            data = pool.pages(np.asarray(cmd["slots"], np.int64), int(cmd["page"]))
            print(json.dumps({"digest": hashlib.blake2b(data, digest_size=16).hexdigest()}),
                  flush=True)  # fmt: skip
    return 0


def main(args: argparse.Namespace) -> int:
    if args.child:
        return _child(args)
    rt = _runtime()
    rows = []
    for name, pages, page in (
        ("D2D 16 KiB", args.pages_small, 16 * KIB),
        ("D2D 1 MiB", args.pages_large, 1024 * KIB),
    ):
        r = bench_d2d(rt, pages, page, args.repeats)
        rows.append([name, pages, r["ours_gbps"], r["memcpy_gbps"], r["ratio"]])
    for name, pages, page in (
        ("IPC 16 KiB", args.pages_small, 16 * KIB),
        ("IPC 1 MiB", args.pages_large, 1024 * KIB),
    ):
        r = bench_ipc(rt, pages, page, args.repeats)
        rows.append([name, pages, r["ours_gbps"], r["memcpy_gbps"], r["ratio"]])
    print_table(["case", "pages", "ours GB/s", "cudaMemcpy GB/s", "ours/memcpy"], rows)
    tail = bench_layer_tail(rt, args.layers, args.repeats)
    print(f"layer-wise tail after the last CUDA event: {tail['tail_us']:.1f} us "
          f"({args.layers} layers, median of {args.repeats})")  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m banaserve_ext.bench.cuda")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

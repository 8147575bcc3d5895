# SPDX-License-Identifier: Apache-2.0
"""Just enough of the CUDA runtime through ctypes for the GPU tests and benchmark (no torch, no
cupy): device count, malloc/free, memcpy, events. ``None`` when libcudart cannot be loaded."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

H2D, D2H, D2D, DEFAULT = 1, 2, 3, 4


def load() -> Any | None:
    names = [
        ctypes.util.find_library("cudart"),
        "libcudart.so",
        "libcudart.so.13",
        "libcudart.so.12",
    ]
    for name in [n for n in names if n]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def device_count(rt: Any) -> int:
    n = ctypes.c_int(0)
    return n.value if rt.cudaGetDeviceCount(ctypes.byref(n)) == 0 else 0


def malloc(rt: Any, nbytes: int) -> int:
    p = ctypes.c_void_p()
    err = rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(nbytes))
    if err != 0:
        raise RuntimeError(f"cudaMalloc({nbytes}) failed: {err}")
    return int(p.value or 0)


def free(rt: Any, ptr: int) -> None:
    rt.cudaFree(ctypes.c_void_p(ptr))


def memcpy(rt: Any, dst: int, src: int, nbytes: int, kind: int = DEFAULT) -> None:
    err = rt.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind)
    if err != 0:
        raise RuntimeError(f"cudaMemcpy failed: {err}")


def synchronize(rt: Any) -> None:
    rt.cudaDeviceSynchronize()


def event_record(rt: Any) -> int:
    """A new event recorded on the default stream; returns its raw cudaEvent_t."""
    ev = ctypes.c_void_p()
    if rt.cudaEventCreate(ctypes.byref(ev)) != 0:
        raise RuntimeError("cudaEventCreate failed")
    if rt.cudaEventRecord(ev, ctypes.c_void_p(0)) != 0:
        raise RuntimeError("cudaEventRecord failed")
    return int(ev.value or 0)

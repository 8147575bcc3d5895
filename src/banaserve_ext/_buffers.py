# SPDX-License-Identifier: Apache-2.0
"""Normalise the memory objects users hand us into ``(addr, nbytes, device)``.

Accepted: an ``int`` address with an explicit ``nbytes``; objects with ``__dlpack__`` (torch
tensors, numpy arrays, ...); objects with the buffer protocol (numpy, bytearray, mmap). Never
imports torch: a CUDA tensor is recognised through ``__dlpack_device__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, NotSupportedError

# DLPack device types (dlpack.h): kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3

HOST, CUDA = 0, 1


@dataclass(frozen=True)
class BufferView:
    addr: int
    nbytes: int
    device_kind: int  # HOST or CUDA
    device_id: int
    #: the object whose memory this is; kept referenced by whoever registers the view
    owner: Any


def as_buffer_view(obj: Any, nbytes: int | None = None) -> BufferView:
    if isinstance(obj, bool):
        raise InvalidArgumentError(
            "expected memory (buffer, DLPack object or int address), got bool"
        )
    if isinstance(obj, int):
        if nbytes is None:
            raise InvalidArgumentError("an int address needs an explicit nbytes")
        if obj <= 0 or nbytes < 0:
            raise InvalidArgumentError(f"invalid raw range addr={obj:#x} nbytes={nbytes}")
        return BufferView(obj, int(nbytes), HOST, 0, None)
    if hasattr(obj, "__dlpack_device__") and not isinstance(obj, np.ndarray):
        dev_type, dev_id = obj.__dlpack_device__()
        if int(dev_type) == _DL_CUDA:
            ptr = _cuda_pointer(obj)
            size = _nbytes_of(obj)
            return _sized(BufferView(ptr, size, CUDA, int(dev_id), obj), nbytes)
        if int(dev_type) not in (_DL_CPU, _DL_CUDA_HOST):
            raise NotSupportedError(f"DLPack device type {int(dev_type)} is not supported")
        try:
            arr = np.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError) as exc:
            # a dtype numpy lacks (bfloat16, float8, ...): the bytes are what gets registered
            return _sized(_from_tensor_like(obj, exc), nbytes)
        return _sized(_from_array(arr, obj), nbytes)
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgumentError(
            f"cannot use {type(obj).__name__} as memory: it has neither the buffer protocol nor "
            "__dlpack__, and is not an int address"
        ) from None
    if view.readonly:
        raise InvalidArgumentError(
            f"{type(obj).__name__} is read-only; registered memory may be written by peers"
        )
    if not view.c_contiguous:
        raise InvalidArgumentError(f"{type(obj).__name__} is not C-contiguous")
    arr = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    return _sized(_from_array(arr, obj), nbytes)


def _from_array(arr: np.ndarray, owner: Any) -> BufferView:
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError("memory must be C-contiguous")
    if not arr.flags.writeable:
        raise InvalidArgumentError("memory is read-only; registered memory may be written by peers")
    return BufferView(int(arr.ctypes.data), int(arr.nbytes), HOST, 0, owner)


def _from_tensor_like(obj: Any, why: Exception) -> BufferView:
    """Host memory of a tensor numpy cannot view (torch-style ``data_ptr``/``is_contiguous``)."""
    if not (hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous")):
        raise NotSupportedError(f"cannot view {type(obj).__name__} as host memory: {why}")
    if not obj.is_contiguous():
        raise InvalidArgumentError("memory must be C-contiguous")
    return BufferView(int(obj.data_ptr()), _nbytes_of(obj), HOST, 0, obj)


def _sized(view: BufferView, nbytes: int | None) -> BufferView:
    if nbytes is None:
        return view
    if nbytes < 0 or nbytes > view.nbytes:
        raise InvalidArgumentError(f"nbytes={nbytes} exceeds the object's {view.nbytes} bytes")
    return BufferView(view.addr, int(nbytes), view.device_kind, view.device_id, view.owner)


def _cuda_pointer(obj: Any) -> int:
    if hasattr(obj, "data_ptr"):
        return int(obj.data_ptr())
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    raise NotSupportedError("cannot find the device pointer of this CUDA object")


def _nbytes_of(obj: Any) -> int:
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return int(obj.numel() * obj.element_size())
    raise NotSupportedError(f"cannot find the size of this {type(obj).__name__}")


def array_at(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy view of raw memory (no copy, no ownership)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    import ctypes

    buf = (ctypes.c_uint8 * nbytes).from_address(addr)
    return np.frombuffer(buf, dtype=np.uint8)

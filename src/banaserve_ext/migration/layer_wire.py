# SPDX-License-Identifier: Apache-2.0
"""Frames of the layer server's control channel (one TCP connection on 127.0.0.1 or a LAN).

A frame is ``[u32 header length][msgpack header][u64 length, bytes]*`` (big-endian). The
header, itself one frame of :mod:`banaserve_ext._framing`, names the raw buffers that follow
(``header["bufs"] = [[name, dtype, shape], ...]``). Tensors travel as raw bytes, never pickled;
buffers are sent with one ``sendmsg`` straight from the tensors' memory and received into one
preallocated bytearray each.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _framing
from ..errors import ProtocolError, UnavailableError

_U64 = struct.Struct(">Q")
_CHANNEL = "layer server channel"
#: a corrupt length must not make us allocate gigabytes
MAX_HEADER = 1 << 24
MAX_BUFFER = 1 << 34

_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "uint8"}


def _as_bytes_view(arr: Any) -> memoryview:
    """A byte view of a contiguous numpy array or CPU torch tensor (no copy)."""
    if isinstance(arr, np.ndarray):
        return memoryview(np.ascontiguousarray(arr)).cast("B")
    t = arr.contiguous()
    return memoryview(t.view(-1).view(dtype=_torch().uint8).numpy()).cast("B")


def _torch() -> Any:
    import torch

    return torch


def dtype_name(arr: Any) -> str:
    if isinstance(arr, np.ndarray):
        return str(arr.dtype)
    return str(arr.dtype).removeprefix("torch.")


def send_msg(sock: socket.socket, header: dict, bufs: Sequence[tuple[str, Any]] = ()) -> None:
    """Sends ``header`` and the named arrays/tensors ``bufs``."""
    views = [_as_bytes_view(a) for _, a in bufs]
    header = dict(header)
    header["bufs"] = [[n, dtype_name(a), list(a.shape)] for n, a in bufs]
    parts: list[Any] = [_framing.encode(header, max_bytes=MAX_HEADER)]
    for v in views:
        parts += [_U64.pack(v.nbytes), v]
    try:
        total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        sent = sock.sendmsg(parts)
        if sent < total:  # rare partial send: finish with one joined buffer
            sock.sendall(b"".join(bytes(p) for p in parts)[sent:])
    except OSError as exc:
        raise UnavailableError(f"{_CHANNEL}: send failed: {exc}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    try:
        return _framing.recv_exact(sock, n, _CHANNEL)
    except TimeoutError:
        raise UnavailableError(f"{_CHANNEL}: no answer within {sock.gettimeout()} s") from None


def recv_msg(sock: socket.socket) -> tuple[dict, dict[str, np.ndarray]]:
    """Receives one frame: the header and its buffers as numpy arrays (bfloat16 as raw uint16
    words, to be viewed as bfloat16 by torch callers with :func:`to_tensor`)."""
    try:
        header = _framing.recv(sock, max_bytes=MAX_HEADER, channel=_CHANNEL)
    except TimeoutError:
        raise UnavailableError(f"{_CHANNEL}: no answer within {sock.gettimeout()} s") from None
    if not isinstance(header, dict):
        raise ProtocolError("a frame header must be a map")
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in header.get("bufs", []):
        (size,) = _U64.unpack(_recv_exact(sock, _U64.size))
        if size > MAX_BUFFER or dtype not in _DTYPES:
            raise ProtocolError(f"buffer {name!r}: bad size {size} or dtype {dtype!r}")
        raw = _recv_exact(sock, size)
        np_dtype = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        arr = np.frombuffer(raw, dtype=np_dtype)
        if int(np.prod(shape, dtype=np.int64)) != arr.size:
            raise ProtocolError(f"buffer {name!r}: {arr.size} items do not fill shape {shape}")
        arrays[name] = arr.reshape(shape)
        arrays[name].flags.writeable = True
    header["_dtypes"] = {name: dtype for name, dtype, _ in header.get("bufs", [])}
    return header, arrays


def to_tensor(header: dict, arrays: dict[str, np.ndarray], name: str) -> Any:
    """A received buffer as a torch tensor of its sent dtype (shares the received memory)."""
    torch = _torch()
    arr = arrays[name]
    t = torch.from_numpy(arr)
    if header["_dtypes"][name] == "bfloat16":
        t = t.view(torch.bfloat16)
    return t

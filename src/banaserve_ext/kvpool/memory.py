# SPDX-License-Identifier: Apache-2.0
"""Caller memory → addresses: the small pure functions behind ``batch_get``/``batch_set``.

Accepted memory: anything with the buffer protocol (numpy arrays, bytearray, memoryview), CPU
tensors through DLPack (torch), and raw integer pointers (with an explicit byte count). Nothing
here copies: every function returns addresses into the caller's own memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

_DLPACK_CPU = 1

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """``"8GiB"`` → 8589934592; ``"16KiB"``, ``"1.5MB"``, ``4096`` also accepted."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgumentError(f"size must be >= 0, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise InvalidArgumentError(
            f"cannot parse size {text!r} (examples: 4096, 16KiB, 8GiB, 1.5GB)"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Span:
    """A contiguous byte range of caller memory; ``keepalive`` holds the exporting object."""

    address: int
    nbytes: int
    keepalive: Any = None


def span_of(obj: Any, *, writable: bool, nbytes: int | None = None) -> Span:
    """The contiguous memory behind ``obj``.

    ``obj`` is an ``int`` pointer (then ``nbytes`` is required), an object with ``__dlpack__``
    on the CPU (torch tensors), or a buffer-protocol object. Non-contiguous memory, GPU memory
    and read-only memory where ``writable`` is needed raise :class:`InvalidArgumentError`.
    """
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        if nbytes is None:
            raise InvalidArgumentError("a raw pointer needs nbytes")
        if int(obj) <= 0:
            raise InvalidArgumentError(f"raw pointer must be > 0, got {int(obj)}")
        return Span(int(obj), int(nbytes))
    if isinstance(obj, np.ndarray):
        arr = obj
    elif hasattr(obj, "__dlpack__") and not _has_buffer(obj):
        device = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else None
        if device is not None and int(device[0]) != _DLPACK_CPU:
            raise InvalidArgumentError(
                f"memory on DLPack device {tuple(device)} is not host memory; the pool holds "
                "host pages (copy to CPU first)"
            )
        try:
            arr = np.from_dlpack(obj)
        except (TypeError, BufferError, RuntimeError) as exc:
            raise InvalidArgumentError(
                f"cannot export {type(obj).__name__} via DLPack: {exc}"
            ) from None
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            raise InvalidArgumentError(
                f"{type(obj).__name__} is neither a buffer, a DLPack tensor nor an int pointer"
            ) from None
        if not view.c_contiguous:
            raise InvalidArgumentError("memory must be C-contiguous")
        arr = np.asarray(view)
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError("memory must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise InvalidArgumentError("destination memory is read-only")
    size = int(arr.nbytes)
    if nbytes is not None and nbytes > size:
        raise InvalidArgumentError(f"need {nbytes} bytes but the buffer has {size}")
    return Span(int(arr.ctypes.data), size if nbytes is None else int(nbytes), arr)


def _has_buffer(obj: Any) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def page_addresses(base: int, n_pages: int, page_size: int) -> np.ndarray:
    """Addresses of ``n_pages`` consecutive pages of ``page_size`` bytes from ``base``."""
    return np.uint64(base) + np.arange(n_pages, dtype=np.uint64) * np.uint64(page_size)


def check_page_span(span: Span, n_pages: int, page_size: int) -> None:
    """A buffer for ``n_pages`` whole pages must hold exactly ``n_pages * page_size`` bytes."""
    want = n_pages * page_size
    if span.nbytes != want:
        raise InvalidArgumentError(
            f"buffer has {span.nbytes} bytes but {n_pages} pages of {page_size} bytes need {want}"
            " (wrong page size for this pool?)"
        )


def piece_addresses(
    addrs: Any, seg_lens: Any, n_pages: int, page_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validates an explicit address table: ``addrs`` (n,) or (n, S) uint64, ``seg_lens`` (S,).

    Returns flat C-contiguous uint64 arrays as the core expects them.
    """
    table = np.ascontiguousarray(addrs, dtype=np.uint64)
    if seg_lens is None:
        lens = np.array([page_size], dtype=np.uint64)
    else:
        lens = np.ascontiguousarray(seg_lens, dtype=np.uint64).reshape(-1)
    segments = int(lens.size)
    if segments == 0:
        raise InvalidArgumentError("seg_lens is empty")
    if table.ndim == 1 and segments > 1:
        table = table.reshape(-1, segments) if table.size == n_pages * segments else table
    if table.size != n_pages * segments or (table.ndim == 2 and table.shape != (n_pages, segments)):
        raise InvalidArgumentError(
            f"address table has shape {table.shape}; expected ({n_pages}, {segments})"
        )
    total = int(lens.sum())
    if total != page_size:
        raise InvalidArgumentError(
            f"page pieces sum to {total} bytes but this pool's page size is {page_size}"
        )
    if n_pages and int(table.min()) == 0:
        raise InvalidArgumentError("address table contains a null pointer")
    return table.reshape(-1), lens


def caller_pieces(
    buf: Any,
    addrs: Any,
    seg_lens: Any,
    nbytes: int | None,
    n_pages: int,
    page_size: int,
    *,
    writable: bool,
) -> tuple[np.ndarray, np.ndarray, Any]:
    """The caller-memory forms of ``batch_get``/``batch_set`` → ``(flat piece addresses, piece
    lengths, keepalive)``: one contiguous buffer of ``n_pages * page_size`` bytes (page i at
    offset ``i * page_size``), or ``addrs`` (n,) / (n, S) with ``seg_lens``."""
    if addrs is not None:
        if buf is not None:
            raise InvalidArgumentError("pass either a buffer or addrs, not both")
        flat, lens = piece_addresses(addrs, seg_lens, n_pages, page_size)
        return flat, lens, None
    if buf is None:
        raise InvalidArgumentError("a buffer (or addrs) is required")
    if seg_lens is not None:
        raise InvalidArgumentError("seg_lens needs addrs")
    span = span_of(buf, writable=writable, nbytes=nbytes)
    check_page_span(span, n_pages, page_size)
    return (
        page_addresses(span.address, n_pages, page_size),
        np.array([page_size], np.uint64),
        span.keepalive,
    )


# -- descriptor tables of the remote pool (kvpool/server.py, kvpool/remote.py) -------------------
def slot_addresses(region_addr: int, stride: int, slots: Any) -> np.ndarray:
    """Addresses of the pages of ``slots`` in a page region (``KVPool.page_region``)."""
    s = np.asarray(slots, dtype=np.uint64)
    return np.uint64(region_addr) + s * np.uint64(stride)


def piece_descriptors(addrs: Any, seg_lens: Any) -> np.ndarray:
    """An (n * S, 2) ``(addr, nbytes)`` table from piece addresses (n, S) or (n * S,) and the S
    piece lengths: row ``i * S + j`` is piece j of page i."""
    lens = np.ascontiguousarray(seg_lens, dtype=np.uint64).reshape(-1)
    flat = np.ascontiguousarray(addrs, dtype=np.uint64).reshape(-1)
    if lens.size == 0 or flat.size % lens.size:
        raise InvalidArgumentError(f"{flat.size} piece addresses do not split into {lens.size}")
    table = np.empty((flat.size, 2), dtype=np.uint64)
    table[:, 0] = flat
    table[:, 1] = np.tile(lens, flat.size // lens.size)
    return table


def page_piece_descriptors(page_addrs: Any, seg_lens: Any) -> np.ndarray:
    """The pieces of whole pages: page i piece j starts ``sum(seg_lens[:j])`` bytes into page i.
    Same row order as :func:`piece_descriptors`, so row k of both tables pairs up."""
    lens = np.ascontiguousarray(seg_lens, dtype=np.uint64).reshape(-1)
    starts = np.concatenate([np.zeros(1, np.uint64), np.cumsum(lens, dtype=np.uint64)[:-1]])
    pages = np.ascontiguousarray(page_addrs, dtype=np.uint64).reshape(-1, 1)
    return piece_descriptors(pages + starts.reshape(1, -1), lens)


def covering_range(table: np.ndarray) -> tuple[int, int]:
    """``[lo, hi)`` spanning every ``(addr, nbytes)`` row of ``table`` (empty table: (0, 0))."""
    if table.shape[0] == 0:
        return 0, 0
    return int(table[:, 0].min()), int((table[:, 0] + table[:, 1]).max())

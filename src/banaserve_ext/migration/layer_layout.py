# SPDX-License-Identifier: Apache-2.0
"""Index and offset arithmetic of layer migration (pure numpy, no torch, no I/O).

* :func:`plan_arena` places every migrated tensor (weights, per-layer K/V buffers) in one
  contiguous receiving arena on the layer server, each at an aligned offset.
* :func:`row_runs` turns the KV rows (token slots) to move into maximal runs of consecutive rows.
* :func:`row_descs` / :func:`whole_descs` build the ``(addr, nbytes)`` descriptor tables the
  transfer engine takes, for a subset of rows of a buffer or for whole tensors.
* :func:`used_rows` is the complement of a pool's free rows: the rows whose KV must move.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgumentError

#: alignment of every tensor in the arena (a cache line; also satisfies every dtype)
ARENA_ALIGN = 64


def align_up(n: int, align: int = ARENA_ALIGN) -> int:
    if align <= 0 or align & (align - 1):
        raise InvalidArgumentError(f"alignment must be a power of two, got {align}")
    if n < 0:
        raise InvalidArgumentError(f"size must be >= 0, got {n}")
    return (n + align - 1) & ~(align - 1)


def plan_arena(
    sizes: Sequence[Sequence[int]], align: int = ARENA_ALIGN
) -> tuple[list[list[int]], int]:
    """Offsets of tensors grouped by layer, packed in order, each aligned to ``align``.

    ``sizes[l][t]`` is the byte size of tensor t of layer l. Returns ``(offsets, total)``
    with ``offsets[l][t]`` and the arena size (a multiple of ``align``, at least ``align``).
    """
    offsets: list[list[int]] = []
    cur = 0
    for layer in sizes:
        row = []
        for n in layer:
            if int(n) < 0:
                raise InvalidArgumentError(f"tensor size must be >= 0, got {n}")
            row.append(cur)
            cur = align_up(cur + int(n), align)
        offsets.append(row)
    return offsets, max(cur, align)


def row_runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive values in ``rows`` (sorted and deduplicated first).

    Returns ``(starts, counts)`` (int64): run i covers rows ``starts[i] .. starts[i]+counts[i]-1``.
    Negative rows are refused.
    """
    r = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    if r.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if r[0] < 0:
        raise InvalidArgumentError(f"rows must be >= 0, got {int(r[0])}")
    breaks = np.flatnonzero(np.diff(r) != 1) + 1
    starts = r[np.concatenate(([0], breaks))]
    ends = r[np.concatenate((breaks - 1, [r.size - 1]))]
    return starts, ends - starts + 1


def row_descs(
    base: int, row_nbytes: int, num_rows: int, starts: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """``(N, 2)`` uint64 table ``(base + start * row_nbytes, count * row_nbytes)`` per run,
    checked against a buffer of ``num_rows`` rows."""
    s = np.asarray(starts, dtype=np.int64)
    c = np.asarray(counts, dtype=np.int64)
    if s.shape != c.shape or s.ndim != 1:
        raise InvalidArgumentError("starts and counts must be 1-D of the same length")
    if row_nbytes <= 0 or num_rows < 0 or base < 0:
        raise InvalidArgumentError(f"bad buffer: base={base} row_nbytes={row_nbytes}")
    if s.size and (s.min() < 0 or c.min() <= 0 or int((s + c).max()) > num_rows):
        raise InvalidArgumentError(f"row runs fall outside a buffer of {num_rows} rows")
    out = np.empty((s.size, 2), dtype=np.uint64)
    out[:, 0] = np.uint64(base) + s.astype(np.uint64) * np.uint64(row_nbytes)
    out[:, 1] = c.astype(np.uint64) * np.uint64(row_nbytes)
    return out


def whole_descs(addrs: Sequence[int], nbytes: Sequence[int]) -> np.ndarray:
    """``(N, 2)`` uint64 table of whole tensors; zero-byte tensors are left out."""
    if len(addrs) != len(nbytes):
        raise InvalidArgumentError("addrs and nbytes differ in length")
    rows = [(int(a), int(n)) for a, n in zip(addrs, nbytes, strict=True) if int(n) > 0]
    if any(a <= 0 or n < 0 for a, n in rows):
        raise InvalidArgumentError("whole_descs needs positive addresses")
    return np.array(rows, dtype=np.uint64).reshape(-1, 2)


def used_rows(num_rows: int, free: np.ndarray, reserved: Sequence[int] = (0,)) -> np.ndarray:
    """Rows ``0..num_rows-1`` that are neither free nor reserved (sorted int64).

    SGLang keeps token slot 0 as a padding slot that is never allocated: ``reserved``.
    """
    if num_rows < 0:
        raise InvalidArgumentError(f"num_rows must be >= 0, got {num_rows}")
    mask = np.ones(num_rows, dtype=bool)
    f = np.asarray(free, dtype=np.int64).ravel()
    if f.size and (f.min() < 0 or f.max() >= num_rows):
        raise InvalidArgumentError(f"free rows fall outside 0..{num_rows - 1}")
    mask[f] = False
    for r in reserved:
        if 0 <= r < num_rows:
            mask[r] = False
    return np.flatnonzero(mask).astype(np.int64)


def split_layers(num_layers: int, first: int) -> list[int]:
    """The migrated block ``first..num_layers-1``, checked: a non-empty suffix of the layer
    stack that leaves at least layer 0 on the owner."""
    if not 1 <= first < num_layers:
        raise InvalidArgumentError(
            f"cannot migrate layers {first}..{num_layers - 1} of a {num_layers}-layer model "
            "(need 1 <= first < num_layers: layer 0 stays on the owner)"
        )
    return list(range(first, num_layers))


def gather_token_rows(
    req_to_token: np.ndarray, req_rows: np.ndarray, seq_lens: np.ndarray
) -> np.ndarray:
    """The KV slots of a batch, request after request: ``req_to_token[req_rows[b], :seq_lens[b]]``
    concatenated over b (int64). One vectorised mask, no Python loop over requests."""
    table = np.asarray(req_to_token)
    rows = np.asarray(req_rows, dtype=np.int64).ravel()
    lens = np.asarray(seq_lens, dtype=np.int64).ravel()
    if table.ndim != 2 or rows.shape != lens.shape:
        raise InvalidArgumentError("need a 2-D table and one length per request row")
    if rows.size == 0:
        return np.zeros(0, np.int64)
    if rows.min() < 0 or rows.max() >= table.shape[0]:
        raise InvalidArgumentError(f"request rows fall outside 0..{table.shape[0] - 1}")
    if lens.min() < 0 or lens.max() > table.shape[1]:
        raise InvalidArgumentError(f"sequence lengths fall outside 0..{table.shape[1]}")
    width = int(lens.max())
    sel = table[rows, :width]
    mask = np.arange(width)[None, :] < lens[:, None]
    return sel[mask].astype(np.int64)

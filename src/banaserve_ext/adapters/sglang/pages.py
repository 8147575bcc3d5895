# SPDX-License-Identifier: Apache-2.0
"""Page arithmetic of the PD backend's layer-wise path, shared by :mod:`.conn` and
:mod:`.layerwise` (pure functions: which tokens a prefill forward pass completes, the layer order
of the pool's buffers, which page positions of a chunk are still to send)."""

from __future__ import annotations

from collections.abc import Sequence


def written_token_range(
    prefix_len: int, extend_end: int, input_len: int, page_size: int, send_base: int
) -> tuple[int, int, bool]:
    """Tokens ``[start, end)`` of a request whose pages one forward pass completes, and whether
    this pass is the request's last prefill chunk.

    The pass computes KV for tokens ``[prefix_len, extend_end)``. ``start`` is rounded down to a
    page (a page begun by the previous chunk is sent again, whole); unless this is the last
    chunk, ``end`` is rounded down too, so a partial page is sent once it is complete (as SGLang's
    per-chunk send does). ``send_base`` (the decode-side prefix, where sending starts) bounds
    ``start`` from below. ``start >= end`` means nothing to stream.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    end_tok = min(extend_end, input_len)
    is_last = extend_end >= input_len
    if not is_last:
        end_tok -= end_tok % page_size
    start = max(prefix_len, send_base)
    start -= (start - send_base) % page_size
    return start, end_tok, is_last


def layer_buffer_order(
    buffer_ptrs: Sequence[int], layer_ptrs: Sequence[Sequence[int]]
) -> list[int] | None:
    """Indices into ``buffer_ptrs`` (the pool's transfer buffers, e.g. all K then all V) grouped
    by layer in ``layer_ptrs`` order (the data pointers of each layer's buffers, e.g. (K, V)).

    None when the pool cannot be streamed by layer: a layer buffer that is not a transfer buffer,
    one used twice, layers of different buffer counts, or buffers no layer covers.
    """
    where = {int(p): i for i, p in enumerate(buffer_ptrs)}
    if len(where) != len(buffer_ptrs) or not layer_ptrs:
        return None
    per_layer = len(layer_ptrs[0])
    order: list[int] = []
    for ptrs in layer_ptrs:
        if len(ptrs) != per_layer or per_layer == 0:
            return None
        for p in ptrs:
            i = where.get(int(p))
            if i is None:
                return None
            order.append(i)
    if sorted(order) != list(range(len(buffer_ptrs))):
        return None
    return order


def uncovered_ranges(
    begin: int, end: int, covered: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The parts of ``[begin, end)`` not inside any of the ``covered`` ranges, in order."""
    out: list[tuple[int, int]] = []
    pos = begin
    for lo, hi in sorted(covered):
        if hi <= pos or lo >= end:
            continue
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out

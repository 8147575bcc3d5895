# SPDX-License-Identifier: Apache-2.0
"""Attention split along the token dimension: partial attention with its log-sum-exp, and the
exact merge of two partials (torch; imported only by code that already uses torch).

For one query and a key set split into parts A and B, with scores s = q·k·scale::

    lse_X = log Σ_{k∈X} e^{s_k}          o_X = Σ_{k∈X} e^{s_k − lse_X} v_k

and with m = max(lse_A, lse_B), w_X = e^{lse_X − m}::

    o = (w_A·o_A + w_B·o_B) / (w_A + w_B)       lse = m + log(w_A + w_B)

which is the issue's m = max(m1, m2), l = e^{m1−m}·l1 + e^{m2−m}·l2 written with lse = m + log l.
"""

from __future__ import annotations

import math
from typing import Any

LOG2_E = 1.0 / math.log(2.0)


def partial_attention(q: Any, k: Any, v: Any, scale: float) -> tuple[Any, Any]:
    """Attention of queries ``q`` [N, Hq, D] over keys/values ``k``/``v`` [T, Hkv, D] (no mask:
    every query sees every key, as in decode). Returns (o [N, Hq, Dv], lse [N, Hq]) in float32.
    ``T == 0`` gives o = 0 and lse = −inf (an empty part; the merge ignores it)."""
    import torch

    n, hq, d = q.shape
    t, hkv = k.shape[0], k.shape[1]
    if t == 0:
        o = torch.zeros((n, hq, v.shape[2]), dtype=torch.float32, device=q.device)
        return o, torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q.device)
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv
    # grouped: query head h reads KV head h // g; [Hkv, N·g, D] against [Hkv, T, D], no KV copy
    qg = (q.float() * scale).view(n, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n * g, d)
    kt = k.float().permute(1, 2, 0)  # [Hkv, D, T]
    scores = torch.bmm(qg, kt)  # [Hkv, N·g, T]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    o = torch.bmm(torch.exp(scores - lse), v.float().permute(1, 0, 2))  # [Hkv, N·g, Dv]
    o = o.view(hkv, n, g, -1).permute(1, 0, 2, 3).reshape(n, hq, -1)
    return o, lse.view(hkv, n, g).permute(1, 0, 2).reshape(n, hq)


def merge_states(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """Exact merge of two partials (o [..., H, D], lse [..., H], float32); the torch reference.
    A part with lse = −inf (empty) contributes nothing; two empty parts give o = 0, lse = −inf."""
    import torch

    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w_a = torch.exp(lse_a - m_safe)
    w_b = torch.exp(lse_b - m_safe)
    total = w_a + w_b
    denom = torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    o = (w_a.unsqueeze(-1) * o_a + w_b.unsqueeze(-1) * o_b) / denom
    return o, m_safe + torch.log(total)


def merge_states_fast(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """The same merge in six tensor ops (the hot path on CPU, where op count dominates):
    w_A / (w_A + w_B) = sigmoid(lse_A − lse_B), so o = o_B + sigmoid(lse_A − lse_B)·(o_A − o_B)
    and lse = logaddexp(lse_A, lse_B). Exact for finite lse and for one empty part; two empty
    parts give NaN (use :func:`merge_states` where that can happen)."""
    import torch

    w_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    return torch.addcmul(o_b, w_a, o_a - o_b), torch.logaddexp(lse_a, lse_b)


def flashinfer_merge_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or unusable: the torch merge is used
        return False
    return True


def merge_states_auto(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """flashinfer's ``merge_state`` for CUDA tensors when flashinfer imports, else
    :func:`merge_states_fast` (both parts of a split are never empty: the newest token stays
    local and a slice holds at least one token). UNTESTED on GPU (no GPU on the development
    host): flashinfer's log-sum-exp is base 2, hence the conversion; v/s are [N, H, D] / [N, H]."""
    if getattr(o_a, "is_cuda", False) and flashinfer_merge_available():
        import flashinfer

        o, s = flashinfer.merge_state(
            o_a.contiguous(),
            (lse_a * LOG2_E).contiguous(),
            o_b.contiguous(),
            (lse_b * LOG2_E).contiguous(),
        )
        return o, s / LOG2_E
    return merge_states_fast(o_a, lse_a, o_b, lse_b)


def split_positions(seq_len: int, start: int, end: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The positions of a row of ``seq_len`` tokens that stay local when [start, end) moved away:
    ([0, start), [end, seq_len)). Raises ValueError for a range outside the row."""
    if not 0 <= start < end <= seq_len:
        raise ValueError(f"token range [{start}, {end}) is not inside a row of {seq_len} tokens")
    return (0, start), (end, seq_len)

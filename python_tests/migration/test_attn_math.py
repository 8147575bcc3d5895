# SPDX-License-Identifier: Apache-2.0
"""The split-attention math: partial attention with log-sum-exp, the exact merge, and the range
arithmetic of the SGLang glue (pure; no SGLang)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from banaserve_ext.adapters.sglang.kv_migration import KvMigrate, pick_range, subtract_range  # noqa: E402
from banaserve_ext.errors import InvalidArgumentError  # noqa: E402
from banaserve_ext.migration.attn_math import (  # noqa: E402
    merge_states,
    merge_states_auto,
    merge_states_fast,
    partial_attention,
    split_positions,
)


def qkv(seed: int, n: int = 3, hq: int = 4, hkv: int = 2, t: int = 37, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g) * 2.0  # peaky scores: the merge must rescale
    v = torch.randn(t, hkv, d, generator=g)
    return q, k, v


def sdpa(q, k, v, scale):
    """SGLang's torch_native decode path: SDPA over [1, H, N, D] with enable_gqa."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.movedim(0, 1).unsqueeze(0),
        k.movedim(0, 1).unsqueeze(0),
        v.movedim(0, 1).unsqueeze(0),
        enable_gqa=True,
        scale=scale,
    )
    return out.squeeze(0).movedim(1, 0)


@pytest.mark.parametrize("cut", [1, 5, 18, 36])
def test_merged_halves_equal_full_attention(cut: int) -> None:
    q, k, v = qkv(cut)
    scale = 1 / math.sqrt(q.shape[-1])
    full_o, full_lse = partial_attention(q, k, v, scale)
    o_a, lse_a = partial_attention(q, k[:cut], v[:cut], scale)
    o_b, lse_b = partial_attention(q, k[cut:], v[cut:], scale)
    o, lse = merge_states(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(o, full_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o, sdpa(q, k, v, scale), atol=1e-5, rtol=1e-5)
    # the parts really differ from the whole (the test would catch a merge that ignores one)
    assert (o_a - full_o).abs().max() > 1e-3 and (o_b - full_o).abs().max() > 1e-3


def test_merge_is_the_issues_max_and_sum_formula() -> None:
    q, k, v = qkv(7, n=1, hq=2, hkv=2, t=9, d=4)
    s = torch.einsum("nhd,thd->nht", q, k)
    parts = (slice(0, 4), slice(4, 9))
    m = [s[..., p].max(-1).values for p in parts]
    l_ = [torch.exp(s[..., p] - mi.unsqueeze(-1)).sum(-1) for p, mi in zip(parts, m, strict=True)]
    o_ = [
        torch.einsum(
            "nht,thd->nhd", torch.exp(s[..., p] - mi.unsqueeze(-1)) / li.unsqueeze(-1), v[p]
        )  # fmt: skip
        for p, mi, li in zip(parts, m, l_, strict=True)
    ]
    mm = torch.maximum(m[0], m[1])
    ll = torch.exp(m[0] - mm) * l_[0] + torch.exp(m[1] - mm) * l_[1]
    expect = (
        (torch.exp(m[0] - mm) * l_[0]).unsqueeze(-1) * o_[0]
        + (torch.exp(m[1] - mm) * l_[1]).unsqueeze(-1) * o_[1]
    ) / ll.unsqueeze(-1)
    got, _ = merge_states(o_[0], m[0] + torch.log(l_[0]), o_[1], m[1] + torch.log(l_[1]))
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)


def test_empty_part_contributes_nothing_and_three_parts_merge_in_any_order() -> None:
    q, k, v = qkv(3)
    scale = 0.3
    full_o, _ = partial_attention(q, k, v, scale)
    empty_o, empty_lse = partial_attention(q, k[:0], v[:0], scale)
    assert torch.isneginf(empty_lse).all() and (empty_o == 0).all()
    o, lse = merge_states(full_o, partial_attention(q, k, v, scale)[1], empty_o, empty_lse)
    torch.testing.assert_close(o, full_o)
    both_o, both_lse = merge_states(empty_o, empty_lse, empty_o, empty_lse)
    assert (both_o == 0).all() and torch.isneginf(both_lse).all() and not both_o.isnan().any()
    a, b, c = (partial_attention(q, k[s], v[s], scale) for s in (slice(0, 10), slice(10, 20),
                                                                 slice(20, 37)))  # fmt: skip
    left = merge_states(*merge_states(*a, *b), *c)
    right = merge_states(*c, *merge_states(*b, *a))
    torch.testing.assert_close(left[0], full_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right[0], full_o, atol=1e-5, rtol=1e-5)


def test_fast_and_auto_merge_on_cpu_equal_the_reference() -> None:
    q, k, v = qkv(11)
    a = partial_attention(q, k[:9], v[:9], 0.25)
    b = partial_attention(q, k[9:], v[9:], 0.25)
    ref_o, ref_lse = merge_states(*a, *b)
    for fn in (merge_states_fast, merge_states_auto):
        o, lse = fn(*a, *b)
        torch.testing.assert_close(o, ref_o, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    empty = partial_attention(q, k[:0], v[:0], 0.25)
    torch.testing.assert_close(merge_states_fast(*a, *empty)[0], a[0])
    torch.testing.assert_close(merge_states_fast(*empty, *b)[0], b[0])


def test_bf16_inputs_are_computed_in_float32() -> None:
    q, k, v = qkv(5)
    o, lse = partial_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25)
    assert o.dtype == lse.dtype == torch.float32
    ref, _ = partial_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                               0.25)  # fmt: skip
    torch.testing.assert_close(o, ref)


def test_gqa_head_count_must_divide() -> None:
    q, k, v = qkv(1, hq=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        partial_attention(q, k, v, 1.0)


def test_split_positions_and_range_arithmetic() -> None:
    assert split_positions(10, 2, 5) == ((0, 2), (5, 10))
    with pytest.raises(ValueError):
        split_positions(10, 5, 11)
    assert subtract_range([(0, 10)], 2, 5) == [(0, 2), (5, 10)]
    assert subtract_range([(0, 10)], 0, 10) == []
    assert subtract_range([(0, 3), (8, 12)], 2, 9) == [(0, 2), (9, 12)]
    assert subtract_range([(10, 20)], 0, 5) == [(10, 20)]


def body(**kw: object) -> KvMigrate:
    return KvMigrate(kind="kv", rid="r", peer="127.0.0.1:1", **kw)  # type: ignore[arg-type]


def test_pick_range() -> None:
    assert pick_range(100, 0, body(fraction=0.5)) == (0, 50)
    assert pick_range(100, 20, body(fraction=0.5)) == (20, 60)
    assert pick_range(100, 0, body(start=10, end=100)) == (10, 100)
    for bad in (
        body(fraction=0.0), body(fraction=1.5), body(fraction=0.5, start=1),
        body(start=5), body(start=5, end=5), body(start=0, end=101), body(fraction=0.001),
    ):  # fmt: skip
        with pytest.raises(InvalidArgumentError):
            pick_range(100, 0, bad)
    with pytest.raises(InvalidArgumentError):
        pick_range(100, 20, body(start=10, end=30))  # reaches into the protected prefix

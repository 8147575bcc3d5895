# SPDX-License-Identifier: Apache-2.0
"""The pure arithmetic of the layer-wise path (adapters/sglang/layerwise.py): which tokens a
prefill forward pass completes, the layer order of the pool's buffers, what a chunk still needs.
The end-to-end proof that the path is used with real SGLang is in test_sglang_pd.py."""

from __future__ import annotations

import pytest

from banaserve_ext.adapters.sglang.layerwise import (
    layer_buffer_order,
    uncovered_ranges,
    written_token_range,
)


def test_written_range_page_one_covers_exactly_the_extend() -> None:
    assert written_token_range(0, 64, 150, 1, 0) == (0, 64, False)
    assert written_token_range(64, 128, 150, 1, 0) == (64, 128, False)
    assert written_token_range(128, 150, 150, 1, 0) == (128, 150, True)


def test_written_range_rounds_pages() -> None:
    # middle chunk: start rounded down to the page begun earlier, end down to a whole page
    assert written_token_range(70, 130, 300, 16, 0) == (64, 128, False)
    # last chunk: the partial last page goes too
    assert written_token_range(130, 300, 300, 16, 0) == (128, 300, True)
    # a chunk that completes no page streams nothing
    start, end, last = written_token_range(66, 70, 300, 16, 0)
    assert start >= end and not last
    with pytest.raises(ValueError):
        written_token_range(0, 1, 1, 0, 0)


def test_written_range_starts_at_the_decode_prefix() -> None:
    # decode already holds 32 tokens: nothing below them is sent, pages count from there
    assert written_token_range(0, 64, 100, 16, 32) == (32, 64, False)
    assert written_token_range(40, 100, 100, 16, 32) == (32, 100, True)


def test_layer_order_of_k_then_v_buffers() -> None:
    ptrs = [100, 200, 300, 1100, 1200, 1300]  # K0 K1 K2 V0 V1 V2, as SGLang registers them
    layers = [(100, 1100), (200, 1200), (300, 1300)]
    assert layer_buffer_order(ptrs, layers) == [0, 3, 1, 4, 2, 5]
    # layers listed in another order keep that order
    assert layer_buffer_order(ptrs, layers[::-1]) == [2, 5, 1, 4, 0, 3]


def test_layer_order_refuses_pools_it_cannot_stream() -> None:
    ptrs = [100, 200, 1100, 1200]
    assert layer_buffer_order(ptrs, [(100, 1100)]) is None  # buffers no layer covers
    assert layer_buffer_order(ptrs, [(100, 1100), (200, 999)]) is None  # unknown buffer
    assert layer_buffer_order(ptrs, [(100, 1100), (100, 1100)]) is None  # one used twice
    assert layer_buffer_order(ptrs, [(100, 1100), (200,)]) is None  # uneven layers
    assert layer_buffer_order([1, 1], [(1,), (1,)]) is None  # aliased buffers
    assert layer_buffer_order(ptrs, []) is None


def test_uncovered_ranges() -> None:
    assert uncovered_ranges(0, 10, []) == [(0, 10)]
    assert uncovered_ranges(0, 10, [(0, 10)]) == []
    assert uncovered_ranges(0, 10, [(3, 6)]) == [(0, 3), (6, 10)]
    assert uncovered_ranges(0, 10, [(6, 12), (-2, 2)]) == [(2, 6)]
    assert uncovered_ranges(5, 10, [(0, 5), (10, 20)]) == [(5, 10)]
    assert uncovered_ranges(0, 10, [(2, 5), (4, 8)]) == [(0, 2), (8, 10)]
    assert uncovered_ranges(4, 4, []) == []

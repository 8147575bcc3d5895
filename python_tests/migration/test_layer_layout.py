# SPDX-License-Identifier: Apache-2.0
"""Index and offset arithmetic of layer migration (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.migration import layer_layout as L


def test_plan_arena_aligns_every_tensor_and_packs_in_order() -> None:
    offsets, total = L.plan_arena([[10, 64, 0], [1]], align=64)
    assert offsets == [[0, 64, 128], [128]]
    assert total == 192
    assert L.plan_arena([], align=64) == ([], 64)
    with pytest.raises(InvalidArgumentError):
        L.plan_arena([[-1]])
    with pytest.raises(InvalidArgumentError):
        L.align_up(3, 48)


def test_row_runs_coalesces_sorted_unique_rows() -> None:
    s, c = L.row_runs(np.array([7, 3, 4, 5, 9, 10, 3]))
    assert s.tolist() == [3, 7, 9] and c.tolist() == [3, 1, 2]
    s, c = L.row_runs(np.array([], dtype=np.int64))
    assert s.size == 0 and c.size == 0
    with pytest.raises(InvalidArgumentError):
        L.row_runs(np.array([-1, 2]))


def test_row_descs_are_byte_ranges_inside_the_buffer() -> None:
    d = L.row_descs(1000, 16, 20, np.array([3, 9]), np.array([2, 1]))
    assert d.dtype == np.uint64 and d.tolist() == [[1048, 32], [1144, 16]]
    with pytest.raises(InvalidArgumentError):
        L.row_descs(1000, 16, 10, np.array([9]), np.array([2]))  # past the end
    with pytest.raises(InvalidArgumentError):
        L.row_descs(1000, 0, 10, np.array([1]), np.array([1]))


def test_whole_descs_skip_empty_tensors() -> None:
    assert L.whole_descs([10, 20], [5, 0]).tolist() == [[10, 5]]
    with pytest.raises(InvalidArgumentError):
        L.whole_descs([10], [1, 2])


def test_used_rows_is_the_complement_of_free_and_reserved() -> None:
    assert L.used_rows(8, np.array([1, 2, 7])).tolist() == [3, 4, 5, 6]
    assert L.used_rows(4, np.array([], dtype=np.int64), reserved=()).tolist() == [0, 1, 2, 3]
    with pytest.raises(InvalidArgumentError):
        L.used_rows(4, np.array([4]))


def test_split_layers_is_a_suffix_that_keeps_layer_zero() -> None:
    assert L.split_layers(4, 1) == [1, 2, 3]
    assert L.split_layers(2, 1) == [1]
    for bad in (0, 4, -1):
        with pytest.raises(InvalidArgumentError):
            L.split_layers(4, bad)


def test_gather_token_rows_concatenates_each_request_prefix() -> None:
    table = np.arange(40, dtype=np.int32).reshape(4, 10)
    out = L.gather_token_rows(table, np.array([2, 0]), np.array([3, 2]))
    assert out.dtype == np.int64 and out.tolist() == [20, 21, 22, 0, 1]
    assert L.gather_token_rows(table, np.array([], np.int64), np.array([], np.int64)).size == 0
    with pytest.raises(InvalidArgumentError):
        L.gather_token_rows(table, np.array([4]), np.array([1]))
    with pytest.raises(InvalidArgumentError):
        L.gather_token_rows(table, np.array([1]), np.array([11]))

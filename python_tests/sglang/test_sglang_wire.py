# SPDX-License-Identifier: Apache-2.0
"""Pure parts of the SGLang backend: control messages and page/layout arithmetic.

Pointers are written as readable tags (1000 + 10*layer + k/v) so a failure shows which buffer
was picked."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext.adapters.sglang import wire
from banaserve_ext.errors import InvalidArgumentError

TAGS = [1000 + 10 * layer + kv for layer in range(2) for kv in (0, 1)]


def test_kv_layout_of_dense_pool() -> None:
    lay = wire.kv_layout(TAGS, [4096] * 4, [128] * 4)
    assert lay.bases == TAGS
    assert (lay.item_nbytes, lay.num_items) == (128, 32)


@pytest.mark.parametrize(
    ("lens", "items", "match"),
    [
        ([4096] * 4, [128, 128, 64, 128], "item sizes"),
        ([4096, 4096, 2048, 4096], [128] * 4, "lengths"),
        ([4100] * 4, [128] * 4, "multiple"),
        ([4096] * 3, [128] * 4, "disagree"),
    ],
)
def test_kv_layout_rejects_pools_it_cannot_move(lens, items, match) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        wire.kv_layout(TAGS[: len(lens)] if len(lens) < 4 else TAGS, lens, items)


def test_aux_layouts_one_per_buffer() -> None:
    aux = wire.aux_layouts([500, 600], [64 * 8, 16 * 8], [64, 16])
    assert [(a.bases, a.item_nbytes, a.num_items) for a in aux] == [([500], 64, 8), ([600], 16, 8)]
    with pytest.raises(InvalidArgumentError):
        wire.aux_layouts([500], [100], [64])


def test_check_compatible() -> None:
    mine = wire.kv_layout(TAGS, [4096] * 4, [128] * 4)
    wire.check_compatible(mine, wire.kv_layout([1, 2, 3, 4], [8192] * 4, [128] * 4))
    with pytest.raises(InvalidArgumentError, match="KV buffers"):
        wire.check_compatible(mine, wire.kv_layout([1, 2], [4096] * 2, [128] * 2))
    with pytest.raises(InvalidArgumentError, match="item"):
        wire.check_compatible(mine, wire.kv_layout(TAGS, [4096] * 4, [256] * 4))


def test_chunk_indices_follow_the_slice() -> None:
    dst = np.arange(100, 110, dtype=np.int32)  # decode pages of the whole request
    src, d = wire.chunk_indices(np.array([7, 8, 9], np.int32), dst, slice(4, 7))
    assert src.dtype == np.int64 and d.dtype == np.int64
    assert src.tolist() == [7, 8, 9] and d.tolist() == [104, 105, 106]


def test_chunk_indices_skip_the_decode_prefix() -> None:
    dst = np.arange(100, 110, dtype=np.int32)
    src, d = wire.chunk_indices(np.array([1, 2, 3, 4], np.int32), dst, slice(0, 4), 2)
    assert src.tolist() == [3, 4] and d.tolist() == [102, 103]
    src, d = wire.chunk_indices(np.array([1, 2], np.int32), dst, slice(0, 2), 5)
    assert len(src) == 0 and len(d) == 0


def test_chunk_indices_reject_mismatch() -> None:
    dst = np.arange(4, dtype=np.int32)
    with pytest.raises(InvalidArgumentError, match="does not match"):
        wire.chunk_indices(np.array([1, 2]), dst, slice(0, 3))
    with pytest.raises(InvalidArgumentError, match="allocated 4"):
        wire.chunk_indices(np.array([1, 2, 3]), dst, slice(2, 5))


def test_messages_round_trip() -> None:
    reg = wire.RegisterMsg(
        session="127.0.0.1:5555", engine_metadata=b"\x01\x02",
        kv=wire.kv_layout(TAGS, [4096] * 4, [128] * 4),
        aux=wire.aux_layouts([500], [512], [64]), tp_rank=0, attn_tp_size=1,
    )  # fmt: skip
    assert wire.decode(wire.encode(wire.TAG_REGISTER, reg)) == reg
    idx = np.array([3, 1, 2], np.int32)
    req = wire.RequestMsg(
        room=7,
        session="127.0.0.1:5555",
        kv_indices=idx.tobytes(),
        aux_index=4,
        required_dst_info_num=1,
    )
    got = wire.decode(wire.encode(wire.TAG_REQUEST, req))
    assert isinstance(got, wire.RequestMsg)
    assert got.dst_kv_indices().tolist() == [3, 1, 2]
    assert (got.endpoint, got.dst_port) == ("127.0.0.1", 5555)


def test_decode_ignores_foreign_frames_and_rejects_garbage() -> None:
    assert wire.decode([b"ABORT", b"7"]) is None
    assert wire.decode([b"7", b"4", b"0"]) is None
    with pytest.raises(InvalidArgumentError, match="malformed"):
        wire.decode([wire.TAG_REQUEST, b"\xff\x00garbage"])

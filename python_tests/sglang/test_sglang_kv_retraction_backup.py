# SPDX-License-Identifier: Apache-2.0
"""The layout of SGLang's retraction backups, as :mod:`banaserve_ext.adapters.sglang.kv_retraction`
writes a migrated slice into them, checked against SGLang's own KV pools (CPU, in process, no
server): what goes in at [start, end) through our functions comes out of SGLang's restore path
exactly, every other position is SGLang's copy, untouched.

The end-to-end checks (a real retraction of a split request) are in test_sglang_kv_pressure.py
(PD decode server, ``host_pool`` backup) and test_sglang_migration.py (unified server, recompute).
"""

from __future__ import annotations

import pytest

from banaserve_ext.adapters.sglang.kv_retraction import patch_cpu_backup, patch_host_pool
from banaserve_ext.errors import NotSupportedError

pytestmark = pytest.mark.sglang

LAYERS, HEADS, DIM, SLOTS = 3, 2, 4, 64


def _pool():  # noqa: ANN202 - an SGLang MHATokenToKVPool
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(SLOTS, 1, torch.float32, HEADS, DIM, LAYERS, "cpu", False)
    gen = torch.Generator().manual_seed(3)
    for layer in range(LAYERS):
        pool.k_buffer[layer].copy_(torch.randn(pool.k_buffer[layer].shape, generator=gen))
        pool.v_buffer[layer].copy_(torch.randn(pool.v_buffer[layer].shape, generator=gen))
    return pool


def _snapshot(pool, slots):  # noqa: ANN001, ANN202
    """The KV of ``slots`` as the owner's stage order: [2·layers, n, heads, dim]."""
    import torch

    return torch.stack(
        [b[slots].clone() for layer in range(LAYERS)
         for b in (pool.k_buffer[layer], pool.v_buffer[layer])]
    )  # fmt: skip


def _migrate_and_reuse(pool, row, start: int, end: int) -> None:  # noqa: ANN001
    """The migrated positions' slots, given back and taken by someone else (NaN here)."""
    for layer in range(LAYERS):
        pool.k_buffer[layer][row[start:end]] = float("nan")
        pool.v_buffer[layer][row[start:end]] = float("nan")


@pytest.mark.parametrize("chunk", [3, 8192])  # chunk boundaries inside the slice, and none
def test_cpu_tensor_backup_restores_the_peer_slice_exactly(chunk: int) -> None:
    import torch

    pool = _pool()
    pool.cpu_offloading_chunk_size = chunk
    row = torch.tensor([9, 4, 17, 30, 31, 2, 50, 51, 52, 8, 11], dtype=torch.int64)
    start, end = 2, 8
    truth = _snapshot(pool, row)
    peer_slice = truth[:, start:end].clone()
    _migrate_and_reuse(pool, row, start, end)

    backup = pool.get_cpu_copy(row)  # what SGLang's retraction stores
    patch_cpu_backup(backup, chunk, start, peer_slice)
    new_row = torch.arange(33, 33 + len(row), dtype=torch.int64)  # disjoint from row
    pool.load_cpu_copy(backup, new_row)  # what SGLang's resume does
    assert torch.equal(_snapshot(pool, new_row), truth)

    # without the patch the resumed request would have read the reused slots
    unpatched = pool.get_cpu_copy(row)
    pool.load_cpu_copy(unpatched, new_row)
    assert torch.isnan(_snapshot(pool, new_row)[:, start:end]).all()


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_host_pool_backup_pages_hold_the_peer_slice(layout: str) -> None:
    import torch
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    pool = _pool()
    host = MHATokenToKVPoolHost(
        pool._mha_buffer_info(), 2.0, 0, 1, layout, pin_memory=False, device="cpu",
        device_capacity_tokens=SLOTS, start_layer=0, end_layer=LAYERS,
    )  # fmt: skip
    n = 10
    host_indices = torch.tensor([40, 3, 7, 8, 100, 101, 64, 5, 6, 90], dtype=torch.int64)
    start, end = 3, 7
    truth = _snapshot(pool, torch.arange(n, dtype=torch.int64))
    for j in range(n):  # SGLang's copy of the other positions, already in the host pool
        if not start <= j < end:
            page = truth[:, j].reshape(LAYERS, 2, HEADS, DIM).transpose(0, 1)
            host.set_from_flat_data_page(int(host_indices[j]), page.flatten())
    patch_host_pool(host, host_indices, start, truth[:, start:end].clone())
    for j in range(n):
        # SGLang's accessor: [2 (k, v), layers, heads, dim] for a one-token page
        got = host.get_data_page(int(host_indices[j]), flat=False).reshape(2, LAYERS, HEADS, DIM)
        want = truth[:, j].reshape(LAYERS, 2, HEADS, DIM).transpose(0, 1)
        assert torch.equal(got, want), j


def test_host_pool_with_other_layers_is_refused() -> None:
    import torch
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    pool = _pool()
    host = MHATokenToKVPoolHost(
        pool._mha_buffer_info(), 2.0, 0, 1, "layer_first", pin_memory=False, device="cpu",
        device_capacity_tokens=SLOTS, start_layer=0, end_layer=LAYERS,
    )  # fmt: skip
    stage = torch.zeros((2 * (LAYERS + 1), 2, HEADS, DIM))
    with pytest.raises(NotSupportedError, match="layers"):
        patch_host_pool(host, torch.tensor([0, 1]), 0, stage)

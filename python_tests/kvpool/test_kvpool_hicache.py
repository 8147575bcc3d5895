# SPDX-License-Identifier: Apache-2.0
"""The HiCache backend's logic against fake host pools laid out exactly like SGLang's
(``MHATokenToKVPoolHost``/``MLATokenToKVPoolHost`` buffers), on a real shared-memory pool."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
from kvpool_testlib import owned_pool

from banaserve_ext.adapters.sglang.hicache import (
    HostGeometry,
    PoolStorageCore,
    geometry_of,
    key_suffix,
    piece_table,
)
from banaserve_ext.errors import InvalidArgumentError, NotSupportedError
from banaserve_ext.kvpool import PoolServer, RemoteKVPool

LAYERS, HEADS, DIM, PAGE_TOKENS, SIZE = 3, 2, 8, 4, 64
ITEM = 2  # bf16-sized elements, stored as uint16


class _Buf:
    """The parts of a torch tensor the backend reads, over a numpy array."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    def data_ptr(self) -> int:
        return int(self.arr.ctypes.data)

    def numel(self) -> int:
        return int(self.arr.size)

    def element_size(self) -> int:
        return int(self.arr.itemsize)


def _dims(layout: str, halves: int) -> tuple[int, ...]:
    pages = SIZE // PAGE_TOKENS
    lead = (2,) if halves == 2 else ()
    return (
        lead
        + {
            "layer_first": (LAYERS, SIZE, HEADS, DIM),
            "page_first": (SIZE, LAYERS, HEADS, DIM),
            "page_first_direct": (pages, LAYERS, PAGE_TOKENS, HEADS, DIM),
            "page_head": (pages, HEADS, PAGE_TOKENS, LAYERS, DIM),
        }[layout]
    )


@dataclass
class FakeHost:
    """Same buffer shapes and flat-page semantics as SGLang 0.5.23's MHA host pool."""

    layout: str
    halves: int = 2
    seed: int = 0
    layer_num: int = LAYERS
    size: int = SIZE
    page_size: int = PAGE_TOKENS
    arr: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.arr = rng.integers(0, 2**16, _dims(self.layout, self.halves), dtype=np.uint16)
        self.kv_buffer = _Buf(self.arr)

    def flat_page(self, index: int) -> np.ndarray:
        """SGLang's ``get_data_page(index, flat=True)``."""
        a = self.arr if self.halves == 2 else self.arr[None]
        ps = self.page_size
        if self.layout == "layer_first":
            page = a[:, :, index : index + ps]
        elif self.layout == "page_first":
            page = a[:, index : index + ps]
        else:
            page = a[:, index // ps : index // ps + 1]
        return np.ascontiguousarray(page).reshape(-1)


class FakeMLAHost(FakeHost):
    pass


FakeMLAHost.__name__ = "FakeMLATokenToKVPoolHost"


def _config(pool: str, tp_rank: int = 0, tp_size: int = 1, mla: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, model_name="tiny/llama", extra_config={"pool": pool},
    )  # fmt: skip


def _gather(table: np.ndarray, lens: np.ndarray) -> bytes:
    import ctypes

    return b"".join(ctypes.string_at(int(a), int(n)) for a, n in zip(table, lens, strict=True))


LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("halves", [2, 1])
def test_piece_table_concatenates_to_sglang_flat_page(layout: str, halves: int) -> None:
    host = FakeHost(layout, halves=halves) if halves == 2 else FakeMLAHost(layout, halves=1)
    geo = geometry_of(host)
    assert geo.halves == halves
    assert geo.token_bytes == HEADS * DIM * ITEM
    starts = np.array([0, 8, 60])
    table, lens = piece_table(geo, starts)
    assert lens.sum() == geo.page_bytes
    for i, s in enumerate(starts):
        assert _gather(table[i], lens) == host.flat_page(int(s)).tobytes()


def test_unsupported_layout_and_geometry() -> None:
    with pytest.raises(NotSupportedError, match="layout"):
        geometry_of(SimpleNamespace(layout="page_unified"))
    geo = HostGeometry("weird", 0, 2, 1, 8, 4, 16)
    with pytest.raises(NotSupportedError):
        piece_table(geo, np.array([0]))


def test_suffix_separates_tp_ranks_and_layouts_but_not_mla_ranks() -> None:
    lf = geometry_of(FakeHost("layer_first"))
    pf = geometry_of(FakeHost("page_first"))
    assert key_suffix(_config("p", 0, 2), lf) != key_suffix(_config("p", 1, 2), lf)
    assert key_suffix(_config("p"), lf) != key_suffix(_config("p"), pf)
    mla = geometry_of(FakeMLAHost("page_first", halves=1))
    assert key_suffix(_config("p", 0, 2, mla=True), mla) == key_suffix(
        _config("p", 1, 2, True), mla
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_pages_written_by_one_instance_are_read_by_another(layout: str) -> None:
    page_bytes = 2 * LAYERS * PAGE_TOKENS * HEADS * DIM * ITEM
    with owned_pool("hicache", 64, page_bytes) as pool:
        writer_host, reader_host = FakeHost(layout, seed=1), FakeHost(layout, seed=2)
        writer = PoolStorageCore(_config(pool.name))
        reader = PoolStorageCore(_config(pool.name))
        writer.register_mem_pool_host(writer_host)
        reader.register_mem_pool_host(reader_host)
        keys = [f"{i:064x}" for i in range(3)]
        assert reader.batch_exists(keys) == 0
        src_idx = np.arange(8, 20)  # pages at host tokens 8, 12, 16
        assert writer.batch_set_v1(keys, src_idx) == [True, True, True]
        assert reader.batch_exists(keys + ["absent"]) == 3
        dst_idx = np.arange(40, 52)
        assert reader.batch_get_v1(keys + ["absent"], np.arange(40, 56)) == [True] * 3 + [False]
        for i in range(3):
            assert (
                reader_host.flat_page(40 + 4 * i).tobytes()
                == writer_host.flat_page(8 + 4 * i).tobytes()
            )
        del dst_idx
        # Another TP rank's namespace does not see rank 0's pages.
        other = PoolStorageCore(_config(pool.name, tp_rank=1, tp_size=2))
        other.register_mem_pool_host(FakeHost(layout))
        assert other.batch_exists(keys) == 0


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_v1_pages_cross_between_a_local_and_a_remote_instance(layout: str) -> None:
    """An instance given "pool_address" goes through the pool service (RemoteKVPool) and shares
    pages both ways with an instance attached to the segment."""
    page_bytes = 2 * LAYERS * PAGE_TOKENS * HEADS * DIM * ITEM
    with owned_pool("hicache-remote", 64, page_bytes) as pool, PoolServer(pool) as server:
        local_host, remote_host = FakeHost(layout, seed=1), FakeHost(layout, seed=2)
        local = PoolStorageCore(_config(pool.name))
        remote_cfg = _config(pool.name)
        remote_cfg.extra_config = {"pool_address": server.address}
        remote = PoolStorageCore(remote_cfg)
        try:
            local.register_mem_pool_host(local_host)
            remote.register_mem_pool_host(remote_host)
            assert isinstance(remote.pool(), RemoteKVPool)
            keys = [f"{i:064x}" for i in range(3)]
            assert local.batch_set_v1(keys, np.arange(8, 20)) == [True] * 3
            assert remote.batch_exists(keys + ["absent"]) == 3
            got = remote.batch_get_v1(keys + ["absent"], np.arange(40, 56))
            assert got == [True] * 3 + [False]
            for i in range(3):
                assert (remote_host.flat_page(40 + 4 * i).tobytes()
                        == local_host.flat_page(8 + 4 * i).tobytes())  # fmt: skip
            back = [f"{i:064x}" for i in range(10, 12)]
            assert remote.batch_set_v1(back, np.arange(0, 8)) == [True] * 2
            assert local.batch_get_v1(back, np.arange(24, 32)) == [True] * 2
            assert local_host.flat_page(28).tobytes() == remote_host.flat_page(4).tobytes()
        finally:
            remote.close()
            local.close()


def test_wrong_page_size_and_missing_pool_name_are_typed_errors() -> None:
    with owned_pool("hicache-bad", 4, 4096) as pool:
        core = PoolStorageCore(_config(pool.name))
        with pytest.raises(InvalidArgumentError, match="--page-size 768"):
            core.register_mem_pool_host(FakeHost("page_first"))
        with pytest.raises(InvalidArgumentError, match="register_mem_pool_host"):
            core.batch_exists(["a"])
    with pytest.raises(InvalidArgumentError, match='"pool_address"'):
        PoolStorageCore(SimpleNamespace(extra_config={}))


def test_flat_page_interface_with_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    page_bytes = 2 * LAYERS * PAGE_TOKENS * HEADS * DIM * ITEM
    with owned_pool("hicache-v0", 16, page_bytes) as pool:
        host = FakeHost("page_first", seed=3)
        core = PoolStorageCore(_config(pool.name))
        core.register_mem_pool_host(host)
        pages = [torch.from_numpy(host.flat_page(i * 4).astype(np.int16)) for i in range(2)]
        assert core.batch_set(["a", "b"], pages)
        out = [torch.zeros_like(p) for p in pages] + [torch.zeros_like(pages[0])]
        got = core.batch_get(["a", "b", "c"], out)
        assert got[2] is None
        assert torch.equal(got[0], pages[0]) and torch.equal(got[1], pages[1])
        # v0 pages are v1 pages: read back zero-copy into host tokens 20..27
        assert core.batch_get_v1(["a", "b"], np.arange(20, 28)) == [True, True]
        assert host.flat_page(20).tobytes() == pages[0].numpy().tobytes()


def test_importing_the_adapter_does_not_import_sglang_or_torch() -> None:
    import subprocess

    code = (
        "import sys, banaserve_ext.adapters.sglang.hicache as h;"
        "bad=[m for m in ('torch','sglang') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.sglang
@pytest.mark.parametrize("layout", LAYOUTS)
def test_piece_table_matches_real_sglang_host_pool_code(layout: str) -> None:
    """Our addresses vs SGLang 0.5.23's own ``get_page_buffer_meta``/``get_data_page``, run on a
    host-pool object with SGLang's buffer shapes."""
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        pytest.skip("the CPU SGLang stack is not installed (bash .ci/setup --sglang)")
    from banaserve_ext.adapters.sglang import cpu_compat

    cpu_compat.install()  # before anything imports torchvision
    import torch
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    host = FakeHost(layout, seed=4)
    kv = torch.from_numpy(host.arr.view(np.int16))
    fake = SimpleNamespace(
        layout=layout, kv_buffer=kv, layer_num=LAYERS, size=SIZE, page_size=PAGE_TOKENS,
        head_num=HEADS, head_dim=DIM, dtype=torch.bfloat16,
    )  # fmt: skip
    geo = geometry_of(host)
    starts = [0, 20, 60]
    idx = torch.cat([torch.arange(s, s + PAGE_TOKENS) for s in starts])
    ptrs, sizes = MHATokenToKVPoolHost.get_page_buffer_meta(fake, idx)
    table, lens = piece_table(geo, np.array(starts))
    ours = sorted(zip(table.reshape(-1).tolist(), np.tile(lens, 3).tolist(), strict=True))
    assert ours == sorted(zip(map(int, ptrs), map(int, sizes), strict=True))
    for i, s in enumerate(starts):
        flat = MHATokenToKVPoolHost.get_data_page(fake, s, flat=True)
        assert _gather(table[i], lens) == flat.contiguous().numpy().tobytes()

# SPDX-License-Identifier: Apache-2.0
"""The attention peer as a real process: slices written through the transfer engine from
scattered owner slots, partial attention that matches the owner's own, read-back, typed errors,
and a killed peer that fails the next call quickly instead of hanging."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from banaserve_ext import errors  # noqa: E402
from banaserve_ext.migration.attn_math import partial_attention  # noqa: E402
from banaserve_ext.migration.attn_peer import Arena, AttnPeerClient, AttnPeerProcess  # noqa: E402
from banaserve_ext.transfer import Op, TransferEngine  # noqa: E402

LAYERS, ROWS, HKV, HQ, D = 3, 64, 2, 4, 8


@pytest.fixture(params=[0, 1], ids=["own-memory", "arena"])
def peer(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen, str]]:
    with AttnPeerProcess(arena_mb=request.param) as p:
        assert p.proc is not None
        yield p.proc, p.address


def test_arena_first_fit_alignment_and_coalescing() -> None:
    a = Arena(10 * 4096)
    x = a.alloc(1)  # rounds up to one page
    y = a.alloc(4096 * 3)
    z = a.alloc(4096 * 2)
    assert (x, y, z) == (0, 4096, 4 * 4096) and a.used_bytes == 6 * 4096
    assert a.alloc(5 * 4096) is None  # 4 pages left
    a.free(y)
    assert a.alloc(4 * 4096) == 6 * 4096  # first fit: the hole of 3 is too small
    a.free(x)
    assert a.alloc(4 * 4096) == 0  # the freed 1 + 3 pages coalesced
    with pytest.raises(errors.NotFoundError):
        a.free(12345)
    with pytest.raises(errors.InvalidArgumentError):
        a.alloc(0)
    with pytest.raises(errors.InvalidArgumentError):
        Arena(4096, align=3)
    assert Arena(0).alloc(1) is None


@pytest.fixture
def owner() -> Iterator[tuple[TransferEngine, list, object]]:
    g = torch.Generator().manual_seed(0)
    bufs = [torch.randn(ROWS, HKV, D, generator=g) for _ in range(2 * LAYERS)]
    with TransferEngine() as eng:
        regs = [eng.register(b) for b in bufs]
        local = eng.prepare_layout([b.data_ptr() for b in bufs], HKV * D * 4, ROWS)
        yield eng, bufs, local
        for r in regs:
            r.release()


def test_slice_roundtrip_and_partial_attention(peer, owner) -> None:
    _, addr = peer
    eng, bufs, local = owner
    client = AttnPeerClient(addr).start()
    slots = np.array([5, 17, 3, 40, 41, 42, 9], dtype=np.int64)  # scattered, unordered
    n = len(slots)
    meta = client.call({"op": "alloc", "layers": LAYERS, "tokens": n, "kv_heads": HKV,
                        "head_dim": D, "dtype": "float32"})  # fmt: skip
    pid = eng.add_peer(meta["metadata"])
    remote = eng.prepare_layout(meta["bases"], meta["item_nbytes"], n, peer=pid)
    assert eng.submit(Op.WRITE, local, slots, remote, np.arange(n)).wait(10)
    stats = client.call({"op": "stats"})
    assert (stats["slices"], stats["bytes"]) == (1, 2 * LAYERS * n * HKV * D * 4)
    if stats["arena_bytes"]:
        assert stats["arena_used"] == 4096  # the slice lives in the arena
        big = client.call({"op": "alloc", "layers": LAYERS, "tokens": 4096, "kv_heads": HKV,
                           "head_dim": D, "dtype": "float32"})  # fmt: skip
        assert client.call({"op": "stats"})["arena_used"] == 4096  # too big: own memory
        client.call({"op": "free", "slice": big["slice"]})

    q = torch.randn(2, HQ, D)
    idx = torch.from_numpy(slots)
    for layer in range(LAYERS):
        o, lse = client.attend(layer, [meta["slice"], meta["slice"]], q, 0.5)
        ref_o, ref_lse = partial_attention(q, bufs[2 * layer][idx], bufs[2 * layer + 1][idx], 0.5)
        torch.testing.assert_close(o, ref_o)
        torch.testing.assert_close(lse, ref_lse)

    # read back into other slots: byte-identical to the originals
    back = np.arange(50, 50 + n, dtype=np.int64)
    assert eng.submit(Op.READ, local, back, remote, np.arange(n)).wait(10)
    for b in bufs:
        assert torch.equal(b[torch.from_numpy(back)], b[idx])
    assert client.call({"op": "free", "slice": meta["slice"]})["freed"] > 0
    assert client.call({"op": "stats"})["slices"] == 0
    client.close()


def test_bad_requests_are_typed_errors_and_the_connection_survives(peer) -> None:
    _, addr = peer
    client = AttnPeerClient(addr).start()
    with pytest.raises(errors.InvalidArgumentError, match="unknown op"):
        client.call({"op": "nope"})
    with pytest.raises(errors.InvalidArgumentError, match="dtype"):
        client.call({"op": "alloc", "layers": 1, "tokens": 1, "kv_heads": 1, "head_dim": 1,
                     "dtype": "int8"})  # fmt: skip
    with pytest.raises(errors.InvalidArgumentError, match="positive"):
        client.call({"op": "alloc", "layers": 1, "tokens": 0, "kv_heads": 1, "head_dim": 1,
                     "dtype": "float32"})  # fmt: skip
    with pytest.raises(errors.NotFoundError):
        client.attend(0, [99], torch.zeros(1, 2, 2), 1.0)
    with pytest.raises(errors.NotFoundError):
        client.call({"op": "free", "slice": 99})
    assert client.call({"op": "stats"})["slices"] == 0
    with pytest.raises(errors.InvalidArgumentError):
        AttnPeerClient("no-port")


def test_killed_peer_fails_the_next_call_quickly(peer) -> None:
    proc, addr = peer
    client = AttnPeerClient(addr, timeout_s=5.0).start()
    meta = client.call({"op": "alloc", "layers": 1, "tokens": 4, "kv_heads": HKV,
                        "head_dim": D, "dtype": "float32"})  # fmt: skip
    proc.kill()
    proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(errors.UnavailableError):
        client.attend(0, [meta["slice"]], torch.zeros(1, HQ, D), 1.0)
    assert time.monotonic() - t0 < 5.0  # a closed socket, not the timeout
    with pytest.raises(errors.UnavailableError, match="closed"):
        client.call({"op": "stats"})
    with pytest.raises(errors.UnavailableError, match="unreachable"):
        AttnPeerClient(addr).start()

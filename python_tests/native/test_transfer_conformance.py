# SPDX-License-Identifier: Apache-2.0
"""One suite for every cross-process backend (shm, tcp): a real second process, real shared
memory or sockets. Backend-specific cases (malformed frames, mappings) live beside it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from banaserve_ext import errors
from banaserve_ext.transfer import Op, TransferEngine, TransferState, available_backends
from banaserve_ext.transfer.testing import PeerProcess, digest, make_pool, pattern

BACKENDS = [b for b in ("shm", "tcp", "ucx") if b in available_backends()]
PAGE = 16384
POOL_PAGES = 256

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no cross-process backend compiled in")


def table(base: int, pages: int, page: int = PAGE) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


@pytest.fixture(
    params=[(b, m) for b in BACKENDS for m in ("allocated", "user")], ids=lambda p: f"{p[0]}-{p[1]}"
)
def setup(request):
    backend, memory = request.param
    with PeerProcess(backend=backend, pool_nbytes=POOL_PAGES * PAGE, memory=memory) as peer:
        with TransferEngine(force_backend=backend) as eng:
            reg, pool = make_pool(eng, POOL_PAGES * PAGE, memory)
            peer_id = eng.add_peer(peer.metadata)
            yield eng, peer, peer_id, reg, pool, backend


def test_backend_choice_is_reported(setup) -> None:
    eng, peer, peer_id, reg, pool, backend = setup
    assert eng.backend_for(peer_id) == backend
    assert peer_id in eng.peers()


def test_write_then_read_random_placement_verified(setup) -> None:
    eng, peer, peer_id, reg, pool, _ = setup
    rng = np.random.default_rng(1)
    ls = rng.choice(POOL_PAGES, 100, replace=False)
    rs = rng.choice(POOL_PAGES, 100, replace=False)
    local = eng.prepare(table(reg.addr, POOL_PAGES))
    remote = eng.prepare(table(peer.addr, POOL_PAGES), peer=peer_id)
    pool.reshape(-1, PAGE)[ls] = pattern(11, 100, PAGE)
    assert eng.submit(Op.WRITE, local, ls, remote, rs).wait(30)
    assert peer.digest(rs, PAGE) == digest(pool, ls, PAGE)
    peer.fill(12, rs, PAGE)
    pool[:] = 0
    assert eng.submit(Op.READ, local, ls, remote, rs).wait(30)
    assert np.array_equal(pool.reshape(-1, PAGE)[ls], pattern(12, 100, PAGE))
    untouched = np.setdiff1d(np.arange(POOL_PAGES), ls)
    assert not pool.reshape(-1, PAGE)[untouched].any()


def test_odd_sizes_zero_length_and_page_crossing(setup) -> None:
    eng, peer, peer_id, reg, pool, _ = setup
    sizes = [0, 1, 7, 4095, 4097, 3 * PAGE + 5]
    offs = [0, 3, 100, 5000, 70001, 200003]
    lt = np.array([[reg.addr + o, n] for o, n in zip(offs, sizes, strict=True)], np.uint64)
    rt = np.array([[peer.addr + o + 17, n] for o, n in zip(offs, sizes, strict=True)], np.uint64)
    local, remote = eng.prepare(lt), eng.prepare(rt, peer=peer_id)
    pool[:] = np.random.default_rng(3).integers(0, 256, pool.size, dtype=np.uint8)
    idx = np.arange(len(sizes))
    assert eng.submit(Op.WRITE, local, idx, remote, idx).wait(30)
    expect = pool.copy()
    pool[:] = 0
    assert eng.submit(Op.READ, local, idx, remote, idx).wait(30)
    for o, n in zip(offs, sizes, strict=True):
        assert np.array_equal(pool[o : o + n], expect[o : o + n])


def test_remote_ranges_are_checked_against_the_peers_registrations(setup) -> None:
    eng, peer, peer_id, reg, pool, _ = setup
    beyond = table(peer.addr + (POOL_PAGES - 1) * PAGE + 1, 1)
    with pytest.raises(errors.InvalidArgumentError, match="not inside one registered"):
        eng.prepare(beyond, peer=peer_id)
    remote = eng.prepare(table(peer.addr, 4), peer=peer_id)
    with pytest.raises(errors.InvalidArgumentError, match="prepared for"):
        eng.submit(Op.WRITE, remote, [0], remote, [1])


def test_layerwise_stream_reaches_the_peer_layer_by_layer(setup) -> None:
    eng, peer, peer_id, reg, pool, _ = setup
    layers, per_layer = 4, POOL_PAGES // 4
    lb = reg.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
    rb = peer.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
    local = eng.prepare_layout(lb, PAGE, per_layer)
    remote = eng.prepare_layout(rb, PAGE, per_layer, peer=peer_id)
    idx = np.array([0, 5, 6, 7, 40], dtype=np.int64)
    pool[:] = np.random.default_rng(5).integers(0, 256, pool.size, dtype=np.uint8)
    send = eng.open_stream(9, layers, local, idx, remote, idx, buffers_per_layer=1, timeout_s=30)
    for layer in range(layers):
        send.mark_layer_ready(layer)
    assert send.wait(30)
    got = peer.wait_stream(9, layers, timeout_s=10)
    assert got["state"] == TransferState.DONE and got["layers_done"] == layers, got
    slots = (np.arange(layers)[:, None] * per_layer + idx[None, :]).ravel()
    assert peer.digest(slots, PAGE) == digest(pool, slots, PAGE)


def test_sender_killed_mid_stream_fails_the_receiver_and_writes_nothing_after(setup) -> None:
    eng, peer, peer_id, reg, pool, _ = setup
    peer.add_peer(eng.metadata())
    layers, per_layer = 8, POOL_PAGES // 8
    recv = eng.expect(21, layers, peer=peer.engine_id, timeout_s=20)
    peer.send_stream(
        eng.engine_id, 21, layers, peer.addr, reg.addr, PAGE, per_layer, [0, 1, 2], delay_ms=150
    )
    deadline = time.monotonic() + 10
    while recv.layers_done < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recv.layers_done >= 2
    peer.kill()
    t0 = time.monotonic()
    with pytest.raises((errors.UnavailableError, errors.TransferTimeoutError)):
        recv.wait_all(25)
    assert recv.state is TransferState.FAILED
    assert time.monotonic() - t0 < 21
    snapshot = pool.copy()
    time.sleep(0.3)
    assert np.array_equal(pool, snapshot), "memory changed after the stream failed"


def test_submits_to_a_dead_peer_fail_within_their_timeout(setup) -> None:
    eng, peer, peer_id, reg, pool, _ = setup
    local = eng.prepare(table(reg.addr, 4))
    remote = eng.prepare(table(peer.addr, 4), peer=peer_id)
    assert eng.submit(Op.WRITE, local, [0], remote, [0]).wait(10)
    peer.kill()
    time.sleep(0.3)  # liveness checks / connection resets notice the death
    t0 = time.monotonic()
    try:
        h = eng.submit(Op.READ, local, [1], remote, [1], timeout_s=2)
    except errors.UnavailableError:
        return  # refused at once: fine
    with pytest.raises((errors.UnavailableError, errors.TransferTimeoutError)):
        h.wait(10)
    assert h.state is TransferState.FAILED
    assert time.monotonic() - t0 < 5


def test_add_peer_never_blocks_on_an_unreachable_peer() -> None:
    backend = "tcp" if "tcp" in BACKENDS else BACKENDS[0]
    with PeerProcess(backend=backend, pool_nbytes=PAGE) as peer:
        md = peer.metadata
    # the peer is gone now: its port is closed, its pid dead
    with TransferEngine(force_backend=backend) as eng:
        t0 = time.monotonic()
        try:
            eng.add_peer(md)
        except errors.UnavailableError:
            pass  # refused at once is fine too
        assert time.monotonic() - t0 < 1.0

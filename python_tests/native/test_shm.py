# SPDX-License-Identifier: Apache-2.0
"""The shm backend between real processes: this test process is one engine, the peer runs in a
subprocess (banaserve_ext.transfer.testing.PeerProcess). Covers both data paths (peer memory from
allocate(), mapped through its memfd; plain numpy memory, reached with process_vm_*), odd sizes,
notifications, cancellation and a peer killed mid-transfer."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext import errors
from banaserve_ext.transfer import FaultSpec, Op, TransferEngine, TransferState, available_backends
from banaserve_ext.transfer.testing import PeerProcess, digest, make_pool, pattern

pytestmark = pytest.mark.skipif(
    "shm" not in available_backends(), reason="shm backend not compiled in"
)

PAGE = 16384
POOL_PAGES = 256


def page_table(base: int, pages: int, page: int = PAGE) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


def connect(eng: TransferEngine, peer: PeerProcess, memory: str = "user"):
    """Our pool, the peer's id and prepared page tables on both sides."""
    reg, pool = make_pool(eng, POOL_PAGES * PAGE, memory)
    pid = eng.add_peer(peer.metadata)
    assert eng.backend_for(pid) == "shm"
    local = eng.prepare(page_table(reg.addr, POOL_PAGES))
    remote = eng.prepare(page_table(peer.addr, POOL_PAGES), peer=pid)
    return reg, pool, pid, local, remote


@pytest.mark.parametrize("peer_memory", ["allocated", "user"])
def test_random_pages_round_trip_on_both_paths(peer_memory: str) -> None:
    with PeerProcess(backend="shm", pool_nbytes=POOL_PAGES * PAGE, memory=peer_memory) as peer:
        with TransferEngine(backends=("shm",)) as eng:
            reg, pool, _, local, remote = connect(eng, peer, memory="allocated")
            rng = np.random.default_rng(1)
            for pages in (1, 7, 200):  # inline, inline, split over the copy workers
                ls = rng.choice(POOL_PAGES, size=pages, replace=False)
                rs = rng.choice(POOL_PAGES, size=pages, replace=False)
                pool.reshape(-1, PAGE)[ls] = pattern(pages, pages, PAGE)
                h = eng.submit(Op.WRITE, local, ls, remote, rs)
                assert h.wait(10) and h.state is TransferState.DONE
                assert peer.digest(rs, PAGE) == digest(pool, ls, PAGE)
                # read them back into other slots of ours
                peer.fill(100 + pages, rs, PAGE)
                back = rng.choice(POOL_PAGES, size=pages, replace=False)
                pool.reshape(-1, PAGE)[back] = 0
                assert eng.submit(Op.READ, local, back, remote, rs).wait(10)
                want = pattern(100 + pages, pages, PAGE)
                assert np.array_equal(pool.reshape(-1, PAGE)[back], want)
            reg.release()


@pytest.mark.parametrize("peer_memory", ["allocated", "user"])
def test_odd_sizes_zero_length_and_page_crossing(peer_memory: str) -> None:
    with PeerProcess(backend="shm", pool_nbytes=POOL_PAGES * PAGE, memory=peer_memory) as peer:
        with TransferEngine(backends=("shm",)) as eng:
            src = np.random.default_rng(2).integers(0, 256, size=1 << 20, dtype=np.uint8)
            dst = np.zeros(1 << 20, dtype=np.uint8)
            ra, rb = eng.register(src), eng.register(dst)
            pid = eng.add_peer(peer.metadata)
            # (local offset, remote offset, length): 1 byte, zero, crossing 4 KiB pages,
            # odd length crossing a 16 KiB page, the pool's very last byte
            spans = [(0, 0, 1), (5, 9, 0), (17, 4090, 20), (1001, PAGE - 3, 4097 + 2),
                     (3, POOL_PAGES * PAGE - 1, 1)]  # fmt: skip
            lt = np.array([[ra.addr + lo, n] for lo, _, n in spans], dtype=np.uint64)
            rt = np.array([[peer.addr + ro, n] for _, ro, n in spans], dtype=np.uint64)
            bt = np.array([[rb.addr + lo, n] for lo, _, n in spans], dtype=np.uint64)
            local, back = eng.prepare(lt), eng.prepare(bt)
            remote = eng.prepare(rt, peer=pid)
            idx = list(range(len(spans)))
            assert eng.submit(Op.WRITE, local, idx, remote, idx).wait(10)
            assert eng.submit(Op.READ, back, idx, remote, idx).wait(10)
            for lo, _, n in spans:
                assert np.array_equal(dst[lo : lo + n], src[lo : lo + n])
            # the peer's bytes, one by one, for the unaligned spans
            for lo, ro, n in spans:
                if n:
                    byte_slots = list(range(ro, ro + n))
                    assert peer.digest(byte_slots, 1) == digest(src[lo : lo + n], range(n), 1)
            assert eng.submit(Op.WRITE, local, [], remote, []).wait(10)  # empty batch


def test_notifications_reach_the_receiver_once_per_layer() -> None:
    layers = 4
    with PeerProcess(backend="shm", pool_nbytes=POOL_PAGES * PAGE, memory="allocated") as peer:
        with TransferEngine(backends=("shm",)) as eng:
            reg, pool, _, local, remote = connect(eng, peer)
            peer.add_peer(eng.metadata())  # the receiver knows the sender (liveness, from=)
            per = POOL_PAGES // layers
            handles = []
            for i in range(layers):
                idx = range(i * per, (i + 1) * per)
                handles.append(
                    eng.submit(Op.WRITE, local, idx, remote, idx, notify=(77, i, layers))
                )
            for h in handles:
                assert h.wait(10)
            got = peer.wait_stream(77, layers, timeout_s=10)
            assert got["error"] == ""
            assert got["state"] == int(TransferState.DONE)
            assert got["layers_done"] == layers
            assert peer.digest(range(POOL_PAGES), PAGE) == digest(pool, range(POOL_PAGES), PAGE)
            reg.release()


def test_layerwise_stream_over_shm() -> None:
    layers, per_layer = 6, 32
    with PeerProcess(backend="shm", pool_nbytes=layers * per_layer * PAGE) as peer:
        with TransferEngine(backends=("shm",)) as eng:
            reg, pool = make_pool(eng, layers * per_layer * PAGE, "allocated")
            pool[:] = np.random.default_rng(3).integers(0, 256, size=pool.size, dtype=np.uint8)
            pid = eng.add_peer(peer.metadata)
            bases = reg.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
            rbases = peer.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
            local = eng.prepare_layout(bases, PAGE, per_layer)
            remote = eng.prepare_layout(rbases, PAGE, per_layer, peer=pid)
            idx = np.arange(per_layer, dtype=np.int64)
            s = eng.open_stream(5, layers, local, idx, remote, idx, buffers_per_layer=1)
            for layer in range(layers):
                s.mark_layer_ready(layer)
            assert s.wait(10)
            got = peer.wait_stream(5, layers, timeout_s=10)
            assert got["state"] == int(TransferState.DONE), got
            slots = range(layers * per_layer)
            assert peer.digest(slots, PAGE) == digest(pool, slots, PAGE)
            reg.release()


def test_cancel_before_the_copy_starts_writes_nothing() -> None:
    with PeerProcess(backend="shm", pool_nbytes=POOL_PAGES * PAGE) as peer:
        with TransferEngine(backends=("shm",), fault=FaultSpec(delay_ms=100)) as eng:
            reg, pool, _, local, remote = connect(eng, peer)
            pool[:] = 7
            before = peer.digest(range(POOL_PAGES), PAGE)
            h = eng.submit(Op.WRITE, local, range(POOL_PAGES), remote, range(POOL_PAGES))
            h.cancel()
            with pytest.raises(errors.CancelledError):
                h.wait(10)
            assert h.state is TransferState.CANCELLED
            assert peer.digest(range(POOL_PAGES), PAGE) == before
            reg.release()


def test_cancel_while_running_ends_cancelled_or_done() -> None:
    with PeerProcess(backend="shm", pool_nbytes=POOL_PAGES * PAGE, memory="user") as peer:
        with TransferEngine(backends=("shm",)) as eng:
            reg, pool, _, local, remote = connect(eng, peer)
            states = set()
            for _ in range(10):
                h = eng.submit(Op.WRITE, local, range(POOL_PAGES), remote, range(POOL_PAGES))
                h.cancel()
                try:
                    h.wait(10)
                except errors.CancelledError:
                    pass
                assert h.state in (TransferState.DONE, TransferState.CANCELLED)
                states.add(h.state)
            assert states  # every handle ended (no hang), each DONE or CANCELLED
            reg.release()


@pytest.mark.parametrize("peer_memory", ["allocated", "user"])
def test_peer_killed_mid_transfer_fails_handles_and_streams(peer_memory: str) -> None:
    peer = PeerProcess(backend="shm", pool_nbytes=POOL_PAGES * PAGE, memory=peer_memory).start()
    try:
        with TransferEngine(backends=("shm",), peer_check_interval_ms=20) as eng:
            reg, pool, pid, local, remote = connect(eng, peer)
            # a stream we expect from the peer: it must fail when the peer dies, long before
            # its 60 s deadline
            inbound = eng.expect(9, 3, peer=pid, timeout_s=60)
            handles = [
                eng.submit(Op.WRITE, local, range(POOL_PAGES), remote, range(POOL_PAGES))
                for _ in range(30)
            ]
            peer.kill()
            for h in handles:
                try:
                    h.wait(10)
                except errors.UnavailableError:
                    pass
                assert h.state in (TransferState.DONE, TransferState.FAILED)
            with pytest.raises(errors.UnavailableError):
                inbound.wait_all(10)
            assert inbound.state is TransferState.FAILED
            # later posts to the dead peer fail at once instead of touching anything
            with pytest.raises(errors.UnavailableError):
                eng.submit(Op.WRITE, local, [0], remote, [0]).wait(10)
            assert eng.stats()["peers_lost"] >= 1
            reg.release()
    finally:
        peer.close()


def test_engines_in_one_process_use_shm_too() -> None:
    with TransferEngine(backends=("shm",)) as a, TransferEngine(backends=("shm",)) as b:
        ra = a.allocate(4 * PAGE)
        rb_buf = np.zeros(4 * PAGE, dtype=np.uint8)
        rb = b.register(rb_buf)
        ra.array[:] = np.arange(4 * PAGE, dtype=np.uint32).astype(np.uint8)
        pid = a.add_peer(b.metadata())
        assert a.backend_for(pid) == "shm"
        local = a.prepare(page_table(ra.addr, 4))
        remote = a.prepare(page_table(rb.addr, 4), peer=pid)
        assert a.submit(Op.WRITE, local, [0, 1, 2, 3], remote, [3, 2, 1, 0]).wait(10)
        assert np.array_equal(rb_buf.reshape(4, PAGE), ra.array.reshape(4, PAGE)[::-1])
        rb.release()
        ra.release()

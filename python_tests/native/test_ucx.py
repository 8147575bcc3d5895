# SPDX-License-Identifier: Apache-2.0
"""The ucx backend across two real processes over UCX's TCP and shared-memory transports, the
capability-based backend choice (shm on one host, ucx across hosts when both peers run it, tcp
otherwise; never a silent fallback), and fenced layer-wise streaming."""

from __future__ import annotations

import logging
import time

import msgspec
import numpy as np
import pytest

from banaserve_ext import errors
from banaserve_ext.transfer import (
    HostFence,
    Op,
    TransferEngine,
    TransferState,
    available_backends,
)
from banaserve_ext.transfer.testing import PeerProcess, digest, make_pool, pattern

pytestmark = pytest.mark.skipif("ucx" not in available_backends(), reason="ucx backend not built")

PAGE = 16384
POOL_PAGES = 64
# UCX_TLS value -> a transport name that must appear in the route UCX reports.
TRANSPORTS = {
    "tcp": ("tcp/lo",),
    "sm,self": ("sysv/", "posix/", "cma/"),
    "posix,cma,self": ("posix/", "cma/"),
}
LOOPBACK = {"UCX_NET_DEVICES": "lo"}  # never any other interface


def table(base: int, pages: int, page: int = PAGE) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


def other_host(metadata: bytes) -> bytes:
    """The same peer as seen from another host (only the host id differs)."""
    md = TransferEngine.decode_metadata(metadata)
    md = msgspec.structs.replace(md, host_id=md.host_id + "-elsewhere")
    return msgspec.msgpack.encode(md)


@pytest.fixture(params=list(TRANSPORTS), ids=lambda t: t.replace(",", "+"))
def ucx_pair(request, monkeypatch):
    tls = request.param
    env = {"UCX_TLS": tls, **LOOPBACK}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with PeerProcess(backend="ucx", pool_nbytes=POOL_PAGES * PAGE, extra_env=env) as peer:
        with TransferEngine(force_backend="ucx") as eng:
            reg, pool = make_pool(eng, POOL_PAGES * PAGE, "user")
            peer_id = eng.add_peer(peer.metadata)
            yield eng, peer, peer_id, reg, pool, tls


def test_ucx_moves_verified_pages_and_reports_its_transport(ucx_pair) -> None:
    eng, peer, peer_id, reg, pool, tls = ucx_pair
    assert eng.backend_for(peer_id) == "ucx"
    rng = np.random.default_rng(3)
    ls = rng.choice(POOL_PAGES, 40, replace=False)
    rs = rng.choice(POOL_PAGES, 40, replace=False)
    local = eng.prepare(table(reg.addr, POOL_PAGES))
    remote = eng.prepare(table(peer.addr, POOL_PAGES), peer=peer_id)
    pool.reshape(-1, PAGE)[ls] = pattern(31, 40, PAGE)
    assert eng.submit(Op.WRITE, local, ls, remote, rs).wait(20)
    assert peer.digest(rs, PAGE) == digest(pool, ls, PAGE)
    route = eng.route_for(peer_id)
    assert any(t in route for t in TRANSPORTS[tls]), (tls, route)
    peer.fill(32, rs, PAGE)
    pool[:] = 0
    assert eng.submit(Op.READ, local, ls, remote, rs).wait(20)
    assert np.array_equal(pool.reshape(-1, PAGE)[ls], pattern(32, 40, PAGE))
    untouched = np.setdiff1d(np.arange(POOL_PAGES), ls)
    assert not pool.reshape(-1, PAGE)[untouched].any()


def test_ucx_layerwise_stream_is_notified_after_its_bytes(ucx_pair) -> None:
    eng, peer, peer_id, reg, pool, _ = ucx_pair
    layers, per_layer = 4, POOL_PAGES // 4
    lb = reg.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
    rb = peer.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
    local = eng.prepare_layout(lb, PAGE, per_layer)
    remote = eng.prepare_layout(rb, PAGE, per_layer, peer=peer_id)
    idx = np.array([1, 2, 3, 9], dtype=np.int64)
    pool[:] = np.random.default_rng(8).integers(0, 256, pool.size, dtype=np.uint8)
    send = eng.open_stream(4, layers, local, idx, remote, idx, buffers_per_layer=1, timeout_s=20)
    for layer in range(layers):
        send.mark_layer_ready(layer)
    assert send.wait(20)
    got = peer.wait_stream(4, layers, timeout_s=10)
    assert got["state"] == TransferState.DONE and got["layers_done"] == layers, got
    slots = (np.arange(layers)[:, None] * per_layer + idx[None, :]).ravel()
    assert peer.digest(slots, PAGE) == digest(pool, slots, PAGE)


@pytest.fixture
def ucx_peer(monkeypatch):
    """A peer that runs every backend it has (shm, tcp and ucx), chosen automatically."""
    env = {"UCX_TLS": "tcp", "BANASERVE_TRANSFER_UCX": "1", **LOOPBACK}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with PeerProcess(backend="auto", pool_nbytes=POOL_PAGES * PAGE, extra_env=env) as peer:
        yield peer


def test_choice_is_shm_on_one_host_and_ucx_across_hosts(ucx_peer, caplog) -> None:
    have = set(available_backends())
    if not {"shm", "tcp"} <= have:
        pytest.skip("needs the shm and tcp backends too")
    caplog.set_level(logging.INFO, logger="banaserve_ext.transfer")
    with TransferEngine(backends=("shm", "tcp", "ucx")) as eng:
        reg, pool = make_pool(eng, POOL_PAGES * PAGE, "user")
        assert eng.backend_for(eng.add_peer(ucx_peer.metadata)) == "shm"
    with TransferEngine(backends=("shm", "tcp", "ucx")) as eng:
        reg, pool = make_pool(eng, POOL_PAGES * PAGE, "user")
        peer_id = eng.add_peer(other_host(ucx_peer.metadata))
        assert eng.backend_for(peer_id) == "ucx"  # both have it: above tcp across hosts
        assert "tcp/lo" in eng.route_for(peer_id)
        assert any("backend ucx via tcp/lo" in r.getMessage() for r in caplog.records)
        # and it really moves bytes on that route
        local = eng.prepare(table(reg.addr, 4))
        remote = eng.prepare(table(ucx_peer.addr, 4), peer=peer_id)
        pool[: 4 * PAGE] = pattern(41, 4, PAGE).ravel()
        assert eng.submit(Op.WRITE, local, [0, 1, 2, 3], remote, [3, 2, 1, 0]).wait(20)
        assert ucx_peer.digest([3, 2, 1, 0], PAGE) == digest(pool, [0, 1, 2, 3], PAGE)


def test_choice_is_tcp_when_the_peer_has_no_ucx_and_forcing_ucx_says_why(monkeypatch) -> None:
    if "tcp" not in available_backends():
        pytest.skip("needs the tcp backend")
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    with PeerProcess(backend="tcp", pool_nbytes=PAGE) as peer:  # runs no ucx
        assert not TransferEngine.decode_metadata(peer.metadata).ucx_address
        with TransferEngine(backends=("tcp", "ucx")) as eng:
            assert eng.backend_for(eng.add_peer(other_host(peer.metadata))) == "tcp"
        with TransferEngine(force_backend="ucx") as eng:
            with pytest.raises(errors.UnavailableError, match="no enabled backend can reach"):
                eng.add_peer(other_host(peer.metadata))


def test_fenced_layers_are_posted_in_order_once_their_fence_is_ready(monkeypatch) -> None:
    monkeypatch.setenv("UCX_TLS", "sm,self")
    env = {"UCX_TLS": "sm,self", **LOOPBACK}
    with PeerProcess(backend="ucx", pool_nbytes=POOL_PAGES * PAGE, extra_env=env) as peer:
        with TransferEngine(force_backend="ucx") as eng:
            reg, pool = make_pool(eng, POOL_PAGES * PAGE, "user")
            peer_id = eng.add_peer(peer.metadata)
            layers, per_layer = 2, POOL_PAGES // 2
            lb = reg.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
            rb = peer.addr + np.arange(layers, dtype=np.uint64) * np.uint64(per_layer * PAGE)
            local = eng.prepare_layout(lb, PAGE, per_layer)
            remote = eng.prepare_layout(rb, PAGE, per_layer, peer=peer_id)
            idx = np.arange(4, dtype=np.int64)
            send = eng.open_stream(
                6, layers, local, idx, remote, idx, buffers_per_layer=1, timeout_s=20
            )
            f0, f1 = HostFence(), HostFence()
            send.mark_layer_ready_after(0, f0)
            send.mark_layer_ready_after(1, f1)
            with pytest.raises(errors.AlreadyExistsError):
                send.mark_layer_ready(1)
            # The producer is still "computing": bytes written now must be the ones that move.
            pool[:] = 7
            f1.signal()
            time.sleep(0.2)
            assert send.layers_posted == 0  # layer 1 waits behind layer 0's fence
            f0.signal()
            assert send.wait(20)
            assert send.layers_posted == layers
            slots = (np.arange(layers)[:, None] * per_layer + idx[None, :]).ravel()
            assert peer.digest(slots, PAGE) == digest(pool, slots, PAGE)


def test_a_failed_fence_fails_the_stream() -> None:
    with TransferEngine(backends=()) as eng:
        reg, pool = make_pool(eng, 4 * PAGE, "user")
        other = np.zeros(4 * PAGE, np.uint8)
        reg2 = eng.register(other)
        local = eng.prepare_layout([reg.addr], PAGE, 4)
        remote = eng.prepare_layout([reg2.addr], PAGE, 4)
        send = eng.open_stream(8, 1, local, [0], remote, [0], buffers_per_layer=1, timeout_s=5)
        fence = HostFence()
        send.mark_layer_ready_after(0, fence)
        fence.fail("the producing kernel failed")
        with pytest.raises(errors.BanaserveError, match="producing kernel failed"):
            send.wait(5)
        assert send.layers_posted == 0
        assert not other.any()


def test_ucx_submits_to_a_killed_peer_fail_within_their_timeout(ucx_pair) -> None:
    eng, peer, peer_id, reg, pool, _ = ucx_pair
    local = eng.prepare(table(reg.addr, 4))
    remote = eng.prepare(table(peer.addr, 4), peer=peer_id)
    assert eng.submit(Op.WRITE, local, [0], remote, [0]).wait(10)
    peer.kill()
    time.sleep(0.3)  # the pid check (one host) notices the death
    t0 = time.monotonic()
    try:
        h = eng.submit(Op.READ, local, [1], remote, [1], timeout_s=2)
    except errors.UnavailableError:
        return
    with pytest.raises((errors.UnavailableError, errors.TransferTimeoutError)):
        h.wait(10)
    assert h.state is TransferState.FAILED
    assert time.monotonic() - t0 < 5
    assert eng.stats()["peers_lost"] >= 1

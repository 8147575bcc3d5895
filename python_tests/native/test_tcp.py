# SPDX-License-Identifier: Apache-2.0
"""tcp-backend specifics (the shared cross-process cases live in test_transfer_conformance.py):
the receiver's own range check, malformed frames on the listening port, a peer killed in the
middle of big transfers. Real sockets on 127.0.0.1, a real second process where it matters."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from banaserve_ext import errors
from banaserve_ext.transfer import Op, TransferEngine, TransferState, available_backends
from banaserve_ext.transfer.testing import PeerProcess, digest, make_pool

pytestmark = pytest.mark.skipif("tcp" not in available_backends(), reason="tcp not compiled in")

PAGE = 16384

# Wire format (cpp/transfer/backends/tcp/wire.h): 64-byte little-endian header.
HEADER = struct.Struct("<IHBBQQQIIIIQQ")
MAGIC, VERSION, HELLO, WRITE = 0x46545342, 1, 1, 2


def header(
    ftype: int, *, runs: int = 0, payload: int = 0, batch: int = 0, magic: int = MAGIC
) -> bytes:
    return HEADER.pack(magic, VERSION, ftype, 0, 1, 1, 0, 0, 0, runs, 0, payload, batch)


def hello(name: bytes = b"raw-client") -> bytes:
    return header(HELLO, payload=len(name)) + name


def table(base: int, pages: int, page: int = PAGE) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


def tcp_port(eng_metadata: bytes) -> int:
    md = TransferEngine.decode_metadata(eng_metadata)
    assert md.tcp_host == "127.0.0.1"
    return int(md.tcp_port)


def sees_close(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def wait_for(pred: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


@pytest.fixture
def pair() -> Iterator[tuple[Any, ...]]:
    """Two engines forced onto tcp: `a` initiates, `b` owns a user-memory pool."""
    with TransferEngine(force_backend="tcp") as a, TransferEngine(force_backend="tcp") as b:
        reg_a, pool_a = make_pool(a, 64 * PAGE, "user")
        reg_b, pool_b = make_pool(b, 64 * PAGE, "user")
        peer = a.add_peer(b.metadata())
        assert a.backend_for(peer) == "tcp"
        yield a, b, peer, reg_a, pool_a, reg_b, pool_b


def test_receiver_rejects_ranges_it_no_longer_registers(pair: tuple[Any, ...]) -> None:
    a, b, peer, reg_a, pool_a, reg_b, pool_b = pair
    local = a.prepare(table(reg_a.addr, 64))
    remote = a.prepare(table(reg_b.addr, 64), peer=peer)  # valid when prepared
    pool_a[:] = 7
    assert a.submit(Op.WRITE, local, [0], remote, [0]).wait(10)
    assert (pool_b[:PAGE] == 7).all()
    # b unregisters; a's view of b is stale, so only b's own check stands in the way.
    keep = pool_b  # the memory stays alive; it is just no longer registered
    reg_b.release()
    keep[:] = 0
    pool_a[:] = 9
    h = a.submit(Op.WRITE, local, [1, 2], remote, [1, 2])
    with pytest.raises(errors.InvalidArgumentError, match="not inside a registered region"):
        h.wait(10)
    assert h.state is TransferState.FAILED
    assert not keep.any(), "bytes landed in memory the receiver does not register"
    h = a.submit(Op.READ, local, [3], remote, [3])
    with pytest.raises(errors.InvalidArgumentError):
        h.wait(10)
    assert b.stats()["frames_rejected"] == 2
    assert b.stats()["connections_dropped"] == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100,  # not our protocol at all
        hello()[:30],  # truncated HELLO, then EOF
        hello() + header(WRITE, runs=1, payload=16, batch=16, magic=0xDEADBEEF),  # bad magic
        hello() + header(WRITE, runs=1 << 20, payload=16, batch=16),  # too many runs
        hello() + header(WRITE, runs=1, payload=1 << 40, batch=1 << 40),  # payload too large
        hello() + header(7),  # unknown frame type
    ],
    ids=["http", "truncated-hello", "bad-magic", "too-many-runs", "huge-payload", "bad-type"],
)
def test_malformed_frames_drop_the_connection_and_the_listener_lives_on(garbage: bytes) -> None:
    with PeerProcess(backend="tcp", pool_nbytes=16 * PAGE) as peer:
        port = tcp_port(peer.metadata)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            assert sees_close(s), "the peer kept a connection that sent garbage"
        assert wait_for(lambda: peer.stats()["connections_dropped"] == 1)
        assert peer.stats()["frames_rejected"] == 1
        # The same listener still serves a real engine, and the data is right.
        with TransferEngine(force_backend="tcp") as eng:
            reg, pool = make_pool(eng, 16 * PAGE, "user")
            pid = eng.add_peer(peer.metadata)
            local = eng.prepare(table(reg.addr, 16))
            remote = eng.prepare(table(peer.addr, 16), peer=pid)
            peer.fill(3, [4, 5], PAGE)
            assert eng.submit(Op.READ, local, [0, 1], remote, [4, 5]).wait(10)
            assert peer.digest([4, 5], PAGE) == digest(pool, [0, 1], PAGE)
        assert peer.stats()["connections_dropped"] == 1


def test_frame_cut_inside_its_payload_is_dropped_and_counted() -> None:
    with PeerProcess(backend="tcp", pool_nbytes=16 * PAGE) as peer:
        port = tcp_port(peer.metadata)
        peer.fill(1, [0, 1, 2], PAGE)
        before = peer.digest([1, 2], PAGE)
        run = struct.pack("<QQ", peer.addr, 64)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(hello() + header(WRITE, runs=1, payload=64, batch=64) + run + b"z" * 10)
            s.shutdown(socket.SHUT_WR)
            assert sees_close(s)
        assert wait_for(lambda: peer.stats()["connections_dropped"] == 1)
        assert peer.stats()["frames_rejected"] == 1
        assert peer.digest([1, 2], PAGE) == before  # nothing outside the frame's own range


def test_peer_killed_mid_transfer_fails_handles_and_nothing_is_written_after() -> None:
    pages = 1024  # 16 MiB per batch
    with PeerProcess(backend="tcp", pool_nbytes=pages * PAGE) as peer:
        with TransferEngine(force_backend="tcp") as eng:
            reg, pool = make_pool(eng, 8 * pages * PAGE, "user")
            pid = eng.add_peer(peer.metadata)
            remote = eng.prepare(table(peer.addr, pages), peer=pid)
            idx = np.arange(pages)
            first = eng.prepare(table(reg.addr, pages))
            assert eng.submit(Op.READ, first, idx, remote, idx).wait(10)
            pool[:] = 0
            handles = []
            for k in range(8):  # 128 MiB of reads in flight
                local = eng.prepare(table(reg.addr + k * pages * PAGE, pages))
                handles.append(eng.submit(Op.READ, local, idx, remote, idx, timeout_s=20))
            peer.kill()
            t0 = time.monotonic()
            for h in handles:
                try:
                    h.wait(15)
                except (errors.UnavailableError, errors.ProtocolError):
                    pass
                assert h.state in (TransferState.DONE, TransferState.FAILED), h
            assert time.monotonic() - t0 < 10
            snapshot = pool.copy()
            time.sleep(0.3)
            assert np.array_equal(pool, snapshot), "memory changed after the handles ended"
            # A new submit to the dead peer fails fast, typed.
            t0 = time.monotonic()
            try:
                h = eng.submit(Op.WRITE, local, [0], remote, [0], timeout_s=5)
                with pytest.raises(errors.UnavailableError):
                    h.wait(10)
            except errors.UnavailableError:
                pass
            assert time.monotonic() - t0 < 5
            assert eng.stats()["peers_lost"] >= 1


def test_cancel_a_big_write_ends_cancelled_or_done_and_the_lane_keeps_working(
    pair: tuple[Any, ...],
) -> None:
    a, b, peer, reg_a, pool_a, reg_b, pool_b = pair
    big_a = np.full(64 << 20, 5, dtype=np.uint8)
    big_b = np.zeros(64 << 20, dtype=np.uint8)
    ra, rb = a.register(big_a), b.register(big_b)
    peer = a.add_peer(b.metadata())  # republished with the new region
    local = a.prepare(np.array([[ra.addr, big_a.size]], np.uint64))
    remote = a.prepare(np.array([[rb.addr, big_b.size]], np.uint64), peer=peer)
    h = a.submit(Op.WRITE, local, [0], remote, [0])
    h.cancel()
    try:
        h.wait(20)
    except errors.CancelledError:
        pass
    assert h.state in (TransferState.CANCELLED, TransferState.DONE)
    big_a[:] = 6
    assert a.submit(Op.WRITE, local, [0], remote, [0]).wait(20)
    assert (big_b == 6).all()
    ra.release()
    rb.release()

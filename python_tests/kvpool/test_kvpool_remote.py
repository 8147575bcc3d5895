# SPDX-License-Identifier: Apache-2.0
"""What only the remote store has: ``banaserve pool serve --listen`` as a real process,
``RemoteKVPool`` clients in other processes, the control connection's wire, faults (slow
batches, clients killed mid-call, service restarts). The store semantics it shares with the local
KVPool are tested for both in test_kvpool_store.py."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from kvpool_testlib import checksummed_page, owned_pool, page_is_intact, unique_name

from banaserve_ext.errors import (
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    UnavailableError,
)
from banaserve_ext.kvpool import KVPool, PoolServer, PutResult, RemoteKVPool, wire
from banaserve_ext.kvpool.memory import (
    covering_range,
    page_piece_descriptors,
    piece_descriptors,
    slot_addresses,
)
from banaserve_ext.kvpool.server import check_pieces
from banaserve_ext.transfer import FaultSpec

HERE = Path(__file__).resolve().parent
WORKER = HERE / "kvpool_remote_worker.py"
PAGE = 16384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_remote(
    name: str, *, port: int = 0, size: str = "8MiB"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    cmd = [
        sys.executable, "-m", "banaserve_ext", "pool", "serve", "--name", name, "--size", size,
        "--page-size", str(PAGE), "--no-populate", "--reap-interval", "0.1",
        "--listen", f"127.0.0.1:{port}", "--transfer-timeout", "10",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"remote=(127\.0\.0\.1:\d+)", line)
        assert match, (
            f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        )
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, str]]:
    name = unique_name("remote")
    with serve_remote(name) as (_, address):
        yield name, address


def run_worker(*args: object) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_for(pred: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def pages_for(keys: list[str], writer: int) -> np.ndarray:
    return np.stack([checksummed_page(k, writer, PAGE) for k in keys])


# -- pure functions -------------------------------------------------------------------------------
def test_descriptor_tables_pair_pool_pieces_with_client_pieces() -> None:
    assert slot_addresses(1000, 64, [0, 2, 5]).tolist() == [1000, 1128, 1320]
    assert slot_addresses(0, 1 << 33, [3]).tolist() == [3 << 33]  # no 32-bit wrap
    lens = np.array([10, 20, 34], np.uint64)
    pages = page_piece_descriptors([1000, 5000], lens)
    assert pages.tolist() == [
        [1000, 10], [1010, 20], [1030, 34], [5000, 10], [5010, 20], [5030, 34],
    ]  # fmt: skip
    client = piece_descriptors(np.array([[7, 100, 900], [40, 300, 600]]), lens)
    assert client[:, 1].tolist() == pages[:, 1].tolist()
    assert client[:, 0].tolist() == [7, 100, 900, 40, 300, 600]
    assert covering_range(client) == (7, 934)
    assert covering_range(np.zeros((0, 2), np.uint64)) == (0, 0)
    with pytest.raises(InvalidArgumentError):
        piece_descriptors(np.arange(5, dtype=np.uint64), lens)


def test_request_tables_and_addresses_are_checked() -> None:
    addrs = np.arange(4, dtype=np.uint64).tobytes()
    table, lens = check_pieces(2, addrs, np.array([60, 4], np.uint64).tobytes(), 64)
    assert table.shape == (2, 2) and lens.tolist() == [60, 4]
    with pytest.raises(InvalidArgumentError, match="page size is 64"):
        check_pieces(2, addrs, np.array([60, 5], np.uint64).tobytes(), 64)
    with pytest.raises(InvalidArgumentError, match="piece addresses"):
        check_pieces(2, addrs, np.array([64], np.uint64).tobytes(), 64)
    with pytest.raises(InvalidArgumentError, match="uint64"):
        check_pieces(1, b"abc", np.array([64], np.uint64).tobytes(), 64)
    assert wire.parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert wire.parse_address("[::1]:80") == ("::1", 80)
    assert wire.parse_address("127.0.0.1:0", listen=True) == ("127.0.0.1", 0)
    for bad in ("nope", "host:", ":80", "h:0", "h:70000", "h:x"):
        with pytest.raises(InvalidArgumentError):
            wire.parse_address(bad)


# -- through the service process ------------------------------------------------------------------
def test_pages_round_trip_between_client_processes_with_checksums(
    service: tuple[str, str],
) -> None:
    name, address = service
    n = 128
    out = run_worker("put", address, "rt", n, PAGE, 5)
    assert out["results"] == [PutResult.STORED] * n
    keys = [f"rt-{i}" for i in range(n)]
    want = pages_for(keys, 5)
    with RemoteKVPool(address, pool=name, page_size=PAGE) as remote:
        assert remote.page_size == PAGE and remote.num_pages == (8 << 20) // PAGE
        dst = np.zeros((n, PAGE), np.uint8)
        assert remote.batch_get(keys, dst).all()
        assert np.array_equal(dst, want)
        # Already stored: a second put is EXISTS and leaves the pages untouched.
        again = remote.batch_set(keys[:10], pages_for(keys[:10], 9))
        assert again.tolist() == [PutResult.EXISTS] * 10
    with KVPool.attach(name) as local:  # the bytes are in the shared segment itself
        dst = np.zeros((n, PAGE), np.uint8)
        assert local.batch_get(keys, dst).all()
        assert np.array_equal(dst, want)
    back = run_worker("get", address, "rt", n, PAGE)
    assert all(back["found"]) and all(back["intact"]) and set(back["owners"]) == {5}


def test_bad_input_gives_typed_errors_and_the_connection_lives_on(
    service: tuple[str, str],
) -> None:
    name, address = service
    with pytest.raises(InvalidArgumentError, match="HOST:PORT"):
        RemoteKVPool("no-port-here")
    with pytest.raises(NotFoundError, match="not 'other-pool'"):
        RemoteKVPool(address, pool="other-pool").start()
    with pytest.raises(UnavailableError, match="cannot reach"):
        RemoteKVPool(f"127.0.0.1:{free_port()}", connect_timeout_s=2).start()
    with RemoteKVPool(address, pool=name) as remote:
        with pytest.raises(InvalidArgumentError, match="wrong page size"):
            remote.batch_get(["a"], np.zeros(PAGE + 1, np.uint8))  # refused by the client
        with pytest.raises(InvalidArgumentError):
            remote.batch_set(["k" * 200], np.zeros((1, PAGE), np.uint8))  # by the service
        with pytest.raises(InvalidArgumentError):
            remote.batch_exists([b"ok", 17])  # type: ignore[list-item]
        assert remote.connected  # errors above did not cost the connection
        assert remote.batch_set(["fine"], np.ones((1, PAGE), np.uint8)).tolist() == [0]
        assert remote.batch_exists(["fine"]) == 1


def test_malformed_requests_are_refused_and_the_service_keeps_serving(
    service: tuple[str, str],
) -> None:
    name, address = service
    host, port = wire.parse_address(address)
    with socket.create_connection((host, port), timeout=5) as s:  # not our protocol
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)  # reads as a 1.2 GB frame: refused
        reply = wire.recv_reply(s)
        assert isinstance(reply, wire.Error) and reply.code == ProtocolError.code
        try:
            assert s.recv(1 << 16) == b""  # then the service hangs up
        except ConnectionResetError:
            pass
    with socket.create_connection((host, port), timeout=5) as s:
        wire.send(s, wire.Stats())  # before hello
        reply = wire.recv_reply(s)
        assert isinstance(reply, wire.Error) and reply.code == ProtocolError.code
    with RemoteKVPool(address) as remote, socket.create_connection((host, port), timeout=5) as s:
        # A hello with a real engine, then a get whose tables do not match its keys.
        wire.send(s, wire.Hello(wire.PROTOCOL_VERSION, name, remote._engine_live().metadata()))
        assert isinstance(wire.recv_reply(s), wire.Welcome)
        bad = wire.Get(["a", "b"], np.zeros(3, np.uint64).tobytes(),
                       np.array([PAGE], np.uint64).tobytes())  # fmt: skip
        wire.send(s, bad)
        reply = wire.recv_reply(s)
        assert isinstance(reply, wire.Error) and reply.code == InvalidArgumentError.code
        # Addresses the client never registered: refused before a byte moves.
        wire.send(s, wire.Get(["fine"], np.array([4096], np.uint64).tobytes(),
                              np.array([PAGE], np.uint64).tobytes()))  # fmt: skip
        reply = wire.recv_reply(s)
        assert isinstance(reply, wire.Error) and reply.code == InvalidArgumentError.code
        assert remote.batch_exists(["fine"]) == 1


def test_reads_pin_their_pages_and_writes_stay_invisible_until_committed() -> None:
    """Slow page batches (fault injection in the service's engine) keep the two windows open."""
    with (
        owned_pool("pinwin", 8, PAGE) as pool,
        PoolServer(pool, fault=FaultSpec(delay_ms=800)) as server,
        RemoteKVPool(server.address) as remote,
    ):
        keys = [f"pinned-{i}" for i in range(4)]
        want = pages_for(keys, 2)
        assert pool.batch_set(keys, want).tolist() == [0] * 4
        dst = np.zeros((4, PAGE), np.uint8)
        found: list[np.ndarray] = []
        t = threading.Thread(target=lambda: found.append(remote.batch_get(keys, dst)))
        t.start()
        assert wait_for(lambda: pool.stats()["pinned_pages"] == 4)
        assert pool.remove(keys) == 0  # pinned: not removable
        others = [f"filler-{i}" for i in range(8)]
        res = pool.batch_set(others, pages_for(others, 3), raise_on_full=False)
        assert (res == PutResult.NO_SPACE).sum() >= 4  # the pinned pages were not evicted
        t.join(10)
        assert found and found[0].all() and np.array_equal(dst, want)
        assert pool.stats()["pinned_pages"] == 0
        pool.clear()
        new = [f"slow-{i}" for i in range(3)]
        results: list[np.ndarray] = []
        t = threading.Thread(
            target=lambda: results.append(remote.batch_set(new, pages_for(new, 4)))
        )
        t.start()
        assert wait_for(lambda: pool.stats()["reserved_pages"] == 3)
        assert pool.batch_exists(new) == 0 and not pool.exists_mask(new).any()
        t.join(10)
        assert results and results[0].tolist() == [0] * 3
        got = np.zeros((3, PAGE), np.uint8)
        assert pool.batch_get(new, got).all() and np.array_equal(got, pages_for(new, 4))


def test_clients_killed_mid_put_leave_no_partial_page_and_the_pool_stays_usable() -> None:
    name = unique_name("remote-kill")
    n_keys = 400  # more keys than pages: eviction runs too
    with serve_remote(name, size=f"{256 * PAGE}") as (_, address):
        out = run_worker("killloop", address, 40, n_keys, PAGE, 11)
        assert out["rounds"] == 40 and out["batches"] > 0
        with KVPool.attach(name) as local:
            assert wait_for(lambda: local.stats()["reserved_pages"] == 0), local.stats()
            keys = [f"kill-{i}" for i in range(n_keys)]
            dst = np.zeros((n_keys, PAGE), np.uint8)
            found = local.batch_get(keys, dst)
            assert found.sum() > 0
            for i in np.flatnonzero(found):
                owner = int(dst[i, :8].view(np.uint64)[0])
                assert page_is_intact(dst[i]), f"partial page under {keys[i]}"
                assert np.array_equal(dst[i], checksummed_page(keys[i], owner, PAGE))
        with RemoteKVPool(address) as remote:
            stats = remote.stats()
            assert stats["remote_puts_aborted"] > 0, stats  # kills did land in the middle of puts
            assert stats["remote_puts"] > 0 and stats["reserved_pages"] == 0
            fresh = [f"after-{i}" for i in range(32)]
            assert remote.batch_set(fresh, pages_for(fresh, 1)).tolist() == [0] * 32
            back = np.zeros((32, PAGE), np.uint8)
            assert remote.batch_get(fresh, back).all()
            assert np.array_equal(back, pages_for(fresh, 1))


def test_readers_killed_mid_get_leave_no_pin_behind() -> None:
    name = unique_name("remote-killget")
    n_keys = 128
    keys = [f"kill-{i}" for i in range(n_keys)]
    with serve_remote(name, size=f"{256 * PAGE}") as (_, address):
        with RemoteKVPool(address) as remote:
            assert remote.batch_set(keys, pages_for(keys, 7)).tolist() == [0] * n_keys
        out = run_worker("killgets", address, 20, n_keys, PAGE, 5)
        assert out["rounds"] == 20 and out["batches"] > 0
        with KVPool.attach(name) as local:
            assert wait_for(lambda: local.stats()["pinned_pages"] == 0), local.stats()
            assert local.remove(keys) == n_keys  # nothing is left pinned
        with RemoteKVPool(address) as remote:
            stats = remote.stats()
            assert stats["remote_gets"] > 0 and stats["remote_gets_failed"] > 0, stats
            assert remote.batch_exists(keys) == 0


def test_service_restart_gives_a_typed_error_then_the_next_call_reconnects() -> None:
    name, port = unique_name("remote-restart"), free_port()
    keys = [f"r-{i}" for i in range(8)]
    remote = RemoteKVPool(f"127.0.0.1:{port}", pool=name, page_size=PAGE)
    try:
        with serve_remote(name, port=port):
            remote.start()
            assert remote.batch_set(keys, pages_for(keys, 1)).tolist() == [0] * 8
            first_segment = remote.segment_id
        with pytest.raises(UnavailableError, match="went away"):
            remote.batch_exists(keys)  # the service is gone
        with pytest.raises(UnavailableError, match="cannot reach"):
            remote.batch_exists(keys)  # still gone: a clear error, no hang
        with serve_remote(name, port=port):
            assert remote.batch_exists(keys) == 0  # reconnected to the new, empty pool
            assert remote.segment_id != first_segment
            assert remote.batch_set(keys, pages_for(keys, 2)).tolist() == [0] * 8
        with serve_remote(name, port=port):  # restart while the client is connected and idle
            with pytest.raises(UnavailableError, match="went away"):
                remote.batch_get(keys, np.zeros((8, PAGE), np.uint8))
            assert remote.batch_set(keys, pages_for(keys, 3)).tolist() == [0] * 8
            dst = np.zeros((8, PAGE), np.uint8)
            assert remote.batch_get(keys, dst).all()
            assert np.array_equal(dst, pages_for(keys, 3))
    finally:
        remote.close()


def test_concurrent_remote_and_local_clients_on_overlapping_keys_see_no_corruption() -> None:
    name = unique_name("remote-hammer")
    page = PAGE
    with serve_remote(name, size=f"{40 * page}") as (_, address):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "kvpool_hammer.py"),
                    name,
                    str(w),
                    "150",
                    "64",
                    str(page),
                    *([address] if w < 3 else []),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for w in range(4)
        ]
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sum(o["corrupt"] for o in outs) == 0
    assert all(o["hits"] > 0 for o in outs)
    assert sum(o["stored"] for o in outs) > 40  # eviction ran


def test_store_benchmark_measures_the_remote_path_with_verified_data() -> None:
    argv = [
        sys.executable, "-m", "banaserve_ext.bench", "store", "--pages", "16", "--repeats", "1",
        "--exists-repeats", "2", "--pool-size", "4MiB", "--no-peer", "--remote", "--json",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["verified"] and result["remote"]["verified"]
    assert result["remote"]["put_gbps"] > 0 and result["remote"]["exists_us"] > 0

# SPDX-License-Identifier: Apache-2.0
"""The pool service's remote side: hosts that cannot map the shared segment reach the pool
through a control connection (:mod:`.wire`) and the transfer engine's TCP path.

The service registers the pool's page region with its own engine; a client registers its own
buffers with its engine and sends, per call, the keys and its piece addresses. The service does
every page move itself, one engine batch per call:

* ``get``: pin the keys (chunks of 256, a bounded number of pin handles per round), WRITE the
  pinned pages into the client's memory, unpin. A page is never evicted or rewritten while it
  is being sent.
* ``put``: reserve the keys (two-phase put), READ the client's pages into the reserved slots,
  commit; any failure (the client died, disconnected, timed out) aborts the reservations after
  the batch has stopped touching them, so nothing partial ever becomes visible.

Because the service initiates every transfer and waits for it to end before it commits, aborts
or unpins, no client can keep writing into a slot the service has already given back.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import BanaserveError, InvalidArgumentError, NotFoundError, ProtocolError
from ..transfer import FaultSpec, Op, TransferEngine
from . import wire
from .memory import page_piece_descriptors, piece_descriptors, slot_addresses
from .pool import KVPool, PutResult

_log = logging.getLogger("banaserve_ext.kvpool.server")

PIN_CHUNK = 256  # keys per pin handle (the core's op record)


class _Budget:
    """Pin handles of this process, taken all at once per round (no hold-and-wait deadlock)."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def take(self, k: int) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: self._free >= k)
            self._free -= k
        try:
            yield
        finally:
            with self._cv:
                self._free += k
                self._cv.notify_all()


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer: str | None = None


def check_pieces(
    n_keys: int, addrs: bytes, seg_lens: bytes, page_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes and checks a request's piece table: (n, S) client addresses and S lengths."""
    if len(addrs) % 8 or len(seg_lens) % 8:
        raise InvalidArgumentError("piece tables must be uint64 arrays")
    lens = np.frombuffer(seg_lens, dtype=np.uint64)
    flat = np.frombuffer(addrs, dtype=np.uint64)
    if lens.size == 0:
        raise InvalidArgumentError("seg_lens is empty")
    if int(lens.sum()) != page_size:
        raise InvalidArgumentError(
            f"page pieces sum to {int(lens.sum())} bytes but this pool's page size is {page_size}"
        )
    if flat.size != n_keys * lens.size:
        raise InvalidArgumentError(
            f"{flat.size} piece addresses for {n_keys} keys of {lens.size} pieces"
        )
    return flat.reshape(n_keys, lens.size), lens


class PoolServer:
    """Serves ``pool`` (normally the owner's handle, as ``banaserve pool serve`` holds it) to
    remote clients at ``host:port``. The constructor stores configuration; :meth:`start` starts
    the engine, registers the page region and listens; :meth:`stop` ends every connection."""

    def __init__(
        self,
        pool: KVPool,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        pin_handles: int = 8,
        transfer_timeout_s: float = 30.0,
        tcp_lanes: int | None = None,
        fault: FaultSpec | None = None,
    ) -> None:
        if pin_handles < 1:
            raise InvalidArgumentError(f"pin_handles must be >= 1, got {pin_handles}")
        self.pool = pool
        self.host = host
        self.port = port
        self.pin_handles = pin_handles
        self.transfer_timeout_s = transfer_timeout_s
        self.tcp_lanes = tcp_lanes
        self.fault = fault  # tests: slow or failing page batches
        self._engine: TransferEngine | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._peers: dict[str, int] = {}
        self._lock = threading.Lock()
        self._budget = _Budget(pin_handles)
        self._region: tuple[int, int, int] = (0, 0, 0)
        #: remote_* counters, added to the pool statistics a remote client reads
        self.counters = {
            "remote_connections": 0,
            "remote_gets": 0,
            "remote_puts": 0,
            "remote_puts_aborted": 0,
            "remote_gets_failed": 0,
            "remote_bytes_out": 0,
            "remote_bytes_in": 0,
        }

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> PoolServer:
        if self._engine is not None:
            return self
        engine = TransferEngine(
            backends=("tcp",), tcp_host=self.host, tcp_lanes=self.tcp_lanes, fault=self.fault
        ).start()
        try:
            self._region = self.pool.page_region
            addr, stride, num_pages = self._region
            engine.register(addr, nbytes=stride * num_pages)
            listener = socket.create_server((self.host, self.port))
        except BaseException:
            engine.stop()
            raise
        listener.settimeout(0.2)
        self.port = int(listener.getsockname()[1])
        self._engine, self._listener = engine, listener
        self._stop.clear()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="kvpool-accept", daemon=True
        )
        self._acceptor.start()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self._engine is None:
            return
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join()  # no connection is added after this
            self._acceptor = None
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
            self._threads.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for t in threads:  # a batch in flight ends within its timeout
            t.join(timeout=self.transfer_timeout_s + 5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._engine.stop()
        self._engine = None

    def __enter__(self) -> PoolServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            with self._lock:
                self.counters["remote_connections"] += 1
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: _Conn) -> None:
        try:
            while not self._stop.is_set():
                try:
                    req = wire.recv_request(conn.sock)
                except OSError:  # closed or reset (UnavailableError is an OSError)
                    return
                except ProtocolError as exc:
                    with contextlib.suppress(OSError):
                        wire.send(conn.sock, wire.error_reply(exc))
                    return
                try:
                    reply = self._handle(conn, req)
                except BanaserveError as exc:
                    reply = wire.error_reply(exc)
                except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
                    _log.exception("kvpool service: %s failed", type(req).__name__)
                    reply = wire.error_reply(exc)
                try:
                    wire.send(conn.sock, reply)
                except OSError:
                    return
        finally:
            self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
            peer, conn.peer = conn.peer, None
            if peer is not None:
                self._peers[peer] -= 1
                if self._peers[peer] == 0:
                    del self._peers[peer]
                    if self._engine is not None:
                        with contextlib.suppress(BanaserveError):
                            self._engine.remove_peer(peer)
        conn.sock.close()

    def _engine_live(self) -> TransferEngine:
        engine = self._engine
        if engine is None:
            raise ProtocolError("the pool service is stopping")
        return engine

    def _add_peer(self, conn: _Conn, metadata: bytes) -> None:
        engine = self._engine_live()
        peer = engine.decode_metadata(metadata).engine_id
        if conn.peer is not None and peer != conn.peer:
            raise ProtocolError(f"connection of engine {conn.peer} sent metadata of {peer}")
        with self._lock:
            engine.add_peer(metadata)
            if conn.peer is None:
                conn.peer = peer
                self._peers[peer] = self._peers.get(peer, 0) + 1

    # -- requests ------------------------------------------------------------------------------
    def _handle(self, conn: _Conn, req: Any) -> Any:
        if isinstance(req, wire.Hello):
            if req.version != wire.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"client speaks protocol {req.version}, service {wire.PROTOCOL_VERSION}"
                )
            if req.pool and req.pool != self.pool.name:
                raise NotFoundError(
                    f"this service serves pool {self.pool.name!r}, not {req.pool!r}"
                )
            self._add_peer(conn, req.engine)
            s = self.pool.stats()
            return wire.Welcome(
                pool=self.pool.name,
                page_size=int(s["page_size"]),
                num_pages=int(s["num_pages"]),
                max_key_len=int(s["max_key_len"]),
                segment_id=int(s["segment_id"]),
            )
        if conn.peer is None:
            raise ProtocolError("the first request on a connection must be hello")
        if isinstance(req, wire.Exists):
            if req.mask:
                mask = self.pool.exists_mask(req.keys, suffix=req.suffix)
                return wire.Mask(np.asarray(mask, dtype=np.uint8).tobytes())
            return wire.Count(self.pool.batch_exists(req.keys, suffix=req.suffix))
        if isinstance(req, wire.Get):
            return wire.Mask(self._get(conn, req).tobytes())
        if isinstance(req, wire.Put):
            return wire.Mask(self._put(conn, req).tobytes())
        if isinstance(req, wire.Remove):
            return wire.Count(self.pool.remove(req.keys))
        if isinstance(req, wire.Stats):
            with self._lock:
                counters = dict(self.counters)
            return wire.StatsReply({**self.pool.stats(), **counters})
        raise ProtocolError(f"unexpected request {type(req).__name__}")

    def _move(self, op: Op, local: np.ndarray, remote: np.ndarray, peer: str) -> None:
        """One engine batch: row k of ``local`` (pool pages) ↔ row k of ``remote`` (client)."""
        engine = self._engine_live()
        lp = engine.prepare(local)
        rp = engine.prepare(remote, peer=peer)
        idx = np.arange(local.shape[0], dtype=np.int64)
        with engine.submit(op, lp, idx, rp, idx, timeout_s=self.transfer_timeout_s) as h:
            h.wait()

    def _get(self, conn: _Conn, req: wire.Get) -> np.ndarray:
        n = len(req.keys)
        client, lens = check_pieces(n, req.addrs, req.seg_lens, self._region_page_size())
        if req.engine:
            self._add_peer(conn, req.engine)
        assert conn.peer is not None
        found = np.zeros(n, dtype=np.uint8)
        per_round = PIN_CHUNK * max(1, self.pin_handles // 2)
        for begin in range(0, n, per_round):
            end = min(n, begin + per_round)
            starts = range(begin, end, PIN_CHUNK)
            with self._budget.take(len(starts)):
                handles: list[int] = []
                try:
                    pages = np.zeros(end - begin, dtype=np.uint64)
                    for s in starts:
                        e = min(end, s + PIN_CHUNK)
                        handle, addrs = self.pool.pin(req.keys[s:e], suffix=req.suffix)
                        handles.append(handle)
                        pages[s - begin : e - begin] = addrs
                    hit = pages != 0
                    found[begin:end] = hit
                    if hit.any():
                        local = page_piece_descriptors(pages[hit], lens)
                        remote = piece_descriptors(client[begin:end][hit], lens)
                        try:
                            self._move(Op.WRITE, local, remote, conn.peer)
                        except BaseException:
                            self._count(remote_gets_failed=1)
                            raise
                finally:
                    for handle in handles:
                        self.pool.unpin(handle)
        self._count(remote_gets=1, remote_bytes_out=int(found.sum()) * int(lens.sum()))
        return found

    def _put(self, conn: _Conn, req: wire.Put) -> np.ndarray:
        n = len(req.keys)
        client, lens = check_pieces(n, req.addrs, req.seg_lens, self._region_page_size())
        if req.engine:
            self._add_peer(conn, req.engine)
        assert conn.peer is not None
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        slots, results = self.pool.reserve(req.keys, suffix=req.suffix)
        mine = results == PutResult.STORED
        if mine.any():
            ours = np.ascontiguousarray(slots[mine])
            addr, stride, _ = self._region
            try:
                local = page_piece_descriptors(slot_addresses(addr, stride, ours), lens)
                remote = piece_descriptors(client[mine], lens)
                self._move(Op.READ, local, remote, conn.peer)
            except BaseException:
                self.pool.abort(ours)
                self._count(remote_puts_aborted=1)
                raise
            self.pool.commit(ours)
        self._count(remote_puts=1, remote_bytes_in=int(mine.sum()) * int(lens.sum()))
        return np.asarray(results, dtype=np.uint8)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self.counters[key] += delta

    def _region_page_size(self) -> int:
        return self.pool.page_size

# SPDX-License-Identifier: Apache-2.0
"""The attention peer: a process that holds migrated KV slices and computes partial attention
over them.

``python -m banaserve_ext.migration.attn_peer [--host 127.0.0.1] [--port 0]`` prints
``READY host:port`` once it serves. An owner (:class:`AttnPeerClient`) then

1. ``alloc``s a slice: the peer allocates transfer-engine memory laid out as 2·L buffers
   (layer l's K is buffer 2l, its V buffer 2l+1), each ``tokens`` items of one token's
   ``kv_heads × head_dim`` values, and answers the buffer addresses and its engine metadata;
2. writes the KV into it with its own transfer engine (the peer's engine serves the bytes);
3. at every decode step and layer sends ``attend`` with the queries of all its split requests
   on that peer (float32 [N, Hq, D]) and gets back partial outputs (float32 [N, Hq, D]) and their
   log-sum-exp (float32 [N, Hq]);
4. ``free``s the slice when the request finishes, or reads it back first (migration back).

Requests and replies are frames of :mod:`banaserve_ext._framing` (msgpack dicts with an
``op``); a failure is answered as ``{"error": {"type", "message"}}`` and raised by the client as
the same :mod:`banaserve_ext.errors` class.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import select
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from .. import _framing, errors
from ..errors import InvalidArgumentError, NotFoundError, UnavailableError

logger = logging.getLogger(__name__)

#: queries and partial outputs of a whole batch travel in one frame: a larger limit than the
#: framing's default
MAX_FRAME = 1 << 30
_CHANNEL = "attention peer channel"


def send_frame(sock: socket.socket, msg: Any) -> None:
    _framing.send(sock, msg, max_bytes=MAX_FRAME, channel=_CHANNEL)


def recv_frame(sock: socket.socket) -> Any:
    return _framing.recv(sock, max_bytes=MAX_FRAME, channel=_CHANNEL)


#: element sizes of the dtypes a slice may hold
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def slice_layout(num_layers: int, tokens: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """Bytes of one token of one buffer (``item_nbytes``); validates the shape."""
    if dtype not in DTYPE_SIZES:
        raise InvalidArgumentError(f"unsupported KV dtype {dtype!r}; one of {sorted(DTYPE_SIZES)}")
    for name, val in (("layers", num_layers), ("tokens", tokens), ("kv_heads", kv_heads),
                      ("head_dim", head_dim)):  # fmt: skip
        if not isinstance(val, int) or val <= 0:
            raise InvalidArgumentError(f"slice {name} must be a positive integer, got {val!r}")
    return kv_heads * head_dim * DTYPE_SIZES[dtype]


class Arena:
    """First-fit byte ranges of one pre-allocated region (offsets only; no memory). Freed ranges
    coalesce with free neighbours. ``alloc`` returns an offset aligned to ``align`` or None."""

    def __init__(self, nbytes: int, align: int = 4096) -> None:
        if nbytes < 0 or align <= 0 or align & (align - 1):
            raise InvalidArgumentError("arena size must be >= 0 and align a power of two")
        self.nbytes = nbytes
        self.align = align
        self._free: list[tuple[int, int]] = [(0, nbytes)] if nbytes else []  # (offset, size)
        self._used: dict[int, int] = {}

    def alloc(self, size: int) -> int | None:
        if size <= 0:
            raise InvalidArgumentError(f"arena allocation of {size} bytes")
        size = -(-size // self.align) * self.align
        for i, (off, avail) in enumerate(self._free):
            if avail >= size:
                if avail == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, avail - size)
                self._used[off] = size
                return off
        return None

    def free(self, off: int) -> None:
        size = self._used.pop(off, None)
        if size is None:
            raise NotFoundError(f"no arena allocation at offset {off}")
        self._free.append((off, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for o, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self._free = merged

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())


@dataclass
class _Slice:
    reg: Any  # its own registration, or None when it lives in the arena
    kv: Any  # torch tensor [2L, tokens, kv_heads, head_dim] over the slice's memory
    nbytes: int
    arena_offset: int = -1


class AttnPeer:
    """The peer's server. The constructor stores config; :meth:`start` starts the transfer
    engine, binds the listening socket and starts the accept thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, arena_bytes: int = 0) -> None:
        self.host = host
        self.port = port
        #: pre-allocated (pre-faulted) memory that slices are carved from; a slice that does not
        #: fit gets memory of its own
        self.arena_bytes = arena_bytes
        self._arena = Arena(0)
        self._arena_reg: Any = None
        self._engine: Any = None
        self._sock: socket.socket | None = None
        self._slices: dict[int, _Slice] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> AttnPeer:
        from ..transfer import TransferEngine

        self._engine = TransferEngine(tcp_host=self.host).start()
        if self.arena_bytes > 0:
            self._arena_reg = self._engine.allocate(self.arena_bytes)
            self._arena = Arena(self._arena_reg.nbytes)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(16)
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="attn-peer", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            for s in self._slices.values():
                if s.reg is not None:
                    s.reg.release()
            self._slices.clear()
            if self._arena_reg is not None:
                self._arena_reg.release()
                self._arena_reg = None
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def __enter__(self) -> AttnPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- serving -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    msg = recv_frame(conn)
                except errors.BanaserveError:
                    return
                try:
                    reply = self.handle(msg)
                except Exception as exc:  # noqa: BLE001 - answered, typed, to the owner
                    reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
                try:
                    send_frame(conn, reply)
                except errors.BanaserveError:
                    return

    def handle(self, msg: Any) -> dict:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise InvalidArgumentError("a request must be a map with an 'op'")
        op = msg["op"]
        if op == "meta":
            return {"metadata": self._engine.metadata()}
        if op == "alloc":
            return self._alloc(msg)
        if op == "free":
            return self._free(int(msg["slice"]))
        if op == "attend":
            return self._attend(msg)
        if op == "stats":
            with self._lock:
                return {
                    "slices": len(self._slices),
                    "bytes": sum(s.nbytes for s in self._slices.values()),
                    "arena_bytes": self._arena.nbytes,
                    "arena_used": self._arena.used_bytes,
                }
        raise InvalidArgumentError(f"unknown op {op!r}")

    def _alloc(self, msg: dict) -> dict:
        import torch

        layers, tokens = msg["layers"], msg["tokens"]
        heads, dim, dtype = msg["kv_heads"], msg["head_dim"], msg["dtype"]
        item = slice_layout(layers, tokens, heads, dim, dtype)
        nbytes = 2 * layers * tokens * item
        with self._lock:
            off = self._arena.alloc(nbytes) if self._arena_reg is not None else None
        if off is not None:
            reg, base = None, self._arena_reg.addr + off
            raw = self._arena_reg.array[off : off + nbytes]
        else:
            reg = self._engine.allocate(nbytes)
            base, raw, off = reg.addr, reg.array, -1
        kv = torch.from_numpy(raw).view(getattr(torch, dtype))
        kv = kv.view(2 * layers, tokens, heads, dim)
        with self._lock:
            sid = next(self._ids)
            self._slices[sid] = _Slice(reg, kv, nbytes, off)
        bases = [base + b * tokens * item for b in range(2 * layers)]
        return {"slice": sid, "bases": bases, "item_nbytes": item,
                "metadata": self._engine.metadata()}  # fmt: skip

    def _free(self, sid: int) -> dict:
        with self._lock:
            s = self._slices.pop(sid, None)
        if s is None:
            raise NotFoundError(f"no slice {sid}")
        if s.reg is not None:
            s.reg.release()
        else:
            with self._lock:
                self._arena.free(s.arena_offset)
        return {"freed": s.nbytes}

    def _attend(self, msg: dict) -> dict:
        import torch

        from .attn_math import partial_attention

        layer, sids = int(msg["layer"]), list(msg["slices"])
        heads, dim, scale = int(msg["heads"]), int(msg["dim"]), float(msg["scale"])
        q = torch.frombuffer(bytearray(msg["q"]), dtype=torch.float32)
        if q.numel() != len(sids) * heads * dim:
            raise InvalidArgumentError(
                f"q holds {q.numel()} values, expected {len(sids)}×{heads}×{dim}"
            )
        q = q.view(len(sids), heads, dim)
        with self._lock:
            try:
                parts = [self._slices[s] for s in sids]
            except KeyError as exc:
                raise NotFoundError(f"no slice {exc.args[0]}") from None
        outs, lses = [], []
        for i, s in enumerate(parts):
            if not 0 <= layer < s.kv.shape[0] // 2:
                raise InvalidArgumentError(f"layer {layer} outside the slice's layers")
            o, lse = partial_attention(q[i : i + 1], s.kv[2 * layer], s.kv[2 * layer + 1], scale)
            outs.append(o)
            lses.append(lse)
        o_all = torch.cat(outs).contiguous()
        lse_all = torch.cat(lses).contiguous()
        return {"o": o_all.numpy().tobytes(), "lse": lse_all.numpy().tobytes()}


class AttnPeerClient:
    """The owner's connection to one peer. One call at a time (a lock); every call has a
    timeout, so a dead or stuck peer raises instead of hanging the caller."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgumentError(f"peer address must be host:port, got {address!r}")
        self.address = address
        self.host, self.port = host, int(port)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> AttnPeerClient:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise UnavailableError(f"attention peer {self.address} unreachable: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout_s)
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def call(self, msg: dict) -> dict:
        return self.begin(msg).result()

    def begin(self, msg: dict) -> PendingCall:
        """Sends ``msg`` now and returns the pending reply; the connection is held until
        :meth:`PendingCall.result` (work the caller does meanwhile overlaps the peer's)."""
        self._lock.acquire()
        try:
            if self._sock is None:
                raise UnavailableError(f"attention peer {self.address}: connection closed")
            self._io(lambda sock: send_frame(sock, msg))
        except BaseException:
            self._lock.release()
            raise
        return PendingCall(self)

    def _io(self, fn: Any) -> Any:
        try:
            return fn(self._sock)
        except (errors.BanaserveError, TimeoutError) as exc:
            self.close()  # a half-read reply would desynchronise the stream
            raise UnavailableError(f"attention peer {self.address} failed: {exc}") from None

    def _finish(self) -> dict:
        try:
            reply = self._io(recv_frame)
        finally:
            self._lock.release()
        if isinstance(reply, dict) and "error" in reply:
            err = reply["error"]
            cls = getattr(errors, str(err.get("type")), None)
            if not (isinstance(cls, type) and issubclass(cls, errors.BanaserveError)):
                cls = errors.InternalError
            raise cls(f"attention peer {self.address}: {err.get('message')}")
        return reply

    def begin_attend(self, layer: int, slices: list[int], q: Any, scale: float) -> PendingCall:
        """Posts partial attention of float32 queries ``q`` [N, Hq, D] (row i over slice i) at
        ``layer``; ``result()`` of the returned call gives (o [N, Hq, D], lse [N, Hq])."""
        n, heads, dim = q.shape
        call = self.begin({
            "op": "attend", "layer": layer, "slices": slices, "heads": heads, "dim": dim,
            "scale": scale, "q": q.float().contiguous().numpy().tobytes(),
        })  # fmt: skip
        call.shape = (n, heads, dim)
        return call

    def attend(self, layer: int, slices: list[int], q: Any, scale: float) -> tuple[Any, Any]:
        """:meth:`begin_attend` and wait."""
        return self.begin_attend(layer, slices, q, scale).result()


class PendingCall:
    """A request on the wire; :meth:`result` (exactly once) reads the reply and frees the
    connection for the next call."""

    def __init__(self, client: AttnPeerClient) -> None:
        self._client: AttnPeerClient | None = client
        self.shape: tuple[int, int, int] | None = None

    def result(self) -> Any:
        if self._client is None:
            raise InvalidArgumentError("result() of a call was already taken")
        client, self._client = self._client, None
        reply = client._finish()
        if self.shape is None:
            return reply
        import torch

        n, heads, dim = self.shape
        o = torch.frombuffer(bytearray(reply["o"]), dtype=torch.float32).view(n, heads, dim)
        lse = torch.frombuffer(bytearray(reply["lse"]), dtype=torch.float32).view(n, heads)
        return o, lse


class AttnPeerProcess:
    """``python -m banaserve_ext.migration.attn_peer`` as a child process (tests, benchmarks).
    The constructor stores config; :meth:`start` spawns it and waits for ``READY``; :meth:`stop`
    kills it by PID."""

    def __init__(self, host: str = "127.0.0.1", threads: int = 1, arena_mb: int = 0) -> None:
        self.host = host
        self.threads = threads
        self.arena_mb = arena_mb
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout_s: float = 120.0) -> AttnPeerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "banaserve_ext.migration.attn_peer", "--host", self.host,
             "--threads", str(self.threads), "--arena-mb", str(self.arena_mb)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], timeout_s)[0]
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.stop()
            raise UnavailableError(f"attention peer did not start: {line!r}")
        self.address = line.split()[1]
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> AttnPeerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m banaserve_ext.migration.attn_peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--arena-mb", type=int, default=0,
        help="pre-allocate this much slice memory at start (0: allocate per slice)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with AttnPeer(args.host, args.port, arena_bytes=args.arena_mb << 20) as peer:
        print(f"READY {peer.address}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

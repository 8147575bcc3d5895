# SPDX-License-Identifier: Apache-2.0
"""The layer server: runs a block of migrated decoder layers for an owner instance.

Process model: ``python -m banaserve_ext.migration.layer_server --port P`` (or
:class:`LayerServer` in-process for tests). One owner connects over TCP; the control channel
speaks :mod:`.layer_wire` frames. The bulk bytes (weights, KV) never go through that channel:
they move through the transfer engine (:mod:`banaserve_ext.transfer`; shm on one host, tcp
across hosts) straight from the owner's memory into one arena the server allocated.

Protocol (owner → server, one answer per request):

``hello``      → the server's transfer-engine metadata.
``prepare``    tensor specs per layer + executor (``"module:factory"``) and its config bytes
               → arena allocated and registered; answers the engine metadata and the address of
               every tensor, so the owner can post its writes (layer by layer).
``reserve``    allocate (pre-fault) an arena of ``nbytes`` ahead of a migration, so the next
               ``prepare`` that fits takes it and the allocation is off the migration's path.
``install``    after the owner's writes completed: the executor is built over the arena views.
``step``       hidden, residual and the step's index tensors → hidden, residual after the block.
``release``    drops the executor and frees the arena (after the owner read everything back).
``shutdown``   closes the server.

A failure of the server mid-step shows on the owner as :class:`UnavailableError` from the
channel (closed connection or no answer within the deadline), never as a hang.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import BanaserveError, InvalidArgumentError, ProtocolError, UnavailableError
from . import layer_layout, layer_wire
from .layer_wire import recv_msg, send_msg, to_tensor

logger = logging.getLogger(__name__)

#: the arena tensors' dtypes by name
_TORCH_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8")


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in _TORCH_DTYPES:
        raise InvalidArgumentError(f"unsupported dtype {name!r}")
    return getattr(torch, name)


def _resolve(spec: str) -> Callable[..., Any]:
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise InvalidArgumentError(f"executor must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(mod), fn)


class LayerServer:
    """Constructor stores config; :meth:`start` binds the port and starts the serving thread
    and the transfer engine."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self._arena: Any = None
        self._reserved: Any = None
        self._executor: Any = None
        self._tensors: dict[int, dict[str, Any]] = {}
        self._pending: tuple[Callable[..., Any], bytes] | None = None
        self._stop = threading.Event()
        self.steps = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> LayerServer:
        import torch  # noqa: F401  (imported now, not inside the first migration)

        from ..transfer import TransferEngine

        self._engine = TransferEngine(tcp_host=self.host).start()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(4)
        self.port = s.getsockname()[1]
        self._sock = s
        self._thread = threading.Thread(target=self._serve, name="layer-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._drop_arena()
        if self._reserved is not None:
            self._reserved.release()
            self._reserved = None
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def __enter__(self) -> LayerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(0.5)

    # -- serving -------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                self._serve_conn(conn)

    def _serve_conn(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                header, arrays = recv_msg(conn)
            except (UnavailableError, ProtocolError):
                return
            op = header.get("op")
            try:
                reply, bufs = self._handle(op, header, arrays)
            except BanaserveError as exc:
                reply, bufs = {"error": type(exc).__name__, "message": str(exc)}, []
            except Exception as exc:  # an executor bug must reach the owner, not kill us
                logger.exception("layer server: %s failed", op)
                reply, bufs = {"error": "InternalError", "message": f"{op}: {exc!r}"}, []
            try:
                send_msg(conn, reply, bufs)
            except UnavailableError:
                return
            if op == "shutdown":
                self._stop.set()
                return

    def _handle(self, op: Any, header: dict, arrays: dict) -> tuple[dict, list]:
        if op == "hello":
            return {"metadata": self._engine.metadata()}, []
        if op == "prepare":
            return self._prepare(header), []
        if op == "reserve":
            if self._reserved is not None:
                self._reserved.release()
            self._reserved = self._engine.allocate(int(header["nbytes"]))
            return {"nbytes": self._reserved.nbytes, "addr": self._reserved.addr}, []
        if op == "install":
            return self._install(), []
        if op == "step":
            return self._step(header, arrays)
        if op == "release":
            self._drop_arena()
            return {"ok": True}, []
        if op == "shutdown":
            return {"ok": True}, []
        raise ProtocolError(f"unknown op {op!r}")

    def _drop_arena(self) -> None:
        self._executor = None
        self._tensors = {}
        if self._arena is not None:
            self._arena.release()
            self._arena = None

    def _prepare(self, header: dict) -> dict:
        import torch

        self._drop_arena()
        layers = header["layers"]
        specs = [[(t["name"], t["dtype"], list(t["shape"])) for t in lay["tensors"]]
                 for lay in layers]  # fmt: skip
        sizes = [
            [int(np.prod(shape, dtype=np.int64)) * _torch_dtype(dt).itemsize
             for _, dt, shape in lay]
            for lay in specs
        ]  # fmt: skip
        offsets, total = layer_layout.plan_arena(sizes)
        if self._reserved is not None and self._reserved.nbytes >= total:
            self._arena, self._reserved = self._reserved, None
        else:
            self._arena = self._engine.allocate(total)
        base = torch.frombuffer(self._arena.array, dtype=torch.uint8)
        addrs = []
        for lay, lay_specs, lay_off, lay_sizes in zip(layers, specs, offsets, sizes, strict=True):
            views = {}
            row = []
            for (name, dt, shape), off, n in zip(lay_specs, lay_off, lay_sizes, strict=True):
                views[name] = base[off : off + n].view(_torch_dtype(dt)).view(shape)
                row.append(self._arena.addr + off)
            self._tensors[int(lay["layer"])] = views
            addrs.append(row)
        self._pending = (_resolve(header["executor"]), bytes(header["config"]))
        return {"metadata": self._engine.metadata(), "addrs": addrs, "arena_nbytes": total}

    def _install(self) -> dict:
        if self._pending is None:
            raise ProtocolError("install before prepare")
        t0 = time.perf_counter()
        factory, cfg = self._pending
        self._executor = factory(cfg, self._tensors)
        return {"ok": True, "build_s": time.perf_counter() - t0}

    def _step(self, header: dict, arrays: dict) -> tuple[dict, list]:
        from .llama_stack import StepInputs

        if self._executor is None:
            raise ProtocolError("step before install")
        if header.get("fail"):  # fault injection for tests: die mid-step
            import os

            os._exit(17)
        t = {name: to_tensor(header, arrays, name) for name in arrays}
        step = StepInputs(
            mode=header["mode"],
            positions=t["positions"],
            out_cache_loc=t["out_cache_loc"],
            seq_lens=t["seq_lens"],
            extend_prefix_lens=t.get("extend_prefix_lens"),
            token_rows=t["token_rows"],
        )
        t0 = time.perf_counter()
        h, r = self._executor.run(step, t["hidden"], t["residual"])
        self.steps += 1
        out = [("hidden", h), ("residual", r)]
        if header.get("return_kv"):  # the owner keeps its own KV complete (``keep_local``)
            for layer, views in sorted(self._tensors.items()):
                out += [(f"k{layer}", views["k_buffer"][step.out_cache_loc]),
                        (f"v{layer}", views["v_buffer"][step.out_cache_loc])]  # fmt: skip
        return {"compute_s": time.perf_counter() - t0}, out


class LayerServerClient:
    """The owner's side of one layer server: control channel + its own transfer engine."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._sock: socket.socket | None = None
        self._engine: Any = None
        self.peer: str | None = None
        self.broken: str | None = None
        #: the server's compute time of the last step (the rest of a step call is the hop)
        self.last_compute_s = 0.0

    def start(self) -> LayerServerClient:
        from ..transfer import TransferEngine

        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise UnavailableError(
                f"cannot reach the layer server at {self.host}:{self.port}: {exc}"
            ) from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._engine = TransferEngine().start()
        reply, _ = self.call({"op": "hello"})
        self.peer = self._engine.add_peer(reply["metadata"])
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    @property
    def engine(self) -> Any:
        return self._engine

    def call(self, header: dict, bufs: list | None = None, timeout_s: float | None = None
             ) -> tuple[dict, dict]:  # fmt: skip
        """One request/answer; a dead or silent server raises UnavailableError and marks the
        client broken (every later call fails at once with the same reason)."""
        if self.broken is not None:
            raise UnavailableError(self.broken)
        if self._sock is None:
            raise UnavailableError("layer server client not started")
        try:
            self._sock.settimeout(timeout_s or self.timeout_s)
            send_msg(self._sock, header, bufs or [])
            reply, arrays = recv_msg(self._sock)
        except (UnavailableError, ProtocolError) as exc:
            self.broken = (
                f"layer server {self.host}:{self.port} lost during {header.get('op')!r}: {exc}"
            )
            raise UnavailableError(self.broken) from None
        if "error" in reply:
            from .. import errors

            cls = getattr(errors, str(reply["error"]), errors.InternalError)
            raise cls(f"layer server: {reply['message']}")
        return reply, arrays


class ShipTensor:
    """One tensor to move: whole, or only ``rows`` (first-axis indices, e.g. KV token slots)."""

    __slots__ = ("name", "tensor", "rows")

    def __init__(self, name: str, tensor: Any, rows: np.ndarray | None = None) -> None:
        self.name, self.tensor, self.rows = name, tensor, rows

    @property
    def nbytes_moved(self) -> int:
        t = self.tensor
        if self.rows is None:
            return int(t.numel() * t.element_size())
        return int(len(np.unique(self.rows))) * _row_nbytes(t)


def _row_nbytes(t: Any) -> int:
    return int(t[0].numel() * t.element_size()) if t.shape[0] else 0


def _descs(addr: int, t: Any, rows: np.ndarray | None) -> np.ndarray:
    if rows is None:
        return layer_layout.whole_descs([addr], [t.numel() * t.element_size()])
    starts, counts = layer_layout.row_runs(rows)
    return layer_layout.row_descs(addr, _row_nbytes(t), int(t.shape[0]), starts, counts)


def _spec(st: ShipTensor) -> dict:
    return {"name": st.name, "dtype": layer_wire.dtype_name(st.tensor),
            "shape": list(st.tensor.shape)}  # fmt: skip


def _move(client: LayerServerClient, op: Any, layers: dict[int, list[ShipTensor]],
          remote_addrs: dict[int, list[int]], timeout_s: float) -> float:  # fmt: skip
    """Posts one batch per layer (all in flight at once, so layer i+1 is on the wire while
    layer i lands), then waits for all. Returns the seconds from first post to last done."""
    eng = client.engine
    regs = []
    handles = []
    t0 = time.perf_counter()
    try:
        for layer, tensors in layers.items():
            local_rows, remote_rows = [], []
            for st, raddr in zip(tensors, remote_addrs[layer], strict=True):
                if st.tensor.numel() == 0 or (st.rows is not None and len(st.rows) == 0):
                    continue
                reg = eng.register(st.tensor)
                regs.append(reg)
                local_rows.append(_descs(reg.addr, st.tensor, st.rows))
                remote_rows.append(_descs(raddr, st.tensor, st.rows))
            if not local_rows:
                continue
            lt, rt = np.concatenate(local_rows), np.concatenate(remote_rows)
            local = eng.prepare(lt)
            remote = eng.prepare(rt, peer=client.peer)
            idx = np.arange(len(lt), dtype=np.int64)
            handles.append(eng.submit(op, local, idx, remote, idx, timeout_s=timeout_s))
        for h in handles:
            h.wait(timeout_s)
        return time.perf_counter() - t0
    finally:
        for h in handles:
            h.__exit__(None, None, None)
        for reg in regs:
            reg.release()


def ship_layers(client: LayerServerClient, layers: dict[int, list[ShipTensor]], executor: str,
                config: bytes, timeout_s: float = 60.0) -> dict:  # fmt: skip
    """Moves ``layers`` (weights whole, KV by rows) from this process's memory into the layer
    server through the transfer engine and builds its executor. Returns the report."""
    from ..transfer import Op

    t0 = time.perf_counter()
    specs = [{"layer": layer, "tensors": [_spec(st) for st in ts]} for layer, ts in layers.items()]
    reply, _ = client.call(
        {"op": "prepare", "layers": specs, "executor": executor, "config": config}
    )
    client.engine.add_peer(reply["metadata"])  # the arena is a new registration
    addrs = {layer: list(a) for layer, a in zip(layers, reply["addrs"], strict=True)}
    t1 = time.perf_counter()
    transfer_s = _move(client, Op.WRITE, layers, addrs, timeout_s)
    t2 = time.perf_counter()
    inst, _ = client.call({"op": "install"})
    t3 = time.perf_counter()
    kv = sum(st.nbytes_moved for ts in layers.values() for st in ts if st.rows is not None)
    w = sum(st.nbytes_moved for ts in layers.values() for st in ts if st.rows is None)
    return {
        "layers": list(layers), "weight_bytes": w, "kv_bytes": kv,
        "arena_bytes": int(reply["arena_nbytes"]), "prepare_s": t1 - t0,
        "transfer_s": transfer_s, "install_s": t3 - t2, "total_s": t3 - t0,
        "remote_addrs": addrs,
    }  # fmt: skip


def fetch_layers(client: LayerServerClient, layers: dict[int, list[ShipTensor]],
                 remote_addrs: dict[int, list[int]], timeout_s: float = 60.0) -> dict:  # fmt: skip
    """Reads ``layers`` back from the layer server into the given (freshly allocated) local
    tensors, then releases the server's arena. Returns the report."""
    from ..transfer import Op

    t0 = time.perf_counter()
    transfer_s = _move(client, Op.READ, layers, remote_addrs, timeout_s)
    client.call({"op": "release"})
    kv = sum(st.nbytes_moved for ts in layers.values() for st in ts if st.rows is not None)
    w = sum(st.nbytes_moved for ts in layers.values() for st in ts if st.rows is None)
    return {"layers": list(layers), "weight_bytes": w, "kv_bytes": kv,
            "transfer_s": transfer_s, "total_s": time.perf_counter() - t0}  # fmt: skip


def remote_step(client: LayerServerClient, mode: str, tensors: dict[str, Any],
                timeout_s: float | None = None) -> tuple[Any, Any]:  # fmt: skip
    """One split step: ``tensors`` holds hidden, residual, positions, out_cache_loc, seq_lens,
    extend_prefix_lens (extend) and token_rows; returns (hidden, residual) after the block."""
    h, r, _ = remote_step_kv(client, mode, tensors, timeout_s, return_kv=False)
    return h, r


def remote_step_kv(client: LayerServerClient, mode: str, tensors: dict[str, Any],
                   timeout_s: float | None = None, return_kv: bool = True
                   ) -> tuple[Any, Any, dict[str, Any]]:  # fmt: skip
    """:func:`remote_step` that also returns the step's new K/V rows of every remote layer
    (``k{layer}``/``v{layer}``: ``[T, kv_heads, head_dim]``, rows ``out_cache_loc``)."""
    bufs = [(k, v) for k, v in tensors.items() if v is not None]
    head = {"op": "step", "mode": mode} | ({"return_kv": True} if return_kv else {})
    reply, arrays = client.call(head, bufs, timeout_s)
    client.last_compute_s = float(reply.get("compute_s", 0.0))
    kv = {n: to_tensor(reply, arrays, n) for n in arrays if n not in ("hidden", "residual")}
    return to_tensor(reply, arrays, "hidden"), to_tensor(reply, arrays, "residual"), kv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="banaserve-layer-server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", default="", help="write the bound port here once serving")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    srv = LayerServer(args.host, args.port).start()
    print(f"layer server on {srv.host}:{srv.port}", flush=True)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(srv.port))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

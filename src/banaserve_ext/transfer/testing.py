# SPDX-License-Identifier: Apache-2.0
"""A transfer engine in a separate process, driven over its stdin/stdout, for tests and
benchmarks that need a real second process (real shared memory, real sockets).

    with PeerProcess(backend="tcp", pool_nbytes=64 << 20) as peer:
        peer_id = eng.add_peer(peer.metadata)
        peer.fill(seed=1, slots=[...], page=16384)
        assert peer.digest(slots, page) == ...

The child runs ``python -m banaserve_ext.transfer.testing`` and holds one pool (engine-allocated
shared memory, or plain numpy memory registered as is).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import TransferEngine


def pattern(seed: int, pages: int, page: int) -> np.ndarray:
    """Deterministic page contents for (seed, pages, page)."""
    return np.random.default_rng(seed).integers(0, 256, size=(pages, page), dtype=np.uint8)


def digest(pool: np.ndarray, slots: Sequence[int] | np.ndarray, page: int) -> str:
    """Digest of the pages at ``slots`` (in that order) of a flat uint8 pool."""
    view = pool.reshape(-1, page)
    data = np.ascontiguousarray(view[np.asarray(slots, dtype=np.int64)]).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def make_pool(eng: TransferEngine, nbytes: int, memory: str) -> tuple[Any, np.ndarray]:
    """A registered pool of nbytes: 'allocated' (engine shared memory) or 'user' (numpy)."""
    if memory == "allocated":
        reg = eng.allocate(nbytes)
        assert reg.array is not None
        return reg, reg.array
    if memory != "user":
        raise ValueError(f"memory must be 'allocated' or 'user', got {memory!r}")
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(1)  # pre-fault, so first touch never lands inside a measurement
    return eng.register(buf), buf


class PeerProcess:
    """Starts the child at __enter__/start(); kill() ends it abruptly (fault tests)."""

    def __init__(
        self,
        *,
        backend: str,
        pool_nbytes: int,
        memory: str = "allocated",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.pool_nbytes = pool_nbytes
        self.memory = memory
        self.extra_env = extra_env
        self.proc: subprocess.Popen[str] | None = None
        self.metadata = b""
        self.addr = 0
        self.engine_id = ""

    def start(self) -> PeerProcess:
        import os

        env = dict(os.environ, **(self.extra_env or {}))
        argv = [
            sys.executable, "-m", "banaserve_ext.transfer.testing", "--backend", self.backend,
            "--pool-nbytes", str(self.pool_nbytes), "--memory", self.memory,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        hello = json.loads(self._readline())
        self.metadata = base64.b64decode(hello["metadata"])
        self.addr = int(hello["addr"])
        self.engine_id = hello["engine_id"]
        return self

    def __enter__(self) -> PeerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _readline(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited with code {self.proc.wait()}")
        return line

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._readline())
        if reply.get("error"):  # wait_stream replies carry error="" on success
            raise RuntimeError(f"peer process: {reply['error']}")
        return reply

    def fill(self, seed: int, slots: Sequence[int] | np.ndarray, page: int) -> None:
        self.call(cmd="fill", seed=seed, slots=[int(s) for s in slots], page=page)

    def digest(self, slots: Sequence[int] | np.ndarray, page: int) -> str:
        return str(self.call(cmd="digest", slots=[int(s) for s in slots], page=page)["digest"])

    def add_peer(self, metadata: bytes) -> str:
        return str(self.call(cmd="add_peer", metadata=base64.b64encode(metadata).decode())["peer"])

    def wait_stream(self, transfer_id: int, layers: int, timeout_s: float) -> dict[str, Any]:
        """Expects a layer-wise stream and waits for it.
        Returns {'state', 'layers_done', 'error'}."""
        return self.call(cmd="expect", transfer_id=transfer_id, layers=layers, timeout_s=timeout_s)

    def stats(self) -> dict[str, int]:
        return dict(self.call(cmd="stats")["stats"])

    def send_stream(
        self,
        peer: str,
        transfer_id: int,
        layers: int,
        local_base: int,
        remote_base: int,
        item: int,
        items_per_layer: int,
        idx: Sequence[int],
        delay_ms: int,
    ) -> None:
        """Starts (in the child, in the background) a layer-wise stream of ``layers`` layers to
        ``peer``, one layer every ``delay_ms`` (simulated compute). Returns at once."""
        self.call(
            cmd="send_stream", peer=peer, transfer_id=transfer_id, layers=layers,
            local_base=local_base, remote_base=remote_base, item=item,
            items_per_layer=items_per_layer, idx=[int(i) for i in idx], delay_ms=delay_ms,
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _send_stream(eng: TransferEngine, cmd: dict[str, Any]) -> None:
    layers, item, per_layer = int(cmd["layers"]), int(cmd["item"]), int(cmd["items_per_layer"])
    span = np.uint64(per_layer * item)
    lb = np.uint64(cmd["local_base"]) + np.arange(layers, dtype=np.uint64) * span
    rb = np.uint64(cmd["remote_base"]) + np.arange(layers, dtype=np.uint64) * span
    local = eng.prepare_layout(lb, item, per_layer)
    remote = eng.prepare_layout(rb, item, per_layer, peer=cmd["peer"])
    idx = np.asarray(cmd["idx"], dtype=np.int64)
    s = eng.open_stream(
        int(cmd["transfer_id"]), layers, local, idx, remote, idx, buffers_per_layer=1
    )
    for layer in range(layers):
        time.sleep(int(cmd["delay_ms"]) / 1000)
        s.mark_layer_ready(layer)
    s.wait(60)


def _serve(args: argparse.Namespace) -> int:
    force = "" if args.backend == "auto" else args.backend
    with TransferEngine(force_backend=force) as eng:
        reg, pool = make_pool(eng, args.pool_nbytes, args.memory)
        out = sys.stdout
        hello = {
            "metadata": base64.b64encode(eng.metadata()).decode(),
            "addr": reg.addr,
            "engine_id": eng.engine_id,
        }
        out.write(json.dumps(hello) + "\n")
        out.flush()
        for line in sys.stdin:
            cmd = json.loads(line)
            name = cmd.get("cmd")
            try:
                if name == "fill":
                    slots = np.asarray(cmd["slots"], dtype=np.int64)
                    page = int(cmd["page"])
                    pool.reshape(-1, page)[slots] = pattern(int(cmd["seed"]), len(slots), page)
                    reply: dict[str, Any] = {"ok": True}
                elif name == "digest":
                    reply = {"digest": digest(pool, cmd["slots"], int(cmd["page"]))}
                elif name == "add_peer":
                    reply = {"peer": eng.add_peer(base64.b64decode(cmd["metadata"]))}
                elif name == "expect":
                    rs = eng.expect(
                        int(cmd["transfer_id"]), int(cmd["layers"]), timeout_s=cmd["timeout_s"]
                    )
                    error = ""
                    try:
                        rs.wait_all(cmd["timeout_s"] + 5)
                    except Exception as exc:  # noqa: BLE001 - reported to the parent
                        error = f"{type(exc).__name__}: {exc}"
                    reply = {"state": int(rs.state), "layers_done": rs.layers_done, "error": error}
                    rs.release()
                elif name == "stats":
                    reply = {"stats": eng.stats()}
                elif name == "send_stream":
                    threading.Thread(target=_send_stream, args=(eng, cmd), daemon=True).start()
                    reply = {"ok": True}
                elif name == "quit":
                    break
                else:
                    reply = {"error": f"unknown command {name!r}"}
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m banaserve_ext.transfer.testing")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--pool-nbytes", type=int, required=True)
    ap.add_argument("--memory", choices=["allocated", "user"], default="allocated")
    sys.exit(_serve(ap.parse_args()))

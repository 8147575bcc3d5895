# SPDX-License-Identifier: Apache-2.0
"""Link costs for the controller's cost model: from a file, or a short calibration at start.

``--link-costs FILE``: ``{"attention_link": {"fixed_s": .., "bandwidth_Bps": ..},
"layer_link": {...}}`` (either may be left out: that mechanism keeps its default).

Calibration: to one layer server and one attention peer of the deployment, a few transfers of
increasing size through the transfer engine, the way each migration moves its bytes — the
layer server reserves an arena (``reserve``) and the bytes are written into it; the attention
peer allocates a slice (``alloc``) and the bytes are written into it, then it is freed — each
timed from the request to the last byte; :meth:`LinkCost.fit` over the points. A target that
does not answer within ``timeout_s`` (5 s; a layer server serves one owner at a time: one that
holds a split is busy) is skipped. Four sizes up to 16 MiB, one round each: well under a second per
target on this box.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..control import LinkCost
from ..errors import BanaserveError, InvalidArgumentError
from .actuators import parse_address

SIZES = (1 << 20, 2 << 20, 4 << 20, 16 << 20)
LINKS = ("attention_link", "layer_link")


def load_link_costs(path: Path) -> dict[str, LinkCost]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"--link-costs {path}: {exc}") from None
    if not isinstance(raw, dict) or not set(raw) <= set(LINKS) or not raw:
        raise InvalidArgumentError(f"--link-costs {path}: expected an object with {LINKS}")
    out = {}
    for name, v in raw.items():
        if not isinstance(v, dict) or set(v) != {"fixed_s", "bandwidth_Bps"}:
            raise InvalidArgumentError(
                f"--link-costs {path}: {name} needs exactly fixed_s and bandwidth_Bps"
            )
        out[name] = LinkCost(bandwidth_Bps=float(v["bandwidth_Bps"]), fixed_s=float(v["fixed_s"]))
    return out


def _write(engine: Any, peer: str, local: Any, remote_addr: int, nbytes: int,
           timeout_s: float) -> None:  # fmt: skip
    from ..migration import layer_layout
    from ..transfer import Op

    lp = engine.prepare(layer_layout.whole_descs([local.addr], [nbytes]))
    rp = engine.prepare(layer_layout.whole_descs([remote_addr], [nbytes]), peer=peer)
    idx = np.zeros(1, dtype=np.int64)
    with engine.submit(Op.WRITE, lp, idx, rp, idx, timeout_s=timeout_s) as h:
        if not h.wait(timeout_s):
            raise BanaserveError(f"calibration write of {nbytes} bytes timed out")


def layer_points(addr: str, sizes: tuple[int, ...] = SIZES,
                 timeout_s: float = 5.0) -> list[tuple[int, float]]:  # fmt: skip
    from ..migration.layer_server import LayerServerClient

    host, port = parse_address(addr)
    client = LayerServerClient(host, port, timeout_s).start()
    try:
        eng = client.engine
        local = eng.allocate(max(sizes))
        try:
            local.array[:] = 1
            out = []
            for n in sizes:
                t0 = time.perf_counter()
                rep, _ = client.call({"op": "reserve", "nbytes": n})
                hello, _ = client.call({"op": "hello"})  # the arena is a new registration
                peer = eng.add_peer(hello["metadata"])
                _write(eng, peer, local, int(rep["addr"]), n, timeout_s)
                out.append((n, time.perf_counter() - t0))
            client.call({"op": "reserve", "nbytes": 4096})  # give the largest arena back
            return out
        finally:
            local.release()
    finally:
        client.close()


def attention_points(addr: str, sizes: tuple[int, ...] = SIZES,
                     timeout_s: float = 5.0) -> list[tuple[int, float]]:  # fmt: skip
    from ..migration.attn_peer import AttnPeerClient
    from ..transfer import TransferEngine

    client = AttnPeerClient(addr, timeout_s=timeout_s).start()
    eng = TransferEngine().start()
    try:
        local = eng.allocate(max(sizes))
        try:
            local.array[:] = 1
            out = []
            for n in sizes:
                # one layer, K and V: tokens x 1 head x 256 float32 = 1 KiB per token and side
                tokens = max(1, n // 2048)
                t0 = time.perf_counter()
                meta = client.call({"op": "alloc", "layers": 1, "tokens": tokens, "kv_heads": 1,
                                    "head_dim": 256, "dtype": "float32"})  # fmt: skip
                peer = eng.add_peer(meta["metadata"])
                _write(eng, peer, local, int(meta["bases"][0]), 2 * tokens * 1024, timeout_s)
                out.append((2 * tokens * 1024, time.perf_counter() - t0))
                client.call({"op": "free", "slice": meta["slice"]})
            return out
        finally:
            local.release()
    finally:
        eng.stop()
        client.close()


def calibrate(layer_server: str | None, attn_peer: str | None,
              sizes: tuple[int, ...] = SIZES) -> tuple[dict[str, LinkCost], dict]:  # fmt: skip
    """(fitted link costs, report with the points and what was skipped)."""
    links: dict[str, LinkCost] = {}
    report: dict[str, Any] = {}
    for name, addr, fn in (("layer_link", layer_server, layer_points),
                           ("attention_link", attn_peer, attention_points)):  # fmt: skip
        if addr is None:
            report[name] = {"skipped": "no target"}
            continue
        t0 = time.perf_counter()
        try:
            pts = fn(addr, sizes)
            fit = LinkCost.fit([n for n, _ in pts], [s for _, s in pts])
        except (BanaserveError, OSError, KeyError) as exc:
            report[name] = {"target": addr, "skipped": f"{type(exc).__name__}: {exc}"}
            continue
        links[name] = fit
        report[name] = {"target": addr, "points": [[n, round(s, 6)] for n, s in pts],
                        "fixed_s": fit.fixed_s, "bandwidth_Bps": fit.bandwidth_Bps,
                        "took_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return links, report

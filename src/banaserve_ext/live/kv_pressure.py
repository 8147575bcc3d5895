# SPDX-License-Identifier: Apache-2.0
"""Attention-level KV migration on KV pressure, live.

When a decode instance's KV use crosses ``high``, the oldest ``fraction`` of the KV of its
running requests (largest first, at most ``max_per_window`` per window) moves to an attention
peer (``python -m banaserve_ext.migration.attn_peer``) through ``POST /banaserve/migrate
{"kind": "kv", "rid", "peer", "fraction"}``; the instance gets those KV slots back at once and
computes each step's attention for those rows split between itself and the peer (exact merge, see
:mod:`banaserve_ext.adapters.sglang.kv_migration`). When its use falls below ``low``, every split
comes back (``kv_back``). A peer counts as having room when it answers its ``stats`` (the peer
allocates slices on demand; it has no fixed budget unless started with ``--arena-mb``).

The instance must run with ``torch_native`` attention, page size 1 and no radix cache (a PD decode
server's default); an instance that cannot migrate answers 501 and the decision is logged as
failed, the request keeps running where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BanaserveError, InvalidArgumentError
from ..launch.servers import http_json

ROUTE = "/banaserve/migrate"


@dataclass(frozen=True)
class KvPressureConfig:
    peers: tuple[str, ...] = ()
    high: float = 0.85
    low: float = 0.5
    fraction: float = 0.5
    max_per_window: int = 4

    def validate(self) -> None:
        if not 0 <= self.low < self.high <= 1:
            raise InvalidArgumentError(f"need 0 <= kv_low < kv_high <= 1, got {self.low}, "
                                       f"{self.high}")  # fmt: skip
        if not 0 < self.fraction < 1:
            raise InvalidArgumentError(f"kv_fraction must be in (0, 1), got {self.fraction}")
        if self.max_per_window < 1:
            raise InvalidArgumentError("max_per_window must be >= 1")


def _call(url: str, body: dict, timeout_s: float = 120.0) -> tuple[int, dict]:
    status, out = http_json(f"{url}{ROUTE}", body, timeout_s=timeout_s)
    return status, out if isinstance(out, dict) else {"error": str(out)}


class KvPressure:
    """One rule, run per decode instance per window; ``record`` logs each decision."""

    def __init__(self, config: KvPressureConfig, record: Callable[..., dict]) -> None:
        self.config = config
        self.record = record
        self._next_peer = 0

    def step(self, url: str, signals: dict[str, Any]) -> list[dict]:
        c = self.config
        total = max(1, int(signals.get("kv_total", 0) or 0))
        frac = int(signals.get("kv_used", 0) or 0) / total
        if not c.peers or signals.get("mode") != "decode":
            return []
        if frac >= c.high:
            return self._migrate(url, frac)
        if frac <= c.low:
            return self._back(url, frac)
        return []

    def _splits(self, url: str) -> tuple[set[str], dict]:
        status, out = _call(url, {"kind": "kv_splits"}, timeout_s=10.0)
        if status != 200:
            raise BanaserveError(f"{url} kv_splits: {status} {out}")
        return {s["rid"] for s in out.get("splits", [])}, out.get("peers", {})

    def _peer(self, url: str) -> str | None:
        """The next peer (round robin) that answers; ``None`` when none does."""
        from ..migration.attn_peer import AttnPeerClient

        for _ in range(len(self.config.peers)):
            addr = self.config.peers[self._next_peer % len(self.config.peers)]
            self._next_peer += 1
            client = AttnPeerClient(addr, timeout_s=5.0)
            try:
                stats = client.start().call({"op": "stats"})
            except (BanaserveError, OSError):
                continue
            finally:
                client.close()
            arena = int(stats.get("arena_bytes", 0) or 0)
            if arena and int(stats.get("arena_used", 0) or 0) >= arena:
                continue  # a fixed arena, full
            return addr
        return None

    def _migrate(self, url: str, frac: float) -> list[dict]:
        inputs = {"url": url, "kv_frac": frac, "high": self.config.high}
        try:
            split, _ = self._splits(url)
            status, st = _call(url, {"kind": "status"}, timeout_s=10.0)
            if status != 200:
                raise BanaserveError(f"status: {status} {st}")
        except BanaserveError as exc:
            return [self.record("MigrateKV", inputs, "failed", detail=str(exc))]
        running = sorted((r for r in st.get("running", []) if r["rid"] not in split),
                         key=lambda r: -int(r["kv_committed_len"]))  # fmt: skip
        out = []
        for req in running[: self.config.max_per_window]:
            peer = self._peer(url)
            if peer is None:
                out.append(self.record("MigrateKV", inputs, "no_peer_with_room"))
                break
            body = {"kind": "kv", "rid": req["rid"], "peer": peer,
                    "fraction": self.config.fraction}  # fmt: skip
            status, ans = _call(url, body)
            ok = status == 200
            out.append(self.record(
                "MigrateKV", inputs | {"rid": req["rid"], "peer": peer,
                                       "kv_committed_len": req["kv_committed_len"]},
                "ok" if ok else "failed",
                measured_s=float(ans.get("duration_ms", 0.0)) / 1e3 if ok else None,
                detail=None if ok else f"HTTP {status}: {ans.get('error', ans)}",
            ))  # fmt: skip
        return out

    def _back(self, url: str, frac: float) -> list[dict]:
        try:
            split, _ = self._splits(url)
        except BanaserveError:
            return []
        out = []
        for rid in sorted(split):
            status, ans = _call(url, {"kind": "kv_back", "rid": rid})
            ok = status == 200
            out.append(self.record(
                "MigrateKVBack", {"url": url, "kv_frac": frac, "low": self.config.low,
                                  "rid": rid},
                "ok" if ok else ("request_finished" if status == 404 else "failed"),
                measured_s=float(ans.get("duration_ms", 0.0)) / 1e3 if ok else None,
                detail=None if ok else f"HTTP {status}: {ans.get('error', ans)}",
            ))  # fmt: skip
        return out

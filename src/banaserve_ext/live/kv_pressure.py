# SPDX-License-Identifier: Apache-2.0
"""Attention-level KV migration on KV pressure, live.

When a decode instance's KV use crosses ``high``, the oldest ``fraction`` of the KV of its
running requests (largest first, at most ``max_per_window`` per window) moves to an attention
peer (``python -m banaserve_ext.migration.attn_peer``) through ``POST /banaserve/migrate
{"kind": "kv", "rid", "peer", "fraction"}``; the instance gets those KV slots back at once and
computes each step's attention for those rows split between itself and the peer (exact merge, see
:mod:`banaserve_ext.adapters.sglang.kv_migration`). When its use *counting the KV on peers* falls to
``low``, every split comes back (``kv_back``); until then none does — right after a move the
local use is low, but bringing the KV back would only restart the pressure (and moving and
bringing back in turns costs transfers and helps nobody). The pressure goes when requests
finish: their splits end with them. A request is split once; one that starts running after the
others were moved is moved when the use crosses ``high`` again. A peer counts as having room
when it answers its ``stats`` (the peer allocates slices on demand; it has no fixed budget unless
started with ``--arena-mb``).

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

    def __init__(self, config: KvPressureConfig, record: Callable[..., dict],
                 call: Callable[..., tuple[int, dict]] | None = None) -> None:  # fmt: skip
        self.config = config
        self.record = record
        self.call = call or _call
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
            room = int(c.low * total) - int(signals.get("kv_used", 0) or 0)
            return self._back(url, frac, room)
        return []

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
            moves = move_running(url, lambda: self._peer(url), self.config.fraction,
                                 self.config.max_per_window, self.call)  # fmt: skip
        except BanaserveError as exc:
            return [self.record("MigrateKV", inputs, "failed", detail=str(exc))]
        return [self.record("MigrateKV", inputs | m["inputs"], m["outcome"],
                            measured_s=m["measured_s"], detail=m["detail"])
                for m in moves]  # fmt: skip

    def _back(self, url: str, frac: float, room: int) -> list[dict]:
        # only the splits this rule made (to its peers): the controller's attention-level
        # migrations come back when it decides so (:mod:`.actuators`)
        try:
            moves = bring_back(url, set(self.config.peers), self.call, room)
        except BanaserveError:
            return []
        return [self.record("MigrateKVBack", {"url": url, "kv_frac": frac, "low": self.config.low,
                                              "rid": m["rid"]},
                            m["outcome"], measured_s=m["measured_s"], detail=m["detail"])
                for m in moves]  # fmt: skip


def kv_splits(url: str, call: Callable[..., tuple[int, dict]] | None = None) -> dict:
    """The instance's ``kv_splits`` answer (its splits, their peers, ``blocked``)."""
    status, out = (call or _call)(url, {"kind": "kv_splits"}, timeout_s=10.0)
    if status != 200:
        raise BanaserveError(f"{url} kv_splits: {status} {out}")
    return out


def _result(status: int, ans: dict, gone: str = "failed") -> dict:
    ok = status == 200
    return {
        "outcome": "ok" if ok else (gone if status == 404 else "failed"),
        "measured_s": float(ans.get("duration_ms", 0.0)) / 1e3 if ok else None,
        "detail": None if ok else f"HTTP {status}: {ans.get('error', ans)}",
        "bytes": int(ans.get("bytes", 0) or 0) if ok else 0,
    }


def move_running(url: str, pick_peer: Callable[[], str | None], fraction: float, limit: int,
                 call: Callable[..., tuple[int, dict]] | None = None) -> list[dict]:  # fmt: skip
    """Moves the oldest ``fraction`` of the KV of ``url``'s running requests that are not split
    yet (largest first, at most ``limit``), each to ``pick_peer()``; one result per request
    (``rid``, ``peer``, ``outcome`` — ``request_finished`` when it ended meanwhile —,
    ``measured_s``, ``detail``, ``bytes``, ``inputs``)."""
    call = call or _call
    split = {s["rid"] for s in kv_splits(url, call).get("splits", [])}
    status, st = call(url, {"kind": "status"}, timeout_s=10.0)
    if status != 200:
        raise BanaserveError(f"{url} status: {status} {st}")
    running = sorted((r for r in st.get("running", []) if r["rid"] not in split),
                     key=lambda r: -int(r["kv_committed_len"]))  # fmt: skip
    out = []
    for req in running[:limit]:
        peer = pick_peer()
        if peer is None:
            out.append(
                {
                    "rid": req["rid"],
                    "peer": None,
                    "outcome": "no_peer_with_room",
                    "measured_s": None,
                    "detail": None,
                    "bytes": 0,
                    "inputs": {},
                }
            )
            break
        status, ans = call(url, {"kind": "kv", "rid": req["rid"], "peer": peer,
                                  "fraction": fraction})  # fmt: skip
        inputs = {"rid": req["rid"], "peer": peer, "kv_committed_len": req["kv_committed_len"]}
        # 404: the request finished between the status read and this call (nothing to move)
        out.append({"rid": req["rid"], "peer": peer, "inputs": inputs}
                   | _result(status, ans, gone="request_finished"))  # fmt: skip
    return out


def split_tokens(splits: list[dict]) -> int:
    """KV tokens the ``splits`` (``kv_splits`` entries) hold on peers."""
    return sum(int(s["end"]) - int(s["start"]) for s in splits)


def bring_back(url: str, peers: set[str] | None = None,
               call: Callable[..., tuple[int, dict]] | None = None,
               room: int | None = None) -> list[dict]:  # fmt: skip
    """Brings every split of ``url`` (to one of ``peers``; all when ``None``) back — none when
    together they hold more than ``room`` KV tokens (no limit when ``None``); one result per
    request (``rid``, ``outcome`` — ``request_finished`` when it ended meanwhile —,
    ``measured_s``, ``detail``, ``bytes``)."""
    call = call or _call
    splits = kv_splits(url, call).get("splits", [])
    if room is not None and split_tokens(splits) > room:
        return []
    out = []
    for rid in sorted({s["rid"] for s in splits if peers is None or s["peer"] in peers}):
        status, ans = call(url, {"kind": "kv_back", "rid": rid})
        out.append({"rid": rid} | _result(status, ans, gone="request_finished"))
    return out

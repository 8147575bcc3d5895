# SPDX-License-Identifier: Apache-2.0
"""The live actuators of :class:`~banaserve_ext.control.BanaServeController`'s migrations.

The controller names instances by index; the bytes go to a process that belongs to the receiving
instance (:class:`Targets`): a **layer server** (``python -m banaserve_ext.migration.
layer_server``) and an **attention peer** (``python -m banaserve_ext.migration.attn_peer``)
started beside it. On one host they share the receiving instance's CPU (or GPU): the donor's
work moves to that instance's machine, not onto the instance's own scheduler.

* ``MigrateLayers(src, dst, k)`` → ``POST src/banaserve/migrate {"kind": "layers", "first":
  L - k, "host", "port"}`` with dst's layer server: ``src`` runs layers ``0..L-k-1`` and the
  layer server the rest, from the next step on;
* ``MigrateAttention(src, dst, phi)`` → kind ``kv`` for each of src's running requests (the
  oldest ``phi`` of its KV, :func:`.kv_pressure.move_running`) to dst's attention peer;
* ``Revert(src, dst)`` → ``layers_back`` or ``kv_back`` (the splits to dst's peer only).

Each action gives one decision record (predicted cost: the controller's ``latency_s``; measured:
what the server reports, ``duration_ms`` / the ship's ``total_s``; outcome). A failed action is
reported so; the caller drops it from the controller's active list. What a failure leaves:

* ``layers`` refused or failed before the hand-over: nothing moved;
* the migration runs with ``keep_local`` (the donor keeps its weights and KV and writes each
  step's new K/V rows the layer server returns: a PD server's transfer backend reads every
  layer's KV at the addresses it registered, so its KV must stay complete; this moves compute,
  not memory). A layer server lost later: the donor runs that step and every later one on its
  own layers (no request fails); :meth:`Actuators.watch` sees it (``layers_status`` says
  ``failed``) and drops the split (``layers_back``); only a split that
  cannot be dropped (a server migrated by hand without ``keep_local``, whose requests fail with
  HTTP 503 ``LayerServerLost``) makes the donor ``unusable``: out of the router until
  restarted;
* ``kv``: a request whose move failed keeps its KV where it was; an attention peer lost later
  aborts its split requests with ``AttentionPeerError`` (the adapter); a ``kv`` action that
  moved some requests and failed on others keeps the moved ones and is active (its revert
  brings them back).

A target a migration failed to is left out of the views' ``can_receive`` for ``suspend_s``
(30 s), so the controller does not retry a dead target every window.

Which instance can take part (:meth:`Actuators.capabilities`, asked once per instance and
role): sending layers needs the ``layer_migration`` feature and no HiCache (``layers_status``
says ``blocked``); sending attention needs a decode server with ``kv_migration`` on
``torch_native``, page size 1 and no radix cache (``kv_splits`` says ``blocked``); receiving
needs a target process. The views carry this (``InstanceView.can_send`` / ``can_receive``) so
the controller plans no migration that cannot run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BanaserveError, InvalidArgumentError
from .kv_pressure import _call, bring_back, move_running

Call = Callable[..., tuple[int, dict]]


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        p = 0
    if not host or not 0 < p < 65536:
        raise InvalidArgumentError(f"expected HOST:PORT, got {text!r}")
    return host, p


def parse_target(text: str) -> tuple[str, str]:
    """``URL=HOST:PORT`` (an instance and its target process)."""
    url, sep, addr = text.partition("=")
    if not sep or not url.startswith(("http://", "https://")):
        raise InvalidArgumentError(f"expected URL=HOST:PORT, got {text!r}")
    parse_address(addr)
    return url.strip().rstrip("/"), addr.strip()


@dataclass(frozen=True)
class Targets:
    """The migration targets beside each instance: ``(instance URL, HOST:PORT)`` pairs."""

    layer_servers: tuple[tuple[str, str], ...] = ()
    attn_peers: tuple[tuple[str, str], ...] = ()

    def layer_server(self, url: str) -> str | None:
        return dict(self.layer_servers).get(url)

    def attn_peer(self, url: str) -> str | None:
        return dict(self.attn_peers).get(url)

    def validate(self, urls: set[str]) -> None:
        for kind, pairs in (("layer server", self.layer_servers),
                            ("attention peer", self.attn_peers)):  # fmt: skip
            seen = [u for u, _ in pairs]
            if len(set(seen)) != len(seen):
                raise InvalidArgumentError(f"an instance has two {kind}s: {seen}")
            for url, addr in pairs:
                if url not in urls:
                    raise InvalidArgumentError(f"{kind} {addr} belongs to {url}, which is not "
                                               "one of the controller's instances")  # fmt: skip
                parse_address(addr)
        mine = [a for _, a in self.attn_peers]
        if len(set(mine)) != len(mine):
            raise InvalidArgumentError(f"two instances share one attention peer: {mine}")


class Actuators:
    """Carries out migrations; keeps what is in place (by ``(src, dst)`` index pair)."""

    def __init__(self, targets: Targets, total_layers: int, record: Callable[..., dict],
                 call: Call = _call, suspend_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.targets = targets
        self.total_layers = total_layers
        self.record = record
        self.call = call
        #: a target a migration failed to is not offered for this long (no retry storm)
        self.suspend_s = suspend_s
        self.clock = clock
        self._suspended: dict[str, float] = {}
        #: (src, dst) -> {"kind", "src_url", "target", ...} of each migration in place
        self.placed: dict[tuple[int, int], dict] = {}
        self._caps: dict[tuple[str, str], tuple[str, ...]] = {}

    # -- who can take part -------------------------------------------------------------------
    def capabilities(self, url: str, mode: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(can_send, can_receive) of the instance at ``url`` in role ``mode``."""
        pairs = (("layers", self.targets.layer_server(url)),
                 ("attention", self.targets.attn_peer(url)))  # fmt: skip
        now = self.clock()
        receive = tuple(k for k, t in pairs if t and self._suspended.get(t, now) <= now)
        key = (url, mode)
        if key not in self._caps:
            send = []
            status, st = self._ask(url, {"kind": "layers_status"})
            if status == 200 and not st.get("blocked"):
                send.append("layers")
            if mode == "decode":
                status, sp = self._ask(url, {"kind": "kv_splits"})
                if status == 200 and not sp.get("blocked"):
                    send.append("attention")
            if status == 0:
                return (), receive  # not answering: ask again next window
            self._caps[key] = tuple(send)
        return self._caps[key], receive

    def _ask(self, url: str, body: dict, timeout_s: float = 10.0) -> tuple[int, dict]:
        try:
            return self.call(url, body, timeout_s=timeout_s)
        except BanaserveError as exc:
            return 0, {"error": str(exc)}

    # -- actions -----------------------------------------------------------------------------
    def migrate_layers(self, act: Any, src_url: str, dst_url: str, inputs: dict) -> dict:
        target = self.targets.layer_server(dst_url)
        pred = act.latency_s
        if target is None:
            return self.record("MigrateLayers", inputs, "refused", predicted_s=pred,
                               detail=f"{dst_url} has no layer server")  # fmt: skip
        host, port = target.rsplit(":", 1)
        first = self.total_layers - act.layers
        # keep_local: the donor keeps its weights and KV (and gets each step's new K/V rows
        # back), so a PD server's transfers stay valid and a lost layer server costs nothing
        body = {"kind": "layers", "first": first, "host": host, "port": int(port),
                "keep_local": True}  # fmt: skip
        status, ans = self._ask(src_url, body, timeout_s=120.0)
        if status != 200:
            # the server frees its layers only after the layer server holds them: a refusal
            # or a failure before that leaves it whole; a lost answer is checked
            split = self._ask(src_url, {"kind": "layers_status"})[1].get("split")
            if not split:
                self._suspended[target] = self.clock() + self.suspend_s
                return self.record("MigrateLayers", inputs, "failed", predicted_s=pred,
                                   detail=f"HTTP {status}: {ans.get('error', ans)}; nothing "
                                   "moved")  # fmt: skip
            ans = {}
        moved = ans.get("moved", {})
        self.placed[(act.src, act.dst)] = {"kind": "layers", "src_url": src_url,
                                           "target": target, "first": first}  # fmt: skip
        return self.record(
            "MigrateLayers", inputs | {"first": first, "target": target}, "ok", predicted_s=pred,
            measured_s=moved.get("total_s"),
            costs={k: moved.get(k) for k in ("prepare_s", "transfer_s", "install_s",
                                             "weight_bytes", "kv_bytes")} | {
                "handler_s": ans.get("duration_ms", 0) / 1e3 if ans.get("duration_ms") else None},
        )  # fmt: skip

    def migrate_attention(self, act: Any, src_url: str, dst_url: str, inputs: dict) -> dict:
        target = self.targets.attn_peer(dst_url)
        pred = act.latency_s
        if target is None:
            return self.record("MigrateAttention", inputs, "refused", predicted_s=pred,
                               detail=f"{dst_url} has no attention peer")  # fmt: skip
        try:
            moves = move_running(src_url, lambda: target, act.fraction, 1 << 30, self.call)
        except BanaserveError as exc:
            return self.record("MigrateAttention", inputs, "failed", predicted_s=pred,
                               detail=str(exc))  # fmt: skip
        ok = [m for m in moves if m["outcome"] == "ok"]
        # a request that finished meanwhile is neither moved nor the target's fault
        bad = [m for m in moves if m["outcome"] not in ("ok", "request_finished")]
        per = {m["rid"]: {"outcome": m["outcome"], "s": m["measured_s"], "bytes": m["bytes"],
                          "detail": m["detail"]} for m in moves}  # fmt: skip
        inputs = inputs | {"target": target, "requests": per}
        if not ok:
            if bad:
                self._suspended[target] = self.clock() + self.suspend_s
            why = "no running request to move" if not bad else "; ".join(
                str(m["detail"]) for m in bad[:3])  # fmt: skip
            return self.record("MigrateAttention", inputs, "failed", predicted_s=pred,
                               detail=why)  # fmt: skip
        self.placed[(act.src, act.dst)] = {"kind": "attention", "src_url": src_url,
                                           "target": target}  # fmt: skip
        return self.record(
            "MigrateAttention", inputs, "ok" if not bad else "partial", predicted_s=pred,
            measured_s=sum(m["measured_s"] or 0.0 for m in ok),
            costs={"requests": len(ok), "bytes": sum(m["bytes"] for m in ok),
                   "failed_requests": len(bad)},
        )  # fmt: skip

    def revert(self, act: Any, inputs: dict) -> tuple[dict, bool]:
        """Undoes the migration in place for ``(act.src, act.dst)``; (record, undone)."""
        placed = self.placed.get((act.src, act.dst))
        if placed is None:
            return self.record("Revert", inputs, "nothing_in_place"), True
        src_url = placed["src_url"]
        inputs = inputs | {"kind": placed["kind"], "target": placed["target"]}
        if placed["kind"] == "layers":
            status, ans = self._ask(src_url, {"kind": "layers_back"}, timeout_s=120.0)
            if status != 200:
                return self.record(
                    "Revert", inputs, "failed", detail=f"HTTP {status}: {ans.get('error', ans)}"
                ), False
            del self.placed[(act.src, act.dst)]
            moved = ans.get("moved", {})
            return self.record("Revert", inputs, "ok", measured_s=moved.get("total_s"),
                               costs={"transfer_s": moved.get("transfer_s"),
                                      "split_steps": ans.get("split_steps")}), True  # fmt: skip
        try:
            back = bring_back(src_url, {placed["target"]}, self.call)
        except BanaserveError as exc:
            return self.record("Revert", inputs, "failed", detail=str(exc)), False
        failed = [m for m in back if m["outcome"] == "failed"]
        rec = self.record(
            "Revert", inputs | {"requests": {m["rid"]: m["outcome"] for m in back}},
            "ok" if not failed else "failed",
            measured_s=sum(m["measured_s"] or 0.0 for m in back),
            detail="; ".join(str(m["detail"]) for m in failed[:3]) or None,
        )  # fmt: skip
        if failed:
            return rec, False
        del self.placed[(act.src, act.dst)]
        return rec, True

    # -- health of what is in place ----------------------------------------------------------
    def watch(self) -> list[tuple[tuple[int, int], str, bool]]:
        """Layer migrations whose layer server is gone or failed: ``((src, dst), why,
        rolled_back)`` each, forgotten here; ``rolled_back``: the donor runs on its own layers
        again (else it cannot serve; see the module doc)."""
        lost = []
        for key, placed in list(self.placed.items()):
            if placed["kind"] != "layers":
                continue
            # the donor finds a lost layer server at its next step (``keep_local``: that step
            # and the later ones run locally); no probe of the layer server itself, which
            # serves one connection at a time
            why = None
            status, st = self._ask(placed["src_url"], {"kind": "layers_status"})
            if status == 200 and st.get("failed"):
                why = str(st["failed"])
            elif status == 200 and not st.get("split"):
                del self.placed[key]  # undone by someone else: nothing to watch
                continue
            if why:
                del self.placed[key]
                status, ans = self._ask(placed["src_url"], {"kind": "layers_back"}, 60.0)
                if status != 200:
                    why += f"; the split could not be dropped: HTTP {status} {ans.get('error')}"
                lost.append((key, why, status == 200))
        return lost

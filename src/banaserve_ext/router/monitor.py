# SPDX-License-Identifier: Apache-2.0
"""What the router learns from its workers in the background: health checks (with hysteresis),
the engine loads it polls for the policies (``/get_load``), a decode worker's KV capacity and a
worker's model id (once each). Draining workers are left alone."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from ..errors import UnavailableError
from ..policies import record_poll
from .http11 import ResponseHead, build_request
from .payload import find_kv_capacity, json_decode, parse_load
from .registry import Worker

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger("banaserve_ext.router")


async def fetch(
    w: Worker, method: str, path: str, timeout_s: float, body: bytes = b""
) -> tuple[ResponseHead, bytes]:
    """One whole control-plane request to ``w`` (raises UnavailableError)."""
    data = build_request(
        method, w.pool.host_header, path, body, "application/json" if body else None
    )
    return await w.pool.fetch(data, timeout_s)


class Monitor:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.cfg = router.cfg

    def _workers(self, healthy_only: bool = False) -> list[Worker]:
        return [
            w
            for w in self.router.registry.all()
            if not w.draining and (w.health.healthy or not healthy_only)
        ]

    async def health_loop(self) -> None:
        cfg = self.cfg
        while True:
            workers = self._workers()
            results = await asyncio.gather(
                *(
                    fetch(w, "GET", cfg.health_check_endpoint, cfg.health_check_timeout_secs)
                    for w in workers
                ),
                return_exceptions=True,
            )
            for w, r in zip(workers, results, strict=True):
                ok = not isinstance(r, BaseException) and r[0].status == 200
                before = w.health.healthy
                if w.health.record(ok) != before:
                    log.warning("worker %s is now %s", w.url, "healthy" if ok else "unhealthy")
                if ok:
                    self.want_model_id(w)
            await asyncio.sleep(cfg.health_check_interval_secs)

    async def load_loop(self) -> None:
        cfg = self.cfg
        while True:
            await asyncio.sleep(cfg.load_monitor_interval)
            workers = self._workers(healthy_only=True)
            results = await asyncio.gather(
                *(fetch(w, "GET", "/get_load", cfg.health_check_timeout_secs) for w in workers),
                return_exceptions=True,
            )
            now = time.monotonic()
            for w, r in zip(workers, results, strict=True):
                if isinstance(r, BaseException) or r[0].status != 200:
                    continue
                try:
                    tokens, waiting = parse_load(json_decode(r[1]))
                except (msgspec.DecodeError, TypeError, ValueError):
                    continue
                if w.role == "decode":
                    # a decode worker's token load is its KV in use: headroom for the policy
                    if "kv_capacity_probed" not in w.load.extra:
                        w.load.extra["kv_capacity_probed"] = True
                        await self.probe_kv_capacity(w)
                    record_poll(
                        w.load, now, tokens, queued_requests=waiting, kv_used_tokens=int(tokens)
                    )
                else:
                    record_poll(w.load, now, tokens, queued_requests=waiting)

    async def probe_kv_capacity(self, w: Worker) -> None:
        """Learn ``max_total_num_tokens`` from the worker's ``/get_server_info`` (once)."""
        try:
            head, body = await fetch(
                w, "GET", "/get_server_info", self.cfg.health_check_timeout_secs
            )
            info = json_decode(body) if head.status == 200 else None
        except (UnavailableError, msgspec.DecodeError):
            return
        cap = find_kv_capacity(info)
        if cap:
            w.load.kv_capacity_tokens = cap

    def want_model_id(self, w: Worker) -> None:
        """Learn the ``model_id`` of a worker registered without one, in the background: the
        first model of its ``/v1/models`` (SGLang's served model name). Best effort, one probe
        at a time per worker; asked again on registration, health checks and ``/workers``."""
        if w.model_id is not None or w.draining or w.load.extra.get("model_probe"):
            return
        w.load.extra["model_probe"] = True
        self.router.spawn(self._learn_model_id(w))

    async def _learn_model_id(self, w: Worker) -> None:
        try:
            head, body = await fetch(w, "GET", "/v1/models", self.cfg.health_check_timeout_secs)
            data = json_decode(body).get("data") if head.status == 200 else None
        except (UnavailableError, msgspec.DecodeError, AttributeError):
            data = None
        finally:
            w.load.extra.pop("model_probe", None)
        if isinstance(data, list) and data and isinstance(data[0], dict):
            mid = data[0].get("id")
            if isinstance(mid, str) and w.model_id is None:
                w.model_id = mid

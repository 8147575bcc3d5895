# SPDX-License-Identifier: Apache-2.0
"""The router's control plane, in smg 1.13's shapes (a superset: our own fields ride along).

``GET /health`` and ``/liveness`` (200 ``OK``), ``GET /readiness``, ``GET /workers``,
``GET /workers/<id>``, ``POST /workers`` (smg's body), ``DELETE /workers/<id>`` (drains),
sglang-router's ``POST /add_worker?url=`` and ``POST /remove_worker?url=``, ``GET /get_loads``,
``POST /flush_cache``, ``GET /health_generate``, proxies of ``/v1/models``, ``/get_server_info``
and ``/get_model_info`` to the first usable worker, and ``GET /metrics``. See docs/router.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from ..errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from ..policies import RequestInfo
from .http11 import Request
from .monitor import fetch
from .payload import error_body, json_decode, json_encode, parse_load
from .registry import SMG_TYPE, Worker, parse_role, parse_worker_body

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .server import Router

Handler = Callable[[Request, "ClientConnection"], Awaitable[None]]
WORKERS_PREFIX = "/workers/"


def _smg_error(conn: ClientConnection, req: Request, status: int, message: str, code: str) -> None:
    """smg's worker-API error body (``error``, ``code``)."""
    conn.respond(req, status, json_encode({"error": message, "code": code}))


class Admin:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.cfg = router.cfg

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/health"): self.health,
            ("GET", "/liveness"): self.health,
            ("GET", "/readiness"): self.readiness,
            ("GET", "/health_generate"): self.health_generate,
            ("GET", "/v1/models"): self.proxy_first,
            ("GET", "/get_server_info"): self.proxy_first,
            ("GET", "/get_model_info"): self.proxy_first,
            ("GET", "/workers"): self.list_workers,
            ("POST", "/workers"): self.add_worker,
            ("DELETE", "/workers"): self.remove_worker,
            ("POST", "/add_worker"): self.add_worker,
            ("POST", "/remove_worker"): self.remove_worker,
            ("GET", "/get_loads"): self.get_loads,
            ("POST", "/flush_cache"): self.flush_cache,
            ("GET", "/metrics"): self.metrics,
        }

    def prefix_route(self, method: str, path: str) -> Handler | None:
        """``/workers/<id or url>`` routes."""
        if not path.startswith(WORKERS_PREFIX) or len(path) == len(WORKERS_PREFIX):
            return None
        return {"GET": self.get_worker, "DELETE": self.remove_worker}.get(method)

    # -- health ---------------------------------------------------------------------------------
    async def health(self, req: Request, conn: ClientConnection) -> None:
        conn.respond(req, 200, b"OK", "text/plain")

    async def readiness(self, req: Request, conn: ClientConnection) -> None:
        """smg: 200 ``{"status": "ready", "healthy_workers", "total_workers"}`` once every role
        has a usable worker; else 503 ``{"status": "not ready", "reason"}``."""
        router = self.router
        now = time.monotonic()
        workers = [w for w in router.registry.all() if not w.draining]
        ready = all(any(w.usable(now) for w in group) for group, _, _ in router.plan())
        healthy = sum(1 for w in workers if w.health.healthy)
        if router.draining:
            body = {"status": "not ready", "reason": "draining", "draining": True}
            conn.respond(req, 503, json_encode(body))
        elif ready:
            body = {"status": "ready", "healthy_workers": healthy, "total_workers": len(workers)}
            conn.respond(req, 200, json_encode(body))
        else:
            body = {
                "status": "not ready",
                "reason": "insufficient healthy workers",
                "draining": False,
                "healthy_workers": healthy,
                "total_workers": len(workers),
            }
            conn.respond(req, 503, json_encode(body))

    async def health_generate(self, req: Request, conn: ClientConnection) -> None:
        router = self.router
        now = time.monotonic()
        info = RequestInfo("health", 1)
        try:
            targets = [
                router.pick(group, policy, info, now, label)
                for group, policy, label in router.plan()
            ]
        except (UnavailableError, ResourceExhaustedError) as exc:
            conn.respond(req, 503, error_body(str(exc), 503))
            return
        results = await asyncio.gather(
            *(fetch(w, "GET", "/health_generate", 30.0) for w in targets),
            return_exceptions=True,
        )
        bad = [
            f"{w.url}: {r if isinstance(r, BaseException) else r[0].status}"
            for w, r in zip(targets, results, strict=True)
            if isinstance(r, BaseException) or r[0].status != 200
        ]
        if bad:
            conn.respond(req, 503, error_body("health_generate failed: " + "; ".join(bad), 503))
        else:
            conn.respond(req, 200, b"OK", "text/plain")

    async def proxy_first(self, req: Request, conn: ClientConnection) -> None:
        """Model and server info come from the first usable worker of the first role."""
        now = time.monotonic()
        group = self.router.plan()[0][0]
        usable = [w for w in group if w.usable(now)]
        if not usable:
            conn.respond(req, 503, error_body("no worker available", 503))
            return
        try:
            timeout = self.cfg.health_check_timeout_secs
            head, body = await fetch(usable[0], "GET", req.target, timeout)
        except UnavailableError as exc:
            conn.respond(req, 502, error_body(str(exc), 502))
            return
        conn.respond(req, head.status, body, head.headers.get("content-type", "application/json"))

    # -- workers --------------------------------------------------------------------------------
    async def list_workers(self, req: Request, conn: ClientConnection) -> None:
        """smg: ``{"workers": [entry...], "total", "stats": {prefill_count, decode_count,
        regular_count}}``; ``?model=`` filters by model id."""
        query = _query(req)
        workers = self.router.registry.all()
        model = query.get("model")
        if model:
            workers = [w for w in workers if w.model_id in (None, model)]
        counts = {t: 0 for t in ("prefill", "decode", "regular")}
        for w in workers:
            counts[SMG_TYPE[w.role]] += 1
            self.router.monitor.want_model_id(w)
        body = {
            "workers": [w.describe() for w in workers],
            "total": len(workers),
            "stats": {f"{t}_count": n for t, n in counts.items()},
        }
        conn.respond(req, 200, json_encode(body))

    async def get_worker(self, req: Request, conn: ClientConnection) -> None:
        key = req.path[len(WORKERS_PREFIX) :]
        try:
            role = self._role_filter(_query(req))
        except InvalidArgumentError as exc:
            _smg_error(conn, req, 400, str(exc), "BAD_REQUEST")
            return
        found = self.router.registry.find(key, role)
        if not found:
            _smg_error(conn, req, 404, f"Worker {key} not found", "WORKER_NOT_FOUND")
            return
        conn.respond(req, 200, json_encode(found[0].describe()))

    async def add_worker(self, req: Request, conn: ClientConnection) -> None:
        """smg's ``POST /workers`` (JSON body) or sglang-router's ``POST /add_worker?url=``.
        The worker is routable when this answers: 202 with smg's body (``status: accepted``,
        ``worker_id``, ``url``, ``location``) plus the new ``worker`` entry; 200 for
        ``/add_worker``. 409 if the URL is already active in that role."""
        router = self.router
        try:
            args = self._args(req)
            spec, meta = parse_worker_body(args, router.cfg.pd_disaggregation)
            w = router.add_worker(spec, **meta)
        except AlreadyExistsError as exc:
            _smg_error(conn, req, 409, str(exc), "WORKER_ALREADY_EXISTS")
            return
        except InvalidArgumentError as exc:
            _smg_error(conn, req, 400, str(exc), "BAD_REQUEST")
            return
        location = WORKERS_PREFIX + w.id
        body = {
            "status": "accepted",
            "worker_id": w.id,
            "url": w.url,
            "location": location,
            "message": f"{SMG_TYPE[w.role]} worker registered and routable",
            "worker": w.describe(),
        }
        status = 200 if req.path == "/add_worker" else 202
        conn.respond(req, status, json_encode(body), extra=[("Location", location)])

    async def remove_worker(self, req: Request, conn: ClientConnection) -> None:
        """smg's ``DELETE /workers/<id>``; also ``DELETE /workers/<url>``,
        ``DELETE /workers?url=`` and sglang-router's ``POST /remove_worker?url=`` (optional
        ``worker_type``). The workers leave rotation at once and their in-flight requests
        finish; ``?wait_s=S`` waits up to S seconds for that. 202 while requests are still in
        flight, 200 once the workers are gone; 404 if nothing matches."""
        router = self.router
        try:
            args = self._args(req)
            role = self._role_filter(args)
            key = req.path[len(WORKERS_PREFIX) :] if req.path.startswith(WORKERS_PREFIX) else None
            key = key or args.get("url")
            if not isinstance(key, str) or not key:
                raise InvalidArgumentError("missing worker id or 'url'")
            wait_s = float(args.get("wait_s") or 0.0)
            if wait_s < 0:
                raise InvalidArgumentError(f"wait_s must be >= 0, got {wait_s}")
        except (InvalidArgumentError, ValueError) as exc:
            _smg_error(conn, req, 400, str(exc), "BAD_REQUEST")
            return
        found = [w for w in router.registry.find(key, role) if not w.draining]
        if not found:
            draining = router.registry.find(key, role)
            if not draining:
                _smg_error(conn, req, 404, f"Worker {key} not found", "WORKER_NOT_FOUND")
                return
            found = draining  # already removed, still draining: report (and maybe wait) again
        for w in found:
            router.drain_worker(w)
        if wait_s > 0:
            waits = [w.drained.wait() for w in found if not w.drained.is_set()]
            if waits:
                try:
                    await asyncio.wait_for(asyncio.gather(*waits), wait_s)
                except asyncio.TimeoutError:
                    pass
        gone = all(w.drained.is_set() for w in found)
        in_flight = sum(w.in_flight for w in found)
        body = {
            "status": "removed" if gone else "accepted",
            "worker_id": found[0].id,
            "url": found[0].url,
            "message": (
                "worker removed"
                if gone
                else f"worker draining: {in_flight} requests still in flight"
            ),
            "workers": [w.describe() for w in found],
            # sglang-router's field, kept for older callers
            "removed": [w.url for w in found],
        }
        conn.respond(req, 200 if gone else 202, json_encode(body))

    def _args(self, req: Request) -> dict[str, Any]:
        args: dict[str, Any] = {k: v[-1] for k, v in parse_qs(req.query).items()}
        if req.body:
            try:
                body = json_decode(req.body)
            except msgspec.DecodeError as exc:
                raise InvalidArgumentError(f"body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise InvalidArgumentError("body must be a JSON object")
            args.update(body)
        return args

    def _role_filter(self, args: dict[str, Any]) -> str | None:
        value = args.get("worker_type", args.get("role"))
        if value is None or value == "":
            return None
        return parse_role(value, self.router.cfg.pd_disaggregation)

    # -- fan-out --------------------------------------------------------------------------------
    async def get_loads(self, req: Request, conn: ClientConnection) -> None:
        """smg: ``{"workers": [{"worker": url, "load": tokens or -1, "details": ...}]}``; ours
        add ``id``, ``worker_type``, ``status`` and the router's own in-flight counters."""
        workers = self.router.registry.all()
        timeout = self.cfg.health_check_timeout_secs
        results = await asyncio.gather(
            *(fetch(w, "GET", "/get_load", timeout) for w in workers), return_exceptions=True
        )
        out = []
        for w, r in zip(workers, results, strict=True):
            entry: dict[str, Any] = {
                "worker": w.url,
                "load": -1,
                "id": w.id,
                "worker_type": SMG_TYPE[w.role],
                "status": w.status,
                "in_flight_requests": w.in_flight,
                "inflight_prefill_tokens": w.load.inflight_prefill_tokens,
            }
            if isinstance(r, BaseException):
                entry["error"] = str(r)
            elif r[0].status != 200:
                entry["error"] = f"/get_load answered {r[0].status}"
            else:
                try:
                    details = json_decode(r[1])
                    entry["load"] = int(parse_load(details)[0])
                    entry["details"] = details
                except (msgspec.DecodeError, TypeError, ValueError) as exc:
                    entry["error"] = f"/get_load answer not understood: {exc}"
            out.append(entry)
        conn.respond(req, 200, json_encode({"workers": out}))

    async def flush_cache(self, req: Request, conn: ClientConnection) -> None:
        workers = [w for w in self.router.registry.all() if not w.draining]
        timeout = self.cfg.health_check_timeout_secs
        results = await asyncio.gather(
            *(fetch(w, "POST", "/flush_cache", timeout) for w in workers),
            return_exceptions=True,
        )
        failed = [
            f"{w.url}: {r if isinstance(r, BaseException) else r[0].status}"
            for w, r in zip(workers, results, strict=True)
            if isinstance(r, BaseException) or r[0].status >= 300
        ]
        body = {
            "status": "ok" if not failed else "partial",
            "workers": len(workers),
            "failed": failed,
        }
        conn.respond(req, 200 if not failed else 502, json_encode(body))

    async def metrics(self, req: Request, conn: ClientConnection) -> None:
        conn.respond(req, 200, self.router.metrics.render().encode(), "text/plain; version=0.0.4")


def _query(req: Request) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(req.query).items()}


__all__ = ["Admin", "Worker"]

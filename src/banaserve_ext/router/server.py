# SPDX-License-Identifier: Apache-2.0
"""The router: an asyncio HTTP/1.1 server in front of SGLang workers, in PD mode (each request
goes to one prefill and one decode worker at once; the decode answer is returned) or in
single-worker mode (each request goes to one worker).

This module holds the life cycle (sockets, background tasks, graceful stop), the route table
and the two things every part shares: which roles a request needs (:meth:`Router.plan`) and how
one worker is picked for a role (:meth:`Router.pick`). The parts:

- :mod:`.connection`: one client connection (HTTP/1.1, pipelining, backpressure)
- :mod:`.forward`: the request path (admission, pick, retry, stream, abort), both modes
- :mod:`.registry`: the workers, their removal by draining, and their ``/workers`` entries
- :mod:`.admin`: the control-plane endpoints (smg 1.13's shapes)
- :mod:`.monitor`: health checks and load polls
- :mod:`.payload`, :mod:`.stream`: request inspection; stream forwarding and log-prob merging
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Callable
from typing import Any

from ..errors import BanaserveError, NotFoundError, UnavailableError
from ..policies import PolicyBase, RequestInfo, make_policy
from .admin import Admin, Handler
from .config import RouterConfig, WorkerSpec
from .connection import ClientConnection
from .forward import RequestPath
from .handoff import HandoffConfig, HandoffPath
from .http11 import Request
from .metrics import Metrics
from .monitor import Monitor
from .payload import LLM_ROUTES, error_body, load_tokenizer
from .registry import Worker, WorkerRegistry
from .slo import SLOTargets

log = logging.getLogger("banaserve_ext.router")

#: (candidates, policy, label) of one leg
LegPlan = tuple[list[Worker], PolicyBase, str]


class Router:
    """Start with ``await router.start()`` (binds the sockets, starts health checks), stop with
    ``await router.stop()``; or ``async with Router(cfg) as router``."""

    def __init__(self, cfg: RouterConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.metrics = Metrics()
        seed = cfg.seed
        self.rng = random.Random(seed)
        self.prefill_policy = self._make_policy(cfg.prefill_policy or cfg.policy, seed)
        self.decode_policy = self._make_policy(
            cfg.decode_policy or cfg.policy, None if seed is None else seed + 1
        )
        self.registry = WorkerRegistry(
            cfg,
            {
                "prefill": self.prefill_policy,
                "decode": self.decode_policy,
                "colocated": self.prefill_policy,
            },
        )
        self.token_counter: Callable[[str], int] | None = None
        self.admin = Admin(self)
        self.monitor = Monitor(self)
        self.path: RequestPath | None = None
        #: DynaServe hand-off of ``/generate`` between two workers (:meth:`enable_handoff`)
        self.handoff: HandoffPath | None = None
        self._conns: set[ClientConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bound_port: int | None = None
        self.bound_metrics_port: int | None = None
        self._routes: dict[tuple[str, str], Handler] = self.admin.routes()
        self._register_gauges()
        if cfg.dynaserve_handoff:
            slo = SLOTargets.from_ms(cfg.handoff_slo_ttft_ms, cfg.handoff_slo_tbt_ms)
            self.enable_handoff(
                HandoffConfig(
                    kv_pool=cfg.handoff_kv_pool, l3_wait_s=cfg.handoff_l3_wait_secs, slo=slo
                )
            )

    def _make_policy(self, name: str, seed: int | None) -> PolicyBase:
        cfg = self.cfg
        opts: dict[str, Any] = {}
        if name == "cache_aware":
            opts = dict(
                cache_threshold=cfg.cache_threshold,
                balance_abs_threshold=cfg.balance_abs_threshold,
                balance_rel_threshold=cfg.balance_rel_threshold,
                eviction_interval_s=cfg.eviction_interval_secs,
                max_tree_size=cfg.max_tree_size,
            )
        elif name == "load_aware":
            opts = dict(
                shed_when_overloaded=cfg.worker_overload_shed,
                poll_stale_s=max(1.0, 2.0 * cfg.load_monitor_interval),
            )
        return make_policy(name, seed, **opts)

    def _register_gauges(self) -> None:
        m = self.metrics
        m.help["requests_total"] = "client requests by route and status"
        m.gauges["worker_active_requests"] = lambda: [
            ((("worker", w.url), ("role", w.role)), w.load.active_requests) for w in self._all()
        ]
        m.gauges["worker_inflight_prefill_tokens"] = lambda: [
            ((("worker", w.url),), w.load.inflight_prefill_tokens) for w in self._all()
        ]
        m.gauges["worker_health"] = lambda: [
            ((("worker", w.url),), 1.0 if w.health.healthy else 0.0) for w in self._all()
        ]
        m.gauges["worker_cb_open"] = lambda: [
            ((("worker", w.url),), 0.0 if w.breaker.state == "closed" else 1.0) for w in self._all()
        ]
        m.gauges["inflight_requests"] = lambda: [((), float(self._inflight))]

    # -- workers and picking --------------------------------------------------------------------
    @property
    def prefill(self) -> list[Worker]:
        return self.registry.active["prefill"]

    @property
    def decode(self) -> list[Worker]:
        return self.registry.active["decode"]

    @property
    def colocated(self) -> list[Worker]:
        return self.registry.active["colocated"]

    def _all(self) -> list[Worker]:
        return self.registry.all()

    @property
    def _inflight(self) -> int:
        return self.path.inflight if self.path is not None else 0

    def plan(self) -> list[LegPlan]:
        """The legs a request needs, the answering leg last: PD mode a prefill and a decode
        leg, single-worker mode one leg."""
        if self.cfg.pd_disaggregation:
            return [
                (self.prefill, self.prefill_policy, "prefill"),
                (self.decode, self.decode_policy, "decode"),
            ]
        return [(self.colocated, self.prefill_policy, "worker")]

    def pick(
        self,
        workers: list[Worker],
        policy: PolicyBase,
        info: RequestInfo,
        now: float,
        label: str,
        avoid: set[str] | None = None,
    ) -> Worker:
        """One worker for a leg: the policy's choice among usable workers, steering away from
        the URLs in ``avoid`` (they failed this request) whenever another one is usable."""
        cands = [w for w in workers if w.usable(now)]
        if avoid and len(cands) > 1:
            kept = [w for w in cands if w.url not in avoid]
            cands = kept or cands
        if not cands:
            noun = "worker" if label == "worker" else f"{label} worker"
            if not workers:
                raise UnavailableError(f"no {noun} is registered")
            unhealthy = sum(1 for w in workers if not w.health.healthy)
            raise UnavailableError(
                f"no {noun} can take the request: {len(workers)} registered, "
                f"{unhealthy} unhealthy, {len(workers) - unhealthy} with an open circuit breaker"
            )
        if len(cands) == 1:
            return cands[0]
        return cands[policy.select(info, [w.load for w in cands], now)]

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (exponential, with jitter)."""
        cfg = self.cfg
        base = cfg.retry_initial_backoff_ms * (cfg.retry_backoff_multiplier**attempt)
        base = min(base, cfg.retry_max_backoff_ms)
        jitter = 1.0 + cfg.retry_jitter_factor * (2.0 * self.rng.random() - 1.0)
        return max(0.0, base * jitter) / 1000.0

    def add_worker(self, spec: WorkerSpec, **meta: Any) -> Worker:
        """Register a worker (routable at once); its model id is learned in the background."""
        w = self.registry.add(spec, **meta)
        self.monitor.want_model_id(w)
        return w

    def drain_worker(self, w: Worker) -> None:
        """Take ``w`` out of rotation; it leaves when its in-flight requests have finished."""
        self.registry.drain(w)
        log.info("worker %s (%s) removed, %d requests in flight", w.url, w.role, w.in_flight)

    def remove_worker(self, url: str, role: str | None = None) -> list[Worker]:
        """Drain every active registration of ``url`` (of ``role`` if given)."""
        found = [w for w in self.registry.find(url, role) if not w.draining]
        if not found:
            raise NotFoundError(f"no worker {url}" + (f" with role {role}" if role else ""))
        for w in found:
            self.drain_worker(w)
        return found

    def enable_handoff(self, cfg: HandoffConfig) -> HandoffPath:
        """Serve ``/generate`` through the hand-off path: DynaServe micro-requests between
        unified workers; in PD mode, stitched PD legs that live migration and faults move to
        another pair (:mod:`.handoff_pd`)."""
        if self.cfg.pd_disaggregation:
            from .handoff_pd import PDHandoffPath

            self.handoff = PDHandoffPath(self, cfg)
        else:
            self.handoff = HandoffPath(self, cfg)
        self._routes[("POST", "/handoff/migrate")] = self.handoff.migrate_endpoint
        return self.handoff

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background until it ends or the router stops."""
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life cycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.registry.loop = loop
        cfg = self.cfg
        if cfg.tokenizer_path:
            self.token_counter = load_tokenizer(cfg.tokenizer_path)
        self.path = RequestPath(self)
        for spec in (*cfg.prefill, *cfg.decode, *cfg.workers):
            self.add_worker(spec)
        server = await loop.create_server(
            lambda: ClientConnection(self), cfg.host, cfg.port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        self.bound_port = server.sockets[0].getsockname()[1]
        if cfg.prometheus_port is not None and cfg.prometheus_host:
            ms = await loop.create_server(
                lambda: ClientConnection(self, metrics_only=True),
                cfg.prometheus_host,
                cfg.prometheus_port,
                reuse_address=True,
            )
            self._servers.append(ms)
            self.bound_metrics_port = ms.sockets[0].getsockname()[1]
        if not cfg.disable_health_check and cfg.health_check_interval_secs > 0:
            self.spawn(self.monitor.health_loop())
        if cfg.load_monitor_interval > 0:
            self.spawn(self.monitor.load_loop())
        log.info("router listening on %s:%s", cfg.host, self.bound_port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_s`` (default: the
        configured grace period), then close everything."""
        grace = self.cfg.shutdown_grace_period_secs if grace_s is None else grace_s
        self.draining = True
        for s in self._servers:
            s.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for c in list(self._conns):  # idle keep-alive clients: close now
            if c.task is None and c.transport is not None:
                c.transport.close()
        path = self.path
        if path is not None and path.inflight > 0:
            try:
                await asyncio.wait_for(path.idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning(
                    "shutdown: %d requests still in flight after %.1f s", path.inflight, grace
                )
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        self.registry.close()
        if self.handoff is not None:
            self.handoff.close()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then shut down gracefully."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.warning("shutting down (grace %.1f s)", self.cfg.shutdown_grace_period_secs)
        await self.stop()

    # -- dispatch -------------------------------------------------------------------------------
    async def handle(self, req: Request, conn: ClientConnection) -> None:
        if req.method == "POST" and req.path in LLM_ROUTES:
            assert self.path is not None
            if self.handoff is not None:
                if await self.handoff.handle(req, conn):
                    return
            await self.path.handle(req, conn)
            return
        route = self._routes.get((req.method, req.path)) or self.admin.prefix_route(
            req.method, req.path
        )
        if route is None:
            known = req.path in LLM_ROUTES or any(p == req.path for _, p in self._routes)
            status = 405 if known else 404
            conn.respond(req, status, error_body(f"{req.method} {req.path}: not found", status))
            self.metrics.inc("requests_total", (("route", "other"), ("status", str(status))))
            return
        await route(req, conn)

    async def handle_metrics(self, req: Request, conn: ClientConnection) -> None:
        if req.path == "/metrics" and req.method == "GET":
            await self.admin.metrics(req, conn)
        else:
            conn.respond(req, 404, error_body("only GET /metrics here", 404))


__all__ = ["Router", "Worker", "BanaserveError"]

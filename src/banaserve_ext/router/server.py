# SPDX-License-Identifier: Apache-2.0
"""The PD router: an asyncio HTTP/1.1 server that sends each request to one prefill and one
decode worker at once and returns the decode response.

Per attempt: both workers are picked independently by their policies among usable workers
(healthy, breaker closed); the bootstrap fields of the chosen prefill worker are injected; both
upstream connections are obtained *before* either request is written, so a prefill worker that
cannot be reached never leaves a decode leg waiting for KV (no half-dispatch). A leg that fails
before the client has seen a byte aborts the other leg and the pair is re-picked, with backoff,
up to ``retry_max_retries`` times. Streams are passed through chunk by chunk; a client that goes
away aborts both upstream connections.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from ..errors import (
    AlreadyExistsError,
    BanaserveError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    ResourceExhaustedError,
    UnavailableError,
)
from ..policies import PolicyBase, RequestInfo, WorkerLoad, make_policy, record_poll
from .breaker import CircuitBreaker, HealthTracker
from .config import RouterConfig, WorkerSpec, normalize_url, split_url
from .http11 import (
    LAST_CHUNK,
    HttpError,
    Request,
    RequestParser,
    ResponseHead,
    build_request,
    build_response,
    build_stream_head,
    chunk,
)
from .metrics import Metrics
from .upstream import Exchange, UpstreamConnection, UpstreamPool, both_finished, set_nodelay

log = logging.getLogger("banaserve_ext.router")

_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode

GENERATE, COMPLETIONS, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
LLM_ROUTES = (GENERATE, COMPLETIONS, CHAT)
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _error_body(message: str, status: int) -> bytes:
    return _json_encode({"error": {"message": message, "code": status}})


class Worker:
    """One upstream worker: its policy view, breaker, health and connection pool."""

    __slots__ = ("spec", "url", "role", "host", "port", "load", "breaker", "health", "pool")

    def __init__(self, spec: WorkerSpec, cfg: RouterConfig, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.url = spec.url
        self.role = spec.role
        self.host, self.port = split_url(spec.url)
        self.load = WorkerLoad(spec.url, spec.role)
        self.breaker = CircuitBreaker(
            cfg.cb_failure_threshold,
            cfg.cb_success_threshold,
            cfg.cb_timeout_duration_secs,
            enabled=not cfg.disable_circuit_breaker,
        )
        self.health = HealthTracker(cfg.health_failure_threshold, cfg.health_success_threshold)
        self.pool = UpstreamPool(spec.url, self.host, self.port, loop)

    def usable(self, now_s: float) -> bool:
        return self.health.healthy and self.breaker.allows(now_s)

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "worker_type": self.role,
            "bootstrap_port": self.spec.bootstrap_port,
            "healthy": self.health.healthy,
            "circuit_breaker": self.breaker.state,
            "active_requests": self.load.active_requests,
            "inflight_prefill_tokens": self.load.inflight_prefill_tokens,
            "processed_requests": self.load.processed_requests,
            "polled_load": self.load.polled_load,
        }


class _RequestState:
    __slots__ = ("timed_out", "started", "legs")

    def __init__(self) -> None:
        self.timed_out = False
        self.started = False  # bytes of the answer went to the client
        self.legs: list[Exchange] = []


class _Retry(Exception):
    """An attempt failed in a way that another pair may fix."""

    def __init__(
        self,
        status: int,
        message: str,
        body: bytes | None = None,
        ctype: str = "",
        culprits: tuple[str, ...] = (),
    ):
        super().__init__(message)
        self.status = status
        self.body = body
        self.ctype = ctype
        self.culprits = culprits


class ClientConnection(asyncio.Protocol):
    """One accepted client connection: parses requests and runs them one at a time."""

    def __init__(self, router: Router, metrics_only: bool = False) -> None:
        self.router = router
        self.metrics_only = metrics_only
        self.parser = RequestParser(router.cfg.max_payload_size)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.pending: deque[Request] = deque()
        self.lost = False
        self.close_after = False
        self.paused = False
        self.on_resume: list[Callable[[], None]] = []

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        self.router._conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            reqs = self.parser.feed(data)
        except HttpError as exc:
            self._reject(exc.status, str(exc))
            return
        except (ProtocolError, InvalidArgumentError) as exc:
            self._reject(400, str(exc))
            return
        if self.parser.expect_continue:
            self.parser.expect_continue = False
            if self.transport is not None and not reqs:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        for req in reqs:
            if self.task is None and not self.pending:
                self._run(req)
            else:
                self.pending.append(req)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.router._conns.discard(self)
        if self.task is not None:
            self.task.cancel()
        for cb in self.on_resume:
            cb()
        self.on_resume.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        cbs, self.on_resume = self.on_resume, []
        for cb in cbs:
            cb()

    # request loop
    def _run(self, req: Request) -> None:
        if self.metrics_only:
            coro = self.router.handle_metrics(req, self)
        else:
            coro = self.router.handle(req, self)
        self.task = task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.task = None
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("handler failed: %r", exc, exc_info=exc)
                self.close_after = True
                if self.transport is not None and not self.lost:
                    self.transport.abort()
                return
        if self.lost:
            return
        if self.close_after:
            if self.transport is not None:
                self.transport.close()
            return
        if self.pending:
            self._run(self.pending.popleft())

    def _reject(self, status: int, message: str) -> None:
        self.close_after = True
        self.parser = RequestParser(0)
        if self.task is None and self.transport is not None:
            self.transport.write(
                build_response(status, _error_body(message, status), "application/json", False)
            )
            self.transport.close()

    # writing
    def respond(
        self,
        req: Request,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        if self.lost or self.transport is None:
            return
        keep = req.keep_alive and not self.router.draining
        self.transport.write(build_response(status, body, ctype, keep, extra))
        if not keep:
            self.close_after = True

    def stream_head(self, req: Request, status: int, ctype: str) -> bytes:
        """The head of a chunked answer (written by the caller, with the first chunks)."""
        keep = req.keep_alive and not self.router.draining
        if not keep:
            self.close_after = True
        return build_stream_head(status, ctype, keep)

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)


class Router:
    """Start with ``await router.start()`` (binds the sockets, starts health checks), stop with
    ``await router.stop()``; or ``async with Router(cfg) as router``."""

    def __init__(self, cfg: RouterConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.metrics = Metrics()
        self.prefill: list[Worker] = []
        self.decode: list[Worker] = []
        self.colocated: list[Worker] = []
        seed = cfg.seed
        self._rng = random.Random(seed)
        self.prefill_policy = self._make_policy(cfg.prefill_policy or cfg.policy, seed)
        self.decode_policy = self._make_policy(
            cfg.decode_policy or cfg.policy, None if seed is None else seed + 1
        )
        self._token_counter: Callable[[str], int] | None = None
        self._conns: set[ClientConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task] = []
        self._inflight = 0
        self._idle_event: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._queued = 0
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bound_port: int | None = None
        self.bound_metrics_port: int | None = None
        self._routes: dict[tuple[str, str], Callable[[Request, ClientConnection], Awaitable[None]]]
        self._routes = {
            ("POST", GENERATE): self._llm,
            ("POST", COMPLETIONS): self._llm,
            ("POST", CHAT): self._llm,
            ("GET", "/health"): self._health,
            ("GET", "/liveness"): self._health,
            ("GET", "/readiness"): self._readiness,
            ("GET", "/health_generate"): self._health_generate,
            ("GET", "/v1/models"): self._proxy_first,
            ("GET", "/get_server_info"): self._proxy_first,
            ("GET", "/get_model_info"): self._proxy_first,
            ("GET", "/workers"): self._list_workers,
            ("POST", "/workers"): self._add_worker,
            ("DELETE", "/workers"): self._remove_worker,
            ("POST", "/add_worker"): self._add_worker,
            ("POST", "/remove_worker"): self._remove_worker,
            ("GET", "/get_loads"): self._get_loads,
            ("POST", "/flush_cache"): self._flush_cache,
            ("GET", "/metrics"): self._metrics,
        }
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

    def _all(self) -> list[Worker]:
        return [*self.prefill, *self.decode, *self.colocated]

    # -- life cycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        cfg = self.cfg
        if cfg.tokenizer_path:
            self._token_counter = _load_tokenizer(cfg.tokenizer_path)
        for spec in cfg.prefill:
            self._add(spec)
        for spec in cfg.decode:
            self._add(spec)
        for spec in cfg.workers:
            self._add(spec)
        if cfg.max_concurrent_requests > 0:
            self._slots = asyncio.Semaphore(cfg.max_concurrent_requests)
        self._idle_event = asyncio.Event()
        self._idle_event.set()
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
            self._tasks.append(loop.create_task(self._health_loop()))
        if cfg.load_monitor_interval > 0:
            self._tasks.append(loop.create_task(self._load_loop()))
        log.info("router listening on %s:%s", cfg.host, self.bound_port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_s`` (default: the
        configured grace period), then close everything."""
        grace = self.cfg.shutdown_grace_period_secs if grace_s is None else grace_s
        self.draining = True
        for s in self._servers:
            s.close()
        for t in self._tasks:
            t.cancel()
        for c in list(self._conns):  # idle keep-alive clients: close now
            if c.task is None and c.transport is not None:
                c.transport.close()
        if self._idle_event is not None and self._inflight > 0:
            try:
                await asyncio.wait_for(self._idle_event.wait(), grace)
            except asyncio.TimeoutError:
                log.warning(
                    "shutdown: %d requests still in flight after %.1f s", self._inflight, grace
                )
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        for w in self._all():
            w.pool.close()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _add(self, spec: WorkerSpec) -> Worker:
        assert self.loop is not None
        if any(w.url == spec.url and w.role == spec.role for w in self._all()):
            raise AlreadyExistsError(f"{spec.role} worker {spec.url} is already registered")
        w = Worker(spec, self.cfg, self.loop)
        {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}[
            spec.role
        ].append(w)
        return w

    def remove_worker(self, url: str, role: str | None = None) -> list[Worker]:
        url = normalize_url(url)
        removed = []
        for group, policy in (
            (self.prefill, self.prefill_policy),
            (self.decode, self.decode_policy),
            (self.colocated, self.prefill_policy),
        ):
            for w in list(group):
                if w.url == url and (role is None or w.role == role):
                    group.remove(w)
                    policy.on_worker_removed(url)
                    w.pool.close()
                    removed.append(w)
        if not removed:
            raise NotFoundError(f"no worker {url}" + (f" with role {role}" if role else ""))
        return removed

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

    # -- dispatch --------------------------------------------------------------------------------
    async def handle(self, req: Request, conn: ClientConnection) -> None:
        route = self._routes.get((req.method, req.path))
        if route is None:
            if req.path.startswith("/workers/") and req.method == "DELETE":
                route = self._remove_worker
            else:
                known = any(p == req.path for _, p in self._routes)
                status = 405 if known else 404
                conn.respond(
                    req, status, _error_body(f"{req.method} {req.path}: not found", status)
                )
                self.metrics.inc("requests_total", (("route", "other"), ("status", str(status))))
                return
        await route(req, conn)

    async def handle_metrics(self, req: Request, conn: ClientConnection) -> None:
        if req.path == "/metrics" and req.method == "GET":
            await self._metrics(req, conn)
        else:
            conn.respond(req, 404, _error_body("only GET /metrics here", 404))

    def _count(self, route: str, status: int, t0: float) -> None:
        self.metrics.inc("requests_total", (("route", route), ("status", str(status))))
        self.metrics.observe(
            "request_duration_seconds", (("route", route),), time.perf_counter() - t0
        )

    async def _llm(self, req: Request, conn: ClientConnection) -> None:
        t0 = time.perf_counter()
        route = req.path
        try:
            obj = _json_decode(req.body)
        except msgspec.DecodeError as exc:
            conn.respond(req, 400, _error_body(f"request body is not valid JSON: {exc}", 400))
            self._count(route, 400, t0)
            return
        problem = _validate(route, obj)
        if problem:
            conn.respond(req, 400, _error_body(problem, 400))
            self._count(route, 400, t0)
            return
        if self._slots is not None:
            if self._slots.locked() and self._queued >= self.cfg.queue_size:
                conn.respond(req, 429, _error_body("router queue is full", 429))
                self._count(route, 429, t0)
                return
            self._queued += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.cfg.queue_timeout_secs)
            except asyncio.TimeoutError:
                conn.respond(req, 429, _error_body("timed out waiting in the router queue", 429))
                self._count(route, 429, t0)
                return
            finally:
                self._queued -= 1
        self._inflight += 1
        if self._idle_event is not None:
            self._idle_event.clear()
        state = _RequestState()
        task = asyncio.current_task()
        assert self.loop is not None and task is not None
        timer = self.loop.call_later(self.cfg.request_timeout_secs, self._timeout, state, task)
        status = 500
        try:
            if self.cfg.pd_disaggregation:
                status = await self._pd(req, conn, route, obj, state)
            else:
                status = await self._single(req, conn, route, obj, state)
        except asyncio.CancelledError:
            for ex in state.legs:
                ex.abort()
            if not state.timed_out:
                status = 499  # the client went away
                raise
            status = 504
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            if state.started:
                conn.close_after = True
                if conn.transport is not None:
                    conn.transport.abort()
            else:
                msg = f"request timed out after {self.cfg.request_timeout_secs} s"
                conn.respond(req, 504, _error_body(msg, 504))
        finally:
            timer.cancel()
            if status >= 400:
                # a leg still running after a failed request is of no use to anyone
                for ex in state.legs:
                    ex.abort()
            if self._slots is not None:
                self._slots.release()
            self._inflight -= 1
            if self._inflight == 0 and self._idle_event is not None:
                self._idle_event.set()
            self._count(route, status, t0)

    @staticmethod
    def _timeout(state: _RequestState, task: asyncio.Task) -> None:
        state.timed_out = True
        task.cancel()

    def _prompt_tokens(self, route: str, obj: dict) -> int:
        ids = obj.get("input_ids")
        if ids is not None:
            return _count_ids(ids)
        if route == CHAT:
            text = _chat_text(obj.get("messages"))
        elif route == COMPLETIONS:
            prompt = obj.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
                return _count_ids(prompt)
            text = (
                prompt
                if isinstance(prompt, str)
                else "".join(p for p in prompt or () if isinstance(p, str))
            )
        else:
            t = obj.get("text")
            text = t if isinstance(t, str) else "".join(x for x in t or () if isinstance(x, str))
        if self._token_counter is not None:
            return self._token_counter(text)
        return int(len(text) / self.cfg.chars_per_token) + 1

    def _pick(
        self,
        workers: list[Worker],
        policy: PolicyBase,
        info: RequestInfo,
        now: float,
        role: str,
        avoid: set[str] | None = None,
    ) -> Worker:
        cands = [w for w in workers if w.usable(now)]
        if avoid and len(cands) > 1:
            # a retry steers away from the workers that just failed this request, if it can
            kept = [w for w in cands if w.url not in avoid]
            cands = kept or cands
        if not cands:
            if not workers:
                raise UnavailableError(f"no {role} worker is registered")
            unhealthy = sum(1 for w in workers if not w.health.healthy)
            raise UnavailableError(
                f"no {role} worker can take the request: {len(workers)} registered, "
                f"{unhealthy} unhealthy, {len(workers) - unhealthy} with an open circuit breaker"
            )
        if len(cands) == 1:
            return cands[0]
        return cands[policy.select(info, [w.load for w in cands], now)]

    def _backoff(self, attempt: int) -> float:
        cfg = self.cfg
        base = cfg.retry_initial_backoff_ms * (cfg.retry_backoff_multiplier**attempt)
        base = min(base, cfg.retry_max_backoff_ms)
        jitter = 1.0 + cfg.retry_jitter_factor * (2.0 * self._rng.random() - 1.0)
        return max(0.0, base * jitter) / 1000.0

    async def _pd(
        self, req: Request, conn: ClientConnection, route: str, obj: dict, state: _RequestState
    ) -> int:
        stream = obj.get("stream") is True
        want_lp = route == GENERATE and bool(obj.get("return_logprob"))
        batch = _batch_size(route, obj)
        tokens = self._prompt_tokens(route, obj)
        text = (
            _cache_text(route, obj)
            if (self.prefill_policy.uses_text or self.decode_policy.uses_text)
            else None
        )
        max_new = _max_new_tokens(obj)
        retries = 0 if self.cfg.disable_retries else max(0, self.cfg.retry_max_retries)
        last: _Retry | None = None
        avoid: set[str] = set()
        for attempt in range(retries + 1):
            if attempt:
                self.metrics.inc("retries_total")
                await asyncio.sleep(self._backoff(attempt - 1))
            try:
                return await self._pd_attempt(
                    req,
                    conn,
                    route,
                    obj,
                    state,
                    stream,
                    want_lp,
                    batch,
                    tokens,
                    text,
                    max_new,
                    avoid,
                )
            except _Final as f:
                conn.respond(req, f.status, f.body, f.ctype)
                return f.status
            except _Retry as r:
                last = r
                avoid.update(r.culprits)
                state.legs = []
                if isinstance(r, _NoWorker):
                    break  # nothing to retry on: fail fast
        assert last is not None
        if not isinstance(last, _NoWorker):
            self.metrics.inc("retries_exhausted_total")
        body = last.body if last.body is not None else _error_body(str(last), last.status)
        conn.respond(req, last.status, body, last.ctype or "application/json")
        return last.status

    async def _pd_attempt(
        self,
        req: Request,
        conn: ClientConnection,
        route: str,
        obj: dict,
        state: _RequestState,
        stream: bool,
        want_lp: bool,
        batch: int,
        tokens: int,
        text: str | None,
        max_new: int,
        avoid: set[str],
    ) -> int:
        now = time.monotonic()
        room = self._rng.getrandbits(63)
        info = RequestInfo(f"{room:x}", tokens, text=text, max_new_tokens=max_new)
        try:
            pw = self._pick(self.prefill, self.prefill_policy, info, now, "prefill", avoid)
            dw = self._pick(self.decode, self.decode_policy, info, now, "decode", avoid)
        except (UnavailableError, ResourceExhaustedError) as exc:
            raise _NoWorker(503, str(exc)) from None
        if batch > 1:
            obj["bootstrap_host"] = [pw.host] * batch
            obj["bootstrap_port"] = [pw.spec.bootstrap_port] * batch
            obj["bootstrap_room"] = [(room + i) & 0x7FFFFFFFFFFFFFFF for i in range(batch)]
        else:
            obj["bootstrap_host"] = pw.host
            obj["bootstrap_port"] = pw.spec.bootstrap_port
            obj["bootstrap_room"] = room
        body = _json_encode(obj)
        # both connections first: never write one leg if the other cannot be sent
        # count the legs now, before any await: a burst must see its own earlier picks
        self.prefill_policy.on_dispatch(info, pw.load, now)
        self.decode_policy.on_dispatch(info, dw.load, now)
        pc = pw.pool.idle_connection()
        dc = dw.pool.idle_connection()
        if pc is None or dc is None:
            try:
                pc, dc = await self._connect_pair(pw, pc, dw, dc)
            except BaseException:
                t = time.monotonic()
                self.prefill_policy.on_complete(info, pw.load, t)
                self.decode_policy.on_complete(info, dw.load, t)
                raise
        pex = pc.start(build_request("POST", pw.pool.host_header, route, body, "application/json"))
        dex = dc.start(build_request("POST", dw.pool.host_header, route, body, "application/json"))
        state.legs = [pex, dex]
        self._track_leg(pw, self.prefill_policy, info, pex, partner=dex)
        self._track_leg(dw, self.decode_policy, info, dex, partner=None)
        m = self.metrics
        m.inc("worker_selection_total", (("worker", pw.url), ("role", "prefill")))
        m.inc("worker_selection_total", (("worker", dw.url), ("role", "decode")))

        if not stream and not (pex.finished and dex.finished):
            await both_finished(self.loop, pex, dex)  # type: ignore[arg-type]
        if not stream or want_lp:
            # the prefill answer first: if it fails, the decode leg is aborted and retried
            try:
                await pex.done
            except UnavailableError as exc:
                dex.abort()
                raise _Retry(
                    502, f"prefill server error ({pw.url}): {exc}", culprits=(pw.url,)
                ) from None
            phead = pex.head.result()
            if phead.status >= 400:
                dex.abort()
                pbody = pex.body()
                pctype = phead.headers.get("content-type", "application/json")
                if phead.status in RETRYABLE_STATUS:
                    msg = f"prefill worker {pw.url} answered {phead.status}"
                    raise _Retry(phead.status, msg, pbody, pctype, (pw.url,))
                raise _Final(phead.status, pbody, pctype)
        try:
            dhead = await dex.head
        except UnavailableError as exc:
            # the decode leg died; if that is because the prefill failed, report the prefill
            p_completed = pex.completed
            p_failed = pex.finished and not pex.completed and not pex.aborted
            pex.abort()
            pstatus = _head_status(pex)
            if p_completed and pstatus is not None and pstatus >= 400:
                pctype = pex.head.result().headers.get("content-type", "application/json")
                if pstatus in RETRYABLE_STATUS:
                    msg = f"prefill worker {pw.url} answered {pstatus}"
                    raise _Retry(pstatus, msg, pex.body(), pctype, (pw.url,)) from None
                raise _Final(pstatus, pex.body(), pctype) from None
            if p_failed:
                raise _Retry(502, f"prefill server error ({pw.url})", culprits=(pw.url,)) from None
            msg = f"decode server error ({dw.url}): {exc}"
            raise _Retry(502, msg, culprits=(dw.url,)) from None
        ctype = dhead.headers.get("content-type", "application/json")
        if dhead.status >= 400 or not stream:
            try:
                await dex.done
            except UnavailableError as exc:
                pex.abort()
                msg = f"decode server error ({dw.url}): {exc}"
                raise _Retry(502, msg, culprits=(dw.url,)) from None
            if dhead.status in RETRYABLE_STATUS:
                pex.abort()
                raise _Retry(
                    dhead.status,
                    f"decode worker {dw.url} answered {dhead.status}",
                    dex.body(),
                    ctype,
                    (dw.url,),
                )
            out = dex.body()
            if want_lp and dhead.status < 300:
                out = _merge_logprobs(pex.body(), out)
            conn.respond(req, dhead.status, out, ctype)
            return dhead.status
        # streaming passthrough, chunk by chunk
        state.started = True
        head = conn.stream_head(req, dhead.status, ctype)
        transform = None
        if want_lp:
            transform = _StreamLogprobMerger(_prefill_input_logprobs(pex.body())).feed
        fw = _StreamForwarder(conn, dc, dex, head, transform)
        dex.set_sink(fw.piece, fw.flush)
        try:
            await dex.done
        except UnavailableError:
            # the decode died mid-stream: nothing to retry; cut the client stream short
            conn.close_after = True
            if conn.transport is not None:
                conn.transport.abort()
            return 502
        fw.flush()
        return dhead.status

    async def _connect_pair(
        self, pw: Worker, pc: UpstreamConnection | None, dw: Worker, dc: UpstreamConnection | None
    ) -> tuple[UpstreamConnection, UpstreamConnection]:
        async def _none() -> None:
            return None

        results = await asyncio.gather(
            pw.pool.connect() if pc is None else _none(),
            dw.pool.connect() if dc is None else _none(),
            return_exceptions=True,
        )
        pr, dr = results
        now = time.monotonic()
        errors = []
        culprits = []
        if isinstance(pr, BaseException):
            culprits.append(pw.url)
            pw.breaker.record(False, now)
            self.metrics.inc("worker_errors_total", (("worker", pw.url),))
            errors.append(str(pr))
        elif pr is not None:
            pc = pr
        if isinstance(dr, BaseException):
            culprits.append(dw.url)
            dw.breaker.record(False, now)
            self.metrics.inc("worker_errors_total", (("worker", dw.url),))
            errors.append(str(dr))
        elif dr is not None:
            dc = dr
        if errors:
            # give back what was obtained, unused
            if pc is not None:
                pw.pool.release(pc)
            if dc is not None:
                dw.pool.release(dc)
            raise _Retry(502, "; ".join(errors), culprits=tuple(culprits))
        assert pc is not None and dc is not None
        return pc, dc

    def _track_leg(
        self,
        w: Worker,
        policy: PolicyBase,
        info: RequestInfo,
        ex: Exchange,
        partner: Exchange | None,
    ) -> None:
        """Finish the leg's accounting (dispatched already) when its exchange ends."""

        def _done(fut: asyncio.Future) -> None:
            t = time.monotonic()
            ok = not fut.cancelled() and fut.exception() is None
            status = _head_status(ex)
            head_ok = ok and status is not None and status < 500
            policy.on_complete(info, w.load, t)
            if ok:
                w.breaker.record(head_ok, t)
                if not head_ok:
                    self.metrics.inc("worker_errors_total", (("worker", w.url),))
            elif ex.aborted:
                pass  # we gave up on it (client gone, partner failed): not the worker's fault
            elif ex.got_head or not ex.reused:
                # a stale keep-alive connection dying before the answer is not the worker's fault
                w.breaker.record(False, t)
                self.metrics.inc("worker_errors_total", (("worker", w.url),))
            if partner is not None and not (ok and status is not None and status < 400):
                partner.abort()  # the prefill failed: the decode leg would wait for KV forever

        ex.done.add_done_callback(_done)

    async def _single(
        self, req: Request, conn: ClientConnection, route: str, obj: dict, state: _RequestState
    ) -> int:
        """Non-PD mode: one worker per request, same retry and streaming rules."""
        stream = obj.get("stream") is True
        tokens = self._prompt_tokens(route, obj)
        text = _cache_text(route, obj) if self.prefill_policy.uses_text else None
        retries = 0 if self.cfg.disable_retries else max(0, self.cfg.retry_max_retries)
        last: _Retry | None = None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1))
            now = time.monotonic()
            info = RequestInfo(f"{self._rng.getrandbits(63):x}", tokens, text=text)
            try:
                w = self._pick(self.colocated, self.prefill_policy, info, now, "worker")
            except (UnavailableError, ResourceExhaustedError) as exc:
                last = _Retry(503, str(exc))
                break
            c = w.pool.idle_connection()
            if c is None:
                try:
                    c = await w.pool.connect()
                except UnavailableError as exc:
                    w.breaker.record(False, time.monotonic())
                    last = _Retry(502, str(exc))
                    continue
            ex = c.start(
                build_request("POST", w.pool.host_header, route, req.body, "application/json")
            )
            state.legs = [ex]
            self.prefill_policy.on_dispatch(info, w.load, now)
            self._track_leg(w, self.prefill_policy, info, ex, None)
            try:
                head = await ex.head
                ctype = head.headers.get("content-type", "application/json")
                if not stream or head.status >= 400:
                    await ex.done
                    if head.status in RETRYABLE_STATUS:
                        last = _Retry(head.status, "worker error", ex.body(), ctype)
                        continue
                    conn.respond(req, head.status, ex.body(), ctype)
                    return head.status
            except UnavailableError as exc:
                last = _Retry(502, str(exc))
                continue
            state.started = True
            fw = _StreamForwarder(conn, c, ex, conn.stream_head(req, head.status, ctype), None)
            ex.set_sink(fw.piece, fw.flush)
            try:
                await ex.done
            except UnavailableError:
                conn.close_after = True
                if conn.transport is not None:
                    conn.transport.abort()
                return 502
            fw.flush()
            return head.status
        assert last is not None
        conn.respond(
            req,
            last.status,
            last.body or _error_body(str(last), last.status),
            last.ctype or "application/json",
        )
        return last.status

    # -- control plane ---------------------------------------------------------------------------
    async def _health(self, req: Request, conn: ClientConnection) -> None:
        conn.respond(req, 200, b"OK", "text/plain")

    async def _readiness(self, req: Request, conn: ClientConnection) -> None:
        now = time.monotonic()
        if self.cfg.pd_disaggregation:
            ready = any(w.usable(now) for w in self.prefill) and any(
                w.usable(now) for w in self.decode
            )
        else:
            ready = any(w.usable(now) for w in self.colocated)
        if ready and not self.draining:
            conn.respond(req, 200, _json_encode({"status": "ready"}))
        else:
            conn.respond(req, 503, _json_encode({"status": "not ready", "draining": self.draining}))

    async def _fetch(
        self, w: Worker, method: str, path: str, body: bytes = b"", timeout: float | None = None
    ) -> tuple[ResponseHead, bytes]:
        data = build_request(
            method, w.pool.host_header, path, body, "application/json" if body else None
        )
        return await w.pool.fetch(data, timeout or self.cfg.health_check_timeout_secs)

    async def _health_generate(self, req: Request, conn: ClientConnection) -> None:
        now = time.monotonic()
        info = RequestInfo("health", 1)
        try:
            if self.cfg.pd_disaggregation:
                targets = [
                    self._pick(self.prefill, self.prefill_policy, info, now, "prefill"),
                    self._pick(self.decode, self.decode_policy, info, now, "decode"),
                ]
            else:
                targets = [self._pick(self.colocated, self.prefill_policy, info, now, "worker")]
        except (UnavailableError, ResourceExhaustedError) as exc:
            conn.respond(req, 503, _error_body(str(exc), 503))
            return
        results = await asyncio.gather(
            *(self._fetch(w, "GET", "/health_generate", timeout=30.0) for w in targets),
            return_exceptions=True,
        )
        bad = [
            f"{w.url}: {r if isinstance(r, BaseException) else r[0].status}"
            for w, r in zip(targets, results, strict=True)
            if isinstance(r, BaseException) or r[0].status != 200
        ]
        if bad:
            conn.respond(req, 503, _error_body("health_generate failed: " + "; ".join(bad), 503))
        else:
            conn.respond(req, 200, b"OK", "text/plain")

    async def _proxy_first(self, req: Request, conn: ClientConnection) -> None:
        now = time.monotonic()
        group = self.prefill if self.cfg.pd_disaggregation else self.colocated
        usable = [w for w in group if w.usable(now)]
        if not usable:
            conn.respond(req, 503, _error_body("no worker available", 503))
            return
        try:
            head, body = await self._fetch(usable[0], "GET", req.target)
        except UnavailableError as exc:
            conn.respond(req, 502, _error_body(str(exc), 502))
            return
        conn.respond(req, head.status, body, head.headers.get("content-type", "application/json"))

    async def _list_workers(self, req: Request, conn: ClientConnection) -> None:
        workers = [w.describe() for w in self._all()]
        conn.respond(req, 200, _json_encode({"workers": workers, "total": len(workers)}))

    def _worker_args(self, req: Request) -> dict[str, Any]:
        args: dict[str, Any] = {k: v[-1] for k, v in parse_qs(req.query).items()}
        if req.body:
            try:
                body = _json_decode(req.body)
            except msgspec.DecodeError as exc:
                raise InvalidArgumentError(f"body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise InvalidArgumentError("body must be a JSON object")
            args.update(body)
        if req.path.startswith("/workers/"):
            args["url"] = unquote(req.path[len("/workers/") :])
        return args

    async def _add_worker(self, req: Request, conn: ClientConnection) -> None:
        try:
            args = self._worker_args(req)
            url = args.get("url")
            if not isinstance(url, str):
                raise InvalidArgumentError("missing worker 'url'")
            role = str(
                args.get("worker_type")
                or args.get("role")
                or ("prefill" if self.cfg.pd_disaggregation else "colocated")
            )
            if role == "regular":
                role = "colocated"
            if role not in ("prefill", "decode", "colocated"):
                raise InvalidArgumentError(f"worker_type must be prefill or decode, got {role!r}")
            if self.cfg.pd_disaggregation == (role == "colocated"):
                raise InvalidArgumentError(f"a {role} worker does not fit this router's mode")
            bp = args.get("bootstrap_port")
            if bp in ("", "none", "None"):
                bp = None
            spec = WorkerSpec(normalize_url(url), role, int(bp) if bp is not None else None)
            w = self._add(spec)
        except AlreadyExistsError as exc:
            conn.respond(req, 409, _error_body(str(exc), 409))
            return
        except (InvalidArgumentError, ValueError, TypeError) as exc:
            conn.respond(req, 400, _error_body(str(exc), 400))
            return
        conn.respond(req, 200, _json_encode({"status": "added", "worker": w.describe()}))

    async def _remove_worker(self, req: Request, conn: ClientConnection) -> None:
        try:
            args = self._worker_args(req)
            url = args.get("url")
            if not isinstance(url, str):
                raise InvalidArgumentError("missing worker 'url'")
            role = args.get("worker_type") or args.get("role")
            removed = self.remove_worker(url, role)
        except NotFoundError as exc:
            conn.respond(req, 404, _error_body(str(exc), 404))
            return
        except (InvalidArgumentError, ValueError) as exc:
            conn.respond(req, 400, _error_body(str(exc), 400))
            return
        conn.respond(
            req, 200, _json_encode({"status": "removed", "workers": [w.url for w in removed]})
        )

    async def _get_loads(self, req: Request, conn: ClientConnection) -> None:
        workers = self._all()
        results = await asyncio.gather(
            *(self._fetch(w, "GET", "/get_load") for w in workers), return_exceptions=True
        )
        out = []
        for w, r in zip(workers, results, strict=True):
            entry: dict[str, Any] = {
                "worker": w.url,
                "worker_type": w.role,
                "router_active_requests": w.load.active_requests,
                "router_inflight_prefill_tokens": w.load.inflight_prefill_tokens,
            }
            if isinstance(r, BaseException):
                entry["error"] = str(r)
            else:
                try:
                    entry["load"] = _json_decode(r[1]) if r[0].status == 200 else None
                except msgspec.DecodeError:
                    entry["load"] = None
            out.append(entry)
        conn.respond(req, 200, _json_encode({"workers": out}))

    async def _flush_cache(self, req: Request, conn: ClientConnection) -> None:
        workers = self._all()
        results = await asyncio.gather(
            *(self._fetch(w, "POST", "/flush_cache") for w in workers), return_exceptions=True
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
        conn.respond(req, 200 if not failed else 502, _json_encode(body))

    async def _metrics(self, req: Request, conn: ClientConnection) -> None:
        conn.respond(req, 200, self.metrics.render().encode(), "text/plain; version=0.0.4")

    async def _health_loop(self) -> None:
        interval = self.cfg.health_check_interval_secs
        path = self.cfg.health_check_endpoint
        while True:
            workers = self._all()
            results = await asyncio.gather(
                *(self._fetch(w, "GET", path) for w in workers), return_exceptions=True
            )
            for w, r in zip(workers, results, strict=True):
                ok = not isinstance(r, BaseException) and r[0].status == 200
                before = w.health.healthy
                if w.health.record(ok) != before:
                    log.warning("worker %s is now %s", w.url, "healthy" if ok else "unhealthy")
            await asyncio.sleep(interval)

    async def _load_loop(self) -> None:
        interval = self.cfg.load_monitor_interval
        while True:
            await asyncio.sleep(interval)
            workers = [w for w in self._all() if w.health.healthy]
            results = await asyncio.gather(
                *(self._fetch(w, "GET", "/get_load") for w in workers), return_exceptions=True
            )
            now = time.monotonic()
            for w, r in zip(workers, results, strict=True):
                if isinstance(r, BaseException) or r[0].status != 200:
                    continue
                try:
                    tokens, waiting = _parse_load(_json_decode(r[1]))
                except (msgspec.DecodeError, TypeError, ValueError):
                    continue
                if w.role == "decode":
                    # a decode worker's token load is its KV in use: headroom for the policy
                    if "kv_capacity_probed" not in w.load.extra:
                        w.load.extra["kv_capacity_probed"] = True
                        await self._probe_kv_capacity(w)
                    record_poll(
                        w.load, now, tokens, queued_requests=waiting, kv_used_tokens=int(tokens)
                    )
                else:
                    record_poll(w.load, now, tokens, queued_requests=waiting)

    async def _probe_kv_capacity(self, w: Worker) -> None:
        """Learn ``max_total_num_tokens`` from the worker's ``/get_server_info`` (once)."""
        try:
            head, body = await self._fetch(w, "GET", "/get_server_info")
            info = _json_decode(body) if head.status == 200 else None
        except (UnavailableError, msgspec.DecodeError):
            return
        cap = _find_kv_capacity(info)
        if cap:
            w.load.kv_capacity_tokens = cap


class _Final(Exception):
    """A non-retryable upstream answer that goes to the client as is."""

    def __init__(self, status: int, body: bytes, ctype: str) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.ctype = ctype


class _NoWorker(_Retry):
    """No usable worker for one of the legs: 503 at once."""


class _StreamForwarder:
    """Forwards upstream body pieces to the client as HTTP chunks, one write per upstream read
    (the response head and the last chunk ride along when they can); backpressure both ways."""

    __slots__ = ("conn", "upstream", "transform", "buf", "ex", "ended")

    def __init__(
        self,
        conn: ClientConnection,
        upstream: UpstreamConnection,
        ex: Exchange,
        head: bytes,
        transform: Callable[[bytes], bytes] | None,
    ) -> None:
        self.conn = conn
        self.upstream = upstream
        self.ex = ex
        self.transform = transform
        self.buf: list[bytes] = [head]
        self.ended = False

    def piece(self, data: bytes) -> None:
        if self.transform is not None:
            data = self.transform(data)
        if data:
            self.buf.append(chunk(data))

    def flush(self) -> None:
        if self.ex.completed and not self.ended:
            self.ended = True
            self.buf.append(LAST_CHUNK)
        if not self.buf:
            return
        conn = self.conn
        if conn.lost or conn.transport is None:
            self.buf.clear()
            return
        data = self.buf[0] if len(self.buf) == 1 else b"".join(self.buf)
        self.buf.clear()
        conn.transport.write(data)
        if conn.paused and self.upstream.transport is not None and not self.ended:
            self.upstream.transport.pause_reading()
            conn.on_resume.append(_resume(self.upstream))


def _resume(upstream: UpstreamConnection) -> Callable[[], None]:
    def cb() -> None:
        if upstream.transport is not None and not upstream.closed:
            upstream.transport.resume_reading()

    return cb


# -- request inspection (pure) -------------------------------------------------------------------
def _validate(route: str, obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "request body must be a JSON object"
    if route == GENERATE:
        text, ids = obj.get("text"), obj.get("input_ids")
        if text is None and ids is None and obj.get("input_embeds") is None:
            return "/generate needs 'text' or 'input_ids'"
        if text is not None and not isinstance(text, (str, list)):
            return "'text' must be a string or a list of strings"
        if ids is not None and not isinstance(ids, list):
            return "'input_ids' must be a list"
        sp = obj.get("sampling_params")
        if sp is not None and not isinstance(sp, dict):
            return "'sampling_params' must be an object"
    elif route == CHAT:
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "/v1/chat/completions needs a non-empty 'messages' list"
        if not all(isinstance(m, dict) for m in msgs):
            return "'messages' must hold objects"
    elif route == COMPLETIONS:
        prompt = obj.get("prompt")
        if not isinstance(prompt, (str, list)):
            return "/v1/completions needs 'prompt' (a string or a list)"
    if "stream" in obj and not isinstance(obj["stream"], bool):
        return "'stream' must be a boolean"
    return None


def _count_ids(ids: list) -> int:
    if ids and isinstance(ids[0], list):
        return sum(len(x) for x in ids)
    return len(ids)


def _chat_text(messages: Any) -> str:
    parts = []
    for m in messages or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                c.get("text", "")
                for c in content
                if isinstance(c, dict) and isinstance(c.get("text"), str)
            )
    return "".join(parts)


def _cache_text(route: str, obj: dict) -> str:
    """The text SGLang's cache_aware matches: ``text`` / the first prompt / the first message."""
    if route == GENERATE:
        t = obj.get("text")
        if isinstance(t, list):
            t = t[0] if t and isinstance(t[0], str) else ""
        return t if isinstance(t, str) else ""
    if route == COMPLETIONS:
        p = obj.get("prompt")
        if isinstance(p, list):
            p = p[0] if p and isinstance(p[0], str) else ""
        return p if isinstance(p, str) else ""
    msgs = obj.get("messages") or []
    return _chat_text(msgs[:1])


def _batch_size(route: str, obj: dict) -> int:
    if route == GENERATE:
        t, ids = obj.get("text"), obj.get("input_ids")
        if isinstance(t, list):
            return len(t)
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            return len(ids)
        return 1
    if route == COMPLETIONS:
        p = obj.get("prompt")
        if isinstance(p, list) and p and (isinstance(p[0], str) or isinstance(p[0], list)):
            return len(p)
        return 1
    n = obj.get("n")
    return n if isinstance(n, int) and n > 1 else 1


def _max_new_tokens(obj: dict) -> int:
    sp = obj.get("sampling_params")
    v = (
        sp.get("max_new_tokens")
        if isinstance(sp, dict)
        else obj.get("max_tokens", obj.get("max_completion_tokens"))
    )
    return v if isinstance(v, int) else 0


def _parse_load(data: Any) -> tuple[float, int]:
    """SGLang ``/get_load``: a dict or a list of per-DP-rank dicts with ``num_tokens`` and
    ``num_waiting_reqs``; returns (tokens, waiting requests) summed over ranks."""
    entries = data if isinstance(data, list) else [data]
    tokens = 0.0
    waiting = 0
    for e in entries:
        if isinstance(e, dict):
            tokens += float(e.get("num_tokens", 0) or 0)
            waiting += int(e.get("num_waiting_reqs", 0) or 0)
    return tokens, waiting


def _head_status(ex: Exchange) -> int | None:
    """The status of the exchange's response head, if one arrived (and was not cancelled)."""
    fut = ex.head
    if not ex.got_head or not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    return fut.result().status


def _find_kv_capacity(info: Any) -> int:
    """``max_total_num_tokens`` from SGLang server info (top level or ``internal_states``)."""
    if not isinstance(info, dict):
        return 0
    v = info.get("max_total_num_tokens")
    states = info.get("internal_states")
    if v is None and isinstance(states, list) and states and isinstance(states[0], dict):
        v = states[0].get("max_total_num_tokens")
    return int(v) if isinstance(v, (int, float)) and v > 0 else 0


def _input_logprobs_of(item: Any) -> Any:
    if isinstance(item, dict):
        meta = item.get("meta_info")
        if isinstance(meta, dict):
            return meta.get("input_token_logprobs")
    return None


def _merge_logprobs(prefill_body: bytes, decode_body: bytes) -> bytes:
    """Prepend the prefill's ``input_token_logprobs`` to the decode's (non-streaming)."""
    try:
        p = _json_decode(prefill_body)
        d = _json_decode(decode_body)
    except msgspec.DecodeError:
        return decode_body
    if isinstance(p, list) and isinstance(d, list):
        pairs = list(zip(p, d, strict=False))
    else:
        pairs = [(p, d)]
    changed = False
    for pi, di in pairs:
        pl = _input_logprobs_of(pi)
        if isinstance(pl, list) and isinstance(di, dict) and isinstance(di.get("meta_info"), dict):
            dl = di["meta_info"].get("input_token_logprobs") or []
            di["meta_info"]["input_token_logprobs"] = pl + (dl if isinstance(dl, list) else [])
            changed = True
    return _json_encode(d) if changed else decode_body


def _prefill_input_logprobs(body: bytes) -> list | None:
    """The ``input_token_logprobs`` of a prefill answer, plain JSON or an SSE stream."""
    text = body.strip()
    candidates = []
    if text.startswith(b"data:") or b"\ndata:" in text:
        for line in text.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                candidates.append(line[5:].strip())
    else:
        candidates.append(text)
    for c in reversed(candidates):
        try:
            lp = _input_logprobs_of(_json_decode(c))
        except msgspec.DecodeError:
            continue
        if isinstance(lp, list):
            return lp
    return None


class _StreamLogprobMerger:
    """Rewrites SSE ``data:`` events of a decode stream so that their ``input_token_logprobs``
    start with the prefill's; passes everything else through byte for byte."""

    def __init__(self, prefill_lp: list | None) -> None:
        self.prefill_lp = prefill_lp
        self.buf = b""

    def feed(self, piece: bytes) -> bytes:
        if not self.prefill_lp:
            return piece
        self.buf += piece
        out = []
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                break
            event, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
            out.append(self._rewrite(event))
        return b"".join(out)

    def _rewrite(self, event: bytes) -> bytes:
        body = event.strip()
        if not body.startswith(b"data:") or body[5:].strip() == b"[DONE]":
            return event
        try:
            obj = _json_decode(body[5:].strip())
        except msgspec.DecodeError:
            return event
        lp = _input_logprobs_of(obj)
        if not isinstance(lp, list):
            return event
        obj["meta_info"]["input_token_logprobs"] = (self.prefill_lp or []) + lp
        return b"data: " + _json_encode(obj) + b"\n\n"


def _load_tokenizer(path: str) -> Callable[[str], int]:
    try:
        from tokenizers import Tokenizer  # type: ignore[import-not-found]
    except ImportError:
        raise InvalidArgumentError("--tokenizer-path needs the `tokenizers` package") from None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exception
        raise InvalidArgumentError(f"cannot load tokenizer {path!r}: {exc}") from None
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


__all__ = ["Router", "Worker", "BanaserveError"]

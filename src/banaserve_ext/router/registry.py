# SPDX-License-Identifier: Apache-2.0
"""The workers a router knows: registration, removal by draining, lookup by id or URL, and the
description ``/workers`` answers with (smg 1.13's worker entry, plus our own counters).

A worker is *active* (a routing candidate for its role) or *draining*: removal takes it out of
every candidate list at once, lets the requests already on it finish, and forgets it when its
last leg has ended. So a controller can take a worker out of rotation, wait until
``GET /workers/<id>`` answers 404 (or pass ``wait_s`` to the ``DELETE``), and register the same
URL again, in the same or in another role, while nothing of the old registration is left.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from ..errors import AlreadyExistsError, InvalidArgumentError
from ..policies import PolicyBase, WorkerLoad
from .breaker import CircuitBreaker, HealthTracker
from .config import RouterConfig, WorkerSpec, normalize_url, split_url
from .upstream import UpstreamPool

ROLES = ("prefill", "decode", "colocated")
#: smg's ``worker_type`` of each of our roles
SMG_TYPE = {"prefill": "prefill", "decode": "decode", "colocated": "regular"}
_FROM_SMG_TYPE = {"prefill": "prefill", "decode": "decode", "regular": "colocated"}
DEFAULT_PRIORITY = 50
DEFAULT_COST = 1.0


class Worker:
    """One registered worker: its policy view (``load``), breaker, health, connection pool and
    registration metadata. ``load.active_requests`` is the number of legs in flight on it."""

    __slots__ = (
        "id",
        "spec",
        "url",
        "role",
        "host",
        "port",
        "load",
        "breaker",
        "health",
        "pool",
        "labels",
        "model_id",
        "priority",
        "cost",
        "draining",
        "drained",
    )

    def __init__(
        self,
        spec: WorkerSpec,
        cfg: RouterConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        labels: Mapping[str, str] | None = None,
        model_id: str | None = None,
        priority: int = DEFAULT_PRIORITY,
        cost: float = DEFAULT_COST,
    ) -> None:
        self.id = str(uuid.uuid4())
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
        self.labels = dict(labels or {})
        self.model_id = model_id
        self.priority = priority
        self.cost = cost
        self.draining = False
        #: set once a draining worker has no leg left and has left the registry
        self.drained = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """Legs (requests) dispatched to this worker and not finished."""
        return self.load.active_requests

    def usable(self, now_s: float) -> bool:
        return not self.draining and self.health.healthy and self.breaker.allows(now_s)

    @property
    def status(self) -> str:
        """smg's lifecycle status: ``ready``, ``not_ready`` (failing health checks) or
        ``draining`` (removed, requests still in flight)."""
        if self.draining:
            return "draining"
        return "ready" if self.health.healthy else "not_ready"

    def describe(self) -> dict[str, Any]:
        """smg 1.13's worker entry (``id``, ``model_id``, ``url``, ``worker_type``,
        ``is_healthy``, ``status``, ``load``, ``labels``, ...) plus our counters."""
        ld = self.load
        entry: dict[str, Any] = {
            "id": self.id,
            "model_id": self.model_id,
            "url": self.url,
            "worker_type": SMG_TYPE[self.role],
            "connection_mode": "http",
            "runtime_type": "sglang",
            "is_healthy": self.health.healthy,
            "status": self.status,
            "load": ld.active_requests,
            "labels": dict(self.labels),
            "priority": self.priority,
            "cost": self.cost,
            "bootstrap_port": self.spec.bootstrap_port,
            "http2": False,
            # ours
            "role": self.role,
            "circuit_breaker": self.breaker.state,
            "active_requests": ld.active_requests,
            "inflight_prefill_tokens": ld.inflight_prefill_tokens,
            "processed_requests": ld.processed_requests,
            "polled_load": ld.polled_load,
        }
        if self.role == "decode" and ld.kv_capacity_tokens:
            entry["kv_used_tokens"] = ld.kv_used_tokens
            entry["kv_capacity_tokens"] = ld.kv_capacity_tokens
        return entry


class WorkerRegistry:
    """Workers by id, and the active ones by role (the candidate lists the request path picks
    from). ``policies`` maps each role to the policy that routes it (told when a URL leaves)."""

    def __init__(self, cfg: RouterConfig, policies: Mapping[str, PolicyBase]) -> None:
        self.cfg = cfg
        self.policies = policies
        self.active: dict[str, list[Worker]] = {r: [] for r in ROLES}
        self.by_id: dict[str, Worker] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def all(self) -> list[Worker]:
        """Every registered worker, draining ones included, in registration order."""
        return list(self.by_id.values())

    def add(self, spec: WorkerSpec, **meta: Any) -> Worker:
        """Register ``spec`` as an active worker. A URL may be active once per role; a draining
        registration of the same URL does not count."""
        assert self.loop is not None, "the router is not started"
        if spec.role not in ROLES:
            raise InvalidArgumentError(f"unknown worker role {spec.role!r}")
        if any(w.url == spec.url for w in self.active[spec.role]):
            raise AlreadyExistsError(f"{spec.role} worker {spec.url} is already registered")
        w = Worker(spec, self.cfg, self.loop, **meta)
        self.by_id[w.id] = w
        self.active[spec.role].append(w)
        return w

    def drain(self, w: Worker) -> None:
        """Take ``w`` out of rotation now; it leaves the registry when its last leg ends."""
        if w.draining:
            return
        w.draining = True
        self.active[w.role].remove(w)
        self.policies[w.role].on_worker_removed(w.url)
        w.pool.close()  # idle connections now; busy ones close when their exchange ends
        self.settle(w)

    def settle(self, w: Worker) -> None:
        """Called whenever a leg on ``w`` ends: a drained worker with nothing in flight goes."""
        if w.draining and w.load.active_requests == 0 and self.by_id.get(w.id) is w:
            del self.by_id[w.id]
            w.drained.set()

    def find(self, key: str, role: str | None = None) -> list[Worker]:
        """Workers named by ``key``: an id, or a worker URL (percent-encoded or not). For a URL,
        the active registrations (of ``role`` if given), else the draining ones."""
        w = self.by_id.get(key)
        if w is not None:
            return [w] if role is None or w.role == role else []
        try:
            url = normalize_url(unquote(key))
        except InvalidArgumentError:
            return []
        matches = [w for w in self.by_id.values() if w.url == url]
        if role is not None:
            matches = [w for w in matches if w.role == role]
        active = [w for w in matches if not w.draining]
        return active or matches

    def close(self) -> None:
        for w in self.by_id.values():
            w.pool.close()


def parse_role(value: Any, pd_mode: bool) -> str:
    """Our role from smg's ``worker_type`` (``regular``/``prefill``/``decode``) or our own name
    (``colocated``); absent: ``prefill`` in PD mode, ``colocated`` otherwise."""
    if value is None or value == "":
        return "prefill" if pd_mode else "colocated"
    if not isinstance(value, str):
        raise InvalidArgumentError(f"worker_type must be a string, got {value!r}")
    name = value.strip().lower()
    role = _FROM_SMG_TYPE.get(name, name)
    if role not in ROLES:
        raise InvalidArgumentError(f"worker_type must be prefill, decode or regular, got {value!r}")
    if pd_mode == (role == "colocated"):
        mode = "PD" if pd_mode else "single-worker"
        raise InvalidArgumentError(f"a {SMG_TYPE[role]} worker does not fit a {mode} router")
    return role


def parse_worker_body(args: Mapping[str, Any], pd_mode: bool) -> tuple[WorkerSpec, dict]:
    """A registration from smg's ``POST /workers`` body (``url``, ``worker_type``,
    ``bootstrap_port``, ``labels``, ``model_id`` or ``models``, ``priority``, ``cost``,
    ``connection_mode``, ...) or sglang-router's query string (``url``, ``worker_type``,
    ``bootstrap_port``). Returns the spec and the metadata for :meth:`WorkerRegistry.add`.
    Fields smg accepts that do not apply here (``api_key``, ``health``, ``runtime``...) are
    ignored, as smg ignores what it does not know."""
    url = args.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidArgumentError("missing worker 'url'")
    role = parse_role(args.get("worker_type", args.get("role")), pd_mode)
    mode = args.get("connection_mode")
    if mode is not None and str(mode).lower() != "http":
        raise InvalidArgumentError(f"connection_mode {mode!r}: this router speaks HTTP only")
    bp = args.get("bootstrap_port")
    if bp in ("", "none", "None"):
        bp = None
    if bp is not None:
        try:
            bp = int(bp)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"bootstrap_port must be a port, got {bp!r}") from None
        if not 0 < bp < 65536:
            raise InvalidArgumentError(f"bootstrap_port out of range: {bp}")
    labels = args.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidArgumentError("labels must be an object of string values")
    model_id = args.get("model_id")
    models = args.get("models")
    if model_id is None and isinstance(models, list) and models:
        first = models[0]
        model_id = first.get("id") if isinstance(first, dict) else None
    if model_id is not None and not isinstance(model_id, str):
        raise InvalidArgumentError(f"model_id must be a string, got {model_id!r}")
    priority = _number(args, "priority", DEFAULT_PRIORITY, int)
    cost = _number(args, "cost", DEFAULT_COST, float)
    if priority < 0 or cost <= 0:
        raise InvalidArgumentError(f"need priority >= 0 and cost > 0, got {priority}, {cost}")
    spec = WorkerSpec(normalize_url(url), role, bp)
    return spec, dict(labels=labels, model_id=model_id, priority=priority, cost=cost)


def _number(args: Mapping[str, Any], name: str, default: Any, kind: type) -> Any:
    v = args.get(name)
    if v is None:
        return default
    if isinstance(v, bool):
        raise InvalidArgumentError(f"{name} must be a number, got {v!r}")
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number, got {v!r}") from None

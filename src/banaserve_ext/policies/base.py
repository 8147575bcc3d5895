# SPDX-License-Identifier: Apache-2.0
"""The interface every routing policy implements, and the load accounting they share.

One implementation, two runtimes: the HTTP router feeds a policy with its live view of the
workers, the simulator with simulated instances. A policy never does I/O, never sleeps and never
reads a clock of its own; whatever time it needs comes in through ``now_s`` arguments, so the
simulator can drive it in simulated time. Randomness comes from a ``random.Random`` seeded at
construction, so a simulation is reproducible.

Protocol between a runtime and a policy, per leg (one request on one worker):

1. ``idx = policy.select(request, candidates, now_s)`` — ``candidates`` are the usable workers
   of one role (healthy, breaker closed), never empty. A policy that finds no acceptable worker
   raises :class:`~banaserve_ext.errors.ResourceExhaustedError` with the reason (→ HTTP 503).
2. ``policy.on_dispatch(request, worker, now_s)`` right before the leg is sent. The base class
   records the leg in ``worker``: ``active_requests`` +1 and, on prefill/colocated workers,
   ``inflight_prefill_tokens`` += ``request.prompt_tokens``.
3. ``policy.on_prefill_done(request, worker, now_s)`` when the prompt has been processed (the
   prefill leg answered, or the first token of a colocated request arrived): the prompt tokens
   leave ``inflight_prefill_tokens``. Optional: ``on_complete`` implies it.
4. ``policy.on_complete(request, worker, now_s)`` when the leg ends, successfully or not.

Accounting is keyed by ``request.rid`` and idempotent (a second ``on_complete`` for the same rid
is a no-op), so the counters cannot drift from double or missing callbacks on one path. Runtimes
must not change the counters themselves; they report polled engine loads with
:func:`record_poll`, which policies use only to correct drift (load the router does not see).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: roles whose workers run prefill (and therefore count prompt tokens in flight)
PREFILL_ROLES = frozenset({"prefill", "colocated"})


@dataclass
class RequestInfo:
    """What a policy may know about one request when it is routed."""

    #: unique per in-flight leg (a retry that may land on the same worker needs a new rid)
    rid: str
    prompt_tokens: int
    #: prefix-chained block hashes of the prompt (Mooncake traces, HiCache keys); () if unknown
    block_hashes: Sequence[int] = ()
    #: prompt text, for policies that match prefixes on text (SGLang's cache_aware); None if unknown
    text: str | None = None
    max_new_tokens: int = 0


@dataclass
class WorkerLoad:
    """A worker as a policy sees it. The runtime owns these objects; the counters below are
    maintained by the policy callbacks (see the module docstring), the polled fields by
    :func:`record_poll`."""

    url: str
    role: str  # "prefill" | "decode" | "colocated"
    healthy: bool = True
    #: legs dispatched and not yet finished on this worker (the runtime's own count)
    active_requests: int = 0
    #: prompt tokens dispatched and whose prefill has not completed (the runtime's own count)
    inflight_prefill_tokens: int = 0
    #: KV cache tokens in use / capacity, when known (decode headroom); 0 capacity = unknown
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    #: requests waiting in the engine's queue, when known (polled)
    queued_requests: int = 0
    #: last load polled from the worker itself (tokens), and when (only used to correct drift)
    polled_load: float | None = None
    polled_at_s: float | None = None
    #: ``inflight_prefill_tokens`` at the moment of the last poll (what the poll already includes)
    inflight_at_poll: int = 0
    #: relative speed (1.0 = nominal); load-aware policies divide load by it
    speed: float = 1.0
    #: legs processed so far (tie-break information, metrics)
    processed_requests: int = 0
    extra: dict = field(default_factory=dict)
    #: rid -> [prompt tokens still counted, dispatch time]; the ledger behind the counters
    ledger: dict[str, list] = field(default_factory=dict, repr=False)


def account_dispatch(worker: WorkerLoad, request: RequestInfo, now_s: float) -> None:
    """Record one leg of ``request`` on ``worker`` (idempotent per rid)."""
    if request.rid in worker.ledger:
        return
    tokens = max(0, int(request.prompt_tokens)) if worker.role in PREFILL_ROLES else 0
    worker.ledger[request.rid] = [tokens, now_s]
    worker.active_requests += 1
    worker.inflight_prefill_tokens += tokens


def account_prefill_done(worker: WorkerLoad, request: RequestInfo) -> None:
    """The prompt of ``request`` has been processed on ``worker``: its tokens leave the count."""
    entry = worker.ledger.get(request.rid)
    if entry is None or entry[0] == 0:
        return
    worker.inflight_prefill_tokens = max(0, worker.inflight_prefill_tokens - entry[0])
    entry[0] = 0


def account_complete(worker: WorkerLoad, request: RequestInfo) -> None:
    """The leg of ``request`` on ``worker`` ended (idempotent per rid)."""
    entry = worker.ledger.pop(request.rid, None)
    if entry is None:
        return
    worker.inflight_prefill_tokens = max(0, worker.inflight_prefill_tokens - entry[0])
    worker.active_requests = max(0, worker.active_requests - 1)
    worker.processed_requests += 1


def expire_legs(worker: WorkerLoad, older_than_s: float) -> int:
    """Forget legs dispatched before ``older_than_s`` (a runtime that lost their completion,
    e.g. a worker removed mid-request). Returns how many were dropped."""
    stale = [rid for rid, (_, t) in worker.ledger.items() if t < older_than_s]
    for rid in stale:
        tokens, _ = worker.ledger.pop(rid)
        worker.inflight_prefill_tokens = max(0, worker.inflight_prefill_tokens - tokens)
        worker.active_requests = max(0, worker.active_requests - 1)
    return len(stale)


def record_poll(
    worker: WorkerLoad,
    now_s: float,
    load_tokens: float | None = None,
    *,
    queued_requests: int | None = None,
    kv_used_tokens: int | None = None,
    kv_capacity_tokens: int | None = None,
) -> None:
    """Store what the worker itself reported at ``now_s``. ``load_tokens`` is the engine's own
    token load (SGLang ``/get_load`` ``num_tokens``)."""
    if load_tokens is not None:
        worker.polled_load = float(load_tokens)
        worker.polled_at_s = now_s
        worker.inflight_at_poll = worker.inflight_prefill_tokens
    if queued_requests is not None:
        worker.queued_requests = int(queued_requests)
    if kv_used_tokens is not None:
        worker.kv_used_tokens = int(kv_used_tokens)
    if kv_capacity_tokens is not None:
        worker.kv_capacity_tokens = int(kv_capacity_tokens)


class RoutingPolicy(Protocol):
    """Chooses one worker among candidates. Implementations keep any state they need
    (prefix trees, round-robin cursors) and learn outcomes through the ``on_*`` callbacks."""

    name: str

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        """Index into ``workers`` of the chosen worker. ``workers`` holds only candidates the
        runtime considers usable (healthy, breaker closed); it is never empty."""
        ...

    def on_dispatch(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        """The request was sent to ``worker``."""
        ...

    def on_prefill_done(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        """The request's prompt has been processed on ``worker``."""
        ...

    def on_complete(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        """The request's leg on ``worker`` finished (successfully or not)."""
        ...

    def on_worker_removed(self, url: str) -> None:
        """``url`` left the fleet: forget any state about it."""
        ...


class PolicyBase:
    """Shared plumbing: seeded RNG, the accounting callbacks, random tie-break helpers."""

    name = "base"
    #: whether ``select`` reads ``request.text`` / ``block_hashes`` (runtimes skip extracting
    #: them otherwise)
    uses_text = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        raise NotImplementedError

    def on_dispatch(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        account_dispatch(worker, request, now_s)

    def on_prefill_done(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        account_prefill_done(worker, request)

    def on_complete(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        account_complete(worker, request)

    def on_worker_removed(self, url: str) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def argmin_random_ties(keys: Sequence[float], rng: random.Random) -> int:
    """Index of the smallest key; ties are broken uniformly at random (reservoir sampling)."""
    best = 0
    best_key = keys[0]
    ties = 1
    for i in range(1, len(keys)):
        k = keys[i]
        if k < best_key:
            best, best_key, ties = i, k, 1
        elif k == best_key:
            ties += 1
            if rng.random() * ties < 1.0:
                best = i
    return best


def argmin_first(keys: Sequence[float]) -> int:
    """Index of the smallest key; ties go to the lowest index (SGLang's ``min_by_key``)."""
    best = 0
    for i in range(1, len(keys)):
        if keys[i] < keys[best]:
            best = i
    return best

# SPDX-License-Identifier: Apache-2.0
"""The interface every routing policy implements.

One implementation, two runtimes: the router feeds a policy with its live view of the workers,
the simulator with simulated instances. A policy never does I/O, never sleeps and never reads a
clock of its own; whatever time it needs comes in through ``now_s`` arguments, so the simulator
can drive it in simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class RequestInfo:
    """What a policy may know about one request when it is routed."""

    rid: str
    prompt_tokens: int
    #: prefix-chained block hashes of the prompt (Mooncake traces, HiCache keys); () if unknown
    block_hashes: Sequence[int] = ()
    #: prompt text, for policies that match prefixes on text (SGLang's cache_aware); None if unknown
    text: str | None = None
    max_new_tokens: int = 0


@dataclass
class WorkerLoad:
    """A worker as a policy sees it. The runtime owns these objects and updates them."""

    url: str
    role: str  # "prefill" | "decode" | "colocated"
    healthy: bool = True
    #: requests dispatched and not yet finished on this worker (the runtime's own count)
    active_requests: int = 0
    #: prompt tokens dispatched and whose prefill has not completed (the runtime's own count)
    inflight_prefill_tokens: int = 0
    #: KV cache tokens in use / capacity, when known (decode headroom)
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    #: last load polled from the worker itself, and when (only used to correct drift)
    polled_load: float | None = None
    polled_at_s: float | None = None
    extra: dict = field(default_factory=dict)


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

    def on_complete(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        """The request's leg on ``worker`` finished (successfully or not)."""
        ...

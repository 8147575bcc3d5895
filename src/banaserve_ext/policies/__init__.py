# SPDX-License-Identifier: Apache-2.0
"""Routing policies: plain objects behind one interface (:mod:`.base`), run unchanged by the
HTTP router (:mod:`banaserve_ext.router`) and by the cluster simulator (:mod:`banaserve_ext.sim`).

>>> from banaserve_ext.policies import make_policy, RequestInfo, WorkerLoad
>>> p = make_policy("load_aware", seed=0)
>>> ws = [WorkerLoad("http://a", "prefill"), WorkerLoad("http://b", "prefill")]
>>> r = RequestInfo("r1", prompt_tokens=100)
>>> i = p.select(r, ws, now_s=0.0); p.on_dispatch(r, ws[i], 0.0)
>>> ws[i].inflight_prefill_tokens
100
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError
from .base import (
    PolicyBase,
    RequestInfo,
    RoutingPolicy,
    WorkerLoad,
    account_complete,
    account_dispatch,
    account_prefill_done,
    expire_legs,
    record_poll,
)
from .cache_aware import CacheAwarePolicy
from .load_aware import LoadAwarePolicy
from .simple import PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy

POLICIES: dict[str, type[PolicyBase]] = {
    cls.name: cls
    for cls in (LoadAwarePolicy, CacheAwarePolicy, RoundRobinPolicy, RandomPolicy, PowerOfTwoPolicy)
}


def make_policy(name: str, seed: int | None = None, **options: Any) -> PolicyBase:
    """A new policy object by name (``load_aware``, ``cache_aware``, ``round_robin``, ``random``,
    ``power_of_two``); ``options`` go to its constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
    try:
        return cls(seed, **options)
    except TypeError as exc:
        raise InvalidArgumentError(f"bad options for policy {name!r}: {exc}") from None


__all__ = [
    "POLICIES",
    "CacheAwarePolicy",
    "LoadAwarePolicy",
    "PolicyBase",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RequestInfo",
    "RoundRobinPolicy",
    "RoutingPolicy",
    "WorkerLoad",
    "account_complete",
    "account_dispatch",
    "account_prefill_done",
    "expire_legs",
    "make_policy",
    "record_poll",
]

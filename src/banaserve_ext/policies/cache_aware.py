# SPDX-License-Identifier: Apache-2.0
"""``cache_aware``: SGLang router's cache-aware policy, as a baseline (semantics of smg 1.x,
where each PD side has its own tree; sglang-router 0.3.2 falls back to random in PD mode).

Per pick, with load = the runtime's in-flight legs per worker:

* the fleet is *imbalanced* when ``max − min > balance_abs_threshold`` and
  ``max > balance_rel_threshold × min``: the least loaded worker wins;
* otherwise the request's prefix is matched against the tree: if ``matched / length >
  cache_threshold`` the worker holding the match wins, else the least loaded worker;
* in both cases the request's key is inserted into the tree under the chosen worker.

Min-load ties go to the first worker, as in SGLang (``tie_break="first"``); pass
``tie_break="random"`` to break them at random. The key is the request text when known, else its
block hashes (what the simulator has). Every ``eviction_interval_s`` the tree is trimmed to
``max_tree_size`` elements per worker, least recently used first.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidArgumentError
from .base import PolicyBase, RequestInfo, WorkerLoad, argmin_first, argmin_random_ties
from .prefix_tree import PrefixTree


class CacheAwarePolicy(PolicyBase):
    name = "cache_aware"
    uses_text = True

    def __init__(
        self,
        seed: int | None = None,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 60.0,
        max_tree_size: int = 1 << 26,
        tie_break: str = "first",
    ) -> None:
        super().__init__(seed)
        if tie_break not in ("first", "random"):
            raise InvalidArgumentError(f"tie_break must be 'first' or 'random', got {tie_break!r}")
        if not 0.0 <= cache_threshold <= 1.0:
            raise InvalidArgumentError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        self.cache_threshold = float(cache_threshold)
        self.balance_abs_threshold = int(balance_abs_threshold)
        self.balance_rel_threshold = float(balance_rel_threshold)
        self.eviction_interval_s = float(eviction_interval_s)
        self.max_tree_size = int(max_tree_size)
        self.tie_break = tie_break
        self.tree = PrefixTree()
        self._last_eviction_s: float | None = None

    @staticmethod
    def request_key(request: RequestInfo) -> Sequence:
        if request.text is not None:
            return request.text
        return tuple(request.block_hashes)

    def _min_load(self, loads: list[int]) -> int:
        if self.tie_break == "first":
            return argmin_first(loads)
        return argmin_random_ties(loads, self._rng)

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        if self._last_eviction_s is None:
            self._last_eviction_s = now_s
        elif now_s - self._last_eviction_s >= self.eviction_interval_s:
            self.tree.evict(self.max_tree_size)
            self._last_eviction_s = now_s
        key = self.request_key(request)
        loads = [w.active_requests for w in workers]
        lo, hi = min(loads), max(loads)
        imbalanced = (hi - lo) > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo
        choice = -1
        if not imbalanced and len(key) > 0:
            urls = {w.url for w in workers}
            matched, tenant = self.tree.prefix_match(key, urls)
            if tenant is not None and matched / len(key) > self.cache_threshold:
                for i, w in enumerate(workers):
                    if w.url == tenant:
                        choice = i
                        break
        if choice < 0:
            choice = self._min_load(loads)
        self.tree.insert(key, workers[choice].url, now_s)
        return choice

    def on_worker_removed(self, url: str) -> None:
        self.tree.remove_tenant(url)

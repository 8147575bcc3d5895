# SPDX-License-Identifier: Apache-2.0
"""``global_cache_aware``: Mooncake Conductor's routing over a global KV store.

For every candidate prefill worker it predicts the time to first token as

    queue(w) + prefill(prompt - reuse(w), reuse(w)) + fetch(w)

where ``reuse(w)`` is the longer of the worker's own cached prefix and the best prefix anywhere
in the pool (the store can ship it), and ``fetch(w)`` is the time to move the blocks the worker
lacks (``base + bytes / bandwidth``). It picks the minimum. The policy learns which blocks each
worker holds from its own dispatches (prefix-chained block hashes, as in Mooncake's traces), and
forgets least recently used blocks beyond ``capacity_blocks`` per worker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..errors import InvalidArgumentError
from .base import PolicyBase, RequestInfo, WorkerLoad, argmin_random_ties


def _linear_prefill(tokens: int, prefix: int) -> float:
    return 1e-4 * tokens


class GlobalCacheAwarePolicy(PolicyBase):
    name = "global_cache_aware"

    def __init__(
        self,
        seed: int | None = None,
        *,
        prefill_s: Callable[[int, int], float] | None = None,
        block_tokens: int = 512,
        kv_bytes_per_token: int = 0,
        transfer_Bps: float = 25e9,
        transfer_base_s: float = 0.0005,
        capacity_blocks: int = 1 << 20,
    ) -> None:
        super().__init__(seed)
        if block_tokens < 1 or capacity_blocks < 1 or transfer_Bps <= 0:
            raise InvalidArgumentError("block_tokens, capacity_blocks, transfer_Bps must be > 0")
        self.prefill_s = prefill_s or _linear_prefill
        self.block_tokens = int(block_tokens)
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.transfer_Bps = float(transfer_Bps)
        self.transfer_base_s = float(transfer_base_s)
        self.capacity_blocks = int(capacity_blocks)
        self._held: dict[str, OrderedDict[int, None]] = {}

    @staticmethod
    def _match(blocks: OrderedDict[int, None] | None, hashes: Sequence[int]) -> int:
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def estimate_ttft(self, request: RequestInfo, worker: WorkerLoad, best_blocks: int) -> float:
        hashes = request.block_hashes
        local = self._match(self._held.get(worker.url), hashes)
        reuse_blocks = max(local, best_blocks)
        reuse = min(reuse_blocks * self.block_tokens, max(0, request.prompt_tokens - 1))
        inflight = worker.inflight_prefill_tokens
        queue = self.prefill_s(inflight, 0) if inflight else 0.0
        t = queue + self.prefill_s(request.prompt_tokens - reuse, reuse)
        if reuse_blocks > local and self.kv_bytes_per_token:
            fetched = (reuse_blocks - local) * self.block_tokens * self.kv_bytes_per_token
            t += self.transfer_base_s + fetched / self.transfer_Bps
        return t / (worker.speed if worker.speed > 0 else 1.0)

    def select(self, request: RequestInfo, workers: Sequence[WorkerLoad], now_s: float) -> int:
        hashes = request.block_hashes
        best = max((self._match(self._held.get(w.url), hashes) for w in workers), default=0)
        keys = [self.estimate_ttft(request, w, best) for w in workers]
        return argmin_random_ties(keys, self._rng)

    def on_dispatch(self, request: RequestInfo, worker: WorkerLoad, now_s: float) -> None:
        super().on_dispatch(request, worker, now_s)
        held = self._held.setdefault(worker.url, OrderedDict())
        for h in request.block_hashes:
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)

    def on_worker_removed(self, url: str) -> None:
        self._held.pop(url, None)

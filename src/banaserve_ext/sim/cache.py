# SPDX-License-Identifier: Apache-2.0
"""Prefix caches keyed by the traces' prefix-chained block hashes (512-token blocks)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ..errors import InvalidArgumentError


class PrefixCache:
    """An LRU set of block hashes. Because each hash covers its whole prefix, a request reuses
    the longest run of *leading* hashes present (Mooncake's semantics)."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise InvalidArgumentError(f"cache capacity must be >= 0 blocks, got {capacity_blocks}")
        self.capacity_blocks = int(capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.lookups = 0
        self.hit_blocks = 0
        self.query_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int], record: bool = False) -> int:
        """Leading blocks of ``hashes`` present (touches them as recently used)."""
        n = 0
        blocks = self._blocks
        for h in hashes:
            if h not in blocks:
                break
            blocks.move_to_end(h)
            n += 1
        if record:
            self.lookups += 1
            self.hit_blocks += n
            self.query_blocks += len(hashes)
        return n

    def peek(self, hashes: Sequence[int]) -> int:
        """Like :meth:`match` without touching recency (for routing estimates)."""
        n = 0
        blocks = self._blocks
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        if self.capacity_blocks == 0:
            return
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.query_blocks if self.query_blocks else 0.0

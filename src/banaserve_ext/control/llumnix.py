# SPDX-License-Identifier: Apache-2.0
"""Llumnix-style request migration (baseline), as a plain object: when the KV "freeness" of
instances drifts apart, move running decodes from the fullest to the emptiest instance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .banaserve import InstanceView


@dataclass(frozen=True)
class Migration:
    src: int
    dst: int
    requests: int
    reason: str = ""


@dataclass
class LlumnixMigrator:
    gap: float = 0.2  # KV fraction difference that triggers migration
    per_tick: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.gap < 1 or self.per_tick < 1:
            raise InvalidArgumentError("gap in (0, 1) and per_tick >= 1 required")

    def plan(self, views: Sequence[InstanceView]) -> list[Migration]:
        live = [v for v in views if v.accepting and v.role in ("colocated", "decode")]
        if len(live) < 2:
            return []
        src = max(live, key=lambda v: (v.kv_frac, v.util))
        dst = min(live, key=lambda v: (v.kv_frac, v.util))
        if src.kv_frac - dst.kv_frac <= self.gap:
            return []
        why = (
            f"KV use {src.kv_frac:.2f} on {src.idx} vs {dst.kv_frac:.2f} on {dst.idx} "
            f"(gap > {self.gap})"
        )
        return [Migration(src.idx, dst.idx, self.per_tick, why)]

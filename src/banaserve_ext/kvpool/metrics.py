# SPDX-License-Identifier: Apache-2.0
"""Pool statistics as Prometheus text exposition (format 0.0.4)."""

from __future__ import annotations

from collections.abc import Mapping

# stat key -> (metric type, help)
_METRICS: dict[str, tuple[str, str]] = {
    "num_pages": ("gauge", "pages the pool can hold"),
    "page_size": ("gauge", "bytes per page"),
    "segment_bytes": ("gauge", "bytes of the shared-memory segment"),
    "overhead_bytes": ("gauge", "segment bytes that are not page data (index, slots, clients)"),
    "committed_pages": ("gauge", "pages readable by key"),
    "reserved_pages": ("gauge", "pages being written (two-phase put in progress)"),
    "pinned_pages": ("gauge", "page pins held by readers copying out"),
    "free_pages": ("gauge", "pages on the free list"),
    "clients": ("gauge", "attached client processes"),
    "hits": ("counter", "get lookups that found the key"),
    "misses": ("counter", "get lookups that missed"),
    "exists_hits": ("counter", "exists lookups that found the key"),
    "exists_misses": ("counter", "exists lookups that missed"),
    "puts": ("counter", "pages written and committed"),
    "put_exists": ("counter", "puts of keys already stored"),
    "put_no_space": ("counter", "puts refused: no free or evictable page"),
    "evictions": ("counter", "pages evicted by CLOCK at the high watermark"),
    "removals": ("counter", "pages removed explicitly"),
    "reaped_clients": ("counter", "dead client processes whose pins/reservations were reclaimed"),
    "lock_recoveries": ("counter", "times the pool lock was recovered from a dead holder"),
}


def prometheus_text(
    stats: Mapping[str, int | bool], pool: str, prefix: str = "banaserve_kvpool"
) -> str:
    """Renders ``KVPool.stats()`` with a ``pool`` label."""
    label = pool.replace("\\", "\\\\").replace('"', '\\"')
    lines: list[str] = []
    for key, (kind, help_text) in _METRICS.items():
        if key not in stats:
            continue
        name = f"{prefix}_{key}" + ("_total" if kind == "counter" else "")
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{pool="{label}"}} {int(stats[key])}')
    return "\n".join(lines) + "\n"

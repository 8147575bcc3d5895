# SPDX-License-Identifier: Apache-2.0
"""A multi-tenant radix tree over sequences (text, or tuples of block hashes).

Every node stores the tenants (worker URLs) that hold its whole path, with the time each last
used it. Inserting a key for a tenant marks every node on its path; a prefix match returns how
many leading elements are in the tree and the most recently active tenant holding all of them.
Eviction drops a tenant's least recently used leaves until its size is under a bound. Pure: time
comes in as arguments.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


class _Node:
    __slots__ = ("key", "children", "tenants", "parent")

    def __init__(self, key: Sequence, parent: _Node | None) -> None:
        self.key = key
        self.children: dict = {}
        self.tenants: dict[str, float] = {}
        self.parent = parent


def _common_prefix(edge: Sequence, key: Sequence, start: int) -> int:
    """Length of the common prefix of ``edge`` and ``key[start:]``."""
    n = len(edge)
    if isinstance(key, str):
        if key.startswith(edge, start):  # type: ignore[arg-type]
            return n
    elif tuple(key[start : start + n]) == tuple(edge):
        return n
    limit = min(n, len(key) - start)
    lo, hi = 0, limit  # binary search on slice equality: O(log n) slice compares in C
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[start : start + mid] == edge[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    def __init__(self) -> None:
        self.root = _Node(key="", parent=None)
        #: tenant -> number of elements of the tree it holds
        self.sizes: dict[str, int] = {}

    def insert(self, key: Sequence, tenant: str, now_s: float) -> None:
        node = self.root
        node.tenants[tenant] = now_s
        self.sizes.setdefault(tenant, 0)
        i = 0
        n = len(key)
        while i < n:
            first = key[i]
            child = node.children.get(first)
            if child is None:
                leaf = _Node(key[i:], node)
                leaf.tenants[tenant] = now_s
                node.children[first] = leaf
                self.sizes[tenant] += n - i
                return
            common = _common_prefix(child.key, key, i)
            if common < len(child.key):
                mid = _Node(child.key[:common], node)
                mid.tenants = dict(child.tenants)
                child.key = child.key[common:]
                child.parent = mid
                mid.children[child.key[0]] = child
                node.children[first] = mid
                child = mid
            if tenant not in child.tenants:
                self.sizes[tenant] += len(child.key)
            child.tenants[tenant] = now_s
            node = child
            i += common

    def prefix_match(
        self, key: Sequence, allowed: set[str] | None = None
    ) -> tuple[int, str | None]:
        """(matched elements, tenant) for the longest prefix of ``key`` held by some tenant in
        ``allowed`` (every tenant if None); the most recently active such tenant wins."""
        node = self.root
        best_len, best_node = 0, None
        i = 0
        n = len(key)
        while i < n:
            child = node.children.get(key[i])
            if child is None:
                break
            common = _common_prefix(child.key, key, i)
            if allowed is not None and not any(t in allowed for t in child.tenants):
                break
            i += common
            node = child
            best_len, best_node = i, child
            if common < len(child.key):
                break
        if best_node is None:
            return 0, None
        tenants = best_node.tenants
        if allowed is not None:
            tenants = {t: ts for t, ts in tenants.items() if t in allowed}
        tenant = max(tenants, key=tenants.__getitem__)
        return best_len, tenant

    def _tenant_leaves(self, tenant: str) -> list[tuple[float, int, _Node]]:
        out: list[tuple[float, int, _Node]] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if tenant not in node.tenants:
                continue
            held = [c for c in node.children.values() if tenant in c.tenants]
            if held:
                stack.extend(held)
            else:
                out.append((node.tenants[tenant], id(node), node))
        return out

    def _drop(self, node: _Node, tenant: str) -> None:
        del node.tenants[tenant]
        self.sizes[tenant] -= len(node.key)
        if not node.tenants and not node.children and node.parent is not None:
            parent = node.parent
            parent.children.pop(node.key[0], None)

    def evict(self, max_size: int) -> None:
        """Drop each tenant's least recently used leaves until it holds at most ``max_size``."""
        for tenant, size in list(self.sizes.items()):
            if size <= max_size:
                continue
            heap = self._tenant_leaves(tenant)
            heapq.heapify(heap)
            while heap and self.sizes[tenant] > max_size:
                _, _, node = heapq.heappop(heap)
                parent = node.parent
                self._drop(node, tenant)
                if (
                    parent is not None
                    and parent is not self.root
                    and tenant in parent.tenants
                    and not any(tenant in c.tenants for c in parent.children.values())
                ):
                    heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))

    def remove_tenant(self, tenant: str) -> None:
        stack = [self.root]
        order: list[_Node] = []
        while stack:
            node = stack.pop()
            if tenant in node.tenants:
                order.append(node)
                stack.extend(node.children.values())
        for node in reversed(order):  # children before parents
            node.tenants.pop(tenant, None)
            if not node.tenants and not node.children and node.parent is not None:
                node.parent.children.pop(node.key[0], None)
        self.sizes.pop(tenant, None)

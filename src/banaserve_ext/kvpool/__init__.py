# SPDX-License-Identifier: Apache-2.0
"""Global KV cache store: a shared-memory page pool every process on a host attaches to by name.

``KVPool`` is the handle (``batch_exists``, ``batch_get``, ``batch_set``); ``banaserve pool serve``
creates and owns a pool and exports its statistics; with ``--listen`` it also serves other hosts,
which use ``RemoteKVPool`` over the transfer engine's TCP path. Both are a ``KVStore`` (the
same methods and results).
"""

from __future__ import annotations

from .memory import Span, page_addresses, parse_size, span_of
from .metrics import prometheus_text
from .pool import KVPool, PutResult
from .remote import RemoteKVPool
from .server import PoolServer
from .store import KVStore

__all__ = [
    "KVPool",
    "KVStore",
    "PoolServer",
    "PutResult",
    "RemoteKVPool",
    "Span",
    "page_addresses",
    "parse_size",
    "prometheus_text",
    "span_of",
]

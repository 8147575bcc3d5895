# SPDX-License-Identifier: Apache-2.0
"""SGLang HiCache L3 storage backend over the shared-memory KV pool (:mod:`banaserve_ext.kvpool`).

Every SGLang instance on the host attaches to one pool (served by ``banaserve pool serve``), so a
prefix any instance computed and backed up is a storage hit on every other. Load it with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "banaserve",
        "module_path": "banaserve_ext.adapters.sglang.hicache",
        "class_name": "BanaserveHiCacheStorage", "pool": "NAME", "interface_v1": 1}'

``interface_v1: 1`` selects the zero-copy path (``batch_get_v1``/``batch_set_v1``): pages move
between the pool and SGLang's host KV buffer with one copy each, the piece addresses computed
with numpy from the buffer's geometry (``layer_first``: one piece per layer and K/V half;
``page_first``/``page_first_direct``/``page_head``: one piece per half). Without it SGLang uses
``batch_get``/``batch_set`` on flat page tensors. A pool page holds one SGLang page in SGLang's
flat page order, so both interfaces read each other's pages. Keys get a namespace suffix with
the model, layout and, for MHA, the TP rank (TP ranks hold different heads and never share pages;
MLA ranks hold the same latent cache and only the storage writer rank writes).

A prefill instance on another host uses ``"pool_address": "HOST:PORT"`` (the ``--listen`` address
of ``banaserve pool serve``) instead of, or with, ``"pool"``: the backend then holds a
:class:`~banaserve_ext.kvpool.RemoteKVPool` (same calls; pages over the transfer engine's TCP path,
SGLang's host KV buffer registered once).

Importing this module imports neither torch nor sglang: the class that subclasses SGLang's
``HiCacheStorage`` is built on first access to :data:`CLASS_NAME`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InvalidArgumentError, NotSupportedError
from ...kvpool import KVPool, PutResult, RemoteKVPool

logger = logging.getLogger(__name__)

CLASS_NAME = "BanaserveHiCacheStorage"

_PAGE_FIRST_LAYOUTS = ("page_first", "page_first_direct", "page_head")
_LAYOUT_CODES = {"layer_first": "lf", "page_first": "pf", "page_first_direct": "pfd",
                 "page_head": "ph"}  # fmt: skip


@dataclass(frozen=True)
class HostGeometry:
    """Where SGLang's host KV buffer keeps each token of each layer.

    ``halves`` is 2 for MHA (K then V, ``v_offset`` bytes apart) and 1 for MLA; ``token_bytes``
    is one token of one layer of one half.
    """

    layout: str
    base: int
    halves: int
    layer_num: int
    size: int
    page_size: int
    token_bytes: int

    @property
    def half_bytes(self) -> int:
        return self.layer_num * self.size * self.token_bytes

    @property
    def page_bytes(self) -> int:
        return self.halves * self.layer_num * self.page_size * self.token_bytes


def piece_table(geo: HostGeometry, page_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Piece addresses of each page starting at host token index ``page_starts[i]``.

    The pieces of one page, concatenated, give SGLang's flat data page of that layout
    (``HostKVCache.get_data_page(flat=True)``). Returns ``(table (n, S) uint64, lens (S,))``.
    """
    starts = np.asarray(page_starts, dtype=np.uint64).reshape(-1, 1)
    t = np.uint64(geo.token_bytes)
    if geo.layout == "layer_first":
        half = np.arange(geo.halves, dtype=np.uint64).reshape(-1, 1) * np.uint64(geo.half_bytes)
        layer = np.arange(geo.layer_num, dtype=np.uint64).reshape(1, -1) * np.uint64(
            geo.size * geo.token_bytes
        )
        offsets = (half + layer).reshape(1, -1)  # (halves * layers): K layers, then V layers
        table = np.uint64(geo.base) + starts * t + offsets
        piece = geo.page_size * geo.token_bytes
    elif geo.layout in _PAGE_FIRST_LAYOUTS:
        offsets = (np.arange(geo.halves, dtype=np.uint64) * np.uint64(geo.half_bytes)).reshape(
            1, -1
        )
        table = np.uint64(geo.base) + starts * np.uint64(geo.layer_num) * t + offsets
        piece = geo.page_size * geo.layer_num * geo.token_bytes
    else:
        raise NotSupportedError(f"HiCache host layout {geo.layout!r} is not supported")
    lens = np.full(table.shape[1], piece, dtype=np.uint64)
    return np.ascontiguousarray(table), lens


def geometry_of(host: Any) -> HostGeometry:
    """Reads the geometry of an SGLang ``HostKVCache`` (MHA or MLA host pool)."""
    layout = str(getattr(host, "layout", ""))
    if layout not in _LAYOUT_CODES:
        raise NotSupportedError(f"HiCache host layout {layout!r} is not supported")
    buf = getattr(host, "kv_buffer", None)
    if buf is None:
        raise NotSupportedError(f"{type(host).__name__} has no single kv_buffer")
    halves = 1 if "MLA" in type(host).__name__ else 2
    layer_num, size = int(host.layer_num), int(host.size)
    nbytes = int(buf.numel()) * int(buf.element_size())
    if nbytes % (halves * layer_num * size) != 0:
        raise NotSupportedError(
            f"{type(host).__name__}: buffer of {nbytes} bytes does not split into "
            f"{halves} x {layer_num} layers x {size} tokens"
        )
    return HostGeometry(
        layout=layout,
        base=int(buf.data_ptr()),
        halves=halves,
        layer_num=layer_num,
        size=size,
        page_size=int(host.page_size),
        token_bytes=nbytes // (halves * layer_num * size),
    )


def key_suffix(config: Any, geo: HostGeometry) -> str:
    """Namespace of this rank's pages: model, layout, halves and (MHA) TP/PP/CP position."""
    model = str(getattr(config, "model_name", "") or "")
    parts = [hashlib.sha1(model.encode()).hexdigest()[:8], _LAYOUT_CODES[geo.layout],
             f"h{geo.halves}"]  # fmt: skip
    if not getattr(config, "is_mla_model", False):
        parts.append(f"tp{config.tp_rank}of{config.tp_size}")
    if int(getattr(config, "pp_size", 1) or 1) > 1:
        parts.append(f"pp{config.pp_rank}of{config.pp_size}")
    if int(getattr(config, "attn_cp_size", 1) or 1) > 1:
        parts.append(f"cp{config.attn_cp_rank}of{config.attn_cp_size}")
    return "@" + ".".join(parts)


class PoolStorageCore:
    """The backend's logic, independent of SGLang's base class (so it is testable with a fake
    host pool). :func:`_build_class` mixes it into ``HiCacheStorage``."""

    def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        pool = extra.get("pool")
        address = extra.get("pool_address")
        if not pool and not address:
            raise InvalidArgumentError(
                'banaserve HiCache backend: extra config needs "pool": the name given to '
                '`banaserve pool serve --name`, or "pool_address": the HOST:PORT of its --listen'
            )
        self.storage_config = storage_config
        self.pool_name = str(pool or "")
        #: set: the pool is served by another host (``banaserve pool serve --listen``)
        self.pool_address = str(address) if address else None
        self.is_writer = bool(
            getattr(storage_config, "is_storage_writer",
                    not getattr(storage_config, "is_mla_model", False)
                    or getattr(storage_config, "tp_rank", 0) == 0)
        )  # fmt: skip
        self._pool: KVPool | RemoteKVPool | None = None
        self._geo: HostGeometry | None = None
        self._suffix: str | None = None
        self.mem_pool_host: Any = None

    # -- setup ---------------------------------------------------------------------------------
    def pool(self) -> KVPool | RemoteKVPool:
        if self._pool is None:
            if self.pool_address:
                self._pool = RemoteKVPool(self.pool_address, pool=self.pool_name).start()
            else:
                self._pool = KVPool(self.pool_name).start()
        return self._pool

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host
        geo = geometry_of(mem_pool_host)
        pool = self.pool()
        if pool.page_size != geo.page_bytes:
            raise InvalidArgumentError(
                f"pool {self.pool_name!r} holds pages of {pool.page_size} bytes but one HiCache "
                f"page of this model is {geo.page_bytes} bytes; serve a pool with "
                f"`banaserve pool serve --name {self.pool_name} --page-size {geo.page_bytes}`"
            )
        self._check_against_sglang(mem_pool_host, geo)
        if isinstance(pool, RemoteKVPool):
            self._register_host_buffer(pool, mem_pool_host)
        self._geo = geo
        self._suffix = key_suffix(self.storage_config, geo)
        logger.info("banaserve HiCache backend: pool %r, layout %s, page %d bytes, suffix %s",
                    self.pool_name, geo.layout, geo.page_bytes, self._suffix)  # fmt: skip

    @staticmethod
    def _register_host_buffer(pool: RemoteKVPool, host: Any) -> None:
        """Keeps the host KV buffer registered with the remote client's engine (otherwise each
        call registers the range it touches)."""
        buf = getattr(host, "kv_buffer", None)
        if buf is None or not hasattr(buf, "data_ptr"):
            return
        pool.register(int(buf.data_ptr()), int(buf.numel()) * int(buf.element_size()))

    @staticmethod
    def _check_against_sglang(host: Any, geo: HostGeometry) -> None:
        """Our vectorised addresses must name the same memory as SGLang's own (slow) helper."""
        meta = getattr(host, "get_page_buffer_meta", None)
        if meta is None or geo.size < 2 * geo.page_size:
            return
        import torch

        starts = [0, (geo.size // geo.page_size - 1) * geo.page_size]
        idx = torch.cat([torch.arange(s, s + geo.page_size) for s in starts])
        try:
            ptrs, sizes = meta(idx)
        except (ValueError, AssertionError, NotImplementedError):
            return
        table, lens = piece_table(geo, np.array(starts))
        ours = sorted(zip(table.reshape(-1).tolist(), np.tile(lens, len(starts)).tolist(),
                          strict=True))  # fmt: skip
        theirs = sorted(zip((int(p) for p in ptrs), (int(s) for s in sizes), strict=True))
        if ours != theirs:
            raise NotSupportedError(
                f"{type(host).__name__} ({geo.layout}) does not have the expected buffer geometry"
            )

    def _ready(self) -> tuple[KVPool | RemoteKVPool, HostGeometry, str]:
        if self._geo is None or self._suffix is None:
            raise InvalidArgumentError("register_mem_pool_host() was not called")
        return self.pool(), self._geo, self._suffix

    # -- lookups -------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        pool, _, suffix = self._ready()
        return pool.batch_exists(keys, suffix=suffix)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- zero-copy (interface_v1) --------------------------------------------------------------
    def _starts(self, host_indices: Any, n_keys: int, geo: HostGeometry) -> np.ndarray:
        idx = host_indices.numpy() if hasattr(host_indices, "numpy") else np.asarray(host_indices)
        if idx.size != n_keys * geo.page_size:
            raise InvalidArgumentError(
                f"{idx.size} host indices for {n_keys} pages of {geo.page_size} tokens"
            )
        return idx[:: geo.page_size]

    def batch_get_v1(
        self, keys: list[str], host_indices: Any, extra_info: Any = None
    ) -> list[bool]:
        pool, geo, suffix = self._ready()
        table, lens = piece_table(geo, self._starts(host_indices, len(keys), geo))
        found = pool.batch_get(keys, addrs=table, seg_lens=lens, suffix=suffix)
        return found.tolist()

    def batch_set_v1(
        self, keys: list[str], host_indices: Any, extra_info: Any = None
    ) -> list[bool]:
        pool, geo, suffix = self._ready()
        if not self.is_writer:
            return [True] * len(keys)
        table, lens = piece_table(geo, self._starts(host_indices, len(keys), geo))
        res = pool.batch_set(keys, addrs=table, seg_lens=lens, suffix=suffix, raise_on_full=False)
        return (res != PutResult.NO_SPACE).tolist()

    # -- flat pages (SGLang's default interface) -----------------------------------------------
    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[Any]:  # fmt: skip
        pool, geo, suffix = self._ready()
        if target_locations is None:
            raise InvalidArgumentError("batch_get needs target tensors (one flat page per key)")
        addrs = self._flat_addresses(target_locations, geo, writable=True)
        found = pool.batch_get(keys, addrs=addrs, suffix=suffix)
        return [t if ok else None for t, ok in zip(target_locations, found.tolist(), strict=True)]

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:  # fmt: skip
        pool, geo, suffix = self._ready()
        if not self.is_writer:
            return True
        if values is None:
            raise InvalidArgumentError("batch_set needs values (one flat page per key)")
        values = [v.contiguous() for v in values]
        addrs = self._flat_addresses(values, geo, writable=False)
        res = pool.batch_set(keys, addrs=addrs, suffix=suffix, raise_on_full=False)
        return bool((res != PutResult.NO_SPACE).all())

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        return self.batch_get([key], [target_location])[0]

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:  # fmt: skip
        return self.batch_set([key], [value])

    @staticmethod
    def _flat_addresses(tensors: Any, geo: HostGeometry, *, writable: bool) -> np.ndarray:
        addrs = np.empty(len(tensors), dtype=np.uint64)
        for i, t in enumerate(tensors):
            nbytes = int(t.numel()) * int(t.element_size())
            if nbytes != geo.page_bytes or not t.is_contiguous() or t.device.type != "cpu":
                raise InvalidArgumentError(
                    f"page tensor {i}: {nbytes} bytes on {t.device}, contiguous="
                    f"{t.is_contiguous()}; expected a contiguous CPU page of {geo.page_bytes} bytes"
                )
            addrs[i] = t.data_ptr()
        return addrs

    # -- misc ----------------------------------------------------------------------------------
    def clear(self) -> None:
        """No-op: the pool is shared by every instance; remove pages with the pool CLI."""

    def get_stats(self) -> None:
        return None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def _build_class() -> type:
    from .host import ns

    HiCacheStorage = ns("hicache").HiCacheStorage  # noqa: N806

    class BanaserveHiCacheStorage(PoolStorageCore, HiCacheStorage):  # type: ignore[misc]
        """HiCache storage backend over a banaserve shared-memory KV pool."""

        def __init__(self, storage_config: Any, kwargs: dict[str, Any] | None = None) -> None:
            PoolStorageCore.__init__(self, storage_config, kwargs)

    BanaserveHiCacheStorage.__module__ = __name__
    return BanaserveHiCacheStorage


def __getattr__(name: str) -> Any:
    if name == CLASS_NAME:
        cls = _build_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# SPDX-License-Identifier: Apache-2.0
"""The Python façade of the shared-memory KV pool (``cpp/kvpool``).

Every process on a host attaches to a pool by name and moves pages with one copy between its
own memory and the shared segment; there is no server on the data path. Calls take whole
batches, release the GIL in the core, and raise the typed errors of :mod:`banaserve_ext.errors`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from .memory import caller_pieces
from .store import Keys, KVStore

T = TypeVar("T")


class PutResult(enum.IntEnum):
    """Outcome of a put, per key (the values of the core's ``PutResult``)."""

    STORED = 0  #: written and committed by this call
    EXISTS = 1  #: already committed; left untouched
    IN_FLIGHT = 2  #: another live writer holds the reservation and will commit it
    NO_SPACE = 3  #: no free or evictable page (everything pinned or reserved)


def _core() -> Any:
    from .. import _core as core

    return core


def raise_if_no_space(results: np.ndarray, where: str) -> None:
    """``ResourceExhaustedError`` when a put left keys ``NO_SPACE`` (the others were stored)."""
    full = int(np.count_nonzero(results == PutResult.NO_SPACE))
    if full:
        raise ResourceExhaustedError(
            f"{where}: no space for {full} of {len(results)} pages "
            "(every page is pinned or reserved); the others were stored"
        )


class KVPool(KVStore):
    """Handle on one named pool of this host (a :class:`~.store.KVStore`).

    The constructor only stores the configuration; :meth:`start` (or ``with``) creates or
    attaches the segment. ``create=True`` makes this handle the owner (the pool service does
    that); the owner's :meth:`close` marks the segment closed and removes its name, after which
    attached clients get :class:`UnavailableError` and, with ``reconnect=True``, attach to the
    next segment of the same name on their next call.
    """

    def __init__(
        self,
        name: str,
        *,
        create: bool = False,
        capacity_bytes: int | None = None,
        page_size: int | None = None,
        max_key_len: int = 128,
        max_clients: int = 64,
        ops_per_client: int = 8,
        high_watermark: float = 0.95,
        low_watermark: float = 0.90,
        populate: bool = True,
        replace: bool = False,
        reconnect: bool = True,
    ) -> None:
        if create and (capacity_bytes is None or page_size is None):
            raise InvalidArgumentError("creating a pool needs capacity_bytes and page_size")
        self.name = name
        self._create = create
        self._capacity_bytes = capacity_bytes
        self._page_size = page_size
        self._max_key_len = max_key_len
        self._max_clients = max_clients
        self._ops_per_client = ops_per_client
        self._high = high_watermark
        self._low = low_watermark
        self._populate = populate
        self._replace = replace
        self._reconnect = reconnect
        self._pool: Any = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> KVPool:
        if self._pool is not None:
            return self
        core = _core()
        if self._create:
            if self._replace:
                try:
                    core.KVPool.unlink(self.name)
                except NotFoundError:
                    pass
            self._pool = core.KVPool.create(
                self.name,
                int(self._capacity_bytes or 0),
                int(self._page_size or 0),
                max_key_len=self._max_key_len,
                max_clients=self._max_clients,
                ops_per_client=self._ops_per_client,
                high_watermark=self._high,
                low_watermark=self._low,
                populate=self._populate,
            )
        else:
            self._pool = core.KVPool.open(self.name)
            if self._page_size is not None and self._pool.page_size != self._page_size:
                actual = self._pool.page_size
                self._pool = None
                raise InvalidArgumentError(
                    f"pool {self.name!r} holds pages of {actual} bytes, not {self._page_size}"
                )
        return self

    def close(self) -> None:
        """Detaches; the owner also closes the segment for everyone and unlinks the name."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._create:
            pool.close_segment()
            try:
                _core().KVPool.unlink(self.name)
            except NotFoundError:
                pass
        del pool

    @classmethod
    def attach(cls, name: str, **kwargs: Any) -> KVPool:
        return cls(name, **kwargs).start()

    @staticmethod
    def unlink(name: str) -> None:
        _core().KVPool.unlink(name)

    # -- properties ----------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return int(self._live().page_size)

    @property
    def num_pages(self) -> int:
        return int(self._live().num_pages)

    @property
    def max_key_len(self) -> int:
        return int(self._live().max_key_len)

    @property
    def segment_id(self) -> int:
        return int(self._live().segment_id)

    @property
    def page_region(self) -> tuple[int, int, int]:
        """``(addr, stride, num_pages)`` of the page data in this process: the page of slot s
        starts at ``addr + s * stride`` (a pool service registers it with a transfer engine)."""
        addr, stride, num_pages = self._live().page_region
        return int(addr), int(stride), int(num_pages)

    # -- memory --------------------------------------------------------------------------------
    def register(self, buf: Any, nbytes: int | None = None) -> None:
        """Nothing to do: pages move with one copy between caller memory and the shared
        segment, which needs no registration."""

    # -- data path (semantics: KVStore) --------------------------------------------------------
    def batch_exists(self, keys: Keys, *, suffix: str = "") -> int:
        """Number of leading keys that are stored (stops at the first miss); ``suffix`` is
        appended to every key in the core."""
        return int(self._call(lambda p: p.exists(keys, suffix)))

    def exists_mask(self, keys: Keys, *, suffix: str = "") -> np.ndarray:
        """A bool per key: stored or not."""
        return self._call(lambda p: p.exists_mask(keys, suffix))

    def batch_get(
        self,
        keys: Keys,
        dst: Any = None,
        *,
        nbytes: int | None = None,
        addrs: Any = None,
        seg_lens: Any = None,
        suffix: str = "",
    ) -> np.ndarray:
        """Copies each stored key's page into caller memory (the forms of :mod:`.store`);
        returns a bool "found" per key."""
        return self._call(
            lambda p: p.get_into(
                keys, *self._io(p, keys, dst, nbytes, addrs, seg_lens, True), suffix
            )
        )

    def batch_set(
        self,
        keys: Keys,
        src: Any = None,
        *,
        nbytes: int | None = None,
        addrs: Any = None,
        seg_lens: Any = None,
        suffix: str = "",
        raise_on_full: bool = True,
    ) -> np.ndarray:
        """Stores each key's page from caller memory; a uint8 :class:`PutResult` per key
        (see :meth:`.KVStore.batch_set`)."""
        results = self._call(
            lambda p: p.put_from(
                keys, *self._io(p, keys, src, nbytes, addrs, seg_lens, False), suffix
            )
        )
        if raise_on_full:
            raise_if_no_space(results, f"pool {self.name!r}")
        return results

    def remove(self, keys: Keys) -> int:
        return int(self._call(lambda p: p.remove(keys)))

    def clear(self) -> int:
        return int(self._call(lambda p: p.clear()))

    def reap(self) -> int:
        """Reclaims pins and reservations of dead processes now (also done lazily)."""
        return int(self._call(lambda p: p.reap()))

    def stats(self) -> dict[str, int | bool]:
        return dict(self._call(lambda p: p.stats()))

    def pin(self, keys: Keys, *, suffix: str = "") -> tuple[int, np.ndarray]:
        """Zero-copy read of up to 256 keys: ``(handle, addrs)`` with addrs[i] the address of
        key i's page in the shared segment (0 when missing). The pages are neither evicted nor
        removed until :meth:`unpin`; a dead process's pins are reclaimed."""
        handle, addrs = self._call(lambda p: p.pin(keys, suffix))
        return int(handle), addrs

    def unpin(self, handle: int) -> None:
        self._call(lambda p: p.unpin(int(handle)))

    # Two-phase put, step by step (tests and custom writers).
    def reserve(self, keys: Keys, *, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
        """``(slots, results)``: slot i is reserved for key i where results[i] is STORED."""
        return self._call(lambda p: p.reserve(keys, suffix))

    def page_address(self, slot: int) -> int:
        return int(self._call(lambda p: p.page_address(int(slot))))

    def commit(self, slots: Any) -> None:
        self._call(lambda p: p.commit(np.asarray(slots, dtype=np.uint32)))

    def abort(self, slots: Any) -> None:
        self._call(lambda p: p.abort(np.asarray(slots, dtype=np.uint32)))

    # -- internals -----------------------------------------------------------------------------
    def _live(self) -> Any:
        if self._pool is None:
            raise UnavailableError(f"pool {self.name!r} is not started (call start())")
        return self._pool

    def _call(self, fn: Callable[[Any], T]) -> T:
        pool = self._live()
        try:
            return fn(pool)
        except UnavailableError:
            if not self._reconnect or self._create:
                raise
            self._reattach(pool)
            return fn(self._pool)

    def _reattach(self, old: Any) -> None:
        old_id = old.segment_id
        try:
            fresh = _core().KVPool.open(self.name)
        except (NotFoundError, UnavailableError) as exc:
            raise UnavailableError(
                f"pool {self.name!r} was closed and no new pool of that name is up yet: {exc}"
            ) from None
        if fresh.segment_id == old_id:
            raise UnavailableError(f"pool {self.name!r} is closed")
        if self._page_size is not None and fresh.page_size != self._page_size:
            raise InvalidArgumentError(
                f"pool {self.name!r} came back with pages of {fresh.page_size} bytes, "
                f"not {self._page_size}"
            )
        self._pool = fresh

    def _io(
        self,
        pool: Any,
        keys: Keys,
        buf: Any,
        nbytes: int | None,
        addrs: Any,
        seg_lens: Any,
        writable: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        flat, lens, keepalive = caller_pieces(
            buf, addrs, seg_lens, nbytes, len(keys), int(pool.page_size), writable=writable
        )
        self._keepalive = keepalive
        return flat, lens

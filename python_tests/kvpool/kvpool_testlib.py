# SPDX-License-Identifier: Apache-2.0
"""Helpers for the kvpool tests: unique pool names, owned pools, the store test bed (the same
pool reached as a local KVPool or through a pool service as a RemoteKVPool), checksummed
pages."""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from banaserve_ext.errors import NotFoundError
from banaserve_ext.kvpool import KVPool, KVStore, PoolServer, RemoteKVPool

#: the KVStore implementations every semantic test runs against
STORE_KINDS = ("local", "remote")


def unique_name(tag: str) -> str:
    return f"pytest-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def owned_pool(tag: str, pages: int, page_size: int, **kwargs: object) -> Iterator[KVPool]:
    name = unique_name(tag)
    pool = KVPool(
        name,
        create=True,
        capacity_bytes=pages * page_size,
        page_size=page_size,
        populate=False,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        with pool:
            yield pool
    finally:
        try:
            KVPool.unlink(name)
        except NotFoundError:
            pass


@dataclass
class StoreBed:
    """A pool reached as a store of one kind. ``owner`` is the handle that created the pool (a
    local KVPool, for what only the owner can do, e.g. pin pages); ``open`` makes another,
    unstarted store handle of the same kind on the same pool."""

    kind: str
    owner: KVPool
    store: KVStore
    open: Callable[..., KVStore]


@contextmanager
def store_bed(
    kind: str, tag: str, pages: int, page_size: int, **pool_kwargs: object
) -> Iterator[StoreBed]:
    """A fresh pool of ``pages`` pages and a started store of ``kind`` on it: ``local`` attaches
    to the shared segment, ``remote`` goes through a pool service on 127.0.0.1 (real sockets,
    the transfer engine's TCP path)."""
    with owned_pool(tag, pages, page_size, **pool_kwargs) as owner:
        if kind == "local":
            with KVPool.attach(owner.name) as store:
                yield StoreBed(kind, owner, store, lambda **kw: KVPool(owner.name, **kw))
        elif kind == "remote":
            with PoolServer(owner) as server, RemoteKVPool(server.address) as store:
                yield StoreBed(kind, owner, store, lambda **kw: RemoteKVPool(server.address, **kw))
        else:
            raise ValueError(f"unknown store kind {kind!r}")


def checksummed_page(key: str, writer: int, page_size: int) -> np.ndarray:
    """Random payload seeded by (key, writer); bytes [0:8) writer id, last 4 bytes CRC32."""
    seed = zlib.crc32(key.encode()) * 1000 + writer
    page = np.random.default_rng(seed).integers(0, 256, page_size, dtype=np.uint8)
    page[:8] = np.frombuffer(np.uint64(writer).tobytes(), np.uint8)
    crc = zlib.crc32(page[:-4].tobytes())
    page[-4:] = np.frombuffer(np.uint32(crc).tobytes(), np.uint8)
    return page


def page_is_intact(page: np.ndarray) -> bool:
    crc = int(np.frombuffer(page[-4:].tobytes(), np.uint32)[0])
    return zlib.crc32(page[:-4].tobytes()) == crc

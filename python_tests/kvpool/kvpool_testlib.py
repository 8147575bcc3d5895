# SPDX-License-Identifier: Apache-2.0
"""Helpers for the kvpool tests: unique pool names, checksummed pages."""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from banaserve_ext.errors import NotFoundError
from banaserve_ext.kvpool import KVPool


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

# SPDX-License-Identifier: Apache-2.0
"""What only the local KVPool has: zero-copy pins into the shared segment, creating and attaching
segments by name, and reattaching after the owner restarts. The store semantics it shares with
RemoteKVPool are tested for both in test_kvpool_store.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from kvpool_testlib import owned_pool, unique_name

from banaserve_ext.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from banaserve_ext.kvpool import KVPool, PutResult

PAGE = 4096


def _pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE), dtype=np.uint8)


def test_pins_read_pages_in_place_and_keep_them() -> None:
    with owned_pool("pinned", 4, PAGE) as pool:
        keys = ["a", "b", "c", "d"]
        src = _pages(4)
        pool.batch_set(keys, src)
        handle, addrs = pool.pin(keys + ["absent"])
        assert (addrs[:4] != 0).all() and addrs[4] == 0
        view = np.ctypeslib.as_array(
            ctypes.cast(int(addrs[2]), ctypes.POINTER(ctypes.c_uint8)), (PAGE,)
        )
        np.testing.assert_array_equal(view, src[2])  # zero-copy read in place
        assert pool.stats()["pinned_pages"] == 4
        assert pool.batch_set(["e"], _pages(1), raise_on_full=False).tolist() == [
            PutResult.NO_SPACE
        ]
        pool.unpin(handle)
        assert pool.stats()["pinned_pages"] == 0
        with pytest.raises(NotFoundError):
            pool.unpin(handle)


def test_create_and_attach_errors() -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        KVPool.attach(unique_name("absent"))
    with pytest.raises(InvalidArgumentError, match="may use only"):
        KVPool.attach("bad/name")
    with pytest.raises(InvalidArgumentError, match="page_size"):
        KVPool("x", create=True, capacity_bytes=4096)
    with owned_pool("dup", 4, PAGE) as pool:
        with pytest.raises(AlreadyExistsError):
            KVPool(pool.name, create=True, capacity_bytes=PAGE, page_size=PAGE).start()


def test_closed_pool_gives_a_clear_error_then_reconnects_to_the_new_one() -> None:
    name = unique_name("restart")
    first = KVPool(name, create=True, capacity_bytes=8 * PAGE, page_size=PAGE, populate=False)
    first.start()
    client = KVPool.attach(name)
    client.batch_set(["a"], _pages(1))
    first.close()  # service stops: segment closed and unlinked
    with pytest.raises(UnavailableError, match="closed"):
        client.batch_exists(["a"])
    second = KVPool(name, create=True, capacity_bytes=8 * PAGE, page_size=PAGE, populate=False)
    with second:
        assert client.batch_exists(["a"]) == 0  # reattached to the new, empty pool
        client.batch_set(["b"], _pages(1))
        assert second.batch_exists(["b"]) == 1
    no_reconnect = KVPool(
        name, create=True, capacity_bytes=8 * PAGE, page_size=PAGE, populate=False
    ).start()
    strict = KVPool(name, reconnect=False).start()
    no_reconnect.close()
    with pytest.raises(UnavailableError):
        strict.batch_exists(["a"])

# SPDX-License-Identifier: Apache-2.0
"""The KVPool façade in one process: round trips through every memory form, typed errors."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from kvpool_testlib import owned_pool, unique_name

from banaserve_ext.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from banaserve_ext.kvpool import KVPool, PutResult, prometheus_text

PAGE = 4096


def _pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE), dtype=np.uint8)


def test_round_trip_numpy_and_leading_exists() -> None:
    with owned_pool("rt", 64, PAGE) as owner:
        client = KVPool.attach(owner.name)
        keys = [f"{i:064x}" for i in range(20)]
        src = _pages(20)
        res = client.batch_set(keys, src)
        assert res.tolist() == [PutResult.STORED] * 20
        assert client.batch_exists(keys) == 20
        assert client.batch_exists(keys[:5] + ["nope"] + keys[5:]) == 5
        assert client.exists_mask(["nope", keys[3]]).tolist() == [False, True]
        dst = np.zeros_like(src)
        found = client.batch_get(keys, dst)
        assert found.all()
        np.testing.assert_array_equal(dst, src)
        # a second set of the same keys leaves the first value
        assert client.batch_set(keys[:2], _pages(2, seed=9)).tolist() == [PutResult.EXISTS] * 2
        dst2 = np.zeros((2, PAGE), np.uint8)
        client.batch_get(keys[:2], dst2)
        np.testing.assert_array_equal(dst2, src[:2])
        stats = client.stats()
        assert stats["committed_pages"] == 20
        assert stats["put_exists"] == 2
        assert stats["overhead_bytes"] < stats["segment_bytes"]


def test_bytes_keys_bytearray_raw_pointer_and_pieces() -> None:
    with owned_pool("forms", 16, PAGE) as pool:
        buf = bytearray(_pages(2).tobytes())
        pool.batch_set([b"a", b"b"], buf)
        out = (ctypes.c_uint8 * (2 * PAGE))()
        found = pool.batch_get(["a", "b"], ctypes.addressof(out), nbytes=2 * PAGE)
        assert found.tolist() == [True, True]
        assert bytes(out) == bytes(buf)
        # layer-first style: each page as two pieces living in two separate arrays
        k = np.zeros((2, 3000), np.uint8)
        v = np.zeros((2, PAGE - 3000), np.uint8)
        addrs = np.array([[k[i].ctypes.data, v[i].ctypes.data] for i in range(2)], dtype=np.uint64)
        pool.batch_get(["a", "b"], addrs=addrs, seg_lens=[3000, PAGE - 3000])
        whole = np.frombuffer(bytes(buf), np.uint8).reshape(2, PAGE)
        np.testing.assert_array_equal(k, whole[:, :3000])
        np.testing.assert_array_equal(v, whole[:, 3000:])
        # and written from pieces
        pool.batch_set(["c", "d"], addrs=addrs, seg_lens=[3000, PAGE - 3000])
        back = np.zeros((2, PAGE), np.uint8)
        pool.batch_get(["c", "d"], back)
        np.testing.assert_array_equal(back, whole)


def test_torch_cpu_tensor_via_dlpack() -> None:
    torch = pytest.importorskip("torch")
    with owned_pool("torch", 8, PAGE) as pool:
        src = torch.arange(2 * PAGE // 2, dtype=torch.int16).reshape(2, -1)
        pool.batch_set(["x", "y"], src)
        dst = torch.zeros_like(src)
        assert pool.batch_get(["x", "y"], dst).all()
        assert torch.equal(src, dst)


def test_typed_errors_for_bad_input() -> None:
    with owned_pool("bad", 8, PAGE, max_key_len=32) as pool:
        page = np.zeros((1, PAGE), np.uint8)
        with pytest.raises(InvalidArgumentError, match="at most 32"):
            pool.batch_set(["k" * 33], page)
        with pytest.raises(InvalidArgumentError, match="at most 32"):
            pool.batch_exists(["k" * 33])
        with pytest.raises(InvalidArgumentError, match="empty"):
            pool.batch_get([""], page)
        with pytest.raises(InvalidArgumentError, match="expected str or bytes"):
            pool.batch_exists([1])  # type: ignore[list-item]
        with pytest.raises(InvalidArgumentError, match="wrong page size"):
            pool.batch_set(["k"], np.zeros(PAGE - 1, np.uint8))
        with pytest.raises(InvalidArgumentError, match="page size is 4096"):
            pool.batch_set(["k"], addrs=[page.ctypes.data], seg_lens=[1000])
        with pytest.raises(InvalidArgumentError, match="read-only"):
            pool.batch_get(["k"], bytes(PAGE))
        assert pool.stats()["committed_pages"] == 0
    with pytest.raises(NotFoundError, match="does not exist"):
        KVPool.attach(unique_name("absent"))
    with pytest.raises(InvalidArgumentError, match="may use only"):
        KVPool.attach("bad/name")
    with pytest.raises(InvalidArgumentError, match="page_size"):
        KVPool("x", create=True, capacity_bytes=4096)


def test_page_size_mismatch_on_attach_and_duplicate_create() -> None:
    with owned_pool("mismatch", 4, PAGE) as pool:
        with pytest.raises(InvalidArgumentError, match="4096 bytes, not 8192"):
            KVPool(pool.name, page_size=8192).start()
        with pytest.raises(AlreadyExistsError):
            KVPool(pool.name, create=True, capacity_bytes=PAGE, page_size=PAGE).start()


def test_full_pool_all_pinned_raises_resource_exhausted_without_hanging() -> None:
    with owned_pool("pinned", 4, PAGE) as pool:
        keys = ["a", "b", "c", "d"]
        src = _pages(4)
        pool.batch_set(keys, src)
        handle, addrs = pool.pin(keys)
        assert (addrs != 0).all()
        view = np.ctypeslib.as_array(
            ctypes.cast(int(addrs[2]), ctypes.POINTER(ctypes.c_uint8)), (PAGE,)
        )
        np.testing.assert_array_equal(view, src[2])  # zero-copy read in place
        with pytest.raises(ResourceExhaustedError, match="no space for 1 of 2"):
            pool.batch_set(["a", "e"], _pages(2))
        res = pool.batch_set(["e"], _pages(1), raise_on_full=False)
        assert res.tolist() == [PutResult.NO_SPACE]
        assert pool.remove(keys) == 0  # pinned pages are not removed either
        pool.unpin(handle)
        assert pool.batch_set(["e"], _pages(1)).tolist() == [PutResult.STORED]
        with pytest.raises(NotFoundError):
            pool.unpin(handle)


def test_eviction_keeps_the_pool_bounded() -> None:
    with owned_pool("evict", 32, PAGE) as pool:
        for i in range(10):
            pool.batch_set([f"k{i}-{j}" for j in range(16)], _pages(16, seed=i))
        stats = pool.stats()
        assert stats["committed_pages"] <= 31
        assert stats["evictions"] >= 160 - 32
        assert pool.batch_exists([f"k9-{j}" for j in range(16)]) == 16


def test_threads_share_one_handle() -> None:
    with owned_pool("threads", 256, PAGE) as pool:
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                keys = [f"t{t}-{j}" for j in range(32)]
                src = _pages(32, seed=t)
                for _ in range(20):
                    pool.batch_set(keys, src)
                    dst = np.zeros_like(src)
                    assert pool.batch_get(keys, dst).all()
                    np.testing.assert_array_equal(dst, src)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


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


def test_prometheus_text_has_labelled_gauges_and_counters() -> None:
    with owned_pool("prom", 4, PAGE) as pool:
        pool.batch_set(["a"], _pages(1))
        text = prometheus_text(pool.stats(), pool.name)
        assert f'banaserve_kvpool_committed_pages{{pool="{pool.name}"}} 1' in text
        assert "# TYPE banaserve_kvpool_puts_total counter" in text
        assert f'banaserve_kvpool_puts_total{{pool="{pool.name}"}} 1' in text

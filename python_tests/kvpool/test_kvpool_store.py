# SPDX-License-Identifier: Apache-2.0
"""The KVStore contract, one suite run against every store: the local shared-memory KVPool and
the RemoteKVPool through a pool service on 127.0.0.1 (real sockets, the transfer engine's TCP
path). What only one kind has lives beside it: test_kvpool_pool.py (pins, attach and restart of
the shared segment) and test_kvpool_remote.py (service processes, faults, the wire)."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from kvpool_testlib import STORE_KINDS, store_bed

from banaserve_ext.errors import InvalidArgumentError, ResourceExhaustedError
from banaserve_ext.kvpool import KVStore, PutResult, prometheus_text

PAGE = 4096


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE), dtype=np.uint8)


def test_round_trip_and_leading_exists(kind: str) -> None:
    with store_bed(kind, "rt", 64, PAGE) as bed:
        store = bed.store
        assert isinstance(store, KVStore)
        assert (store.page_size, store.num_pages, store.max_key_len, store.segment_id) == (
            PAGE, 64, bed.owner.max_key_len, bed.owner.segment_id,
        )  # fmt: skip
        keys = [f"{i:064x}" for i in range(20)]
        src = _pages(20)
        assert store.batch_set(keys, src).tolist() == [PutResult.STORED] * 20
        assert store.batch_exists(keys) == 20
        assert store.batch_exists(keys[:5] + ["nope"] + keys[5:]) == 5
        assert store.exists_mask(["nope", keys[3]]).tolist() == [False, True]
        dst = np.zeros_like(src)
        assert store.batch_get(keys, dst).all()
        np.testing.assert_array_equal(dst, src)
        # a second set of the same keys leaves the first value
        assert store.batch_set(keys[:2], _pages(2, seed=9)).tolist() == [PutResult.EXISTS] * 2
        dst2 = np.zeros((2, PAGE), np.uint8)
        assert store.batch_get(keys[:2], dst2).all()
        np.testing.assert_array_equal(dst2, src[:2])
        # the bytes are in the pool itself, whichever way they came
        np.testing.assert_array_equal(dst2, _got(bed.owner, keys[:2]))
        stats = store.stats()
        assert stats["committed_pages"] == 20
        assert stats["put_exists"] == 2
        assert stats["overhead_bytes"] < stats["segment_bytes"]


def _got(store: KVStore, keys: list[str], suffix: str = "") -> np.ndarray:
    out = np.zeros((len(keys), PAGE), np.uint8)
    assert store.batch_get(keys, out, suffix=suffix).all()
    return out


def test_memory_forms_bytes_keys_raw_pointers_and_pieces(kind: str) -> None:
    with store_bed(kind, "forms", 16, PAGE) as bed:
        store = bed.store
        buf = bytearray(_pages(2).tobytes())
        store.batch_set([b"a", b"b"], buf)
        out = (ctypes.c_uint8 * (2 * PAGE))()
        found = store.batch_get(["a", "b"], ctypes.addressof(out), nbytes=2 * PAGE)
        assert found.tolist() == [True, True]
        assert bytes(out) == bytes(buf)
        # layer-first style: each page as two pieces living in two separate arrays
        k = np.zeros((2, 3000), np.uint8)
        v = np.zeros((2, PAGE - 3000), np.uint8)
        addrs = np.array([[k[i].ctypes.data, v[i].ctypes.data] for i in range(2)], dtype=np.uint64)
        assert store.batch_get(["a", "b"], addrs=addrs, seg_lens=[3000, PAGE - 3000]).all()
        whole = np.frombuffer(bytes(buf), np.uint8).reshape(2, PAGE)
        np.testing.assert_array_equal(k, whole[:, :3000])
        np.testing.assert_array_equal(v, whole[:, 3000:])
        # and written from pieces
        store.batch_set(["c", "d"], addrs=addrs, seg_lens=[3000, PAGE - 3000])
        np.testing.assert_array_equal(_got(store, ["c", "d"]), whole)
        # one address per page
        one = np.zeros((2, PAGE), np.uint8)
        per_page = np.array([one[1].ctypes.data, one[0].ctypes.data], np.uint64)
        assert store.batch_get(["a", "b"], addrs=per_page).all()
        np.testing.assert_array_equal(one, whole[::-1])


def test_torch_cpu_tensor_via_dlpack(kind: str) -> None:
    torch = pytest.importorskip("torch")
    with store_bed(kind, "torch", 8, PAGE) as bed:
        src = torch.arange(2 * PAGE // 2, dtype=torch.int16).reshape(2, -1)
        bed.store.batch_set(["x", "y"], src)
        dst = torch.zeros_like(src)
        assert bed.store.batch_get(["x", "y"], dst).all()
        assert torch.equal(src, dst)


def test_suffixes_key_bytes_masks_and_misses(kind: str) -> None:
    with store_bed(kind, "sem", 64, PAGE) as bed:
        store = bed.store
        keys = [f"sem-{i}" for i in range(10)]
        want = _pages(10, seed=1)
        assert store.batch_set(keys, want, suffix="|tp0").tolist() == [0] * 10
        assert bed.owner.remove([keys[3] + "|tp0"]) == 1  # the suffix is appended to the key
        assert store.batch_exists(keys, suffix="|tp0") == 3
        assert store.batch_exists(keys[4:], suffix="|tp0") == 6
        assert store.batch_exists(["absent", *keys], suffix="|tp0") == 0
        assert store.batch_exists(keys) == store.batch_exists(keys, suffix="|tp1") == 0
        assert store.batch_exists([k + "|tp0" for k in keys[:3]]) == 3
        assert store.exists_mask(keys, suffix="|tp0").tolist() == [i != 3 for i in range(10)]
        assert not store.exists_mask(keys, suffix="|tp1").any()
        assert store.batch_exists([]) == 0
        empty = store.exists_mask([])
        assert empty.dtype == bool and empty.shape == (0,)
        # str and bytes name the same key; NUL and non-ASCII are ordinary key bytes
        odd = ["nul\0inside", b"bytes-key", "ключ"]
        assert store.batch_set(odd, _pages(3, seed=2)).tolist() == [0] * 3
        assert bed.owner.exists_mask(["nul\0inside", "bytes-key", "ключ".encode()]).all()
        assert store.batch_exists([b"nul\0inside", "bytes-key", "ключ"]) == 3
        assert store.remove(odd) == 3
        assert store.remove(odd) == 0
        # a miss is False and leaves its memory untouched
        probe = ["absent", *keys]
        dst = np.full((11, PAGE), 0xAB, np.uint8)
        found = store.batch_get(probe, dst, suffix="|tp0")
        assert found.tolist() == [False] + [i != 3 for i in range(10)]
        assert (dst[0] == 0xAB).all() and (dst[4] == 0xAB).all()
        np.testing.assert_array_equal(dst[found], want[np.arange(10) != 3])
        assert store.remove([keys[0] + "|tp0"]) == 1
        assert store.batch_exists(keys, suffix="|tp0") == 0
        assert store.batch_get([], np.zeros((0, PAGE), np.uint8)).shape == (0,)
        assert store.batch_set([], np.zeros((0, PAGE), np.uint8)).shape == (0,)
        assert store.remove([]) == 0


def test_bad_input_gives_typed_errors_and_the_store_works_on(kind: str) -> None:
    with store_bed(kind, "bad", 8, PAGE, max_key_len=32) as bed:
        store = bed.store
        page = np.zeros((1, PAGE), np.uint8)
        with pytest.raises(InvalidArgumentError, match="at most 32"):
            store.batch_set(["k" * 33], page)
        with pytest.raises(InvalidArgumentError, match="at most 32"):
            store.batch_exists(["k" * 33])
        with pytest.raises(InvalidArgumentError, match="at most 32"):
            store.batch_exists(["k" * 30], suffix="|tp0")  # the suffix counts
        with pytest.raises(InvalidArgumentError, match="empty"):
            store.batch_get([""], page)
        with pytest.raises(InvalidArgumentError, match="expected str or bytes"):
            store.batch_exists([b"ok", 1])  # type: ignore[list-item]
        with pytest.raises(InvalidArgumentError, match="wrong page size"):
            store.batch_set(["k"], np.zeros(PAGE - 1, np.uint8))
        with pytest.raises(InvalidArgumentError, match="wrong page size"):
            store.batch_set(["a", "b"], np.zeros((2, PAGE // 2), np.uint8))
        with pytest.raises(InvalidArgumentError, match="page size is 4096"):
            store.batch_set(["k"], addrs=[page.ctypes.data], seg_lens=[1000])
        with pytest.raises(InvalidArgumentError, match="read-only"):
            store.batch_get(["k"], bytes(PAGE))
        ro = np.zeros((1, PAGE), np.uint8)
        ro.flags.writeable = False
        with pytest.raises(InvalidArgumentError, match="read-only"):
            store.batch_get(["k"], ro)
        assert store.stats()["committed_pages"] == 0
        assert store.batch_set(["fine"], np.ones((1, PAGE), np.uint8)).tolist() == [0]
        assert store.batch_exists(["fine"]) == 1


def test_a_handle_expecting_another_page_size_refuses_to_start(kind: str) -> None:
    with store_bed(kind, "mismatch", 4, PAGE) as bed:
        with pytest.raises(InvalidArgumentError, match=f"{PAGE} bytes, not {2 * PAGE}"):
            bed.open(page_size=2 * PAGE).start()
        with bed.open(page_size=PAGE) as same:
            assert same.page_size == PAGE
            same.close()  # close is idempotent (the with closes again)


def test_a_full_pool_of_pinned_pages_raises_resource_exhausted_without_hanging(
    kind: str,
) -> None:
    with store_bed(kind, "pinned", 4, PAGE) as bed:
        store = bed.store
        keys = ["a", "b", "c", "d"]
        store.batch_set(keys, _pages(4))
        handle, addrs = bed.owner.pin(keys)
        assert (addrs != 0).all()
        with pytest.raises(ResourceExhaustedError, match="no space for 1 of 2"):
            store.batch_set(["a", "e"], _pages(2))
        res = store.batch_set(["e"], _pages(1), raise_on_full=False)
        assert res.tolist() == [PutResult.NO_SPACE]
        assert store.remove(keys) == 0  # pinned pages are not removed either
        assert store.batch_exists(keys) == 4
        bed.owner.unpin(handle)
        assert store.batch_set(["e"], _pages(1)).tolist() == [PutResult.STORED]


def test_eviction_keeps_the_pool_bounded(kind: str) -> None:
    with store_bed(kind, "evict", 32, PAGE) as bed:
        for i in range(10):
            bed.store.batch_set([f"k{i}-{j}" for j in range(16)], _pages(16, seed=i))
        stats = bed.store.stats()
        assert stats["committed_pages"] <= 31
        assert stats["evictions"] >= 160 - 32
        assert bed.store.batch_exists([f"k9-{j}" for j in range(16)]) == 16


def test_threads_share_one_handle(kind: str) -> None:
    with store_bed(kind, "threads", 256, PAGE) as bed:
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                keys = [f"t{t}-{j}" for j in range(32)]
                src = _pages(32, seed=t)
                for _ in range(10):
                    bed.store.batch_set(keys, src)
                    dst = np.zeros_like(src)
                    assert bed.store.batch_get(keys, dst).all()
                    np.testing.assert_array_equal(dst, src)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_scattered_pieces_and_a_registered_buffer(kind: str) -> None:
    """The HiCache layer-first form: each page is several pieces anywhere in caller memory."""
    with store_bed(kind, "pieces", 16, PAGE) as bed:
        store = bed.store
        n, lens = 6, np.array([1024, 2048, 1024], np.uint64)
        keys = [f"pieces-{i}" for i in range(n)]
        want = _pages(n, seed=3)
        host = np.zeros(4 * n * PAGE, np.uint8)  # pieces spread over a bigger buffer
        base = host.ctypes.data
        starts = np.array([[i * PAGE, 2 * n * PAGE + i * PAGE, 3 * n * PAGE + i * 2048]
                           for i in range(n)], np.uint64)  # fmt: skip
        for i in range(n):
            off = 0
            for j in range(3):
                s, m = int(starts[i, j]), int(lens[j])
                host[s : s + m] = want[i, off : off + m]
                off += m
        res = store.batch_set(keys, addrs=starts + np.uint64(base), seg_lens=lens)
        assert res.tolist() == [0] * n
        np.testing.assert_array_equal(_got(bed.owner, keys), want)
        host[:] = 0
        assert store.batch_get(keys, addrs=starts + np.uint64(base), seg_lens=lens).all()
        for i in range(n):
            s = int(starts[i, 1])
            np.testing.assert_array_equal(host[s : s + 2048], want[i, 1024 : 1024 + 2048])
        store.register(host)  # declared once (as the HiCache backend does), then reused
        host[:] = 0
        assert store.batch_get(keys, addrs=starts + np.uint64(base), seg_lens=lens).all()
        s = int(starts[n - 1, 2])
        np.testing.assert_array_equal(host[s : s + 1024], want[n - 1, -1024:])


def test_memory_on_both_sides_of_a_registered_buffer(kind: str) -> None:
    """Pieces before, inside and after a registered range move like any other memory."""
    with store_bed(kind, "around", 8, PAGE) as bed:
        store = bed.store
        keys = [f"around-{i}" for i in range(3)]
        want = _pages(3, seed=6)
        big = np.zeros(3 * PAGE, np.uint8)
        base = big.ctypes.data
        addrs = np.array([base, base + PAGE, base + 2 * PAGE], np.uint64)
        assert store.batch_set(keys, want).tolist() == [0] * 3
        store.register(base + PAGE, PAGE)  # only the middle page
        for _ in range(2):  # the second call may reuse what the first one set up
            big[:] = 0
            assert store.batch_get(keys, addrs=addrs).all()
            np.testing.assert_array_equal(big.reshape(3, PAGE), want)
        big[:] = 0
        assert store.batch_get(keys, big).all()  # one buffer straddling the registered one
        np.testing.assert_array_equal(big.reshape(3, PAGE), want)


def test_stats_feed_prometheus_text(kind: str) -> None:
    with store_bed(kind, "prom", 4, PAGE) as bed:
        bed.store.batch_set(["a"], _pages(1))
        stats = bed.store.stats()
        assert stats["page_size"] == PAGE and stats["puts"] == 1
        text = prometheus_text(stats, bed.owner.name)
        assert f'banaserve_kvpool_committed_pages{{pool="{bed.owner.name}"}} 1' in text
        assert "# TYPE banaserve_kvpool_puts_total counter" in text
        assert f'banaserve_kvpool_puts_total{{pool="{bed.owner.name}"}} 1' in text

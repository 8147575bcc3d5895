# SPDX-License-Identifier: Apache-2.0
"""The transfer façade over the in-process (local) backend: API shape, input normalisation,
typed errors, fault injection, deadlines, cancellation and layer-wise streams."""

from __future__ import annotations

import time

import numpy as np
import pytest

from banaserve_ext import _core, _env, errors
from banaserve_ext.transfer import (
    FaultSpec,
    Op,
    TransferEngine,
    TransferState,
    available_backends,
    backend_names,
)

PAGE = 4096


def page_table(base: int, pages: int, page: int = PAGE) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(page)
    return np.stack([addrs, np.full(pages, page, dtype=np.uint64)], axis=1)


@pytest.fixture
def engine():
    with TransferEngine(backends=()) as eng:
        yield eng


def pair(eng: TransferEngine, pages: int = 16, page: int = PAGE):
    src = np.arange(pages * page, dtype=np.uint32).astype(np.uint8)
    dst = np.zeros(pages * page, dtype=np.uint8)
    ra, rb = eng.register(src), eng.register(dst)
    local = eng.prepare(page_table(ra.addr, pages, page))
    remote = eng.prepare(page_table(rb.addr, pages, page), peer=eng.engine_id)
    return src, dst, local, remote


def test_sanitized_build_is_the_one_loaded_when_expected() -> None:
    if _env.get(_env.EXPECT_SANITIZED):
        assert _core.build_info()["sanitizers"] is True
    assert "local" in available_backends()


def test_constructor_has_no_side_effects() -> None:
    eng = TransferEngine(backends=())
    assert not eng.started
    with pytest.raises(errors.UnavailableError, match="not started"):
        eng.metadata()


def test_backend_names_come_from_the_core_list() -> None:
    names = backend_names()
    assert names == list(_core.backend_names()) and len(set(names)) == len(names)
    have = available_backends()
    assert have[0] == "local" and [n for n in names if n in have] == have
    defaults = list(_core.default_backends())
    assert list(_core.EngineConfig().backends) == defaults
    assert set(defaults) < set(names) and "local" not in defaults
    with pytest.raises(errors.InvalidArgumentError, match=f"choose from {', '.join(names)}"):
        TransferEngine(backends=("shm", "bogus")).start()
    with pytest.raises(errors.InvalidArgumentError, match="choose from"):
        TransferEngine(force_backend="bogus").start()
    with TransferEngine(backends=("local",), force_backend="local") as eng:
        src, dst, local, remote = pair(eng, pages=2)  # in this engine: the local backend
        assert eng.submit(Op.WRITE, local, [0, 1], remote, [0, 1]).wait(5)
        assert np.array_equal(src, dst)


def test_write_and_read_move_exactly_the_indexed_pages(engine: TransferEngine) -> None:
    src, dst, local, remote = pair(engine)
    idx = np.array([5, 0, 7, 8, 9], dtype=np.int64)
    with engine.submit(Op.WRITE, local, idx, remote, idx) as h:
        assert h.wait(5)
        assert h.state is TransferState.DONE
        assert h.nbytes == 5 * PAGE
    s, d = src.reshape(-1, PAGE), dst.reshape(-1, PAGE)
    for i in range(16):
        assert np.array_equal(s[i], d[i]) == (i in idx)
    # read back into other local pages: remote page 9 -> local page 1
    h = engine.submit(Op.READ, local, [1], remote, [9])
    assert h.wait(5)
    assert np.array_equal(s[1], s[9])


def test_odd_sizes_and_zero_length(engine: TransferEngine) -> None:
    a = bytearray(b"x" * 1001)
    b = bytearray(1001)
    ra, rb = engine.register(a), engine.register(b)
    lens = [0, 1, 3, 997]
    offs = [0, 0, 1, 4]
    lt = np.array([[ra.addr + o, n] for o, n in zip(offs, lens, strict=True)], dtype=np.uint64)
    rt = np.array([[rb.addr + o, n] for o, n in zip(offs, lens, strict=True)], dtype=np.uint64)
    local, remote = engine.prepare(lt), engine.prepare(rt, peer=engine.engine_id)
    assert engine.submit(Op.WRITE, local, [0, 1, 2, 3], remote, [0, 1, 2, 3]).wait(5)
    assert bytes(b) == bytes(a)
    # an empty batch completes too
    assert engine.submit(Op.WRITE, local, [], remote, []).wait(5)


def test_registration_inputs(engine: TransferEngine) -> None:
    arr = np.ones((4, 8), dtype=np.float32)
    reg = engine.register(arr)
    assert reg.nbytes == arr.nbytes and reg.addr == arr.ctypes.data
    assert engine.register(bytearray(64)).nbytes == 64
    raw = np.zeros(128, np.uint8)
    assert engine.register(int(raw.ctypes.data), 128).nbytes == 128
    with pytest.raises(errors.InvalidArgumentError, match="read-only"):
        engine.register(b"immutable bytes")
    with pytest.raises(errors.InvalidArgumentError, match="explicit nbytes"):
        engine.register(12345)
    with pytest.raises(errors.InvalidArgumentError, match="C-contiguous"):
        engine.register(np.ones((8, 8), np.uint8)[:, ::2])
    with pytest.raises(errors.InvalidArgumentError, match="neither"):
        engine.register(object())
    with pytest.raises(errors.AlreadyExistsError, match="overlaps"):
        engine.register(arr)  # the same memory twice
    reg.release()
    engine.register(arr)  # free again after release


def test_torch_cpu_tensor_registers_through_dlpack(engine: TransferEngine) -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(1024, dtype=torch.float32)
    reg = engine.register(t)
    assert reg.addr == t.data_ptr() and reg.nbytes == 4096


def test_torch_dtypes_numpy_lacks_register_by_their_bytes(engine: TransferEngine) -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros((16, 64), dtype=torch.bfloat16)  # numpy has no bfloat16
    reg = engine.register(t)
    assert reg.addr == t.data_ptr() and reg.nbytes == 16 * 64 * 2
    with pytest.raises(errors.InvalidArgumentError, match="contiguous"):
        engine.register(torch.zeros((16, 64), dtype=torch.bfloat16)[:, ::2])


def test_allocate_gives_shared_memory_with_a_numpy_view(engine: TransferEngine) -> None:
    reg = engine.allocate(1 << 20)
    assert reg.shared and reg.array is not None and reg.array.nbytes == 1 << 20
    reg.array[:4] = [1, 2, 3, 4]
    assert list(reg.array[:4]) == [1, 2, 3, 4]
    with pytest.raises(errors.InvalidArgumentError):
        engine.allocate(0)
    reg.release()
    assert reg.array is None


def test_unregistered_and_out_of_range_input_writes_nothing(engine: TransferEngine) -> None:
    src, dst, local, remote = pair(engine, pages=4)
    outside = np.zeros(PAGE, np.uint8)
    with pytest.raises(errors.InvalidArgumentError, match="not inside one registered"):
        engine.prepare(page_table(int(outside.ctypes.data), 1))
    crossing = page_table(int(dst.ctypes.data) + 3 * PAGE + 1, 1)  # runs past the end
    with pytest.raises(errors.InvalidArgumentError, match="descriptor 0"):
        engine.prepare(crossing, peer=engine.engine_id)
    with pytest.raises(errors.OutOfRangeError, match="index 4"):
        engine.submit(Op.WRITE, local, [0, 4], remote, [0, 1])
    with pytest.raises(errors.OutOfRangeError):
        engine.submit(Op.WRITE, local, [-1], remote, [0])
    with pytest.raises(errors.InvalidArgumentError, match="equal length"):
        engine.submit(Op.WRITE, local, [0, 1], remote, [0])
    with pytest.raises(errors.InvalidArgumentError, match="shape"):
        engine.prepare(np.zeros((3, 3), np.uint64))
    assert not dst.any()


def test_unknown_peer_and_bad_metadata(engine: TransferEngine) -> None:
    with pytest.raises(errors.NotFoundError, match="unknown peer"):
        engine.prepare(np.zeros((0, 2), np.uint64), peer="nobody")
    with pytest.raises(errors.InvalidArgumentError, match="malformed engine metadata"):
        engine.add_peer(b"\x00garbage")
    with pytest.raises(errors.NotFoundError):
        engine.remove_peer("nobody")


def test_unregistering_memory_makes_stale_prepared_lists_fail(engine: TransferEngine) -> None:
    src, dst = np.ones(PAGE, np.uint8), np.zeros(PAGE, np.uint8)
    ra, rb = engine.register(src), engine.register(dst)
    local = engine.prepare(page_table(ra.addr, 1))
    remote = engine.prepare(page_table(rb.addr, 1), peer=engine.engine_id)
    rb.release()
    with pytest.raises(errors.InvalidArgumentError, match="remote range"):
        engine.submit(Op.WRITE, local, [0], remote, [0])
    assert not dst.any()


def test_dropped_batch_fails_at_its_deadline_and_is_never_written() -> None:
    with TransferEngine(backends=(), fault=FaultSpec(drop=True)) as eng:
        src, dst, local, remote = pair(eng, pages=2)
        h = eng.submit(Op.WRITE, local, [0], remote, [0], timeout_s=0.05)
        with pytest.raises(errors.TransferTimeoutError, match="deadline"):
            h.wait(5)
        assert h.state is TransferState.FAILED
        assert not dst.any()


def test_fail_after_n_posts() -> None:
    with TransferEngine(backends=(), fault=FaultSpec(fail_after_posts=2)) as eng:
        src, dst, local, remote = pair(eng, pages=4)
        assert eng.submit(Op.WRITE, local, [0], remote, [0]).wait(5)
        assert eng.submit(Op.WRITE, local, [1], remote, [1]).wait(5)
        with pytest.raises(errors.UnavailableError, match="injected failure"):
            eng.submit(Op.WRITE, local, [2], remote, [2]).wait(5)
        assert not dst.reshape(-1, PAGE)[2].any()


def test_cancel_before_the_backend_starts_writes_nothing() -> None:
    with TransferEngine(backends=(), fault=FaultSpec(delay_ms=100)) as eng:
        src, dst, local, remote = pair(eng, pages=4)
        h = eng.submit(Op.WRITE, local, [0, 1], remote, [0, 1])
        h.cancel()
        with pytest.raises(errors.CancelledError):
            h.wait(5)
        assert h.state is TransferState.CANCELLED
        assert not dst.any()


def test_handle_context_exit_cancels_and_waits() -> None:
    with TransferEngine(backends=(), fault=FaultSpec(delay_ms=50)) as eng:
        src, dst, local, remote = pair(eng, pages=2)
        with eng.submit(Op.WRITE, local, [0], remote, [0]) as h:
            pass
        assert h.state.terminal


def test_wait_timeout_returns_false_and_keeps_running() -> None:
    with TransferEngine(backends=(), fault=FaultSpec(delay_ms=200)) as eng:
        src, dst, local, remote = pair(eng, pages=2)
        h = eng.submit(Op.WRITE, local, [0], remote, [0])
        assert h.wait(0.01) is False
        assert not h.state.terminal
        assert h.wait(5) is True


def test_stop_fails_batches_in_flight() -> None:
    eng = TransferEngine(backends=(), fault=FaultSpec(delay_ms=10_000)).start()
    src, dst, local, remote = pair(eng, pages=2)
    h = eng.submit(Op.WRITE, local, [0], remote, [0])
    t0 = time.monotonic()
    eng.stop()
    assert time.monotonic() - t0 < 5
    with pytest.raises(errors.UnavailableError, match="stopped"):
        h.wait(1)
    assert not dst.any()


def test_layerwise_stream_to_self(engine: TransferEngine) -> None:
    layers, items, item = 4, 32, 256
    src = np.random.default_rng(0).integers(0, 255, layers * items * item, dtype=np.uint8)
    dst = np.zeros_like(src)
    ra, rb = engine.register(src), engine.register(dst)
    bases_l = ra.addr + np.arange(layers, dtype=np.uint64) * np.uint64(items * item)
    bases_r = rb.addr + np.arange(layers, dtype=np.uint64) * np.uint64(items * item)
    local = engine.prepare_layout(bases_l, item, items)
    remote = engine.prepare_layout(bases_r, item, items, peer=engine.engine_id)
    idx = np.array([3, 4, 5, 20], dtype=np.int64)
    with engine.expect(77, layers, timeout_s=5) as recv:
        send = engine.open_stream(77, layers, local, idx, remote, idx, buffers_per_layer=1)
        for layer in range(layers):
            send.mark_layer_ready(layer)
            assert recv.wait_layer(layer, 5)
            assert recv.layers_done == layer + 1
        assert send.wait(5) and recv.wait_all(5)
        assert recv.state is TransferState.DONE
    s, d = src.reshape(layers, items, item), dst.reshape(layers, items, item)
    assert np.array_equal(s[:, idx], d[:, idx])
    mask = np.ones(items, bool)
    mask[idx] = False
    assert not d[:, mask].any()
    with pytest.raises(errors.InvalidArgumentError, match="layers x"):
        engine.open_stream(78, layers + 1, local, idx, remote, idx, buffers_per_layer=1)


def test_receive_stream_deadline() -> None:
    with TransferEngine(backends=()) as eng:
        recv = eng.expect(5, 2, timeout_s=0.05)
        with pytest.raises(errors.TransferTimeoutError):
            recv.wait_all(5)
        assert recv.state is TransferState.FAILED


def test_stats_count_bytes_and_batches(engine: TransferEngine) -> None:
    src, dst, local, remote = pair(engine, pages=4)
    engine.submit(Op.WRITE, local, [0, 1], remote, [0, 1]).wait(5)
    st = engine.stats()
    assert st["bytes_written"] == 2 * PAGE
    assert st["batches_submitted"] == 1
    assert st["regions"] == 2

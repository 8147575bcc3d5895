# SPDX-License-Identifier: Apache-2.0
"""GPU data paths of the transfer engine. The tests that move GPU memory need a build with the
cuda backend (``-DBANASERVE_WITH_CUDA=ON``) and a CUDA device; they skip, saying which is
missing, otherwise. The refusal tests at the end run in every build."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext import _core, errors
from banaserve_ext.bench import _cudart
from banaserve_ext.transfer import Op, TransferEngine

CUDA_BUILT = bool(_core.build_info()["cuda"])
_RT = _cudart.load() if CUDA_BUILT else None
HAVE_DEVICE = _RT is not None and _cudart.device_count(_RT) > 0

needs_gpu = pytest.mark.skipif(
    not (CUDA_BUILT and HAVE_DEVICE),
    reason=(
        "built without the cuda backend (_core.build_info()['cuda'] is False)"
        if not CUDA_BUILT
        else "no CUDA device (or libcudart) on this machine"
    ),
)

PAGE = 16384


class DeviceBuffer:
    """cudaMalloc'd memory exposing the DLPack device and CUDA array interface the façade reads."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr = _cudart.malloc(_RT, nbytes)
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3,
        }  # fmt: skip

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA, device 0

    def upload(self, host: np.ndarray) -> None:
        _cudart.memcpy(_RT, self.ptr, host.ctypes.data, host.nbytes, _cudart.H2D)

    def download(self) -> np.ndarray:
        out = np.empty(self.nbytes, np.uint8)
        _cudart.memcpy(_RT, out.ctypes.data, self.ptr, self.nbytes, _cudart.D2H)
        return out

    def free(self) -> None:
        _cudart.free(_RT, self.ptr)


def table(base: int, pages: int) -> np.ndarray:
    addrs = base + np.arange(pages, dtype=np.uint64) * np.uint64(PAGE)
    return np.stack([addrs, np.full(pages, PAGE, dtype=np.uint64)], axis=1)


@pytest.mark.cuda
@needs_gpu
def test_d2d_scattered_pages_in_one_process_are_verified() -> None:
    src, dst = DeviceBuffer(64 * PAGE), DeviceBuffer(64 * PAGE)
    try:
        data = np.random.default_rng(1).integers(0, 256, 64 * PAGE, dtype=np.uint8)
        src.upload(data)
        dst.upload(np.zeros(64 * PAGE, np.uint8))
        with TransferEngine() as eng:
            a, b = eng.register(src), eng.register(dst)
            local = eng.prepare(table(a.addr, 64), device=("cuda", 0))
            remote = eng.prepare(table(b.addr, 64), device=("cuda", 0))
            ls = np.random.default_rng(2).choice(64, 20, replace=False)
            rs = np.random.default_rng(3).choice(64, 20, replace=False)
            assert eng.submit(Op.WRITE, local, ls, remote, rs).wait(30)
        got = dst.download().reshape(-1, PAGE)
        assert np.array_equal(got[rs], data.reshape(-1, PAGE)[ls])
        assert not got[np.setdiff1d(np.arange(64), rs)].any()
    finally:
        src.free()
        dst.free()


@pytest.mark.cuda
@needs_gpu
def test_layers_follow_their_cuda_events() -> None:
    src, dst = DeviceBuffer(8 * PAGE), DeviceBuffer(8 * PAGE)
    try:
        data = np.random.default_rng(4).integers(0, 256, 8 * PAGE, dtype=np.uint8)
        src.upload(data)
        with TransferEngine() as eng:
            a, b = eng.register(src), eng.register(dst)
            lb = a.addr + np.arange(2, dtype=np.uint64) * np.uint64(4 * PAGE)
            rb = b.addr + np.arange(2, dtype=np.uint64) * np.uint64(4 * PAGE)
            local = eng.prepare_layout(lb, PAGE, 4, device=("cuda", 0))
            remote = eng.prepare_layout(rb, PAGE, 4, device=("cuda", 0))
            idx = np.arange(4, dtype=np.int64)
            recv = eng.expect(3, 2, timeout_s=30)
            send = eng.open_stream(3, 2, local, idx, remote, idx, buffers_per_layer=1, timeout_s=30)
            for layer in range(2):
                send.mark_layer_ready_after_event(layer, _cudart.event_record(_RT))
            assert send.wait(30)
            assert recv.wait_all(30)
        assert np.array_equal(dst.download(), data)
    finally:
        src.free()
        dst.free()


def test_device_memory_is_refused_clearly_without_a_device_backend() -> None:
    if CUDA_BUILT and HAVE_DEVICE:
        pytest.skip("this build has a working cuda backend")

    class FakeDeviceMemory:
        __cuda_array_interface__ = {"shape": (4096,), "typestr": "|u1", "data": (1 << 40, False)}
        nbytes = 4096

        def __dlpack_device__(self) -> tuple[int, int]:
            return (2, 0)

    with TransferEngine() as eng:
        with pytest.raises(errors.NotSupportedError, match="device memory registration needs"):
            eng.register(FakeDeviceMemory())


def test_cuda_event_layers_are_refused_clearly_without_the_cuda_backend() -> None:
    if CUDA_BUILT:
        pytest.skip("this build has the cuda backend")
    with TransferEngine(backends=()) as eng:
        reg = eng.register(np.zeros(2 * PAGE, np.uint8))
        other = eng.register(np.zeros(2 * PAGE, np.uint8))
        local = eng.prepare_layout([reg.addr], PAGE, 2)
        remote = eng.prepare_layout([other.addr], PAGE, 2)
        send = eng.open_stream(5, 1, local, [0], remote, [0], buffers_per_layer=1, timeout_s=5)
        with pytest.raises(errors.NotSupportedError, match="cuda backend"):
            send.mark_layer_ready_after_event(0, 0x1234)
        send.cancel()

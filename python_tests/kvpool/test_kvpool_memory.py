# SPDX-License-Identifier: Apache-2.0
"""Pure helpers: size parsing, buffer/DLPack/pointer spans, address tables."""

from __future__ import annotations

import numpy as np
import pytest

from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.kvpool.memory import (
    check_page_span,
    page_addresses,
    parse_size,
    piece_addresses,
    span_of,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8GiB", 8 << 30),
        ("16KiB", 16384),
        ("4096", 4096),
        ("1.5MB", 1_500_000),
        (512, 512),
        ("2 gib", 2 << 30),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "8 XB", "-1", "1e9"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_size(text)


def test_span_of_numpy_bytearray_and_pointer() -> None:
    arr = np.zeros((4, 16), np.uint8)
    span = span_of(arr, writable=True)
    assert (span.address, span.nbytes) == (arr.ctypes.data, 64)
    buf = bytearray(32)
    assert span_of(buf, writable=True).nbytes == 32
    assert span_of(1234, writable=True, nbytes=10).address == 1234
    with pytest.raises(InvalidArgumentError, match="nbytes"):
        span_of(1234, writable=True)
    with pytest.raises(InvalidArgumentError, match="read-only"):
        span_of(b"abc", writable=True)
    assert span_of(b"abc", writable=False).nbytes == 3
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        span_of(arr[:, ::2], writable=True)
    with pytest.raises(InvalidArgumentError, match="neither"):
        span_of(object(), writable=False)


class _DLPackOnly:
    """A tensor-like object that exports only DLPack (as torch tensors do)."""

    def __init__(self, arr: np.ndarray, device: tuple[int, int] = (1, 0)) -> None:
        self._arr = arr
        self._device = device

    def __dlpack__(self, **kwargs: object) -> object:
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device


def test_span_of_dlpack_is_zero_copy_and_refuses_device_memory() -> None:
    arr = np.arange(32, dtype=np.float32)
    span = span_of(_DLPackOnly(arr), writable=True)
    assert span.address == arr.ctypes.data
    assert span.nbytes == 128
    with pytest.raises(InvalidArgumentError, match="not host memory"):
        span_of(_DLPackOnly(arr, device=(2, 0)), writable=True)


def test_page_addresses_and_sizes() -> None:
    addrs = page_addresses(1000, 3, 64)
    assert addrs.dtype == np.uint64
    assert addrs.tolist() == [1000, 1064, 1128]
    span = span_of(np.zeros(128, np.uint8), writable=True)
    check_page_span(span, 2, 64)
    with pytest.raises(InvalidArgumentError, match="wrong page size"):
        check_page_span(span, 3, 64)


def test_piece_addresses_validates_shape_and_lengths() -> None:
    table, lens = piece_addresses(np.array([[8, 16], [24, 32]]), [40, 24], 2, 64)
    assert table.tolist() == [8, 16, 24, 32]
    assert lens.tolist() == [40, 24]
    table, lens = piece_addresses([8, 16], None, 2, 64)
    assert lens.tolist() == [64]
    with pytest.raises(InvalidArgumentError, match="sum to 60"):
        piece_addresses(np.array([[8, 16], [24, 32]]), [40, 20], 2, 64)
    with pytest.raises(InvalidArgumentError, match="shape"):
        piece_addresses(np.array([8, 16, 24]), None, 2, 64)
    with pytest.raises(InvalidArgumentError, match="null"):
        piece_addresses(np.array([0, 16]), None, 2, 64)

# SPDX-License-Identifier: Apache-2.0
"""Frames of the layer server's channel over a real socket pair: tensors round-trip bit for bit
(bfloat16 included), malformed frames are ProtocolError, a closed peer is UnavailableError."""

from __future__ import annotations

import socket
import struct

import msgspec
import numpy as np
import pytest

from banaserve_ext.errors import ProtocolError, UnavailableError
from banaserve_ext.migration.layer_wire import recv_msg, send_msg, to_tensor

torch = pytest.importorskip("torch")


def test_tensors_and_arrays_round_trip_exactly() -> None:
    a, b = socket.socketpair()
    with a, b:
        h = torch.randn(5, 7)
        bf = torch.randn(3, 4).to(torch.bfloat16)
        idx = np.arange(9, dtype=np.int64)
        send_msg(a, {"op": "x", "n": 3}, [("h", h), ("bf", bf), ("idx", idx), ("e", h[:0])])
        header, arrays = recv_msg(b)
        assert header["op"] == "x" and header["n"] == 3
        assert torch.equal(to_tensor(header, arrays, "h"), h)
        got = to_tensor(header, arrays, "bf")
        assert got.dtype == torch.bfloat16 and torch.equal(got, bf)
        assert np.array_equal(arrays["idx"], idx) and arrays["e"].shape == (0, 7)


def _raw_frame(header: dict, payloads: list[bytes]) -> bytes:
    body = msgspec.msgpack.encode(header)
    out = struct.pack(">I", len(body)) + body
    for p in payloads:
        out += struct.pack(">Q", len(p)) + p
    return out


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (_raw_frame({"bufs": [["x", "float32", [3]]]}, [b"\0" * 8]), "do not fill"),
        (_raw_frame({"bufs": [["x", "complex64", [1]]]}, [b"\0" * 8]), "dtype"),
        (struct.pack(">I", 1 << 30), "exceeds"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "malformed"),
        (_raw_frame([1, 2], []), "must be a map"),  # type: ignore[arg-type]
    ],
    ids=["short-buffer", "bad-dtype", "huge-header", "bad-msgpack", "not-a-map"],
)
def test_malformed_frames_are_protocol_errors(frame: bytes, match: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        with pytest.raises(ProtocolError, match=match):
            recv_msg(b)


def test_a_closed_or_silent_peer_is_unavailable() -> None:
    a, b = socket.socketpair()
    with b:
        a.close()
        with pytest.raises(UnavailableError, match="closed"):
            recv_msg(b)
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.2)
        with pytest.raises(UnavailableError, match="no answer"):
            recv_msg(b)

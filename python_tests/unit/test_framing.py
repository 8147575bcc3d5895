# SPDX-License-Identifier: Apache-2.0
"""The one framing of our control sockets (banaserve_ext._framing) over real socket pairs: round
trips, the wire format, short reads, oversized and malformed frames, and that the pool service's
messages, the attention peer's RPC and the layer server's headers all travel in it."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest

from banaserve_ext import _framing
from banaserve_ext.errors import ProtocolError, UnavailableError
from banaserve_ext.kvpool import wire
from banaserve_ext.migration import attn_peer, layer_wire


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    with a, b:
        yield a, b


@pytest.mark.parametrize(
    "obj",
    [
        {"op": "attend", "n": 3, "q": b"\x00\xff" * 100, "nested": [1, [2.5, None], {"k": True}]},
        [],
        "ключ\0",
        b"",
        2**63 - 1,
    ],
    ids=["map", "empty-list", "str", "empty-bytes", "int"],
)
def test_round_trip(pair: tuple[socket.socket, socket.socket], obj: object) -> None:
    a, b = pair
    _framing.send(a, obj)
    _framing.send(a, {"second": 2})  # frames stay separated on the stream
    assert _framing.recv(b) == obj
    assert _framing.recv(b) == {"second": 2}


def test_wire_format_is_a_big_endian_length_then_msgpack(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    body = msgspec.msgpack.encode({"x": list(range(300))})
    frame = _framing.encode({"x": list(range(300))})
    assert frame == struct.pack(">I", len(body)) + body
    a.sendall(struct.pack(">I", 3) + msgspec.msgpack.encode([1, 2]))
    assert _framing.recv(b) == [1, 2]


def test_a_large_frame_arrives_whole_across_many_reads(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    blob = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    t = threading.Thread(target=_framing.send, args=(a, {"blob": blob}))
    t.start()
    got = _framing.recv(b)
    t.join()
    assert got["blob"] == blob


@pytest.mark.parametrize(
    "partial",
    [b"", b"\x00\x00", struct.pack(">I", 10) + b"12345"],
    ids=["nothing", "half-a-length", "half-a-body"],
)
def test_short_read_then_close_is_unavailable_naming_the_channel(partial: bytes) -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(partial)
        a.close()
        with pytest.raises(UnavailableError, match="test channel: connection closed"):
            _framing.recv(b, channel="test channel")


def test_a_silent_peer_is_a_timeout_left_to_the_caller(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.settimeout(0.05)
    a.sendall(struct.pack(">I", 10) + b"123")  # a frame that never completes
    with pytest.raises(TimeoutError):
        _framing.recv(b)


def test_sending_to_a_closed_peer_is_unavailable() -> None:
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(UnavailableError, match="my channel: send failed"):
        for _ in range(100):  # the first sends may still land in the kernel's buffer
            _framing.send(a, b"x" * 65536, channel="my channel")


def test_oversized_frames_are_refused_before_the_body_is_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 1001) + b"\x00" * 1001)
    with pytest.raises(ProtocolError, match="frame of 1001 bytes exceeds the 1000-byte limit"):
        _framing.recv(b, max_bytes=1000)
    assert len(b.recv(4096)) == 1001  # the body was left unread
    # the default limit: a corrupt length (here an HTTP request) must not allocate gigabytes
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="exceeds"):
        _framing.recv(b)
    with pytest.raises(ProtocolError, match="exceeds the 10-byte limit"):
        _framing.encode(b"y" * 20, max_bytes=10)
    with pytest.raises(ProtocolError, match="exceeds"):
        _framing.send(a, b"y" * 20, max_bytes=10)


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\x92\x01", b"\x81\xa1k"],
    ids=["reserved-byte", "truncated-array", "truncated-map"],
)
def test_malformed_bodies_are_protocol_errors(
    pair: tuple[socket.socket, socket.socket], body: bytes
) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match="malformed frame"):
        _framing.recv(b)


def test_a_typed_decoder_refuses_the_wrong_message(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    wire.send(a, wire.Count(3))  # a reply where a request is expected
    with pytest.raises(ProtocolError, match="malformed frame"):
        wire.recv_request(b)
    wire.send(a, wire.Stats())
    assert isinstance(wire.recv_request(b), wire.Stats)


def test_every_control_channel_speaks_the_same_frames(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    # the pool service's messages
    wire.send(a, wire.Remove(["k1", b"k2"]))
    assert _framing.recv(b) == ["remove", ["k1", b"k2"]]
    _framing.send(a, ["count", 7])
    assert wire.recv_reply(b) == wire.Count(7)
    # the attention peer's RPC
    attn_peer.send_frame(a, {"op": "meta"})
    assert _framing.recv(b) == {"op": "meta"}
    _framing.send(a, {"ok": 1})
    assert attn_peer.recv_frame(b) == {"ok": 1}
    # the layer server's header (buffers follow it with their own u64 lengths)
    layer_wire.send_msg(a, {"op": "step"}, [("x", np.arange(3, dtype=np.int64))])
    header = _framing.recv(b)
    assert header["op"] == "step" and header["bufs"] == [["x", "int64", [3]]]
    (size,) = struct.unpack(">Q", _framing.recv_exact(b, 8))
    assert np.frombuffer(_framing.recv_exact(b, size), np.int64).tolist() == [0, 1, 2]

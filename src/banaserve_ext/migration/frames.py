# SPDX-License-Identifier: Apache-2.0
"""Length-prefixed msgpack frames over a stream socket (the admin channel and the attention
peer's RPC). A frame is a 4-byte big-endian length followed by that many msgpack bytes."""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

from ..errors import ProtocolError, UnavailableError

_LEN = struct.Struct(">I")
#: refuse frames larger than this (a corrupt length must not make us allocate gigabytes)
MAX_FRAME = 1 << 30

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def encode_frame(obj: Any) -> bytes:
    body = _enc.encode(obj)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def send_frame(sock: socket.socket, obj: Any) -> None:
    try:
        sock.sendall(encode_frame(obj))
    except OSError as exc:
        raise UnavailableError(f"sending a frame failed: {exc}") from None


def recv_exact(sock: socket.socket, n: int, channel: str = "frame channel") -> bytearray:
    """Exactly ``n`` bytes from ``sock``. A socket timeout propagates as ``TimeoutError`` (the
    caller knows its deadline); a reset or a closed connection is ``UnavailableError`` naming
    ``channel``."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise
        except OSError as exc:
            raise UnavailableError(f"{channel}: receive failed: {exc}") from None
        if k == 0:
            raise UnavailableError(f"{channel}: connection closed by the peer")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame length {n} exceeds the {MAX_FRAME}-byte limit")
    try:
        return _dec.decode(recv_exact(sock, n))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None

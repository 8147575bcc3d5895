# SPDX-License-Identifier: Apache-2.0
"""Length-prefixed msgpack frames: the one framing of every control socket of banaserve_ext.

A frame is a 4-byte big-endian (network order) body length followed by that many bytes of
msgpack. The pool service and its remote clients (:mod:`.kvpool.wire`), the migration admin
channel, the attention peer's RPC and the header of the layer server's frames
(:mod:`.migration.layer_wire`) all speak it.

Errors, the same on every channel: a reset or closed connection is
:class:`~.errors.UnavailableError` naming the channel; a length over the caller's limit or a body
that does not decode is :class:`~.errors.ProtocolError`; a socket timeout propagates as
``TimeoutError`` (the caller knows its deadline and words it). Nothing here retries.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

from .errors import ProtocolError, UnavailableError

#: the length prefix
LENGTH = struct.Struct(">I")
#: default limit of a frame body (a corrupt length must not make us allocate gigabytes)
MAX_FRAME = 64 << 20

_encoder = msgspec.msgpack.Encoder()
_any_decoder = msgspec.msgpack.Decoder()


def encode(obj: Any, *, max_bytes: int = MAX_FRAME) -> bytes:
    """``obj`` as one frame (prefix and body); ProtocolError when the body exceeds
    ``max_bytes``."""
    body = _encoder.encode(obj)
    if len(body) > max_bytes:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    return LENGTH.pack(len(body)) + body


def send(
    sock: socket.socket, obj: Any, *, max_bytes: int = MAX_FRAME, channel: str = "control channel"
) -> None:
    """Sends ``obj`` as one frame."""
    frame = encode(obj, max_bytes=max_bytes)
    try:
        sock.sendall(frame)
    except TimeoutError:
        raise
    except OSError as exc:
        raise UnavailableError(f"{channel}: send failed: {exc}") from None


def recv_exact(sock: socket.socket, n: int, channel: str = "control channel") -> bytearray:
    """Exactly ``n`` bytes from ``sock``."""
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


def recv_body(
    sock: socket.socket, *, max_bytes: int = MAX_FRAME, channel: str = "control channel"
) -> bytearray:
    """The body of the next frame, undecoded."""
    (n,) = LENGTH.unpack(recv_exact(sock, LENGTH.size, channel))
    if n > max_bytes:
        raise ProtocolError(f"{channel}: frame of {n} bytes exceeds the {max_bytes}-byte limit")
    return recv_exact(sock, n, channel)


def decode(body: bytes | bytearray, decoder: msgspec.msgpack.Decoder | None = None) -> Any:
    """A frame body decoded with ``decoder`` (any msgpack value when None)."""
    try:
        return (decoder or _any_decoder).decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None


def recv(
    sock: socket.socket,
    decoder: msgspec.msgpack.Decoder | None = None,
    *,
    max_bytes: int = MAX_FRAME,
    channel: str = "control channel",
) -> Any:
    """The next frame, decoded with ``decoder`` (a typed msgspec decoder, or any msgpack value
    when None)."""
    return decode(recv_body(sock, max_bytes=max_bytes, channel=channel), decoder)

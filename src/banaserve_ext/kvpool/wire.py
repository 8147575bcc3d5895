# SPDX-License-Identifier: Apache-2.0
"""Control messages between a remote client (:class:`~.remote.RemoteKVPool`) and the pool
service (:class:`~.server.PoolServer`).

One request, one reply, on a plain TCP connection, each one frame of :mod:`.._framing` (a
4-byte big-endian length, then a msgpack message). Page bytes never travel here: a request
carries the client's piece addresses and the service moves the pages with the transfer engine.
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from .. import _framing
from ..errors import STATUS_CODE_TO_ERROR, BanaserveError, InternalError

#: 2: frames moved to the shared big-endian framing (1 had a little-endian length)
PROTOCOL_VERSION = 2
MAX_FRAME = _framing.MAX_FRAME
CHANNEL = "pool control connection"


class Hello(msgspec.Struct, tag="hello", array_like=True):
    version: int
    pool: str  # "" = whatever pool the service serves
    engine: bytes  # the client's transfer-engine metadata


class Exists(msgspec.Struct, tag="exists", array_like=True):
    keys: list[Any]
    suffix: str = ""
    mask: bool = False  # reply a mask per key instead of the count of leading hits


class Get(msgspec.Struct, tag="get", array_like=True):
    keys: list[Any]
    addrs: bytes  # uint64 piece addresses in the client, n * len(seg_lens)
    seg_lens: bytes  # uint64 piece lengths, summing to the page size
    suffix: str = ""
    engine: bytes = b""  # fresh client metadata when its registrations changed


class Put(msgspec.Struct, tag="put", array_like=True):
    keys: list[Any]
    addrs: bytes
    seg_lens: bytes
    suffix: str = ""
    engine: bytes = b""


class Remove(msgspec.Struct, tag="remove", array_like=True):
    keys: list[Any]


class Stats(msgspec.Struct, tag="stats", array_like=True):
    pass


Request = Hello | Exists | Get | Put | Remove | Stats


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    pool: str
    page_size: int
    num_pages: int
    max_key_len: int
    segment_id: int


class Count(msgspec.Struct, tag="count", array_like=True):
    value: int


class Mask(msgspec.Struct, tag="mask", array_like=True):
    data: bytes  # one byte per key


class StatsReply(msgspec.Struct, tag="stats_reply", array_like=True):
    stats: dict[str, int | bool]


class Error(msgspec.Struct, tag="error", array_like=True):
    code: int  # a banaserve_ext.errors code
    message: str


Reply = Welcome | Count | Mask | StatsReply | Error

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def error_reply(exc: BaseException) -> Error:
    code = exc.code if isinstance(exc, BanaserveError) else InternalError.code
    return Error(code=code, message=str(exc) or type(exc).__name__)


def raise_error(reply: Error) -> None:
    raise STATUS_CODE_TO_ERROR.get(reply.code, InternalError)(reply.message)


def send(sock: socket.socket, msg: Any) -> None:
    _framing.send(sock, msg, max_bytes=MAX_FRAME, channel=CHANNEL)


def recv_request(sock: socket.socket) -> Any:
    return _framing.recv(sock, _request_decoder, max_bytes=MAX_FRAME, channel=CHANNEL)


def recv_reply(sock: socket.socket) -> Any:
    return _framing.recv(sock, _reply_decoder, max_bytes=MAX_FRAME, channel=CHANNEL)


def parse_address(address: str, *, listen: bool = False) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; InvalidArgumentError otherwise. Port 0 (any free
    port) only where ``listen``."""
    from ..errors import InvalidArgumentError

    host, sep, port = address.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise InvalidArgumentError(f"pool address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)

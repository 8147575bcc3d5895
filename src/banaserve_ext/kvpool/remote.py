# SPDX-License-Identifier: Apache-2.0
"""``RemoteKVPool``: a pool on another host, reached through ``banaserve pool serve --listen``.

The methods and results are those of :class:`~.pool.KVPool` (``batch_exists``,
``exists_mask``, ``batch_get``, ``batch_set``, ``remove``, ``stats``), so a caller such as the
HiCache backend can hold either. Each call is one request on a control connection plus, for
``batch_get``/``batch_set``, one transfer-engine batch that the service runs between the pool's
pages and this process's memory (TCP). This process's memory is registered with a local engine:
buffers given to :meth:`register` stay registered; any other memory is registered for the call
(the last such range is kept for the next call).

When the service goes away (restart, crash, network), the call in progress raises
:class:`UnavailableError` and the next call connects again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import (
    InvalidArgumentError,
    ProtocolError,
    ResourceExhaustedError,
    TransferTimeoutError,
    UnavailableError,
)
from ..transfer import Registration, TransferEngine
from . import wire
from .memory import caller_pieces, covering_range, piece_descriptors, span_of
from .pool import Keys, PutResult


def _key_list(keys: Keys) -> list[Any] | tuple[Any, ...]:
    return keys if isinstance(keys, (list, tuple)) else list(keys)


class RemoteKVPool:
    """Client of a remote pool service at ``address`` (``"host:port"``).

    ``pool`` optionally names the pool the caller expects (NotFoundError when the service
    serves another); ``page_size`` likewise (InvalidArgumentError on a mismatch).
    ``timeout_s`` bounds one call (keep it above the service's transfer timeout).
    The constructor stores configuration; :meth:`start` (or ``with``) starts the local engine
    and connects.
    """

    def __init__(
        self,
        address: str,
        *,
        pool: str = "",
        page_size: int | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        tcp_lanes: int | None = None,
    ) -> None:
        self.address = address
        self.host, self.port = wire.parse_address(address)
        self.name = pool
        self._page_size = page_size
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.tcp_lanes = tcp_lanes
        self._lock = threading.RLock()
        self._engine: TransferEngine | None = None
        self._sock: socket.socket | None = None
        self._welcome: wire.Welcome | None = None
        self._regs: list[tuple[int, int, Registration]] = []  # (lo, hi, registration)
        self._temp: tuple[int, int, Registration] | None = None
        self._reg_gen = 0
        self._sent_gen = -1

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> RemoteKVPool:
        with self._lock:
            if self._sock is None:
                self._connect()
        return self

    def close(self) -> None:
        with self._lock:
            self._drop()
            for _, _, reg in self._regs:
                reg.release()
            self._regs.clear()
            if self._engine is not None:
                self._engine.stop()
                self._engine = None

    def __enter__(self) -> RemoteKVPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- properties (of the pool behind the service) -------------------------------------------
    def _info(self) -> wire.Welcome:
        with self._lock:
            if self._welcome is None:
                self._connect()
            assert self._welcome is not None
            return self._welcome

    @property
    def page_size(self) -> int:
        return self._info().page_size

    @property
    def num_pages(self) -> int:
        return self._info().num_pages

    @property
    def max_key_len(self) -> int:
        return self._info().max_key_len

    @property
    def segment_id(self) -> int:
        return self._info().segment_id

    # -- memory --------------------------------------------------------------------------------
    def register(self, buf: Any, nbytes: int | None = None) -> None:
        """Keeps ``buf`` (a buffer, CPU tensor, or int pointer with ``nbytes``) registered for
        every later call, e.g. SGLang's host KV pool; other memory is registered per call."""
        span = span_of(buf, writable=False, nbytes=nbytes)
        with self._lock:
            self._release_temp()
            reg = self._engine_live().register(buf if nbytes is None else span.address, nbytes)
            self._regs.append((span.address, span.address + span.nbytes, reg))
            self._reg_gen += 1

    # -- data path -----------------------------------------------------------------------------
    def batch_exists(self, keys: Keys, *, suffix: str = "") -> int:
        """Number of leading keys that are stored (stops at the first miss)."""
        if len(keys) == 0:
            return 0
        reply = self._rpc(lambda: wire.Exists(keys=_key_list(keys), suffix=suffix))
        return int(self._expect(reply, wire.Count).value)

    def exists_mask(self, keys: Keys, *, suffix: str = "") -> np.ndarray:
        if len(keys) == 0:
            return np.zeros(0, dtype=bool)
        reply = self._rpc(lambda: wire.Exists(keys=_key_list(keys), suffix=suffix, mask=True))
        return np.frombuffer(self._expect(reply, wire.Mask).data, dtype=np.uint8).astype(bool)

    def batch_get(
        self,
        keys: Keys,
        dst: Any = None,
        *,
        nbytes: int | None = None,
        addrs: Any = None,
        seg_lens: Any = None,
        suffix: str = "",
    ) -> np.ndarray:
        """As :meth:`KVPool.batch_get`: copies each stored key's page into caller memory and
        returns a bool "found" per key."""
        flat, lens, keepalive = caller_pieces(
            dst, addrs, seg_lens, nbytes, len(keys), self.page_size, writable=True
        )
        if len(keys) == 0:
            return np.zeros(0, dtype=bool)
        reply = self._rpc(self._io_request(wire.Get, keys, flat, lens, suffix))
        del keepalive
        return np.frombuffer(self._expect(reply, wire.Mask).data, dtype=np.uint8).astype(bool)

    def batch_set(
        self,
        keys: Keys,
        src: Any = None,
        *,
        nbytes: int | None = None,
        addrs: Any = None,
        seg_lens: Any = None,
        suffix: str = "",
        raise_on_full: bool = True,
    ) -> np.ndarray:
        """As :meth:`KVPool.batch_set`: a uint8 :class:`PutResult` per key; ``NO_SPACE`` keys
        raise :class:`ResourceExhaustedError` (after the others are stored) with
        ``raise_on_full``."""
        flat, lens, keepalive = caller_pieces(
            src, addrs, seg_lens, nbytes, len(keys), self.page_size, writable=False
        )
        if len(keys) == 0:
            return np.zeros(0, dtype=np.uint8)
        reply = self._rpc(self._io_request(wire.Put, keys, flat, lens, suffix))
        del keepalive
        results = np.frombuffer(self._expect(reply, wire.Mask).data, dtype=np.uint8).copy()
        if raise_on_full:
            full = int(np.count_nonzero(results == PutResult.NO_SPACE))
            if full:
                raise ResourceExhaustedError(
                    f"pool at {self.address}: no space for {full} of {len(results)} pages "
                    "(every page is pinned or reserved); the others were stored"
                )
        return results

    def remove(self, keys: Keys) -> int:
        if len(keys) == 0:
            return 0
        return int(self._expect(self._rpc(lambda: wire.Remove(_key_list(keys))), wire.Count).value)

    def stats(self) -> dict[str, int | bool]:
        return dict(self._expect(self._rpc(wire.Stats), wire.StatsReply).stats)

    # -- internals -----------------------------------------------------------------------------
    def _engine_live(self) -> TransferEngine:
        if self._engine is None:
            self._connect()
        assert self._engine is not None
        return self._engine

    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        except OSError as exc:
            raise UnavailableError(
                f"cannot reach the pool service at {self.address}: {exc}"
            ) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
            if self._engine is None:
                # Listen where the service reaches us: the local end of this connection.
                self._engine = TransferEngine(
                    backends=("tcp",), tcp_host=sock.getsockname()[0], tcp_lanes=self.tcp_lanes
                ).start()
            gen = self._reg_gen
            hello = wire.Hello(
                version=wire.PROTOCOL_VERSION, pool=self.name, engine=self._engine.metadata()
            )
            reply = self._exchange(sock, hello)
        except BaseException:
            sock.close()
            raise
        if isinstance(reply, wire.Error):
            sock.close()
            wire.raise_error(reply)
        welcome = self._expect(reply, wire.Welcome)
        if self._page_size is not None and welcome.page_size != self._page_size:
            sock.close()
            raise InvalidArgumentError(
                f"pool {welcome.pool!r} at {self.address} holds pages of {welcome.page_size} "
                f"bytes, not {self._page_size}"
            )
        self._sock, self._welcome, self._sent_gen = sock, welcome, gen

    def _exchange(self, sock: socket.socket, req: Any) -> Any:
        try:
            wire.send(sock, req)
            return wire.recv_reply(sock)
        except TimeoutError:
            raise TransferTimeoutError(
                f"pool service at {self.address} did not answer {type(req).__name__.lower()} "
                f"within {self.timeout_s} s"
            ) from None
        except (OSError, EOFError) as exc:
            raise UnavailableError(
                f"pool service at {self.address} went away during "
                f"{type(req).__name__.lower()} ({exc or type(exc).__name__}); "
                "the next call connects again"
            ) from None

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._release_temp()

    def _release_temp(self) -> None:
        temp, self._temp = self._temp, None
        if temp is not None:
            temp[2].release()
            self._reg_gen += 1

    def _rpc(self, build: Callable[[], Any]) -> Any:
        with self._lock:
            if self._sock is None:
                self._connect()
            req = build()
            assert self._sock is not None
            try:
                reply = self._exchange(self._sock, req)
            except (UnavailableError, TransferTimeoutError, ProtocolError):
                self._drop()
                raise
        if isinstance(reply, wire.Error):
            wire.raise_error(reply)
        return reply

    def _io_request(
        self, kind: type, keys: Keys, flat: np.ndarray, lens: np.ndarray, suffix: str
    ) -> Callable[[], Any]:
        def build() -> Any:
            lo, hi = covering_range(piece_descriptors(flat, lens))
            return kind(
                keys=_key_list(keys),
                addrs=flat.tobytes(),
                seg_lens=lens.tobytes(),
                suffix=suffix,
                engine=self._registered(lo, hi),
            )

        return build

    def _registered(self, lo: int, hi: int) -> bytes:
        """Makes [lo, hi) registered; returns fresh engine metadata when registrations changed
        since the service last saw them (else b"")."""
        covered = any(a <= lo and hi <= b for a, b, _ in self._regs) or (
            self._temp is not None and self._temp[0] <= lo and hi <= self._temp[1]
        )
        engine = self._engine_live()
        if not covered:
            self._release_temp()
            self._temp = (lo, hi, engine.register(lo, nbytes=hi - lo))
            self._reg_gen += 1
        if self._sent_gen == self._reg_gen:
            return b""
        self._sent_gen = self._reg_gen
        return engine.metadata()

    @staticmethod
    def _expect(reply: Any, kind: type) -> Any:
        if not isinstance(reply, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {type(reply).__name__}")
        return reply

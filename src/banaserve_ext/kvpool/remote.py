# SPDX-License-Identifier: Apache-2.0
"""``RemoteKVPool``: a pool on another host, reached through ``banaserve pool serve --listen``.

It is a :class:`~.store.KVStore` like :class:`~.pool.KVPool` (same methods, same results), so a
caller such as the HiCache backend can hold either. Each call is one request on a control
connection plus, for ``batch_get``/``batch_set``, one transfer-engine batch that the service
runs between the pool's pages and this process's memory (TCP). This process's memory is
registered with a local engine: buffers given to :meth:`register` stay registered; any other
memory is registered for the call (and kept until a later call needs other memory).

When the service goes away (restart, crash, network), the call in progress raises
:class:`UnavailableError` and the next call connects again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import (
    InvalidArgumentError,
    ProtocolError,
    TransferTimeoutError,
    UnavailableError,
)
from ..transfer import Registration, TransferEngine
from . import wire
from .memory import caller_pieces, covering_range, piece_descriptors, span_of
from .pool import raise_if_no_space
from .store import Keys, KVStore


@dataclass
class _Kept:
    """A registration of [lo, hi) with the objects whose memory it covers (kept alive)."""

    lo: int
    hi: int
    reg: Registration
    owners: list[Any]


def _uncovered(table: np.ndarray, regs: Sequence[_Kept]) -> np.ndarray:
    """A bool per ``(addr, nbytes)`` row: inside none of ``regs``."""
    ends = table[:, 0] + table[:, 1]
    out = np.ones(table.shape[0], dtype=bool)
    for k in regs:
        out &= ~((table[:, 0] >= np.uint64(k.lo)) & (ends <= np.uint64(k.hi)))
    return out


def _key_list(keys: Keys) -> list[Any] | tuple[Any, ...]:
    return keys if isinstance(keys, (list, tuple)) else list(keys)


class RemoteKVPool(KVStore):
    """A :class:`~.store.KVStore`: client of a remote pool service at ``address``
    (``"host:port"``).

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
        self._regs: list[_Kept] = []  # kept for every call (register())
        self._temps: list[_Kept] = []  # the last call's own range, kept until a call needs more
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
            for k in self._regs:
                k.reg.release()
            self._regs.clear()
            if self._engine is not None:
                self._engine.stop()
                self._engine = None

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
        """Keeps ``buf`` (a buffer, CPU tensor, or int pointer with ``nbytes``) registered with
        the local engine for every later call; other memory is registered per call."""
        span = span_of(buf, writable=False, nbytes=nbytes)
        with self._lock:
            self._release_temp()
            self._keep(span.address, span.address + span.nbytes, [buf, span.keepalive])

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
        """As :meth:`.KVStore.batch_get`: one request, then the service writes the found pages
        into this process's memory."""
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
        """As :meth:`.KVStore.batch_set`: one request, then the service reads the pages from
        this process's memory into reserved slots and commits them."""
        flat, lens, keepalive = caller_pieces(
            src, addrs, seg_lens, nbytes, len(keys), self.page_size, writable=False
        )
        if len(keys) == 0:
            return np.zeros(0, dtype=np.uint8)
        reply = self._rpc(self._io_request(wire.Put, keys, flat, lens, suffix))
        del keepalive
        results = np.frombuffer(self._expect(reply, wire.Mask).data, dtype=np.uint8).copy()
        if raise_on_full:
            raise_if_no_space(results, f"pool at {self.address}")
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
        except OSError as exc:  # UnavailableError from the framing is one too
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
        temps, self._temps = self._temps, []
        for k in temps:
            k.reg.release()
        if temps:
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
            return kind(
                keys=_key_list(keys),
                addrs=flat.tobytes(),
                seg_lens=lens.tobytes(),
                suffix=suffix,
                engine=self._registered(piece_descriptors(flat, lens)),
            )

        return build

    def _registered(self, table: np.ndarray) -> bytes:
        """Makes every ``(addr, nbytes)`` row of ``table`` registered; returns fresh engine
        metadata when registrations changed since the service last saw them (else b"").

        Memory outside the kept registrations gets one per-call range. Where that range would
        touch a kept registration, the kept one grows to cover it instead: the engine coalesces
        neighbouring pieces into one run, and a run must lie inside one registered region."""
        engine = self._engine_live()
        if _uncovered(table, (*self._regs, *self._temps)).any():
            self._release_temp()
            rows = table[_uncovered(table, self._regs)]
            if rows.shape[0]:
                lo, hi = covering_range(rows)
                if any(k.lo <= hi and lo <= k.hi for k in self._regs):
                    self._keep(lo, hi, [])
                else:
                    self._temps.append(_Kept(lo, hi, engine.register(lo, nbytes=hi - lo), []))
                    self._reg_gen += 1
        if self._sent_gen == self._reg_gen:
            return b""
        self._sent_gen = self._reg_gen
        return engine.metadata()

    def _keep(self, lo: int, hi: int, owners: list[Any]) -> None:
        """Keeps [lo, hi) registered, merged with every kept registration it touches."""
        engine = self._engine_live()
        absorbed: list[_Kept] = []
        touching = [k for k in self._regs if k.lo <= hi and lo <= k.hi]
        while touching:
            for k in touching:
                self._regs.remove(k)
                absorbed.append(k)
                lo, hi = min(lo, k.lo), max(hi, k.hi)
            touching = [k for k in self._regs if k.lo <= hi and lo <= k.hi]
        for k in absorbed:
            k.reg.release()
            owners.extend(k.owners)
        self._reg_gen += 1
        self._regs.append(_Kept(lo, hi, engine.register(lo, nbytes=hi - lo), owners))

    @staticmethod
    def _expect(reply: Any, kind: type) -> Any:
        if not isinstance(reply, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {type(reply).__name__}")
        return reply

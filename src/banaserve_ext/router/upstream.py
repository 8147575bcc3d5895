# SPDX-License-Identifier: Apache-2.0
"""Keep-alive HTTP/1.1 connection pools to the workers, on asyncio protocols.

One :class:`Exchange` is one request/response on one connection. The response head and the end
of the body are futures; body pieces either accumulate or go to a *sink* callback as they arrive
(stream passthrough without a task hop). A connection whose response completed with keep-alive
returns to its pool by itself; a cancelled exchange aborts its connection (so the worker sees
the client go away). Every socket gets ``TCP_NODELAY``.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

from ..errors import ProtocolError, UnavailableError
from .http11 import ResponseHead, ResponseParser


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - closed under us
            pass


class Exchange:
    """One request/response on one upstream connection."""

    __slots__ = (
        "conn",
        "head",
        "done",
        "parts",
        "sink",
        "nbytes",
        "reused",
        "got_head",
        "aborted",
        "finished",
        "completed",
        "flush",
        "on_finish",
    )

    def __init__(self, conn: UpstreamConnection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.head: asyncio.Future[ResponseHead] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.parts: list[bytes] = []
        self.sink: Callable[[bytes], None] | None = None
        self.nbytes = 0
        self.reused = conn.uses > 0
        self.got_head = False
        self.aborted = False
        self.finished = False  # the response completed or failed (futures may be cancelled)
        self.completed = False  # the whole response arrived
        #: called after each batch of received bytes has been parsed (coalesces sink writes)
        self.flush: Callable[[], None] | None = None
        #: called once the exchange has finished, whichever way
        self.on_finish: Callable[[], None] | None = None

    def set_sink(
        self, sink: Callable[[bytes], None], flush: Callable[[], None] | None = None
    ) -> None:
        """Send body pieces to ``sink`` from now on (pieces already received go first), and
        call ``flush`` after each read from the socket has been parsed."""
        parts, self.parts = self.parts, []
        for p in parts:
            sink(p)
        self.sink = sink
        self.flush = flush
        if flush is not None:
            flush()

    def body(self) -> bytes:
        return b"".join(self.parts)

    def abort(self) -> None:
        """Give up on this exchange: the connection is closed, never reused."""
        if not self.finished:
            self.aborted = True
            self.finished = True
            self.conn.abort()
            if self.on_finish is not None:
                self.on_finish()

    # parser callbacks
    def _on_head(self, head: ResponseHead) -> None:
        self.got_head = True
        if not self.head.done():
            self.head.set_result(head)

    def _on_body(self, piece: bytes) -> None:
        self.nbytes += len(piece)
        if self.sink is not None:
            self.sink(piece)
        else:
            self.parts.append(piece)

    def _on_end(self) -> None:
        self.finished = True
        self.completed = True
        if not self.done.done():
            self.done.set_result(None)
        if self.on_finish is not None:
            self.on_finish()

    def _fail(self, exc: BaseException) -> None:
        self.finished = True
        for fut in (self.head, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: the caller may await only one of them
        if self.on_finish is not None:
            self.on_finish()


def finished_or_failed(
    loop: asyncio.AbstractEventLoop, wait: tuple[Exchange, ...], watch: tuple[Exchange, ...] = ()
) -> asyncio.Future[None]:
    """A future that resolves once every exchange of ``wait`` has finished (one task wake-up for
    all), or as soon as any exchange of ``wait`` or ``watch`` has failed: its partner may wait for
    it forever (a PD prefill whose decode died waits for the decode's bootstrap until SGLang's
    timeout)."""
    fut: asyncio.Future[None] = loop.create_future()
    every = wait + watch

    def check() -> None:
        if fut.done():
            return
        failed = any(e.finished and not e.completed for e in every)
        if failed or all(e.finished for e in wait):
            fut.set_result(None)

    for e in every:
        e.on_finish = check
    check()
    return fut


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.parser: ResponseParser | None = None
        self.closed = False
        self.uses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def start(self, data: bytes, head_request: bool = False) -> Exchange:
        assert self.transport is not None and self.exchange is None
        ex = Exchange(self, self.pool.loop)
        self.exchange = ex
        self.parser = ResponseParser(ex._on_head, ex._on_body, self._on_end, head_request)
        self.uses += 1
        self.transport.write(data)
        return ex

    def _on_end(self) -> None:
        ex, parser = self.exchange, self.parser
        self.exchange = None
        self.parser = None
        if ex is None or parser is None:
            return
        if parser.keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.abort()
        ex._on_end()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            self.abort()  # bytes with no request pending: the connection is out of sync
            return
        ex = self.exchange
        try:
            parser.feed(data)
            if ex is not None and ex.flush is not None:
                ex.flush()
        except ProtocolError as exc:
            self.exchange = None
            self.parser = None
            self.abort()
            if ex is not None:
                ex._fail(UnavailableError(f"{self.pool.url}: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        ex, parser = self.exchange, self.parser
        self.exchange = None
        self.parser = None
        if ex is None or parser is None:
            return
        try:
            completed = parser.eof()
        except ProtocolError:
            completed = False
        if completed:
            ex._on_end()
        else:
            why = f": {exc}" if exc else ""
            ex._fail(UnavailableError(f"{self.pool.url} closed the connection mid-response{why}"))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections to one worker."""

    def __init__(
        self,
        url: str,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        max_idle: int = 64,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.loop = loop
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.host_header = f"{host}:{port}"
        self._idle: deque[UpstreamConnection] = deque()
        self.opened = 0
        self.closed = False

    def release(self, conn: UpstreamConnection) -> None:
        if not self.closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.abort()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def idle_connection(self) -> UpstreamConnection | None:
        while self._idle:
            conn = self._idle.pop()  # most recently used: warmest
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout_s,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UnavailableError(f"cannot connect to {self.url}: {exc or 'timeout'}") from None
        self.opened += 1
        return proto

    async def acquire(self) -> UpstreamConnection:
        conn = self.idle_connection()
        if conn is not None:
            return conn
        return await self.connect()

    def close(self) -> None:
        """Close idle connections; busy ones close when their exchange ends."""
        self.closed = True
        while self._idle:
            self._idle.pop().abort()

    async def fetch(
        self, data: bytes, timeout_s: float | None = None, head_request: bool = False
    ) -> tuple[ResponseHead, bytes]:
        """One whole request/response, for control-plane calls (health, loads, admin fan-out).
        A stale keep-alive connection is retried once on a fresh one."""
        for attempt in range(2):
            conn = await self.acquire()
            ex = conn.start(data, head_request)
            try:
                head = await asyncio.wait_for(asyncio.shield(ex.head), timeout_s)
                await asyncio.wait_for(asyncio.shield(ex.done), timeout_s)
                return head, ex.body()
            except UnavailableError:
                if attempt == 0 and ex.reused and not ex.got_head:
                    continue
                raise
            except asyncio.TimeoutError:
                ex.abort()
                raise UnavailableError(f"{self.url} did not answer within {timeout_s} s") from None
            except BaseException:
                ex.abort()
                raise
        raise AssertionError("unreachable")

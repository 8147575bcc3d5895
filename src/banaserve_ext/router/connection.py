# SPDX-License-Identifier: Apache-2.0
"""One accepted client connection: HTTP/1.1 parsing, requests run one at a time in order
(pipelining), keep-alive, ``Expect: 100-continue``, write backpressure, and the cancellation of
the running request when the client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError, ProtocolError
from .http11 import HttpError, Request, RequestParser, build_response, build_stream_head
from .payload import error_body
from .upstream import set_nodelay

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger("banaserve_ext.router")


class ClientConnection(asyncio.Protocol):
    """One accepted client connection: parses requests and runs them one at a time."""

    def __init__(self, router: Router, metrics_only: bool = False) -> None:
        self.router = router
        self.metrics_only = metrics_only
        self.parser = RequestParser(router.cfg.max_payload_size)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.pending: deque[Request] = deque()
        self.lost = False
        self.close_after = False
        self.paused = False
        self.on_resume: list[Callable[[], None]] = []

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        self.router._conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            reqs = self.parser.feed(data)
        except HttpError as exc:
            self._reject(exc.status, str(exc))
            return
        except (ProtocolError, InvalidArgumentError) as exc:
            self._reject(400, str(exc))
            return
        if self.parser.expect_continue:
            self.parser.expect_continue = False
            if self.transport is not None and not reqs:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        for req in reqs:
            if self.task is None and not self.pending:
                self._run(req)
            else:
                self.pending.append(req)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.router._conns.discard(self)
        if self.task is not None:
            self.task.cancel()
        for cb in self.on_resume:
            cb()
        self.on_resume.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        cbs, self.on_resume = self.on_resume, []
        for cb in cbs:
            cb()

    # request loop
    def _run(self, req: Request) -> None:
        if self.metrics_only:
            coro = self.router.handle_metrics(req, self)
        else:
            coro = self.router.handle(req, self)
        self.task = task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self.task = None
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("handler failed: %r", exc, exc_info=exc)
                self.close_after = True
                if self.transport is not None and not self.lost:
                    self.transport.abort()
                return
        if self.lost:
            return
        if self.close_after:
            if self.transport is not None:
                self.transport.close()
            return
        if self.pending:
            self._run(self.pending.popleft())

    def _reject(self, status: int, message: str) -> None:
        self.close_after = True
        self.parser = RequestParser(0)
        if self.task is None and self.transport is not None:
            self.transport.write(
                build_response(status, error_body(message, status), "application/json", False)
            )
            self.transport.close()

    # writing
    def respond(
        self,
        req: Request,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        if self.lost or self.transport is None:
            return
        keep = req.keep_alive and not self.router.draining
        self.transport.write(build_response(status, body, ctype, keep, extra))
        if not keep:
            self.close_after = True

    def stream_head(self, req: Request, status: int, ctype: str) -> bytes:
        """The head of a chunked answer (written by the caller, with the first chunks)."""
        keep = req.keep_alive and not self.router.draining
        if not keep:
            self.close_after = True
        return build_stream_head(status, ctype, keep)

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

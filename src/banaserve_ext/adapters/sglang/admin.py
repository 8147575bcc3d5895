# SPDX-License-Identifier: Apache-2.0
"""``POST /banaserve/migrate`` on an SGLang server; handlers run on the scheduler thread.

Contract: a feature that provides kinds calls ``host.state("admin").register(kind, fn,
quiescent=...)`` from its ``activate`` (or :func:`register_migration_handler`, which does the same
on this process's host). A POST with JSON body ``{"kind": kind, ...}`` runs ``fn(scheduler, body)``
ON the scheduler thread between two event-loop steps (no forward in flight); ``body`` is the
decoded dict (``kind`` included) and ``fn`` returns a JSON-able dict, merged into the reply
``{"kind", "duration_ms", ...}``. Raise :mod:`banaserve_ext.errors` classes for typed failures
(InvalidArgument → 400, NotFound → 404, ...). Built-in kinds: ``status`` (running requests).

How a request travels: the HTTP server process (where the plug-in adds the route to SGLang's
FastAPI ``app``) connects to a Unix socket in the abstract namespace, named after the HTTP port,
that the scheduler process listens on. A small listener thread there queues the request; an
AROUND hook on ``Scheduler.ingest_requests`` (called once per event-loop iteration, before the
next batch is chosen) drains the queue on the scheduler thread and answers. With overlap
scheduling a forward may be in flight during ``ingest_requests``, so kinds registered with
``quiescent=True`` (the default) are refused there; tensor parallelism (several schedulers) is
refused too: the handler would run on rank 0 only.

A scheduler started with ``--sleep-on-idle`` blocks, when idle, in a poll on its ZMQ sockets (up
to 1 s): the listener writes a byte to a pipe for every queued job, and the pipe's read end is
registered in that poll (``Scheduler.idle_sleeper.poller``), so a job wakes an idle scheduler at
once instead of waiting out the poll.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..._framing import recv as recv_frame
from ..._framing import send as send_frame
from ...errors import (
    AlreadyExistsError,
    BanaserveError,
    InvalidArgumentError,
    NotFoundError,
    NotSupportedError,
    OutOfRangeError,
    ResourceExhaustedError,
    TransferTimeoutError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

ROUTE = "/banaserve/migrate"
#: how long the HTTP side waits for the scheduler's answer
REPLY_TIMEOUT_S = 120.0

Handler = Callable[[Any, dict], dict]


class MigrateRequest(msgspec.Struct, forbid_unknown_fields=False):
    """The part of every body the plumbing reads; kind-specific fields pass through."""

    kind: str


@dataclass(frozen=True)
class _Entry:
    fn: Handler
    quiescent: bool


_STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (msgspec.ValidationError, 400),
    (InvalidArgumentError, 400),
    (OutOfRangeError, 400),
    (NotFoundError, 404),
    (AlreadyExistsError, 409),
    (ResourceExhaustedError, 507),
    (NotSupportedError, 501),
    (UnavailableError, 503),
    (TransferTimeoutError, 504),
)


def register_migration_handler(kind: str, fn: Handler, *, quiescent: bool = True) -> None:
    """Registers (or replaces) ``kind`` on this process's admin channel (the ``admin`` feature
    must be active: the server opted into a feature that needs it)."""
    from . import host

    h = host.current()
    channel = h.state("admin") if h is not None else None
    if channel is None:
        raise NotSupportedError("the banaserve admin channel is not active in this process")
    channel.register(kind, fn, quiescent=quiescent)


def http_status_for(exc: BaseException) -> int:
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_reply(exc: BaseException) -> dict:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def socket_name(port: int) -> str:
    """The scheduler's admin socket for the HTTP server on ``port`` (abstract namespace: no
    file to clean up, gone with the process)."""
    return f"\0banaserve-admin-{int(port)}"


# ---- the scheduler side ------------------------------------------------------------------------
@dataclass
class _Job:
    body: dict
    done: threading.Event = field(default_factory=threading.Event)
    reply: tuple[int, dict] = (500, {})
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class AdminListener:
    """The scheduler process's end of the admin channel. The constructor stores config;
    :meth:`start` binds the socket and starts the accept thread."""

    def __init__(self, port: int, run: Callable[[Any, Any], tuple[int, dict]]) -> None:
        self.port = port
        self._run = run
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        #: the wake-up pipe: a byte per queued job (read end, write end)
        self._wake: tuple[int, int] | None = None
        self.disabled = False

    def start(self) -> AdminListener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(socket_name(self.port))
        sock.listen(16)
        self._sock = sock
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake = (r, w)
        threading.Thread(target=self._accept_loop, name="banaserve-admin", daemon=True).start()
        logger.info("banaserve admin channel listening for HTTP port %d", self.port)
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                msg = recv_frame(conn)
            except BanaserveError as exc:
                send_frame(conn, [400, error_reply(exc)])
                return
            job = _Job(body=msg.get("body") if isinstance(msg, dict) else None)
            timeout = float(msg.get("timeout_s", REPLY_TIMEOUT_S)) if isinstance(msg, dict) else 1
            self._jobs.put(job)
            self._poke()
            if not job.done.wait(timeout):
                with job.lock:
                    job.abandoned = not job.done.is_set()
                if job.abandoned:
                    exc = TransferTimeoutError(f"the scheduler did not run the job in {timeout}s")
                    job.reply = (504, error_reply(exc))
            try:
                send_frame(conn, list(job.reply))
            except BanaserveError:
                pass  # the HTTP side went away; the job ran (or never will)

    @property
    def wake_fd(self) -> int | None:
        """A file descriptor readable while jobs may be queued (None before :meth:`start`)."""
        return self._wake[0] if self._wake else None

    def _poke(self) -> None:
        if self._wake is None:
            return
        try:
            os.write(self._wake[1], b"j")
        except OSError:  # the pipe is full: wake-ups are pending already
            pass

    def _clear_wakeups(self) -> None:
        # before the queue is read: a job queued after this leaves its byte for the next poll
        if self._wake is None:
            return
        try:
            while os.read(self._wake[0], 4096):
                pass
        except BlockingIOError:
            pass

    def drain(self, scheduler: Any) -> None:
        """Runs every queued job; called on the scheduler thread."""
        self._clear_wakeups()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            with job.lock:
                if job.abandoned:
                    continue
            reply = self._run(scheduler, job.body)
            with job.lock:
                job.reply = reply
                job.done.set()


class AdminChannel:
    """The ``admin`` feature in one process: the kinds, and (scheduler) the listener."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.handlers: dict[str, _Entry] = {}
        self.listener: AdminListener | None = None

    def register(self, kind: str, fn: Handler, *, quiescent: bool = True) -> None:
        """Registers (or replaces) the handler of ``kind``; see the module contract."""
        if not kind or not isinstance(kind, str):
            raise InvalidArgumentError("a migration kind must be a non-empty string")
        self.handlers[kind] = _Entry(fn, quiescent)

    def kinds(self) -> list[str]:
        return sorted(self.handlers)

    def run(self, scheduler: Any, body: Any) -> tuple[int, dict]:
        """Validates ``body``, runs its kind's handler, and returns (HTTP status, reply).
        Called on the scheduler thread."""
        t0 = time.perf_counter()
        try:
            if not isinstance(body, dict):
                raise InvalidArgumentError("the body must be a JSON object")
            req = msgspec.convert(body, MigrateRequest)
            entry = self.handlers.get(req.kind)
            if entry is None:
                refused = self.host.refusal_for_kind(req.kind) if self.host else None
                if refused is not None:
                    raise NotSupportedError(refused)
                raise InvalidArgumentError(
                    f"unknown migration kind {req.kind!r}; registered: {self.kinds()}"
                )
            if entry.quiescent and scheduler.enable_overlap:
                raise NotSupportedError(
                    f"kind {req.kind!r} needs a quiescent scheduler; start SGLang with "
                    "--disable-overlap-schedule"
                )
            if int(scheduler.tp_size) != 1:
                raise NotSupportedError("migrations support tp_size == 1 only")
            result = entry.fn(scheduler, body)
            if not isinstance(result, dict):
                raise TypeError(f"handler of {req.kind!r} returned {type(result).__name__}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed reply
            status = http_status_for(exc)
            if status == 500:
                logger.exception("banaserve migrate: handler failed")
            return status, error_reply(exc)
        reply = {"kind": req.kind, "duration_ms": (time.perf_counter() - t0) * 1e3}
        reply.update(result)
        return 200, reply

    def around_ingest_requests(self, original: Callable[..., Any], scheduler: Any, *a: Any,
                               **kw: Any) -> Any:  # fmt: skip
        """AROUND hook of ``Scheduler.ingest_requests``: the original, then the admin jobs."""
        result = original(scheduler, *a, **kw)
        if self.listener is None:
            self.listener = AdminListener(int(scheduler.server_args.port), self.run)
            try:
                self.listener.start()
            except OSError as exc:  # e.g. several schedulers (data parallel) behind one port
                logger.warning("banaserve admin channel not available in this scheduler: %s",
                               exc)  # fmt: skip
                self.listener.disabled = True
            else:
                wake_on_jobs(scheduler, self.listener)
        if not self.listener.disabled:
            self.listener.drain(scheduler)
        return result

    def status_handler(self, scheduler: Any, body: dict) -> dict:
        allocator = scheduler.token_to_kv_pool_allocator
        reqs = [
            {
                "rid": r.rid,
                "req_pool_idx": int(r.kv.req_pool_idx),
                "kv_committed_len": int(r.kv.kv_committed_len),
                "input_len": len(r.origin_input_ids),
                "output_len": len(r.output_ids),
            }
            for r in running_requests(scheduler)
        ]
        return {
            "running": reqs,
            "kv_available": int(allocator.available_size()),
            "kv_total": int(scheduler.max_total_num_tokens),
            "kinds": self.kinds(),
        }


def wake_on_jobs(scheduler: Any, listener: AdminListener) -> bool:
    """Registers the listener's wake-up pipe in the poll an idle scheduler sleeps in (started
    with ``--sleep-on-idle``); True when registered. Without it (no sleeper, or a sleeper that
    does not poll ZMQ) jobs wait for the next loop iteration, at most the sleep (1 s)."""
    sleeper = getattr(scheduler, "idle_sleeper", None)
    poller = getattr(sleeper, "poller", None)
    if poller is None or listener.wake_fd is None:
        if sleeper is not None:
            logger.warning("banaserve admin channel: the idle sleeper %s has no poller; admin "
                           "jobs wait up to its sleep", type(sleeper).__name__)  # fmt: skip
        return False
    import zmq

    poller.register(listener.wake_fd, zmq.POLLIN)
    return True


# ---- the HTTP side -----------------------------------------------------------------------------
def call_scheduler(port: int, body: Any, timeout_s: float = REPLY_TIMEOUT_S) -> tuple[int, dict]:
    """Sends one job to the scheduler behind HTTP port ``port``; returns (status, reply)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s + 10.0)
        try:
            sock.connect(socket_name(port))
        except OSError as exc:
            raise UnavailableError(
                f"the scheduler's admin channel is not up yet (port {port}): {exc}"
            ) from None
        send_frame(sock, {"body": body, "timeout_s": timeout_s})
        status, reply = recv_frame(sock)
        return int(status), reply


def add_route(app: Any) -> None:
    """Adds ``POST /banaserve/migrate`` to SGLang's FastAPI ``app`` (idempotent)."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse

    if any(getattr(r, "path", None) == ROUTE for r in app.router.routes):
        return

    async def banaserve_migrate(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = msgspec.json.decode(raw)
            msgspec.convert(body, MigrateRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return JSONResponse(error_reply(InvalidArgumentError(str(exc))), status_code=400)
        port = int(request.scope["server"][1])
        try:
            status, reply = await asyncio.to_thread(call_scheduler, port, body)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse(error_reply(exc), status_code=http_status_for(exc))
        return JSONResponse(reply, status_code=status)

    # this module uses postponed annotations; FastAPI needs the real class to inject the request
    banaserve_migrate.__annotations__ = {"request": Request, "return": JSONResponse}
    app.add_api_route(ROUTE, banaserve_migrate, methods=["POST"])


# ---- built-in kinds ----------------------------------------------------------------------------
def running_requests(scheduler: Any) -> list[Any]:
    """Unfinished requests holding committed KV: the running decode batch plus the requests the
    last prefill batch just produced (merged into the running batch at the next step)."""
    seen: dict[int, Any] = {}
    chunked = scheduler.chunked_req
    for batch in (scheduler.running_batch, scheduler.last_batch):
        for req in (batch.reqs if batch is not None else None) or []:
            if req is chunked or req.finished() or req.kv.req_pool_idx is None:
                continue
            seen.setdefault(id(req), req)
    return list(seen.values())


def find_request(scheduler: Any, rid: str) -> Any:
    for req in running_requests(scheduler):
        if req.rid == rid:
            return req
    raise NotFoundError(f"no running request with rid {rid!r}")


def activate(host: Any) -> AdminChannel:
    """Activation of the ``admin`` feature: the ``ingest_requests`` hook in every process (SGLang
    applies it where the Scheduler runs), the route in the HTTP server (the launcher)."""
    import multiprocessing

    channel = AdminChannel(host)
    channel.register("status", channel.status_handler, quiescent=False)
    host.hook("admin", "Scheduler.ingest_requests", channel.around_ingest_requests)
    if multiprocessing.parent_process() is None:
        add_route(host.ns("admin")["http_server.app"])
    return channel

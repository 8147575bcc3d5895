# SPDX-License-Identifier: Apache-2.0
"""The request path, one for both modes: admission, pick, retry with a re-pick away from the
workers that failed, streaming, and aborting every leg when the request ends badly.

A request is served by *legs*, one per role: PD mode sends the same body to a prefill and a
decode worker (the decode leg's answer goes to the client), single-worker mode sends it to one
worker. Per attempt: each leg's worker is picked by its role's policy among usable workers
(healthy, breaker closed, not draining), steering away from the workers that failed earlier
attempts of this request; in PD mode the bootstrap fields of the chosen prefill worker are
injected; the legs are counted as dispatched before any ``await`` (a burst sees its own earlier
picks); every leg's connection is obtained *before* any request is written, so a prefill worker
that cannot be reached never leaves a decode leg waiting for KV (no half-dispatch). A leg that
fails before the client has seen a byte aborts the other leg, and the legs are re-picked, with
backoff, up to ``retry_max_retries`` times. Streams are passed through chunk by chunk; a client
that goes away, or a request timeout, aborts every leg.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec

from ..errors import ResourceExhaustedError, UnavailableError
from ..policies import PolicyBase, RequestInfo
from .http11 import Request, build_request
from .payload import (
    GENERATE,
    batch_size,
    cache_text,
    error_body,
    json_decode,
    json_encode,
    max_new_tokens,
    prompt_tokens,
    validate,
)
from .registry import Worker
from .stream import (
    StreamForwarder,
    StreamLogprobMerger,
    merge_logprobs,
    prefill_input_logprobs,
)
from .upstream import Exchange, UpstreamConnection, finished_or_failed

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .server import Router

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_ROOM_MASK = 0x7FFFFFFFFFFFFFFF


class _State:
    """One client request across its attempts."""

    __slots__ = ("timed_out", "started", "legs")

    def __init__(self) -> None:
        self.timed_out = False
        self.started = False  # bytes of the answer went to the client
        self.legs: list[Exchange] = []


class _Job:
    """What every attempt of one request needs, computed once."""

    __slots__ = ("route", "obj", "raw", "stream", "want_lp", "batch", "tokens", "text", "max_new")

    def __init__(self, route: str, obj: dict, raw: bytes, router: Router) -> None:
        cfg = router.cfg
        self.route = route
        self.obj = obj
        self.raw = raw
        self.stream = obj.get("stream") is True
        self.want_lp = route == GENERATE and bool(obj.get("return_logprob"))
        self.batch = batch_size(route, obj)
        self.tokens = prompt_tokens(route, obj, router.token_counter, cfg.chars_per_token)
        uses_text = any(p.uses_text for _, p, _ in router.plan())
        self.text = cache_text(route, obj) if uses_text else None
        self.max_new = max_new_tokens(obj)

    def body_for(self, prefill: Worker | None, room: int) -> bytes:
        """The upstream body: untouched in single-worker mode; in PD mode with the prefill
        worker's bootstrap fields (one room per item for batches)."""
        if prefill is None:
            return self.raw
        obj = self.obj
        if self.batch > 1:
            obj["bootstrap_host"] = [prefill.host] * self.batch
            obj["bootstrap_port"] = [prefill.spec.bootstrap_port] * self.batch
            obj["bootstrap_room"] = [(room + i) & _ROOM_MASK for i in range(self.batch)]
        else:
            obj["bootstrap_host"] = prefill.host
            obj["bootstrap_port"] = prefill.spec.bootstrap_port
            obj["bootstrap_room"] = room
        return json_encode(obj)


class _Leg:
    """One worker's part of one attempt."""

    __slots__ = ("worker", "policy", "label", "conn", "ex")

    def __init__(self, worker: Worker, policy: PolicyBase, label: str) -> None:
        self.worker = worker
        self.policy = policy
        self.label = label  # "prefill", "decode" or "worker", for messages
        self.conn: UpstreamConnection | None = None
        self.ex: Exchange | None = None


class _Retry(Exception):
    """An attempt failed in a way that other workers may fix."""

    def __init__(
        self,
        status: int,
        message: str,
        body: bytes | None = None,
        ctype: str = "",
        culprits: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.ctype = ctype
        self.culprits = culprits


class _NoWorker(_Retry):
    """No usable worker for one of the legs: 503 at once."""


class _Final(Exception):
    """A non-retryable upstream answer that goes to the client as is."""

    def __init__(self, status: int, body: bytes, ctype: str) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.ctype = ctype


def _head_status(ex: Exchange) -> int | None:
    """The status of the exchange's response head, if one arrived (and was not cancelled)."""
    fut = ex.head
    if not ex.got_head or not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    return fut.result().status


def _ctype(ex: Exchange) -> str:
    return ex.head.result().headers.get("content-type", "application/json")


class RequestPath:
    """Serves ``POST /generate``, ``/v1/completions`` and ``/v1/chat/completions``."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.inflight = 0
        self.queued = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.slots: asyncio.Semaphore | None = None
        if router.cfg.max_concurrent_requests > 0:
            self.slots = asyncio.Semaphore(router.cfg.max_concurrent_requests)

    # -- admission, timeout, accounting ---------------------------------------------------------
    async def handle(self, req: Request, conn: ClientConnection) -> None:
        t0 = time.perf_counter()
        route = req.path
        try:
            obj = json_decode(req.body)
        except msgspec.DecodeError as exc:
            conn.respond(req, 400, error_body(f"request body is not valid JSON: {exc}", 400))
            self._count(route, 400, t0)
            return
        problem = validate(route, obj)
        if problem:
            conn.respond(req, 400, error_body(problem, 400))
            self._count(route, 400, t0)
            return
        cfg = self.router.cfg
        if self.slots is not None:
            if self.slots.locked() and self.queued >= cfg.queue_size:
                conn.respond(req, 429, error_body("router queue is full", 429))
                self._count(route, 429, t0)
                return
            self.queued += 1
            try:
                await asyncio.wait_for(self.slots.acquire(), cfg.queue_timeout_secs)
            except asyncio.TimeoutError:
                conn.respond(req, 429, error_body("timed out waiting in the router queue", 429))
                self._count(route, 429, t0)
                return
            finally:
                self.queued -= 1
        self.inflight += 1
        self.idle.clear()
        state = _State()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        timer = loop.call_later(cfg.request_timeout_secs, self._timeout, state, task)
        status = 500
        try:
            status = await self._serve(req, conn, _Job(route, obj, req.body, self.router), state)
        except asyncio.CancelledError:
            for ex in state.legs:
                ex.abort()
            if not state.timed_out:
                status = 499  # the client went away
                raise
            status = 504
            uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()
            if state.started:
                conn.close_after = True
                if conn.transport is not None:
                    conn.transport.abort()
            else:
                msg = f"request timed out after {cfg.request_timeout_secs} s"
                conn.respond(req, 504, error_body(msg, 504))
        finally:
            timer.cancel()
            if status >= 400:
                # a leg still running after a failed request is of no use to anyone
                for ex in state.legs:
                    ex.abort()
            if self.slots is not None:
                self.slots.release()
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()
            self._count(route, status, t0)

    @staticmethod
    def _timeout(state: _State, task: asyncio.Task) -> None:
        state.timed_out = True
        task.cancel()

    def _count(self, route: str, status: int, t0: float) -> None:
        m = self.router.metrics
        m.inc("requests_total", (("route", route), ("status", str(status))))
        m.observe("request_duration_seconds", (("route", route),), time.perf_counter() - t0)

    # -- retry loop -----------------------------------------------------------------------------
    async def _serve(self, req: Request, conn: ClientConnection, job: _Job, state: _State) -> int:
        cfg = self.router.cfg
        m = self.router.metrics
        retries = 0 if cfg.disable_retries else max(0, cfg.retry_max_retries)
        last: _Retry | None = None
        avoid: set[str] = set()
        for attempt in range(retries + 1):
            if attempt:
                m.inc("retries_total")
                await asyncio.sleep(self.router.backoff(attempt - 1))
            try:
                return await self._attempt(req, conn, job, state, avoid)
            except _Final as f:
                conn.respond(req, f.status, f.body, f.ctype)
                return f.status
            except _Retry as r:
                last = r
                avoid.update(r.culprits)
                state.legs = []
                if isinstance(r, _NoWorker):
                    break  # nothing to retry on: fail fast
        assert last is not None
        if not isinstance(last, _NoWorker):
            m.inc("retries_exhausted_total")
        body = last.body if last.body is not None else error_body(str(last), last.status)
        conn.respond(req, last.status, body, last.ctype or "application/json")
        return last.status

    # -- one attempt ----------------------------------------------------------------------------
    async def _attempt(
        self, req: Request, conn: ClientConnection, job: _Job, state: _State, avoid: set[str]
    ) -> int:
        router = self.router
        now = time.monotonic()
        room = router.rng.getrandbits(63)
        info = RequestInfo(f"{room:x}", job.tokens, text=job.text, max_new_tokens=job.max_new)
        try:
            legs = [
                _Leg(router.pick(group, policy, info, now, label, avoid), policy, label)
                for group, policy, label in router.plan()
            ]
        except (UnavailableError, ResourceExhaustedError) as exc:
            raise _NoWorker(503, str(exc)) from None
        body = job.body_for(legs[0].worker if len(legs) > 1 else None, room)
        # count the legs now, before any await: a burst must see its own earlier picks
        for leg in legs:
            leg.policy.on_dispatch(info, leg.worker.load, now)
        await self._connect(legs, info)
        for leg in legs:
            w = leg.worker
            assert leg.conn is not None
            leg.ex = leg.conn.start(
                build_request("POST", w.pool.host_header, job.route, body, "application/json")
            )
        state.legs = [leg.ex for leg in legs if leg.ex is not None]
        answer = legs[-1]
        aex = answer.ex
        assert aex is not None
        for leg in legs:
            self._track(leg, info, partner=aex if leg is not answer else None)
            router.metrics.inc(
                "worker_selection_total", (("worker", leg.worker.url), ("role", leg.label))
            )
        feeder = legs[0] if len(legs) > 1 else None
        if feeder is not None:
            await self._await_feeder(feeder, aex, job)
        try:
            head = await aex.head
        except UnavailableError as exc:
            if feeder is not None:
                self._blame_feeder(feeder)
            raise _Retry(
                502,
                f"{answer.label} server error ({answer.worker.url}): {exc}",
                culprits=(answer.worker.url,),
            ) from None
        ctype = head.headers.get("content-type", "application/json")
        if head.status >= 400 or not job.stream:
            return await self._whole(req, conn, job, answer, feeder, head.status, ctype, aex)
        return await self._stream(req, conn, job, state, answer, feeder, head.status, ctype)

    async def _await_feeder(self, feeder: _Leg, aex: Exchange, job: _Job) -> None:
        """PD: wait for the prefill answer when it is needed (non-streaming, or log-probs to
        merge); a failed prefill aborts the decode leg and fails the attempt."""
        fex = feeder.ex
        assert fex is not None
        if job.stream and not job.want_lp:
            return
        # non-streaming: both legs; streaming with log-probs: the prefill's (input log-probs),
        # while the decode streams on; either way not past a failed decode leg
        wait = (fex,) if job.stream else (fex, aex)
        if not all(e.finished for e in wait):
            watch = (aex,) if job.stream else ()
            await finished_or_failed(asyncio.get_running_loop(), wait, watch)
        if aex.finished and not aex.completed and not fex.finished:
            fex.abort()  # the decode leg failed: its prefill would wait for it; the attempt
            return  # fails on the decode leg's answer (502, blaming the decode)
        url = feeder.worker.url
        try:
            await fex.done
        except UnavailableError as exc:
            aex.abort()
            raise _Retry(
                502, f"{feeder.label} server error ({url}): {exc}", culprits=(url,)
            ) from None
        status = fex.head.result().status
        if status >= 400:
            aex.abort()
            if status in RETRYABLE_STATUS:
                msg = f"{feeder.label} worker {url} answered {status}"
                raise _Retry(status, msg, fex.body(), _ctype(fex), (url,))
            raise _Final(status, fex.body(), _ctype(fex))

    def _blame_feeder(self, feeder: _Leg) -> None:
        """The answer leg died; if that is because the prefill leg failed, report the prefill."""
        fex = feeder.ex
        assert fex is not None
        url = feeder.worker.url
        completed = fex.completed
        failed = fex.finished and not fex.completed and not fex.aborted
        fex.abort()
        status = _head_status(fex)
        if completed and status is not None and status >= 400:
            if status in RETRYABLE_STATUS:
                msg = f"{feeder.label} worker {url} answered {status}"
                raise _Retry(status, msg, fex.body(), _ctype(fex), (url,)) from None
            raise _Final(status, fex.body(), _ctype(fex)) from None
        if failed:
            raise _Retry(502, f"{feeder.label} server error ({url})", culprits=(url,)) from None

    async def _whole(
        self,
        req: Request,
        conn: ClientConnection,
        job: _Job,
        answer: _Leg,
        feeder: _Leg | None,
        status: int,
        ctype: str,
        aex: Exchange,
    ) -> int:
        url = answer.worker.url
        try:
            await aex.done
        except UnavailableError as exc:
            if feeder is not None and feeder.ex is not None:
                feeder.ex.abort()
            msg = f"{answer.label} server error ({url}): {exc}"
            raise _Retry(502, msg, culprits=(url,)) from None
        if status in RETRYABLE_STATUS:
            if feeder is not None and feeder.ex is not None:
                feeder.ex.abort()
            msg = f"{answer.label} worker {url} answered {status}"
            raise _Retry(status, msg, aex.body(), ctype, (url,))
        out = aex.body()
        if job.want_lp and status < 300 and feeder is not None and feeder.ex is not None:
            out = merge_logprobs(feeder.ex.body(), out)
        conn.respond(req, status, out, ctype)
        return status

    async def _stream(
        self,
        req: Request,
        conn: ClientConnection,
        job: _Job,
        state: _State,
        answer: _Leg,
        feeder: _Leg | None,
        status: int,
        ctype: str,
    ) -> int:
        """Pass the answer through chunk by chunk; from the first byte on there is no retry."""
        aex = answer.ex
        assert aex is not None and answer.conn is not None
        state.started = True
        head = conn.stream_head(req, status, ctype)
        transform = None
        if job.want_lp and feeder is not None and feeder.ex is not None:
            transform = StreamLogprobMerger(prefill_input_logprobs(feeder.ex.body())).feed
        fw = StreamForwarder(conn, answer.conn, aex, head, transform)
        aex.set_sink(fw.piece, fw.flush)
        try:
            await aex.done
        except UnavailableError:
            # the worker died mid-stream: nothing to retry; cut the client stream short
            conn.close_after = True
            if conn.transport is not None:
                conn.transport.abort()
            return 502
        fw.flush()
        return status

    # -- connections and leg accounting ---------------------------------------------------------
    async def _connect(self, legs: list[_Leg], info: RequestInfo) -> None:
        """A connection for every leg (idle ones first, new ones concurrently), or none: on a
        failure the obtained ones go back unused, the legs are completed, and the attempt fails
        blaming the workers that could not be reached."""
        for leg in legs:
            leg.conn = leg.worker.pool.idle_connection()
        missing = [leg for leg in legs if leg.conn is None]
        if not missing:
            return
        results = await asyncio.gather(
            *(leg.worker.pool.connect() for leg in missing), return_exceptions=True
        )
        now = time.monotonic()
        errors: list[str] = []
        culprits: list[str] = []
        for leg, r in zip(missing, results, strict=True):
            if isinstance(r, BaseException):
                w = leg.worker
                culprits.append(w.url)
                w.breaker.record(False, now)
                self.router.metrics.inc("worker_errors_total", (("worker", w.url),))
                errors.append(str(r))
            else:
                leg.conn = r
        if not errors:
            return
        for leg in legs:
            if leg.conn is not None:
                leg.worker.pool.release(leg.conn)
                leg.conn = None
            leg.policy.on_complete(info, leg.worker.load, now)
            self.router.registry.settle(leg.worker)
        raise _Retry(502, "; ".join(errors), culprits=tuple(culprits))

    def _track(self, leg: _Leg, info: RequestInfo, partner: Exchange | None) -> None:
        """Finish the leg's accounting (dispatched already) when its exchange ends: policy
        counters, breaker, registry (a draining worker may leave), and the partner leg."""
        ex = leg.ex
        assert ex is not None
        w = leg.worker
        router = self.router

        def _done(fut: asyncio.Future) -> None:
            t = time.monotonic()
            ok = not fut.cancelled() and fut.exception() is None
            status = _head_status(ex)
            head_ok = ok and status is not None and status < 500
            leg.policy.on_complete(info, w.load, t)
            router.registry.settle(w)
            if ok:
                w.breaker.record(head_ok, t)
                if not head_ok:
                    router.metrics.inc("worker_errors_total", (("worker", w.url),))
            elif ex.aborted:
                pass  # we gave up on it (client gone, partner failed): not the worker's fault
            elif ex.got_head or not ex.reused:
                # a stale keep-alive connection dying before the answer is not the worker's fault
                w.breaker.record(False, t)
                router.metrics.inc("worker_errors_total", (("worker", w.url),))
            if partner is not None and not (ok and status is not None and status < 400):
                partner.abort()  # the prefill failed: the decode leg would wait for KV forever

        ex.done.add_done_callback(_done)

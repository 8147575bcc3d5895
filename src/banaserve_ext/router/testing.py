# SPDX-License-Identifier: Apache-2.0
"""Fake SGLang workers: real HTTP/1.1 servers on loopback that speak enough of SGLang's API for
a PD router (``/generate``, OpenAI routes, streaming, ``/get_load``, ``/health``...).

Configurable per fleet: latency (fixed plus per prompt token for prefill; per output token for
decode), capacity (concurrent slots; requests beyond it queue, as in an engine), and PD coupling:
with ``kv_wait_s`` a decode worker waits until the prefill worker of the same process has
finished the request's ``bootstrap_room`` (as a real decode waits for its KV), and fails with 500
if that never happens — so a half-dispatched request shows up.

Answers are deterministic functions of the request body, and every request is logged (exact
body bytes included) for tests: ``GET /__fake/requests``. Controls: ``POST /__fake/set_load``,
``POST /__fake/fail`` (answer N requests with a status, or drop the connection), ``POST
/__fake/reset``.

Run a fleet in its own process with ``python -m banaserve_ext.router.testing --prefill
127.0.0.1:31001:8998 --decode 127.0.0.1:31011``; it prints one ``READY`` line when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import InvalidArgumentError
from .http11 import (
    LAST_CHUNK,
    HttpError,
    Request,
    RequestParser,
    build_response,
    build_stream_head,
    chunk,
)
from .upstream import set_nodelay

_decode = msgspec.json.decode
_encode = msgspec.json.encode


@dataclass
class FakeSpec:
    host: str
    port: int
    role: str  # prefill | decode | regular
    bootstrap_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class FakeConfig:
    prefill_ms: float = 0.0
    prefill_us_per_token: float = 0.0
    decode_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    prefill_slots: int = 0  # 0 = unbounded
    decode_slots: int = 0
    kv_wait_s: float | None = None
    default_new_tokens: int = 8
    kv_capacity_tokens: int = 100_000
    chars_per_token: float = 4.0
    log_requests: bool = True


@dataclass
class _Failure:
    status: int  # 0 = drop the connection
    remaining: int


@dataclass
class FakeWorker:
    spec: FakeSpec
    cfg: FakeConfig
    fleet: FakeFleet
    log: list[dict] = field(default_factory=list)
    inflight: int = 0
    served: int = 0
    static_load: dict | None = None
    failure: _Failure | None = None
    slots: asyncio.Semaphore | None = None
    waiting: int = 0
    #: killed with :meth:`FakeFleet.kill`: its work never completes a room
    dead: bool = False
    #: decode legs that gave up waiting for their prefill (a half-dispatched request)
    kv_timeouts: int = 0
    #: tests: while set to an unset event, LLM requests are held (counted in ``inflight``)
    gate: asyncio.Event | None = None
    #: tests: streams are cut (connection reset) after this many tokens
    drop_after_tokens: int | None = None
    #: tests: more ``/server_info`` fields (e.g. SGLang's scheduling flags)
    server_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.cfg.prefill_slots if self.spec.role == "prefill" else self.cfg.decode_slots
        self.slots = asyncio.Semaphore(n) if n > 0 else None

    # -- request handling ------------------------------------------------------------------------
    async def handle(self, req: Request, conn: _FakeConn) -> None:
        path = req.path
        if (
            path in ("/generate", "/v1/completions", "/v1/chat/completions")
            and req.method == "POST"
        ):
            await self._llm(req, conn)
        elif path == "/health" or path == "/health_generate":
            conn.send(req, 200, b"", "text/plain")
        elif path in ("/get_server_info", "/server_info"):
            info = {
                "version": "fake-0.5",
                "disaggregation_mode": self.spec.role if self.spec.role != "regular" else "null",
                "disaggregation_bootstrap_port": self.spec.bootstrap_port,
                "port": self.spec.port,
                "max_total_num_tokens": self.cfg.kv_capacity_tokens,
                **self.server_info,
            }
            conn.send(req, 200, _encode(info))
        elif path in ("/get_model_info", "/model_info"):
            conn.send(req, 200, _encode({"model_path": "fake-model", "is_generation": True}))
        elif path == "/v1/models":
            model = {"id": "fake-model", "object": "model", "owned_by": "banaserve"}
            conn.send(req, 200, _encode({"object": "list", "data": [model]}))
        elif path in ("/get_load", "/v1/loads", "/loads"):
            conn.send(req, 200, _encode([self._load()]))
        elif path == "/tokenize" and req.method == "POST":
            conn.send(req, 200, _encode({"tokens": fake_tokenize(_decode(req.body))}))
        elif path == "/flush_cache" and req.method == "POST":
            conn.send(req, 200, b"Cache flushed.\n", "text/plain")
        elif path == "/__fake/requests":
            conn.send(req, 200, _encode(self.log))
        elif path == "/__fake/reset" and req.method == "POST":
            self.log.clear()
            self.served = 0
            self.failure = None
            self.static_load = None
            conn.send(req, 200, b"{}")
        elif path == "/__fake/set_load" and req.method == "POST":
            self.static_load = _decode(req.body) if req.body else None
            conn.send(req, 200, b"{}")
        elif path == "/__fake/fail" and req.method == "POST":
            spec = _decode(req.body)
            self.failure = _Failure(int(spec.get("status", 0)), int(spec.get("count", 1)))
            conn.send(req, 200, b"{}")
        else:
            conn.send(req, 404, b'{"detail":"Not Found"}')

    def _load(self) -> dict:
        if self.static_load is not None:
            return {"dp_rank": 0, **self.static_load}
        return {
            "dp_rank": 0,
            "num_reqs": self.inflight,
            "num_waiting_reqs": self.waiting,
            "num_tokens": self.inflight * 64,
        }

    async def _llm(self, req: Request, conn: _FakeConn) -> None:
        t_arrive = time.monotonic()
        try:
            obj = _decode(req.body)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except (msgspec.DecodeError, ValueError):
            conn.send(req, 400, b'{"error":{"message":"bad json","code":400}}')
            return
        room = obj.get("bootstrap_room")
        if self.cfg.log_requests:
            self.log.append(
                {
                    "path": req.path,
                    "t": t_arrive,
                    "bootstrap_host": obj.get("bootstrap_host"),
                    "bootstrap_port": obj.get("bootstrap_port"),
                    "bootstrap_room": room,
                    "stream": obj.get("stream"),
                    "body": req.body.decode("utf-8", "replace"),
                }
            )
        if self.failure is not None and self.failure.remaining > 0:
            self.failure.remaining -= 1
            if self.failure.status == 0:
                conn.drop()
                return
            msg = {"error": {"message": "injected failure", "code": self.failure.status}}
            conn.send(req, self.failure.status, _encode(msg))
            return
        role = self.spec.role
        if role != "regular" and room is None:
            conn.send(req, 400, b'{"error":{"message":"missing bootstrap_room","code":400}}')
            return
        prompt_tokens = _prompt_tokens(req.path, obj, self.cfg.chars_per_token)
        new_tokens = _new_tokens(obj, self.cfg.default_new_tokens)
        if role == "prefill":
            new_tokens = 1
        self.inflight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.slots is not None:
                self.waiting += 1
                try:
                    await self.slots.acquire()
                finally:
                    self.waiting -= 1
            try:
                await self._work(role, obj, prompt_tokens, new_tokens, req, conn)
            finally:
                if self.slots is not None:
                    self.slots.release()
        finally:
            self.inflight -= 1
            self.served += 1

    async def _work(
        self,
        role: str,
        obj: dict,
        prompt_tokens: int,
        new_tokens: int,
        req: Request,
        conn: _FakeConn,
    ) -> None:
        cfg = self.cfg
        rooms = _rooms(obj.get("bootstrap_room"))
        if role in ("prefill", "regular"):
            delay = cfg.prefill_ms / 1e3 + cfg.prefill_us_per_token * prompt_tokens / 1e6
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.lost or self.dead:
                return  # the client (router) went away or this worker was killed
            if role == "prefill":
                for r in rooms:
                    self.fleet.room_done(r)
        if role == "decode" and cfg.kv_wait_s is not None:
            try:
                for r in rooms:
                    await asyncio.wait_for(self.fleet.room_future(r), cfg.kv_wait_s)
            except asyncio.TimeoutError:
                self.kv_timeouts += 1
                err = {
                    "error": {"message": "KV transfer timed out (prefill never ran)", "code": 500}
                }
                conn.send(req, 500, _encode(err))
                return
        per_token = cfg.decode_ms_per_token / 1e3 if role != "prefill" else 0.0
        fixed = cfg.decode_ms / 1e3 if role != "prefill" else 0.0
        if fixed > 0:
            await asyncio.sleep(fixed)
        want_lp = bool(obj.get("return_logprob"))
        seed = hashlib.blake2b(req.body, digest_size=8).hexdigest()
        ctx = obj.get("input_ids") if req.path == "/generate" else None
        out: list[int] | None = None
        if isinstance(ctx, list) and ctx and all(isinstance(t, int) for t in ctx):
            out = []
        if obj.get("stream") is True:
            conn.start_stream(req)
            for k in range(new_tokens):
                if per_token > 0:
                    await asyncio.sleep(per_token)
                if conn.lost:
                    return
                if self.drop_after_tokens is not None and k >= self.drop_after_tokens:
                    conn.drop()
                    return
                if out is not None:
                    out.append(fake_next_token(ctx + out))  # type: ignore[operator]
                event = _event(req.path, seed, k, new_tokens, prompt_tokens, role, want_lp, out)
                conn.write(chunk(b"data: " + event + b"\n\n"))
            conn.write(chunk(b"data: [DONE]\n\n"))
            conn.write(LAST_CHUNK)
            conn.end_stream(req)
            return
        if per_token > 0:
            await asyncio.sleep(per_token * new_tokens)
        body = _final(req.path, seed, new_tokens, prompt_tokens, role, want_lp, self.spec.port)
        conn.send(req, 200, body)


def _rooms(room: Any) -> list[int]:
    if isinstance(room, list):
        return [r for r in room if isinstance(r, int)]
    return [room] if isinstance(room, int) else []


def _prompt_tokens(path: str, obj: dict, cpt: float) -> int:
    ids = obj.get("input_ids")
    if isinstance(ids, list):
        return sum(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)
    if path == "/v1/chat/completions":
        text = "".join(
            m.get("content", "")
            for m in obj.get("messages", [])
            if isinstance(m.get("content"), str)
        )
    elif path == "/v1/completions":
        p = obj.get("prompt", "")
        text = p if isinstance(p, str) else "".join(x for x in p if isinstance(x, str))
    else:
        t = obj.get("text", "")
        text = t if isinstance(t, str) else "".join(x for x in t if isinstance(x, str))
    return max(1, int(len(text) / cpt))


def _new_tokens(obj: dict, default: int) -> int:
    sp = obj.get("sampling_params")
    v = sp.get("max_new_tokens") if isinstance(sp, dict) else None
    if v is None:
        v = obj.get("max_tokens", obj.get("max_completion_tokens"))
    return int(v) if isinstance(v, int) and v > 0 else default


def _lp(seed: str, k: int) -> list:
    # a float with an exponent and a unicode token: re-serialization would show
    return [-1.5e-7 * (k + 1), 1000 + k, f"tok{k}\u00e9"]


def fake_tokenize(obj: dict) -> list[int]:
    """The fake's ``/tokenize``: one id per character of ``prompt``, or of the chat messages
    (each as ``<role>content``)."""
    msgs = obj.get("messages")
    if isinstance(msgs, list):
        text = "".join(f"<{m.get('role')}>{m.get('content')}" for m in msgs if isinstance(m, dict))
    else:
        text = str(obj.get("prompt") or "")
    return [3 + ord(c) % 997 for c in text]


def fake_next_token(context: list[int]) -> int:
    """The fake's "greedy" next token for ``/generate`` with ``input_ids``: a function of the
    whole context, so a request continued elsewhere from any token yields the same ids."""
    return (sum(context) * 31 + len(context) * 7) % 1000 + 3


def _event(
    path: str,
    seed: str,
    k: int,
    n: int,
    prompt_tokens: int,
    role: str,
    want_lp: bool,
    out: list[int] | None = None,
) -> bytes:
    piece = f" {seed[k % 16]}{k}"
    last = k == n - 1
    if path == "/generate":
        meta: dict[str, Any] = {
            "id": seed,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": k + 1,
            "finish_reason": {"type": "length", "length": n} if last else None,
        }
        if want_lp:
            meta["input_token_logprobs"] = (
                [_lp(seed, i) for i in range(prompt_tokens)] if role == "prefill" else []
            )
            # cumulative, as SGLang streams them
            meta["output_token_logprobs"] = [_lp(seed, i) for i in range(k + 1)]
        ev: dict[str, Any] = {"text": piece, "meta_info": meta, "index": 0}
        if out is not None:  # cumulative, as SGLang streams them
            ev["output_ids"] = list(out)
            ev["text"] = "".join(f" {seed[i % 16]}{i}" for i in range(k + 1))
        return _encode(ev)
    if path == "/v1/chat/completions":
        choice = {
            "index": 0,
            "delta": {"content": piece},
            "finish_reason": "length" if last else None,
        }
        return _encode({"id": seed, "object": "chat.completion.chunk", "choices": [choice]})
    choice = {"index": 0, "text": piece, "finish_reason": "length" if last else None}
    return _encode({"id": seed, "object": "text_completion", "choices": [choice]})


def _final(
    path: str, seed: str, n: int, prompt_tokens: int, role: str, want_lp: bool, port: int
) -> bytes:
    text = "".join(f" {seed[k % 16]}{k}" for k in range(n))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
    if path == "/generate":
        meta: dict[str, Any] = {
            "id": seed,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "finish_reason": {"type": "length", "length": n},
            "served_by": port,
        }
        if want_lp:
            meta["input_token_logprobs"] = (
                [_lp(seed, i) for i in range(prompt_tokens)] if role == "prefill" else []
            )
            meta["output_token_logprobs"] = [_lp(seed, k) for k in range(n)]
        # spaces after separators: a router that re-serializes would change these bytes
        return b'{ "text": ' + _encode(text) + b', "meta_info": ' + _encode(meta) + b" }"
    body: dict[str, Any]
    if path == "/v1/chat/completions":
        msg = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": msg, "finish_reason": "length"}
        body = {"id": seed, "object": "chat.completion", "choices": [choice], "usage": usage}
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        body = {"id": seed, "object": "text_completion", "choices": [choice], "usage": usage}
    body["served_by"] = port
    return _encode(body).replace(b'","', b'", "')


class _FakeConn(asyncio.Protocol):
    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.parser = RequestParser(1 << 30)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request] = deque()
        self.busy = False
        self.lost = False
        self.task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        self.worker.fleet.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.worker.fleet.conns.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            reqs = self.parser.feed(data)
        except HttpError as exc:
            if self.transport is not None:
                self.transport.write(build_response(exc.status, b"{}", keep_alive=False))
                self.transport.close()
            return
        self.queue.extend(reqs)
        self._next()

    def _next(self) -> None:
        if self.busy or not self.queue or self.lost:
            return
        self.busy = True
        req = self.queue.popleft()
        self.task = asyncio.get_running_loop().create_task(self.worker.handle(req, self))
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.task = None
        self.busy = False
        if not task.cancelled() and task.exception() is not None:
            print(f"fake worker error: {task.exception()!r}", file=sys.stderr)
            if self.transport is not None:
                self.transport.abort()
            return
        self._next()

    def send(self, req: Request, status: int, body: bytes, ctype: str = "application/json") -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(build_response(status, body, ctype, req.keep_alive))
            if not req.keep_alive:
                self.transport.close()

    def start_stream(self, req: Request) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(build_stream_head(200, "text/event-stream", req.keep_alive))

    def end_stream(self, req: Request) -> None:
        if not req.keep_alive and self.transport is not None:
            self.transport.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _BootstrapConn(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class FakeFleet:
    """Fake workers in the current event loop. ``await fleet.start()`` / ``await fleet.stop()``."""

    def __init__(self, specs: list[FakeSpec], cfg: FakeConfig | None = None) -> None:
        self.specs = specs
        self.cfg = cfg or FakeConfig()
        self.workers: dict[int, FakeWorker] = {}
        self.conns: set[_FakeConn] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._by_port: dict[int, list[asyncio.AbstractServer]] = {}
        self._rooms: dict[int, asyncio.Future[None]] = {}

    def room_future(self, room: int) -> asyncio.Future[None]:
        fut = self._rooms.get(room)
        if fut is None:
            fut = self._rooms[room] = asyncio.get_running_loop().create_future()
        return fut

    def room_done(self, room: int) -> None:
        fut = self.room_future(room)
        if not fut.done():
            fut.set_result(None)
        if len(self._rooms) > 100_000:
            for k in [k for k, f in self._rooms.items() if f.done()][:50_000]:
                del self._rooms[k]

    async def start(self) -> None:
        for spec in list(self.specs):
            await self._listen(spec)

    async def add(self, spec: FakeSpec) -> FakeWorker:
        """Start one more worker in this fleet (same room registry)."""
        self.specs.append(spec)
        return await self._listen(spec)

    async def _listen(self, spec: FakeSpec) -> FakeWorker:
        loop = asyncio.get_running_loop()
        w = FakeWorker(spec, self.cfg, self)
        server = await loop.create_server(
            lambda: _FakeConn(w), spec.host, spec.port, reuse_address=True, backlog=1024
        )
        spec.port = server.sockets[0].getsockname()[1]
        self.workers[spec.port] = w
        self._servers.append(server)
        self._by_port[spec.port] = [server]
        if spec.bootstrap_port is not None:
            bs = await loop.create_server(
                _BootstrapConn, spec.host, spec.bootstrap_port, reuse_address=True
            )
            spec.bootstrap_port = bs.sockets[0].getsockname()[1]
            self._servers.append(bs)
            self._by_port[spec.port].append(bs)
        return w

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        for c in list(self.conns):
            c.drop()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()

    def kill(self, port: int) -> None:
        """Crash one worker: stop listening and reset every connection it has (as a killed
        process would); its in-flight requests never answer."""
        w = self.workers[port]
        w.dead = True
        for server in self._by_port.pop(port, []):
            server.close()
        for c in [c for c in self.conns if c.worker is w]:
            c.drop()

    def worker(self, port: int) -> FakeWorker:
        return self.workers[port]


def parse_spec(text: str, role: str) -> FakeSpec:
    """``HOST:PORT[:BOOTSTRAP_PORT]`` (PORT 0 = any free port)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise InvalidArgumentError(f"expected HOST:PORT[:BOOTSTRAP_PORT], got {text!r}")
    if parts[0] != "127.0.0.1":
        raise InvalidArgumentError("fake workers listen on 127.0.0.1 only")
    bp = int(parts[2]) if len(parts) == 3 else None
    return FakeSpec(parts[0], int(parts[1]), role, bp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m banaserve_ext.router.testing")
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT[:BOOTSTRAP]")
    p.add_argument("--decode", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--regular", action="append", default=[], metavar="HOST:PORT")
    p.add_argument("--prefill-ms", type=float, default=0.0)
    p.add_argument("--prefill-us-per-token", type=float, default=0.0)
    p.add_argument("--decode-ms", type=float, default=0.0)
    p.add_argument("--decode-ms-per-token", type=float, default=0.0)
    p.add_argument("--prefill-slots", type=int, default=0)
    p.add_argument("--decode-slots", type=int, default=0)
    p.add_argument("--kv-wait-s", type=float, default=None)
    p.add_argument("--no-log", action="store_true", help="do not keep a request log")
    p.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long")
    a = p.parse_args(argv)
    specs = [parse_spec(s, "prefill") for s in a.prefill]
    specs += [parse_spec(s, "decode") for s in a.decode]
    specs += [parse_spec(s, "regular") for s in a.regular]
    cfg = FakeConfig(
        prefill_ms=a.prefill_ms,
        prefill_us_per_token=a.prefill_us_per_token,
        decode_ms=a.decode_ms,
        decode_ms_per_token=a.decode_ms_per_token,
        prefill_slots=a.prefill_slots,
        decode_slots=a.decode_slots,
        kv_wait_s=a.kv_wait_s,
        log_requests=not a.no_log,
    )

    async def run() -> None:
        fleet = FakeFleet(specs, cfg)
        await fleet.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ports = " ".join(
            f"{s.role}={s.port}" + (f"/{s.bootstrap_port}" if s.bootstrap_port else "")
            for s in specs
        )
        print(f"READY pid={os.getpid()} {ports}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), a.max_seconds)
        except asyncio.TimeoutError:
            pass
        await fleet.stop()

    loop_factory = None
    try:
        import uvloop  # type: ignore[import-not-found]

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

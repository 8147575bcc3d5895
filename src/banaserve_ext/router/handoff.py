# SPDX-License-Identifier: Apache-2.0
"""Request hand-off through the global KV store: one ``/generate`` request runs as two
segments on two unified SGLang instances, stitched into one answer.

Both instances run HiCache with L3 on the shared KV pool (``--enable-hierarchical-cache
--hicache-write-policy write_through --hicache-storage-backend dynamic`` with the banaserve
backend, see :mod:`banaserve_ext.adapters.sglang.hicache`). For a boundary ``s`` over a prompt
of ``n`` tokens and ``O`` output tokens:

1. **Segment 1 on A**: ``s > n``: the prompt with ``max_new_tokens = s - n``, its tokens
   streamed to the client; ``s <= n``: the prompt prefix ``[0, s)`` with ``max_new_tokens = 1``
   (SGLang has no prefill-only request for unified servers), its token discarded. When A's
   request ends its KV enters A's radix cache and HiCache writes it through to the store.
2. **Wait for the store**: the router computes the store keys of the prefix pages with
   SGLang's own page hash and polls the pool until they exist (bounded by ``l3_wait_s``;
   missing pages only cost recomputation on B, never correctness).
3. **Segment 2 on B**: ``input_ids`` = prompt + the tokens A produced, ``max_new_tokens`` = the
   rest, same sampling parameters; B's HiCache prefetches the prefix from the store and computes
   the remainder. SGLang's ``cached_tokens`` of this segment is reported as ``reused_tokens``.

The router always talks to the workers in streaming mode, so it knows every token a segment
produced when that segment breaks: a segment that fails (connect error, 5xx/429, dropped
mid-stream) is continued on the other instance from the last token received, so the client
never sees a token twice or misses one; when neither instance can continue, the request fails
with an error naming the worker and the cause. Each answer chunk is rewritten so the client
sees one request: ``output_ids``/``text`` cumulative over both segments, one ``finish_reason``,
``prompt_tokens = n``, ``completion_tokens`` = every output token, and a ``handoff`` entry in
``meta_info`` (:mod:`.handoff_stitch`; log-probs of every output token once, in order).
``/v1/completions`` and ``/v1/chat/completions`` run as the same ``/generate`` segments and are
translated back (:mod:`.handoff_openai`). Requests the hand-off cannot carry (batches, ``n > 1``,
multimodal, ...) take the ordinary request path. In PD mode the segments are PD legs
(:mod:`.handoff_pd`).

Live migration uses the same continuation: :meth:`HandoffPath.migrate_off` closes every segment
running on a worker and the request continues on its other worker (``POST /handoff/migrate``).
See docs/handoff.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from ..errors import BanaserveError, InvalidArgumentError, UnavailableError
from ..policies import RequestInfo
from ..policies.dynaserve import DynaServePlanner, HandoffPlan
from .handoff_openai import OpenAIView
from .handoff_stitch import _Stitch, segment_body
from .http11 import LAST_CHUNK, build_request, chunk
from .payload import GENERATE, error_body, json_decode, json_encode
from .slo import SLOPriorities, SLOTargets

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .http11 import Request
    from .registry import Worker
    from .server import Router
    from .upstream import Exchange

log = logging.getLogger("banaserve_ext.router.handoff")

#: request header that forces the hand-off boundary (absolute token index ``s``)
SPLIT_HEADER = "x-banaserve-handoff-at"
#: SGLang's default when a request gives no max_new_tokens
SGLANG_DEFAULT_MAX_NEW = 128
#: request fields a hand-off cannot carry yet: such requests take the ordinary path
_UNSUPPORTED = ("return_hidden_states", "session_params", "input_embeds", "image_data",
                "audio_data", "video_data", "lora_path", "bootstrap_host",
                "data_parallel_rank", "custom_logit_processor")  # fmt: skip
_REFUSALS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass
class HandoffConfig:
    """``kv_pool``: name of the shared KV pool both instances' HiCache L3 uses (None: no wait
    for write-back; B then reuses whatever has landed). ``l3_wait_s``: the longest wait for
    segment 1's pages to reach the store. ``slo``: latency targets that give every segment its
    deadline as SGLang priority (:mod:`.slo`; None: no priorities)."""

    planner: DynaServePlanner = field(default_factory=DynaServePlanner)
    kv_pool: str | None = None
    l3_wait_s: float = 10.0
    l3_poll_s: float = 0.02
    slo: SLOTargets | None = None

    def validate(self) -> None:
        if self.l3_wait_s < 0 or self.l3_poll_s <= 0:
            raise InvalidArgumentError("l3_wait_s must be >= 0 and l3_poll_s > 0")


class SegmentFailed(Exception):
    """A segment could not run to its end on a worker (the message names the cause)."""


class _ClientError(Exception):
    """The worker rejected the request itself (4xx other than 408/429): not a hand-off fault."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def page_hashes(tokens: list[int], page_size: int) -> list[str]:
    """SGLang's HiCache storage key of every full page of ``tokens`` (no ``extra_key``, no
    cache salt): a SHA-256 chain, each page hashing the previous digest and its token ids as
    little-endian uint32 (SGLang 0.5's ``hash_binding.cpp``; ids >= 2**32 are not handled)."""
    out: list[str] = []
    prior = b""
    full = len(tokens) // page_size * page_size
    for start in range(0, full, page_size):
        h = hashlib.sha256(prior)
        h.update(array("I", tokens[start : start + page_size]).tobytes())
        prior = h.digest()
        out.append(prior.hex())
    return out


class L3Watcher:
    """Polls the shared KV pool for the pages of a token prefix, keyed as SGLang's HiCache keys
    them (SGLang's page hash chain + the banaserve backend's namespace suffix)."""

    def __init__(self, pool_name: str) -> None:
        self.pool_name = pool_name
        self._pool: Any = None
        self.suffix: str | None = None
        self.page_size = 1

    def learn(self, info: dict) -> None:
        """Key namespace and page size from a worker's ``/get_server_info``."""
        from ..adapters.sglang.hicache import key_suffix  # no torch, no sglang import

        cfg = SimpleNamespace(
            model_name=info.get("model_path") or "", is_mla_model=False, tp_rank=0,
            tp_size=int(info.get("tp_size") or 1), pp_size=int(info.get("pp_size") or 1),
        )  # fmt: skip
        geo = SimpleNamespace(layout=info.get("hicache_mem_layout") or "layer_first", halves=2)
        self.suffix = key_suffix(cfg, geo)
        self.page_size = int(info.get("page_size") or 1)

    def _ready(self) -> bool:
        if self._pool is None:
            from ..kvpool import KVPool

            try:
                self._pool = KVPool(self.pool_name).start()
            except BanaserveError as exc:  # no such pool (yet): B recomputes, nothing breaks
                log.warning("hand-off: cannot attach KV pool %r: %s", self.pool_name, exc)
                return False
        return self.suffix is not None

    def keys(self, tokens: list[int]) -> list[str]:
        return page_hashes(tokens, self.page_size)

    async def wait(self, tokens: list[int], timeout_s: float, poll_s: float) -> tuple[int, int]:
        """(pages found, pages wanted) once every page of ``tokens`` is stored or the time is
        up."""
        if not self._ready():
            return 0, 0
        keys = self.keys(tokens)
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._pool.batch_exists(keys, suffix=self.suffix) if keys else 0
            if found >= len(keys) or time.monotonic() >= deadline:
                return found, len(keys)
            await asyncio.sleep(poll_s)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class HandoffPath:
    """Serves ``POST /generate`` by DynaServe micro-requests when two workers are usable."""

    def __init__(self, router: Router, cfg: HandoffConfig) -> None:
        cfg.validate()
        self.router = router
        self.cfg = cfg
        self.l3 = L3Watcher(cfg.kv_pool) if cfg.kv_pool else None
        self.slo = SLOPriorities(cfg.slo) if cfg.slo is not None else None
        self.handed_off = 0
        self.fallbacks = 0
        #: streaming segments by worker URL (live migration moves them)
        self.running: dict[str, dict[int, Exchange]] = {}
        self.migrating: set[int] = set()
        self.migrated = 0

    def close(self) -> None:
        if self.l3 is not None:
            self.l3.close()
        if self.slo is not None:
            self.slo.close()

    def migrate_off(self, url: str) -> int:
        """Live migration: every hand-off segment running on ``url`` is stopped there (its
        SGLang request aborted) and continues on the request's other worker from the last token
        received, its prefix KV through the store as far as it has landed. Returns how many
        segments were moved. Take the worker out of rotation first (``DELETE /workers``) so
        that no new request lands on it."""
        moved = 0
        for key, ex in list(self.running.get(url, {}).items()):
            if not ex.finished:
                self.migrating.add(key)
                ex.abort()
                moved += 1
        self.migrated += moved
        return moved

    async def migrate_endpoint(self, req: Request, conn: ClientConnection) -> None:
        """``POST /handoff/migrate?url=URL``: :meth:`migrate_off`, answered with the count."""
        url = {k: v[-1] for k, v in parse_qs(req.query).items()}.get("url")
        if not url:
            conn.respond(req, 400, error_body("POST /handoff/migrate needs ?url=WORKER_URL", 400))
            return
        url = url.rstrip("/")
        moved = self.migrate_off(url)
        conn.respond(req, 200, json_encode({"status": "ok", "url": url, "migrated": moved}))

    # -- entry ----------------------------------------------------------------------------------
    def takes(self, obj: Any) -> bool:
        if not isinstance(obj, dict):
            return False
        ids, text = obj.get("input_ids"), obj.get("text")
        single = (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)) or (
            isinstance(text, str) and text and ids is None
        )
        sp = obj.get("sampling_params") or {}
        if not single or not isinstance(sp, dict) or int(sp.get("n", 1) or 1) != 1:
            return False
        mnt = sp.get("max_new_tokens")
        if mnt is not None and (not isinstance(mnt, int) or mnt < 1):
            return False  # nothing to hand off (or bad: the worker answers it)
        return not any(obj.get(k) for k in _UNSUPPORTED)

    def candidates(self, now: float) -> list[Worker]:
        """The workers a request may use, or [] when the hand-off path cannot serve now."""
        cands = [w for w in self.router.colocated if w.usable(now)]
        return cands if len(cands) >= 2 else []

    def _plan(self, n: int, total: int, cands: list[Worker], split_at: int | None) -> Any:
        return self.cfg.planner.plan(n, total, [w.load for w in cands], split_at)

    async def handle(self, req: Request, conn: ClientConnection) -> bool:
        """Serve ``req``; False when it is not one for a hand-off (the caller serves it)."""
        try:
            obj = json_decode(req.body)
        except msgspec.DecodeError:
            return False
        view: OpenAIView | None = None
        if req.path != GENERATE:  # an OpenAI route: translated to /generate and back
            view = OpenAIView.of(req.path, obj)
            if view is None:
                return False
            obj = view.generate
        cands = self.candidates(time.monotonic())
        if not cands or (view is None and not self.takes(obj)):  # a view has checked its own
            return False
        path = self.router.path
        assert path is not None
        path.inflight += 1  # the router's graceful stop waits for hand-offs too
        path.idle.clear()
        t0 = time.perf_counter()
        status = 200
        sent: list[bool] = [False]  # the answer's head went to the client
        timeout = self.router.cfg.request_timeout_secs
        try:
            status = await asyncio.wait_for(self._serve(req, conn, obj, cands, sent, view), timeout)
        except asyncio.TimeoutError:
            status = 504
            if sent[0]:
                conn.close_after = True
                if conn.transport is not None:
                    conn.transport.abort()
            else:
                msg = f"request timed out after {timeout} s"
                conn.respond(req, 504, error_body(msg, 504))
        finally:
            path.inflight -= 1
            if path.inflight == 0:
                path.idle.set()
            m = self.router.metrics
            m.inc("requests_total", (("route", req.path), ("status", str(status))))
            m.observe("request_duration_seconds", (("route", req.path),),
                      time.perf_counter() - t0)  # fmt: skip
        return True

    async def _serve(
        self,
        req: Request,
        conn: ClientConnection,
        obj: dict,
        cands: list[Worker],
        sent: list[bool],
        view: OpenAIView | None = None,
    ) -> int:
        stream = obj.get("stream") is True
        arrival = time.time()  # before tokenizing: the SLO clock starts at arrival
        if self.l3 is not None and self.l3.suffix is None:
            await self.learn_store_namespace()
        try:
            ids = obj.get("input_ids")
            if ids is None:
                tok = view.tokenize_request() if view is not None else {"prompt": obj["text"]}
                ids = await self._tokenize(cands[0], tok)
            sp = dict(obj.get("sampling_params") or {})
            total = int(sp.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW))
            split_hdr = req.headers.get(SPLIT_HEADER)
            split_at = int(split_hdr) if split_hdr is not None else None
            plan = self._plan(len(ids), total, cands, split_at)
        except (ValueError, InvalidArgumentError) as exc:
            conn.respond(req, 400, error_body(f"hand-off: {exc}", 400))
            return 400
        except SegmentFailed as exc:
            conn.respond(req, 502, error_body(str(exc), 502))
            return 502
        st = _Stitch(len(ids))
        st.arrival = arrival
        head_sent = False

        def emit(out: dict, raw: bool = False) -> None:
            nonlocal head_sent
            if not stream:
                return
            parts = [out] if raw or view is None or "error" in out else view.chunks(out)
            if not parts:
                return
            data = b"".join(b"data: " + json_encode(p) + b"\n\n" for p in parts)
            if not head_sent:
                conn.write(conn.stream_head(req, 200, "text/event-stream"))
                head_sent = sent[0] = True
            conn.write(chunk(data))

        try:
            await self._run(obj, list(ids), sp, total, plan, cands, st, emit)
        except _ClientError as exc:
            status = exc.status
            if not head_sent:
                conn.respond(req, exc.status, exc.body)
                return status
            emit({"error": {"message": exc.body.decode(errors="replace"), "code": exc.status}})
        except SegmentFailed as exc:
            status = 502
            msg = f"hand-off failed: {exc}"
            log.warning("%s", msg)
            if not head_sent:
                conn.respond(req, 502, error_body(msg, 502))
                return status
            emit({"error": {"message": msg, "code": 502}})
        else:
            status = 200
            if not stream:
                last = st.last or {}
                conn.respond(req, 200, json_encode(view.whole(last) if view else last))
                return status
            if view is not None:
                for tail in view.tail(st.last):
                    emit(tail, raw=True)
        if head_sent:
            conn.write(chunk(b"data: [DONE]\n\n") + LAST_CHUNK)
        return status

    # -- the segments ---------------------------------------------------------------------------
    async def _run(
        self,
        obj: dict,
        ids: list[int],
        sp: dict,
        total: int,
        plan: HandoffPlan,
        cands: list[Worker],
        st: _Stitch,
        emit: Any,
    ) -> None:
        n = len(ids)
        a = cands[plan.first]
        b = cands[plan.second] if plan.second is not None else None
        st.info.update(first=a.url, second=b.url if b else None, split=plan.split)
        if b is None:
            others = [w for w in cands if w is not a][:1]  # where a failure or migration goes
            await self._continue([a, *others], obj, ids, sp, total, st, emit, final=True)
            return
        self.handed_off += 1
        if plan.split <= n:
            # segment 1: the prompt prefix only; its one output token is discarded
            try:
                await self._segment(a, obj, ids[: plan.split], dict(sp, max_new_tokens=1),
                                    st, None, final=False)  # fmt: skip
            except SegmentFailed:
                b_first = [b]
            else:
                b_first = [b, a]
            st.discard()
            cached = ids[: plan.split]
        else:
            k = plan.split - n
            await self._continue([a, b], obj, ids, sp, k, st, emit, final=False)
            if st.finish is not None:
                return  # segment 1 ended early (EOS or a stop condition)
            b_first = [b, a]
            # the last output token's KV is not computed by A
            cached = ids + st.produced + st.seg_ids
            cached = cached[:-1]
        if self.l3 is not None and len(b_first) > 1:  # segment 1 ran: wait for its pages
            t0 = time.monotonic()
            found, wanted = await self.l3.wait(cached, self.cfg.l3_wait_s, self.cfg.l3_poll_s)
            st.info.update(l3_pages=found, l3_pages_wanted=wanted,
                           l3_wait_s=round(time.monotonic() - t0, 4))  # fmt: skip
        await self._continue(b_first, obj, ids, sp, total, st, emit, final=True)

    async def _continue(
        self,
        workers: list[Worker],
        obj: dict,
        ids: list[int],
        sp: dict,
        until: int,
        st: _Stitch,
        emit: Any,
        final: bool,
    ) -> None:
        """Produce output tokens up to ``until`` in all, on ``workers[0]``; a failure moves the
        rest to the next worker, from the last token received."""
        errors: list[str] = []
        for i, w in enumerate(workers):
            st.begin()
            done = len(st.produced)
            if done >= until:
                return
            body_sp = dict(sp, max_new_tokens=until - done)
            if sp.get("min_new_tokens"):  # what is left of the minimum, within this segment
                body_sp["min_new_tokens"] = max(0, min(int(sp["min_new_tokens"]) - done,
                                                       until - done))  # fmt: skip
            try:
                await self._segment(w, obj, ids + st.produced, body_sp, st, emit, final)
                return
            except SegmentFailed as exc:
                errors.append(str(exc))
                if i + 1 < len(workers):
                    self.fallbacks += 1
                    log.warning("hand-off: %s; continuing on %s", exc, workers[i + 1].url)
        raise SegmentFailed("; ".join(errors))

    async def _segment(
        self,
        w: Worker,
        obj: dict,
        input_ids: list[int],
        sp: dict,
        st: _Stitch,
        emit: Any,
        final: bool,
    ) -> None:
        prio = await self.slo.for_segment([w], obj, st) if self.slo is not None else None
        body = segment_body(obj, input_ids, sp, st, prio)
        router = self.router
        policy = router.prefill_policy
        info = RequestInfo(f"{router.rng.getrandbits(63):x}", len(input_ids),
                           max_new_tokens=int(sp["max_new_tokens"]))  # fmt: skip
        policy.on_dispatch(info, w.load, time.monotonic())
        st.seg = {"worker": w.url, "input_tokens": len(input_ids)}
        if body.get("priority") is not None:
            st.seg["priority"] = body["priority"]
        st.info["segments"].append(st.seg)
        try:
            last = await self._stream(w, json_encode(body), st, emit, final)
            meta = (last or {}).get("meta_info") or {}
            if last is None or meta.get("finish_reason") is None:
                raise SegmentFailed(f"worker {w.url} ended the stream without a finish_reason")
        except SegmentFailed as exc:
            st.seg["error"] = str(exc)
            raise
        finally:
            policy.on_complete(info, w.load, time.monotonic())
            router.registry.settle(w)

    async def _stream(
        self, w: Worker, body: bytes, st: _Stitch, emit: Any, final: bool, started: Any = None
    ) -> dict | None:
        """One streaming ``/generate`` on ``w``; every event goes through ``st`` (and to the
        client when ``emit`` is given). Returns the worker's last event. ``started(ex)`` is
        called once the exchange exists (the PD path ties its prefill leg to it)."""
        try:
            conn = await w.pool.acquire()
        except (OSError, UnavailableError) as exc:
            w.breaker.record(False, time.monotonic())
            raise SegmentFailed(f"worker {w.url} unreachable: {exc}") from None
        ex = conn.start(build_request("POST", w.pool.host_header, "/generate", body,
                                      "application/json"))  # fmt: skip
        if started is not None:
            started(ex)
        try:
            head = await ex.head
        except UnavailableError as exc:
            raise SegmentFailed(f"worker {w.url} failed before answering: {exc}") from None
        if head.status != 200:
            try:
                await ex.done
            except UnavailableError:
                pass
            if head.status in _REFUSALS:
                raise SegmentFailed(f"worker {w.url} refused: {head.status} {ex.body()[:200]!r}")
            raise _ClientError(head.status, ex.body())
        last: list[dict] = []
        buf = bytearray()
        error: list[str] = []

        def sink(piece: bytes) -> None:
            buf.extend(piece)
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    return
                line = bytes(buf[:end]).strip()
                del buf[: end + 2]
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                try:
                    ev = json_decode(payload)
                except msgspec.DecodeError:
                    error.append(f"bad event {payload[:80]!r}")
                    continue
                if isinstance(ev, dict) and "error" in ev:
                    error.append(str(ev["error"]))
                    continue
                last.append(ev)
                del last[:-1]
                out = st.event(ev, final)
                if emit is not None:
                    emit(out)

        ex.set_sink(sink)
        running = self.running.setdefault(w.url, {})
        running[id(ex)] = ex
        try:
            await ex.done
        except UnavailableError as exc:
            if id(ex) in self.migrating:
                raise SegmentFailed(
                    f"migrated off worker {w.url} after {len(st.seg_ids)} tokens"
                ) from None
            raise SegmentFailed(
                f"worker {w.url} dropped the stream after {len(st.seg_ids)} tokens: {exc}"
            ) from None
        except asyncio.CancelledError:
            ex.abort()
            raise
        finally:
            running.pop(id(ex), None)
            self.migrating.discard(id(ex))
        if error:
            raise SegmentFailed(f"worker {w.url} reported an error: {error[0]}")
        return last[0] if last else None

    async def _tokenize(self, w: Worker, payload: dict) -> list[int]:
        """The prompt's token ids from a worker's ``/tokenize`` (``{"prompt": text}``, or an
        OpenAI chat request's messages: SGLang applies the chat template there)."""
        req = build_request("POST", w.pool.host_header, "/tokenize",
                            json_encode(payload), "application/json")  # fmt: skip
        try:
            head, body = await w.pool.fetch(req, timeout_s=30.0)
        except UnavailableError as exc:
            raise SegmentFailed(f"worker {w.url} could not tokenize: {exc}") from None
        if head.status != 200:
            raise SegmentFailed(f"worker {w.url} /tokenize answered {head.status}")
        tokens = json_decode(body).get("tokens")
        if not isinstance(tokens, list) or not tokens:
            raise SegmentFailed(f"worker {w.url} /tokenize gave no tokens")
        return [int(t) for t in tokens]

    async def learn_store_namespace(self) -> None:
        """Ask one worker for the key namespace of the KV pool (``/get_server_info``)."""
        if self.l3 is None:
            return
        for w in self.router.colocated:
            try:
                head, body = await w.pool.fetch(
                    build_request("GET", w.pool.host_header, "/get_server_info"), timeout_s=30.0
                )
            except UnavailableError:
                continue
            if head.status == 200:
                self.l3.learn(json_decode(body))
                return

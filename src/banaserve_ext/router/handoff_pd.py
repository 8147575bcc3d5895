# SPDX-License-Identifier: Apache-2.0
"""Hand-off and live migration for a PD deployment: a request runs as one or more *PD legs*,
each a prefill request on a prefill worker P and a streaming decode request on a decode worker D
(the same body with P's bootstrap fields, as the ordinary PD path sends), stitched into one
answer by :class:`~banaserve_ext.router.handoff._Stitch`.

A leg that cannot run to its end is continued as a new PD leg on another pair from the last
token the client got: ``input_ids`` = prompt + every output token so far, ``max_new_tokens`` =
the rest, same sampling parameters. The new prefill worker computes that input on top of what
its prefix cache holds: the prompt's KV from its radix cache or, through HiCache L3
(``banaserve launch`` runs every prefill server with L3 on the global KV store), from the store;
the rest (the output tokens so far) is recomputed. Its first token goes to the new decode
worker with the KV, as for any PD request. The causes:

- **live migration** (``POST /handoff/migrate?url=D``, :meth:`HandoffPath.migrate_off`): every
  decode leg running on D is closed (SGLang aborts the request and frees its KV) and continues
  on a pair without D; this is how the live controller drains a decode instance before a role
  flip. Prefill legs are short: a drain waits for them.
- **faults**: the decode worker refuses, drops the stream or aborts the request (a KV transfer
  that failed) → the next pair, avoiding that decode worker; the prefill worker refuses or dies
  before the decode leg got its first token → the decode leg is closed (it would wait for KV
  that never comes) and the next pair avoids that prefill worker. When no pair is left, or after
  ``max_failures`` failures, the request fails with an error naming every worker and cause.

The client's stream never sees a token twice or misses one: events of a failed leg that carry
an ``abort`` finish are held back, and the continuation starts after the last token received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import UnavailableError
from ..policies import RequestInfo
from .handoff import _REFUSALS, HandoffPath, SegmentFailed, _ClientError
from .handoff_stitch import _Stitch, segment_body
from .http11 import build_request
from .payload import json_decode, json_encode

if TYPE_CHECKING:
    from .registry import Worker
    from .upstream import Exchange

log = logging.getLogger("banaserve_ext.router.handoff")

_ROOM_MASK = 0x7FFFFFFFFFFFFFFF


class _PrefillFailed(SegmentFailed):
    """The prefill leg failed before its decode leg got a token."""


def _abort_reason(fr: Any) -> str | None:
    """The message of an ``abort`` finish (a leg SGLang gave up on), else None."""
    if isinstance(fr, dict) and fr.get("type") == "abort":
        return str(fr.get("message") or "aborted")
    return None


class PDHandoffPath(HandoffPath):
    """Serves ``POST /generate`` in PD mode as stitched PD legs (see the module doc)."""

    #: failures (not migrations) after which a request gives up
    max_failures = 3

    def candidates(self, now: float) -> list[Worker]:
        d = [w for w in self.router.decode if w.usable(now)]
        p = any(w.usable(now) for w in self.router.prefill)
        return d if p else []

    def _plan(self, n: int, total: int, cands: list[Worker], split_at: int | None) -> Any:
        return None  # PD legs are cut by migration and faults, not by a planned boundary

    def _pick(self, role: str, avoid: set[str], now: float, info: RequestInfo) -> Worker:
        router = self.router
        workers = router.prefill if role == "prefill" else router.decode
        policy = router.prefill_policy if role == "prefill" else router.decode_policy
        cands = [w for w in workers if w.usable(now) and w.url not in avoid]
        if not cands:
            left = f" (left out: {', '.join(sorted(avoid))})" if avoid else ""
            raise UnavailableError(f"no {role} worker can take the request{left}")
        if len(cands) == 1:
            return cands[0]
        return cands[policy.select(info, [w.load for w in cands], now)]

    async def _run(
        self,
        obj: dict,
        ids: list[int],
        sp: dict,
        total: int,
        plan: Any,
        cands: list[Worker],
        st: _Stitch,
        emit: Any,
    ) -> None:
        st.info.update(mode="pd", first=None, second=None, split=None)
        avoid_p: set[str] = set()
        avoid_d: set[str] = set()
        errors: list[str] = []
        failures = 0
        while True:
            st.begin()
            done = len(st.produced)
            if done >= total:
                return
            body_sp = dict(sp, max_new_tokens=total - done)
            if sp.get("min_new_tokens"):
                body_sp["min_new_tokens"] = max(0, int(sp["min_new_tokens"]) - done)
            info = RequestInfo(f"{self.router.rng.getrandbits(63):x}", len(ids) + done,
                               max_new_tokens=total - done)  # fmt: skip
            now = time.monotonic()
            try:
                p = self._pick("prefill", avoid_p, now, info)
                d = self._pick("decode", avoid_d, now, info)
            except UnavailableError as exc:
                errors.append(str(exc))
                raise SegmentFailed("; ".join(errors)) from None
            if st.info["first"] is None:
                st.info["first"] = d.url
            elif d.url != st.info["first"] and st.info["second"] is None:
                st.info.update(second=d.url, split=len(ids) + done)
                self.handed_off += 1
            try:
                await self._leg(p, d, info, obj, ids + st.produced, body_sp, st, emit)
                return
            except _PrefillFailed as exc:
                avoid_p.add(p.url)
                failures += 1
                errors.append(str(exc))
            except SegmentFailed as exc:
                avoid_d.add(d.url)
                if not str(exc).startswith("migrated off"):
                    failures += 1
                errors.append(str(exc))
            if failures > self.max_failures:
                raise SegmentFailed("; ".join(errors))
            self.fallbacks += 1
            log.warning("hand-off (PD): %s; continuing on another pair", errors[-1])

    async def _leg(
        self,
        p: Worker,
        d: Worker,
        info: RequestInfo,
        obj: dict,
        input_ids: list[int],
        sp: dict,
        st: _Stitch,
        emit: Any,
    ) -> None:
        """One PD leg: the prefill request on ``p``, the streaming decode request on ``d``."""
        router = self.router
        room = router.rng.getrandbits(63) & _ROOM_MASK
        prio = await self.slo.for_segment([p, d], obj, st) if self.slo is not None else None
        body = segment_body(obj, input_ids, sp, st, prio)
        for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
            body.pop(k, None)
        body.update(bootstrap_host=p.host, bootstrap_port=p.spec.bootstrap_port,
                    bootstrap_room=room)  # fmt: skip
        raw = json_encode(body)
        # the prompt's input log-probs come from the prefill leg (SGLang's decode side has
        # none): events are held until the prefill has answered with them
        want_input_lp = st.takes_input_lp
        st.takes_input_lp = False
        now = time.monotonic()
        router.prefill_policy.on_dispatch(info, p.load, now)
        router.decode_policy.on_dispatch(info, d.load, now)
        st.seg = {"worker": d.url, "prefill": p.url, "input_tokens": len(input_ids)}
        if body.get("priority") is not None:
            st.seg["priority"] = body["priority"]
        st.info["segments"].append(st.seg)
        p_settled = False

        def settle_p(_: Any = None) -> None:
            nonlocal p_settled
            if not p_settled:
                p_settled = True
                router.prefill_policy.on_complete(info, p.load, time.monotonic())
                router.registry.settle(p)

        held: list[dict] | None = [] if want_input_lp else None
        p_fault: list[str] = []

        def leg_emit(out: dict) -> None:
            nonlocal held
            meta = out.get("meta_info") or {}
            if _abort_reason(meta.get("finish_reason")) is not None:
                return  # a failed leg: the continuation answers instead
            if held is not None:
                held.append(out)
            elif emit is not None:
                emit(out)

        def release(pex: Exchange) -> None:
            nonlocal held
            if want_input_lp and pex.completed:
                st.input_lp.update(prefill_input_meta(pex.body()))
            out, held = held or [], None
            for ev in out:
                ev = _with_input_lp(ev, st)
                if emit is not None:
                    emit(ev)
            if st.last is not None:
                st.last = _with_input_lp(st.last, st)

        try:
            try:
                pconn = await p.pool.acquire()
            except (OSError, UnavailableError) as exc:
                settle_p()
                p.breaker.record(False, time.monotonic())
                raise _PrefillFailed(f"prefill worker {p.url} unreachable: {exc}") from None
            pex = pconn.start(build_request("POST", p.pool.host_header, "/generate", raw,
                                            "application/json"))  # fmt: skip
            pex.done.add_done_callback(settle_p)

            def tie(dex: Exchange) -> None:
                def p_done(fut: asyncio.Future) -> None:
                    why = _prefill_fault(pex, fut)
                    if why is not None and not st.seg_ids and not pex.aborted:
                        p_fault.append(why)
                        dex.abort()  # it would wait for KV that never comes
                    elif held is not None:
                        release(pex)

                pex.done.add_done_callback(p_done)

            try:
                last = await self._stream(d, raw, st, leg_emit, True, started=tie)
            except SegmentFailed as exc:
                pex.abort()
                if p_fault:
                    raise _PrefillFailed(f"prefill worker {p.url} {p_fault[0]}") from None
                st.seg["error"] = str(exc)
                raise
            except _ClientError:
                pex.abort()
                raise
            meta = (last or {}).get("meta_info") or {}
            why = _abort_reason(meta.get("finish_reason"))
            if last is None or meta.get("finish_reason") is None or why is not None:
                st.finish = None
                pex.abort()
                cause = why or "ended the stream without a finish_reason"
                raise SegmentFailed(f"decode worker {d.url} {cause} after "
                                    f"{len(st.seg_ids)} tokens")  # fmt: skip
            if held is not None:  # the decode leg ended before the prefill answered
                try:
                    await asyncio.wait_for(asyncio.shield(pex.done), 30.0)
                except (UnavailableError, asyncio.TimeoutError):
                    pass
                if held is not None:
                    release(pex)
        except SegmentFailed as exc:
            st.seg.setdefault("error", str(exc))
            raise
        finally:
            router.decode_policy.on_complete(info, d.load, time.monotonic())
            router.registry.settle(d)


def _with_input_lp(out: dict, st: _Stitch) -> dict:
    if not st.input_lp:
        return out
    meta = dict(out.get("meta_info") or {})
    meta.update(st.input_lp)
    return dict(out, meta_info=meta)


def prefill_input_meta(body: bytes) -> dict[str, Any]:
    """The ``input_*logprobs`` fields of a prefill answer (plain JSON or an SSE stream)."""
    text = body.strip()
    pieces = [text]
    if text.startswith(b"data:") or b"\ndata:" in text:
        pieces = [ln.strip()[5:].strip() for ln in text.split(b"\n")
                  if ln.strip().startswith(b"data:")]  # fmt: skip
    for piece in reversed(pieces):
        if piece == b"[DONE]":
            continue
        try:
            obj = json_decode(piece)
        except msgspec.DecodeError:
            continue
        meta = obj.get("meta_info") if isinstance(obj, dict) else None
        if isinstance(meta, dict):
            return {k: v for k, v in meta.items() if k.startswith("input_") and "logprobs" in k}
    return {}


def _prefill_fault(pex: Exchange, fut: asyncio.Future) -> str | None:
    """Why the prefill leg failed, or None when it answered 2xx."""
    if fut.cancelled():
        return "was cancelled"
    exc = fut.exception()
    if exc is not None:
        return f"failed: {exc}"
    head = pex.head.result()
    if head.status >= 400:
        what = "refused" if head.status in _REFUSALS else "rejected the request"
        return f"{what}: {head.status} {pex.body()[:200]!r}"
    return None


__all__ = ["PDHandoffPath", "prefill_input_meta"]

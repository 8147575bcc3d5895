# SPDX-License-Identifier: Apache-2.0
"""Load signals measured inside the SGLang scheduler, read through the admin channel.

``POST /banaserve/migrate {"kind": "signals"}`` answers the scheduler's cumulative counters and
its instantaneous state; the live controller (:mod:`banaserve_ext.live`) reads them once per
window and takes differences, so any number of readers (and a restarted controller) see the
same numbers and nothing is reset by reading:

* ``busy_s``: seconds spent in the forward passes and their result processing (``run_batch`` +
  ``process_batch_result``); busy share of a window = Δbusy_s / Δt;
* ``decode_s`` / ``decode_attn_s``: seconds in decode forward passes and, inside them, in the
  attention layers; the decode-attention share of step time = Δdecode_attn_s / Δdecode_s;
* ``prefill_tokens`` / ``decode_tokens``: tokens of extend batches and decode steps processed;
* ``output_tokens``: tokens sampled into requests' outputs — one per request of a decode step,
  and one per request of an extend batch whose prompt is complete (a middle chunk of a chunked
  prefill samples none); Δoutput_tokens / Δt is the window's output rate;
* ``retracted``: decode requests SGLang retracted for lack of KV (``ScheduleBatch.retract_decode``
  put them back in a queue to resume later), ``retract_aborted``: requests that retraction
  aborted instead (no KV backup possible, or the last request still did not fit);
* ``waiting`` (waiting queue plus the PD bootstrap/prealloc/transfer queues), ``running``
  (running batch), ``retracted_waiting`` (retracted requests waiting to resume on a PD decode
  server, also counted in ``waiting``), ``kv_used``/``kv_free``/``kv_total`` tokens (free
  counts evictable cache), ``idle`` (``Scheduler.is_fully_idle``), ``mode`` (the current
  disaggregation role).

Timing is wall time on the scheduler thread: exact on CPU, where a forward is synchronous; on a
GPU the launches are asynchronous and ``decode_attn_s`` would measure launch time only.

The SGLang internals it touches are the ``signals`` group of :mod:`.host.table`: BEFORE and
AFTER hooks on ``Scheduler.run_batch``, ``Scheduler.process_batch_result`` and
``RadixAttention.forward``, an AFTER hook on ``ScheduleBatch.retract_decode``, and reads of
the scheduler's queues (and a PD decode server's retracted queue), running batch, KV allocator,
tree cache, idleness and disaggregation role. The feature is opt-in (``signals`` in
``--banaserve-features`` / ``BANASERVE_SGLANG_FEATURES``); ``banaserve launch`` selects it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

KIND = "signals"


@dataclass
class Counters:
    """Cumulative counters of one scheduler process (scheduler thread only)."""

    busy_s: float = 0.0
    decode_s: float = 0.0
    decode_attn_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    output_tokens: int = 0
    retracted: int = 0
    retract_aborted: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)
    _t_run: float = 0.0
    _run_is_decode: bool = False
    _t_result: float = 0.0
    _t_attn: float = 0.0


def _is_extend(batch: Any) -> bool:
    mode = getattr(batch, "forward_mode", None)
    return bool(mode is not None and mode.is_extend())


def _is_decode(batch: Any) -> bool:
    mode = getattr(batch, "forward_mode", None)  # a batch without a mode (idle) is not decode
    return bool(mode is not None and mode.is_decode())


class Signals:
    """The ``signals`` feature of one scheduler process: its counters and its hooks."""

    def __init__(self) -> None:
        self.counters = Counters()

    def before_run_batch(self, scheduler: Any, batch: Any, *a: Any, **kw: Any) -> None:
        self.counters._t_run = time.perf_counter()
        self.counters._run_is_decode = _is_decode(batch)

    def after_run_batch(self, result: Any, scheduler: Any, batch: Any, *a: Any,
                        **kw: Any) -> None:  # fmt: skip
        c = self.counters
        dt = time.perf_counter() - c._t_run
        c.busy_s += dt
        c.steps += 1
        if c._run_is_decode:
            c.decode_s += dt
            c.decode_tokens += len(batch.reqs or ())
            c.output_tokens += len(batch.reqs or ())
        elif _is_extend(batch):
            c.prefill_tokens += int(getattr(batch, "extend_num_tokens", 0) or 0)
            # a request whose prompt is still being chunked samples no token in this pass
            c.output_tokens += sum(
                1 for r in batch.reqs or () if int(getattr(r, "inflight_middle_chunks", 0)) <= 0
            )

    def after_retract(self, result: Any, batch: Any, *a: Any, **kw: Any) -> None:
        # ScheduleBatch.retract_decode -> (retracted requests, new token ratio, aborted requests)
        retracted, _, aborted = result
        self.counters.retracted += len(retracted)
        self.counters.retract_aborted += len(aborted)

    def before_process_result(self, scheduler: Any, *a: Any, **kw: Any) -> None:
        self.counters._t_result = time.perf_counter()

    def after_process_result(self, result: Any, scheduler: Any, *a: Any, **kw: Any) -> None:
        self.counters.busy_s += time.perf_counter() - self.counters._t_result

    def before_attention(self, layer: Any, *a: Any, **kw: Any) -> None:
        # RadixAttention.forward(self, q, k, v, forward_batch, ...)
        fb = kw.get("forward_batch", a[3] if len(a) > 3 else None)
        self.counters._t_attn = time.perf_counter() if _is_decode(fb) else 0.0

    def after_attention(self, result: Any, *a: Any, **kw: Any) -> None:
        c = self.counters
        if c._t_attn:
            c.decode_attn_s += time.perf_counter() - c._t_attn
            c._t_attn = 0.0

    def handler(self, scheduler: Any, body: dict) -> dict:
        """The ``signals`` admin kind (scheduler thread; reads only, never quiescent)."""
        return snapshot(self.counters, scheduler)


def _qlen(obj: Any, attr: str | None = "queue") -> int:
    if obj is None:
        return 0
    q = getattr(obj, attr, None) if attr else obj
    try:
        return len(q) if q is not None else 0
    except TypeError:
        return 0


def waiting_requests(scheduler: Any) -> int:
    n = _qlen(getattr(scheduler, "waiting_queue", None), None)
    n += _qlen(getattr(scheduler, "disagg_prefill_bootstrap_queue", None))
    n += _qlen(getattr(scheduler, "disagg_prefill_inflight_queue", None), None)
    n += _qlen(getattr(scheduler, "disagg_decode_prealloc_queue", None))
    n += _qlen(getattr(scheduler, "disagg_decode_transfer_queue", None))
    return n + retracted_waiting(scheduler)


def retracted_waiting(scheduler: Any) -> int:
    """Retracted requests a PD decode server holds to resume (a colocated server puts them
    back in its waiting queue instead)."""
    return _qlen(getattr(scheduler, "disagg_decode_prealloc_queue", None), "retracted_queue")


def snapshot(c: Counters, scheduler: Any) -> dict:
    """The counters and the scheduler's instantaneous state, as the ``signals`` reply."""
    total = int(scheduler.max_total_num_tokens)
    available = int(scheduler.token_to_kv_pool_allocator.available_size())
    tree = getattr(scheduler, "tree_cache", None)
    evictable = int(tree.evictable_size()) if tree is not None else 0
    running = getattr(scheduler, "running_batch", None)
    mode = getattr(scheduler, "disaggregation_mode", None)
    return {
        "t": time.monotonic(),
        "started": c.started,
        "busy_s": c.busy_s,
        "decode_s": c.decode_s,
        "decode_attn_s": c.decode_attn_s,
        "prefill_tokens": c.prefill_tokens,
        "decode_tokens": c.decode_tokens,
        "output_tokens": c.output_tokens,
        "retracted": c.retracted,
        "retract_aborted": c.retract_aborted,
        "steps": c.steps,
        "waiting": waiting_requests(scheduler),
        "retracted_waiting": retracted_waiting(scheduler),
        "running": len(getattr(running, "reqs", None) or ()),
        "kv_total": total,
        "kv_free": min(total, available + evictable),
        "kv_used": max(0, total - available - evictable),
        "idle": bool(scheduler.is_fully_idle()),
        "mode": str(getattr(mode, "value", mode)),
    }


def activate(host: Any) -> Signals:
    """Activation of the ``signals`` feature: the admin kind and the timing hooks."""
    sig = Signals()
    host.state("admin").register(KIND, sig.handler, quiescent=False)
    for target, before, after in (
        ("Scheduler.run_batch", sig.before_run_batch, sig.after_run_batch),
        ("Scheduler.process_batch_result", sig.before_process_result, sig.after_process_result),
        ("RadixAttention.forward", sig.before_attention, sig.after_attention),
    ):
        host.hook("signals", target, before, "BEFORE")
        host.hook("signals", target, after, "AFTER")
    host.hook("signals", "ScheduleBatch.retract_decode", sig.after_retract, "AFTER")
    return sig

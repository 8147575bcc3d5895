# SPDX-License-Identifier: Apache-2.0
"""Layer-wise KV overlap inside SGLang's prefill forward pass (``banaserve`` backend only).

While a prefill batch runs, each layer's KV pages of each request leave as soon as that layer's
attention has written them, while the next layers still compute. Two hooks, both wrappers that
call what they wrap (composable with other plug-ins that hook the same places):

* an AROUND hook (SGLang's ``HookRegistry``) on ``Scheduler.run_batch``. On a prefill server
  whose requests use the ``banaserve`` backend, before the forward pass it works out, per
  request, the pages this forward pass writes (``req_to_token[row, prefix_len:extend_end]``,
  whole pages only unless the chunk is the request's last) and asks the request's KV manager to
  open one engine :class:`~banaserve_ext.transfer.SendStream` per decode peer (prepared once per
  chunk: page indices, destination pages, a layer-ordered layout of both pools). After the
  forward pass it marks any layer that was not marked yet (so a layer that never reached the
  attention hook is still sent, only later) and forgets the batch;
* a PyTorch forward hook on every ``RadixAttention`` module of the loaded model, installed on the
  first prefill batch. RadixAttention writes the layer's KV into the pool (the attention
  backend's ``set_kv_buffer``) before it returns, so its forward hook is the moment layer
  ``layer_id`` is final: the hook calls ``mark_layer_ready`` on the streams of the running batch.

Requests whose decode destination is not known at forward time (SGLang's pending bootstrap, a
peer not registered yet) and models that cannot be hooked (no RadixAttention modules, a pool
whose buffers do not map to the attention layers, a non-CPU device: the GPU path needs a CUDA
event per layer and is not wired here) keep the per-chunk send of :mod:`.conn`; the reason is
logged once. The aux/metadata row still goes with the last chunk, after all layers are done.

Pure arithmetic (which tokens a forward pass writes, layer order of the pool's buffers, which
page positions of a chunk a stream already covers) lives in small functions tested on their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ... import _env

logger = logging.getLogger(__name__)

RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"


# -- pure arithmetic --------------------------------------------------------------------------
def written_token_range(
    prefix_len: int, extend_end: int, input_len: int, page_size: int, send_base: int
) -> tuple[int, int, bool]:
    """Tokens ``[start, end)`` of a request whose pages one forward pass completes, and whether
    this pass is the request's last prefill chunk.

    The pass computes KV for tokens ``[prefix_len, extend_end)``. ``start`` is rounded down to a
    page (a page begun by the previous chunk is sent again, whole); unless this is the last
    chunk, ``end`` is rounded down too, so a partial page is sent once it is complete (as SGLang's
    per-chunk send does). ``send_base`` (the decode-side prefix, where sending starts) bounds
    ``start`` from below. ``start >= end`` means nothing to stream.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    end_tok = min(extend_end, input_len)
    is_last = extend_end >= input_len
    if not is_last:
        end_tok -= end_tok % page_size
    start = max(prefix_len, send_base)
    start -= (start - send_base) % page_size
    return start, end_tok, is_last


def layer_buffer_order(
    buffer_ptrs: Sequence[int], layer_ptrs: Sequence[Sequence[int]]
) -> list[int] | None:
    """Indices into ``buffer_ptrs`` (the pool's transfer buffers, e.g. all K then all V) grouped
    by layer in ``layer_ptrs`` order (the data pointers of each layer's buffers, e.g. (K, V)).

    None when the pool cannot be streamed by layer: a layer buffer that is not a transfer buffer,
    one used twice, layers of different buffer counts, or buffers no layer covers.
    """
    where = {int(p): i for i, p in enumerate(buffer_ptrs)}
    if len(where) != len(buffer_ptrs) or not layer_ptrs:
        return None
    per_layer = len(layer_ptrs[0])
    order: list[int] = []
    for ptrs in layer_ptrs:
        if len(ptrs) != per_layer or per_layer == 0:
            return None
        for p in ptrs:
            i = where.get(int(p))
            if i is None:
                return None
            order.append(i)
    if sorted(order) != list(range(len(buffer_ptrs))):
        return None
    return order


def uncovered_ranges(
    begin: int, end: int, covered: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The parts of ``[begin, end)`` not inside any of the ``covered`` ranges, in order."""
    out: list[tuple[int, int]] = []
    pos = begin
    for lo, hi in sorted(covered):
        if hi <= pos or lo >= end:
            continue
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out


# -- per-process state ------------------------------------------------------------------------
class _ModelHooks:
    """Forward hooks on the model's attention modules; one per scheduler process."""

    def __init__(self) -> None:
        self.installed = False
        self.disabled_reason: str | None = None
        self.layer_index: dict[int, int] = {}  # RadixAttention.layer_id -> stream layer
        self.num_layers = 0
        self.active: list[Any] = []  # the running batch's layer streams (conn._LayerSend)
        self.handles: list[Any] = []
        self.thread: int | None = None

    def disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            self.disabled_reason = reason
            logger.warning(
                "banaserve: layer-wise KV overlap is off (%s); KV is sent per prefill chunk",
                reason,
            )

    def on_attention(self, module: Any, _args: Any, _output: Any) -> None:
        if not self.active or threading.get_ident() != self.thread:
            return
        layer = self.layer_index.get(int(getattr(module, "layer_id", -1)))
        if layer is None:
            return
        for send in self.active:
            try:
                send.mark(layer)
            except Exception as exc:  # never break the forward pass; the chunk path decides
                send.failed = f"layer {layer} could not be posted: {exc}"


_hooks = _ModelHooks()


def _install(scheduler: Any, manager: Any) -> None:
    """Hooks the model of ``scheduler``'s worker, once; on any reason not to, disables."""
    _hooks.installed = True
    if not _env.get(_env.SGLANG_LAYERWISE):
        _hooks.disable(f"{_env.SGLANG_LAYERWISE.name}=0")
        return
    try:
        from sglang.srt.layers.radix_attention import RadixAttention

        runner = scheduler.tp_worker.model_runner
        model = runner.model
        pool = runner.token_to_kv_pool
    except Exception as exc:  # another SGLang layout
        _hooks.disable(f"cannot reach the model or KV pool: {exc}")
        return
    attn = [m for m in model.modules() if isinstance(m, RadixAttention)]
    if not attn:
        _hooks.disable(f"{type(model).__name__} has no RadixAttention modules")
        return
    k_bufs, v_bufs = getattr(pool, "k_buffer", None), getattr(pool, "v_buffer", None)
    if k_bufs is None or v_bufs is None:
        _hooks.disable(f"{type(pool).__name__} is not a K/V-per-layer pool")
        return
    if k_bufs[0].device.type != "cpu":
        _hooks.disable(f"KV on {k_bufs[0].device.type}: the per-layer CUDA event path is not wired")
        return
    start = int(getattr(pool, "start_layer", 0) or 0)
    layer_ids = sorted({int(m.layer_id) for m in attn})
    try:
        layer_ptrs = [
            (k_bufs[i - start].data_ptr(), v_bufs[i - start].data_ptr()) for i in layer_ids
        ]
    except (IndexError, AttributeError) as exc:
        _hooks.disable(f"attention layers do not match the KV pool: {exc}")
        return
    order = layer_buffer_order(list(manager.kv_args.kv_data_ptrs), layer_ptrs)
    if order is None:
        _hooks.disable("the pool's transfer buffers do not map one to one to attention layers")
        return
    manager.enable_layerwise(order, buffers_per_layer=2)
    _hooks.layer_index = {lid: i for i, lid in enumerate(layer_ids)}
    _hooks.num_layers = len(layer_ids)
    _hooks.thread = threading.get_ident()
    _hooks.handles = [m.register_forward_hook(_hooks.on_attention) for m in attn]
    logger.info(
        "banaserve: layer-wise KV overlap on: %d attention layers of %s hooked",
        len(layer_ids), type(model).__name__,
    )  # fmt: skip


def _plan(scheduler: Any, batch: Any) -> list[Any]:
    """Opens the layer streams of one prefill batch; [] when nothing streams."""
    from .conn import BanaserveKVManager

    reqs = getattr(batch, "reqs", None) or []
    managers = [
        getattr(getattr(r, "disagg_kv_sender", None), "kv_mgr", None) for r in reqs
    ]
    ours = [(r, m) for r, m in zip(reqs, managers, strict=True)
            if isinstance(m, BanaserveKVManager)]  # fmt: skip
    if not ours:
        return []
    if not _hooks.installed:
        _install(scheduler, ours[0][1])
    if _hooks.disabled_reason is not None:
        return []
    page = int(scheduler.token_to_kv_pool_allocator.page_size)
    req_to_token = scheduler.req_to_token_pool.req_to_token
    translate = getattr(scheduler.token_to_kv_pool_allocator,
                        "translate_kv_indices_for_transfer", None)  # fmt: skip
    sends = []
    for req, mgr in ours:
        if getattr(req, "pending_bootstrap", False) or req.extend_end is None:
            mgr.count_fallback("destination unknown at forward time")
            continue
        try:
            send = _open(scheduler, req, mgr, page, req_to_token, translate)
        except Exception:  # this request goes per chunk; the others still stream
            logger.exception("banaserve: layer streams of room %s not opened", req.bootstrap_room)
            continue
        if send is not None:
            sends.append(send)
    return sends


def _open(scheduler: Any, req: Any, mgr: Any, page: int, req_to_token: Any,
          translate: Any) -> Any:  # fmt: skip
    """Opens one request's layer streams for this forward pass (None: nothing to stream)."""
    base = int(getattr(req, "disagg_decode_prefix_len", 0) or 0)
    start, end, _ = written_token_range(
        int(req.prefix_len), int(req.extend_end), len(req.origin_input_ids), page, base
    )
    if start >= end:
        return None
    tokens = req_to_token[req.kv.req_pool_idx, start:end]
    if translate is not None:
        tokens = translate(tokens)
    pages = (tokens[::page] // page).cpu().numpy().astype(np.int64)
    first_pos = (start - base) // page
    return mgr.open_layer_send(int(req.bootstrap_room), pages, first_pos, _hooks.num_layers)


def around_run_batch(original: Callable[..., Any], scheduler: Any, batch: Any,
                     *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of ``Scheduler.run_batch``: streams a prefill batch's KV layer by layer."""
    sends: list[Any] = []
    try:
        if _prefill_extend(scheduler, batch):
            sends = _plan(scheduler, batch)
    except Exception:  # never let the overlap path break serving: per-chunk sending still works
        logger.exception("banaserve: layer-wise planning failed; this batch is sent per chunk")
        for s in sends:
            s.abandon()
        sends = []
    _hooks.active = sends
    try:
        result = original(scheduler, batch, *args, **kwargs)
    except BaseException:
        _hooks.active = []
        for s in sends:
            s.abandon()
        raise
    _hooks.active = []
    for s in sends:
        s.finish_forward()
    return result


def _prefill_extend(scheduler: Any, batch: Any) -> bool:
    mode = getattr(scheduler, "disaggregation_mode", None)
    if getattr(mode, "value", mode) != "prefill":
        return False
    fm = getattr(batch, "forward_mode", None)
    return fm is not None and fm.is_extend() and not fm.is_prebuilt()


def register() -> None:
    """Registers the ``run_batch`` hook (called from the plug-in's entry point)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(RUN_BATCH, around_run_batch, HookType.AROUND)

# SPDX-License-Identifier: Apache-2.0
"""Layer-wise KV overlap inside SGLang's prefill forward pass (``banaserve`` backend only).

While a prefill batch runs, each layer's KV pages of each request leave as soon as that layer's
attention has written them, while the next layers still compute. Two hooks, both wrappers that
call what they wrap (composable with other plug-ins that hook the same places):

* an AROUND hook (SGLang's ``HookRegistry``, registered through the host layer when the server
  selected the ``layerwise`` feature) on ``Scheduler.run_batch``. On a prefill server
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
from collections.abc import Callable
from typing import Any

import numpy as np

from .pages import layer_buffer_order, uncovered_ranges, written_token_range

logger = logging.getLogger(__name__)

__all__ = ["LayerwiseOverlap", "activate", "layer_buffer_order", "uncovered_ranges",
           "written_token_range"]  # fmt: skip


# -- the feature's state (one object per scheduler process, made by :func:`activate`) -----------
class LayerwiseOverlap:
    """Forward hooks on the model's attention modules and the ``run_batch`` hook."""

    def __init__(self, host: Any) -> None:
        self.sg = host.ns("layerwise")
        self.installed = False
        self.disabled_reason: str | None = None
        self.layer_index: dict[int, int] = {}  # RadixAttention.layer_id -> stream layer
        self.num_layers = 0
        self.active: list[Any] = []  # the running batch's layer streams (layer_send.LayerSend)
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
        layer = self.layer_index.get(int(module.layer_id))
        if layer is None:
            return
        for send in self.active:
            try:
                send.mark(layer)
            except Exception as exc:  # never break the forward pass; the chunk path decides
                send.failed = f"layer {layer} could not be posted: {exc}"

    def install(self, scheduler: Any, manager: Any) -> None:
        """Hooks the model of ``scheduler``'s worker, once; on any reason not to, disables."""
        self.installed = True
        runner = scheduler.tp_worker.model_runner
        model = runner.model
        pool = runner.token_to_kv_pool
        attn = [m for m in model.modules() if isinstance(m, self.sg.RadixAttention)]
        if not attn:
            self.disable(f"{type(model).__name__} has no RadixAttention modules")
            return
        k_bufs, v_bufs = getattr(pool, "k_buffer", None), getattr(pool, "v_buffer", None)
        if k_bufs is None or v_bufs is None:  # another pool type (MLA, hybrid): not an error
            self.disable(f"{type(pool).__name__} is not a K/V-per-layer pool")
            return
        if k_bufs[0].device.type != "cpu":
            self.disable(f"KV on {k_bufs[0].device.type}: the per-layer CUDA event path is "
                         "not wired")  # fmt: skip
            return
        start = int(pool.start_layer or 0)
        layer_ids = sorted({int(m.layer_id) for m in attn})
        try:
            layer_ptrs = [
                (k_bufs[i - start].data_ptr(), v_bufs[i - start].data_ptr()) for i in layer_ids
            ]
        except (IndexError, AttributeError) as exc:
            self.disable(f"attention layers do not match the KV pool: {exc}")
            return
        order = layer_buffer_order(list(manager.kv_args.kv_data_ptrs), layer_ptrs)
        if order is None:
            self.disable("the pool's transfer buffers do not map one to one to attention layers")
            return
        manager.enable_layerwise(order, buffers_per_layer=2)
        self.layer_index = {lid: i for i, lid in enumerate(layer_ids)}
        self.num_layers = len(layer_ids)
        self.thread = threading.get_ident()
        self.handles = [m.register_forward_hook(self.on_attention) for m in attn]
        logger.info(
            "banaserve: layer-wise KV overlap on: %d attention layers of %s hooked",
            len(layer_ids), type(model).__name__,
        )  # fmt: skip

    def plan(self, scheduler: Any, batch: Any) -> list[Any]:
        """Opens the layer streams of one prefill batch; [] when nothing streams."""
        from .conn import ManagerCore

        reqs = batch.reqs or []
        managers = [getattr(r.disagg_kv_sender, "kv_mgr", None) for r in reqs]
        ours = [(r, m) for r, m in zip(reqs, managers, strict=True)
                if isinstance(m, ManagerCore)]  # fmt: skip
        if not ours:
            return []
        if not self.installed:
            self.install(scheduler, ours[0][1])
        if self.disabled_reason is not None:
            return []
        allocator = scheduler.token_to_kv_pool_allocator
        page = int(allocator.page_size)
        req_to_token = scheduler.req_to_token_pool.req_to_token
        # optional in SGLang (listed as such in the host table): absent means identity
        translate = getattr(allocator, "translate_kv_indices_for_transfer", None)
        sends = []
        for req, mgr in ours:
            if req.pending_bootstrap or req.extend_end is None:
                mgr.count_fallback("destination unknown at forward time")
                continue
            try:
                send = self.open(req, mgr, page, req_to_token, translate)
            except Exception:  # this request goes per chunk; the others still stream
                logger.exception("banaserve: layer streams of room %s not opened",
                                 req.bootstrap_room)  # fmt: skip
                continue
            if send is not None:
                sends.append(send)
        return sends

    def open(self, req: Any, mgr: Any, page: int, req_to_token: Any, translate: Any) -> Any:
        """Opens one request's layer streams for this forward pass (None: nothing to stream)."""
        base = int(req.disagg_decode_prefix_len or 0)
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
        return mgr.open_layer_send(int(req.bootstrap_room), pages, first_pos, self.num_layers)

    def around_run_batch(self, original: Callable[..., Any], scheduler: Any, batch: Any,
                         *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """AROUND hook of ``Scheduler.run_batch``: streams a prefill batch's KV layer by layer."""
        sends: list[Any] = []
        try:
            if _prefill_extend(scheduler, batch):
                sends = self.plan(scheduler, batch)
        except Exception:  # never let the overlap path break serving: per-chunk still works
            logger.exception("banaserve: layer-wise planning failed; this batch is sent per chunk")
            for s in sends:
                s.abandon()
            sends = []
        self.active = sends
        try:
            result = original(scheduler, batch, *args, **kwargs)
        except BaseException:
            self.active = []
            for s in sends:
                s.abandon()
            raise
        self.active = []
        for s in sends:
            s.finish_forward()
        return result


def _prefill_extend(scheduler: Any, batch: Any) -> bool:
    mode = scheduler.disaggregation_mode
    if getattr(mode, "value", mode) != "prefill":
        return False
    fm = batch.forward_mode if batch is not None else None
    return fm is not None and fm.is_extend() and not fm.is_prebuilt()


def activate(host: Any) -> LayerwiseOverlap:
    """Activation of the ``layerwise`` feature: the ``run_batch`` hook."""
    overlap = LayerwiseOverlap(host)
    host.hook("layerwise", "Scheduler.run_batch", overlap.around_run_batch)
    return overlap

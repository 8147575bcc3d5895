# SPDX-License-Identifier: Apache-2.0
"""Layer-level weight migration inside a running SGLang server (kinds ``layers`` and
``layers_back`` of ``POST /banaserve/migrate``).

``{"kind": "layers", "first": k, "host": H, "port": P}`` ships the weights of layers
``k..L-1`` and their KV (every token slot in use: running requests and the radix cache) from
this process's memory to the layer server at ``H:P`` (:mod:`banaserve_ext.migration.
layer_server`) through the transfer engine, frees them here, and from the next step on runs
layers ``0..k-1`` locally, ships (hidden, residual) plus the step's positions, KV slots and
per-request token slots to the server, which runs ``k..L-1`` and returns (hidden, residual);
the final norm and the logits stay here. ``"verify": true`` keeps the local copy and checks
every split step bit for bit against the local layers (reported by kind ``layers_status``).
``{"kind": "layers_back"}`` reads weights and KV back into fresh local tensors and restores
the original forward.
``"keep_local": true`` frees nothing: the server also returns each step's new K/V rows of its
layers, written here, so this server's KV stays complete (required on a PD server, whose transfer
backend uses the KV buffers' registered addresses); a lost layer server then falls back to the
local layers (no request fails) and ``layers_back`` only drops the split.

Hooks (registered through the host layer when the server opted into ``layer_migration``; every
SGLang internal used is listed under that feature in ``host/table.py``; the split lives on one
:class:`LayerMigration` object per scheduler process, not on SGLang's model):

* AROUND ``LlamaModel.forward``: unchanged unless the model carries a split; the split forward
  uses the pipeline-parallel handoff of SGLang's layer boundaries
  (``layer_boundary.residual.batch.to_pp`` to leave the local stack, ``access.
  final_norm_pair`` for the final norm), so the residual stream crosses the cut exactly as it
  crosses a pipeline stage.
* AROUND ``Scheduler.run_batch``: a layer server lost mid-step (dead process, closed channel,
  no answer within the deadline) finishes every request of that batch, and of every later
  batch, with ``finish_reason`` abort and a message naming the server; nothing hangs.
* Model, pool and allocator reached as ``scheduler.tp_worker.model_runner.model.model``,
  ``model_runner.token_to_kv_pool`` (``k_buffer``/``v_buffer`` per layer),
  ``model_runner.req_to_token_pool.req_to_token`` and ``scheduler.token_to_kv_pool_allocator``
  (``free_pages``/``release_pages``).
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from ...errors import InvalidArgumentError, NotSupportedError, UnavailableError
from ...migration import layer_layout, layer_server
from ...migration.llama_stack import WEIGHT_NAMES, StackConfig

logger = logging.getLogger(__name__)

EXECUTOR = "banaserve_ext.migration.llama_stack:build"
#: weights that are shared between layers (the rotary cache): shipped, never freed
SHARED_NAMES = ("self_attn.rotary_emb.cos_sin_cache",)


class LayersRequest(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    first: int
    host: str = "127.0.0.1"
    port: int = 0
    verify: bool = False
    timeout_s: float = 30.0
    #: compute offload: the weights and KV stay here too (nothing freed), the layer server
    #: returns each step's new K/V rows, which are written here, so this server's KV stays
    #: complete (a PD server's transfer backend reads/writes every layer's KV at the addresses
    #: it registered at start); a lost layer server falls back to the local layers, no request
    #: fails; ``layers_back`` just drops the split
    keep_local: bool = False


class LayerServerLost(UnavailableError):
    """The layer server of a split model stopped answering."""


@dataclass
class _Split:
    client: layer_server.LayerServerClient
    first: int
    layers: list[int]
    remote_addrs: dict[int, list[int]]
    shapes: dict[int, dict[str, tuple[tuple[int, ...], Any]]]
    verify: bool
    timeout_s: float
    req_to_token: Any
    failed: str | None = None
    keep_local: bool = False
    pool: Any = None
    fallback_steps: int = 0
    steps: int = 0
    step_s: float = 0.0
    verified_steps: int = 0
    mismatched_steps: int = 0
    aborted_requests: int = 0
    report: dict = field(default_factory=dict)


def _inner_model(sg: Any, scheduler: Any) -> tuple[Any, Any]:
    runner = scheduler.tp_worker.model_runner
    inner = getattr(runner.model, "model", None)  # the causal-LM wrapper's decoder stack
    if not isinstance(inner, sg.LlamaModel):
        raise NotSupportedError(
            f"layer migration supports Llama models; this one is {type(runner.model).__name__}"
        )
    return runner, inner


def _layer_tensors(layer: Any) -> dict[str, Any]:
    params = dict(layer.named_parameters())
    want = set(WEIGHT_NAMES) - set(SHARED_NAMES)
    if set(params) != want:
        raise NotSupportedError(
            f"layer parameters {sorted(params)} are not the plain Llama set {sorted(want)} "
            "(biases, quantisation and LoRA are not supported)"
        )
    out = {n: p.data for n, p in params.items()}
    out["self_attn.rotary_emb.cos_sin_cache"] = layer.self_attn.rotary_emb.cos_sin_cache
    return out


def _used_slots(scheduler: Any, num_rows: int) -> np.ndarray:
    alloc = scheduler.token_to_kv_pool_allocator
    free = np.concatenate([alloc.free_pages.cpu().numpy(), alloc.release_pages.cpu().numpy()])
    page = int(getattr(alloc, "page_size", 1))
    if page > 1:
        free = (free[:, None] * page + np.arange(page)[None, :]).ravel()
    return layer_layout.used_rows(num_rows, free.astype(np.int64))


def _stack_config(inner: Any, layers: list[int]) -> StackConfig:
    attn = inner.layers[layers[0]].self_attn
    rope = attn.rotary_emb
    if type(rope).__name__ != "RotaryEmbedding":
        raise NotSupportedError(f"rotary embedding {type(rope).__name__} is not supported")
    return StackConfig(
        layers=layers,
        num_heads=int(attn.num_heads),
        num_kv_heads=int(attn.num_kv_heads),
        head_dim=int(attn.head_dim),
        rotary_dim=int(rope.rotary_dim),
        rms_eps=float(inner.layers[layers[0]].input_layernorm.variance_epsilon),
        neox_style=bool(rope.is_neox_style),
    )


def _refresh_pool_pointers(pool: Any) -> None:
    init = getattr(pool, "_init_data_ptrs_and_strides", None)
    if init is not None:
        try:
            init()
        except Exception:  # noqa: BLE001 - GPU-kernel pointer tables; unused on CPU
            logger.warning("layer migration: could not refresh the pool's data pointers")


# ---- the forward -------------------------------------------------------------------------------
def _split_forward(sg: Any, split: _Split, model: Any, input_ids: Any, positions: Any, fb: Any,
                   input_embeds: Any) -> Any:  # fmt: skip
    import torch

    hidden = model.embed_tokens(input_ids) if input_embeds is None else input_embeds
    sg["residual.batch.start"](fb)
    for i in range(model.start_layer, split.first):
        hidden = model.layers[i](positions, hidden, fb)
    out = sg["residual.batch.to_pp"](hidden, fb)
    h, r = out["hidden_states"], out["residual"]
    if split.failed:
        return torch.zeros_like(h)
    if fb.forward_mode.is_decode():
        mode, prefix = "decode", None
    elif fb.forward_mode.is_extend():
        mode, prefix = "extend", fb.extend_prefix_lens.to(torch.int64)
    else:
        raise NotSupportedError(f"forward mode {fb.forward_mode} with migrated layers")
    seq_lens = fb.seq_lens.to(torch.int64)
    rows = layer_layout.gather_token_rows(
        split.req_to_token.numpy(), fb.req_pool_indices.cpu().numpy(), seq_lens.numpy()
    )
    tensors = {
        "hidden": h, "residual": r, "positions": positions.to(torch.int64),
        "out_cache_loc": fb.out_cache_loc.to(torch.int64), "seq_lens": seq_lens,
        "extend_prefix_lens": prefix, "token_rows": torch.from_numpy(rows),
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        h2, r2, kv = layer_server.remote_step_kv(split.client, mode, tensors, split.timeout_s,
                                                 return_kv=split.keep_local)  # fmt: skip
    except UnavailableError as exc:
        split.failed = str(exc)
        if split.keep_local:
            logger.error("layer migration: %s; back to the local layers", exc)
            return _local_rest(sg, split, model, positions, fb, h, r)
        logger.error("layer migration: %s; failing the affected requests", exc)
        return torch.zeros_like(h)
    split.step_s += time.perf_counter() - t0
    split.steps += 1
    if split.keep_local:
        loc = fb.out_cache_loc
        for i in split.layers:
            split.pool.k_buffer[i][loc] = kv[f"k{i}"]
            split.pool.v_buffer[i][loc] = kv[f"v{i}"]
    if split.verify:
        local = model.layers[split.first].attn_boundary.from_pp(
            sg.PPProxyTensors({"hidden_states": h, "residual": r}), fb
        )
        for i in range(split.first, model.end_layer):
            local = model.layers[i](positions, local, fb)
        ref = sg["residual.batch.to_pp"](local, fb)
        same = torch.equal(ref["hidden_states"], h2) and torch.equal(ref["residual"], r2)
        split.verified_steps += 1
        split.mismatched_steps += 0 if same else 1
    return sg["residual.access.final_norm_pair"](h2, r2, model.norm)


def _pd_mode(scheduler: Any) -> str:
    """The scheduler's current disaggregation role (it changes with SGLang's role switch)."""
    mode = getattr(scheduler, "disaggregation_mode", None)
    return str(getattr(mode, "value", mode or "null"))


def _local_rest(sg: Any, split: _Split, model: Any, positions: Any, fb: Any, h: Any,
                r: Any) -> Any:  # fmt: skip
    """The layers ``split.first..`` run here (``keep_local``: weights and KV are complete)."""
    local = model.layers[split.first].attn_boundary.from_pp(
        sg.PPProxyTensors({"hidden_states": h, "residual": r}), fb
    )
    for i in range(split.first, model.end_layer):
        local = model.layers[i](positions, local, fb)
    out = sg["residual.batch.to_pp"](local, fb)
    split.fallback_steps += 1
    return sg["residual.access.final_norm_pair"](out["hidden_states"], out["residual"],
                                                 model.norm)  # fmt: skip


class LayerMigration:
    """The ``layer_migration`` feature in one scheduler process: at most one split model."""

    def __init__(self, host: Any) -> None:
        self.sg = host.ns("layer_migration")
        self.split: _Split | None = None
        self.model: Any = None  # the LlamaModel the split belongs to

    @staticmethod
    def blocked(scheduler: Any) -> str | None:
        """Why this server cannot hand layers away, or ``None``: HiCache copies every layer's
        KV between device and host pool, and a migrated layer's buffers are gone here."""
        if getattr(scheduler.server_args, "enable_hierarchical_cache", False):
            return "layer migration does not support --enable-hierarchical-cache (HiCache)"
        if _pd_mode(scheduler) == "decode":
            return ("a PD decode server receives new requests' KV into its own buffers, which "
                    "the layer server would not see")  # fmt: skip
        return None

    def migrate_layers(self, scheduler: Any, body: dict) -> dict:
        import torch

        req = msgspec.convert(body, LayersRequest)
        runner, inner = _inner_model(self.sg, scheduler)
        why = self.blocked(scheduler)
        if why:
            raise NotSupportedError(why)
        if _pd_mode(scheduler) != "null" and not req.keep_local:
            raise NotSupportedError(
                "a PD server's transfer backend reads/writes every layer's KV at the addresses it "
                'registered at start: migrate with "keep_local": true (nothing freed here)'
            )
        if self.split is not None:
            raise InvalidArgumentError("layers are already migrated; migrate them back first")
        if inner.start_layer != 0 or inner.end_layer != len(inner.layers):
            raise NotSupportedError("layer migration with pipeline parallelism is not supported")
        layers = layer_layout.split_layers(len(inner.layers), req.first)
        if not req.port:
            raise InvalidArgumentError("port of the layer server is required")
        pool = runner.token_to_kv_pool
        rows = int(pool.k_buffer[layers[0]].shape[0])
        used = _used_slots(scheduler, rows)
        ship: dict[int, list[layer_server.ShipTensor]] = {}
        shapes: dict[int, dict[str, tuple[tuple[int, ...], Any]]] = {}
        for i in layers:
            tensors = _layer_tensors(inner.layers[i])
            ship[i] = [layer_server.ShipTensor(n, tensors[n]) for n in WEIGHT_NAMES]
            ship[i] += [
                layer_server.ShipTensor("k_buffer", pool.k_buffer[i], used),
                layer_server.ShipTensor("v_buffer", pool.v_buffer[i], used),
            ]
            shapes[i] = {st.name: (tuple(st.tensor.shape), st.tensor.dtype) for st in ship[i]}
        cfg = msgspec.msgpack.encode(_stack_config(inner, layers))
        client = layer_server.LayerServerClient(req.host, req.port, req.timeout_s).start()
        try:
            rep = layer_server.ship_layers(client, ship, EXECUTOR, cfg, req.timeout_s)
        except Exception:
            client.close()
            raise
        del ship
        freed: dict[str, Any] = {"weight_bytes": 0, "kv_bytes": 0, "not_freed": []}
        if not req.verify and not req.keep_local:
            t0 = time.perf_counter()
            wrefs: list[tuple[weakref.ref, int]] = []
            krefs: list[tuple[weakref.ref, int]] = []
            for i in layers:
                layer = inner.layers[i]
                for name, p in list(layer.named_parameters()):
                    mod_name, _, pname = name.rpartition(".")
                    mod = layer.get_submodule(mod_name)
                    wrefs.append((weakref.ref(p), p.numel() * p.element_size()))
                    mod._parameters[pname] = torch.nn.Parameter(
                        torch.empty(0, dtype=p.dtype), requires_grad=False
                    )
                    del p
                for buf_list in (pool.k_buffer, pool.v_buffer):
                    t = buf_list[i]
                    base = t._base if t._base is not None else t
                    krefs.append((weakref.ref(base), t.numel() * t.element_size()))
                    buf_list[i] = torch.empty((0, *t.shape[1:]), dtype=t.dtype)
                    del t, base
            _refresh_pool_pointers(pool)
            if any(ref() is not None for ref, _ in wrefs + krefs):
                gc.collect()  # only when reference counting alone did not free them
            for kind, refs in (("weight_bytes", wrefs), ("kv_bytes", krefs)):
                for ref, n in refs:
                    if ref() is None:
                        freed[kind] += n
                    else:
                        freed["not_freed"].append(f"{kind}: {n} bytes still referenced elsewhere")
            freed["free_s"] = time.perf_counter() - t0
            freed["kept_shared"] = list(SHARED_NAMES)
        addrs = rep.pop("remote_addrs")
        split = _Split(
            client=client, first=req.first, layers=layers, remote_addrs=addrs,
            shapes=shapes, verify=req.verify, timeout_s=req.timeout_s,
            req_to_token=runner.req_to_token_pool.req_to_token, report=rep,
            keep_local=req.keep_local, pool=pool,
        )  # fmt: skip
        self.split, self.model = split, inner
        return {"moved": rep, "freed": freed, "kv_slots": int(used.size), "verify": req.verify,
                "keep_local": req.keep_local}  # fmt: skip

    def migrate_back(self, scheduler: Any, body: dict) -> dict:
        import torch

        runner, inner = _inner_model(self.sg, scheduler)
        split = self.split
        if split is None:
            raise InvalidArgumentError("no layers are migrated")
        if split.keep_local:  # everything is here: drop the split, free the server's arena
            t0 = time.perf_counter()
            if not split.failed:
                try:
                    split.client.call({"op": "release"})
                except UnavailableError as exc:
                    logger.warning("layer migration: release on the layer server: %s", exc)
            self.split, self.model = None, None
            split.client.close()
            return {"moved": {"total_s": time.perf_counter() - t0, "weight_bytes": 0,
                              "kv_bytes": 0}, "restored_weight_bytes": 0,
                    "split_steps": split.steps, "fallback_steps": split.fallback_steps,
                    "failed": split.failed}  # fmt: skip
        if split.failed:
            raise UnavailableError(f"cannot migrate back: {split.failed}")
        pool = runner.token_to_kv_pool
        rows = split.shapes[split.layers[0]]["k_buffer"][0][0]
        used = _used_slots(scheduler, rows)
        fetch: dict[int, list[layer_server.ShipTensor]] = {}
        kv_new: dict[int, tuple[Any, Any]] = {}
        for i in split.layers:
            sh = split.shapes[i]
            fetch[i] = [
                layer_server.ShipTensor(n, torch.empty(sh[n][0], dtype=sh[n][1]))
                for n in WEIGHT_NAMES
            ]
            k_shape, dtype = sh["k_buffer"]
            if split.verify:
                k, v = pool.k_buffer[i], pool.v_buffer[i]
            else:  # the layout SGLang allocates: K and V as the halves of one buffer
                fused = torch.zeros((2, *k_shape), dtype=dtype)
                k, v = fused[0], fused[1]
            kv_new[i] = (k, v)
            fetch[i] += [
                layer_server.ShipTensor("k_buffer", k, used),
                layer_server.ShipTensor("v_buffer", v, used),
            ]
        rep = layer_server.fetch_layers(split.client, fetch, split.remote_addrs, split.timeout_s)
        restored_weight_bytes = 0
        if not split.verify:
            for i in split.layers:
                layer = inner.layers[i]
                got = {st.name: st.tensor for st in fetch[i]}
                for name in WEIGHT_NAMES:
                    if name in SHARED_NAMES:
                        continue
                    mod_name, _, pname = name.rpartition(".")
                    layer.get_submodule(mod_name)._parameters[pname] = torch.nn.Parameter(
                        got[name], requires_grad=False
                    )
                    restored_weight_bytes += got[name].numel() * got[name].element_size()
                pool.k_buffer[i], pool.v_buffer[i] = kv_new[i]
            _refresh_pool_pointers(pool)
        self.split, self.model = None, None
        split.client.close()
        return {"moved": rep, "restored_weight_bytes": restored_weight_bytes,
                "kv_slots": int(used.size), "split_steps": split.steps}  # fmt: skip

    def layers_status(self, scheduler: Any, body: dict) -> dict:
        _inner_model(self.sg, scheduler)
        split = self.split
        if split is None:
            return {"split": False, "blocked": self.blocked(scheduler)}
        return {
            "split": True, "blocked": None, "first": split.first, "layers": split.layers,
            "steps": split.steps,
            "mean_step_ms": 1e3 * split.step_s / max(split.steps, 1),
            "verified_steps": split.verified_steps, "mismatched_steps": split.mismatched_steps,
            "failed": split.failed, "aborted_requests": split.aborted_requests,
            "keep_local": split.keep_local, "fallback_steps": split.fallback_steps,
        }  # fmt: skip

    def around_llama_forward(self, original: Any, model: Any, input_ids: Any, positions: Any,
                             forward_batch: Any, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        split = self.split if model is self.model else None
        if split is None or (split.failed and split.keep_local):
            return original(model, input_ids, positions, forward_batch, *args, **kwargs)
        embeds = args[0] if args else kwargs.get("input_embeds")
        return _split_forward(self.sg, split, model, input_ids, positions, forward_batch, embeds)

    def around_run_batch(self, original: Any, scheduler: Any, batch: Any, *args: Any,
                         **kwargs: Any) -> Any:  # fmt: skip
        result = original(scheduler, batch, *args, **kwargs)
        split = self.split
        if split is not None and split.failed and not split.keep_local:
            for req in batch.reqs:
                if not req.finished():
                    req.set_finish_with_abort(
                        f"layer migration: {split.failed}", status_code=503,
                        err_type="LayerServerLost",
                    )  # fmt: skip
                    split.aborted_requests += 1
        return result


def activate(host: Any) -> LayerMigration:
    """Activation of the ``layer_migration`` feature: its kinds and its two hooks."""
    mig = LayerMigration(host)
    channel = host.state("admin")
    channel.register("layers", mig.migrate_layers)
    channel.register("layers_back", mig.migrate_back)
    channel.register("layers_status", mig.layers_status, quiescent=False)
    host.hook("layer_migration", "LlamaModel.forward", mig.around_llama_forward)
    host.hook("layer_migration", "Scheduler.run_batch", mig.around_run_batch)
    return mig


def register() -> None:
    """Entry point ``banaserve_layer_migration`` (kept for installs that list it in
    ``SGLANG_PLUGINS``): the host layer loads every feature the server selected."""
    from . import host

    host.load()

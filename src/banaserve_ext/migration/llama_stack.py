# SPDX-License-Identifier: Apache-2.0
"""A Llama decoder-layer stack in plain torch, op for op what SGLang 0.5.23 computes on CPU.

The layer server runs migrated layers with this. Bit-identical results need the same operations
in the same order on the same shapes, so each step below mirrors the CPU path of SGLang's
``LlamaDecoderLayer`` without AMX kernels and with the ``torch_native`` attention backend:

* RMSNorm (``forward_native``): fp32 add of the residual, ``x.pow(2).mean``, ``rsqrt``,
  multiply by the weight, cast back; the residual becomes the sum.
* QKV / O / gate-up / down projections: ``F.linear`` without bias.
* Rotary embedding (``forward_native``): ``index_select`` of the owner's own ``cos_sin_cache``
  (shipped with the weights, never recomputed), neox-style rotation of the first
  ``rotary_dim`` channels.
* Attention (``TorchNativeAttnBackend``): new K/V written to the cache rows ``out_cache_loc``
  first, then one ``scaled_dot_product_attention`` per request over its cached rows; extend
  steps use a query padded to the full sequence (rows of the prefix left unset) with a causal
  mask, decode steps one query row without a mask.
* SiluAndMul (``forward_native``): ``silu(x[..., :d]) * x[..., d:]``.

The stack receives and returns the pair (hidden, residual) at a layer boundary, exactly what
SGLang's pipeline-parallel handoff (``residual.batch.to_pp``) carries between ranks.
torch is imported lazily (``import banaserve_ext`` never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import InvalidArgumentError, NotSupportedError

#: names of the per-layer tensors, in the order the owner ships them
WEIGHT_NAMES: tuple[str, ...] = (
    "input_layernorm.weight",
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
    "self_attn.rotary_emb.cos_sin_cache",
)
KV_NAMES: tuple[str, ...] = ("k_buffer", "v_buffer")


class StackConfig(msgspec.Struct, frozen=True):
    """What the stack needs besides tensors (sent by the owner with the layer specs)."""

    layers: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rms_eps: float
    neox_style: bool = True

    def validate(self) -> None:
        if not self.layers or self.num_heads <= 0 or self.num_kv_heads <= 0:
            raise InvalidArgumentError(f"bad stack config {self}")
        if self.num_heads % self.num_kv_heads or self.rotary_dim > self.head_dim:
            raise InvalidArgumentError(f"bad head layout in {self}")
        if not self.neox_style:
            raise NotSupportedError("only neox-style rotary embeddings are supported")


def _rms_norm(x: Any, weight: Any, eps: float, residual: Any = None) -> tuple[Any, Any]:
    import torch

    if not x.is_contiguous():
        x = x.contiguous()
    orig = x.dtype
    x = x.to(torch.float32)
    if residual is not None:
        x = x + residual.to(torch.float32)
        residual = x.to(orig)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    x = (x * weight).to(orig)
    return x, residual


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rope(positions: Any, q: Any, k: Any, cache: Any, head_dim: int, rot: int) -> tuple[Any, Any]:
    import torch

    positions = positions.flatten()
    n = positions.shape[0]
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    out = []
    for t in (q, k):
        shape = t.shape
        t = t.view(n, -1, head_dim)
        t_rot = _rotate(t[..., :rot], cos, sin)
        out.append(torch.cat((t_rot, t[..., rot:]), dim=-1).reshape(shape))
    return out[0], out[1]


@dataclass
class StepInputs:
    """One forward step as the stack sees it (all int tensors int64, on CPU)."""

    mode: str  # "extend" | "decode"
    positions: Any  # [T]
    out_cache_loc: Any  # [T] cache rows the new tokens' K/V go to
    seq_lens: Any  # [B] tokens of each request after this step
    extend_prefix_lens: Any  # [B] (extend only) tokens already cached before this step
    token_rows: Any  # [sum(seq_lens)] cache rows of each request, request after request


class LlamaStack:
    """Runs ``config.layers`` on (hidden, residual); ``tensors[layer][name]`` are its weights,
    its rotary cache and its K/V cache buffers (``[rows, kv_heads, head_dim]``)."""

    def __init__(self, config: StackConfig, tensors: dict[int, dict[str, Any]]) -> None:
        config.validate()
        missing = [
            (layer, n)
            for layer in config.layers
            for n in (*WEIGHT_NAMES, *KV_NAMES)
            if n not in tensors.get(layer, {})
        ]
        if missing:
            raise InvalidArgumentError(f"missing tensors for the stack: {missing[:4]}")
        self.config = config
        self.tensors = tensors
        c = config
        self._q = c.num_heads * c.head_dim
        self._kv = c.num_kv_heads * c.head_dim
        self._scale = c.head_dim**-0.5

    def _attention(self, q: Any, k: Any, v: Any, layer: int, step: StepInputs) -> Any:
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        c = self.config
        t = self.tensors[layer]
        kc, vc = t["k_buffer"], t["v_buffer"]
        k = k.view(-1, c.num_kv_heads, c.head_dim)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        kc[step.out_cache_loc] = k
        vc[step.out_cache_loc] = v
        o = torch.empty_like(q)
        q3 = q.view(-1, c.num_heads, c.head_dim).movedim(0, 1)
        o3 = o.view(-1, c.num_heads, c.head_dim)
        gqa = c.num_heads != c.num_kv_heads
        lens = step.seq_lens.tolist()
        prefix = step.extend_prefix_lens.tolist() if step.mode == "extend" else None
        start_q = start_kv = 0
        for b, seq_len in enumerate(lens):
            rows = step.token_rows[start_kv : start_kv + seq_len]
            key = kc[rows].movedim(0, 1).unsqueeze(0)
            val = vc[rows].movedim(0, 1).unsqueeze(0)
            if prefix is None:
                n_q = 1
                query = q3[:, start_q : start_q + 1, :]
                out = sdpa(query.unsqueeze(0), key, val, enable_gqa=gqa, scale=self._scale,
                           is_causal=False)  # fmt: skip
                o3[start_q : start_q + 1] = out.squeeze(0).movedim(1, 0)
            else:
                pre = prefix[b]
                n_q = seq_len - pre
                query = q3[:, start_q : start_q + n_q, :]
                padded = torch.empty((query.shape[0], seq_len, query.shape[2]), dtype=q.dtype)
                padded[:, pre:, :] = query
                out = sdpa(padded.unsqueeze(0), key, val, enable_gqa=gqa, scale=self._scale,
                           is_causal=True)  # fmt: skip
                o3[start_q : start_q + n_q] = out.squeeze(0).movedim(1, 0)[pre:]
            start_q += n_q
            start_kv += seq_len
        return o

    def run(self, step: StepInputs, hidden: Any, residual: Any) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        if step.mode not in ("extend", "decode"):
            raise NotSupportedError(f"forward mode {step.mode!r} is not supported by the stack")
        c = self.config
        with torch.inference_mode():
            h, r = hidden, residual
            for layer in c.layers:
                t = self.tensors[layer]
                if r is None:  # the first layer of the model: the stream starts here
                    r = h
                    x, _ = _rms_norm(h, t["input_layernorm.weight"], c.rms_eps)
                else:
                    x, r = _rms_norm(h, t["input_layernorm.weight"], c.rms_eps, r)
                qkv = F.linear(x, t["self_attn.qkv_proj.weight"])
                q, k, v = qkv.split([self._q, self._kv, self._kv], dim=-1)
                q, k = _rope(step.positions, q, k, t["self_attn.rotary_emb.cos_sin_cache"],
                             c.head_dim, c.rotary_dim)  # fmt: skip
                o = self._attention(q, k, v, layer, step)
                h = F.linear(o, t["self_attn.o_proj.weight"])
                x, r = _rms_norm(h, t["post_attention_layernorm.weight"], c.rms_eps, r)
                gu = F.linear(x, t["mlp.gate_up_proj.weight"])
                d = gu.shape[-1] // 2
                h = F.linear(F.silu(gu[..., :d]) * gu[..., d:], t["mlp.down_proj.weight"])
            return h, r


def build(config_bytes: bytes, tensors: dict[int, dict[str, Any]]) -> LlamaStack:
    """Executor factory the layer server calls (``banaserve_ext.migration.llama_stack:build``)."""
    cfg = msgspec.msgpack.decode(config_bytes, type=StackConfig)
    return LlamaStack(cfg, tensors)

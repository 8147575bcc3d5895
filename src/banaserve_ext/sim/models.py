# SPDX-License-Identifier: Apache-2.0
"""Model and GPU descriptions: the sizes the simulator derives time and memory from.

Every per-instance quantity that layer or attention migration changes (weight bytes per layer,
KV bytes per token, layer count) comes from here, never from a typed-in per-experiment number.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NotFoundError

GIB = 1024**3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.layers

    @property
    def params_per_layer(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * self.intermediate  # gate, up, down
        return attn + mlp + 2 * h  # two RMSNorm weights

    @property
    def weight_bytes_per_layer(self) -> int:
        return self.params_per_layer * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        embed = 2 * self.vocab * self.hidden  # embedding + lm_head (untied)
        return self.layers * self.weight_bytes_per_layer + embed * self.dtype_bytes


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),
        ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256),
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        ModelSpec("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
        ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
    )
}
_MODEL_ALIASES = {
    "llama-3-8b": "llama-3.1-8b",
    "llama-3-70b": "llama-3.1-70b",
    "llama3-70b": "llama-3.1-70b",
    "llama3-8b": "llama-3.1-8b",
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    #: name used by the calibration tables (a800 computes like an a100)
    table_name: str
    nvlink_gbps: float  # GB/s per GPU, one direction
    nic_gbps: float  # GB/s per GPU, inter-node
    mem_util: float = 0.9


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("h100", 80 * GIB, "h100", 450.0, 50.0),
        GpuSpec("a100", 80 * GIB, "a100", 300.0, 25.0),
        GpuSpec("a800", 80 * GIB, "a100", 200.0, 25.0),
        GpuSpec("rtxpro6000", 96 * GIB, "rtxpro6000", 64.0, 16.0),
    )
}


def get_model(name: str) -> ModelSpec:
    key = _MODEL_ALIASES.get(name.lower(), name.lower())
    try:
        return MODELS[key]
    except KeyError:
        raise NotFoundError(
            f"unknown model {name!r} (--model); known: {', '.join(sorted(MODELS))}"
        ) from None


def get_gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise NotFoundError(
            f"unknown GPU {name!r} (--gpu); known: {', '.join(sorted(GPUS))}"
        ) from None


def kv_capacity_tokens(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    layers_held: int | None = None,
    extra_weight_bytes: int = 0,
) -> int:
    """KV tokens an instance of ``tp`` GPUs can hold after its weights.

    ``layers_held`` (default: all) and ``extra_weight_bytes`` let migrated layers change memory.
    Raises InvalidArgumentError naming the setting when the weights do not fit.
    """
    from ..errors import InvalidArgumentError

    held = model.layers if layers_held is None else layers_held
    weights = held * model.weight_bytes_per_layer + extra_weight_bytes
    weights += 2 * model.vocab * model.hidden * model.dtype_bytes
    budget = tp * gpu.memory_bytes * gpu.mem_util - weights
    per_token = model.kv_bytes_per_token_layer * held
    if budget <= per_token * 1024:
        raise InvalidArgumentError(
            f"--tp {tp} x {gpu.name} ({tp * gpu.memory_bytes / GIB:.0f} GiB) cannot hold "
            f"{model.name} ({weights / GIB:.1f} GiB of weights) with room for KV"
        )
    return int(budget // per_token)

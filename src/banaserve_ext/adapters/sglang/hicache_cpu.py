# SPDX-License-Identifier: Apache-2.0
"""HiCache's host tier on a CPU-only host (opt-in, for the CPU test bed).

SGLang 0.5.23's host KV pool assumes an accelerator: it page-locks host buffers with
``cudaHostRegister``, binds the ``direct`` IO kernels (``transfer_kv_direct``) only for
CUDA/HIP/XPU, and synchronises a device stream. On a CPU-only host, and only in processes started
through the CPU launcher (:func:`.cpu_compat.active`) of a server with HiCache on, the host
layer's ``hicache_cpu`` feature (:func:`activate`) replaces those three with CPU equivalents.
GPU hosts, plain SGLang launches and servers without HiCache are never touched.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def transfer_kv_direct(
    src_layers: list[Any], dst_layers: list[Any], src_indices: Any, dst_indices: Any,
    page_size: int,
) -> None:  # fmt: skip
    """Torch version of SGLang's ``transfer_kv_direct`` kernel: ``dst[dst_idx] = src[src_idx]``
    for each (K, V) layer pair; indices are token indices along dim 0."""
    for src, dst in zip(src_layers, dst_layers, strict=True):
        dst[dst_indices.to(dst.device)] = src[src_indices.to(src.device)]


def _no_host_register(buffer: Any, registration_granularity_bytes: int | None = None) -> None:
    return None  # nothing to page-lock for: no device will DMA from host memory


def activate(host: Any) -> None:
    """Activation of the ``hicache_cpu`` feature (its internals are probed by the host)."""
    import importlib

    import torch

    table = host.table["hicache_cpu"]
    register_fn = table["pool_host.common._cuda_host_register"].path
    common = importlib.import_module(register_fn.rpartition(".")[0])
    common._cuda_host_register = _no_host_register
    for name in ("pool_host.mha.transfer_kv_direct", "memory_pool_host.transfer_kv_direct"):
        try:
            module = importlib.import_module(table[name].path)
        except ImportError:  # the optional legacy module is gone: nothing to patch there
            continue
        module.transfer_kv_direct = transfer_kv_direct
    torch.cpu.Stream.synchronize = lambda self: None  # type: ignore[method-assign]
    logger.info("banaserve: HiCache host tier patched for CPU")


def register() -> None:
    """Entry point ``banaserve_hicache_cpu`` (kept for installs that list it in
    ``SGLANG_PLUGINS``): the host layer loads every feature the server selected."""
    from . import host

    host.load()

# SPDX-License-Identifier: Apache-2.0
"""HiCache's host tier on a CPU-only host (opt-in, for the CPU test bed).

SGLang 0.5.23's host KV pool assumes an accelerator: it page-locks host buffers with
``cudaHostRegister``, binds the ``direct`` IO kernels (``transfer_kv_direct``) only for
CUDA/HIP/XPU, and synchronises a device stream. On a CPU-only host, and only in processes started
through the CPU launcher (:func:`.cpu_compat.active`), :func:`register` — the
``sglang.srt.plugins`` entry point ``banaserve_hicache_cpu``, run in every SGLang process —
replaces those three with CPU equivalents. GPU hosts and plain SGLang launches are never touched.
"""

from __future__ import annotations

import logging
from typing import Any

from . import cpu_compat

logger = logging.getLogger(__name__)


def transfer_kv_direct(
    src_layers: list[Any], dst_layers: list[Any], src_indices: Any, dst_indices: Any,
    page_size: int,
) -> None:  # fmt: skip
    """Torch version of SGLang's ``transfer_kv_direct`` kernel: ``dst[dst_idx] = src[src_idx]``
    for each (K, V) layer pair; indices are token indices along dim 0."""
    for src, dst in zip(src_layers, dst_layers, strict=True):
        dst[dst_indices.to(dst.device)] = src[src_indices.to(src.device)]


def apply() -> None:
    import torch
    from sglang.srt.mem_cache import memory_pool_host
    from sglang.srt.mem_cache.pool_host import common, mha

    def _no_host_register(buffer: Any, registration_granularity_bytes: int | None = None) -> None:
        return None  # nothing to page-lock for: no device will DMA from host memory

    common._cuda_host_register = _no_host_register
    mha.transfer_kv_direct = transfer_kv_direct
    memory_pool_host.transfer_kv_direct = transfer_kv_direct
    torch.cpu.Stream.synchronize = lambda self: None  # type: ignore[method-assign]
    logger.info("banaserve: HiCache host tier patched for CPU")


def register() -> None:
    """``sglang.srt.plugins`` entry point: applies :func:`apply` under the CPU launcher only."""
    if cpu_compat.active():
        apply()

# SPDX-License-Identifier: Apache-2.0
"""Two real SGLang servers (CPU) attached to one shared-memory KV pool through the banaserve
HiCache backend: a prefix computed by server 1 is served from the pool on server 2, with greedy
output identical to server 1's own."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sglang_testbed.cluster import generate

from banaserve_ext.kvpool import KVPool

pytestmark = pytest.mark.sglang

PROMPT = " ".join(
    f"record {i}: the pool keeps page {i * 7 % 13} of layer {i % 3} for later reuse;"
    for i in range(14)
)


def _page_bytes(model_dir: Path, page_tokens: int) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    bf16 = 2
    return 2 * cfg["num_hidden_layers"] * page_tokens * cfg["num_key_value_heads"] * head_dim * bf16


def test_prefix_from_server_1_is_a_storage_hit_on_server_2(sglang_cluster, tiny_model_dir) -> None:
    name = f"pytest-hicache-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    page_bytes = _page_bytes(tiny_model_dir, 1)
    extra = json.dumps({
        "backend_name": "banaserve",
        "module_path": "banaserve_ext.adapters.sglang.hicache",
        "class_name": "BanaserveHiCacheStorage",
        "pool": name,
        "interface_v1": 1,
    })  # fmt: skip
    args = (
        "--enable-hierarchical-cache", "--hicache-io-backend", "direct",
        "--hicache-mem-layout", "layer_first", "--hicache-size", "1",
        "--hicache-storage-backend", "dynamic",
        "--hicache-storage-backend-extra-config", extra,
        "--hicache-storage-prefetch-policy", "wait_complete",
    )  # fmt: skip
    with KVPool(name, create=True, capacity_bytes=64 << 20, page_size=page_bytes) as pool:
        cfg1, p1 = sglang_cluster.server("single", wait=False, extra_args=args)
        cfg2, p2 = sglang_cluster.server("single", wait=False, extra_args=args)
        try:
            _run(sglang_cluster, pool, cfg1, cfg2)
        finally:
            # Stop both while the pool is still up, and give SIGKILLed children (2 GB each)
            # time to exit before the fixture checks that their process groups are gone.
            for proc in (p2, p1):
                sglang_cluster.stop(proc)
            deadline = time.monotonic() + 60
            while (p1.group_alive() or p2.group_alive()) and time.monotonic() < deadline:
                time.sleep(0.2)


def _run(sglang_cluster: Any, pool: KVPool, cfg1: Any, cfg2: Any) -> None:
    sglang_cluster.wait_all()

    first = generate(cfg1.url, text=PROMPT, max_new_tokens=12)
    prompt_tokens = first["meta_info"]["prompt_tokens"]
    assert prompt_tokens > 300
    # server 1 backs its pages up to the pool asynchronously
    deadline = time.monotonic() + 120
    while pool.stats()["committed_pages"] < prompt_tokens - 1:
        assert time.monotonic() < deadline, f"pool never filled: {pool.stats()}"
        time.sleep(0.5)
    stored = pool.stats()["committed_pages"]

    second = generate(cfg2.url, text=PROMPT, max_new_tokens=12)
    assert second["output_ids"] == first["output_ids"]
    details = second["meta_info"].get("cached_tokens_details") or {}
    storage_hits = int(details.get("storage", 0))
    assert storage_hits >= prompt_tokens - 2, second["meta_info"]
    assert pool.stats()["hits"] >= storage_hits
    assert stored >= prompt_tokens - 1
    print(f"prompt {prompt_tokens} tokens, pool pages {stored}, storage hits {storage_hits}")

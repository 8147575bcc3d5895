# SPDX-License-Identifier: Apache-2.0
"""Mooncake Conductor's routing (``global_cache_aware``) as a plain policy object."""

from __future__ import annotations

import pytest

from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.policies import RequestInfo, WorkerLoad
from banaserve_ext.policies.global_cache_aware import GlobalCacheAwarePolicy


def _prefill(tokens: int, prefix: int) -> float:
    return 1e-4 * tokens  # 10 k tokens/s


def _req(rid: str, hashes: tuple[int, ...]) -> RequestInfo:
    return RequestInfo(rid, prompt_tokens=512 * len(hashes), block_hashes=hashes)


def test_prefers_the_worker_holding_the_prefix_without_a_store_cost() -> None:
    p = GlobalCacheAwarePolicy(0, prefill_s=_prefill)  # kv_bytes 0: remote reuse is free
    ws = [WorkerLoad("a", "prefill"), WorkerLoad("b", "prefill")]
    first = _req("1", (1, 2, 3, 4))
    i = p.select(first, ws, 0.0)
    p.on_dispatch(first, ws[i], 0.0)
    p.on_prefill_done(first, ws[i], 0.1)
    p.on_complete(first, ws[i], 0.1)
    # equal queues: both can reuse 4 blocks (the store ships them for free): ties at random,
    # but the estimate is the same for both
    r2 = _req("2", (1, 2, 3, 4, 5))
    est = [p.estimate_ttft(r2, w, 4) for w in ws]
    assert est[0] == pytest.approx(est[1])


def test_transfer_cost_favours_local_holder_and_load_can_outweigh_it() -> None:
    p = GlobalCacheAwarePolicy(
        0, prefill_s=_prefill, kv_bytes_per_token=320 * 1024, transfer_Bps=1e9
    )
    ws = [WorkerLoad("a", "prefill"), WorkerLoad("b", "prefill")]
    r1 = _req("1", tuple(range(16)))
    p.on_dispatch(r1, ws[0], 0.0)
    p.on_complete(r1, ws[0], 0.1)
    r2 = _req("2", tuple(range(16)) + (99,))
    assert p.select(r2, ws, 1.0) == 0  # fetching 16 blocks over 1 GB/s costs 2.7 s
    ws[0].inflight_prefill_tokens = 100_000  # 10 s of queue on "a"
    assert p.select(r2, ws, 1.0) == 1  # now fetching to the idle worker wins


def test_bad_options() -> None:
    with pytest.raises(InvalidArgumentError):
        GlobalCacheAwarePolicy(0, transfer_Bps=0)

# SPDX-License-Identifier: Apache-2.0
"""The hand-off's pure parts: the DynaServe planner over live loads, SGLang's storage page keys,
the stitching of two segments' stream events, and how the router turns it on. The end-to-end
proof on real SGLang is python_tests/sglang/test_sglang_handoff.py."""

from __future__ import annotations

import argparse
import hashlib
import struct

import pytest

from banaserve_ext.control import DynaServeSplitter, measured_costs
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.policies import WorkerLoad
from banaserve_ext.policies.dynaserve import DynaServePlanner
from banaserve_ext.router.config import add_arguments, config_from_args
from banaserve_ext.router.handoff import HandoffConfig, HandoffPath, _Stitch, page_hashes
from banaserve_ext.router.handoff_pd import PDHandoffPath
from banaserve_ext.router.server import Router


def _workers(*active: int) -> list[WorkerLoad]:
    return [
        WorkerLoad(f"http://w{i}", "colocated", active_requests=a) for i, a in enumerate(active)
    ]


def test_planner_runs_the_splitter_unchanged_on_live_loads() -> None:
    planner = DynaServePlanner()
    ws = _workers(0, 0)
    plan = planner.plan(100, 200, ws)
    views = planner.views(100, 200, ws)
    sp = DynaServeSplitter().split(100 * planner.prefill_s_per_token, 200, views)
    assert sp.second is not None
    assert (plan.first, plan.second, plan.split) == (sp.first, sp.second, 100 + sp.split_after)
    assert 100 + 32 <= plan.split <= 100 + 200 - 32  # both segments >= min_segment


def test_planner_uses_the_measured_costs_and_charges_the_handoff_to_b() -> None:
    ho = measured_costs().handoff
    assert ho is not None
    planner = DynaServePlanner()
    assert planner.prefill_s_per_token == ho.prefill_s_per_token
    assert planner.decode_s_per_token == ho.decode_s_per_token
    assert planner.handoff_s(300) == pytest.approx(ho.seconds(300))
    ws = _workers(0, 0)
    plain = [planner.view(i, w) for i, w in enumerate(ws)]
    views = planner.views(100, 400, ws)
    assert views[0] == plain[0]
    assert views[1].prefill_backlog_s == pytest.approx(plain[1].prefill_backlog_s + ho.seconds(300))
    # a hand-off that costs more than any gain keeps the request whole
    dear = DynaServePlanner(handoff_fixed_s=1e4)
    assert dear.plan(100, 400, ws).second is None


def test_planner_keeps_short_requests_whole_and_avoids_the_loaded_worker() -> None:
    planner = DynaServePlanner()
    plan = planner.plan(100, 10, _workers(0, 0))
    assert plan.second is None and plan.split == 110
    busy_first = planner.plan(100, 10, _workers(8, 0))
    assert busy_first.first == 1
    forced = planner.plan(100, 10, _workers(8, 0), split_at=5)
    assert (forced.first, forced.second, forced.split) == (1, 0, 5)


@pytest.mark.parametrize("split_at", [0, 110, 500])
def test_planner_rejects_a_boundary_outside_the_request(split_at: int) -> None:
    with pytest.raises(InvalidArgumentError, match="outside"):
        DynaServePlanner().plan(100, 10, _workers(0, 0), split_at=split_at)


def test_planner_needs_two_workers_for_a_forced_boundary() -> None:
    with pytest.raises(InvalidArgumentError, match="two usable workers"):
        DynaServePlanner().plan(100, 10, _workers(0), split_at=5)


def test_page_hashes_are_a_sha256_chain_over_uint32_pages() -> None:
    tokens = [7, 300, 65536, 9, 11]
    one = page_hashes(tokens, 1)
    assert len(one) == 5
    assert one[0] == hashlib.sha256(struct.pack("<I", 7)).hexdigest()
    chained = hashlib.sha256(bytes.fromhex(one[0]) + struct.pack("<I", 300)).hexdigest()
    assert one[1] == chained
    assert page_hashes(tokens[:3], 1) == one[:3]  # a prefix has the prefix's keys
    two = page_hashes(tokens, 2)
    assert len(two) == 2  # the partial last page has no key
    assert two[0] == hashlib.sha256(struct.pack("<2I", 7, 300)).hexdigest()


def _ev(ids: list[int], text: str, fr: dict | None, cached: int = 0) -> dict:
    return {"output_ids": ids, "text": text,
            "meta_info": {"finish_reason": fr, "prompt_tokens": 99, "completion_tokens": len(ids),
                          "cached_tokens": cached}}  # fmt: skip


def test_stitch_hides_segment_1_finish_and_counts_every_token() -> None:
    st = _Stitch(prompt_tokens=20)
    st.seg = {}
    assert st.event(_ev([5], "a", None), final=False)["output_ids"] == [5]
    out = st.event(_ev([5, 6], "ab", {"type": "length", "length": 2}), final=False)
    assert out["meta_info"]["finish_reason"] is None
    assert st.finish is None
    st.begin()
    st.seg = {}
    out = st.event(_ev([7], "c", None, cached=21), final=True)
    assert out["output_ids"] == [5, 6, 7] and out["text"] == "abc"
    out = st.event(_ev([7, 8], "cd", {"type": "length", "length": 2}, cached=21), final=True)
    meta = out["meta_info"]
    assert out["output_ids"] == [5, 6, 7, 8]
    assert meta["finish_reason"] == {"type": "length", "length": 2}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (20, 4)
    assert st.seg["reused_tokens"] == 21


def test_stitch_ends_the_request_when_segment_1_stops_early() -> None:
    st = _Stitch(prompt_tokens=3)
    st.seg = {}
    st.event(_ev([1], "x", {"type": "stop", "matched": 1}), final=False)
    assert st.finish == {"type": "stop", "matched": 1}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_turns_dynaserve_handoff_on_in_both_modes() -> None:
    cfg = config_from_args(_parse([
        "--worker-urls", "http://127.0.0.1:1", "http://127.0.0.1:2",
        "--dynaserve-handoff", "--handoff-kv-pool", "kv", "--handoff-l3-wait-secs", "3",
    ]))  # fmt: skip
    router = Router(cfg)
    assert router.handoff is not None
    assert router.handoff.cfg.kv_pool == "kv" and router.handoff.cfg.l3_wait_s == 3.0
    cfg = config_from_args(_parse(["--prefill", "http://127.0.0.1:1", "--decode",
                                   "http://127.0.0.1:2", "--dynaserve-handoff"]))  # fmt: skip
    assert isinstance(Router(cfg).handoff, PDHandoffPath)


def test_requests_a_handoff_cannot_carry_take_the_ordinary_path() -> None:
    cfg = config_from_args(_parse(["--worker-urls", "http://127.0.0.1:1"]))
    path = HandoffPath(Router(cfg), HandoffConfig())
    sp = {"max_new_tokens": 8}
    assert path.takes({"input_ids": [1, 2], "sampling_params": sp})
    assert path.takes({"text": "hi", "sampling_params": sp})
    assert not path.takes({"input_ids": [[1, 2], [3]], "sampling_params": sp})  # a batch
    assert not path.takes({"text": ["a", "b"], "sampling_params": sp})
    assert not path.takes({"text": "hi", "sampling_params": dict(sp, n=2)})
    assert path.takes({"text": "hi", "sampling_params": sp, "return_logprob": True})
    assert not path.takes({"text": "hi", "sampling_params": sp, "lora_path": "x"})
    assert not path.takes({"text": "hi", "sampling_params": {"max_new_tokens": 0}})
    assert path.takes({"text": "hi"})  # SGLang's default length


def test_a_missing_kv_pool_only_skips_the_wait() -> None:
    from banaserve_ext.router.handoff import L3Watcher

    w = L3Watcher("no-such-pool-for-handoff-test")
    w.learn({"model_path": "/m", "hicache_mem_layout": "layer_first", "page_size": 1})
    assert w.suffix is not None and w.suffix.startswith("@")
    assert run_wait(w) == (0, 0)


def run_wait(w: object) -> tuple[int, int]:
    import asyncio

    return asyncio.run(w.wait([1, 2, 3], 1.0, 0.01))  # type: ignore[attr-defined]

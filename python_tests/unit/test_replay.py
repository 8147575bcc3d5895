# SPDX-License-Identifier: Apache-2.0
"""The pure parts of ``banaserve launch --replay`` that the live benchmark reads: conversation
slices with shared prefixes, SGLang's cached-token split, Prometheus counters, busiest share."""

from __future__ import annotations

import pytest

from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.launch import replay
from banaserve_ext.launch.replay import TraceRequest as T


def _trace() -> list[T]:
    # block 0 shared by all (a system prompt); conversations keyed on the first two hashes
    return [
        T(0.0, 1000, 5, (0, 1)),
        T(1.0, 1000, 5, (0, 2)),  # a single-turn conversation
        T(2.0, 1500, 5, (0, 1, 3)),  # turn 2 of conversation (0, 1)
        T(3.0, 1000, 5, (0, 4)),
        T(4.0, 2000, 5, (0, 4, 5, 6)),
        T(5.0, 2000, 5, (0, 1, 3, 7)),  # turn 3 of (0, 1)
    ]


def test_conversation_slice_keeps_whole_conversations_in_trace_order() -> None:
    got = replay.conversation_slice(_trace(), 10)
    assert [r.hash_ids for r in got] == [(0, 1), (0, 1, 3), (0, 4), (0, 4, 5, 6), (0, 1, 3, 7)]
    assert [r.arrival_s for r in got] == [0.0, 2.0, 3.0, 4.0, 5.0]
    # a cap of n stops inside the conversation that reaches it; max_turns caps each one
    assert [r.hash_ids for r in replay.conversation_slice(_trace(), 2)] == [(0, 1), (0, 1, 3)]
    capped = replay.conversation_slice(_trace(), 10, max_turns=2)
    assert [r.hash_ids for r in capped] == [(0, 1), (0, 1, 3), (0, 4), (0, 4, 5, 6)]


def test_conversation_slice_refuses_a_trace_without_conversations() -> None:
    with pytest.raises(InvalidArgumentError, match="no multi-turn"):
        replay.conversation_slice([T(0.0, 10, 1, (0, 1)), T(1.0, 10, 1, (0, 2))], 5)
    with pytest.raises(InvalidArgumentError):
        replay.conversation_slice(_trace(), 0)


def test_turns_of_a_conversation_share_their_leading_tokens() -> None:
    sl = replay.conversation_slice(_trace(), 10)
    reqs = replay.scale(sl, rate_rps=1.0, length_scale=1 / 16, max_input=1024,
                        max_output=4, vocab_size=1000)  # fmt: skip
    block = 32  # 512 / 16
    first, second, third = reqs[0], reqs[1], reqs[4]  # (0,1), (0,1,3), (0,1,3,7)
    # an earlier turn (its blocks all leading blocks of the later one) is a prefix of the later
    assert second.input_ids[: len(first.input_ids)] == first.input_ids
    assert third.input_ids[: len(second.input_ids)] == second.input_ids
    assert len(third.input_ids) > len(second.input_ids) > len(first.input_ids) > 2 * block - 4
    # another conversation shares block 0 only
    other = reqs[2]
    assert other.input_ids[:block] == first.input_ids[:block]
    assert other.input_ids[block : 2 * block] != first.input_ids[block : 2 * block]


def test_cache_split_reads_sglang_meta_info() -> None:
    meta = {"prompt_tokens": 100, "cached_tokens": 60,
            "cached_tokens_details": {"device": 20, "host": 10, "storage": 30}}  # fmt: skip
    assert replay.cache_split(meta) == (100, 60, 30, 30)
    # without a hierarchical cache SGLang gives only cached_tokens: all radix (local)
    assert replay.cache_split({"prompt_tokens": 50, "cached_tokens": 32}) == (50, 32, 32, 0)
    assert replay.cache_split({}) == (0, 0, 0, 0)


def test_cache_summary_counts_only_successful_requests() -> None:
    rs = [
        replay.Result(True, prompt_tokens=100, cached_tokens=50, cached_local=20, cached_store=30),
        replay.Result(True, prompt_tokens=100, cached_tokens=0),
        replay.Result(False, prompt_tokens=1000, cached_tokens=1000, cached_local=1000),
    ]
    s = replay.cache_summary(rs)
    assert s["prompt_tokens"] == 200
    assert s["hit_rate"] == pytest.approx(0.25)
    assert s["hit_rate_local"] == pytest.approx(0.10)
    assert s["hit_rate_store"] == pytest.approx(0.15)
    assert replay.cache_summary([])["hit_rate"] == 0.0


def test_parse_prometheus_and_metric_sum() -> None:
    text = """# HELP sglang:realtime_tokens_total x
# TYPE sglang:realtime_tokens_total counter
sglang:realtime_tokens_total{model_name="m",mode="prefill_compute"} 120.0
sglang:realtime_tokens_total{model_name="m",mode="prefill_cache"} 30.0
sglang:realtime_tokens_total{model_name="m",mode="decode"} 7.0
banaserve_kvpool_hits_total{pool="p"} 4
garbage line
"""
    s = replay.parse_prometheus(text)
    assert replay.metric_sum(s, "sglang:realtime_tokens_total", mode="prefill_cache") == 30.0
    assert replay.metric_sum(s, "sglang:realtime_tokens_total") == 157.0
    assert replay.metric_sum(s, "banaserve_kvpool_hits_total") == 4.0
    assert replay.metric_sum(s, "absent") == 0.0


def test_counter_delta_and_prefill_load() -> None:
    before = {"servers": {"p": {"prefill_compute": 10.0, "prefill_cache": 0.0},
                          "d": {"prefill_compute": 0.0, "prefill_cache": 0.0}, "x": None},
              "pool": {"hits": 1.0}}  # fmt: skip
    after = {"servers": {"p": {"prefill_compute": 310.0, "prefill_cache": 100.0},
                         "d": {"prefill_compute": 100.0, "prefill_cache": 0.0}, "x": None},
             "pool": {"hits": 5.0}}  # fmt: skip
    delta = replay.counter_delta(before, after)
    assert delta["servers"]["p"] == {"prefill_compute": 300.0, "prefill_cache": 100.0}
    assert delta["servers"]["x"] is None and delta["pool"] == {"hits": 4.0}
    # "d" was launched as decode but prefilled (a flip): it counts as a prefill worker
    load = replay.prefill_load(delta, ["p"])
    assert load["prefill_tokens"] == {"p": 400.0, "d": 100.0}
    assert load["busiest_share"] == pytest.approx(400 / 250)
    assert replay.counter_delta(before, {"servers": {}, "pool": None})["pool"] is None


def test_busiest_share() -> None:
    assert replay.busiest_share({"a": 50.0, "b": 50.0}) == 1.0
    assert replay.busiest_share({"a": 100.0, "b": 0.0}) == 2.0
    assert replay.busiest_share({"a": 7.0}) == 1.0
    assert replay.busiest_share({}) is None
    assert replay.busiest_share({"a": 0.0}) is None

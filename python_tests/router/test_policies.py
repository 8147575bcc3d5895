# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import collections

import pytest

from banaserve_ext.errors import InvalidArgumentError, ResourceExhaustedError
from banaserve_ext.policies import (
    CacheAwarePolicy,
    LoadAwarePolicy,
    PowerOfTwoPolicy,
    RequestInfo,
    WorkerLoad,
    account_complete,
    account_dispatch,
    account_prefill_done,
    expire_legs,
    make_policy,
    record_poll,
)
from banaserve_ext.policies.prefix_tree import PrefixTree


def fleet(role: str, n: int) -> list[WorkerLoad]:
    return [WorkerLoad(f"http://127.0.0.1:{9000 + i}", role) for i in range(n)]


def req(rid: str, tokens: int = 100, text: str | None = None, hashes=()) -> RequestInfo:
    return RequestInfo(rid, prompt_tokens=tokens, text=text, block_hashes=hashes)


# -- accounting -------------------------------------------------------------------------------
def test_accounting_is_keyed_and_idempotent() -> None:
    w = WorkerLoad("http://p", "prefill")
    r = req("a", 500)
    account_dispatch(w, r, 1.0)
    account_dispatch(w, r, 1.0)  # duplicate: ignored
    assert (w.active_requests, w.inflight_prefill_tokens) == (1, 500)
    account_prefill_done(w, r)
    account_prefill_done(w, r)
    assert (w.active_requests, w.inflight_prefill_tokens) == (1, 0)
    account_complete(w, r)
    account_complete(w, r)
    assert (w.active_requests, w.inflight_prefill_tokens, w.processed_requests) == (0, 0, 1)


def test_decode_workers_count_requests_not_prompt_tokens() -> None:
    w = WorkerLoad("http://d", "decode")
    account_dispatch(w, req("a", 700), 0.0)
    assert (w.active_requests, w.inflight_prefill_tokens) == (1, 0)


def test_complete_without_prefill_done_releases_tokens() -> None:
    w = WorkerLoad("http://p", "prefill")
    account_dispatch(w, req("a", 300), 0.0)
    account_dispatch(w, req("b", 200), 0.0)
    account_complete(w, req("a", 300))
    assert (w.active_requests, w.inflight_prefill_tokens) == (1, 200)


def test_expire_legs_drops_only_old_ones() -> None:
    w = WorkerLoad("http://p", "prefill")
    account_dispatch(w, req("old", 10), 1.0)
    account_dispatch(w, req("new", 20), 5.0)
    assert expire_legs(w, older_than_s=3.0) == 1
    assert (w.active_requests, w.inflight_prefill_tokens) == (1, 20)


# -- load_aware, prefill ----------------------------------------------------------------------
def test_load_aware_prefill_picks_fewest_inflight_tokens() -> None:
    p = LoadAwarePolicy(seed=1)
    ws = fleet("prefill", 3)
    p.on_dispatch(req("x", 4000), ws[0], 0.0)
    p.on_dispatch(req("y", 100), ws[1], 0.0)
    p.on_dispatch(req("z", 2000), ws[2], 0.0)
    assert p.select(req("n"), ws, 0.0) == 1
    p.on_prefill_done(req("x", 4000), ws[0], 0.1)
    assert p.select(req("n"), ws, 0.1) == 0


def test_load_aware_counts_at_dispatch_so_a_burst_spreads() -> None:
    # a burst routed before any completion must not herd onto one worker
    p = LoadAwarePolicy(seed=2)
    ws = fleet("prefill", 4)
    for k in range(40):
        r = req(f"r{k}", 1000)
        p.on_dispatch(r, ws[p.select(r, ws, 0.0)], 0.0)
    assert [w.active_requests for w in ws] == [10, 10, 10, 10]


def test_load_aware_ties_are_random_not_first() -> None:
    p = LoadAwarePolicy(seed=3)
    ws = fleet("prefill", 4)
    picks = collections.Counter(p.select(req(f"r{k}"), ws, 0.0) for k in range(400))
    assert set(picks) == {0, 1, 2, 3}
    assert max(picks.values()) < 160  # 100 expected each


def test_polled_load_only_adds_what_the_router_does_not_see_and_fades() -> None:
    p = LoadAwarePolicy(seed=4, poll_stale_s=10.0, per_request_tokens=0)
    ws = fleet("prefill", 2)
    p.on_dispatch(req("mine", 1000), ws[0], 0.0)
    # worker 0 reports exactly what we sent it: no correction
    record_poll(ws[0], 0.0, load_tokens=1000)
    assert p.prefill_load(ws[0], 0.0) == pytest.approx(1000)
    # worker 1 reports 3000 tokens from another client: counted, fading linearly
    record_poll(ws[1], 0.0, load_tokens=3000)
    assert p.prefill_load(ws[1], 0.0) == pytest.approx(3000)
    assert p.prefill_load(ws[1], 5.0) == pytest.approx(1500)
    assert p.prefill_load(ws[1], 10.0) == pytest.approx(0)
    assert p.select(req("n"), ws, 1.0) == 0
    assert p.select(req("n"), ws, 9.0) == 1


def test_stale_static_polls_cannot_herd_traffic() -> None:
    # smg follows a static poll claiming one worker is idle; we only ever add to the router's count
    p = LoadAwarePolicy(seed=5)
    ws = fleet("prefill", 2)
    record_poll(ws[0], 0.0, load_tokens=0)
    record_poll(ws[1], 0.0, load_tokens=0)
    for k in range(100):
        r = req(f"r{k}", 500)
        p.on_dispatch(r, ws[p.select(r, ws, 0.5)], 0.5)
    assert [w.active_requests for w in ws] == [50, 50]


def test_speed_scales_load() -> None:
    p = LoadAwarePolicy(seed=6, per_request_tokens=0)
    ws = fleet("prefill", 2)
    ws[0].speed = 2.0
    for k in range(30):
        r = req(f"r{k}", 100)
        p.on_dispatch(r, ws[p.select(r, ws, 0.0)], 0.0)
    assert ws[0].active_requests == 20 and ws[1].active_requests == 10


def test_large_fleet_uses_power_of_d_sampling() -> None:
    p = LoadAwarePolicy(seed=7, sample_threshold=16, sample_size=4)
    ws = fleet("prefill", 200)
    for i, w in enumerate(ws):
        w.inflight_prefill_tokens = 10 * i  # distinct loads, worker 199 is the heaviest
    picks = [p.select(req(f"r{k}"), ws, 0.0) for k in range(2000)]
    assert 199 not in picks and 198 not in picks and 197 not in picks  # cannot win a 4-sample
    assert len(set(picks)) > 50  # not a full argmin (that would always be 0)
    assert sum(picks) / len(picks) < 60  # ~ (n+1)/5 for the min of 4 uniform samples


def test_closed_loop_balance_within_fair_share() -> None:
    # prefill time proportional to tokens; heavy-tailed prompt sizes; share of tokens per worker
    import random

    rng = random.Random(0)
    p = LoadAwarePolicy(seed=8)
    ws = fleet("prefill", 4)
    inflight: list[tuple[float, RequestInfo, WorkerLoad]] = []
    now = 0.0
    tokens = collections.Counter()
    for k in range(4000):
        now += rng.expovariate(1.0)
        inflight.sort(key=lambda t: t[0])
        while inflight and inflight[0][0] <= now:
            _, r, w = inflight.pop(0)
            p.on_complete(r, w, now)
        r = req(f"r{k}", int(rng.paretovariate(1.5) * 200))
        w = ws[p.select(r, ws, now)]
        p.on_dispatch(r, w, now)
        busy = w.inflight_prefill_tokens / 1000.0
        inflight.append((now + busy, r, w))
        tokens[w.url] += r.prompt_tokens
    fair = sum(tokens.values()) / 4
    assert max(tokens.values()) <= 1.15 * fair


# -- load_aware, decode -----------------------------------------------------------------------
def test_decode_by_active_requests_and_kv_headroom() -> None:
    p = LoadAwarePolicy(seed=9, kv_weight=4.0)
    ws = fleet("decode", 2)
    ws[0].active_requests, ws[1].active_requests = 3, 3
    record_poll(ws[0], 0.0, kv_used_tokens=500, kv_capacity_tokens=1000)
    record_poll(ws[1], 0.0, kv_used_tokens=100, kv_capacity_tokens=1000)
    assert p.select(req("d"), ws, 0.0) == 1
    ws[1].active_requests = 6  # 6 + 0.4 > 3 + 2.0
    assert p.select(req("d"), ws, 0.0) == 0


def test_decode_excludes_overloaded_workers() -> None:
    p = LoadAwarePolicy(seed=10)
    ws = fleet("decode", 3)
    record_poll(ws[0], 0.0, queued_requests=8)  # queue at the limit
    record_poll(ws[1], 0.0, kv_used_tokens=900, kv_capacity_tokens=1000)
    ws[2].active_requests = 50  # busy, but not over either limit
    assert {p.select(req(f"d{k}"), ws, 0.0) for k in range(50)} == {2}


def test_decode_all_overloaded_picks_least_or_sheds() -> None:
    ws = fleet("decode", 2)
    for w in ws:
        record_poll(w, 0.0, queued_requests=20)
    ws[0].active_requests = 5
    assert LoadAwarePolicy(seed=11).select(req("d"), ws, 0.0) == 1
    with pytest.raises(ResourceExhaustedError, match="overloaded"):
        LoadAwarePolicy(seed=11, shed_when_overloaded=True).select(req("d"), ws, 0.0)


# -- cache_aware ------------------------------------------------------------------------------
def test_cache_aware_groups_are_sticky() -> None:
    p = CacheAwarePolicy(seed=12)
    ws = fleet("prefill", 2)
    prefixes = [chr(ord("a") + g) * 2000 for g in range(8)]
    owner: dict[int, set[int]] = collections.defaultdict(set)
    for k in range(200):
        g = k % 8
        r = req(f"r{k}", text=prefixes[g] + f"suffix{k:05d}" * 20)
        i = p.select(r, ws, float(k))
        owner[g].add(i)
    assert all(len(s) == 1 for s in owner.values())


def test_cache_aware_miss_goes_to_min_load_first_tie() -> None:
    p = CacheAwarePolicy(seed=13)
    ws = fleet("prefill", 3)
    assert p.select(req("a", text="x" * 100), ws, 0.0) == 0  # all zero: first worker (SGLang)
    ws[0].active_requests = 2
    ws[1].active_requests = 1
    assert p.select(req("b", text="y" * 100), ws, 0.0) == 2
    # a short shared prefix (20% < 30%) is a miss: min load again
    ws[2].active_requests = 5
    assert p.select(req("c", text="x" * 20 + "z" * 80), ws, 0.0) == 1


def test_cache_aware_hit_above_threshold_sticks_even_when_loaded() -> None:
    p = CacheAwarePolicy(seed=14)
    ws = fleet("prefill", 2)
    assert p.select(req("a", text="s" * 1000), ws, 0.0) == 0
    ws[0].active_requests = 60  # within balance_abs_threshold=64
    assert p.select(req("b", text="s" * 1000 + "t" * 10), ws, 0.0) == 0


def test_cache_aware_imbalance_overrides_affinity() -> None:
    p = CacheAwarePolicy(seed=15)
    ws = fleet("prefill", 2)
    assert p.select(req("a", text="s" * 1000), ws, 0.0) == 0
    ws[0].active_requests = 70  # 70 - 0 > 64 and 70 > 1.5 * 0
    assert p.select(req("b", text="s" * 1000), ws, 0.5) == 1
    # and the tree learned worker 1 holds it too (most recent tenant wins the match)
    ws[0].active_requests = 0
    assert p.select(req("c", text="s" * 1000), ws, 1.0) == 1


def test_cache_aware_ignores_unavailable_tenants_and_forgets_removed_workers() -> None:
    p = CacheAwarePolicy(seed=16)
    ws = fleet("prefill", 3)
    ws[0].active_requests, ws[1].active_requests = 1, 1
    assert p.select(req("a", text="q" * 500), ws, 0.0) == 2
    assert p.select(req("b", text="q" * 500), ws[:2], 0.0) in (0, 1)  # 2 is not a candidate
    p.on_worker_removed(ws[2].url)
    assert ws[2].url not in p.tree.sizes


def test_cache_aware_works_on_block_hashes() -> None:
    p = CacheAwarePolicy(seed=17, tie_break="random")
    ws = fleet("prefill", 4)
    firsts = {}
    for g in range(4):
        for k in range(10):
            i = p.select(req(f"{g}-{k}", hashes=(g, g + 100, g + 200, k + 1000)), ws, 0.0)
            firsts.setdefault(g, i)
            assert i == firsts[g]


def test_cache_aware_eviction_runs_on_the_interval() -> None:
    p = CacheAwarePolicy(seed=18, eviction_interval_s=10.0, max_tree_size=1000)
    ws = fleet("prefill", 1)
    for k in range(20):
        p.select(req(f"r{k}", text=chr(65 + k) * 400), ws, 0.0)  # disjoint
    assert p.tree.sizes[ws[0].url] == 8000
    p.select(req("late", text="z" * 100), ws, 11.0)
    assert p.tree.sizes[ws[0].url] <= 1100


# -- prefix tree ------------------------------------------------------------------------------
def test_prefix_tree_split_match_and_lru_eviction() -> None:
    t = PrefixTree()
    t.insert("hello world", "A", 1.0)
    t.insert("hello there", "B", 2.0)
    assert t.prefix_match("hello world!") == (11, "A")
    assert t.prefix_match("hello thx") == (8, "B")
    assert t.prefix_match("hello ") == (6, "B")  # both hold it; B is more recent
    assert t.prefix_match("hello ", {"A"}) == (6, "A")
    assert t.prefix_match("goodbye") == (0, None)
    assert t.sizes == {"A": 11, "B": 11}
    t.insert("abc", "A", 0.5)  # older than "hello world" for A
    t.evict(max_size=11)
    assert t.prefix_match("abc") == (0, None)
    assert t.prefix_match("hello world") == (11, "A")
    t.remove_tenant("A")
    assert t.prefix_match("hello world") == (8, "B") or t.prefix_match("hello world")[1] == "B"


def test_prefix_tree_tuples() -> None:
    t = PrefixTree()
    t.insert((1, 2, 3, 4), "A", 0.0)
    t.insert((1, 2, 9), "B", 1.0)
    assert t.prefix_match((1, 2, 3, 4, 5)) == (4, "A")
    assert t.prefix_match((1, 2, 9, 9)) == (3, "B")


# -- simple baselines and the registry --------------------------------------------------------
def test_round_robin_cycles() -> None:
    p = make_policy("round_robin")
    ws = fleet("decode", 3)
    assert [p.select(req(str(k)), ws, 0.0) for k in range(6)] == [0, 1, 2, 0, 1, 2]


def test_random_is_seeded_and_covers_all() -> None:
    ws = fleet("decode", 3)
    a = [make_policy("random", seed=5).select(req("x"), ws, 0.0) for _ in range(1)]
    p1, p2 = make_policy("random", seed=5), make_policy("random", seed=5)
    s1 = [p1.select(req(str(k)), ws, 0.0) for k in range(300)]
    s2 = [p2.select(req(str(k)), ws, 0.0) for k in range(300)]
    assert s1 == s2 and set(s1) == {0, 1, 2} and a[0] == s1[0]


def test_power_of_two_follows_polls_when_both_have_one() -> None:
    p = PowerOfTwoPolicy(seed=19)
    ws = fleet("prefill", 2)
    ws[0].active_requests = 10
    assert {p.select(req(str(k)), ws, 0.0) for k in range(20)} == {1}
    record_poll(ws[0], 0.0, load_tokens=0)
    record_poll(ws[1], 0.0, load_tokens=50_000)
    assert {p.select(req(str(k)), ws, 0.0) for k in range(20)} == {0}  # stale polls win


def test_make_policy_rejects_unknown_names_and_options() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown policy"):
        make_policy("bucket")
    with pytest.raises(InvalidArgumentError, match="bad options"):
        make_policy("random", cache_threshold=0.5)
    with pytest.raises(InvalidArgumentError):
        make_policy("cache_aware", tie_break="last")
    with pytest.raises(InvalidArgumentError):
        make_policy("load_aware", sample_size=0)

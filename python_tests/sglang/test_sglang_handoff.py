# SPDX-License-Identifier: Apache-2.0
"""DynaServe hand-off through the global KV store between two real unified SGLang servers (CPU,
float32): our router runs segment 1 of a request on A and segment 2 on B, B reusing A's KV from
the shared pool (HiCache L3); the client sees one answer whose greedy output ids equal a single
server's, for boundaries inside the prompt, at its end and after output tokens, streaming and
not, concurrently; with B dead the request continues on A. After the live migration and the
dead-B cases both instances' allocators must have every KV slot back (SGLang's ``/v1/loads``:
nothing held beyond the radix/HiCache tree, no request running or queued).

Both servers run SGLang's priority scheduling, smaller values first, and the router gives every
segment its SLO deadline as priority (docs/handoff.md, "SLO-aware batch formation"), so every
test here also shows that deadline priorities leave the output unchanged; one test checks the
deadlines of a concurrent burst, and one runs SGLang's own queue sort on them."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sglang_testbed.cluster import Cluster, generate, slowed

from banaserve_ext.kvpool import KVPool
from banaserve_ext.launch.servers import http_json, kv_slot_leaks, kv_slots
from banaserve_ext.router.config import RouterConfig, WorkerSpec
from banaserve_ext.router.handoff import SPLIT_HEADER, HandoffConfig
from banaserve_ext.router.server import Router
from banaserve_ext.router.slo import SLOTargets, deadline_priority, segment_deadline

pytestmark = pytest.mark.sglang

TOTAL = 10  # output tokens per request
#: the router's SLO targets: a TTFT far above any request's run time, so that the deadline
#: brackets checked below also order every continuation before every first token
SLO = SLOTargets(ttft_s=600.0, tbt_s=0.05)


def _page_bytes(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    fp32 = 4
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * fp32


def _prompt(seed: int, n: int) -> list[int]:
    """Distinct token ids per seed (no special tokens), so no two requests share a prefix."""
    return [3 + (seed * 131 + i * 37 + (i * i) % 11) % 1000 for i in range(n)]


class _RouterThread:
    """Our router on its own event loop, in a thread of the test process."""

    def __init__(self, cfg: RouterConfig, handoff: HandoffConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.router = Router(cfg)
        self.path = self.router.enable_handoff(handoff)
        asyncio.run_coroutine_threadsafe(self.router.start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{self.router.bound_port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.router.stop(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    name = f"pytest-handoff-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    extra = json.dumps({
        "backend_name": "banaserve",
        "module_path": "banaserve_ext.adapters.sglang.hicache",
        "class_name": "BanaserveHiCacheStorage",
        "pool": name,
        "interface_v1": 1,
        "prefetch_threshold": 1,  # SGLang skips storage prefetches under 256 tokens by default
    })  # fmt: skip
    args = (
        "--dtype", "float32",
        "--enable-hierarchical-cache", "--hicache-io-backend", "direct",
        "--hicache-mem-layout", "layer_first", "--hicache-size", "1",
        "--hicache-write-policy", "write_through",
        "--hicache-storage-backend", "dynamic",
        "--hicache-storage-backend-extra-config", extra,
        "--hicache-storage-prefetch-policy", "wait_complete",
        "--enable-priority-scheduling", "--schedule-low-priority-values-first",
    )  # fmt: skip
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("handoff-logs"))
    pool = KVPool(name, create=True, capacity_bytes=64 << 20, page_size=_page_bytes(tiny_model_dir))
    pool.start()
    try:
        a, pa = cluster.server("single", wait=False, extra_args=args)
        b, pb = cluster.server("single", wait=False, extra_args=args)
        cluster.wait_all()
        rcfg = RouterConfig(
            workers=[WorkerSpec(a.url, "colocated"), WorkerSpec(b.url, "colocated")],
            pd_disaggregation=False, port=0, prometheus_port=None, policy="round_robin",
            disable_health_check=True, load_monitor_interval=0.0, disable_retries=True,
        )  # fmt: skip
        rt = _RouterThread(rcfg, HandoffConfig(kv_pool=name, l3_wait_s=60.0, slo=SLO))
        try:
            yield {"a": a, "b": b, "pa": pa, "pb": pb, "pool": pool, "router": rt,
                   "cluster": cluster}  # fmt: skip
        finally:
            rt.close()
    finally:
        try:
            cluster.close()
        finally:
            pool.close()


def _body(ids: list[int] | None = None, text: str | None = None, stream: bool = False) -> dict:
    body: dict[str, Any] = {
        "sampling_params": {"max_new_tokens": TOTAL, "temperature": 0.0, "ignore_eos": True},
        "stream": stream,
    }
    if ids is not None:
        body["input_ids"] = ids
    if text is not None:
        body["text"] = text
    return body


def _post(url: str, body: dict, split: int | None) -> tuple[int, dict, list[dict]]:
    """POST /generate; returns (status, final object, stream events)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    headers = {"Content-Type": "application/json"}
    if split is not None:
        headers[SPLIT_HEADER] = str(split)
    conn.request("POST", "/generate", json.dumps(body), headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    if not body.get("stream"):
        return resp.status, json.loads(raw), []
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if block.startswith(b"data:") and block[5:].strip() != b"[DONE]":
            events.append(json.loads(block[5:]))
    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    return resp.status, events[-1] if events else {}, events


def _reference(url: str, ids: list[int]) -> list[int]:
    out = generate(url, input_ids=ids, max_new_tokens=TOTAL)  # greedy
    return out["output_ids"]


def _flush(url: str) -> None:
    """SGLang refuses a flush while anything is in flight (HiCache write-backs included)."""
    deadline = time.monotonic() + 120
    while True:
        status, body = http_json(f"{url}/flush_cache", {}, timeout_s=60)
        if status == 200:
            return
        assert time.monotonic() < deadline, body
        time.sleep(0.5)


def _check_stream(events: list[dict], want: list[int]) -> None:
    """Cumulative output ids only grow, one token at a time, one finish_reason at the end."""
    prev: list[int] = []
    for i, ev in enumerate(events):
        ids = ev["output_ids"]
        assert ids[: len(prev)] == prev, (i, prev, ids)
        assert len(ids) >= len(prev)
        prev = ids
        fr = ev["meta_info"]["finish_reason"]
        assert (fr is not None) == (i == len(events) - 1), (i, fr)
    assert prev == want


def _cases(seed0: int) -> list[tuple[list[int], int, str]]:
    out = []
    for j, (n, where) in enumerate([(40, "s=1"), (75, "mid"), (33, "s=n"), (120, "s=n+k")]):
        ids = _prompt(seed0 + j, n)
        s = {"s=1": 1, "mid": n // 2, "s=n": n, "s=n+k": n + 4}[where]
        out.append((ids, s, where))
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_handoff_output_equals_single_server(pair: dict, stream: bool) -> None:
    cases = _cases(100 if stream else 0)
    # references on one server, alone
    refs = [_reference(pair["a"].url, ids) for ids, _, _ in cases]
    # fresh caches: only segment 1 of the hand-off can put these prompts in the store
    for srv in (pair["a"], pair["b"]):
        _flush(srv.url)
    pair["pool"].clear()

    url = pair["router"].url
    with ThreadPoolExecutor(len(cases)) as ex:
        futs = [ex.submit(_post, url, _body(ids, stream=stream), s) for ids, s, _ in cases]
        results = [f.result() for f in futs]
    for (ids, s, where), ref, (status, final, events) in zip(cases, refs, results, strict=True):
        assert status == 200, (where, final)
        meta = final["meta_info"]
        assert final["output_ids"] == ref, where
        assert meta["prompt_tokens"] == len(ids)
        assert meta["completion_tokens"] == TOTAL
        assert (
            meta["finish_reason"] == {"type": "length", "length": TOTAL}
            or meta["finish_reason"]["type"] == "length"
        )
        ho = meta["handoff"]
        assert ho["split"] == s and ho["first"] != ho["second"], ho
        segs = ho["segments"]
        assert [g["worker"] for g in segs] == [ho["first"], ho["second"]], ho
        assert all("error" not in g for g in segs), ho
        # segment 1's KV reached the store and B reused it
        assert ho["l3_pages"] == ho["l3_pages_wanted"] > 0, ho
        assert segs[1]["reused_tokens"] >= ho["l3_pages_wanted"] - 1, ho
        if stream:
            _check_stream(events, ref)
            # tokens of segment 1 reached the client before segment 2's (SGLang may put several
            # tokens in one stream event under load, so events are not counted per token)
            k = max(0, s - len(ids))
            if k:
                assert any(len(e["output_ids"]) <= k for e in events), where
        print(where, "n", len(ids), "s", s, "reused", segs[1]["reused_tokens"],
              "l3 wait", ho["l3_wait_s"])  # fmt: skip


def test_slo_priorities_reach_sglang_and_keep_the_output(pair: dict) -> None:
    """A concurrent burst of split requests through the router: single-server greedy ids; every
    segment sent with its deadline as priority (segment 1 and a segment 2 after a split inside
    the prompt: arrival + TTFT; a segment 2 after output tokens: last token + TBT, the smaller),
    both servers found to schedule by it through their real /server_info (none refused), every
    segment accepted (SGLang rejects a priority outside int64 with 400). A client priority is
    kept on both segments."""
    slo = pair["router"].path.slo
    assert slo is not None
    cases = _cases(300)
    refs = [_reference(pair["a"].url, ids) for ids, _, _ in cases]
    url = pair["router"].url
    t0 = time.time()
    with ThreadPoolExecutor(len(cases)) as ex:
        futs = [ex.submit(_post, url, _body(ids), s) for ids, s, _ in cases]
        results = [f.result() for f in futs]
    t1 = time.time()
    assert slo.refused == {}, slo.refused
    ms = lambda t: math.floor(t * 1000.0)  # noqa: E731
    for (ids, s, where), ref, (status, final, _) in zip(cases, refs, results, strict=True):
        assert status == 200, (where, final)
        assert final["output_ids"] == ref, where
        segs = final["meta_info"]["handoff"]["segments"]
        assert len(segs) == 2 and all("error" not in g for g in segs), segs
        p1, p2 = segs[0]["priority"], segs[1]["priority"]
        assert ms(t0 + SLO.ttft_s) <= p1 <= ms(t1 + SLO.ttft_s), (where, p1)
        if s > len(ids):  # segment 2 continues after tokens the client has
            assert ms(t0 + SLO.tbt_s) <= p2 <= ms(t1 + SLO.tbt_s), (where, p2)
            assert p2 < p1
        else:  # segment 1's token was discarded: segment 2 still owes the first token
            assert p2 == p1, where
    # a client's priority rides on both segments unchanged
    ids = _prompt(333, 45)
    ref = _reference(pair["b"].url, ids)
    status, final, _ = _post(url, dict(_body(ids), priority=5), len(ids) + 3)
    assert status == 200 and final["output_ids"] == ref, final
    segs = final["meta_info"]["handoff"]["segments"]
    assert [g["priority"] for g in segs] == [5, 5], segs


def test_sglang_queue_order_of_deadline_priorities_is_earliest_deadline_first() -> None:
    """SGLang's own waiting-queue code (no server: its default for a request without priority
    and its sort, low values first) on priorities as the router makes them: an older request's
    continuation first, then fresh requests by deadline even against queue arrival, then a
    request without priority."""
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.managers.scheduler import Scheduler

    t = SLOTargets(ttft_s=1.0, tbt_s=0.05)
    now = 1_800_000_000.0

    def req(name: str, prio: int | None, entered: float) -> SimpleNamespace:
        stats = SimpleNamespace(wait_queue_entry_time=entered)
        return SimpleNamespace(name=name, priority=prio, time_stats=stats)

    queue = [
        req("no priority", None, 0.0),
        req("fresh, later", deadline_priority(segment_deadline(t, now + 0.2, 0, None)), 1.0),
        req("fresh", deadline_priority(segment_deadline(t, now, 0, None)), 2.0),
        req("continuation", deadline_priority(segment_deadline(t, now - 5, 12, now + 0.3)), 3.0),
    ]
    sched = SimpleNamespace(enable_priority_scheduling=True,
                            schedule_low_priority_values_first=True,
                            abort_on_priority_when_disabled=False)  # fmt: skip
    for r in queue:
        assert Scheduler._set_or_validate_priority(sched, r)
    SchedulePolicy._sort_by_priority_and_fcfs(queue, 1)  # 1: low values first
    assert [r.name for r in queue] == ["continuation", "fresh", "fresh, later", "no priority"]


def test_text_prompt_is_tokenized_once_and_stitched(pair: dict) -> None:
    text = "the handoff keeps every token of record 7 exactly once; " * 3
    single = generate(pair["b"].url, text=text, max_new_tokens=TOTAL)
    n = single["meta_info"]["prompt_tokens"]
    body = _body(text=text)
    status, final, _ = _post(pair["router"].url, body, n + 3)
    assert status == 200, final
    assert final["output_ids"] == single["output_ids"]
    assert final["meta_info"]["prompt_tokens"] == n
    assert final["meta_info"]["completion_tokens"] == TOTAL


def test_planner_without_override_routes_whole_or_split(pair: dict) -> None:
    """DynaServeSplitter's default minimum segment (32 tokens) keeps a 10-token request whole:
    one segment, on one worker, identical output."""
    ids = _prompt(900, 50)
    ref = _reference(pair["b"].url, ids)
    status, final, _ = _post(pair["router"].url, _body(ids), None)
    assert status == 200, final
    assert final["output_ids"] == ref
    ho = final["meta_info"]["handoff"]
    assert ho["second"] is None and len(ho["segments"]) == 1, ho


def test_leak_check_sees_a_request_still_running(pair: dict) -> None:
    """The slot check can fail: while a long request runs on A it names it (slots held, one
    running request); once it ends A is clean again."""
    ids = _prompt(800, 40)
    done = threading.Event()

    def long_request() -> None:
        try:
            generate(pair["a"].url, input_ids=ids, max_new_tokens=400)
        finally:
            done.set()

    th = threading.Thread(target=long_request)
    th.start()
    deadline = time.monotonic() + 120
    while kv_slots(pair["a"].url)["running"] == 0:
        assert time.monotonic() < deadline and not done.is_set(), "the request never ran"
        time.sleep(0.05)
    leaks = kv_slot_leaks(pair["a"].url, settle_s=0)
    th.join(300)
    assert leaks and "running=1" in leaks[0] and "used=" in leaks[0], leaks
    assert kv_slot_leaks(pair["a"].url) == []


def test_live_migration_of_a_running_stream_keeps_the_output(pair: dict) -> None:
    """A long stream whose segment 2 runs on B is moved off B mid-generation (the admin
    action); it finishes on A with the single-server ids, no token repeated or lost."""
    total = 120
    ids = _prompt(500, 48)
    ref = generate(pair["a"].url, input_ids=ids, max_new_tokens=total)["output_ids"]
    body = _body(ids, stream=True)
    body["sampling_params"]["max_new_tokens"] = total
    events: list[dict] = []
    url = pair["router"].url
    host, port = url.removeprefix("http://").split(":")

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request(
            "POST",
            "/generate",
            json.dumps(body),
            {"Content-Type": "application/json", SPLIT_HEADER: str(len(ids) + 2)},
        )
        resp = conn.getresponse()
        for line in resp:  # one SSE line at a time, as they arrive
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                events.append(json.loads(line[5:]))
        conn.close()

    th = threading.Thread(target=client)
    # B sleeps 50 ms before each forward until the stream is moved: its 120 tokens would take
    # 6 s, so the move finds it mid-generation however fast the box decodes
    with slowed(pair["b"].url, 0.05):
        th.start()
        deadline = time.monotonic() + 120
        # segment 1's 2 tokens, then some of B's (counted in tokens: SGLang may put several
        # tokens in one stream event under load)
        while not events or len(events[-1]["output_ids"]) < 2 + 5:
            assert time.monotonic() < deadline and th.is_alive(), events[-1:]
            time.sleep(0.02)
        status, ans = http_json(f"{url}/handoff/migrate?url={pair['b'].url}", {}, timeout_s=30)
    th.join(300)
    assert status == 200 and ans["migrated"] == 1, ans
    _check_stream(events, ref)
    meta = events[-1]["meta_info"]
    assert meta["completion_tokens"] == total and meta["prompt_tokens"] == len(ids)
    segs = meta["handoff"]["segments"]
    assert [g["worker"] for g in segs] == [pair["a"].url, pair["b"].url, pair["a"].url], segs
    assert segs[1]["error"].startswith("migrated off") and segs[1]["output_tokens"] >= 5
    print("migrated after", segs[1]["output_tokens"], "tokens on B; A reused",
          segs[2]["reused_tokens"], "of", segs[2]["input_tokens"])  # fmt: skip
    # the moved request's slots came back on B (aborted there) and on A (finished)
    assert kv_slot_leaks(pair["b"].url) + kv_slot_leaks(pair["a"].url) == []


def test_logprobs_and_openai_stream_of_a_handed_off_request_equal_a_single_servers(
    pair: dict,
) -> None:
    """return_logprob over splits inside the prompt and after output tokens: output and input
    log-probs as a single server's (float tolerance); an OpenAI /v1/completions stream split
    after 3 tokens: the single server's text and log-probs, one finish_reason; a chat request
    split after 3 tokens: the single server's message and usage."""
    ids = _prompt(950, 56)
    body = _body(ids)
    body["return_logprob"] = True
    body["logprob_start_len"] = 0
    status, single = http_json(f"{pair['a'].url}/generate", body, timeout_s=300)
    assert status == 200, single
    for split in (len(ids) // 2, len(ids) + 3):
        status, got, _ = _post(pair["router"].url, body, split)
        assert status == 200, got
        assert got["output_ids"] == single["output_ids"]
        for key in ("output_token_logprobs", "input_token_logprobs"):
            g, w = got["meta_info"][key], single["meta_info"][key]
            assert len(g) == len(w), (split, key, len(g), len(w))
            for a, b in zip(g, w, strict=True):
                assert a[1] == b[1] and (a[0] is None) == (b[0] is None), (split, key, a, b)
                assert a[0] is None or abs(a[0] - b[0]) < 1e-3, (split, key, a, b)
    req = {"model": "m", "prompt": ids, "max_tokens": TOTAL, "temperature": 0.0,
           "ignore_eos": True, "logprobs": 0}  # fmt: skip
    status, ref = http_json(f"{pair['a'].url}/v1/completions", req, timeout_s=300)
    assert status == 200, ref
    raw = _openai(pair["router"].url, "/v1/completions", dict(req, stream=True), len(ids) + 3)
    chunks = [json.loads(b.strip()[5:]) for b in raw.split(b"\n\n")
              if b.strip().startswith(b"data:") and b.strip()[5:].strip() != b"[DONE]"]  # fmt: skip
    fins = [c["choices"][0]["finish_reason"] for c in chunks]
    assert fins[-1] == "length" and all(f is None for f in fins[:-1]), fins
    assert len(chunks[-1]["handoff"]["segments"]) == 2, chunks[-1]["handoff"]
    want = ref["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["text"]
    lps = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(lps) == TOTAL == len(want["logprobs"]["token_logprobs"])
    assert all(abs(a - b) < 1e-3 for a, b in zip(lps, want["logprobs"]["token_logprobs"],
                                                  strict=True)), lps  # fmt: skip
    # a chat request: its prompt is the chat template's ids (the router asks /tokenize)
    msgs = [{"role": "user", "content": "say something about record 7"}]
    creq = {"model": "m", "messages": msgs, "max_tokens": TOTAL, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip
    status, cref = http_json(f"{pair['a'].url}/v1/chat/completions", creq, timeout_s=300)
    assert status == 200, cref
    n = cref["usage"]["prompt_tokens"]
    ans = json.loads(_openai(pair["router"].url, "/v1/chat/completions", creq, n + 3))
    assert ans["choices"][0]["message"]["content"] == cref["choices"][0]["message"]["content"]
    assert ans["usage"] == {"prompt_tokens": n, "completion_tokens": TOTAL,
                            "total_tokens": n + TOTAL}  # fmt: skip
    assert len(ans["handoff"]["segments"]) == 2, ans["handoff"]


def _openai(url: str, route: str, body: dict, split: int) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", route, json.dumps(body),
                 {"Content-Type": "application/json", SPLIT_HEADER: str(split)})  # fmt: skip
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    assert resp.status == 200, raw[:500]
    return raw


def test_second_instance_dead_request_continues_on_first(pair: dict) -> None:
    """Runs last: stops B. With equal loads the splitter picks the first worker as A."""
    ids = _prompt(700, 60)
    ref = _reference(pair["a"].url, ids)
    assert kv_slot_leaks(pair["b"].url) == []  # B's last look: nothing held before it dies
    pair["cluster"].stop(pair["pb"])
    deadline = time.monotonic() + 60
    while pair["pb"].group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    for stream in (False, True):
        status, final, events = _post(pair["router"].url, _body(ids, stream=stream), 60 + 3)
        assert status == 200, final
        assert final["output_ids"] == ref
        ho = final["meta_info"]["handoff"]
        assert ho["first"] == pair["a"].url and ho["second"] == pair["b"].url, ho
        errs = [g for g in ho["segments"] if "error" in g]
        assert errs and errs[0]["worker"] == pair["b"].url, ho
        assert pair["b"].url in errs[0]["error"]
        assert ho["segments"][-1]["worker"] == pair["a"].url
        assert final["meta_info"]["completion_tokens"] == TOTAL
        if stream:
            _check_stream(events, ref)
    # A got back every slot of the segments it ran and of the continuations
    assert kv_slot_leaks(pair["a"].url) == []

# SPDX-License-Identifier: Apache-2.0
"""PD hand-off on real CPU SGLang (float32): one prefill server with HiCache L3 on a shared KV
pool (as ``banaserve launch`` runs it) and two decode servers behind our router in PD mode with
the hand-off path. Every request running on decode D1 is moved off it mid-generation (the live
controller's drain: its router client removes D1, then asks for the hand-off) and continues as a
PD leg on (P, D2); output ids and log-probs equal the ordinary PD path's (which
test_sglang_pd.py shows equal to a single server's), streams stay whole.

References come from the same deployment through the router's ordinary PD path (the hand-off
path switched off for them): the box allows three SGLang servers at once."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sglang_testbed.cluster import Cluster, slowed
from test_sglang_handoff import _page_bytes, _prompt, _RouterThread

from banaserve_ext.kvpool import KVPool
from banaserve_ext.launch.servers import http_json
from banaserve_ext.live.clients import RouterClient
from banaserve_ext.router.config import RouterConfig, WorkerSpec
from banaserve_ext.router.handoff import HandoffConfig

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

TOTAL = 80  # output tokens per request
#: D1's sleep before each forward while its requests are moved off: 80 tokens take over 4 s
SLOW_S = 0.05


@pytest.fixture(scope="module")
def pd(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    name = f"pytest-handoff-pd-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    extra = json.dumps({
        "backend_name": "banaserve", "module_path": "banaserve_ext.adapters.sglang.hicache",
        "class_name": "BanaserveHiCacheStorage", "pool": name, "interface_v1": 1,
        "prefetch_threshold": 1,
    })  # fmt: skip
    hicache = (
        "--enable-hierarchical-cache", "--hicache-io-backend", "direct",
        "--hicache-mem-layout", "layer_first", "--hicache-size", "1",
        "--hicache-write-policy", "write_through",
        "--hicache-storage-backend", "dynamic",
        "--hicache-storage-backend-extra-config", extra,
        "--hicache-storage-prefetch-policy", "wait_complete",
    )  # fmt: skip
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("handoff-pd-logs"))
    pool = KVPool(name, create=True, capacity_bytes=64 << 20, page_size=_page_bytes(tiny_model_dir))
    pool.start()
    try:
        # started together (a third of the setup time of one after the other); on a loaded
        # 2-core box three concurrent starts may take longer than the test bed's readiness
        # bound, hence the explicit 300 s
        p, pp = cluster.server("prefill", wait=False, dtype="float32", extra_args=hicache,
                               env={"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "30"})  # fmt: skip
        d1, dp1 = cluster.server("decode", wait=False, dtype="float32")
        d2, dp2 = cluster.server("decode", wait=False, dtype="float32")
        for proc in (pp, dp1, dp2):
            proc.wait_ready(300)
        rcfg = RouterConfig(
            prefill=[WorkerSpec(p.url, "prefill", p.bootstrap_port)],
            decode=[WorkerSpec(d1.url, "decode"), WorkerSpec(d2.url, "decode")],
            port=0, prometheus_port=None, disable_health_check=True,
            load_monitor_interval=0.0, disable_retries=True,
        )  # fmt: skip
        rt = _RouterThread(rcfg, HandoffConfig())
        try:
            yield {"p": p, "d1": d1, "d2": d2, "router": rt, "pool": pool,
                   "rc": RouterClient(rt.url)}  # fmt: skip
        finally:
            rt.close()
    finally:
        try:
            cluster.close()
        finally:
            pool.close()


def _body(ids: list[int], stream: bool, logprobs: bool = False) -> dict:
    body: dict[str, Any] = {
        "input_ids": ids, "stream": stream,
        "sampling_params": {"max_new_tokens": TOTAL, "temperature": 0.0, "ignore_eos": True},
    }  # fmt: skip
    if logprobs:
        body["return_logprob"] = True
    return body


def _ordinary(pd: dict, bodies: list[dict]) -> list[dict]:
    """The router's ordinary PD path (no hand-off), concurrently."""
    rt = pd["router"]
    path, rt.router.handoff = rt.router.handoff, None
    try:
        with ThreadPoolExecutor(len(bodies)) as ex:
            outs = list(ex.map(lambda b: http_json(f"{rt.url}/generate", b, 300), bodies))
    finally:
        rt.router.handoff = path
    assert all(s == 200 for s, _ in outs), outs
    return [o for _, o in outs]


class _Client(threading.Thread):
    """One /generate through the router; streaming events are kept as they arrive."""

    def __init__(self, url: str, body: dict, route: str = "/generate") -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.route = url, body, route
        self.events: list[dict] = []
        self.final: dict = {}
        self.status = 0

    def run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.request("POST", self.route, json.dumps(self.body),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        self.status = resp.status
        if not self.body["stream"]:
            self.final = json.loads(resp.read())
        else:
            for line in resp:
                line = line.strip()
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    self.events.append(json.loads(line[5:]))
            self.final = self.events[-1] if self.events else {}
        conn.close()

    def tokens(self) -> int:
        if self.route != "/generate":  # OpenAI chunks: count the log-prob entries
            return sum(len(e["choices"][0]["logprobs"]["token_logprobs"])
                       for e in self.events if e.get("choices"))  # fmt: skip
        return len(self.events[-1].get("output_ids") or []) if self.events else 0


def _check_stream(events: list[dict], want: list[int]) -> None:
    prev: list[int] = []
    for i, ev in enumerate(events):
        ids = ev["output_ids"]
        assert ids[: len(prev)] == prev and len(ids) >= len(prev), (i, prev, ids)
        prev = ids
        assert (ev["meta_info"]["finish_reason"] is not None) == (i == len(events) - 1)
    assert prev == want
    assert len({ev["meta_info"]["id"] for ev in events}) == 1


def _in_router(rc: RouterClient, url: str, role: str) -> None:
    if not any(w["url"] == url for w in rc.workers()):
        rc.add(url, role)


def _drain_d1_mid_generation(
    pd: dict, bodies: list[dict], route: str = "/generate"
) -> list[_Client]:
    """Every request on D1 (D2 out of rotation while they start), then D1 drained by
    hand-off: removed from the router, its running requests moved. D1 sleeps ``SLOW_S``
    before each forward meanwhile (:func:`slowed`), so its ``TOTAL`` tokens take over
    ``TOTAL * SLOW_S`` seconds and the requests are mid-generation when they move however fast
    the box decodes (with idle servers sleeping, a free decode step here takes ~4 ms: 80
    tokens ended before the hand-off began). Whatever fails, both decode servers are back in
    the router afterwards, for the next test."""
    rc, rt = pd["rc"], pd["router"]
    d1, d2 = pd["d1"].url, pd["d2"].url
    path = rt.router.handoff
    rc.remove(d2, "decode")
    try:
        with slowed(d1, SLOW_S):
            clients = [_Client(rt.url, b, route) for b in bodies]
            for c in clients:
                c.start()
            deadline = time.monotonic() + 180
            streaming = [c for c in clients if c.body["stream"]]
            while len(path.running.get(d1, {})) < len(bodies) or any(
                c.tokens() < 3 for c in streaming
            ):
                assert time.monotonic() < deadline, (len(path.running.get(d1, {})), streaming)
                assert all(c.is_alive() for c in clients), [c.final for c in clients]
                time.sleep(0.02)
            rc.add(d2, "decode")
            rc.remove(d1, "decode")
            moved = rc.hand_off(d1)
        for c in clients:
            c.join(300)
        assert moved == len(bodies)
    finally:
        _in_router(rc, d2, "decode")
        _in_router(rc, d1, "decode")
    return clients


def test_every_request_moves_off_a_decode_server_mid_generation(pd: dict) -> None:
    ids = [_prompt(300 + j, n) for j, n in enumerate((40, 75, 33, 96))]
    streams = [False, True, False, True]
    refs = _ordinary(pd, [_body(x, False) for x in ids])
    clients = _drain_d1_mid_generation(pd, [_body(x, s) for x, s in zip(ids, streams, strict=True)])
    d1, d2 = pd["d1"].url, pd["d2"].url
    for c, ref, x in zip(clients, refs, ids, strict=True):
        assert c.status == 200, c.final
        meta = c.final["meta_info"]
        assert c.final["output_ids"] == ref["output_ids"]
        assert meta["prompt_tokens"] == len(x) and meta["completion_tokens"] == TOTAL
        assert meta["finish_reason"]["type"] == "length"
        segs = meta["handoff"]["segments"]
        assert [g["worker"] for g in segs] == [d1, d2], segs
        assert segs[0]["error"].startswith(f"migrated off worker {d1}")
        assert 0 < segs[0]["output_tokens"] < TOTAL or not c.body["stream"], segs
        assert segs[1]["input_tokens"] == len(x) + segs[0]["output_tokens"]
        if c.body["stream"]:
            _check_stream(c.events, ref["output_ids"])
        print("moved after", segs[0]["output_tokens"], "tokens; continued on", segs[1]["worker"])


def test_logprobs_of_a_moved_request_equal_the_ordinary_path(pd: dict) -> None:
    ids = [_prompt(600, 50), _prompt(601, 64)]
    refs = _ordinary(pd, [_body(x, False, logprobs=True) for x in ids])
    bodies = [_body(x, s, True) for x, s in zip(ids, (True, False), strict=True)]
    clients = _drain_d1_mid_generation(pd, bodies)
    for c, ref in zip(clients, refs, strict=True):
        assert c.status == 200, c.final
        assert c.final["output_ids"] == ref["output_ids"]
        got, want = c.final["meta_info"], ref["meta_info"]
        assert [t[1] for t in got["output_token_logprobs"]] == ref["output_ids"]
        for key in ("output_token_logprobs", "input_token_logprobs"):
            g, w = got[key], want[key]
            assert len(g) == len(w), (key, len(g), len(w))
            for a, b in zip(g, w, strict=True):
                assert a[1] == b[1]
                assert (a[0] is None) == (b[0] is None)
                if a[0] is not None:
                    assert abs(a[0] - b[0]) < 1e-3, (key, a, b)
        if c.body["stream"]:
            _check_stream(c.events, ref["output_ids"])


def test_an_openai_completion_stream_moved_off_keeps_tokens_and_logprobs(pd: dict) -> None:
    """/v1/completions, streaming with log-probs, moved off D1 mid-generation: the same text and
    chosen-token log-probs as the ordinary PD path's /v1/completions (SGLang's own route); one
    finish_reason; the usage chunk adds up."""
    ids = _prompt(800, 60)
    req = {"model": "m", "prompt": ids, "max_tokens": TOTAL, "temperature": 0.0,
           "ignore_eos": True, "logprobs": 0}  # fmt: skip
    rt = pd["router"]
    path, rt.router.handoff = rt.router.handoff, None
    try:
        status, ref = http_json(f"{rt.url}/v1/completions", req, 300)
    finally:
        rt.router.handoff = path
    assert status == 200, ref
    body = dict(req, stream=True, stream_options={"include_usage": True})
    (c,) = _drain_d1_mid_generation(pd, [body], "/v1/completions")
    assert c.status == 200, c.events[-3:]
    chunks = [e for e in c.events if e.get("choices")]
    fins = [e["choices"][0]["finish_reason"] for e in chunks]
    assert fins[-1] == "length" and all(f is None for f in fins[:-1]), fins
    assert c.events[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": TOTAL,
                                     "total_tokens": len(ids) + TOTAL}  # fmt: skip
    segs = chunks[-1]["handoff"]["segments"]
    assert [g["worker"] for g in segs] == [pd["d1"].url, pd["d2"].url], segs
    want = ref["choices"][0]
    got_lp = [x for e in chunks for x in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(got_lp) == TOTAL == len(want["logprobs"]["token_logprobs"])
    for a, b in zip(got_lp, want["logprobs"]["token_logprobs"], strict=True):
        assert abs(a - b) < 1e-3, (got_lp, want["logprobs"]["token_logprobs"])
    assert "".join(e["choices"][0]["text"] for e in chunks) == want["text"]

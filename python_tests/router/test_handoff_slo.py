# SPDX-License-Identifier: Apache-2.0
"""SLO-aware batch formation on the hand-off path: the deadline arithmetic (pure), the flags,
and, over real loopback sockets with fake workers, the SGLang priority every segment carries:
the deadline of its next token in Unix ms (arrival + TTFT before the client has a token, last
token + TBT after), so an older request's continuation outranks a fresh request's prefill; a
client's own priority kept on every segment; no SLO priority for workers whose ``/server_info``
says they do not schedule by it, smaller values first. Deadlines are checked against clock
readings taken around each request (brackets), never against how long anything took."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from typing import Any

import pytest
from handoff_kit import post
from router_testkit import eventually, pd_setup, run, single_setup

from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.router.config import RouterConfig, add_arguments, config_from_args
from banaserve_ext.router.handoff import HandoffConfig
from banaserve_ext.router.server import Router
from banaserve_ext.router.slo import (
    INT64_MAX,
    INT64_MIN,
    SLOTargets,
    deadline_priority,
    priority_support,
    segment_deadline,
)
from banaserve_ext.router.testing import fake_next_token

PROMPT = list(range(10, 30))
TOTAL = 8
#: TTFT far above anything a test can take (its run() bound is 60 s), TBT small: the brackets
#: below then order every continuation before every first-token deadline
SLO = SLOTargets(ttft_s=600.0, tbt_s=0.05)
EDF = {"enable_priority_scheduling": True, "schedule_low_priority_values_first": True}


# -- the pure part ------------------------------------------------------------------------------
def test_targets_from_flags_are_validated() -> None:
    assert SLOTargets.from_ms(None, None) is None
    assert SLOTargets.from_ms(500, 40) == SLOTargets(0.5, 0.04)
    with pytest.raises(InvalidArgumentError, match="go together"):
        SLOTargets.from_ms(500, None)
    with pytest.raises(InvalidArgumentError, match="go together"):
        SLOTargets.from_ms(None, 40)
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(InvalidArgumentError, match="finite number > 0"):
            SLOTargets.from_ms(bad, 40)
        with pytest.raises(InvalidArgumentError, match="--handoff-slo-tbt-ms"):
            SLOTargets.from_ms(500, bad)
    for bad in ("500", True):
        with pytest.raises(InvalidArgumentError, match="must be a number"):
            SLOTargets.from_ms(bad, 40)


def test_deadline_is_arrival_plus_ttft_until_a_token_then_last_token_plus_tbt() -> None:
    t = SLOTargets(ttft_s=1.0, tbt_s=0.05)
    assert segment_deadline(t, 100.0, 0, None) == 101.0
    assert segment_deadline(t, 100.0, 0, 100.7) == 101.0  # tokens discarded: none sent yet
    assert segment_deadline(t, 100.0, 3, 100.5) == pytest.approx(100.55)
    # an older request's continuation outranks a request that arrives as it is sent
    old = segment_deadline(t, 90.0, 5, 100.0)
    fresh = segment_deadline(t, 100.0, 0, None)
    assert deadline_priority(old) < deadline_priority(fresh)
    # a continuation held up (store wait, a failed worker) is already due: more urgent
    late = segment_deadline(t, 90.0, 5, 99.0)
    assert deadline_priority(late) < deadline_priority(old)
    # among fresh requests the earlier arrival goes first
    assert deadline_priority(segment_deadline(t, 99.0, 0, None)) < deadline_priority(fresh)
    with pytest.raises(InvalidArgumentError, match="tokens_sent"):
        segment_deadline(t, 100.0, -1, None)


def test_priority_is_unix_ms_rounded_down_within_int64() -> None:
    assert deadline_priority(1_800_000_000.0004) == 1_800_000_000_000
    assert deadline_priority(1_800_000_000.0016) == 1_800_000_000_001
    assert deadline_priority(-0.0005) == -1
    assert deadline_priority(1e30) == INT64_MAX and deadline_priority(-1e30) == INT64_MIN
    with pytest.raises(InvalidArgumentError, match="finite"):
        deadline_priority(math.nan)


def test_priority_support_reads_sglang_flags() -> None:
    assert priority_support(EDF) is None
    assert "--enable-priority-scheduling" in (priority_support({}) or "")
    why = priority_support({"abort_on_priority_when_disabled": True})
    assert why is not None and "503" in why
    why = priority_support({"enable_priority_scheduling": True})
    assert why is not None and "--schedule-low-priority-values-first" in why


def test_flags_reach_the_router_and_bad_ones_are_refused() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--worker-urls", "http://127.0.0.1:1", "http://127.0.0.1:2"]
    on = base + ["--dynaserve-handoff", "--handoff-slo-ttft-ms", "800", "--handoff-slo-tbt-ms",
                 "60", "--prometheus-port", "0"]  # fmt: skip
    cfg = config_from_args(p.parse_args(on))
    assert (cfg.handoff_slo_ttft_ms, cfg.handoff_slo_tbt_ms) == (800.0, 60.0)
    router = Router(cfg)
    assert router.handoff is not None and router.handoff.slo is not None
    assert router.handoff.slo.targets == SLOTargets(0.8, 0.06)
    assert Router(config_from_args(p.parse_args(base))).handoff is None
    with pytest.raises(InvalidArgumentError, match="go together"):
        config_from_args(p.parse_args(base + ["--dynaserve-handoff", "--handoff-slo-ttft-ms",
                                              "800"]))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="add --dynaserve-handoff"):
        config_from_args(p.parse_args(base + ["--handoff-slo-ttft-ms", "800",
                                              "--handoff-slo-tbt-ms", "60"]))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="finite number > 0"):
        RouterConfig(dynaserve_handoff=True, handoff_slo_ttft_ms=-5,
                     handoff_slo_tbt_ms=60).validate()  # fmt: skip


# -- over sockets ---------------------------------------------------------------------------------
def _ms(t: float) -> int:
    return math.floor(t * 1000.0)


async def _generate(s: Any, body: dict, split: int | None, route: str = "/generate") -> dict:
    status, raw = await post(s, route, body, split)
    assert status == 200, raw[:300]
    return json.loads(raw)


def _body(prompt: list[int] = PROMPT, **extra: Any) -> dict:
    sp = {"max_new_tokens": TOTAL, "temperature": 0}
    return {"input_ids": prompt, "stream": False, "sampling_params": sp, **extra}


def _sent(s: Any, role: str = "regular") -> list[dict]:
    """Every /generate body the workers of ``role`` got, in arrival order."""
    logs = sorted((e for e in s.all_logs(role) if e["path"] == "/generate"), key=lambda e: e["t"])
    return [json.loads(e["body"]) for e in logs]


def _reference(prompt: list[int]) -> list[int]:
    out: list[int] = []
    for _ in range(TOTAL):
        out.append(fake_next_token(prompt + out))
    return out


def test_segment_priorities_follow_the_deadlines() -> None:
    """A split after 3 tokens: segment 1 is due at arrival + TTFT, segment 2 at its last token
    + TBT (so it outranks segment 1); a split inside the prompt: both segments still owe the
    first token, one deadline. Each priority is what the worker got, and the output is the
    unsplit one."""

    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            for w in s.regular:
                s.fleet.worker(w.port).server_info = dict(EDF)
            s.router.enable_handoff(HandoffConfig(slo=SLO))
            t0 = time.time()
            out = await _generate(s, _body(), len(PROMPT) + 3)
            t1 = time.time()
            assert out["output_ids"] == _reference(PROMPT)
            segs = out["meta_info"]["handoff"]["segments"]
            assert len(segs) == 2
            p1, p2 = segs[0]["priority"], segs[1]["priority"]
            assert _ms(t0 + SLO.ttft_s) <= p1 <= _ms(t1 + SLO.ttft_s)
            assert _ms(t0 + SLO.tbt_s) <= p2 <= _ms(t1 + SLO.tbt_s)
            assert p2 < p1
            assert [b.get("priority") for b in _sent(s)] == [p1, p2]  # what SGLang would see
            # a boundary inside the prompt: segment 1's token is discarded
            prompt = list(range(200, 224))
            t0 = time.time()
            out = await _generate(s, _body(prompt), 10)
            t1 = time.time()
            assert out["output_ids"] == _reference(prompt)
            segs = out["meta_info"]["handoff"]["segments"]
            assert len(segs) == 2 and segs[0]["priority"] == segs[1]["priority"]
            assert _ms(t0 + SLO.ttft_s) <= segs[0]["priority"] <= _ms(t1 + SLO.ttft_s)
            assert s.router.handoff.slo.refused == {}

    run(body())


def test_older_continuation_outranks_a_fresh_prefill_in_the_same_queue() -> None:
    """Request 1's segment 2 waits in B's queue (held); request 2 arrives while it waits and
    lands on B too: B's queue holds both, and request 1's continuation has the smaller
    priority, the one SGLang's low-values-first queue serves first."""

    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            for w in s.regular:
                s.fleet.worker(w.port).server_info = dict(EDF)
            path = s.router.enable_handoff(HandoffConfig(slo=SLO))
            a, b = s.regular
            wb = s.fleet.worker(b.port)
            wb.gate = asyncio.Event()
            r1 = asyncio.create_task(_generate(s, _body(), len(PROMPT) + 3))
            assert await eventually(lambda: wb.inflight == 1, 10.0)  # r1's segment 2 held
            # r2, fresh: split at s = 1, the planner puts the loaded B second (B computes the
            # whole prompt), or first; either way its segment on B still owes the first token
            prompt2 = list(range(300, 330))
            r2 = asyncio.create_task(_generate(s, _body(prompt2), 1))
            assert await eventually(lambda: wb.inflight == 2, 10.0)  # both wait on B
            on_b = [json.loads(e["body"]) for e in s.log(b)]
            cont1 = next(x for x in on_b if x["input_ids"][: len(PROMPT)] == PROMPT)
            fresh2 = next(x for x in on_b if x["input_ids"][0] == prompt2[0])
            assert len(cont1["input_ids"]) == len(PROMPT) + 3  # a continuation
            assert cont1["priority"] < fresh2["priority"], (cont1, fresh2)
            wb.gate.set()
            out1, out2 = await r1, await r2
            assert out1["output_ids"] == _reference(PROMPT)
            assert out2["output_ids"] == _reference(prompt2)
            assert path.slo is not None and path.slo.sent == 4

    run(body())


def test_client_priority_is_kept_on_every_segment_and_openai_route() -> None:
    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            for w in s.regular:
                s.fleet.worker(w.port).server_info = dict(EDF)
            s.router.enable_handoff(HandoffConfig(slo=SLO))
            out = await _generate(s, _body(priority=7), len(PROMPT) + 3)
            assert out["output_ids"] == _reference(PROMPT)
            assert [g["priority"] for g in out["meta_info"]["handoff"]["segments"]] == [7, 7]
            # /v1/completions: the view carries the client's priority (0 included)
            req = {"model": "m", "prompt": PROMPT, "max_tokens": TOTAL, "temperature": 0,
                   "priority": 0}  # fmt: skip
            out = await _generate(s, req, len(PROMPT) + 2, route="/v1/completions")
            assert [g["priority"] for g in out["handoff"]["segments"]] == [0, 0]
            assert [b.get("priority") for b in _sent(s)] == [7, 7, 0, 0]
            assert s.router.handoff.slo.sent == 0

    run(body())


@pytest.mark.parametrize("info", [{}, {"enable_priority_scheduling": True}], ids=["off", "high"])
def test_workers_that_do_not_schedule_low_values_first_get_no_slo_priority(
    info: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """B runs without priority scheduling (SGLang ignores a priority, or aborts it with 503
    under --abort-on-priority-when-disabled) or larger-values-first (deadlines would run
    latest-first): its segments go without one, with one warning naming it; A still gets
    them. The output is unchanged."""

    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            a, b = s.regular
            s.fleet.worker(a.port).server_info = dict(EDF)
            s.fleet.worker(b.port).server_info = dict(info)
            path = s.router.enable_handoff(HandoffConfig(slo=SLO))
            with caplog.at_level(logging.WARNING, logger="banaserve_ext.router.handoff"):
                for prompt in (PROMPT, list(range(50, 70))):
                    out = await _generate(s, _body(prompt), len(prompt) + 3)
                    assert out["output_ids"] == _reference(prompt)
                    segs = out["meta_info"]["handoff"]["segments"]
                    by_worker = {g["worker"]: g.get("priority") for g in segs}
                    assert by_worker[b.url] is None and by_worker[a.url] is not None, segs
            assert all("priority" not in x for x in map(json.loads, (e["body"] for e in s.log(b))))
            assert list(path.slo.refused) == [b.url]
            warned = [r for r in caplog.records if b.url in r.getMessage()]
            assert len(warned) == 1 and "without SLO priorities" in warned[0].getMessage()

    run(body())


def test_pd_legs_carry_the_deadline_to_prefill_and_decode() -> None:
    """PD mode: a leg's prefill and decode requests carry the same priority (arrival + TTFT);
    the leg that continues after the decode worker dropped the stream carries last token +
    TBT."""

    async def body() -> None:
        async with pd_setup(1, 2, disable_health_check=True) as s:
            for w in s.fleet.specs:
                s.fleet.worker(w.port).server_info = dict(EDF)
            s.router.enable_handoff(HandoffConfig(slo=SLO))
            # whichever decode worker gets the first leg cuts it after 3 tokens; the other
            # (where the continuation goes) runs it whole
            fakes = [s.fleet.worker(d.port) for d in s.decode]
            for f in fakes:
                f.drop_after_tokens, f.gate = 3, asyncio.Event()
            sp = {"max_new_tokens": 12, "temperature": 0}
            t0 = time.time()
            task = asyncio.create_task(
                _generate(s, {"input_ids": PROMPT, "sampling_params": sp}, None)
            )
            assert await eventually(lambda: sum(f.inflight for f in fakes) == 1, 10.0)
            first = next(f for f in fakes if f.inflight == 1)
            for f in fakes:
                if f is not first:
                    f.drop_after_tokens, f.gate = None, None
            assert first.gate is not None
            first.gate.set()
            out = await task
            t1 = time.time()
            segs = out["meta_info"]["handoff"]["segments"]
            assert len(segs) == 2 and "error" in segs[0], segs
            p1, p2 = segs[0]["priority"], segs[1]["priority"]
            assert _ms(t0 + SLO.ttft_s) <= p1 <= _ms(t1 + SLO.ttft_s)
            assert _ms(t0 + SLO.tbt_s) <= p2 <= _ms(t1 + SLO.tbt_s)
            pre = [b.get("priority") for b in _sent(s, "prefill")]
            dec = [b.get("priority") for b in _sent(s, "decode")]
            assert pre == dec == [p1, p2]

    run(body())

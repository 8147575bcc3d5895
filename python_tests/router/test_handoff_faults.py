# SPDX-License-Identifier: Apache-2.0
"""Hand-off faults over real loopback sockets with fake workers whose "greedy" next token is a
function of the whole context (``fake_next_token``): B refusing, B cut mid-stream, B killed →
the request continues on A with the same ids, no token repeated or lost; both failing → one
502 naming both workers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from handoff_kit import check_stitched, generate
from router_testkit import eventually, run, single_setup

from banaserve_ext.router.handoff import HandoffConfig
from banaserve_ext.router.testing import FakeConfig, _Failure, fake_next_token

PROMPT = list(range(10, 30))
TOTAL = 8


def _reference() -> list[int]:
    out: list[int] = []
    for _ in range(TOTAL):
        out.append(fake_next_token(PROMPT + out))
    return out


async def _generate(s: Any, stream: bool, split: int) -> tuple[int, dict, list[dict]]:
    body = {"input_ids": PROMPT, "stream": stream,
            "sampling_params": {"max_new_tokens": TOTAL, "temperature": 0}}  # fmt: skip
    return await generate(s, body, split, timeout_s=20.0)


def _check(final: dict, events: list[dict], stream: bool) -> None:
    check_stitched(final, events if stream else [], _reference(), len(PROMPT))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("fault", ["none", "refuse", "cut", "kill"])
def test_second_worker_faults_continue_on_the_first(fault: str, stream: bool) -> None:
    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            s.router.enable_handoff(HandoffConfig())
            a, b = s.regular
            wb = s.fleet.worker(b.port)
            if fault == "refuse":
                wb.failure = _Failure(503, 1)
            elif fault == "cut":
                wb.drop_after_tokens = 2
            elif fault == "kill":
                s.fleet.kill(b.port)
            status, final, events = await _generate(s, stream, len(PROMPT) + 3)
            assert status == 200, final
            _check(final, events, stream)
            ho = final["meta_info"]["handoff"]
            assert (ho["first"], ho["second"], ho["split"]) == (a.url, b.url, len(PROMPT) + 3)
            workers = [g["worker"] for g in ho["segments"]]
            if fault == "none":
                assert workers == [a.url, b.url]
                assert s.fleet.worker(a.port).served == 1 and wb.served == 1
                return
            assert workers == [a.url, b.url, a.url], ho
            err = ho["segments"][1]["error"]
            assert b.url in err
            if fault == "cut":
                assert ho["segments"][1]["output_tokens"] == 2  # kept, not asked again

    run(body())


def test_both_workers_failing_is_one_502_naming_both() -> None:
    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            s.router.enable_handoff(HandoffConfig())
            a, b = s.regular
            for spec in (a, b):
                s.fleet.worker(spec.port).failure = _Failure(503, 100)
            status, final, _ = await _generate(s, False, len(PROMPT) + 3)
            assert status == 502
            msg = final["error"]["message"]
            assert "hand-off failed" in msg and a.url in msg and b.url in msg

    run(body())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_live_migration_moves_a_running_segment_with_identical_ids(stream: bool) -> None:
    async def body() -> None:
        fake = FakeConfig(decode_ms_per_token=40.0)
        async with single_setup(2, fake=fake, disable_health_check=True) as s:
            path = s.router.enable_handoff(HandoffConfig())
            a, b = s.regular
            req = asyncio.create_task(_generate(s, stream, len(PROMPT) + 2))
            assert await eventually(lambda: bool(path.running.get(b.url)), 10.0)
            status, raw = await s.client.post(f"/handoff/migrate?url={b.url}", {})
            assert status == 200 and json.loads(raw)["migrated"] == 1
            status, final, events = await req
            assert status == 200, final
            _check(final, events, stream)
            segs = final["meta_info"]["handoff"]["segments"]
            assert [g["worker"] for g in segs] == [a.url, b.url, a.url]
            assert segs[1]["error"].startswith(f"migrated off worker {b.url}")
            assert path.migrated == 1 and not path.running.get(b.url)
            status, raw = await s.client.post("/handoff/migrate", {})
            assert status == 400

    run(body())

# SPDX-License-Identifier: Apache-2.0
"""PD hand-off over real loopback sockets with fake PD workers (a decode leg waits for its
prefill's bootstrap room, as a real decode waits for its KV; the "greedy" next token is a
function of the whole context): live migration off a decode worker mid-stream continues the
request as a PD leg on another pair with identical ids; the continuation target refusing or
dead → the next pair, or one clear error; a prefill failing before its decode leg got a token →
the decode leg is closed (not left waiting for KV) and the request goes on elsewhere; the live
controller's router client drains through the same endpoint. Plus log-prob stitching."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from handoff_kit import check_stitched, generate
from router_testkit import eventually, pd_setup, run, single_setup

from banaserve_ext.router.handoff import HandoffConfig
from banaserve_ext.router.testing import FakeConfig, _Failure, fake_next_token

PROMPT = list(range(40, 60))
TOTAL = 12


def _reference(total: int = TOTAL) -> list[int]:
    out: list[int] = []
    for _ in range(total):
        out.append(fake_next_token(PROMPT + out))
    return out


async def _generate(s: Any, stream: bool, extra: dict | None = None,
                    split: int | None = None) -> tuple[int, dict, list[dict]]:  # fmt: skip
    sp = {"max_new_tokens": TOTAL, "temperature": 0}
    body = {"input_ids": PROMPT, "stream": stream, "sampling_params": sp, **(extra or {})}
    return await generate(s, body, split)


def _check(final: dict, events: list[dict], stream: bool) -> None:
    check_stitched(final, events if stream else [], _reference(), len(PROMPT))


def _decode_bodies(s: Any) -> list[dict]:
    return [json.loads(e["body"]) for e in s.all_logs("decode")]


async def _start_and_find_decode(
    s: Any, path: Any, stream: bool, extra: dict | None = None
) -> tuple[asyncio.Task, str]:
    """Start a request; once its decode leg has streamed a few tokens, return the task and the
    decode worker's URL."""
    req = asyncio.create_task(_generate(s, stream, extra))
    assert await eventually(lambda: any(path.running.get(d.url) for d in s.decode), 10.0)
    d1 = next(d.url for d in s.decode if path.running.get(d.url))
    # two tokens in (the fake's events are ~150 bytes each): the leg is decoding
    assert await eventually(lambda: received(path, d1) >= 300, 10.0)
    return req, d1


def received(path: Any, url: str) -> int:
    """Bytes the router has received from the legs running on ``url``."""
    return sum(ex.nbytes for ex in path.running.get(url, {}).values())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_migration_off_a_decode_worker_continues_on_another_pair(stream: bool) -> None:
    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        async with pd_setup(1, 2, fake=fake, disable_health_check=True) as s:
            path = s.router.enable_handoff(HandoffConfig())
            req, d1 = await _start_and_find_decode(s, path, stream)
            status, raw = await s.client.post(f"/handoff/migrate?url={d1}", {})
            assert status == 200 and json.loads(raw)["migrated"] == 1
            status, final, events = await req
            assert status == 200, final
            _check(final, events, stream)
            ho = final["meta_info"]["handoff"]
            segs = ho["segments"]
            d2 = next(d.url for d in s.decode if d.url != d1)
            assert [g["worker"] for g in segs] == [d1, d2], ho
            assert ho["mode"] == "pd" and (ho["first"], ho["second"]) == (d1, d2)
            assert segs[0]["error"].startswith(f"migrated off worker {d1}")
            k = segs[0]["output_tokens"]
            assert 0 < k < TOTAL and ho["split"] == len(PROMPT) + k
            # the continuation: a PD leg whose input is the prompt + the k tokens so far
            cont = [b for b in _decode_bodies(s) if len(b["input_ids"]) > len(PROMPT)]
            assert len(cont) == 1 and cont[0]["input_ids"] == PROMPT + _reference()[:k]
            assert cont[0]["sampling_params"]["max_new_tokens"] == TOTAL - k
            pre = [json.loads(e["body"]) for e in s.all_logs("prefill")]
            assert [b["bootstrap_room"] for b in pre] == [
                b["bootstrap_room"] for b in _decode_bodies(s)
            ]
            assert not path.running.get(d1) and path.migrated == 1
            # the decode legs' accounting is back to zero (a draining worker could leave)
            assert all(w.in_flight == 0 for w in s.router.registry.all())

    run(body())


@pytest.mark.parametrize("fault", ["refuse", "kill"])
def test_continuation_target_failing_moves_on_to_the_next_pair(fault: str) -> None:
    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        async with pd_setup(1, 3, fake=fake, disable_health_check=True) as s:
            path = s.router.enable_handoff(HandoffConfig())
            req, d1 = await _start_and_find_decode(s, path, True)
            others = [d for d in s.decode if d.url != d1]
            bad = others[0]
            if fault == "refuse":
                s.fleet.worker(bad.port).failure = _Failure(503, 100)
            else:
                s.fleet.kill(bad.port)
            # the bad one first: the router counts the good one as busy
            good = s.router.registry.find(others[1].url)[0]
            good.load.active_requests += 10
            status, _ = await s.client.post(f"/handoff/migrate?url={d1}", {})
            assert status == 200
            status, final, events = await req
            good.load.active_requests -= 10
            assert status == 200, final
            _check(final, events, True)
            segs = final["meta_info"]["handoff"]["segments"]
            workers = [g["worker"] for g in segs]
            assert workers[0] == d1 and workers[-1] == others[1].url, segs
            assert all("error" in g for g in segs[:-1]) and "error" not in segs[-1]
            assert workers == [d1, bad.url, others[1].url], segs
            err = segs[1]["error"]
            assert bad.url in err and ("503" in err or "unreachable" in err), err
            assert segs[0]["output_tokens"] + segs[2]["output_tokens"] == TOTAL

    run(body())


def test_no_pair_left_is_one_clear_error_and_no_token_twice() -> None:
    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        async with pd_setup(1, 2, fake=fake, disable_health_check=True) as s:
            path = s.router.enable_handoff(HandoffConfig())
            req, d1 = await _start_and_find_decode(s, path, True)
            d2 = next(d for d in s.decode if d.url != d1)
            s.fleet.worker(d2.port).failure = _Failure(503, 100)
            await s.client.post(f"/handoff/migrate?url={d1}", {})
            status, final, events = await req
            assert status == 200  # the stream had started: the error is its last event
            err = final["error"]["message"]
            assert "hand-off failed" in err and d2.url in err and "503" in err
            assert "no decode worker can take the request" in err, err
            ids = [e["output_ids"] for e in events if "output_ids" in e]
            assert ids and ids[-1] == _reference()[: len(ids[-1])]
            assert all(len(b) == len(a) + 1 for a, b in zip(ids, ids[1:], strict=False))

    run(body())


def test_prefill_failing_closes_the_waiting_decode_leg_and_moves_on() -> None:
    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0)
        async with pd_setup(2, 1, fake=fake, disable_health_check=True) as s:
            s.router.enable_handoff(HandoffConfig())
            p0, p1 = s.prefill
            s.fleet.worker(p0.port).failure = _Failure(503, 100)
            used_p0 = False
            for _ in range(3):  # until the failing prefill worker has been picked once
                status, final, _ = await _generate(s, False)
                assert status == 200, final
                _check(final, [], False)
                segs = final["meta_info"]["handoff"]["segments"]
                if segs[0]["prefill"] == p0.url:
                    used_p0 = True
                    assert p0.url in segs[0]["error"] and "503" in segs[0]["error"]
                    assert segs[-1]["prefill"] == p1.url and "error" not in segs[-1]
            assert used_p0
            dec = s.fleet.worker(s.decode[0].port)
            assert dec.kv_timeouts == 0  # closed by the router, not left to time out
            assert all(w.in_flight == 0 for w in s.router.registry.all())

    run(body())


def test_only_prefill_failing_is_a_502_naming_it() -> None:
    async def body() -> None:
        async with pd_setup(1, 1, fake=FakeConfig(kv_wait_s=5.0),
                            disable_health_check=True) as s:  # fmt: skip
            s.router.enable_handoff(HandoffConfig())
            p0 = s.prefill[0]
            s.fleet.worker(p0.port).failure = _Failure(0, 100)  # drops the connection
            status, final, _ = await _generate(s, False)
            assert status == 502
            msg = final["error"]["message"]
            assert f"prefill worker {p0.url}" in msg and "no prefill worker" in msg, msg

    run(body())


def test_the_live_controllers_router_client_drains_through_the_hand_off() -> None:
    from banaserve_ext.live.clients import RouterClient

    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        async with pd_setup(1, 2, fake=fake, disable_health_check=True) as s:
            rc = RouterClient(f"http://127.0.0.1:{s.router.bound_port}")
            assert await asyncio.to_thread(rc.hand_off, s.decode[0].url) is None  # no path
            path = s.router.enable_handoff(HandoffConfig())
            req, d1 = await _start_and_find_decode(s, path, True)
            await asyncio.to_thread(rc.remove, d1, "decode")  # draining: a leg is on it
            assert await asyncio.to_thread(rc.hand_off, d1) == 1
            status, final, events = await req
            assert status == 200
            _check(final, events, True)
            assert d1 not in {w.url for w in s.router.registry.all()}  # it has left

    run(body())


@pytest.mark.parametrize("mode", ["pd", "unified"])
def test_logprobs_of_both_segments_reach_the_client_once_each_in_order(mode: str) -> None:
    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        setup = pd_setup(1, 2, fake=fake) if mode == "pd" else single_setup(2, fake=fake)
        async with setup as s:
            path = s.router.enable_handoff(HandoffConfig())
            lp = {"return_logprob": True}
            if mode == "pd":
                req, d1 = await _start_and_find_decode(s, path, True, lp)
                await s.client.post(f"/handoff/migrate?url={d1}", {})
                status, final, events = await req
            else:
                status, final, events = await _generate(s, True, lp, split=len(PROMPT) + 5)
            assert status == 200, final
            _check(final, events, True)
            segs = final["meta_info"]["handoff"]["segments"]
            k = segs[0]["output_tokens"]
            assert 0 < k < TOTAL
            for ev in events:
                meta = ev["meta_info"]
                out = meta["output_token_logprobs"]
                assert len(out) == len(ev["output_ids"])
                # the fake numbers a segment's log-probs 1000, 1001, ...: each segment's once
                want = [1000 + i for i in range(min(k, len(out)))]
                want += [1000 + i for i in range(len(out) - k)]
                assert [e[1] for e in out] == want
                # the prompt's input log-probs (the fake: one per prompt token), from the
                # segment that saw exactly the prompt, never the continuation's
                n_in = len(PROMPT) if mode == "pd" else 0
                assert len(meta["input_token_logprobs"]) == n_in

    run(body())


class _FakeInstance:
    """The controller's view of one fake worker: idle when it holds no request; its role switch
    always succeeds."""

    def __init__(self, spec: Any, worker: Any, mode: str) -> None:
        from banaserve_ext.live.clients import InstanceSpec

        self.spec = InstanceSpec(spec.url, 1)
        self.worker = worker
        self.mode = mode

    @property
    def url(self) -> str:
        return self.spec.url

    def signals(self) -> dict:
        n = self.worker.inflight
        return {"mode": self.mode, "idle": n == 0, "waiting": 0, "running": n}

    def role_switch(self, new_role: str) -> tuple[int, dict]:
        self.mode = new_role
        return 200, {"success": True}


def test_a_controller_flip_hands_the_running_request_off_instead_of_waiting() -> None:
    from banaserve_ext.live.controller import InstanceState, LiveConfig, LiveController

    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        async with pd_setup(1, 2, fake=fake, disable_health_check=True) as s:
            path = s.router.enable_handoff(HandoffConfig())
            url = f"http://127.0.0.1:{s.router.bound_port}"
            specs = [*s.decode, *s.prefill]
            ctrl = LiveController(LiveConfig(router=url, instances=()))
            ctrl.instances = []
            for i, spec in enumerate(specs):
                mode = spec.role
                inst = InstanceState(i, _FakeInstance(spec, s.fleet.worker(spec.port), mode))
                inst.current, inst.router_role = {"mode": mode}, mode
                ctrl.instances.append(inst)
            req, d1 = await _start_and_find_decode(s, path, True)
            inst = next(i for i in ctrl.instances if i.url == d1)
            # a batch (not on the hand-off path) on d1 too: the flip waits for it to finish
            d2 = next(w for w in s.router.registry.all() if w.role == "decode" and w.url != d1)
            d2.load.active_requests += 10
            batch = {"input_ids": [PROMPT, PROMPT[:5]], "sampling_params": {"max_new_tokens": 6}}
            other = asyncio.create_task(s.client.post("/generate", batch))
            w1 = s.fleet.worker(next(d.port for d in s.decode if d.url == d1))
            assert await eventually(lambda: w1.inflight == 2, 10.0)
            d2.load.active_requests -= 10
            rec = await asyncio.to_thread(ctrl.flip, inst, "prefill")
            assert rec["outcome"] == "ok", rec
            assert rec["costs"]["handed_off"] == 1
            assert other.done() and (await other)[0] == 200  # finished on d1 before the switch
            assert any(isinstance(json.loads(e["body"])["input_ids"][0], list) for e in w1.log)
            status, final, events = await req
            assert status == 200
            _check(final, events, True)
            segs = final["meta_info"]["handoff"]["segments"]
            assert segs[0]["worker"] == d1 and segs[0]["error"].startswith("migrated off")
            assert segs[-1]["worker"] != d1
            roles = {(w.url, w.role) for w in s.router.registry.all()}
            assert (d1, "prefill") in roles and (d1, "decode") not in roles

    run(body())

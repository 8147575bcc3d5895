# SPDX-License-Identifier: Apache-2.0
"""The live controller on real CPU SGLang (tiny Llama, float32 so greedy ties cannot flip).

One module-scoped deployment serves every test in order: first a single reference server gives
each prompt's greedy output and is stopped (the box allows 3 SGLang servers at once), then
1 prefill + 2 decode servers with ``--enable-pd-role-switch`` and the ``banaserve`` transfer
backend behind this project's router (``load_aware``). The controller is the same
:class:`~banaserve_ext.control.BanaServeController` the simulator runs, inside
:class:`~banaserve_ext.live.LiveController`, ticked by the test's own thread; its thresholds are
set for this box (a busy share of 0.5 counts as high: three servers share two cores).

Pass/fail never depends on timings: the load runs until the controller acts (or a generous
deadline), and the checks are on outputs, failures, and roles.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from sglang_testbed.cluster import Cluster, generate, slowed

from banaserve_ext.control import BanaServeConfig
from banaserve_ext.launch.servers import ServerProcess, SGLangServerConfig, free_port, http_json
from banaserve_ext.live.clients import InstanceSpec
from banaserve_ext.live.controller import LiveConfig, LiveController
from banaserve_ext.live.status import one_line

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

SERVER_ARGS = ("--dtype", "float32")
ROLE_SWITCH = ("--enable-pd-role-switch",)
#: the plug-in features the live controller reads and drives (as `banaserve launch` selects them)
LIVE_FEATURES = ("signals", "kv_migration")
MAX_TOKENS = 16384
#: how long one phase may load the deployment before the test gives up on the controller
PHASE_DEADLINE_S = 240.0


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1000, size=length).tolist() for _ in range(n)]


#: prefill-heavy: long prompts, a few output tokens; decode-heavy: short prompts, long outputs
PREFILL_HEAVY = (_prompts(1, 12, 1500), 4)
DECODE_HEAVY = (_prompts(2, 8, 12), 160)


@dataclass
class Live:
    cluster: Cluster
    router_url: str
    servers: list[SGLangServerConfig]
    reference: dict[tuple[int, ...], list[int]]
    procs: dict[str, ServerProcess]


def _out(body: dict) -> list[int]:
    return list(body["output_ids"])


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from banaserve_ext.transfer import available_backends

    if not {"shm", "tcp"} & set(available_backends()):
        pytest.skip("this build of banaserve_ext._core has no cross-process transfer backend")
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("live") / "logs")
    try:
        ref_cfg, ref = cluster.server("single", extra_args=SERVER_ARGS,
                                      max_total_tokens=MAX_TOKENS)  # fmt: skip
        reference = {}
        for prompts, n in (PREFILL_HEAVY, DECODE_HEAVY):
            with ThreadPoolExecutor(4) as ex:
                outs = list(
                    ex.map(
                        lambda p, n=n: _out(generate(ref_cfg.url, input_ids=p, max_new_tokens=n)),
                        prompts,
                    )
                )
            reference.update({tuple(p): o for p, o in zip(prompts, outs, strict=True)})
        cluster.stop(ref)
        kw = dict(extra_args=SERVER_ARGS + ROLE_SWITCH, max_total_tokens=MAX_TOKENS,
                  features=LIVE_FEATURES)  # fmt: skip
        # as `banaserve launch` starts them: decode servers say --disable-radix-cache (the KV
        # migration kinds check the flag)
        dkw = dict(extra_args=SERVER_ARGS + ROLE_SWITCH + ("--disable-radix-cache",),
                   max_total_tokens=MAX_TOKENS, features=LIVE_FEATURES)  # fmt: skip
        p, pp = cluster.server("prefill", wait=False, **kw)  # type: ignore[arg-type]
        d1, dp1 = cluster.server("decode", wait=False, bootstrap_port=free_port(), **dkw)  # type: ignore[arg-type]
        d2, dp2 = cluster.server("decode", wait=False, bootstrap_port=free_port(), **dkw)  # type: ignore[arg-type]
        for proc in (pp, dp1, dp2):
            proc.wait_ready(300)
        rcfg, _ = cluster.router([p], [d1, d2], module="banaserve")
        generate(rcfg.url, input_ids=[5, 6, 7], max_new_tokens=1)  # past the router's 503s
        procs = {p.url: pp, d1.url: dp1, d2.url: dp2}
        yield Live(cluster, rcfg.url, [p, d1, d2], reference, procs)
    finally:
        cluster.close()


def _controller(live: Live, **overrides: object) -> LiveController:
    control = BanaServeConfig(flip_high=0.5, flip_low=0.45, persist=2, cooldown_s=3.0)
    cfg = LiveConfig(
        router=live.router_url,
        instances=tuple(InstanceSpec(s.url, s.bootstrap_port) for s in live.servers),
        control=control, window_s=1.0, drain_timeout_s=120.0,
    )  # fmt: skip
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return LiveController(cfg).start()


def _roles(live: Live) -> tuple[dict[str, str], dict[str, str]]:
    """(router's role of each worker, each server's own disaggregation mode as its scheduler
    reports it; ``/get_server_info`` keeps showing the launch arguments after a switch)."""
    _, body = http_json(f"{live.router_url}/workers")
    assert isinstance(body, dict)
    router = {w["url"]: w["worker_type"] for w in body["workers"]}
    own = {}
    for s in live.servers:
        _, sig = http_json(f"{s.url}/banaserve/migrate", {"kind": "signals"})
        assert isinstance(sig, dict)
        own[s.url] = sig["mode"]
    return router, own


def _drive(live: Live, ctl: LiveController, workload: tuple[list[list[int]], int],
           until_role: str) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Sends ``workload`` in waves of concurrent requests (4 at a time) while the controller
    ticks each second, until a flip to ``until_role`` succeeded and the wave in flight finished.
    Returns the controller's records and every request's failure (empty when all passed)."""
    prompts, n = workload
    records: list[dict] = []
    failures: list[str] = []
    flipped = threading.Event()
    stop = threading.Event()

    def control_loop() -> None:
        while not stop.wait(ctl.config.window_s):
            recs = ctl.tick()
            print(one_line(ctl.status()), flush=True)  # shown with -s, and on failure
            for rec in recs:
                records.append(rec)
                act = rec.get("inputs", {}).get("action", {})
                if rec["outcome"] == "ok" and act.get("new_role") == until_role:
                    flipped.set()

    def one(p: list[int]) -> None:
        try:
            out = _out(generate(live.router_url, input_ids=p, max_new_tokens=n, timeout_s=300))
            if out != live.reference[tuple(p)]:
                failures.append(f"output differs for prompt of {len(p)} tokens: {out[:8]}")
        except AssertionError as exc:
            failures.append(str(exc))

    t = threading.Thread(target=control_loop, daemon=True)
    t.start()
    deadline = time.monotonic() + PHASE_DEADLINE_S
    try:
        with ThreadPoolExecutor(4) as ex:
            while not flipped.is_set() and time.monotonic() < deadline:
                list(ex.map(one, prompts))
    finally:
        stop.set()
        t.join(120)
    return records, failures


def test_prefill_burst_flips_a_decode_to_prefill_then_decode_load_flips_back(live: Live) -> None:
    ctl = _controller(live)
    records, failures = _drive(live, ctl, PREFILL_HEAVY, until_role="prefill")
    flips = [r for r in records if r["action"] == "FlipRole"]
    assert failures == []
    assert [r["outcome"] for r in flips][-1:] == ["ok"], records[-5:]
    router, own = _roles(live)
    assert router == own
    assert sorted(own.values()) == ["decode", "prefill", "prefill"]
    flip_s = flips[-1]["measured_cost_s"]
    print(f"\nflip decode->prefill: {flip_s:.3f} s (drain + switch) {flips[-1]['costs']}")

    records, failures = _drive(live, ctl, DECODE_HEAVY, until_role="decode")
    flips = [r for r in records if r["action"] == "FlipRole"]
    assert failures == []
    assert [r["outcome"] for r in flips][-1:] == ["ok"], records[-5:]
    router, own = _roles(live)
    assert router == own
    assert sorted(own.values()) == ["decode", "decode", "prefill"]
    print(f"flip prefill->decode: {flips[-1]['measured_cost_s']:.3f} s {flips[-1]['costs']}")
    ctl.close()


def test_restarted_controller_puts_a_half_flipped_worker_back(live: Live) -> None:
    """A controller that died between taking a worker out of the router and adding it back
    leaves it out of rotation; the next controller's first window puts it back in the role the
    server reports, and serving works throughout."""
    router, own = _roles(live)
    victim = next(u for u, r in own.items() if r == "decode")
    req = urllib.request.Request(
        f"{live.router_url}/workers?url={victim}&worker_type=decode", method="DELETE"
    )
    urllib.request.urlopen(req).read()
    assert victim not in _roles(live)[0]
    p = PREFILL_HEAVY[0][0]
    assert (
        _out(generate(live.router_url, input_ids=p, max_new_tokens=4)) == live.reference[tuple(p)]
    )
    ctl = _controller(live)
    recs = ctl.tick()
    assert [(r["action"], r["outcome"]) for r in recs] == [("readd", "ok")]
    router, own = _roles(live)
    assert router == own
    ctl.close()


def test_failed_switch_is_rolled_back_into_the_router(live: Live) -> None:
    """A flip SGLang refuses (here: a role the switch does not know) leaves the worker in the
    router in its old role."""
    ctl = _controller(live)
    ctl.tick()
    inst = next(i for i in ctl.instances if i.mode == "decode")
    # the switch itself is asked for an invalid role: SGLang answers safe_to_restore
    real = inst.client.role_switch
    inst.client.role_switch = lambda new_role, timeout_s=120.0: real("", timeout_s)  # type: ignore[method-assign]
    rec = ctl.flip(inst, "prefill")
    assert rec["outcome"] == "rolled_back", rec
    router, own = _roles(live)
    assert router == own and router[inst.url] == "decode"
    ctl.close()


def test_controller_killed_mid_run_leaves_requests_alone(live: Live, tmp_path: Path) -> None:
    """``banaserve control`` as a process, SIGKILLed while requests are in flight: every request
    finishes with the reference output; a restarted controller sees every worker in the role the
    server reports."""
    import os
    import signal
    import subprocess
    import sys

    from banaserve_ext.live.status import fetch

    def start() -> tuple[subprocess.Popen, str]:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "banaserve_ext",
            "control",
            "--router",
            live.router_url,
            "--port",
            str(port),
            "--window",
            "0.5",
            "--decisions",
            str(tmp_path / "d.jsonl"),
        ]
        for s in live.servers:
            cmd += ["--instance", f"{s.url},{s.bootstrap_port}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "/status" in line, line + proc.stdout.read()  # type: ignore[union-attr]
        return proc, f"http://127.0.0.1:{port}"

    proc, url = start()
    failures: list[str] = []
    prompts, n = DECODE_HEAVY

    def one(p: list[int]) -> None:
        try:
            if (
                _out(generate(live.router_url, input_ids=p, max_new_tokens=n))
                != live.reference[tuple(p)]
            ):
                failures.append("output differs")
        except AssertionError as exc:
            failures.append(str(exc))

    try:
        # every server sleeps 20 ms before each forward: the requests' 160 tokens take over 3 s,
        # so they are in flight when the controller dies however fast the box decodes
        with ExitStack() as slow, ThreadPoolExecutor(4) as ex:
            for s in live.servers:
                slow.enter_context(slowed(s.url, 0.02))
            futs = [ex.submit(one, p) for p in prompts[:4]]
            time.sleep(1.5)  # requests in flight, the controller ticking
            assert not any(f.done() for f in futs), failures
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            for f in futs:
                f.result()
        assert failures == []
        proc, url = start()
        deadline = time.monotonic() + 30
        while fetch(url)["window"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        rows = fetch(url)["instances"]
        assert all(r["router_role"] == r["mode"] and not r["dead"] for r in rows), rows
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kv_pressure_moves_kv_to_an_attention_peer_and_back(live: Live) -> None:
    """Decode-heavy load with the KV thresholds set low (pressure): the controller moves half of
    running requests' KV to an attention peer; once the pressure is declared gone (thresholds
    raised), the KV comes back. Every output equals the single server's, no request fails."""
    from banaserve_ext.live.kv_pressure import KvPressureConfig
    from banaserve_ext.migration.attn_peer import AttnPeerProcess

    with AttnPeerProcess() as peer:
        pressure = KvPressureConfig(peers=(peer.address,), high=0.004, low=0.002, fraction=0.5)
        gone = KvPressureConfig(peers=(peer.address,), high=0.99, low=0.98, fraction=0.5)
        ctl = _controller(
            live, kv_pressure=pressure, control=BanaServeConfig(flip_high=2.0, flip_low=1.5)
        )  # no flips
        records: list[dict] = []
        failures: list[str] = []
        stop = threading.Event()

        def control_loop() -> None:
            while not stop.wait(0.5):
                recs = ctl.tick()
                records.extend(recs)
                print(one_line(ctl.status()), flush=True)
                if any(r["action"] == "MigrateKV" and r["outcome"] == "ok" for r in recs):
                    ctl.kv.config = gone  # the pressure is gone: bring everything back

        def one(p: list[int]) -> None:
            try:
                out = _out(generate(live.router_url, input_ids=p, max_new_tokens=DECODE_HEAVY[1],
                                    timeout_s=300))  # fmt: skip
                if out != live.reference[tuple(p)]:
                    failures.append(f"output differs: {out[:8]}")
            except AssertionError as exc:
                failures.append(str(exc))

        def done(action: str) -> bool:
            return any(r["action"] == action and r["outcome"] == "ok" for r in records)

        t = threading.Thread(target=control_loop, daemon=True)
        t.start()
        deadline = time.monotonic() + PHASE_DEADLINE_S
        try:
            # every server sleeps 20 ms before each forward: a request's 160 tokens take over
            # 3 s, several control windows, so the KV moved out is still there to come back
            # however fast the box decodes (a request ending first takes its split with it)
            with ExitStack() as slow, ThreadPoolExecutor(4) as ex:
                for s in live.servers:
                    slow.enter_context(slowed(s.url, 0.02))
                while not (done("MigrateKV") and done("MigrateKVBack")):
                    assert time.monotonic() < deadline, records[-6:]
                    ctl.kv.config = pressure
                    list(ex.map(one, DECODE_HEAVY[0]))
        finally:
            stop.set()
            t.join(120)
        ctl.close()
    assert failures == []
    moved = [r for r in records if r["action"] == "MigrateKV" and r["outcome"] == "ok"]
    back = [r for r in records if r["action"] == "MigrateKVBack" and r["outcome"] == "ok"]
    print(
        f"\nKV migrations {len(moved)}, back {len(back)}; measured "
        f"{[round(r['measured_cost_s'], 4) for r in moved[:5]]} s out, "
        f"{[round(r['measured_cost_s'], 4) for r in back[:5]]} s back"
    )


def test_dead_instance_is_removed_from_router_and_views(live: Live) -> None:
    """Runs last (it stops a server): a server that stops answering is, after ``dead_after``
    windows, out of the router and out of the controller's views; serving goes on."""
    ctl = _controller(live, dead_after=2)
    ctl.tick()
    roles = [i.router_role for i in ctl.instances]
    victim = next(i for i in ctl.instances if roles.count(i.router_role) >= 2)
    live.cluster.stop(live.procs[victim.url])
    recs: list[dict] = []
    for _ in range(4):
        recs += ctl.tick()
    dead = [r for r in recs if r["action"] == "remove_dead"]
    assert [r["outcome"] for r in dead] in (["removed"], ["not_in_router"]), recs
    assert victim.url not in _roles_router(live)
    assert victim.idx not in [v.idx for v in ctl.views()]
    assert ctl.status()["instances"][victim.idx]["dead"] is True
    for p in PREFILL_HEAVY[0][:2]:
        assert (
            _out(generate(live.router_url, input_ids=p, max_new_tokens=4))
            == live.reference[tuple(p)]
        )
    ctl.close()


def _roles_router(live: Live) -> dict[str, str]:
    _, body = http_json(f"{live.router_url}/workers")
    assert isinstance(body, dict)
    return {w["url"]: w["worker_type"] for w in body["workers"]}

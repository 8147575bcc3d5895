# SPDX-License-Identifier: Apache-2.0
"""KV pressure on a real CPU SGLang decode server, without and with the live controller.

One module-scoped deployment: a single reference server gives each prompt's greedy output
(float32 tiny Llama, so greedy ties cannot flip) and is stopped; then 1 prefill + 1 decode
server (``banaserve`` transfer backend, this project's router). The decode server has a small KV
budget (``--max-total-tokens`` 720) and admits optimistically (``--num-reserved-decode-tokens``
16; SGLang's default 512 per request would keep all but one request queued instead of running):
4 requests of 48 prompt tokens each start together (192 KV tokens) and each generate 180, so
they need 912 KV tokens by the end.

* Without the controller SGLang runs out of KV mid-generation and retracts requests
  (``ScheduleBatch.retract_decode``: their KV goes to a CPU backup and they wait to resume).
* With the controller (the live :class:`~banaserve_ext.live.LiveController`, its KV-pressure
  rule, one attention peer, a window of 0.1 s), crossing ``high`` (35%, 252 tokens, 15 steps in)
  moves 90% of each running request's KV to the peer; the decode server computes those rows'
  attention split with the peer and never runs out. The numbers leave the controller a wide
  window, not a race: any move at a use of at least 218 tokens is enough (912 − 0.9 × 218 ≤ 716,
  SGLang retracts when fewer KV slots are free than requests run), and SGLang runs out only at
  about 716 (131 steps in), so the controller has over 100 decode steps to act; a request that
  starts late is moved when the use crosses ``high`` again. On a quiet box a decode step of this
  model takes ~3 ms, which would leave a few of the controller's windows, so in both phases the
  decode server sleeps 10 ms before each forward (SGLang's own ``/slow_down``): the window lasts
  over 1.1 s on any box. Without the controller, the requests would have to start over 90 steps
  apart for SGLang to fit them. After the move the use counting the moved KV stays above
  ``low``, so the rule does not bring it back while the requests run.

Both phases run the same prompts on the same servers, one after the other; the retraction
counts come from the decode server's own ``signals`` (the ``retracted`` counter). Asserted:
the mechanism (retractions without; KV moved and no retraction with) and that every output
equals the single server's with no failed request. Reported, never asserted: output tokens/s of
both phases (printed, and written to ``kv_pressure.json`` in the module's log directory) — with
the 10 ms sleep in every step they compare the phases, not the mechanism's speed: that is
bench/live/bench_kv_pressure.py's (split attention adds one peer round trip per layer and step,
so on this 2-core box the throughput with the controller is not expected to be higher).

The servers are started as ``banaserve launch`` starts them: the prefill server with HiCache L3
on a KV store service (``banaserve pool serve``), both with ``--enable-pd-role-switch``. The last
test swaps their roles at runtime (the HiCache prefill becomes the decode server and the decode
server the prefill server) and back, and checks the outputs in both arrangements.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sglang_testbed.cluster import Cluster, generate, slowed

from banaserve_ext.bench.kv_pressure import generate_ids, run_phase, signals
from banaserve_ext.control import BanaServeConfig
from banaserve_ext.launch.deploy import PoolPlan, hicache_page_bytes
from banaserve_ext.launch.servers import ServerProcess, SGLangServerConfig, free_port, http_json
from banaserve_ext.live.clients import InstanceClient, InstanceSpec, RouterClient
from banaserve_ext.live.controller import LiveConfig, LiveController
from banaserve_ext.live.kv_pressure import KvPressureConfig

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

FEATURES = ("signals", "kv_migration")
ROLE_SWITCH = ("--enable-pd-role-switch",)
DECODE_KV = 720
PROMPTS, PROMPT_LEN, MAX_NEW = 4, 48, 180
#: output tokens checked per request in the role-swap test (a prefix of the reference output)
SWAP_TOKENS = 16
#: the decode server's sleep before each forward in both phases (SGLang's /slow_down): the
#: controller's window for acting, ~116 decode steps, then lasts over 1.1 s on any box
STEP_SLEEP_S = 0.01
#: KV-pressure rule: act at 35% KV use, move 90% of a request's KV, bring it back at 10% (the
#: use counting the KV on the peer)
PRESSURE = dict(high=0.35, low=0.1, fraction=0.9)


def _prompts() -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(14)
    return [rng.integers(4, 1000, size=PROMPT_LEN).tolist() for _ in range(PROMPTS)]


@dataclass
class Deployment:
    router_url: str
    prefill: SGLangServerConfig
    decode: SGLangServerConfig
    prompts: list[list[int]]
    reference: dict[tuple[int, ...], list[int]]
    log_dir: Path
    results: dict[str, dict] = field(default_factory=dict)


@pytest.fixture(scope="module")
def dep(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    from banaserve_ext.transfer import available_backends

    if not {"shm", "tcp"} & set(available_backends()):
        pytest.skip("this build of banaserve_ext._core has no cross-process transfer backend")
    log_dir = tmp_path_factory.mktemp("kv-pressure") / "logs"
    cluster = Cluster(tiny_model_dir, log_dir)
    prompts = _prompts()
    model_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    pool = PoolPlan(f"kvpressure-{free_port()}", hicache_page_bytes(model_cfg, "float32"),
                    "64MiB", free_port())  # fmt: skip
    store = ServerProcess("store", pool.command(), pool.ready_url, log_dir / "store.log")
    try:
        ref_cfg, ref = cluster.server("single", wait=False, dtype="float32",
                                      max_total_tokens=16384)  # fmt: skip
        ref.wait_ready(300)
        with ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(lambda p: generate(ref_cfg.url, input_ids=p,
                                                  max_new_tokens=MAX_NEW)["output_ids"],
                               prompts))  # fmt: skip
        reference = {tuple(p): list(o) for p, o in zip(prompts, outs, strict=True)}
        cluster.stop(ref)
        store.start().wait_ready(60)
        p, pp = cluster.server(
            "prefill", wait=False, dtype="float32", max_total_tokens=16384, features=FEATURES,
            extra_args=ROLE_SWITCH + pool.hicache_args(),
        )  # fmt: skip
        d, dp = cluster.server(
            "decode", wait=False, dtype="float32", max_total_tokens=DECODE_KV,
            bootstrap_port=free_port(), features=FEATURES,
            env={"BANASERVE_SGLANG_TEST_AIDS": "1"},  # test_kv_hold
            extra_args=ROLE_SWITCH + ("--disable-radix-cache", "--num-reserved-decode-tokens",
                                      "16"),
        )  # fmt: skip
        pp.wait_ready(300)
        dp.wait_ready(300)
        rcfg, _ = cluster.router([p], [d], module="banaserve")
        generate(rcfg.url, input_ids=[5, 6, 7], max_new_tokens=1)  # past the router's 503s
        dep = Deployment(rcfg.url, p, d, prompts, reference, log_dir)
        yield dep
        if dep.results:
            out = log_dir / "kv_pressure.json"
            out.write_text(json.dumps(dep.results, indent=2))
            print(f"\nKV pressure results: {out}")
    finally:
        try:
            cluster.close()
        finally:
            store.stop(2.0)


def _report(name: str, res: dict) -> None:
    print(f"\n{name}: retracted {res['retracted']} (aborted {res['retract_aborted']}), "
          f"most waiting {res['max_waiting']} ({res['max_waiting_kv_full']} with KV full), "
          f"peak KV use {res['max_kv_frac']:.2f}, "
          f"KV moved {res['kv_moved']} back {res['kv_back']}, {res['output_tokens']} output "
          f"tokens in {res['wall_s']:.1f} s = {res['output_tok_s']:.1f} tok/s")  # fmt: skip


def _without(dep: Deployment) -> dict:
    if "without" not in dep.results:
        with slowed(dep.decode.url, STEP_SLEEP_S):
            res = run_phase(dep.router_url, dep.decode.url, dep.prompts, MAX_NEW, dep.reference)
        res.pop("records")
        res.pop("outputs")
        dep.results["without"] = res
        _report("without the controller", res)
    return dep.results["without"]


def test_without_controller_sglang_runs_out_of_kv_and_retracts(dep: Deployment) -> None:
    res = _without(dep)
    assert res["failures"] == []
    assert res["output_tokens"] == PROMPTS * MAX_NEW
    # 4 x (48 + 180) = 912 KV tokens needed, 720 there: SGLang must retract (see the docstring)
    assert res["retracted"] > 0, res


def test_with_controller_kv_moves_to_a_peer_and_sglang_never_retracts(dep: Deployment) -> None:
    from banaserve_ext.migration.attn_peer import AttnPeerProcess

    without = _without(dep)
    with AttnPeerProcess() as peer:
        cfg = LiveConfig(
            router=dep.router_url,
            instances=(InstanceSpec(dep.prefill.url, dep.prefill.bootstrap_port),
                       InstanceSpec(dep.decode.url, dep.decode.bootstrap_port)),
            control=BanaServeConfig(flip_high=2.0, flip_low=1.5),  # no role flips here
            window_s=0.1,
            kv_pressure=KvPressureConfig(peers=(peer.address,), **PRESSURE),  # type: ignore[arg-type]
        )  # fmt: skip
        ctl = LiveController(cfg).start()
        try:
            with slowed(dep.decode.url, STEP_SLEEP_S):
                res = run_phase(dep.router_url, dep.decode.url, dep.prompts, MAX_NEW,
                                dep.reference, tick=ctl.tick, window_s=cfg.window_s)  # fmt: skip
        finally:
            ctl.close()
    records = res.pop("records")
    res.pop("outputs")
    res["actions"] = [[r["window"], r["action"], r["outcome"], r["inputs"].get("rid"),
                       r["inputs"].get("kv_frac")] for r in records]  # fmt: skip
    dep.results["with"] = res
    _report("with the controller", res)
    failed = [r for r in records if r["action"].startswith("MigrateKV") and r["outcome"] not in
              ("ok", "request_finished")]  # fmt: skip
    assert res["failures"] == []
    assert res["output_tokens"] == PROMPTS * MAX_NEW
    assert res["kv_moved"] > 0, records[-6:]
    assert failed == []
    assert res["retract_aborted"] == 0
    assert res["retracted"] == 0 < without["retracted"], (res, without)


def _admin(url: str, body: dict) -> dict:
    status, ans = http_json(f"{url}/banaserve/migrate", body, timeout_s=120.0)
    assert status == 200 and isinstance(ans, dict), (body, status, ans)
    return ans


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_retracted_split_request_resumes_on_its_own_kv(dep: Deployment) -> None:
    """SGLang retracts a request whose KV is partly on an attention peer. A PD decode server
    keeps a host backup of a retracted request's KV and restores it later without recompute;
    the backup copies the request's row, whose migrated positions point at slots given back to
    the allocator. The plug-in reads the peer's part into the backup, so the request resumes on
    its own KV: the output equals the single server's. The freed slots are scrubbed (NaN) and
    then taken by the test aid ``test_kv_hold`` (which forces the retraction), so a backup that
    copied them would show in the output."""
    from banaserve_ext.migration.attn_peer import AttnPeerProcess

    url = dep.decode.url
    prompts = dep.prompts[:2]
    before = signals(url)
    counters_before = _admin(url, {"kind": "kv_splits"})["counters"]
    with AttnPeerProcess() as peer, ThreadPoolExecutor(len(prompts)) as ex:
        # the decode server sleeps 20 ms before each forward until the retraction: the
        # requests' 180 tokens take over 3.6 s, so they are still running when the KV moves
        # and the hold comes, however fast the box decodes
        with slowed(url, 0.02):
            futs = [ex.submit(generate_ids, dep.router_url, p, MAX_NEW) for p in prompts]

            def both_running() -> list[dict]:
                run = _admin(url, {"kind": "status"})["running"]
                return run if len(run) == 2 and all(r["output_len"] >= 4 for r in run) else []

            for r in _wait_for("both requests decoding", both_running):
                ans = _admin(url, {"kind": "kv", "rid": r["rid"], "peer": peer.address,
                                   "fraction": 0.5, "scrub": True})  # fmt: skip
                assert ans["tokens"] > 0, ans
            _admin(url, {"kind": "test_kv_hold"})  # every free slot: the next step cannot fit
            try:
                retracted = int(before["retracted"])
                _wait_for("a retraction", lambda: int(signals(url)["retracted"]) > retracted)
            finally:
                _admin(url, {"kind": "test_kv_hold", "release": True})
        outs = [f.result(timeout=300) for f in futs]
    for p, out in zip(prompts, outs, strict=True):
        assert out == dep.reference[tuple(p)]
    after = signals(url)
    assert int(after["retract_aborted"]) == int(before["retract_aborted"])
    splits = _admin(url, {"kind": "kv_splits"})
    assert splits["splits"] == []
    patched = splits["counters"]["retraction_backups_patched"]
    assert patched - counters_before["retraction_backups_patched"] >= 1, splits
    assert splits["counters"]["retraction_backups_dropped"] == 0, splits


def _switch(router: RouterClient, inst: InstanceClient, old: str, new: str) -> None:
    """Out of the router, SGLang's role switch, back in the new role (the servers are idle)."""
    router.remove(inst.url, old)
    deadline = time.monotonic() + 60  # HiCache may still be writing the last pages to L3
    while True:
        status, ans = inst.role_switch(new)
        if status == 200 and ans.get("success"):
            break
        assert ans.get("safe_to_restore") and time.monotonic() < deadline, (status, ans)
        time.sleep(0.5)
    router.add(inst.url, new, inst.spec.bootstrap_port)
    assert signals(inst.url)["mode"] == new


def test_hicache_prefill_and_decode_swap_roles_and_back(dep: Deployment) -> None:
    """The prefill server (HiCache L3 on the store) becomes the decode server and the decode
    server (no radix cache) the prefill server, then both switch back; every output equals the
    single server's in both arrangements, and the router's roles match the servers' own.
    Swapped, every prompt is sent twice: the flipped prefill keeps its radix tree, and a
    repeated prompt once made SGLang lose its slots and stop at the next idle pool check."""
    router = RouterClient(dep.router_url)
    pre = InstanceClient(InstanceSpec(dep.prefill.url, dep.prefill.bootstrap_port))
    dec = InstanceClient(InstanceSpec(dep.decode.url, dep.decode.bootstrap_port))
    n = SWAP_TOKENS

    def check(arrangement: str, rounds: int = 1) -> None:
        roles = {w["url"]: w["worker_type"] for w in router.workers()}
        own = {u: signals(u)["mode"] for u in (pre.url, dec.url)}
        assert roles == own, (arrangement, roles, own)
        for _ in range(rounds):
            for prompt in dep.prompts:
                out = generate_ids(dep.router_url, prompt, n, timeout_s=120.0)
                assert out == dep.reference[tuple(prompt)][:n], arrangement

    check("as launched")
    _switch(router, dec, "decode", "prefill")  # a decode server flipped to prefill...
    _switch(router, pre, "prefill", "decode")  # ...and the HiCache prefill to decode
    check("swapped", rounds=2)
    time.sleep(2.0)  # idle: SGLang's pool check runs
    assert pre.healthy() and signals(pre.url)["mode"] == "decode"
    _switch(router, pre, "decode", "prefill")
    _switch(router, dec, "prefill", "decode")
    check("swapped back")

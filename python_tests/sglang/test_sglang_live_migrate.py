# SPDX-License-Identifier: Apache-2.0
"""The live controller's layer migrations on real CPU SGLang (tiny Llama, float32).

One module-scoped deployment: a single reference server gives each prompt's greedy output and
is stopped; then 2 prefill servers (opted into ``layer_migration``) + 1 decode server, a layer
server process beside each prefill server, the controller's router (all three workers) and a
second router, the *driver*, that sends the test's load to one prefill server only. So the
imbalance the controller sees is real load on a real server (signals measured in its scheduler),
not a faked view; the controller only reads its own router and the servers.

Pass/fail never depends on timings: the load runs until the controller acts (or a generous
deadline); the checks are on outputs, failures, and what each server reports.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sglang_testbed.cluster import Cluster, generate
from sglang_testbed.layer_server import LayerServerProc

from banaserve_ext.control import BanaServeConfig
from banaserve_ext.launch.servers import SGLangServerConfig, free_port, http_json
from banaserve_ext.live.actuators import Targets
from banaserve_ext.live.cli import model_geometry
from banaserve_ext.live.clients import InstanceSpec, RouterClient
from banaserve_ext.live.controller import LiveConfig, LiveController
from banaserve_ext.live.status import one_line

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

SERVER_ARGS = ("--dtype", "float32", "--enable-pd-role-switch")
MAX_TOKENS = 16384
PHASE_DEADLINE_S = 180.0


def _prompts(seed: int, n: int, length: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1000, size=length).tolist() for _ in range(n)]


#: prefill-heavy: the imbalance is prefill compute on one prefill server
PROMPTS = _prompts(7, 8, 1200)
NEW_TOKENS = 4


@dataclass
class Dep:
    router_url: str  # the controller's router
    driver: RouterClient  # the test's router: one prefill server at a time
    servers: list[SGLangServerConfig]  # P0, P1, D
    layer_servers: dict[str, LayerServerProc]  # beside P0, P1
    reference: dict[tuple[int, ...], list[int]]
    geometry: tuple[int, int, int]


@pytest.fixture(scope="module")
def dep(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dep]:
    from banaserve_ext.transfer import available_backends

    if not {"shm", "tcp"} & set(available_backends()):
        pytest.skip("this build of banaserve_ext._core has no cross-process transfer backend")
    tmp = tmp_path_factory.mktemp("livemig")
    cluster = Cluster(tiny_model_dir, tmp / "logs")
    layer_servers: dict[str, LayerServerProc] = {}
    try:
        ref_cfg, ref = cluster.server("single", extra_args=("--dtype", "float32"),
                                      max_total_tokens=MAX_TOKENS)  # fmt: skip
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda p: generate(ref_cfg.url, input_ids=p,
                                                  max_new_tokens=NEW_TOKENS)["output_ids"],
                               PROMPTS))  # fmt: skip
        reference = {tuple(p): list(o) for p, o in zip(PROMPTS, outs, strict=True)}
        cluster.stop(ref)
        # no radix cache: every wave repeats the prompts, and prefix hits would take the
        # prefill work (the imbalance) away
        pkw = dict(extra_args=SERVER_ARGS + ("--disable-radix-cache",), max_total_tokens=MAX_TOKENS,
                   features=("signals", "kv_migration", "layer_migration"))  # fmt: skip
        p0, pp0 = cluster.server("prefill", wait=False, **pkw)  # type: ignore[arg-type]
        p1, pp1 = cluster.server("prefill", wait=False, **pkw)  # type: ignore[arg-type]
        d, dp = cluster.server("decode", wait=False, bootstrap_port=free_port(),
                               extra_args=SERVER_ARGS + ("--disable-radix-cache",),
                               max_total_tokens=MAX_TOKENS,
                               features=("signals", "kv_migration"))  # fmt: skip
        for i, s in enumerate((p0, p1)):
            layer_servers[s.url] = LayerServerProc(tmp / f"ls{i}")
        for proc in (pp0, pp1, dp):
            proc.wait_ready(300)
        ra, _ = cluster.router([p0, p1], [d], module="banaserve")
        rb, _ = cluster.router([p0], [d], module="banaserve")
        for url in (ra.url, rb.url):
            generate(url, input_ids=[5, 6, 7], max_new_tokens=1)  # past the router's 503s
        geometry = model_geometry(json.loads((tiny_model_dir / "config.json").read_text()))
        yield Dep(ra.url, RouterClient(rb.url), [p0, p1, d], layer_servers, reference, geometry)
    finally:
        for ls in layer_servers.values():
            ls.kill()
        cluster.close()


def _controller(dep: Dep) -> LiveController:
    # thresholds for this box (three servers and the layer servers share two cores): a busy
    # share 0.3 above the idlest prefill server counts as an imbalance; no flips
    control = BanaServeConfig(flip_high=0.99, flip_low=0.98, high=0.3, low=0.1, persist=2,
                              cooldown_s=3.0, budget_s=5.0)  # fmt: skip
    layers, wbytes, kvbytes = dep.geometry
    targets = Targets(layer_servers=tuple((u, f"127.0.0.1:{ls.port}")
                                          for u, ls in dep.layer_servers.items()))  # fmt: skip
    cfg = LiveConfig(
        router=dep.router_url,
        instances=tuple(InstanceSpec(s.url, s.bootstrap_port) for s in dep.servers),
        control=control, window_s=1.0, total_layers=layers, weight_bytes_per_layer=wbytes,
        kv_bytes_per_token_layer=kvbytes, targets=targets, calibrate=True,
    )  # fmt: skip
    ctl = LiveController(cfg).start()
    print(f"\nLinkCosts: {[r for r in ctl.recent if r['action'] == 'LinkCosts']}")
    return ctl


def _drive_to(dep: Dep, target: SGLangServerConfig) -> None:
    """The driver router sends to ``target`` only (the other prefill server leaves it)."""
    listed = {w["url"] for w in dep.driver.workers() if w["worker_type"] == "prefill"}
    if target.url not in listed:
        dep.driver.add(target.url, "prefill", target.bootstrap_port)
    for url in listed - {target.url}:
        dep.driver.remove(url, "prefill")


def _layers_status(s: SGLangServerConfig) -> dict:
    status, body = http_json(f"{s.url}/banaserve/migrate", {"kind": "layers_status"})
    assert status == 200 and isinstance(body, dict), body
    return body


def _run(dep: Dep, ctl: LiveController,
         done: Callable[[dict], bool]) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Waves of 4 concurrent requests through the driver while the controller ticks each
    second, until ``done(record)`` held for a record and the wave in flight finished (then one
    more wave, on what the action left). Returns the records and every failure."""
    records: list[dict] = []
    failures: list[str] = []
    hit, stop = threading.Event(), threading.Event()

    def control_loop() -> None:
        while not stop.wait(ctl.config.window_s):
            recs = ctl.tick()
            print(one_line(ctl.status()), flush=True)  # shown with -s, and on failure
            records.extend(recs)
            if any(done(r) for r in recs):
                hit.set()

    def one(p: list[int]) -> None:
        try:
            out = generate(dep.driver.url, input_ids=p, max_new_tokens=NEW_TOKENS,
                           timeout_s=300, retry_503_s=0)["output_ids"]  # fmt: skip
            if list(out) != dep.reference[tuple(p)]:
                failures.append(f"output differs for a prompt of {len(p)} tokens: {out}")
        except AssertionError as exc:
            failures.append(str(exc))

    t = threading.Thread(target=control_loop, daemon=True)
    t.start()
    deadline = time.monotonic() + PHASE_DEADLINE_S
    try:
        with ThreadPoolExecutor(4) as ex:
            while not hit.is_set() and time.monotonic() < deadline:
                list(ex.map(one, PROMPTS))
            if hit.is_set():  # one more wave on what the action left
                list(ex.map(one, PROMPTS))
    finally:
        stop.set()
        t.join(120)
    return records, failures


def _ok(action: str) -> Callable[[dict], bool]:
    return lambda r: r["action"] == action and r["outcome"] == "ok"


def test_imbalance_migrates_layers_live_then_back_when_it_reverses(dep: Dep) -> None:
    p0, p1, _ = dep.servers
    ctl = _controller(dep)
    cal = [r for r in ctl.recent if r["action"] == "LinkCosts"]
    assert len(cal) == 1, cal  # (its outcome depends on the box's load: a 5 s limit per target)
    if cal[0]["outcome"] == "ok":
        assert ctl.config.control.layer_link is not None and "layer_link" in ctl.link_report
    _drive_to(dep, p0)
    records, failures = _run(dep, ctl, _ok("MigrateLayers"))
    assert failures == []
    mig = [r for r in records if r["action"] == "MigrateLayers"]
    assert [r["outcome"] for r in mig] == ["ok"], records[-5:]
    act = mig[0]["inputs"]["action"]
    assert (act["src"], act["dst"]) == (0, 1)  # the loaded one lends to the idle one
    assert mig[0]["inputs"]["target"] == f"127.0.0.1:{dep.layer_servers[p1.url].port}"
    st = _layers_status(p0)
    assert st["split"] and st["keep_local"] and st["steps"] > 0 and not st["failed"]
    assert [a.action.src for a in ctl.policy.active] == [0]
    print(
        f"\nMigrateLayers: predicted {mig[0]['predicted_cost_s']:.4f} s, measured "
        f"{mig[0]['measured_cost_s']:.4f} s {mig[0]['costs']}; link {ctl.link_report}"
    )

    _drive_to(dep, p1)  # the load moves to the receiver: the imbalance reverses
    records, failures = _run(dep, ctl, _ok("Revert"))
    assert failures == []
    rev = [r for r in records if r["action"] == "Revert"]
    assert rev and rev[0]["outcome"] == "ok" and rev[0]["inputs"]["kind"] == "layers", records[-5:]
    assert _layers_status(p0)["split"] is False
    print(f"Revert: measured {rev[0]['measured_cost_s']:.4f} s {rev[0].get('costs')}")
    _undo_all(ctl)  # the extra wave may have let it lend P1's layers to P0 meanwhile
    ctl.close()


def _undo_all(ctl: LiveController) -> None:
    from banaserve_ext.control import Revert

    for s, d in list(ctl.actuators.placed):
        rec, undone = ctl.actuators.revert(Revert(s, d), {})
        assert undone, rec


def test_killed_layer_server_rolls_back_and_a_dead_target_moves_nothing(dep: Dep) -> None:
    """The receiver's layer server is SIGKILLed under load half a second after the migration:
    the donor's own layers take over (no request fails, outputs unchanged), the controller
    drops the split and the active migration; the next migration, to the dead layer server,
    moves nothing and leaves nothing active."""
    p0, p1, _ = dep.servers
    victim = dep.layer_servers[p1.url]
    assert not _layers_status(p0)["split"] and not _layers_status(p1)["split"]
    ctl = _controller(dep)
    _drive_to(dep, p0)
    killer: list[threading.Timer] = []

    def done(r: dict) -> bool:
        if _ok("MigrateLayers")(r) and not killer:
            killer.append(threading.Timer(0.5, victim.kill))
            killer[0].start()
        return r["action"] == "MigrateLayers" and r["outcome"] == "failed"

    records, failures = _run(dep, ctl, done)
    assert failures == []
    seq = [(r["action"], r["outcome"]) for r in records
           if r["action"] in ("MigrateLayers", "LayersLost", "Revert")]  # fmt: skip
    assert seq[:3] == [("MigrateLayers", "ok"), ("LayersLost", "rolled_back"),
                       ("MigrateLayers", "failed")], seq  # fmt: skip
    failed = next(r for r in records if r["action"] == "MigrateLayers"
                  and r["outcome"] == "failed")  # fmt: skip
    assert "nothing moved" in failed["detail"]
    print(f"failed MigrateLayers: {failed['detail']}")
    st = _layers_status(p0)
    assert st["split"] is False and not ctl.actuators.placed and not ctl.policy.active
    _, body = http_json(f"{dep.router_url}/workers")
    assert isinstance(body, dict) and p0.url in {w["url"] for w in body["workers"]}
    ctl.close()

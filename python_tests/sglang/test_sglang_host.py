# SPDX-License-Identifier: Apache-2.0
"""Hooks only where asked, with real SGLang: a plain server on a host with our plug-in runs
unhooked and opens nothing of ours; a ``--disaggregation-transfer-backend banaserve`` server is
hooked. Also ``banaserve sglang probe`` and the refusal when a real SGLang internal is renamed.

Both servers log the host layer's one-line summary per SGLang process
(``BANASERVE_LOG_LEVEL=INFO``); the admin channel's abstract socket is looked up in
``/proc/net/unix``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sglang_testbed.cluster import Cluster

from banaserve_ext.launch.servers import ServerProcess, SGLangServerConfig, http_json

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

LOG_ENV = {"BANASERVE_LOG_LEVEL": "INFO"}
SUMMARY = re.compile(r"banaserve plug-in \(pid (\d+), args from (.*?)\): features (.*?); "
                     r"active .*?; refused (.*?); hooks: (.*)$", re.M)  # fmt: skip


@pytest.fixture(scope="module")
def servers(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[SGLangServerConfig, ServerProcess]]]:
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("host-logs"), env=LOG_ENV)
    try:
        out = {
            "plain": cluster.server("single", wait=False),
            "banaserve": cluster.server("prefill", wait=False),  # transfer backend: banaserve
        }
        cluster.wait_all()
        yield out
    finally:
        cluster.close()


def summaries(proc: ServerProcess) -> list[tuple[str, str, str, str, str]]:
    return SUMMARY.findall(Path(proc.log_path).read_text(errors="replace"))


def abstract_sockets() -> set[str]:
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {ln.split()[-1] for ln in lines if ln.split()[-1].startswith("@")}


def test_a_plain_server_is_not_hooked_and_opens_nothing_of_ours(servers) -> None:
    cfg, proc = servers["plain"]
    rows = summaries(proc)
    # the launcher, the scheduler and the detokenizer each loaded the plug-in ...
    assert len({pid for pid, *_ in rows}) >= 3, rows
    for _, _, features, refused, hooks in rows:
        # ... and found only the CPU launcher (this test bed starts servers through it), which
        # hooks nothing; no PD backend, no admin channel, no migration
        assert features == "['cpu_launcher']" and hooks == "none" and refused == "none", rows
    assert {source for _, source, *_ in rows} >= {"command line"}
    assert f"@banaserve-admin-{cfg.port}" not in abstract_sockets()
    log = Path(proc.log_path).read_text(errors="replace")
    assert "banaserve transfer backend: engine" not in log
    status, _ = http_json(f"{cfg.url}/banaserve/migrate", {"kind": "status"})
    assert status == 404  # the route is not there either


def test_a_banaserve_server_is_hooked(servers) -> None:
    cfg, proc = servers["banaserve"]
    rows = summaries(proc)
    assert len({pid for pid, *_ in rows}) >= 3, rows
    for _, _, features, refused, hooks in rows:
        assert features == "['cpu_launcher', 'pd', 'layerwise']" and refused == "none", rows
        assert hooks == (
            "utils.get_kv_class, Scheduler.process_decode_queue, Scheduler.run_batch"
        ), rows
    # the scheduler got its server arguments as an object, not from the command line
    assert any(src.startswith("ServerArgs in run_scheduler_process") for _, src, *_ in rows)
    log = Path(proc.log_path).read_text(errors="replace")
    assert "banaserve transfer backend: engine" in log  # our KV manager started its engine
    assert f"@banaserve-admin-{cfg.port}" not in abstract_sockets()  # no migration opt-in


def test_probe_command_prints_the_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "banaserve_ext.cli", "sglang", "probe"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^SGLang \S+ \(banaserve tested with 0\.5\.23\)$", out, re.M)
    assert re.search(r"^pd +found +hook +sglang\.srt\.disaggregation\.utils\.get_kv_class$",
                     out, re.M)  # fmt: skip
    assert re.search(r"^admin +found +member +sglang\.srt\.managers\.scheduler\.Scheduler\."
                     r"enable_overlap$", out, re.M)  # fmt: skip
    for feature in ("pd", "layerwise", "admin", "kv_migration", "layer_migration", "hicache"):
        assert re.search(rf"^{feature} +ok ", out, re.M), feature
    assert "MISSING" not in out


_RENAMED = r"""
from banaserve_ext.adapters.sglang import cpu_compat
cpu_compat.install()
from sglang.srt.managers.scheduler import Scheduler
Scheduler.ingest_requests_v2 = Scheduler.ingest_requests   # an SGLang release renames it
del Scheduler.ingest_requests
from banaserve_ext.adapters.sglang.host import Host
host = Host().load(["admin", "kv_migration"], "test")
print("REFUSED", sorted(host.refusals))
print("MESSAGE", host.refusals["admin"])
print("HOOKS", host.hooks)
"""


def test_a_renamed_sglang_internal_refuses_the_feature_clearly() -> None:
    proc = subprocess.run([sys.executable, "-c", _RENAMED], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "REFUSED ['admin', 'kv_migration']" in out  # kv_migration needs the admin channel
    msg = next(ln for ln in out.splitlines() if ln.startswith("MESSAGE "))
    assert "banaserve feature 'admin' refuses to start" in msg
    assert "sglang.srt.managers.scheduler.Scheduler.ingest_requests" in msg
    assert re.search(r"Installed SGLang \S+; banaserve was tested with SGLang 0\.5\.23", msg)
    assert "HOOKS []" in out
    assert "refuses to start" in proc.stderr  # logged as an error too

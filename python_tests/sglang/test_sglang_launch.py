# SPDX-License-Identifier: Apache-2.0
"""``banaserve launch``: deployment planning, trace scaling and metrics (pure parts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from banaserve_ext import data
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.launch import cli, deploy, replay


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def _model(tmp_path: Path) -> str:
    """A model directory with the tiny Llama's config.json (enough to plan a deployment)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "intermediate_size": 256,
    }))  # fmt: skip
    return str(tmp_path)


def test_plan_builds_prefill_and_decode_commands(tmp_path: Path) -> None:
    prefill, decode = cli.plan(_args("--prefill", "2", "--decode", "1"), _model(tmp_path))
    assert [c.role for c in prefill + decode] == ["prefill", "prefill", "decode"]
    ports = {c.port for c in prefill + decode} | {c.bootstrap_port for c in prefill + decode}
    assert len(ports) == 6  # every server and bootstrap port distinct (role switch: decode too)
    cmd = prefill[0].command("py")
    assert cmd[:3] == ["py", "-m", "banaserve_ext.adapters.sglang.serve_cpu"]
    i = cmd.index("--disaggregation-transfer-backend")
    assert cmd[i + 1] == "banaserve"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--disaggregation-bootstrap-port" in cmd
    assert "--disaggregation-decode-retraction-backup" in decode[0].command("py")
    assert prefill[0].env() == {"SGLANG_HOST_IP": "127.0.0.1"}


def test_default_deployment_is_banaserve(tmp_path: Path) -> None:
    d = deploy.plan_deployment(_args("--decode", "2", "--dtype", "float32"), _model(tmp_path))
    assert d.kind == "banaserve"
    assert d.router.module == "banaserve" and d.router.policy == "load_aware"
    # the store, sized in HiCache pages of this model: K+V x 2 layers x 2 heads x 32 x 4 B
    assert d.pool is not None and d.pool.page_bytes == 2 * 2 * 2 * 32 * 4
    pcmd, dcmd = d.prefill[0].command("py"), d.decode[0].command("py")
    assert "--enable-pd-role-switch" in pcmd and "--enable-pd-role-switch" in dcmd
    assert pcmd[pcmd.index("--hicache-storage-backend") + 1] == "dynamic"
    extra = json.loads(pcmd[pcmd.index("--hicache-storage-backend-extra-config") + 1])
    assert extra["pool"] == d.pool.name
    assert "--hicache-storage-backend" not in dcmd
    assert dcmd[dcmd.index("--dtype") + 1] == "float32"
    # a prefill server flipped to decode decodes on SGLang's decode-side radix path (without it
    # SGLang loses the slots of repeated prompts); decode servers run without a radix cache
    assert "--disaggregation-decode-enable-radix-cache" in pcmd
    assert "--disable-radix-cache" in dcmd
    assert "--disaggregation-decode-enable-radix-cache" not in dcmd
    # CPU servers share the cores: an idle one sleeps instead of spinning (admin jobs wake it)
    assert "--sleep-on-idle" in pcmd and "--sleep-on-idle" in dcmd
    assert d.controller is not None
    ccmd = d.controller.command("py")
    insts = [ccmd[i + 1] for i, a in enumerate(ccmd) if a == "--instance"]
    assert insts == [f"{s.url},{s.bootstrap_port}" for s in d.prefill + d.decode]
    assert ccmd[ccmd.index("--router") + 1] == d.router.url
    assert len(d.peers) == 1 and ccmd[ccmd.index("--attn-peer") + 1] == d.peers[0].address


def test_migration_targets_beside_the_servers(tmp_path: Path) -> None:
    d = deploy.plan_deployment(_args("--prefill", "2", "--no-store", "--layer-migration"),
                               _model(tmp_path))  # fmt: skip
    assert [ls.owner_url for ls in d.layer_servers] == [s.url for s in d.prefill]
    pcmd, dcmd = d.prefill[0].command("py"), d.decode[0].command("py")
    assert "layer_migration" in pcmd[pcmd.index("--banaserve-features") + 1].split(",")
    assert "layer_migration" not in dcmd[dcmd.index("--banaserve-features") + 1].split(",")
    assert d.controller is not None
    ccmd = d.controller.command("py")
    layer = [ccmd[i + 1] for i, a in enumerate(ccmd) if a == "--layer-server"]
    attn = [ccmd[i + 1] for i, a in enumerate(ccmd) if a == "--attn-target"]
    assert layer == [f"{ls.owner_url}={ls.address}" for ls in d.layer_servers]
    assert attn == [f"{u}={p.address}" for u, p in d.attn_targets]
    assert [u for u, _ in d.attn_targets] == [s.url for s in d.prefill + d.decode]
    assert "--calibrate" in ccmd
    # the KV-pressure pool and the targets are different processes
    assert not {p.address for p in d.peers} & {p.address for _, p in d.attn_targets}
    d = deploy.plan_deployment(_args("--no-attn-targets"), _model(tmp_path))
    assert not d.attn_targets and not d.layer_servers
    assert d.controller is not None and "--calibrate" not in d.controller.command("py")


def test_the_router_runs_its_hand_off_path_over_the_store(tmp_path: Path) -> None:
    d = deploy.plan_deployment(_args("--decode", "2"), _model(tmp_path))
    assert d.pool is not None
    rcmd = d.router.command("py")
    assert "--dynaserve-handoff" in rcmd
    assert rcmd[rcmd.index("--handoff-kv-pool") + 1] == d.pool.name
    for argv in (("--no-handoff",), ("--no-store",), ("--baseline", "sglang")):
        d = deploy.plan_deployment(_args("--decode", "2", *argv), _model(tmp_path))
        assert "--dynaserve-handoff" not in d.router.command("py"), argv


def test_baseline_is_the_stock_deployment(tmp_path: Path) -> None:
    d = deploy.plan_deployment(_args("--baseline", "sglang"), _model(tmp_path))
    assert d.router.module == "sglang_router" and d.router.policy == "cache_aware"
    assert d.pool is None and d.controller is None
    cmd = d.prefill[0].command("py") + d.decode[0].command("py")
    assert "--enable-pd-role-switch" not in cmd and "--hicache-storage-backend" not in cmd
    backend = cmd[cmd.index("--disaggregation-transfer-backend") + 1]
    assert backend == ("mooncake" if deploy.mooncake_installed() else "banaserve")
    assert bool(d.notes) == (backend != "mooncake")  # the fallback is said, not silent


def test_impossible_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="at least one"):
        cli.plan(_args("--decode", "0"), _model(tmp_path))
    with pytest.raises(InvalidArgumentError, match="banaserve transfer backend"):
        deploy.plan_deployment(_args("--transfer-backend", "mooncake"), _model(tmp_path))
    with pytest.raises(InvalidArgumentError, match="dtype"):
        deploy.plan_deployment(_args("--dtype", "int3"), _model(tmp_path))
    with pytest.raises(InvalidArgumentError, match="config.json"):
        deploy.plan_deployment(_args(), str(tmp_path / "nowhere"))
    with pytest.raises(InvalidArgumentError, match="needs --no-store"):
        deploy.plan_deployment(_args("--layer-migration"), _model(tmp_path))
    with pytest.raises(InvalidArgumentError, match="not with"):
        deploy.plan_deployment(_args("--layer-migration", "--no-store", "--no-controller"),
                               _model(tmp_path))  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_mooncake_trace_and_keep_prefix_identity(tmp_path: Path) -> None:
    trace = replay.load_trace(
        _write_jsonl(tmp_path / "t.jsonl", [
            {"timestamp": 0, "input_length": 1000, "output_length": 50, "hash_ids": [0, 1]},
            {"timestamp": 500, "input_length": 1024, "output_length": 10, "hash_ids": [0, 2]},
            {"timestamp": 1000, "input_length": 300, "output_length": 5, "hash_ids": [3]},
            {"timestamp": 9000, "input_length": 9, "output_length": 5, "hash_ids": [4]},
        ]),
        limit=3,
    )  # fmt: skip
    assert [t.arrival_s for t in trace] == [0.0, 0.5, 1.0]
    reqs = replay.scale(trace, rate_rps=4.0, length_scale=1 / 16, max_input=1024,
                        max_output=8, vocab_size=1024)  # fmt: skip
    # 3 requests over 1 s is 2 req/s naturally; 4 req/s halves the gaps
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.25, 0.5])
    assert [len(r.input_ids) for r in reqs] == [62, 64, 19]
    assert [r.max_new_tokens for r in reqs] == [8, 8, 5]
    block = 32  # 512 / 16
    assert reqs[0].input_ids[:block] == reqs[1].input_ids[:block]  # shared hash_id 0
    assert reqs[0].input_ids[block:62] != reqs[1].input_ids[block:62]
    assert all(4 <= t < 1024 for r in reqs for t in r.input_ids)


def test_load_azure_csv(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n"
                 "2023-11-16 18:15:50.9951690,396,109\n")  # fmt: skip
    trace = replay.load_trace(p, 10)
    assert [(t.input_len, t.output_len) for t in trace] == [(374, 44), (396, 109)]
    assert trace[1].arrival_s == pytest.approx(4.314579, abs=1e-3)


def test_load_rejects_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InvalidArgumentError):
        replay.load_trace(tmp_path / "x.txt", 5)


def test_replay_without_a_path_replays_the_shipped_slice() -> None:
    assert _args().replay is None
    assert _args("--replay").replay == data.LAUNCH_TRACE
    assert _args("--replay", "t.csv").replay == Path("t.csv")
    assert data.LAUNCH_TRACE.is_file()


def test_missing_trace_fails_before_any_server_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_args("--replay", "/nonexistent/trace.jsonl")) == 2
    assert "trace file not found: /nonexistent/trace.jsonl" in capsys.readouterr().err


def test_real_trace_slice_scales_into_the_tiny_model() -> None:
    trace = replay.load_trace(data.LAUNCH_TRACE, 40)
    reqs = replay.scale(trace, rate_rps=2.0, length_scale=1 / 16, max_input=1024,
                        max_output=32, vocab_size=1024)  # fmt: skip
    assert len(reqs) == 40
    assert max(len(r.input_ids) for r in reqs) <= 1024
    assert reqs[-1].arrival_s == pytest.approx(39 / 2.0)


def test_summarize() -> None:
    rs = [replay.Result(True, 0.1, 1.1, 11), replay.Result(True, 0.3, 0.3, 1),
          replay.Result(False, error="x")]  # fmt: skip
    s = replay.summarize(rs, wall_s=2.0)
    assert s["requests"] == 3 and s["failed"] == 1
    assert s["ttft_mean_s"] == pytest.approx(0.2)
    assert s["tpot_mean_s"] == pytest.approx(0.1)  # only the multi-token request has a TPOT
    assert s["output_tokens_per_s"] == pytest.approx(6.0)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    import os

    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_background_launch_stops_everything_on_sigint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The default deployment (store, 1 prefill, 1 decode, router, controller) started as a
    background job of a non-interactive bash, which starts it with SIGINT *ignored*; ``kill -INT``
    to it: it exits with 130 (interrupted) and no process of any child's group is left."""
    import os
    import signal
    import subprocess
    import time

    from banaserve_ext.launch.servers import group_members

    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    out.touch()
    err.touch()
    probe = (
        f"{sys.executable} -c "
        "'import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)'"
    )
    script = (f"{probe} &\nwait $!\n"  # what any background Python job here inherits
              f"{sys.executable} -m banaserve_ext launch --model {tiny_model_dir} "
              f"--log-dir {tmp_path / 'logs'} --ready-timeout 400 --status-interval 1 "
              f"> {out} 2> {err} &\n"
              "echo $!\nwait $!\necho rc=$?\n")  # fmt: skip
    shell = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    children: list[int] = []
    try:
        inherited = shell.stdout.readline().strip()  # type: ignore[union-attr]
        assert inherited == "True", "bash did not start the job with SIGINT ignored"
        pid = int(shell.stdout.readline())  # type: ignore[union-attr]
        deadline = time.monotonic() + 450
        while not out.read_text().startswith("http://") and time.monotonic() < deadline:
            assert shell.poll() is None, err.read_text()
            time.sleep(1)
        assert out.read_text().startswith("http://127.0.0.1:"), err.read_text()
        children = _children(pid)
        # store, prefill, decode, router, controller, the KV-pressure attention peer and the
        # attention target beside each of the 2 servers: each leads its own group
        assert len(children) == 8, err.read_text()
        assert all(group_members(c) for c in children)
        time.sleep(2.5)  # a status line or two
        os.kill(pid, signal.SIGINT)
        rest, _ = shell.communicate(timeout=120)
        assert rest.strip() == "rc=130", err.read_text()
        log = err.read_text()
        assert "interrupted; shutting down" in log
        assert "banaserve: 1P+1D" in log and "controller on" in log
        assert "banaserve launch: [w" in log  # the live status line
        assert [c for c in children if group_members(c)] == []
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        for c in children:
            if group_members(c):
                os.killpg(c, signal.SIGKILL)

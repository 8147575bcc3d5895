# SPDX-License-Identifier: Apache-2.0
"""``banaserve launch``: deployment planning, trace scaling and metrics (pure parts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from banaserve_ext import data
from banaserve_ext.errors import InvalidArgumentError
from banaserve_ext.launch import cli, replay


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_plan_builds_prefill_and_decode_commands() -> None:
    prefill, decode = cli.plan(_args("--prefill", "2", "--decode", "1"), "/m")
    assert [c.role for c in prefill + decode] == ["prefill", "prefill", "decode"]
    ports = {c.port for c in prefill + decode} | {c.bootstrap_port for c in prefill}
    assert len(ports) == 5  # every server and bootstrap port distinct
    cmd = prefill[0].command("py")
    assert cmd[:3] == ["py", "-m", "banaserve_ext.adapters.sglang.serve_cpu"]
    i = cmd.index("--disaggregation-transfer-backend")
    assert cmd[i + 1] == "banaserve"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--disaggregation-bootstrap-port" in cmd
    assert "--disaggregation-decode-retraction-backup" in decode[0].command("py")
    assert prefill[0].env() == {"SGLANG_HOST_IP": "127.0.0.1"}


def test_plan_rejects_empty_roles() -> None:
    with pytest.raises(InvalidArgumentError):
        cli.plan(_args("--decode", "0"), "/m")


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
def test_launch_stops_every_server_on_ctrl_c(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``banaserve launch`` (1 prefill, 1 decode, router) up and serving; SIGINT (what Ctrl-C
    sends) to the launcher: it exits with 130 (interrupted, the shell convention) and no
    process of any server's or the router's group is left."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from banaserve_ext.launch.servers import group_members

    proc = subprocess.Popen(
        [sys.executable, "-m", "banaserve_ext", "launch", "--model", str(tiny_model_dir),
         "--log-dir", str(tmp_path / "logs"), "--ready-timeout", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    children: list[int] = []
    try:
        url: list[str] = []
        reader = threading.Thread(target=lambda: url.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(450)
        assert url and url[0].startswith("http://127.0.0.1:"), proc.stderr.read() if (
            proc.poll() is not None
        ) else "launcher not ready"  # fmt: skip
        children = _children(proc.pid)
        assert len(children) == 3  # prefill, decode, router: each the leader of its own group
        assert all(group_members(c) for c in children)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        assert "interrupted; shutting down" in proc.stderr.read()  # type: ignore[union-attr]
        assert [c for c in children if group_members(c)] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for c in children:
            if group_members(c):
                os.killpg(c, signal.SIGKILL)

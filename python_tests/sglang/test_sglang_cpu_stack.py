# SPDX-License-Identifier: Apache-2.0
"""What a new user meets first on the CPU SGLang stack: SGLang's own tools run in the venv, the
tiny model answers chat completions, and a server starts without tracebacks in its log."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from banaserve_ext.launch.servers import http_json

pytestmark = pytest.mark.sglang

READY_LINE = "The server is fired up and ready to roll!"


def test_sglang_tools_run_in_the_venv(tiny_model_dir: Path) -> None:
    # SGLang imports torchvision; the venv's .pth (.ci/install-sglang-cpu) lets it import
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.bench_serving", "--help"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--backend" in proc.stdout


def test_tiny_model_has_a_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "the quick brown fox"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<s>user: the quick brown fox\nassistant:"


def test_chat_completion_and_a_start_without_tracebacks(sglang_cluster) -> None:
    cfg, proc = sglang_cluster.server("single")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "the quick brown fox"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    status, out = http_json(f"{cfg.url}/v1/chat/completions", body, timeout_s=120.0)
    assert status == 200, out
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(out["choices"][0]["message"]["content"], str)
    assert 0 < out["usage"]["completion_tokens"] <= 8
    assert out["usage"]["prompt_tokens"] > 0

    # SGLang logs READY_LINE right after its post-warmup GC freeze, which used to fail with a
    # "Connection refused" traceback on every start (cpu_compat.patch_http_server)
    deadline = time.monotonic() + 60
    while READY_LINE not in proc.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {READY_LINE!r} in {proc.log_path}"
        time.sleep(0.5)
    log = proc.log_path.read_text(errors="replace")
    assert "freeze_gc failed" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]

# SPDX-License-Identifier: Apache-2.0
"""The plug-in registration: enum extension (pure) and, with real SGLang, the CLI choice, the
enum member and the get_kv_class hook as SGLang's own loader applies them."""

from __future__ import annotations

import enum
import json
import subprocess
import sys

import pytest

from banaserve_ext.adapters.sglang.plugin import add_enum_member


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def test_add_enum_member_is_a_real_member_and_idempotent() -> None:
    green = add_enum_member(Color, "GREEN", "green")
    assert Color("green") is green is Color.GREEN is Color["GREEN"]
    assert green.name == "GREEN" and isinstance(green, Color)
    assert list(Color)[-1] is green and len(Color) == 3
    assert add_enum_member(Color, "GREEN", "green") is green
    with pytest.raises(ValueError):
        add_enum_member(Color, "VERT", "green")
    with pytest.raises(ValueError):
        add_enum_member(Color, "RED", "rouge")
    assert Color("red") is Color.RED  # existing members untouched


# as sglang.launch_server does: plug-ins first, then the command line (the host layer reads the
# server's arguments from it to select the features)
_PROBE = r"""
import json, sys
from banaserve_ext.adapters.sglang import cpu_compat
cpu_compat.install()
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
args = prepare_server_args(sys.argv[1:])
from sglang.srt.disaggregation import utils
from sglang.srt.plugins.hook_registry import HookRegistry
TB, K = utils.TransferBackend, utils.KVClassType
out = {
    "arg": args.disaggregation_transfer_backend,
    "enum": TB("banaserve").name,
    "classes": {k.name: utils.get_kv_class(TB("banaserve"), k).__module__ + "." +
                utils.get_kv_class(TB("banaserve"), k).__name__ for k in K},
    "mooncake": utils.get_kv_class(TB.MOONCAKE, K.MANAGER).__name__,
    "run_batch_hooks": [h.__module__ + "." + h.__name__ for _, h, _ in HookRegistry._hooks.get(
        "sglang.srt.managers.scheduler.Scheduler.run_batch", [])],
}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.sglang
def test_sglang_loads_the_plugin_and_routes_our_backend(tiny_model_dir) -> None:
    argv = ["--model-path", "x", "--disaggregation-mode", "prefill",
            "--disaggregation-transfer-backend", "banaserve"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=180,
        env={**__import__("os").environ, "SGLANG_PLUGINS": "banaserve"},
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["arg"] == "banaserve" and out["enum"] == "BANASERVE"
    base = "banaserve_ext.adapters.sglang.conn.Banaserve"
    assert out["classes"] == {
        "KVARGS": "sglang.srt.disaggregation.base.conn.KVArgs",
        "MANAGER": base + "KVManager",
        "SENDER": base + "KVSender",
        "RECEIVER": base + "KVReceiver",
        "BOOTSTRAP_SERVER": base + "KVBootstrapServer",
    }
    assert out["mooncake"] == "MooncakeKVManager"  # other backends still go to SGLang
    # the layer-wise overlap wraps the scheduler's run_batch (AROUND; other AROUND hooks on it,
    # e.g. layer migration's, compose with it)
    assert "banaserve_ext.adapters.sglang.layerwise.around_run_batch" in out["run_batch_hooks"]

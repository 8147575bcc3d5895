# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from banaserve_ext import _env, errors


def test_import_does_not_pull_torch_or_sglang() -> None:
    code = (
        "import sys, banaserve_ext, banaserve_ext.errors;"
        "bad=[m for m in ('torch','sglang') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing banaserve_ext pulled in: {proc.stdout}{proc.stderr}"


def test_builtin_bases_let_callers_catch_naturally() -> None:
    assert issubclass(errors.InvalidArgumentError, ValueError)
    assert issubclass(errors.TransferTimeoutError, TimeoutError)
    assert issubclass(errors.UnavailableError, ConnectionError)
    assert str(errors.NotFoundError("peer x")) == "peer x"


def test_env_malformed_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANASERVE_TCP_LANES", "many")
    with pytest.raises(errors.InvalidArgumentError, match="BANASERVE_TCP_LANES"):
        _env.get(_env.TRANSFER_TCP_LANES)
    monkeypatch.setenv("BANASERVE_TCP_LANES", "4")
    assert _env.get(_env.TRANSFER_TCP_LANES) == 4
    monkeypatch.delenv("BANASERVE_TCP_LANES")
    assert _env.get(_env.TRANSFER_TCP_LANES) == 2


def test_env_variables_are_all_banaserve_prefixed() -> None:
    assert _env.VARIABLES
    assert all(name.startswith("BANASERVE_") for name in _env.VARIABLES)


def test_every_env_variable_is_documented_in_contributing() -> None:
    text = (Path(__file__).resolve().parents[2] / "CONTRIBUTING.md").read_text()
    missing = [name for name in _env.VARIABLES if f"| `{name}` |" not in text]
    assert not missing, f"add rows to CONTRIBUTING.md's variable table for {missing}"

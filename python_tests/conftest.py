# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pathlib import Path

import pytest

from banaserve_ext import _env

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data/traces beside the checkout (CI puts it there too)
TRACES_DIR = REPO_ROOT.parent / "shared" / "data" / "traces"


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    if not TRACES_DIR.is_dir():
        pytest.fail(f"trace data not found at {TRACES_DIR} (expected ../shared/data/traces)")
    return TRACES_DIR


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        from banaserve_ext import _core

        info = _core.build_info()
    except ImportError as exc:  # pragma: no cover - reported, then the native tests fail loudly
        info = f"_core not importable: {exc}"
    return [
        f"banaserve_ext._core: {info}",
        f"sanitized run expected: {_env.get(_env.EXPECT_SANITIZED)}",
    ]

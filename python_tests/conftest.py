# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pathlib import Path

import pytest

from banaserve_ext import _env, data


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The full traces (../shared/data/traces beside the checkout; CI has them). Tests that need
    more than the slices shipped in banaserve_ext/data skip without them."""
    root = data.shared_traces_dir()
    if root is None:
        pytest.skip(
            f"needs the full trace data, ../{data.SHARED_TRACES_RELPATH} beside the "
            "checkout (not there)"
        )
    return root


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

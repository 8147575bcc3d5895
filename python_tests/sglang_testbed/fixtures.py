# SPDX-License-Identifier: Apache-2.0
"""pytest fixtures of the test bed (import them into a conftest with ``import *``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster

__all__ = ["sglang_cluster", "tiny_model_dir"]


def _sglang_installed() -> bool:
    # python_tests/sglang/ is a directory on sys.path's parent; look for the real package.
    spec = importlib.util.find_spec("sglang")
    return spec is not None and spec.origin is not None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _sglang_installed():
        pytest.skip("the CPU SGLang stack is not installed (bash .ci/setup --sglang)")
    from banaserve_ext.launch.tiny_model import create_tiny_llama

    return create_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def sglang_cluster(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tiny_model_dir, tmp_path / "logs")
    try:
        yield cluster
    finally:
        cluster.close()

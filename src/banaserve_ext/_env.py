# SPDX-License-Identifier: Apache-2.0
"""The only module that reads ``BANASERVE_*`` environment variables.

Every variable is declared here once, with its type, default and meaning; CONTRIBUTING.md lists
them. Other modules call :func:`get` (or read the typed helpers) and never touch ``os.environ``
for a ``BANASERVE_*`` name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InvalidArgumentError

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    name: str
    parse: Callable[[str], T]
    default: T
    doc: str


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {text!r}")


VARIABLES: dict[str, EnvVar] = {}


def _declare(name: str, parse: Callable[[str], T], default: T, doc: str) -> EnvVar[T]:
    var = EnvVar(name, parse, default, doc)
    VARIABLES[name] = var
    return var


LOG_LEVEL = _declare("BANASERVE_LOG_LEVEL", str, "WARNING", "log level of banaserve_ext loggers")
TRANSFER_BACKEND = _declare(
    "BANASERVE_TRANSFER_BACKEND",
    str,
    "auto",
    "force a transfer backend for every peer (auto|shm|tcp|local); auto picks shm on one host",
)
TRANSFER_TCP_LANES = _declare(
    "BANASERVE_TCP_LANES", int, 2, "persistent TCP connections (lanes) per peer"
)
TRANSFER_THREADS = _declare(
    "BANASERVE_TRANSFER_THREADS", int, 2, "copy worker threads of the shm backend"
)
TRANSFER_TIMEOUT_S = _declare(
    "BANASERVE_TRANSFER_TIMEOUT_S", float, 30.0, "default deadline of one transfer, seconds"
)


BENCH_PEER_PYTHON = _declare(
    "BANASERVE_BENCH_PEER_PYTHON",
    str,
    "",
    "python of a scratch venv holding the peer systems (Mooncake) for the benchmarks",
)
EXPECT_SANITIZED = _declare(
    "BANASERVE_EXPECT_SANITIZED",
    _bool,
    False,
    "set by .ci/sanitizers: the tests then insist that the loaded _core is the ASan/UBSan build",
)


def is_set(var: EnvVar) -> bool:
    """True when ``var`` is present in the environment (even if equal to its default)."""
    return var.name in os.environ


def get(var: EnvVar[T]) -> T:
    """Value of ``var`` from the environment, or its default; a malformed value raises
    :class:`InvalidArgumentError` naming the variable."""
    raw = os.environ.get(var.name)
    if raw is None:
        return var.default
    try:
        return var.parse(raw)
    except ValueError as exc:
        raise InvalidArgumentError(f"environment variable {var.name}={raw!r}: {exc}") from None


TRANSFER_UCX = _declare(
    "BANASERVE_TRANSFER_UCX",
    _bool,
    False,
    "also start the ucx (RDMA) backend by default when it is compiled in; peers that both have it "
    "use it instead of tcp across hosts",
)
SGLANG_CPU_COMPAT = _declare(
    "BANASERVE_SGLANG_CPU_COMPAT",
    _bool,
    False,
    "set by the CPU launcher (python -m banaserve_ext.adapters.sglang.serve_cpu) for its SGLang "
    "processes; turns on adapters/sglang/cpu_compat.py's SGLang patches in the plug-in",
)
SGLANG_FEATURES = _declare(
    "BANASERVE_SGLANG_FEATURES",
    str,
    "",
    "SGLang plug-in: comma list of opt-in features for this server (admin, kv_migration, "
    "layer_migration); the CPU launcher's --banaserve-features sets it (adapters/sglang/host)",
)
SGLANG_LAYERWISE = _declare(
    "BANASERVE_SGLANG_LAYERWISE",
    _bool,
    True,
    "banaserve SGLang backend: stream each layer's KV pages while the next layers of the prefill "
    "compute (adapters/sglang/layerwise.py); 0 sends per prefill chunk after the forward pass",
)
SGLANG_TRANSFER_LOG = _declare(
    "BANASERVE_SGLANG_TRANSFER_LOG",
    _bool,
    False,
    "banaserve SGLang backend: log one INFO line per request on the prefill side with the bytes "
    "sent layer by layer vs per chunk and the layer-wise tail (used by tests and transfer_bench)",
)
SGLANG_TEST_AIDS = _declare(
    "BANASERVE_SGLANG_TEST_AIDS",
    _bool,
    False,
    "tests only: a server with the kv_migration feature also answers the test aid kind "
    "test_kv_hold (takes KV slots away from SGLang's allocator to force a retraction)",
)
SGLANG_FAULT_HOLD_MS = _declare(
    "BANASERVE_SGLANG_FAULT_HOLD_MS",
    int,
    0,
    "tests only: the banaserve prefill side holds a large request's last chunk this long before "
    "posting it (logging 'fault hold: room N'), so a test can kill the decode mid-transfer",
)
SGLANG_FAULT_HOLD_MIN_PAGES = _declare(
    "BANASERVE_SGLANG_FAULT_HOLD_MIN_PAGES",
    int,
    1,
    "tests only: BANASERVE_SGLANG_FAULT_HOLD_MS applies to requests of at least this many pages",
)

# SPDX-License-Identifier: Apache-2.0
"""Data files: the small slices shipped in the wheel and the full traces beside a checkout.

Shipped (``banaserve_ext/data/traces``, see the README there for sources and licenses): the first
300 requests of the Mooncake conversation trace and of both Azure 2023 traces, byte for byte, and
the simulator's fitted cost table. They are enough for ``banaserve launch --replay``, the
simulator's named traces up to 300 requests and the default tests.

Full traces (Mooncake, Azure, ShareGPT lengths, calibration fixtures; about 20 MB) are not
shipped: they are found in ``../shared/data/traces`` beside the checkout (or beside the current
directory), which is where CI puts them. Whatever needs more than a slice says so by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFoundError

#: the directory of the shipped slices (inside the installed package)
EMBEDDED_TRACES_DIR = Path(__file__).resolve().parent / "traces"
#: every shipped slice holds the first this many requests of its trace
SLICE_REQUESTS = 300
#: where the full traces are expected, relative to the directory that holds the checkout
SHARED_TRACES_RELPATH = Path("shared") / "data" / "traces"


@dataclass(frozen=True)
class NamedTrace:
    name: str
    kind: str  # "mooncake" or "azure"
    full: Path  # relative to the full traces' directory
    slice: Path | None  # relative to EMBEDDED_TRACES_DIR; None: only the full trace exists


NAMED_TRACES: dict[str, NamedTrace] = {
    t.name: t
    for t in (
        NamedTrace("mooncake-conv", "mooncake",
                   Path("mooncake_fast25/conversation_trace.jsonl"),
                   Path("mooncake_fast25/conversation_trace.first300.jsonl")),
        NamedTrace("mooncake-synth", "mooncake", Path("mooncake_fast25/synthetic_trace.jsonl"),
                   None),
        NamedTrace("azure-code", "azure", Path("azure_llm_2023/AzureLLMInferenceTrace_code.csv"),
                   Path("azure_llm_2023/AzureLLMInferenceTrace_code.first300.csv")),
        NamedTrace("azure-conv", "azure", Path("azure_llm_2023/AzureLLMInferenceTrace_conv.csv"),
                   Path("azure_llm_2023/AzureLLMInferenceTrace_conv.first300.csv")),
    )
}  # fmt: skip

#: the trace ``banaserve launch --replay`` replays when given no path
LAUNCH_TRACE = EMBEDDED_TRACES_DIR / NAMED_TRACES["mooncake-conv"].slice  # type: ignore[operator]


def shared_traces_dir() -> Path | None:
    """``shared/data/traces`` beside the checkout this package runs from (or beside one of its
    parent directories), else beside the current directory or one of its parents (an installed
    wheel used from a checkout); None when there is none."""
    here = Path(__file__).resolve()
    cwd = Path.cwd().resolve()
    for d in (*here.parents, cwd, *cwd.parents):
        cand = d.parent / SHARED_TRACES_RELPATH
        if cand.is_dir():
            return cand
    return None


def full_trace_path(relpath: str | Path) -> Path:
    """A file of the full traces; NotFoundError saying where it was looked for."""
    root = shared_traces_dir()
    if root is None:
        raise NotFoundError(
            f"full trace data not found: {relpath} needs ../{SHARED_TRACES_RELPATH} beside the "
            "checkout (only small slices are shipped, see banaserve_ext/data/traces/README.md)"
        )
    path = root / relpath
    if not path.is_file():
        raise NotFoundError(f"trace file not found: {path}")
    return path


def named_trace_path(name: str, limit: int | None) -> tuple[str, Path]:
    """(kind, path) of a named trace: the full trace when present, else the shipped slice when
    ``limit`` requests fit in it; NotFoundError naming what is missing otherwise."""
    t = NAMED_TRACES[name]
    if shared_traces_dir() is not None or t.slice is None:
        return t.kind, full_trace_path(t.full)
    if limit is None or limit > SLICE_REQUESTS:
        raise NotFoundError(
            f"trace {name!r}: only its first {SLICE_REQUESTS} requests are shipped and "
            f"{'all' if limit is None else limit} were asked for; the full trace needs "
            f"../{SHARED_TRACES_RELPATH / t.full} beside the checkout"
        )
    return t.kind, EMBEDDED_TRACES_DIR / t.slice


def calibration_dir() -> Path:
    """The simulator's fitted cost table ships with the package (``calibration/derived``)."""
    return EMBEDDED_TRACES_DIR / "calibration"

# SPDX-License-Identifier: Apache-2.0
"""Sustained workloads for the comparison: time windows of the real traces at a target rate,
and shifting-mix workloads that alternate between two real traces every few minutes.

Every workload is defined by its *duration* at the target rate, not by a request count, so a
faster rate means more requests and every system sees the same simulated minutes (long enough
for the controllers' warm-up, persistence and cool-down). A seed picks where in the source the
window starts (real traces keep their own burstiness, rescaled in time to the target rate;
the ShareGPT / arXiv length tables get Poisson arrivals).

=========================  =================================================================
name                       what
=========================  =================================================================
mooncake-conv              Mooncake FAST'25 conversation trace (long prompts, prefix hashes)
azure-conv / azure-code    Azure LLM inference 2023 (Splitwise) conversation / code
sharegpt / arxiv           length tables, Poisson arrivals
shift-azure                Azure code <-> conversation, switching every ``phase_s``
shift-sharegpt-arxiv       ShareGPT <-> arXiv summarisation (long prompts), every ``phase_s``
=========================  =================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import InvalidArgumentError
from .traces import TraceRequest, default_traces_dir, load_lengths_poisson, load_trace

SHIFTS = {
    "shift-azure": ("azure-code", "azure-conv"),
    "shift-sharegpt-arxiv": ("sharegpt", "arxiv"),
}
STATIONARY = ("mooncake-conv", "azure-conv", "azure-code", "sharegpt", "arxiv")
WORKLOADS = STATIONARY + tuple(SHIFTS)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    duration_s: float = 1200.0
    phase_s: float = 240.0


_LENGTHS = {
    "sharegpt": ("sharegpt_lengths", "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"),
    "arxiv": (
        "arxiv_summarization_lengths",
        "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    ),
}


def _source(name: str, seed: int) -> tuple[TraceRequest, ...]:
    """The source as requests with arrival times at its own rate (length tables: 1 req/s,
    Poisson with this seed); the real traces do not depend on the seed."""
    return _load(name, seed if name in _LENGTHS else 0)


@lru_cache(maxsize=16)
def _load(name: str, seed: int) -> tuple[TraceRequest, ...]:
    if name in _LENGTHS:
        d, f = _LENGTHS[name]
        return tuple(load_lengths_poisson(default_traces_dir() / d / f, 1.0, 40_000, seed))
    if name not in STATIONARY:
        raise InvalidArgumentError(
            f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}"
        )
    return tuple(load_trace(name))


def _window(
    src: Sequence[TraceRequest], start: int, rate: float, t0: float, t1: float
) -> tuple[list[tuple[float, TraceRequest]], int]:
    """Requests from ``src[start:]`` (wrapping) with their gaps rescaled to ``rate``, placed
    from ``t0`` until ``t1``; returns them and the next index."""
    n = len(src)
    span = src[-1].arrival_s - src[0].arrival_s
    native = (n - 1) / span if span > 0 else rate
    f = rate / native
    out = []
    t = t0
    i = start % n
    prev = src[i].arrival_s
    while True:
        r = src[i]
        gap = r.arrival_s - prev if r.arrival_s >= prev else 1.0 / native
        t += gap / f
        if t >= t1:
            break
        out.append((t, r))
        prev = r.arrival_s
        i = (i + 1) % n
    return out, i


def build_workload(spec: WorkloadSpec, rate: float, seed: int = 0) -> list[TraceRequest]:
    """``spec.duration_s`` of the workload at ``rate`` req/s (mean)."""
    if rate <= 0 or spec.duration_s <= 0 or spec.phase_s <= 0:
        raise InvalidArgumentError("rate, duration_s and phase_s must be > 0")
    names = SHIFTS.get(spec.name, (spec.name,))
    srcs = [_source(n, seed) for n in names]
    # the seed picks where each source's window starts (a third of the source apart)
    cursors = [(seed * len(s)) // 3 for s in srcs]
    picked: list[tuple[float, TraceRequest]] = []
    if len(srcs) == 1:
        picked, _ = _window(srcs[0], cursors[0], rate, 0.0, spec.duration_s)
    else:
        k, t = 0, 0.0
        while t < spec.duration_s:
            j = k % len(srcs)
            part, cursors[j] = _window(
                srcs[j], cursors[j], rate, t, min(spec.duration_s, t + spec.phase_s)
            )
            picked.extend(part)
            k += 1
            t += spec.phase_s
    return [
        TraceRequest(i, t, r.input_len, r.output_len, r.hash_ids) for i, (t, r) in enumerate(picked)
    ]


def preload(names: Sequence[str], seeds: int) -> None:
    """Read every source once (before worker processes fork, so they share it)."""
    for name in names:
        for src in SHIFTS.get(name, (name,)):
            for seed in range(seeds):
                _source(src, seed)


def mean_lengths(spec: WorkloadSpec) -> tuple[float, float]:
    reqs = build_workload(spec, 1.0)
    return (
        float(np.mean([r.input_len for r in reqs])),
        float(np.mean([r.output_len for r in reqs])),
    )

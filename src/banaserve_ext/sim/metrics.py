# SPDX-License-Identifier: Apache-2.0
"""Latency summaries, SLO attainment and goodput by bisection on the request rate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


def request_latencies(reqs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TTFT s, TPOT s, E2E s) per request; TPOT is NaN for one-token outputs."""
    arr = np.array([r.arrival for r in reqs])
    first = np.array([r.t_first for r in reqs])
    done = np.array([r.t_done for r in reqs])
    out = np.array([r.output_len for r in reqs], dtype=float)
    ttft = first - arr
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (done - first) / (out - 1), np.nan)
    return ttft, tpot, done - arr


def summarize(reqs: Sequence, slo: Slo | None = None) -> dict[str, float]:
    if not reqs:
        raise InvalidArgumentError("no requests to summarize")
    ttft, tpot, e2e = request_latencies(reqs)
    tp = tpot[~np.isnan(tpot)]
    span = max(r.t_done for r in reqs) - min(r.arrival for r in reqs)
    out: dict[str, float] = {"requests": float(len(reqs))}
    for name, v in (("ttft_ms", ttft * 1e3), ("tpot_ms", tp * 1e3), ("e2e_ms", e2e * 1e3)):
        if len(v) == 0:
            continue
        out[f"{name}_mean"] = float(np.mean(v))
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = float(np.percentile(v, q))
    out["throughput_req_s"] = len(reqs) / span if span > 0 else float("nan")
    out["output_tok_s"] = sum(r.output_len for r in reqs) / span if span > 0 else float("nan")
    if slo is not None:
        out["slo_attainment"] = slo_attainment(reqs, slo)
    return out


def slo_attainment(reqs: Sequence, slo: Slo) -> float:
    ttft, tpot, _ = request_latencies(reqs)
    ok = (ttft <= slo.ttft_s) & (np.isnan(tpot) | (tpot <= slo.tpot_s))
    return float(np.mean(ok))


def goodput(run_at_rate: Callable[[float], float], slo: Slo, lo: float, hi: float,
            iters: int = 8) -> float:
    """Largest rate whose SLO attainment is >= ``slo.attainment`` (DistServe's bisection).

    ``run_at_rate(rate)`` simulates the workload at ``rate`` and returns its attainment.
    If ``lo`` fails, lower rates are tried (down to lo/256, else 0 is returned); ``hi`` is
    grown until it fails.
    """
    if not 0 < lo < hi:
        raise InvalidArgumentError(f"need 0 < lo < hi, got {lo}, {hi}")
    for _ in range(4):  # a bursty trace may need a much lower rate: look down first
        if run_at_rate(lo) >= slo.attainment:
            break
        lo, hi = lo / 4, lo
    else:
        return 0.0
    for _ in range(6):
        if run_at_rate(hi) < slo.attainment:
            break
        lo, hi = hi, hi * 2
    else:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if run_at_rate(mid) >= slo.attainment:
            lo = mid
        else:
            hi = mid
    return lo

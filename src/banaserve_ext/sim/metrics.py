# SPDX-License-Identifier: Apache-2.0
"""Latency summaries, SLO attainment and goodput by bisection on the request rate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError

#: how a request is judged (``Slo.mode``)
SLO_MODES = ("tpot", "p99-tbt")


@dataclass(frozen=True)
class Slo:
    """A latency SLO. ``mode="tpot"``: TTFT and the request's mean time per output token (the
    DistServe / semi-PD rule). ``mode="p99-tbt"``: TTFT and the P99 of the request's own
    time-between-tokens gaps <= ``tbt_s`` (DynaServe's 100 ms P99 TBT; Mooncake's TTFT <= 30 s
    with TBT tiers of 100 / 200 / 300 ms). A request meets it when both bounds hold;
    ``attainment`` is the share of requests that must."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9
    mode: str = "tpot"
    tbt_s: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in SLO_MODES:
            raise InvalidArgumentError(f"SLO mode must be one of {SLO_MODES}, got {self.mode!r}")
        if self.mode == "p99-tbt" and not (self.tbt_s or 0) > 0:
            raise InvalidArgumentError("a p99-tbt SLO needs tbt_s > 0")
        if not (self.ttft_s > 0 and self.tpot_s > 0 and 0 < self.attainment <= 1):
            raise InvalidArgumentError("SLO bounds must be > 0 and attainment in (0, 1]")

    @property
    def step_budget_s(self) -> float:
        """The per-iteration time a latency-aware scheduler should stay under."""
        return self.tbt_s if self.mode == "p99-tbt" and self.tbt_s else self.tpot_s


def _p99(g: np.ndarray) -> float:
    n = len(g)
    if n == 0:
        return float("nan")
    if n == 1:
        return float(g[0])
    g = np.sort(g)
    pos = 0.99 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return float(g[lo] + (g[hi] - g[lo]) * (pos - lo))


def tbt_gaps(r) -> np.ndarray:  # noqa: ANN001 - a SimRequest
    """Time between consecutive output tokens of one request (s); empty for one token."""
    t = r.token_times()
    return np.diff(np.asarray(t, dtype=float)) if len(t) > 1 else np.empty(0)


def tbt_stats(reqs: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(per-request P99 TBT s, NaN for one-token outputs; every gap of every request — the
    token-weighted distribution). Vectorised: one pass over the token times, then one sort."""
    n = len(reqs)
    p99 = np.full(n, np.nan)
    # one value array: every request's first-token time, then each instance's step end times;
    # a request's token times are one run from the first part and one run per decode segment
    firsts = np.array([r.t_first for r in reqs], dtype=float)
    parts = [firsts]
    offset: dict[int, int] = {}
    pos = n
    starts: list[int] = []
    lens: list[int] = []
    counts = np.zeros(n, dtype=np.int64)
    for i, r in enumerate(reqs):
        c = 0
        if r.t_first >= 0:
            starts.append(i)
            lens.append(1)
            c = 1
        for inst, a, b in r.segs:
            key = id(inst)
            if key not in offset:
                offset[key] = pos
                arr = np.frombuffer(inst.tok_times, dtype=float).copy()
                parts.append(arr)
                pos += len(arr)
            if b > a:
                starts.append(offset[key] + a)
                lens.append(b - a)
                c += b - a
        counts[i] = c
    total = int(counts.sum())
    if total < 2:
        return p99, np.empty(0)
    values = np.concatenate(parts)
    st = np.asarray(starts, dtype=np.int64)
    ln = np.asarray(lens, dtype=np.int64)
    run_begin = np.cumsum(ln) - ln
    idx = np.arange(total, dtype=np.int64) + np.repeat(st - run_begin, ln)
    t = values[idx]
    ends = np.cumsum(counts)
    keep = np.ones(len(t) - 1, dtype=bool)
    cross = ends[:-1] - 1  # the gap from one request's last token to the next one's first
    keep[cross[(cross >= 0) & (cross < len(keep))]] = False
    gaps = np.diff(t)[keep]
    gcount = np.maximum(counts - 1, 0)
    ids = np.repeat(np.arange(len(reqs), dtype=np.int64), gcount)
    # sort the gaps within each request in one pass: ids are ascending, so sorting
    # id + gap / scale (gap / scale < 1) keeps the requests apart and orders each one's gaps
    scale = float(gaps.max()) * 1.001 + 1e-12 if len(gaps) else 1.0
    srt = (np.sort(ids + gaps / scale) - ids) * scale
    start = np.cumsum(gcount) - gcount
    has = gcount > 0
    pos = 0.99 * (gcount[has] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, gcount[has] - 1)
    base = start[has]
    p99[has] = srt[base + lo] + (srt[base + hi] - srt[base + lo]) * (pos - lo)
    return p99, gaps


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
    p99, gaps = tbt_stats(reqs)
    if len(gaps):
        out["tbt_ms_mean"] = float(np.mean(gaps) * 1e3)
        for q in (50, 90, 99):
            out[f"tbt_ms_p{q}"] = float(np.percentile(gaps, q) * 1e3)  # token-weighted
        ok = p99[~np.isnan(p99)]
        out["req_p99_tbt_ms_p50"] = float(np.percentile(ok, 50) * 1e3)
        out["req_p99_tbt_ms_p90"] = float(np.percentile(ok, 90) * 1e3)
    out["preemptions"] = float(sum(getattr(r, "preemptions", 0) for r in reqs))
    out["throughput_req_s"] = len(reqs) / span if span > 0 else float("nan")
    out["output_tok_s"] = sum(r.output_len for r in reqs) / span if span > 0 else float("nan")
    if slo is not None:
        out["slo_attainment"] = slo_attainment(reqs, slo)
    return out


def slo_attainment(reqs: Sequence, slo: Slo) -> float:
    return attainments(reqs, {"": slo})[""]


def attainments(
    reqs: Sequence, slos: dict[str, Slo], p99: np.ndarray | None = None
) -> dict[str, float]:
    """SLO attainment under several SLOs from one run (the TBT gaps are computed once; pass
    ``p99`` from :func:`tbt_stats` if you have it)."""
    ttft, tpot, _ = request_latencies(reqs)
    out = {}
    for name, slo in slos.items():
        if slo.mode == "p99-tbt":
            if p99 is None:
                p99 = tbt_stats(reqs)[0]
            ok = (ttft <= slo.ttft_s) & (np.isnan(p99) | (p99 <= slo.tbt_s))
        else:
            ok = (ttft <= slo.ttft_s) & (np.isnan(tpot) | (tpot <= slo.tpot_s))
        out[name] = float(np.mean(ok))
    return out


def goodput_from_points(points: Sequence[tuple[float, float]], target: float) -> float:
    """Goodput from (rate, attainment) points on a rate grid: the highest rate before the first
    failing one, linearly interpolated to where attainment crosses ``target``; 0 when the
    lowest rate already fails."""
    pts = sorted(points)
    best = 0.0
    prev = None
    for rate, att in pts:
        if att >= target:
            best = rate
            prev = (rate, att)
            continue
        if prev is not None and prev[1] > att:
            best = prev[0] + (rate - prev[0]) * (prev[1] - target) / (prev[1] - att)
        break
    return best


def goodput(
    run_at_rate: Callable[[float], float], slo: Slo, lo: float, hi: float, iters: int = 8
) -> float:
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

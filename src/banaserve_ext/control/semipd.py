# SPDX-License-Identifier: Apache-2.0
"""semi-PD's SLO-aware SM repartitioning (Algorithm 1 of arXiv 2504.19867), as a plain object.

Every window the runtime reports the observed TTFT and TPOT at the SLO percentile for the
current split ``(x, y)`` (percent of SMs for prefill and decode) and the request rate. The
controller refits ``TTFT(x) = a1/(x - lam) + b1`` and ``TPOT(y) = a2/y + b2`` on the history
and steps the violating phase's share until its estimate meets the SLO (at most ``max_steps``
steps); when both or neither violate, it keeps the split. ``x + y`` stays 100 (the other
share shrinks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgumentError


@dataclass
class SemiPDController:
    ttft_slo_s: float
    tpot_slo_s: float
    step: float = 5.0  # percent of SMs per step
    max_steps: int = 6
    min_share: float = 10.0
    history: int = 32
    samples_x: list[tuple[float, float]] = field(default_factory=list)
    samples_y: list[tuple[float, float]] = field(default_factory=list)
    decisions: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0:
            raise InvalidArgumentError("SLOs must be > 0")
        if not 0 < self.step < 50:
            raise InvalidArgumentError(f"step must be in (0, 50) percent, got {self.step}")

    # -- the latency models ------------------------------------------------------------------
    @staticmethod
    def fit_ttft(samples: list[tuple[float, float]]) -> tuple[float, float, float] | None:
        """(a1, lam, b1) minimising squared error of a1/(x-lam)+b1; None if underdetermined."""
        xs = np.array([s[0] for s in samples], dtype=float)
        ys = np.array([s[1] for s in samples], dtype=float)
        if len(set(xs.tolist())) < 3:
            return None
        best = None
        for lam in np.linspace(0.0, xs.min() * 0.95, 40):
            basis = np.stack([1.0 / (xs - lam), np.ones_like(xs)], axis=1)
            coef, *_ = np.linalg.lstsq(basis, ys, rcond=None)
            if coef[0] < 0:
                continue
            err = float(np.sum((basis @ coef - ys) ** 2))
            if best is None or err < best[0]:
                best = (err, float(coef[0]), float(lam), float(coef[1]))
        return None if best is None else best[1:]

    @staticmethod
    def fit_tpot(samples: list[tuple[float, float]]) -> tuple[float, float] | None:
        ys_ = np.array([s[0] for s in samples], dtype=float)
        t = np.array([s[1] for s in samples], dtype=float)
        if len(set(ys_.tolist())) < 2:
            return None
        basis = np.stack([1.0 / ys_, np.ones_like(ys_)], axis=1)
        coef, *_ = np.linalg.lstsq(basis, t, rcond=None)
        if coef[0] < 0:
            return None
        return float(coef[0]), float(coef[1])

    # -- Algorithm 1 -------------------------------------------------------------------------
    def update(
        self, x: float, ttft_p: float | None, tpot_p: float | None, now_s: float = 0.0
    ) -> float:
        """Observe one window at prefill share ``x`` (percent); return the next share."""
        y = 100.0 - x
        if ttft_p is not None:
            self.samples_x.append((x, ttft_p))
        if tpot_p is not None:
            self.samples_y.append((y, tpot_p))
        del self.samples_x[: -self.history]
        del self.samples_y[: -self.history]
        ttft_bad = ttft_p is not None and ttft_p > self.ttft_slo_s
        tpot_bad = tpot_p is not None and tpot_p > self.tpot_slo_s
        new = x
        if ttft_bad and not tpot_bad:
            fit = self.fit_ttft(self.samples_x)
            for _ in range(self.max_steps):
                new = min(100.0 - self.min_share, new + self.step)
                if fit is None:
                    break  # explore one step, refit next window
                a1, lam, b1 = fit
                if new > lam and a1 / (new - lam) + b1 <= self.ttft_slo_s:
                    break
        elif tpot_bad and not ttft_bad:
            fit2 = self.fit_tpot(self.samples_y)
            for _ in range(self.max_steps):
                new = max(self.min_share, new - self.step)
                if fit2 is None:
                    break
                a2, b2 = fit2
                if a2 / (100.0 - new) + b2 <= self.tpot_slo_s:
                    break
        if new != x:
            self.decisions.append((now_s, new))
        return new

# SPDX-License-Identifier: Apache-2.0
"""Prometheus counters, gauges and histograms in plain dicts, rendered in the text format."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]

DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(key: LabelKey) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in key) + "}"


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    def __init__(self, prefix: str = "banaserve_router") -> None:
        self.prefix = prefix
        self.counters: dict[str, dict[LabelKey, float]] = {}
        self.histograms: dict[str, dict[LabelKey, Histogram]] = {}
        self.help: dict[str, str] = {}
        #: gauges computed at scrape time: name -> callable returning (labels, value) pairs
        self.gauges: dict[str, Callable[[], Iterable[tuple[LabelKey, float]]]] = {}

    def inc(self, name: str, labels: LabelKey = (), value: float = 1.0) -> None:
        series = self.counters.get(name)
        if series is None:
            series = self.counters[name] = {}
        series[labels] = series.get(labels, 0.0) + value

    def observe(self, name: str, labels: LabelKey, value: float) -> None:
        series = self.histograms.get(name)
        if series is None:
            series = self.histograms[name] = {}
        h = series.get(labels)
        if h is None:
            h = series[labels] = Histogram()
        h.observe(value)

    def value(self, name: str, labels: LabelKey = ()) -> float:
        return self.counters.get(name, {}).get(labels, 0.0)

    def render(self) -> str:
        out: list[str] = []
        p = self.prefix
        for name, series in sorted(self.counters.items()):
            if self.help.get(name):
                out.append(f"# HELP {p}_{name} {self.help[name]}")
            out.append(f"# TYPE {p}_{name} counter")
            for key, v in series.items():
                out.append(f"{p}_{name}{_fmt_labels(key)} {v:g}")
        for name, fn in sorted(self.gauges.items()):
            out.append(f"# TYPE {p}_{name} gauge")
            for key, v in fn():
                out.append(f"{p}_{name}{_fmt_labels(key)} {v:g}")
        for name, hseries in sorted(self.histograms.items()):
            out.append(f"# TYPE {p}_{name} histogram")
            for key, h in hseries.items():
                acc = 0
                for bound, c in zip(h.buckets, h.counts[:-1], strict=True):
                    acc += c
                    lk = _fmt_labels((*key, ("le", f"{bound:g}")))
                    out.append(f"{p}_{name}_bucket{lk} {acc}")
                lk = _fmt_labels((*key, ("le", "+Inf")))
                out.append(f"{p}_{name}_bucket{lk} {h.count}")
                out.append(f"{p}_{name}_sum{_fmt_labels(key)} {h.total:g}")
                out.append(f"{p}_{name}_count{_fmt_labels(key)} {h.count}")
        return "\n".join(out) + "\n"

# SPDX-License-Identifier: Apache-2.0
"""Iteration-time models built from the shared calibration data.

A cost model answers one question: how long does one engine iteration take on one instance,
given the batch it runs. The batch is summarised as

* ``prefill_tokens``  N: new prompt tokens computed in this iteration (all chunks together),
* ``prefill_quad``    Q: sum over chunks of ``chunk * (prefix + chunk)`` (attention work),
* ``chunks``          the (chunk, prefix) pairs themselves (table models use them),
* ``n_decode``        B: decode requests (one token each),
* ``decode_ctx``      sum of their context lengths.

Two families, selectable by model and GPU:

* :class:`ProfileCostModel`: a per-layer operator profile (LLMServingSim's format:
  ``dense.csv``, ``attention.csv``, ``per_sequence.csv``), interpolated; the layer time is
  multiplied by the layers an instance holds, so layer migration changes it correctly.
* :class:`FitCostModel`: DistServe-form fits of aiconfigurator's SGLang op tables
  (``derived/opsum_linear_fits.csv``) plus the framework overhead terms fitted by BLIS
  (1.10 x op-sum + 0.126 ms/step + 0.032 ms/layer + 0.0044 ms/request).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InvalidArgumentError, NotFoundError
from .models import ModelSpec

Chunk = tuple[int, int]  # (new tokens, cached prefix tokens)


class CostModel(Protocol):
    layers: int

    def iteration_s(
        self, chunks: Sequence[Chunk], n_decode: int, decode_ctx: int, layer_frac: float = 1.0
    ) -> float: ...

    def decode_step_s(self, n_decode: int, decode_ctx: int, layer_frac: float = 1.0) -> float: ...

    def prefill_s(self, tokens: int, prefix: int = 0, layer_frac: float = 1.0) -> float: ...


def _interp(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """Piecewise-linear interpolation that extrapolates linearly past both ends."""
    if len(xs) == 1:
        return float(ys[0])
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = int(np.searchsorted(xs, x)) - 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float(max(y, 0.0))


def _curve(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted(points)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


class _Table2D:
    """y(a, b) on a scattered grid: for every ``a`` a 1-D curve in ``b``; linear between ``a``s."""

    def __init__(self, rows: list[tuple[float, float, float]]) -> None:
        by_a: dict[float, list[tuple[float, float]]] = defaultdict(list)
        for a, b, y in rows:
            by_a[a].append((b, y))
        self.a = np.array(sorted(by_a), dtype=float)
        self.curves = []
        for a in self.a:
            pts = sorted(by_a[a])
            self.curves.append((np.array([p[0] for p in pts]), np.array([p[1] for p in pts])))

    def __call__(self, a: float, b: float) -> float:
        xs = self.a
        if a <= xs[0] or len(xs) == 1:
            i0 = i1 = 0
        elif a >= xs[-1]:
            i0, i1 = len(xs) - 2, len(xs) - 1
        else:
            i1 = int(np.searchsorted(xs, a))
            i0 = i1 - 1
        y0 = _interp(b, *self.curves[i0])
        if i0 == i1:
            return y0 * (a / xs[0] if xs[0] > 0 and a < xs[0] else 1.0)
        y1 = _interp(b, *self.curves[i1])
        return max(y0 + (y1 - y0) * (a - xs[i0]) / (xs[i1] - xs[i0]), 0.0)


class ProfileCostModel:
    """LLMServingSim-format per-layer profile (times in microseconds, one decoder layer)."""

    _PER_LAYER = (
        "layernorm",
        "qkv_proj",
        "rotary_emb",
        "o_proj",
        "layernorm",
        "gate_up_proj",
        "act_fn",
        "down_proj",
    )

    def __init__(
        self,
        profile_dir: str | Path,
        model: ModelSpec,
        tp: int = 1,
        *,
        step_ms: float = 0.126,
        layer_ms: float = 0.032,
        request_ms: float = 0.0044,
    ) -> None:
        root = Path(profile_dir)
        tdir = root / f"tp{tp}"
        if not tdir.is_dir():
            raise NotFoundError(f"profile {root} has no tp{tp}/ directory (--profile / --tp)")
        self.model = model
        self.layers = model.layers
        # framework overhead the kernel profile does not see (BLIS's vLLM-fitted terms)
        self.step_ms, self.layer_ms, self.request_ms = step_ms, layer_ms, request_ms
        dense: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in _read_csv(tdir / "dense.csv", ("layer", "tokens", "time_us")):
            dense[row[0]].append((float(row[1]), float(row[2])))
        self._dense = {k: _curve(v) for k, v in dense.items()}
        for need in (*self._PER_LAYER, "embedding", "final_layernorm"):
            if need not in self._dense:
                raise InvalidArgumentError(f"{tdir / 'dense.csv'}: no rows for operator {need!r}")
        per_seq: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in _read_csv(tdir / "per_sequence.csv", ("layer", "sequences", "time_us")):
            per_seq[row[0]].append((float(row[1]), float(row[2])))
        self._per_seq = {k: _curve(v) for k, v in per_seq.items()}
        pre, dec = [], []
        mixed: dict[tuple[float, float], list[tuple[float, float]]] = defaultdict(list)
        for row in _read_csv(
            tdir / "attention.csv",
            ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"),
        ):
            c, kp, n, kd, t = (float(x) for x in row)
            if n == 0 and kd == 0 and c > 0:
                pre.append((c, kp, t))
            elif c == 0 and kp == 0 and n > 0:
                dec.append((n, kd, t))
            elif c > 0 and n > 0 and kp == 0:
                mixed[(c, n)].append((kd, t))
        if not pre or not dec:
            raise InvalidArgumentError(
                f"{tdir / 'attention.csv'}: needs prefill-only and decode-only rows"
            )
        self._attn_pre = _Table2D(pre)
        self._attn_dec = _Table2D(dec)
        # a prefill chunk batched with decodes costs more than the two apart (one varlen kernel)
        self._mixed = {k: _curve(v) for k, v in mixed.items()}
        self._mixed_c = np.array(sorted({k[0] for k in mixed}), dtype=float)
        self._mixed_n = np.array(sorted({k[1] for k in mixed}), dtype=float)
        self._cache: dict[tuple, float] = {}

    def _dense_us(self, tokens: int) -> float:
        return sum(_interp(tokens, *self._dense[op]) for op in self._PER_LAYER)

    def _layer_us(self, chunks: Sequence[Chunk], n_decode: int, decode_ctx: int) -> float:
        tokens = n_decode + sum(c for c, _ in chunks)
        t = self._dense_us(tokens)
        for c, p in chunks:
            t += self._attn_pre(c, p)
        if n_decode:
            kd = decode_ctx / n_decode
            t += self._attn_dec(n_decode, kd)
            if chunks and len(self._mixed_c):
                t += self._mixed_penalty(chunks[0][0], n_decode, kd)
        return t

    def _mixed_penalty(self, c: float, n: float, kd: float) -> float:
        """Extra time of (chunk + n decodes) over the two measured apart, interpolated over
        the bracketing (chunk, n) grid points that were profiled."""

        def bracket(xs: np.ndarray, x: float) -> tuple[float, float, float]:
            if x <= xs[0]:
                return xs[0], xs[0], 0.0
            if x >= xs[-1]:
                return xs[-1], xs[-1], 0.0
            i = int(np.searchsorted(xs, x))
            return xs[i - 1], xs[i], (x - xs[i - 1]) / (xs[i] - xs[i - 1])

        c0, c1, fc = bracket(self._mixed_c, c)
        n0, n1, fn = bracket(self._mixed_n, n)
        total, weight = 0.0, 0.0
        for cc, wc in ((c0, 1 - fc), (c1, fc)):
            for nn, wn in ((n0, 1 - fn), (n1, fn)):
                w = wc * wn
                curve = self._mixed.get((cc, nn))
                if w <= 0 or curve is None:
                    continue
                extra = _interp(kd, *curve) - self._attn_pre(cc, 0) - self._attn_dec(nn, kd)
                total += w * max(extra, 0.0)
                weight += w
        return total / weight if weight > 0 else 0.0

    def _head_us(self, tokens: int, seqs: int) -> float:
        t = _interp(tokens, *self._dense["embedding"])
        t += _interp(tokens, *self._dense["final_layernorm"])
        for op in ("lm_head", "sampler"):
            if op in self._per_seq:
                t += _interp(seqs, *self._per_seq[op])
        return t

    def iteration_s(
        self, chunks: Sequence[Chunk], n_decode: int, decode_ctx: int, layer_frac: float = 1.0
    ) -> float:
        tokens = n_decode + sum(c for c, _ in chunks)
        if tokens == 0:
            return 0.0
        seqs = n_decode + len(chunks)
        us = self.layers * layer_frac * self._layer_us(chunks, n_decode, decode_ctx)
        over_ms = self.step_ms + self.layer_ms * self.layers * layer_frac + self.request_ms * seqs
        return (us + self._head_us(tokens, seqs)) / 1e6 + over_ms / 1e3

    def decode_step_s(self, n_decode: int, decode_ctx: int, layer_frac: float = 1.0) -> float:
        return self.iteration_s((), n_decode, decode_ctx, layer_frac)

    def prefill_s(self, tokens: int, prefix: int = 0, layer_frac: float = 1.0) -> float:
        # a long prompt runs as chunks of at most 2048 tokens
        t, done = 0.0, 0
        while done < tokens:
            c = min(2048, tokens - done)
            t += self.iteration_s(((c, prefix + done),), 0, 0, layer_frac)
            done += c
        return t


class FitCostModel:
    """DistServe-form per-iteration fits (ms) plus BLIS overhead terms."""

    def __init__(
        self,
        model: ModelSpec,
        coeffs: dict[str, float],
        *,
        op_factor: float = 1.10,
        step_ms: float = 0.126,
        layer_ms: float = 0.032,
        request_ms: float = 0.0044,
    ) -> None:
        self.model = model
        self.layers = model.layers
        self.c = coeffs
        self.op_factor = op_factor
        self.step_ms, self.layer_ms, self.request_ms = step_ms, layer_ms, request_ms

    def _ms(
        self, n_tok: int, quad: float, n_decode: int, decode_ctx: int, seqs: int, layer_frac: float
    ) -> float:
        c = self.c
        base = 0.0
        op = 0.0
        if n_tok:
            base = c["prefill_a_ms"]
            op += c["prefill_b_ms_per_tok"] * n_tok + max(c["prefill_c_ms_per_tok2"], 0.0) * quad
        if n_decode:
            base = max(base, c["decode_a_ms"])
            op += c["decode_b_ms_per_ctx_tok"] * decode_ctx
            op += max(c["decode_c_ms_per_req"], 0.0) * n_decode
            if n_tok:
                # in a mixed batch the GEMMs are compute-bound: each decode token costs the
                # dense-layer time of one more prefill token (the decode fit's intercept only
                # covers streaming the weights once, which the prefill pays already)
                op += c["prefill_b_ms_per_tok"] * n_decode
        ms = self.op_factor * (base + op) * layer_frac
        return ms + self.step_ms + self.layer_ms * self.layers * layer_frac + self.request_ms * seqs

    def iteration_s(
        self, chunks: Sequence[Chunk], n_decode: int, decode_ctx: int, layer_frac: float = 1.0
    ) -> float:
        n_tok = 0
        quad = 0.0
        for ch, p in chunks:
            n_tok += ch
            quad += ch * (p + ch)
        if n_tok == 0 and n_decode == 0:
            return 0.0
        return self._ms(n_tok, quad, n_decode, decode_ctx, n_decode + len(chunks), layer_frac) / 1e3

    def decode_step_s(self, n_decode: int, decode_ctx: int, layer_frac: float = 1.0) -> float:
        if n_decode == 0:
            return 0.0
        return self._ms(0, 0.0, n_decode, decode_ctx, n_decode, layer_frac) / 1e3

    def prefill_s(self, tokens: int, prefix: int = 0, layer_frac: float = 1.0) -> float:
        return self.iteration_s(((tokens, prefix),), 0, 0, layer_frac)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[list[str]]:
    if not path.is_file():
        raise NotFoundError(f"calibration file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header[: len(columns)]) != columns:
            raise InvalidArgumentError(f"{path}: expected header {','.join(columns)}, got {header}")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if len(row) < len(columns):
                raise InvalidArgumentError(f"{path}:{lineno}: expected {len(columns)} columns")
            rows.append(row)
        return rows


def default_calibration_dir() -> Path:
    """The fitted cost table shipped with the package (a copy of the shared calibration's
    ``derived/opsum_linear_fits.csv``)."""
    from ..data import calibration_dir

    return calibration_dir()


def load_fit_cost_model(
    model: ModelSpec, gpu_table_name: str, tp: int, calibration_dir: str | Path | None = None
) -> FitCostModel:
    """The fitted model for (GPU, model, TP); NotFoundError naming the setting if absent."""
    root = Path(calibration_dir) if calibration_dir else default_calibration_dir()
    path = root / "derived" / "opsum_linear_fits.csv"
    cols = (
        "device",
        "model",
        "tp",
        "prefill_a_ms",
        "prefill_b_ms_per_tok",
        "prefill_c_ms_per_tok2",
        "prefill_max_rel_err",
        "decode_a_ms",
        "decode_b_ms_per_ctx_tok",
        "decode_c_ms_per_req",
        "decode_max_rel_err",
    )
    have = []
    for row in _read_csv(path, cols):
        have.append(f"{row[0]}/{row[1].lower()}/tp{row[2]}")
        if row[0] == gpu_table_name and row[1].lower() == model.name and int(row[2]) == tp:
            coeffs = {k: float(v) for k, v in zip(cols[3:], row[3:], strict=False)}
            return FitCostModel(model, coeffs)
    raise NotFoundError(
        f"no calibration for gpu={gpu_table_name} model={model.name} tp={tp} in {path}; "
        f"available: {', '.join(have)}"
    )

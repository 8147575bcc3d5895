# SPDX-License-Identifier: Apache-2.0
"""Trace loaders: every malformed line is an InvalidArgumentError naming the file and line."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .. import data
from ..errors import InvalidArgumentError, NotFoundError

MOONCAKE_BLOCK_TOKENS = 512


@dataclass
class TraceRequest:
    rid: int
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def default_traces_dir() -> Path:
    """The full traces, ``../shared/data/traces`` beside the checkout (the repo layout and CI's);
    NotFoundError when absent (only slices are shipped: :mod:`banaserve_ext.data`)."""
    root = data.shared_traces_dir()
    if root is None:
        raise NotFoundError(
            f"full trace data not found (expected ../{data.SHARED_TRACES_RELPATH} beside the "
            "checkout; only small slices are shipped, see banaserve_ext/data/traces/README.md)"
        )
    return root


def _open(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"trace file not found: {p}")
    return p


def _pos_int(v: object, what: str, where: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or int(v) != v:
        raise InvalidArgumentError(f"{where}: {what} must be an integer, got {v!r}")
    if int(v) < minimum:
        raise InvalidArgumentError(f"{where}: {what} must be >= {minimum}, got {v!r}")
    return int(v)


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Mooncake FAST'25 JSONL: timestamp (ms), input_length, output_length, hash_ids."""
    p = _open(path)
    out: list[TraceRequest] = []
    with p.open() as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(d, dict):
                raise InvalidArgumentError(f"{where}: expected a JSON object")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in d:
                    raise InvalidArgumentError(f"{where}: missing field {key!r}")
            ts = d["timestamp"]
            if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0:
                raise InvalidArgumentError(f"{where}: timestamp must be a number >= 0, got {ts!r}")
            inp = _pos_int(d["input_length"], "input_length", where)
            outp = _pos_int(d["output_length"], "output_length", where)
            hashes = d.get("hash_ids", [])
            if not isinstance(hashes, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hashes
            ):
                raise InvalidArgumentError(f"{where}: hash_ids must be a list of integers")
            if hashes and len(hashes) != math.ceil(inp / MOONCAKE_BLOCK_TOKENS):
                raise InvalidArgumentError(
                    f"{where}: {len(hashes)} hash_ids for input_length {inp} "
                    f"(expected {math.ceil(inp / MOONCAKE_BLOCK_TOKENS)})"
                )
            out.append(TraceRequest(len(out), ts / 1e3, inp, outp, tuple(hashes)))
    _check_sorted(out, p)
    return out


def load_azure(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Azure LLM inference trace 2023: TIMESTAMP,ContextTokens,GeneratedTokens."""
    p = _open(path)
    out: list[TraceRequest] = []
    t0: datetime | None = None
    with p.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise InvalidArgumentError(
                f"{p}:1: expected header TIMESTAMP,ContextTokens,GeneratedTokens, got {header}"
            )
        for lineno, row in enumerate(reader, start=2):
            if limit is not None and len(out) >= limit:
                break
            where = f"{p}:{lineno}"
            if len(row) != 3:
                raise InvalidArgumentError(f"{where}: expected 3 columns, got {len(row)}")
            try:
                ts = datetime.fromisoformat(row[0].strip()[:26])
                inp, outp = int(row[1]), int(row[2])
            except ValueError as exc:
                raise InvalidArgumentError(f"{where}: {exc}") from None
            if t0 is None:
                t0 = ts
            out.append(TraceRequest(len(out), (ts - t0).total_seconds(), max(inp, 1), max(outp, 1)))
    _check_sorted(out, p)
    return out


def load_lengths_poisson(
    path: str | Path, rate: float, n: int, seed: int = 0
) -> list[TraceRequest]:
    """ShareGPT / arXiv length tables (Vidur format) with Poisson arrivals at ``rate`` req/s."""
    p = _open(path)
    if rate <= 0:
        raise InvalidArgumentError(f"rate must be > 0, got {rate}")
    rows: list[tuple[int, int]] = []
    with p.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[:2] != ["num_prefill_tokens", "num_decode_tokens"]:
            raise InvalidArgumentError(f"{p}:1: expected num_prefill_tokens,num_decode_tokens,...")
        for lineno, row in enumerate(reader, start=2):
            try:
                rows.append((max(int(float(row[0])), 1), max(int(float(row[1])), 1)))
            except (ValueError, IndexError):
                raise InvalidArgumentError(f"{p}:{lineno}: bad length row {row}") from None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows), size=n)
    gaps = rng.exponential(1.0 / rate, size=n)
    t = np.cumsum(gaps) - gaps[0]
    return [TraceRequest(i, float(t[i]), rows[j][0], rows[j][1]) for i, j in enumerate(idx)]


def load_llmservingsim_requests(path: str | Path) -> list[TraceRequest]:
    """LLMServingSim's measured vLLM requests.jsonl (arrival_time wall clock, lengths)."""
    p = _open(path)
    out: list[TraceRequest] = []
    with p.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{where}: not valid JSON ({exc.msg})") from None
            for key in ("arrival_time", "input_toks", "output_toks"):
                if not isinstance(d, dict) or key not in d:
                    raise InvalidArgumentError(f"{where}: missing field {key!r}")
            out.append(
                TraceRequest(
                    len(out),
                    float(d["arrival_time"]),
                    _pos_int(d["input_toks"], "input_toks", where),
                    _pos_int(d["output_toks"], "output_toks", where),
                )
            )
    if not out:
        raise InvalidArgumentError(f"{p}: no requests")
    t0 = min(r.arrival_s for r in out)
    out.sort(key=lambda r: r.arrival_s)
    for i, r in enumerate(out):
        r.arrival_s -= t0
        r.rid = i
    return out


def load_trace(spec: str, limit: int | None = None) -> list[TraceRequest]:
    """By name (``mooncake-conv``, ``mooncake-synth``, ``azure-code``, ``azure-conv``) or path.

    A named trace is read from the full traces when they are beside the checkout, else from the
    shipped slice of its first 300 requests (enough when ``limit`` <= 300)."""
    if spec in data.NAMED_TRACES:
        kind, path = data.named_trace_path(spec, limit)
    else:
        path = Path(spec)
        kind = "azure" if path.suffix == ".csv" else "mooncake"
    if kind == "azure":
        return load_azure(path, limit)
    return load_mooncake(path, limit)


def scale_rate(reqs: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests with inter-arrival times divided by ``factor`` (rate x factor)."""
    if factor <= 0:
        raise InvalidArgumentError(f"rate factor must be > 0, got {factor}")
    return [
        TraceRequest(r.rid, r.arrival_s / factor, r.input_len, r.output_len, r.hash_ids)
        for r in reqs
    ]


def _check_sorted(reqs: list[TraceRequest], p: Path) -> None:
    for i in range(1, len(reqs)):
        if reqs[i].arrival_s < reqs[i - 1].arrival_s:
            raise InvalidArgumentError(
                f"{p}: request {i} arrives before request {i - 1} "
                "(timestamps must be non-decreasing)"
            )

# SPDX-License-Identifier: Apache-2.0
"""``banaserve launch --replay TRACE``: replay a slice of a real trace against a deployment.

Traces (see ../shared/data/traces/README.md): Mooncake FAST'25 JSONL (``timestamp`` ms,
``input_length``, ``output_length``, ``hash_ids`` of 512-token prefix blocks) and Azure LLM 2023
CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``). A real trace does not fit a 2-core box with a
tiny model, so :func:`scale` shrinks it: arrivals are compressed to a target mean rate, lengths
are scaled and capped, and prefix blocks keep their identity (the same ``hash_id`` becomes the
same token block, so prefix reuse survives the scaling). Prompts are token ids, no text.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError

TRACE_BLOCK_TOKENS = 512  # Mooncake hash_ids cover 512-token blocks


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReplayRequest:
    arrival_s: float
    input_ids: list[int]
    max_new_tokens: int


def load_trace(path: str | Path, limit: int) -> list[TraceRequest]:
    """The first ``limit`` requests of a Mooncake JSONL or Azure CSV trace, arrivals from 0."""
    path = Path(path)
    if limit <= 0:
        raise InvalidArgumentError("limit must be positive")
    out: list[TraceRequest] = []
    if path.suffix == ".jsonl":
        with path.open() as f:
            for line in f:
                if len(out) >= limit:
                    break
                if not line.strip():
                    continue
                row = json.loads(line)
                out.append(
                    TraceRequest(
                        float(row["timestamp"]) / 1000.0, int(row["input_length"]),
                        int(row["output_length"]), tuple(int(h) for h in row.get("hash_ids", ())),
                    )
                )  # fmt: skip
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            t0 = None
            for row in csv.DictReader(f):
                if len(out) >= limit:
                    break
                ts = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
                t0 = ts if t0 is None else t0
                out.append(
                    TraceRequest(ts - t0, int(row["ContextTokens"]), int(row["GeneratedTokens"]))
                )
    else:
        raise InvalidArgumentError(f"unknown trace format {path.suffix!r} (.jsonl or .csv)")
    if not out:
        raise InvalidArgumentError(f"no requests in {path}")
    return out


def scale(
    trace: list[TraceRequest],
    *,
    rate_rps: float,
    length_scale: float,
    max_input: int,
    max_output: int,
    vocab_size: int,
    block_tokens: int | None = None,
) -> list[ReplayRequest]:
    """Shrinks a trace to the box: mean arrival rate ``rate_rps``, input lengths times
    ``length_scale`` (at least 1, at most ``max_input``), outputs capped at ``max_output``.

    Token ids are drawn per prefix block from ``hash_id`` (blocks of ``block_tokens``, by default
    512 * length_scale), so requests that share leading hash_ids share their leading tokens; a
    trace without hashes gets a fresh block per request. Ids avoid 0..3 (special tokens)."""
    if rate_rps <= 0 or length_scale <= 0 or vocab_size <= 8:
        raise InvalidArgumentError("rate_rps and length_scale must be > 0, vocab_size > 8")
    block = block_tokens or max(1, round(TRACE_BLOCK_TOKENS * length_scale))
    span = trace[-1].arrival_s - trace[0].arrival_s
    natural = (len(trace) - 1) / span if span > 0 else rate_rps
    stretch = natural / rate_rps
    out = []
    for i, req in enumerate(trace):
        n_in = min(max_input, max(1, round(req.input_len * length_scale)))
        keys = list(req.hash_ids) or [-(i + 1)]
        n_blocks = -(-n_in // block)
        keys = (keys + [-(i + 1) * 100_000 - j for j in range(n_blocks)])[:n_blocks]
        ids: list[int] = []
        for key in keys:
            rng = np.random.default_rng(abs(key) * 2 + (key < 0))
            ids.extend(rng.integers(4, vocab_size, size=block).tolist())
        out.append(
            ReplayRequest(
                (req.arrival_s - trace[0].arrival_s) * stretch, ids[:n_in],
                max(1, min(max_output, req.output_len)),
            )
        )  # fmt: skip
    return out


@dataclass
class Result:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    error: str = ""


def summarize(results: list[Result], wall_s: float) -> dict[str, float]:
    """TTFT and TPOT (mean, p50, p99, seconds) and output throughput (tokens/s)."""
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft_s for r in ok]) if ok else np.zeros(1)
    tpot = np.array(
        [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    )
    tpot = tpot if len(tpot) else np.zeros(1)
    return {
        "requests": float(len(results)),
        "failed": float(len(results) - len(ok)),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_mean_s": float(tpot.mean()),
        "tpot_p50_s": float(np.percentile(tpot, 50)),
        "tpot_p99_s": float(np.percentile(tpot, 99)),
        "output_tokens_per_s": float(sum(r.output_tokens for r in ok) / wall_s) if wall_s else 0.0,
        "wall_s": float(wall_s),
    }


def _one(url: str, req: ReplayRequest, timeout_s: float) -> Result:
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    body = json.dumps(
        {
            "input_ids": req.input_ids,
            "sampling_params": {"max_new_tokens": req.max_new_tokens, "temperature": 0.0,
                                "ignore_eos": True},
            "stream": True,
        }
    )  # fmt: skip
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
        conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return Result(False, error=f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                return Result(False, error=str(chunk["error"])[:300])
            n = int(chunk.get("meta_info", {}).get("completion_tokens", 0))
            if n > 0 and first is None:
                first = time.perf_counter() - start
            tokens = max(tokens, n)
        conn.close()
    except (OSError, ValueError) as exc:
        return Result(False, error=str(exc))
    e2e = time.perf_counter() - start
    return Result(
        tokens > 0, first if first is not None else e2e, e2e, tokens, "" if tokens else "no tokens"
    )


def run(url: str, requests: list[ReplayRequest], timeout_s: float = 300.0) -> list[Result]:
    """Sends each request at its arrival time (one thread each) and collects the results."""
    results: list[Result | None] = [None] * len(requests)
    threads = []
    t0 = time.perf_counter()

    def worker(i: int, req: ReplayRequest) -> None:
        results[i] = _one(url, req, timeout_s)

    for i, req in enumerate(requests):
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=worker, args=(i, req), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout_s)
    return [r if r is not None else Result(False, error="timed out") for r in results]

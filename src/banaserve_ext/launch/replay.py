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


def conversation_slice(
    trace: list[TraceRequest], n: int, *, key_blocks: int = 2, max_turns: int = 4
) -> list[TraceRequest]:
    """``n`` requests of whole conversations, in trace order, arrivals from 0.

    In the Mooncake conversation trace every request shares block 0 (a common system prompt) and
    the turns of one conversation arrive minutes apart, so any window short enough for this box
    holds almost no reuse beyond block 0. A conversation here is the requests whose first
    ``key_blocks`` hash_ids agree; taken in order of first appearance, those with at least two
    turns (at most ``max_turns`` each) until ``n`` requests are collected. Arrival times keep
    their order and spacing (:func:`scale` then compresses them)."""
    if n <= 0 or key_blocks <= 0 or max_turns < 2:
        raise InvalidArgumentError("n and key_blocks must be positive, max_turns >= 2")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, req in enumerate(trace):
        if len(req.hash_ids) >= key_blocks:
            groups.setdefault(req.hash_ids[:key_blocks], []).append(i)
    picked: list[int] = []
    for members in groups.values():  # dicts keep first-appearance order
        if len(members) < 2:
            continue
        picked.extend(members[: min(max_turns, n - len(picked))])
        if len(picked) >= n:
            break
    if len(picked) < 2:
        raise InvalidArgumentError(
            f"no multi-turn conversations in {len(trace)} requests (keyed on the first "
            f"{key_blocks} hash_ids): read more of the trace"
        )
    picked.sort()
    t0 = trace[picked[0]].arrival_s
    return [
        TraceRequest(trace[i].arrival_s - t0, trace[i].input_len, trace[i].output_len,
                     trace[i].hash_ids)
        for i in picked
    ]  # fmt: skip


@dataclass
class Result:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    error: str = ""
    #: from the answer's ``meta_info``: prompt tokens, cached prompt tokens (SGLang's prefix
    #: match on the prefill server, carried to decode with the KV), split by where they were found
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_local: int = 0  # radix tree: device + HiCache host memory (L1 + L2)
    cached_store: int = 0  # HiCache L3: the global KV store


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
    last_meta: dict = {}
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
            meta = chunk.get("meta_info", {})
            n = int(meta.get("completion_tokens", 0))
            if n > 0 and first is None:
                first = time.perf_counter() - start
            tokens = max(tokens, n)
            last_meta = meta or last_meta
        conn.close()
    except (OSError, ValueError) as exc:
        return Result(False, error=str(exc))
    e2e = time.perf_counter() - start
    prompt, cached, local, store = cache_split(last_meta)
    return Result(
        tokens > 0, first if first is not None else e2e, e2e, tokens,
        "" if tokens else "no tokens", prompt, cached, local, store,
    )  # fmt: skip


def cache_split(meta: dict) -> tuple[int, int, int, int]:
    """(prompt, cached, local, store) tokens of one answer's ``meta_info``. SGLang reports
    ``cached_tokens_details`` ``{device, host[, storage]}`` when a hierarchical cache is on and
    only ``cached_tokens`` otherwise (then every cached token is a radix hit: local)."""
    prompt = int(meta.get("prompt_tokens", 0) or 0)
    cached = int(meta.get("cached_tokens", 0) or 0)
    details = meta.get("cached_tokens_details") or {}
    if not isinstance(details, dict) or not details:
        return prompt, cached, cached, 0
    store = int(details.get("storage", 0) or 0)
    local = int(details.get("device", 0) or 0) + int(details.get("host", 0) or 0)
    return prompt, cached, local, store


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


# -- cache and load accounting (server counters around a replay) --------------------------------


def cache_summary(results: list[Result]) -> dict[str, float]:
    """Prefix hits of the successful requests, from SGLang's own per-request counts."""
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    local = sum(r.cached_local for r in ok)
    store = sum(r.cached_store for r in ok)
    return {
        "prompt_tokens": float(prompt),
        "cached_tokens": float(sum(r.cached_tokens for r in ok)),
        "hit_rate": (local + store) / prompt if prompt else 0.0,
        "hit_rate_local": local / prompt if prompt else 0.0,
        "hit_rate_store": store / prompt if prompt else 0.0,
    }


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text exposition -> metric name -> [(labels, value)]. Comments and lines that
    do not parse are skipped (no label value here holds a comma inside quotes that matters)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head and head.endswith("}"):
            name, _, body = head[:-1].partition("{")
            for part in body.split(","):
                k, eq, v = part.partition("=")
                if eq:
                    labels[k.strip()] = v.strip().strip('"')
        try:
            out.setdefault(name.strip(), []).append((labels, float(value)))
        except ValueError:
            continue
    return out


def metric_sum(samples: dict, name: str, **match: str) -> float:
    """Sum of ``name`` over the label sets that agree with ``match``."""
    return sum(v for labels, v in samples.get(name, ())
               if all(labels.get(k) == want for k, want in match.items()))  # fmt: skip


#: per-server counters read around a replay (SGLang with --enable-metrics): tokens each
#: server prefilled, and where its prefix hits came from
SERVER_COUNTERS = {
    "prefill_compute": ("sglang:realtime_tokens_total", {"mode": "prefill_compute"}),
    "prefill_cache": ("sglang:realtime_tokens_total", {"mode": "prefill_cache"}),
    "hit_device": ("sglang:prefill_effective_tokens_total", {"mode": "device_hit"}),
    "hit_host": ("sglang:prefill_effective_tokens_total", {"mode": "host_hit"}),
    "hit_storage": ("sglang:prefill_effective_tokens_total", {"mode": "storage_hit"}),
    "hicache_backup_tokens": ("sglang:backuped_tokens_total", {}),
    "hicache_prefetch_hit_tokens": ("sglang:storage_prefetch_hit_tokens_total", {}),
}
#: the KV store's counters (banaserve pool serve --metrics-port)
POOL_COUNTERS = ("hits", "misses", "exists_hits", "exists_misses", "puts", "put_exists",
                 "put_no_space", "evictions")  # fmt: skip


def _get_text(url: str, timeout_s: float = 5.0) -> str | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError):
        return None


def read_counters(server_urls: list[str], pool_metrics_url: str | None) -> dict:
    """Every server's :data:`SERVER_COUNTERS` (``None`` for a server without ``/metrics``) and
    the store's :data:`POOL_COUNTERS` (``None`` without a store)."""
    servers: dict[str, dict[str, float] | None] = {}
    for url in server_urls:
        text = _get_text(f"{url}/metrics")
        if text is None:
            servers[url] = None
            continue
        samples = parse_prometheus(text)
        servers[url] = {k: metric_sum(samples, name, **match)
                        for k, (name, match) in SERVER_COUNTERS.items()}  # fmt: skip
    pool = None
    if pool_metrics_url:
        text = _get_text(pool_metrics_url)
        if text is not None:
            samples = parse_prometheus(text)
            pool = {k: metric_sum(samples, f"banaserve_kvpool_{k}_total") for k in POOL_COUNTERS}
    return {"servers": servers, "pool": pool}


def counter_delta(before: dict, after: dict) -> dict:
    """``after - before`` of :func:`read_counters` snapshots (a server missing in either: None)."""

    def diff(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return None
        return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b}

    servers = {u: diff(before["servers"].get(u), s) for u, s in after["servers"].items()}
    return {"servers": servers, "pool": diff(before.get("pool"), after.get("pool"))}


def busiest_share(prefill_tokens: dict[str, float]) -> float | None:
    """The busiest prefill worker's tokens over its fair share (total / workers): 1.0 is perfectly
    even, ``len(prefill_tokens)`` is all on one. ``None`` without any tokens."""
    total = sum(prefill_tokens.values())
    if not prefill_tokens or total <= 0:
        return None
    return max(prefill_tokens.values()) / (total / len(prefill_tokens))


def prefill_load(delta: dict, prefill_urls: list[str]) -> dict:
    """Prompt tokens each server prefilled during the replay (computed + cached) and the busiest
    share, over the launch-time prefill servers and any other server that prefilled (a flipped
    one)."""
    tokens: dict[str, float] = {}
    for url, c in delta["servers"].items():
        if c is None:
            continue
        n = c.get("prefill_compute", 0.0) + c.get("prefill_cache", 0.0)
        if url in prefill_urls or n > 0:
            tokens[url] = n
    return {"prefill_tokens": tokens, "busiest_share": busiest_share(tokens)}

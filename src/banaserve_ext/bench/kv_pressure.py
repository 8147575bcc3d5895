# SPDX-License-Identifier: Apache-2.0
"""One KV-pressure phase on a live PD deployment, with or without the live controller.

Shared by the real-SGLang test (python_tests/sglang/test_sglang_kv_pressure.py) and the
benchmark (bench/live/bench_kv_pressure.py). A phase sends every prompt at once through the
router (greedy, ``max_new_tokens`` each) to a deployment whose decode server has a small KV
budget, and, while they run, samples the decode server's ``signals`` (and, with a controller,
ticks it) every ``window_s``. It reports, from the decode server's own cumulative counters
(differences over the phase, so earlier phases do not count):

* ``retracted``: requests SGLang retracted for lack of KV, ``retract_aborted``;
* ``max_waiting``: the most requests seen waiting (queued or retracted) at one sample, and
  ``max_waiting_kv_full``: the same among samples with at least ``FULL`` of the KV in use;
* ``output_tokens``, ``wall_s`` and ``output_tok_s`` (all requests' output tokens over the
  phase's wall time, as the clients saw them);
* ``kv_moved`` / ``kv_back``: the controller's successful ``MigrateKV`` / ``MigrateKVBack``;
* ``failures``: requests that failed or whose output differs from ``reference``;
* ``timeline``: each sample as ``[seconds since the start, running, waiting, KV use]``;
* ``outputs`` (each prompt's output ids, None where it failed) and ``records`` (the
  controller's decision records).

Nothing here decides pass or fail; the caller asserts on what it needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..launch.servers import http_json

ROUTE = "/banaserve/migrate"
#: KV use from which a waiting request counts as waiting for KV
FULL = 0.9


def signals(url: str) -> dict:
    status, body = http_json(f"{url}{ROUTE}", {"kind": "signals"}, timeout_s=10.0)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"signals of {url}: {status} {body}")
    return body


def generate_ids(url: str, input_ids: list[int], max_new_tokens: int,
                 timeout_s: float = 600.0) -> list[int]:  # fmt: skip
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    payload = {"input_ids": input_ids, "sampling_params": sampling}
    deadline = time.monotonic() + 30.0
    while True:
        status, body = http_json(f"{url}/generate", payload, timeout_s=timeout_s)
        if status == 503 and time.monotonic() < deadline:  # the router before workers are ready
            time.sleep(0.5)
            continue
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"/generate answered {status}: {str(body)[:300]}")
        return list(body["output_ids"])


def _frac(s: dict) -> float:
    return int(s["kv_used"]) / max(1, int(s["kv_total"]))


def _point(s: dict) -> list:
    """One sample as ``[seconds since the phase started, running, waiting, KV use]``."""
    return [round(s["phase_s"], 3), int(s.get("running", 0)), int(s.get("waiting", 0)),
            round(_frac(s), 3)]  # fmt: skip


def run_phase(
    router_url: str,
    decode_url: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    reference: dict[tuple[int, ...], list[int]] | None = None,
    tick: Callable[[], list[dict]] | None = None,
    window_s: float = 0.25,
) -> dict[str, Any]:
    """Runs one phase; ``tick`` is the controller's :meth:`LiveController.tick` (None: without
    the controller). Returns the phase's numbers and its decision records."""
    before = signals(decode_url)
    records: list[dict] = []
    samples: list[dict] = []
    failures: list[str] = []
    outputs: dict[int, list[int]] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def observe() -> None:
        while not stop.wait(window_s):
            try:
                samples.append(signals(decode_url) | {"phase_s": time.perf_counter() - t0})
            except RuntimeError:
                continue
            if tick is not None:
                records.extend(tick())

    def one(i: int) -> None:
        p = prompts[i]
        try:
            out = generate_ids(router_url, p, max_new_tokens)
        except (RuntimeError, OSError) as exc:
            with lock:
                failures.append(str(exc))
            return
        with lock:
            outputs[i] = out
            if reference is not None and out != reference[tuple(p)]:
                failures.append(f"output differs for a prompt of {len(p)} tokens: {out[:8]}")

    t0 = time.perf_counter()
    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(prompts)) as ex:
            list(ex.map(one, range(len(prompts))))
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join(120)
    after = signals(decode_url)
    if tick is not None:  # one more window: the controller sees the pressure gone
        records.extend(tick())
    tokens = sum(len(o) for o in outputs.values())
    ok = [r for r in records if r.get("outcome") == "ok"]
    return {
        "controller": tick is not None,
        "requests": len(prompts),
        "max_new_tokens": max_new_tokens,
        "retracted": int(after["retracted"]) - int(before["retracted"]),
        "retract_aborted": int(after["retract_aborted"]) - int(before["retract_aborted"]),
        "max_waiting": max((int(s.get("waiting", 0)) for s in samples), default=0),
        "max_waiting_kv_full": max(
            (int(s.get("waiting", 0)) for s in samples if _frac(s) >= FULL), default=0
        ),
        "max_kv_frac": max((_frac(s) for s in samples), default=0.0),
        "decode_output_tokens": int(after["output_tokens"]) - int(before["output_tokens"]),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "kv_moved": sum(r["action"] == "MigrateKV" for r in ok),
        "kv_back": sum(r["action"] == "MigrateKVBack" for r in ok),
        "failures": failures,
        "timeline": [_point(s) for s in samples],
        "outputs": [outputs.get(i) for i in range(len(prompts))],
        "records": records,
    }

# SPDX-License-Identifier: Apache-2.0
"""Greedy generations with log-probabilities, and how far two of them drift apart: the bf16
tests compare a split run with an unsplit one by the chosen tokens' log-probabilities over the
common prefix of their outputs (after a near-tie flips a token the two are different prompts)."""

from __future__ import annotations

import time

from banaserve_ext.launch.servers import http_json


def generate_logprobs(url: str, ids: list[int], rid: str, new_tokens: int) -> dict:
    payload = {
        "input_ids": ids, "rid": rid, "return_logprob": True,
        "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
    }  # fmt: skip
    status, body = http_json(f"{url}/generate", payload, timeout_s=180)
    assert status == 200 and isinstance(body, dict), (status, body)
    return body


def chosen_logprobs(out: dict) -> list[float]:
    return [float(t[0]) for t in out["meta_info"]["output_token_logprobs"]]


def drift(base: dict, other: dict) -> tuple[int, float]:
    """(length of the outputs' common prefix, max |Δ chosen-token logprob| over that prefix)."""
    a, b = base["output_ids"], other["output_ids"]
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    la, lb = chosen_logprobs(base)[:common], chosen_logprobs(other)[:common]
    return common, max((abs(x - y) for x, y in zip(la, lb, strict=True)), default=0.0)


def wait_until_decoding(url: str, rid: str, tokens: int, timeout_s: float = 60.0) -> None:
    """Polls the admin endpoint's ``status`` until request ``rid`` has ``tokens`` outputs."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, st = http_json(f"{url}/banaserve/migrate", {"kind": "status"})
        assert status == 200 and isinstance(st, dict), (status, st)
        if any(r["rid"] == rid and r["output_len"] >= tokens for r in st["running"]):
            return
        assert time.monotonic() < deadline, f"request {rid} never reached {tokens} tokens"
        time.sleep(0.002)

# SPDX-License-Identifier: Apache-2.0
"""Helpers of the router's hand-off tests: a request through the test client with an optional
forced split point, its SSE events, and the checks of a stitched ``/generate`` answer."""

from __future__ import annotations

import json
from typing import Any

from banaserve_ext.router.handoff import SPLIT_HEADER
from banaserve_ext.router.http11 import build_request


async def post(s: Any, route: str, body: dict, split: int | None = None,
               timeout_s: float = 30.0) -> tuple[int, bytes]:  # fmt: skip
    """POSTs ``body`` through the setup's client; ``split`` forces the hand-off point (the
    router's test header). Returns (status, raw body)."""
    c = s.client
    req = build_request("POST", f"127.0.0.1:{c.port}", route, json.dumps(body).encode(),
                        "application/json")  # fmt: skip
    if split is not None:
        req = req.replace(b"\r\n\r\n", f"\r\n{SPLIT_HEADER}: {split}\r\n\r\n".encode(), 1)
    head, raw = await c.pool.fetch(req, timeout_s)
    return head.status, raw


def sse_events(raw: bytes) -> list[dict]:
    """The JSON events of an SSE body that ends with ``data: [DONE]``."""
    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    return [json.loads(b.strip()[5:]) for b in raw.split(b"\n\n")
            if b.strip().startswith(b"data:") and b.strip()[5:].strip() != b"[DONE]"]  # fmt: skip


async def generate(s: Any, body: dict, split: int | None = None,
                   timeout_s: float = 30.0) -> tuple[int, dict, list[dict]]:  # fmt: skip
    """``/generate``: (status, final answer, stream events — empty when not streaming)."""
    status, raw = await post(s, "/generate", body, split, timeout_s)
    if not body.get("stream") or status != 200:
        return status, json.loads(raw), []
    events = sse_events(raw)
    return status, events[-1], events


def check_stitched(final: dict, events: list[dict], reference: list[int], n_prompt: int) -> None:
    """A stitched answer: ids equal ``reference``; usage adds up; one finish_reason, at the end;
    stream ids grow one by one under one request id."""
    assert final["output_ids"] == reference
    meta = final["meta_info"]
    assert meta["prompt_tokens"] == n_prompt and meta["completion_tokens"] == len(reference)
    assert meta["finish_reason"]["type"] == "length"
    prev: list[int] = []
    for i, ev in enumerate(events):
        ids = ev["output_ids"]
        assert ids[: len(prev)] == prev and len(ids) == len(prev) + 1, (prev, ids)
        prev = ids
        assert (ev["meta_info"]["finish_reason"] is not None) == (i == len(events) - 1)
    if events:
        assert len({ev["meta_info"]["id"] for ev in events}) == 1

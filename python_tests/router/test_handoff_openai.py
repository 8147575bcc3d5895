# SPDX-License-Identifier: Apache-2.0
"""The OpenAI endpoints through the hand-off path, with fake workers over real sockets: the
request runs as ``/generate`` segments and the client gets one OpenAI answer — SSE chunks whose
text and log-prob deltas cover every token once and in order, one ``finish_reason``, a usage
chunk that adds up — across a planned split with a fault, and across a PD live migration."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from handoff_kit import post, sse_events
from router_testkit import eventually, pd_setup, run, single_setup
from test_handoff_pd import received

from banaserve_ext.router.handoff import HandoffConfig
from banaserve_ext.router.handoff_openai import OpenAIView
from banaserve_ext.router.testing import FakeConfig, fake_next_token, fake_tokenize

PROMPT = list(range(70, 90))
TOTAL = 10


async def _post(s: Any, route: str, body: dict, split: int | None = None) -> tuple[int, Any]:
    """(status, body or list of SSE chunks)."""
    status, raw = await post(s, route, body, split)
    if not body.get("stream") or status != 200:
        return status, json.loads(raw)
    return status, sse_events(raw)


def _text(chunks: list[dict], chat: bool) -> str:
    key = "delta" if chat else None
    out = []
    for ch in chunks:
        for choice in ch["choices"]:
            out.append(choice[key].get("content", "") if key else choice["text"])
    return "".join(out)


def _check_chunks(chunks: list[dict], chat: bool, n_prompt: int) -> None:
    """One id; finish_reason once, on the last choice chunk; the usage chunk last, adding up."""
    with_choice = [c for c in chunks if c["choices"]]
    fins = [c["choices"][0]["finish_reason"] for c in with_choice]
    assert fins[-1] == "length" and all(f is None for f in fins[:-1]), fins
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": n_prompt, "completion_tokens": TOTAL, "total_tokens": n_prompt + TOTAL,
    }  # fmt: skip
    if chat:
        assert with_choice[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("fault", ["none", "cut"])
def test_completions_stream_with_logprobs_over_a_split(fault: str) -> None:
    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            s.router.enable_handoff(HandoffConfig())
            b = s.regular[1]
            if fault == "cut":
                s.fleet.worker(b.port).drop_after_tokens = 3
            req = {"model": "m", "prompt": PROMPT, "max_tokens": TOTAL, "temperature": 0,
                   "logprobs": 0, "stream": True,
                   "stream_options": {"include_usage": True}}  # fmt: skip
            status, chunks = await _post(s, "/v1/completions", req, split=len(PROMPT) + 4)
            assert status == 200, chunks
            _check_chunks(chunks, False, len(PROMPT))
            toks = [
                t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]
            ]
            assert len(toks) == TOTAL
            # the fake names a segment's tokens tok0, tok1, ...: each segment's once, in order
            segs = [c for c in chunks if c.get("handoff")][-1]["handoff"]["segments"]
            counts = [g["output_tokens"] for g in segs]
            assert sum(counts) == TOTAL and len(counts) == (2 if fault == "none" else 3)
            want = [f"tok{i}\u00e9" for k in counts for i in range(k)]
            assert toks == want
            whole = dict(req, stream=False)
            status, ans = await _post(s, "/v1/completions", whole, split=len(PROMPT) + 4)
            assert status == 200 and ans["object"] == "text_completion"
            assert ans["usage"]["completion_tokens"] == TOTAL
            assert len(ans["choices"][0]["logprobs"]["token_logprobs"]) == TOTAL
            assert ans["choices"][0]["finish_reason"] == "length"

    run(body())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_moved_off_a_decode_worker_is_one_answer(stream: bool) -> None:
    async def body() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=100.0)
        async with pd_setup(1, 2, fake=fake, disable_health_check=True) as s:
            path = s.router.enable_handoff(HandoffConfig())
            msgs = [{"role": "user", "content": "move me somewhere else, please"}]
            req = {"model": "m", "messages": msgs, "max_tokens": TOTAL, "temperature": 0,
                   "stream": stream, "stream_options": {"include_usage": True}}  # fmt: skip
            task = asyncio.create_task(_post(s, "/v1/chat/completions", req))
            assert await eventually(lambda: any(path.running.get(d.url) for d in s.decode), 10.0)
            d1 = next(d.url for d in s.decode if path.running.get(d.url))
            assert await eventually(lambda: received(path, d1) >= 300, 10.0)
            status, raw = await s.client.post(f"/handoff/migrate?url={d1}", {})
            assert status == 200 and json.loads(raw)["migrated"] == 1
            status, ans = await task
            assert status == 200, ans
            prompt = fake_tokenize({"messages": msgs})
            bodies = [json.loads(e["body"]) for e in s.all_logs("decode")]
            assert bodies[0]["input_ids"] == prompt  # the template's ids, from /tokenize
            k = len(bodies[1]["input_ids"]) - len(prompt)
            ids: list[int] = []
            for _ in range(TOTAL):
                ids.append(fake_next_token(prompt + ids))
            assert 0 < k < TOTAL and bodies[1]["input_ids"] == prompt + ids[:k]
            if stream:
                _check_chunks(ans, True, len(prompt))
                segs = [c for c in ans if c.get("handoff")][-1]["handoff"]["segments"]
                text = _text(ans, True)
            else:
                assert ans["object"] == "chat.completion"
                assert ans["choices"][0]["finish_reason"] == "length"
                assert ans["usage"]["completion_tokens"] == TOTAL
                assert ans["usage"]["prompt_tokens"] == len(prompt)
                segs = ans["handoff"]["segments"]
                text = ans["choices"][0]["message"]["content"]
            assert [g["worker"] for g in segs][0] == d1 and len(segs) == 2
            # the fake's text of a segment: " <c>0 <c>1 ..." per token, counted from 0 again
            assert text.count(" ") == TOTAL

    run(body())


def test_requests_the_translation_cannot_carry_take_the_ordinary_path() -> None:
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    assert OpenAIView.of(chat, {"messages": msgs, "max_tokens": 4}) is not None
    assert OpenAIView.of(chat, {"messages": msgs}) is None  # no length: runs to the context
    assert OpenAIView.of(chat, {"messages": msgs, "max_tokens": 4, "n": 2}) is None
    assert OpenAIView.of(chat, {"messages": msgs, "max_tokens": 4, "tools": [{}]}) is None
    assert OpenAIView.of(chat, {"messages": msgs, "max_tokens": 4, "new_field": 1}) is None
    comp = "/v1/completions"
    assert OpenAIView.of(comp, {"prompt": ["a", "b"]}) is None  # a batch
    assert OpenAIView.of(comp, {"prompt": "a", "echo": True}) is None
    v = OpenAIView.of(comp, {"prompt": "a", "logprobs": 2, "seed": 5, "stop": ["x"]})
    assert v is not None
    assert v.generate["sampling_params"] == {"sampling_seed": 5, "stop": ["x"],
                                             "max_new_tokens": 16}  # fmt: skip
    assert v.generate["return_logprob"] and v.generate["top_logprobs_num"] == 2

    async def body() -> None:
        async with single_setup(2, disable_health_check=True) as s:
            s.router.enable_handoff(HandoffConfig())
            status, ans = await _post(s, chat, {"model": "m", "messages": msgs})
            assert status == 200 and "handoff" not in ans  # the fake's own answer

    run(body())

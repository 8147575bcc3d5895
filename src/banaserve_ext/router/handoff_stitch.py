# SPDX-License-Identifier: Apache-2.0
"""The client's view of a handed-off request, stitched from its segments' ``/generate`` stream
events (:class:`_Stitch`), and the request body of one segment (:func:`segment_body`).

Each segment is one SGLang request that streams cumulative ``output_ids``, ``text`` and
``output_*logprobs`` of its own; the stitch keeps the finished segments' output and presents
every event as one request's: output cumulative over all segments, one request id, one
``finish_reason`` (at the end), ``prompt_tokens`` = the prompt, ``completion_tokens`` = every
output token, log-probs of each output token once and in order, the prompt's input log-probs
from the one segment whose input is exactly the prompt.
"""

from __future__ import annotations

import time
from typing import Any


class _Stitch:
    """The client's view of one handed-off request, built from the segments' stream events."""

    def __init__(self, prompt_tokens: int) -> None:
        self.n = prompt_tokens
        self.produced: list[int] = []  # output tokens of finished or broken segments
        self.text = ""
        self.seg_ids: list[int] = []  # output tokens of the running segment so far
        self.seg_text = ""
        self.last: dict | None = None  # the last event sent to the client
        self.finish: Any = None
        self.info: dict[str, Any] = {"segments": []}
        self.seg: dict[str, Any] = {}  # the running segment's entry in info["segments"]
        self.rid: Any = None  # the first segment's request id: the client's one id
        #: log-probs: ``output_*logprobs`` lists of the finished segments, concatenated; the
        #: running segment's; the client's ``input_*logprobs`` (from the one segment whose input
        #: is exactly the prompt, see :func:`logprob_options`)
        self.lp_done: dict[str, list] = {}
        self.seg_lp: dict[str, list] = {}
        self.input_lp: dict[str, Any] = {}
        self.takes_input_lp = False  # the running segment's input log-probs are the client's
        #: Unix times of the request's arrival and of the last output token received (the SLO
        #: deadlines of its segments, :mod:`.slo`)
        self.arrival = time.time()
        self.last_token_at: float | None = None

    def begin(self) -> None:
        self.produced += self.seg_ids
        self.text += self.seg_text
        for k, v in self.seg_lp.items():
            self.lp_done[k] = self.lp_done.get(k, []) + v
        self.discard()

    def discard(self) -> None:
        """Forget the running segment's output (a prefix-only segment 1's one token)."""
        self.seg_ids, self.seg_text, self.seg_lp = [], "", {}

    def _logprobs(self, meta: dict) -> None:
        for k, v in list(meta.items()):
            if "logprobs" not in k:
                continue
            if k.startswith("output_") and isinstance(v, list):
                self.seg_lp[k] = v
                meta[k] = self.lp_done.get(k, []) + v
            elif k.startswith("input_"):
                if self.takes_input_lp:
                    self.input_lp[k] = v
                meta[k] = self.input_lp.get(k, [] if isinstance(v, list) else v)
        if "output_token_logprobs_length" in meta:
            meta["output_token_logprobs_length"] = len(meta.get("output_token_logprobs") or [])

    def event(self, obj: dict, final: bool) -> dict:
        ids = list(obj.get("output_ids") or [])
        if len(ids) > len(self.seg_ids):
            self.last_token_at = time.time()
        self.seg_ids = ids
        self.seg_text = str(obj.get("text") or "")
        meta = dict(obj.get("meta_info") or {})
        self._logprobs(meta)
        self.seg.update(output_tokens=len(self.seg_ids), reused_tokens=meta.get("cached_tokens"))
        fr = meta.get("finish_reason")
        ended_early = isinstance(fr, dict) and fr.get("type") != "length"
        if fr is not None and (final or ended_early):
            self.finish = fr
        elif fr is not None:
            meta["finish_reason"] = None  # a segment ended, the request goes on
        if self.rid is None:
            self.rid = meta.get("id")
        meta["id"] = self.rid
        meta["prompt_tokens"] = self.n
        meta["completion_tokens"] = len(self.produced) + len(self.seg_ids)
        meta["handoff"] = self.info
        out = dict(obj)
        out["output_ids"] = self.produced + self.seg_ids
        out["text"] = self.text + self.seg_text
        out["meta_info"] = meta
        self.last = out
        return out


_LOGPROB_OPTIONS = ("return_logprob", "logprob_start_len", "top_logprobs_num",
                    "token_ids_logprob", "return_text_in_logprobs")  # fmt: skip


def segment_body(
    obj: dict, input_ids: list[int], sp: dict, st: _Stitch, priority: int | None = None
) -> dict:
    """The request body of one segment: the client's fields, this segment's input and sampling
    parameters, always streaming; ``priority`` (an SLO deadline, :mod:`.slo`) unless the client
    gave its own, which every segment keeps. Log-prob options: a segment whose input is exactly
    the prompt keeps the client's (its input log-probs are the client's); a later one (input =
    prompt + output so far) asks for output log-probs only (no ``logprob_start_len``, so SGLang
    computes no input log-probs and the prefix cache stays usable); a prefix-only segment 1
    asks for none (its one token is discarded)."""
    body = {k: v for k, v in obj.items() if k not in ("text", "input_ids", "stream", "rid")}
    body.update(input_ids=input_ids, sampling_params=sp, stream=True)
    if priority is not None and obj.get("priority") is None:
        body["priority"] = priority
    st.takes_input_lp = False
    if obj.get("return_logprob"):
        if len(input_ids) < st.n:
            for k in _LOGPROB_OPTIONS:
                body.pop(k, None)
        elif len(input_ids) > st.n:
            body.pop("logprob_start_len", None)
        else:
            st.takes_input_lp = True
    return body

# SPDX-License-Identifier: Apache-2.0
"""The OpenAI endpoints (``/v1/completions``, ``/v1/chat/completions``) through the hand-off
path: the request is translated to one ``/generate`` request (token ids, sampling parameters,
log-prob options), served as segments like any other, and the stitched ``/generate`` events are
translated back, so the client sees one OpenAI answer: SSE chunks whose text and log-prob deltas
cover every token once and in order, one ``finish_reason``, ``usage`` adding up; or one
non-streaming body.

A chat request's prompt is its messages through the model's chat template: the router asks a
worker's ``/tokenize`` (SGLang applies the same template as its chat route there). Requests with
fields the translation does not carry take the ordinary path: several prompts or ``n > 1``,
``echo``/``suffix``/``best_of``, tools, ``response_format``, multimodal or reasoning options, a
chat request without ``max_tokens`` (SGLang would run it to the context limit, which the
hand-off cannot split), and any field not listed below.
"""

from __future__ import annotations

import time
from typing import Any

from .payload import CHAT, COMPLETIONS

#: OpenAI field -> SGLang sampling parameter
_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "min_tokens": "min_new_tokens",
    "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens",
    "no_stop_trim": "no_stop_trim", "seed": "sampling_seed", "regex": "regex", "ebnf": "ebnf",
    "logit_bias": "logit_bias",
}  # fmt: skip
#: fields the translation reads itself (or that do not change the answer)
_READ = {"model", "prompt", "messages", "stream", "stream_options", "user", "n", "max_tokens",
         "max_completion_tokens", "logprobs", "top_logprobs", "echo", "rid",
         "chat_template_kwargs", "continue_final_message", "separate_reasoning",
         "stream_reasoning", "parallel_tool_calls", "tool_choice", "priority"}  # fmt: skip
#: SGLang's default completion length of /v1/completions
COMPLETIONS_DEFAULT_MAX = 16


def _falsy(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {} or v == "none"


class OpenAIView:
    """One OpenAI request on the hand-off path: :attr:`generate` is the ``/generate`` request
    it runs as; :meth:`chunks`, :meth:`tail` and :meth:`whole` turn the stitched events into
    the OpenAI answer."""

    def __init__(self, route: str, obj: dict, generate: dict) -> None:
        self.route = route
        self.chat = route == CHAT
        self.obj = obj
        self.generate = generate
        self.created = int(time.time())
        self.model = obj.get("model") or "default"
        self.sent_text = 0
        self.sent_lp = 0
        self.first = True
        opts = obj.get("stream_options")
        self.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        self.want_lp = bool(generate.get("return_logprob"))
        self.top_n = int(generate.get("top_logprobs_num") or 0)

    # -- request -----------------------------------------------------------------------------
    @classmethod
    def of(cls, route: str, obj: Any) -> OpenAIView | None:
        """The view of ``obj``, or None when it must take the ordinary path."""
        if route not in (CHAT, COMPLETIONS) or not isinstance(obj, dict):
            return None
        for k, v in obj.items():
            if k not in _READ and k not in _SAMPLING and not _falsy(v):
                return None
        if int(obj.get("n") or 1) != 1 or obj.get("echo"):
            return None
        if obj.get("tool_choice") not in (None, "none", "auto") or obj.get("json_schema"):
            return None
        gen: dict[str, Any] = {"stream": obj.get("stream") is True}
        sp: dict[str, Any] = {}
        for k, name in _SAMPLING.items():
            if obj.get(k) is not None:
                sp[name] = obj[k]
        max_new = obj.get("max_completion_tokens") or obj.get("max_tokens")
        if route == COMPLETIONS:
            prompt = obj.get("prompt")
            if isinstance(prompt, str) and prompt:
                gen["text"] = prompt
            elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                gen["input_ids"] = prompt
            else:
                return None  # a batch, or nothing
            max_new = max_new if max_new is not None else COMPLETIONS_DEFAULT_MAX
            lp = obj.get("logprobs")
            if lp is not None:
                gen.update(return_logprob=True, top_logprobs_num=int(lp),
                           return_text_in_logprobs=True)  # fmt: skip
        else:
            msgs = obj.get("messages")
            if not isinstance(msgs, list) or not msgs or not isinstance(max_new, int):
                return None
            if obj.get("logprobs"):
                gen.update(return_logprob=True, top_logprobs_num=int(obj.get("top_logprobs") or 0),
                           return_text_in_logprobs=True)  # fmt: skip
        if not isinstance(max_new, int) or max_new < 1:
            return None
        sp["max_new_tokens"] = max_new
        gen["sampling_params"] = sp
        if isinstance(obj.get("rid"), str):
            gen["rid"] = obj["rid"]
        if obj.get("priority") is not None:
            gen["priority"] = obj["priority"]  # the client's: every segment keeps it
        return cls(route, obj, gen)

    def tokenize_request(self) -> dict:
        """The ``/tokenize`` body that gives this request's prompt ids."""
        if not self.chat:
            return {"prompt": self.generate["text"]}
        body: dict[str, Any] = {"messages": self.obj["messages"]}
        for k in ("chat_template_kwargs", "continue_final_message"):
            if self.obj.get(k) is not None:
                body[k] = self.obj[k]
        return body

    # -- answer ------------------------------------------------------------------------------
    def _id(self, meta: dict) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + str(meta.get("id") or "")

    @staticmethod
    def _finish(meta: dict) -> tuple[str | None, Any]:
        fr = meta.get("finish_reason")
        if not isinstance(fr, dict):
            return None, None
        return str(fr.get("type")), fr.get("matched")

    def _logprobs(self, entries: list, tops: list | None) -> dict:
        if self.chat:
            content = []
            for i, e in enumerate(entries):
                tok = str(e[2]) if len(e) > 2 and e[2] is not None else ""
                item: dict[str, Any] = {"token": tok, "bytes": list(tok.encode()),
                                        "logprob": e[0], "top_logprobs": []}  # fmt: skip
                top = tops[i] if tops is not None and i < len(tops) else None
                for t in top or []:
                    tt = str(t[2]) if len(t) > 2 and t[2] is not None else ""
                    item["top_logprobs"].append(
                        {"token": tt, "bytes": list(tt.encode()), "logprob": t[0]}
                    )
                content.append(item)
            return {"content": content}
        out: dict[str, Any] = {
            "tokens": [str(e[2]) if len(e) > 2 and e[2] is not None else "" for e in entries],
            "token_logprobs": [e[0] for e in entries],
            "top_logprobs": [],
            "text_offset": [-1] * len(entries),
        }
        if self.top_n > 0 and tops is not None:
            out["top_logprobs"] = [
                None if t is None else {str(x[2]): x[0] for x in t} for t in tops[: len(entries)]
            ]
        return out

    def _usage(self, meta: dict) -> dict:
        p = int(meta.get("prompt_tokens") or 0)
        c = int(meta.get("completion_tokens") or 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chunks(self, out: dict) -> list[dict]:
        """The OpenAI chunk(s) for one stitched event: the new text and log-probs only."""
        meta = out.get("meta_info") or {}
        text = str(out.get("text") or "")
        delta_text, self.sent_text = text[self.sent_text :], len(text)
        finish, matched = self._finish(meta)
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {"content": delta_text}
            if self.first:
                delta["role"] = "assistant"
            choice["delta"] = delta
        else:
            choice["text"] = delta_text
        choice["logprobs"] = None
        if self.want_lp:
            lps = meta.get("output_token_logprobs") or []
            tops = meta.get("output_top_logprobs")
            new = lps[self.sent_lp :]
            choice["logprobs"] = self._logprobs(
                new, tops[self.sent_lp :] if isinstance(tops, list) else None
            )
            self.sent_lp = len(lps)
        choice["finish_reason"] = finish
        if finish is not None:
            choice["matched_stop"] = matched
        if (
            not delta_text
            and finish is None
            and not self.first
            and not (self.want_lp and choice["logprobs"] and self._has_entries(choice["logprobs"]))
        ):
            return []
        self.first = False
        chunk: dict[str, Any] = {
            "id": self._id(meta), "object": "chat.completion.chunk" if self.chat
            else "text_completion", "created": self.created, "model": self.model,
            "choices": [choice], "usage": None,
        }  # fmt: skip
        if finish is not None:
            chunk["handoff"] = meta.get("handoff")
        return [chunk]

    @staticmethod
    def _has_entries(lp: dict) -> bool:
        return bool(lp.get("content") or lp.get("tokens"))

    def tail(self, last: dict | None) -> list[dict]:
        """After the last event: the usage chunk when the client asked for it."""
        if not self.include_usage or last is None:
            return []
        meta = last.get("meta_info") or {}
        return [{
            "id": self._id(meta), "object": "chat.completion.chunk" if self.chat
            else "text_completion", "created": self.created, "model": self.model,
            "choices": [], "usage": self._usage(meta),
        }]  # fmt: skip

    def whole(self, last: dict) -> dict:
        """The non-streaming answer from the last stitched event."""
        meta = last.get("meta_info") or {}
        text = str(last.get("text") or "")
        finish, matched = self._finish(meta)
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        if self.want_lp:
            tops = meta.get("output_top_logprobs")
            choice["logprobs"] = self._logprobs(
                meta.get("output_token_logprobs") or [], tops if isinstance(tops, list) else None
            )
        choice.update(finish_reason=finish, matched_stop=matched)
        return {
            "id": self._id(meta), "object": "chat.completion" if self.chat
            else "text_completion", "created": self.created, "model": self.model,
            "choices": [choice], "usage": self._usage(meta), "handoff": meta.get("handoff"),
        }  # fmt: skip

# SPDX-License-Identifier: Apache-2.0
"""What the router reads from a request body and from a worker's answers: validation, the
prompt-token estimate, the text cache-aware policies match, batch size, and the load a worker
reports. Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import InvalidArgumentError

json_decode = msgspec.json.decode
json_encode = msgspec.json.encode

GENERATE, COMPLETIONS, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
LLM_ROUTES = (GENERATE, COMPLETIONS, CHAT)


def error_body(message: str, status: int) -> bytes:
    """The JSON error body the router answers with (OpenAI's shape, as SGLang's)."""
    return json_encode({"error": {"message": message, "code": status}})


def validate(route: str, obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "request body must be a JSON object"
    if route == GENERATE:
        text, ids = obj.get("text"), obj.get("input_ids")
        if text is None and ids is None and obj.get("input_embeds") is None:
            return "/generate needs 'text' or 'input_ids'"
        if text is not None and not isinstance(text, (str, list)):
            return "'text' must be a string or a list of strings"
        if ids is not None and not isinstance(ids, list):
            return "'input_ids' must be a list"
        sp = obj.get("sampling_params")
        if sp is not None and not isinstance(sp, dict):
            return "'sampling_params' must be an object"
    elif route == CHAT:
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "/v1/chat/completions needs a non-empty 'messages' list"
        if not all(isinstance(m, dict) for m in msgs):
            return "'messages' must hold objects"
    elif route == COMPLETIONS:
        prompt = obj.get("prompt")
        if not isinstance(prompt, (str, list)):
            return "/v1/completions needs 'prompt' (a string or a list)"
    if "stream" in obj and not isinstance(obj["stream"], bool):
        return "'stream' must be a boolean"
    return None


def count_ids(ids: list) -> int:
    if ids and isinstance(ids[0], list):
        return sum(len(x) for x in ids)
    return len(ids)


def chat_text(messages: Any) -> str:
    parts = []
    for m in messages or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                c.get("text", "")
                for c in content
                if isinstance(c, dict) and isinstance(c.get("text"), str)
            )
    return "".join(parts)


def cache_text(route: str, obj: dict) -> str:
    """The text SGLang's cache_aware matches: ``text`` / the first prompt / the first message."""
    if route == GENERATE:
        t = obj.get("text")
        if isinstance(t, list):
            t = t[0] if t and isinstance(t[0], str) else ""
        return t if isinstance(t, str) else ""
    if route == COMPLETIONS:
        p = obj.get("prompt")
        if isinstance(p, list):
            p = p[0] if p and isinstance(p[0], str) else ""
        return p if isinstance(p, str) else ""
    msgs = obj.get("messages") or []
    return chat_text(msgs[:1])


def batch_size(route: str, obj: dict) -> int:
    if route == GENERATE:
        t, ids = obj.get("text"), obj.get("input_ids")
        if isinstance(t, list):
            return len(t)
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            return len(ids)
        return 1
    if route == COMPLETIONS:
        p = obj.get("prompt")
        if isinstance(p, list) and p and (isinstance(p[0], str) or isinstance(p[0], list)):
            return len(p)
        return 1
    n = obj.get("n")
    return n if isinstance(n, int) and n > 1 else 1


def max_new_tokens(obj: dict) -> int:
    sp = obj.get("sampling_params")
    v = (
        sp.get("max_new_tokens")
        if isinstance(sp, dict)
        else obj.get("max_tokens", obj.get("max_completion_tokens"))
    )
    return v if isinstance(v, int) else 0


def parse_load(data: Any) -> tuple[float, int]:
    """SGLang ``/get_load``: a dict or a list of per-DP-rank dicts with ``num_tokens`` and
    ``num_waiting_reqs``; returns (tokens, waiting requests) summed over ranks."""
    entries = data if isinstance(data, list) else [data]
    tokens = 0.0
    waiting = 0
    for e in entries:
        if isinstance(e, dict):
            tokens += float(e.get("num_tokens", 0) or 0)
            waiting += int(e.get("num_waiting_reqs", 0) or 0)
    return tokens, waiting


def find_kv_capacity(info: Any) -> int:
    """``max_total_num_tokens`` from SGLang server info (top level or ``internal_states``)."""
    if not isinstance(info, dict):
        return 0
    v = info.get("max_total_num_tokens")
    states = info.get("internal_states")
    if v is None and isinstance(states, list) and states and isinstance(states[0], dict):
        v = states[0].get("max_total_num_tokens")
    return int(v) if isinstance(v, (int, float)) and v > 0 else 0


def load_tokenizer(path: str) -> Callable[[str], int]:
    try:
        from tokenizers import Tokenizer  # type: ignore[import-not-found]
    except ImportError:
        raise InvalidArgumentError("--tokenizer-path needs the `tokenizers` package") from None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exception
        raise InvalidArgumentError(f"cannot load tokenizer {path!r}: {exc}") from None
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def prompt_tokens(
    route: str,
    obj: dict,
    counter: Callable[[str], int] | None,
    chars_per_token: float,
) -> int:
    """Prompt tokens of a request: counted ids, else the tokenizer's count of the text, else a
    characters-per-token estimate."""
    ids = obj.get("input_ids")
    if ids is not None:
        return count_ids(ids)
    if route == CHAT:
        text = chat_text(obj.get("messages"))
    elif route == COMPLETIONS:
        prompt = obj.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
            return count_ids(prompt)
        text = (
            prompt
            if isinstance(prompt, str)
            else "".join(p for p in prompt or () if isinstance(p, str))
        )
    else:
        t = obj.get("text")
        text = t if isinstance(t, str) else "".join(x for x in t or () if isinstance(x, str))
    if counter is not None:
        return counter(text)
    return int(len(text) / chars_per_token) + 1

# SPDX-License-Identifier: Apache-2.0
"""Answer bodies on their way to the client: chunk-by-chunk stream forwarding with backpressure
both ways, and merging the prefill leg's input log-probs into the decode leg's answer (plain
JSON or an SSE stream)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from .http11 import LAST_CHUNK, chunk
from .payload import json_decode, json_encode
from .upstream import Exchange, UpstreamConnection

if TYPE_CHECKING:
    from .connection import ClientConnection


class StreamForwarder:
    """Forwards upstream body pieces to the client as HTTP chunks, one write per upstream read
    (the response head and the last chunk ride along when they can); backpressure both ways."""

    __slots__ = ("conn", "upstream", "transform", "buf", "ex", "ended")

    def __init__(
        self,
        conn: ClientConnection,
        upstream: UpstreamConnection,
        ex: Exchange,
        head: bytes,
        transform: Callable[[bytes], bytes] | None,
    ) -> None:
        self.conn = conn
        self.upstream = upstream
        self.ex = ex
        self.transform = transform
        self.buf: list[bytes] = [head]
        self.ended = False

    def piece(self, data: bytes) -> None:
        if self.transform is not None:
            data = self.transform(data)
        if data:
            self.buf.append(chunk(data))

    def flush(self) -> None:
        if self.ex.completed and not self.ended:
            self.ended = True
            self.buf.append(LAST_CHUNK)
        if not self.buf:
            return
        conn = self.conn
        if conn.lost or conn.transport is None:
            self.buf.clear()
            return
        data = self.buf[0] if len(self.buf) == 1 else b"".join(self.buf)
        self.buf.clear()
        conn.transport.write(data)
        if conn.paused and self.upstream.transport is not None and not self.ended:
            self.upstream.transport.pause_reading()
            conn.on_resume.append(_resume(self.upstream))


def _resume(upstream: UpstreamConnection) -> Callable[[], None]:
    def cb() -> None:
        if upstream.transport is not None and not upstream.closed:
            upstream.transport.resume_reading()

    return cb


def _input_logprobs_of(item: Any) -> Any:
    if isinstance(item, dict):
        meta = item.get("meta_info")
        if isinstance(meta, dict):
            return meta.get("input_token_logprobs")
    return None


def merge_logprobs(prefill_body: bytes, decode_body: bytes) -> bytes:
    """Prepend the prefill's ``input_token_logprobs`` to the decode's (non-streaming)."""
    try:
        p = json_decode(prefill_body)
        d = json_decode(decode_body)
    except msgspec.DecodeError:
        return decode_body
    if isinstance(p, list) and isinstance(d, list):
        pairs = list(zip(p, d, strict=False))
    else:
        pairs = [(p, d)]
    changed = False
    for pi, di in pairs:
        pl = _input_logprobs_of(pi)
        if isinstance(pl, list) and isinstance(di, dict) and isinstance(di.get("meta_info"), dict):
            dl = di["meta_info"].get("input_token_logprobs") or []
            di["meta_info"]["input_token_logprobs"] = pl + (dl if isinstance(dl, list) else [])
            changed = True
    return json_encode(d) if changed else decode_body


def prefill_input_logprobs(body: bytes) -> list | None:
    """The ``input_token_logprobs`` of a prefill answer, plain JSON or an SSE stream."""
    text = body.strip()
    candidates = []
    if text.startswith(b"data:") or b"\ndata:" in text:
        for line in text.split(b"\n"):
            line = line.strip()
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                candidates.append(line[5:].strip())
    else:
        candidates.append(text)
    for c in reversed(candidates):
        try:
            lp = _input_logprobs_of(json_decode(c))
        except msgspec.DecodeError:
            continue
        if isinstance(lp, list):
            return lp
    return None


class StreamLogprobMerger:
    """Rewrites SSE ``data:`` events of a decode stream so that their ``input_token_logprobs``
    start with the prefill's; passes everything else through byte for byte."""

    def __init__(self, prefill_lp: list | None) -> None:
        self.prefill_lp = prefill_lp
        self.buf = b""

    def feed(self, piece: bytes) -> bytes:
        if not self.prefill_lp:
            return piece
        self.buf += piece
        out = []
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                break
            event, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
            out.append(self._rewrite(event))
        return b"".join(out)

    def _rewrite(self, event: bytes) -> bytes:
        body = event.strip()
        if not body.startswith(b"data:") or body[5:].strip() == b"[DONE]":
            return event
        try:
            obj = json_decode(body[5:].strip())
        except msgspec.DecodeError:
            return event
        lp = _input_logprobs_of(obj)
        if not isinstance(lp, list):
            return event
        obj["meta_info"]["input_token_logprobs"] = (self.prefill_lp or []) + lp
        return b"data: " + json_encode(obj) + b"\n\n"

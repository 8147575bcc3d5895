# SPDX-License-Identifier: Apache-2.0
"""SLO deadlines as SGLang request priorities for the hand-off path (earliest deadline first).

SGLang's scheduler lets a client shape one thing of batch formation per request: its
``priority``. A server started with ``--enable-priority-scheduling
--schedule-low-priority-values-first`` orders its waiting queue by priority (smaller first, ties
by arrival), so the next prefill batch takes the most urgent requests, and, when its running
batch is full, lets a waiting request preempt running ones whose priority value is larger by
more than ``--priority-scheduling-preemption-threshold``.

The router gives every segment it sends the integer deadline of the segment's next token, in
Unix milliseconds (:func:`deadline_priority`):

- a segment that still has to produce the request's first token (segment 1; a segment 2 after
  a prefix-only segment 1; any continuation before a token reached the client):
  ``arrival + TTFT``;
- a segment that continues a request whose client already has tokens:
  ``last token received + TBT`` (``now + TBT`` when it is sent right after that token; earlier,
  so more urgent, when the router waited for the store or a failed worker first).

So an older request's continuation (due within a TBT) outranks a fresh request's prefill (due
within a TTFT), and among fresh requests the earlier arrival goes first. A request that carries
its own ``priority`` keeps it on every segment. The arithmetic is pure (:func:`segment_deadline`,
:func:`deadline_priority`); :class:`SLOPriorities` adds the one I/O: asking each worker once,
through ``/server_info``, whether it schedules by priority, smaller values first; a worker that
does not gets no SLO priorities (and one warning naming it and the missing flag).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import InvalidArgumentError, UnavailableError
from .http11 import build_request
from .payload import json_decode

if TYPE_CHECKING:
    from .handoff_stitch import _Stitch
    from .registry import Worker

log = logging.getLogger("banaserve_ext.router.handoff")

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class SLOTargets:
    """The latency targets deadlines are derived from, in seconds."""

    ttft_s: float
    tbt_s: float

    @classmethod
    def from_ms(cls, ttft_ms: Any, tbt_ms: Any) -> SLOTargets | None:
        """Targets from the router flags (milliseconds); None when both are unset."""
        if ttft_ms is None and tbt_ms is None:
            return None
        if ttft_ms is None or tbt_ms is None:
            raise InvalidArgumentError(
                "--handoff-slo-ttft-ms and --handoff-slo-tbt-ms go together: give both or neither"
            )
        for flag, v in (("--handoff-slo-ttft-ms", ttft_ms), ("--handoff-slo-tbt-ms", tbt_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidArgumentError(f"{flag} must be a number, got {v!r}")
            if not math.isfinite(v) or v <= 0:
                raise InvalidArgumentError(f"{flag} must be a finite number > 0, got {v!r}")
        return cls(ttft_ms / 1e3, tbt_ms / 1e3)


def segment_deadline(
    targets: SLOTargets, arrival_s: float, tokens_sent: int, last_token_s: float | None
) -> float:
    """When the next token of a segment is due (Unix seconds): ``arrival_s + TTFT`` while the
    client has no token yet (``tokens_sent == 0``), else ``last_token_s + TBT``."""
    if tokens_sent < 0:
        raise InvalidArgumentError(f"tokens_sent must be >= 0, got {tokens_sent}")
    if tokens_sent == 0 or last_token_s is None:
        return arrival_s + targets.ttft_s
    return last_token_s + targets.tbt_s


def deadline_priority(deadline_s: float) -> int:
    """The SGLang priority of a deadline: Unix milliseconds, rounded down, within int64 (what
    SGLang accepts). Smaller is more urgent: the workers must schedule low values first."""
    if not math.isfinite(deadline_s):
        raise InvalidArgumentError(f"deadline must be finite, got {deadline_s!r}")
    return max(INT64_MIN, min(INT64_MAX, math.floor(deadline_s * 1000.0)))


def priority_support(info: dict) -> str | None:
    """None when a worker's ``/server_info`` says it orders by priority, smaller values first;
    else why deadline priorities must not be sent to it."""
    if not info.get("enable_priority_scheduling"):
        why = "runs without --enable-priority-scheduling (SGLang ignores a request's priority"
        if info.get("abort_on_priority_when_disabled"):
            why = ("runs without --enable-priority-scheduling and with --abort-on-priority-"
                   "when-disabled (SGLang would abort every segment with 503")  # fmt: skip
        return why + ")"
    if not info.get("schedule_low_priority_values_first"):
        return ("runs --enable-priority-scheduling without --schedule-low-priority-values-first "
                "(larger values first: deadlines would run latest-first)")  # fmt: skip
    return None


class SLOPriorities:
    """The SLO priority of each segment the hand-off path sends, for the workers it goes to."""

    def __init__(self, targets: SLOTargets) -> None:
        self.targets = targets
        #: worker URL -> the check of its /server_info (True: it takes deadline priorities)
        self._checks: dict[str, asyncio.Future[bool | None]] = {}
        #: worker URL -> why it gets no SLO priorities
        self.refused: dict[str, str] = {}
        self.sent = 0

    def close(self) -> None:
        for fut in self._checks.values():
            fut.cancel()
        self._checks.clear()

    async def for_segment(self, workers: list[Worker], obj: dict, st: _Stitch) -> int | None:
        """The priority of the next segment of ``st`` on ``workers`` (one; a PD leg's prefill
        and decode worker), or None: the client gave its own, or a worker does not order its
        queue by it (sending it there is ignored, aborted, or inverts the order)."""
        if obj.get("priority") is not None:
            return None
        for w in workers:
            if not await self.takes_priorities(w):
                return None
        self.sent += 1
        t = self.targets
        return deadline_priority(segment_deadline(t, st.arrival, len(st.produced),
                                                  st.last_token_at))  # fmt: skip

    async def takes_priorities(self, w: Worker) -> bool:
        """Whether ``w`` schedules by priority, smaller values first (asked once per URL for the
        router's life; asked again next time when the worker could not answer)."""
        fut = self._checks.get(w.url)
        if fut is None:
            fut = asyncio.ensure_future(self._check(w))
            self._checks[w.url] = fut
        ok = await asyncio.shield(fut)
        if ok is None and self._checks.get(w.url) is fut:
            del self._checks[w.url]
        return bool(ok)

    async def _check(self, w: Worker) -> bool | None:
        info: Any = None
        for path in ("/server_info", "/get_server_info"):  # the second: SGLang before 0.5.10
            try:
                head, body = await w.pool.fetch(
                    build_request("GET", w.pool.host_header, path), timeout_s=10.0
                )
            except (OSError, UnavailableError) as exc:
                log.debug("hand-off: cannot ask %s what it schedules by: %s", w.url, exc)
                return None
            if head.status == 200:
                try:
                    info = json_decode(body)
                except msgspec.DecodeError:
                    info = None
                break
        if not isinstance(info, dict):
            log.debug("hand-off: %s gave no server info", w.url)
            return None
        why = priority_support(info)
        if why is not None:
            self.refused[w.url] = why
            log.warning("hand-off: worker %s %s; its segments go without SLO priorities",
                        w.url, why)  # fmt: skip
            return False
        self.refused.pop(w.url, None)
        return True


__all__ = [
    "SLOPriorities",
    "SLOTargets",
    "deadline_priority",
    "priority_support",
    "segment_deadline",
]

# SPDX-License-Identifier: Apache-2.0
"""The layer streams of one request's prefill chunk (:class:`LayerSend`) and a room's transfer
statistics (:class:`RoomStats`), for :mod:`.conn`'s layer-wise path."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ...errors import BanaserveError

logger = logging.getLogger(__name__)


class LayerSend:
    """The layer streams of one request's chunk (one per decode peer), opened before the
    forward pass that computes it. ``positions`` are page positions in SGLang's index_slice
    coordinates; ``pages`` the source pages at those positions."""

    warned_all_late = False

    def __init__(self, mgr: Any, room: int, first_pos: int,
                 pages: npt.NDArray[np.int64], streams: list[Any], layer_nbytes: int,
                 num_layers: int) -> None:  # fmt: skip
        self.mgr = mgr
        self.room = room
        self.positions = (first_pos, first_pos + len(pages))
        self.pages = pages
        self.streams = streams
        self.layer_nbytes = layer_nbytes  # bytes of one layer, all peers together
        self.marked = [False] * num_layers
        self.num_marked = 0
        self.late_layers = 0
        self.t_first: float | None = None
        self.t_last: float | None = None  # when the last layer was marked
        self.t_done: float | None = None  # when every stream completed (the watcher's clock)
        self.done = threading.Event()
        self.queued = False
        self.failed: str | None = None  # set when a layer could not be posted

    def mark(self, layer: int, *, late: bool = False) -> None:
        """Layer ``layer`` is final in the pool: post it to every peer (scheduler thread)."""
        if self.marked[layer]:
            return
        self.marked[layer] = True
        for s in self.streams:
            s.mark_layer_ready(layer)
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.num_marked += 1
        self.late_layers += int(late)
        if self.num_marked == len(self.marked):
            self.t_last = now
            self._watch()

    def finish_forward(self) -> None:
        """The forward pass returned: layers the hook did not see are final now too."""
        if self.failed is not None:
            self.abandon()
            return
        try:
            for layer, marked in enumerate(self.marked):
                if not marked:
                    self.mark(layer, late=True)
        except Exception as exc:
            self.failed = f"layers could not be posted after the forward pass: {exc}"
            self.abandon()
            return
        if self.late_layers == len(self.marked) and not LayerSend.warned_all_late:
            LayerSend.warned_all_late = True
            logger.warning(
                "banaserve: no layer was marked from the attention hook during the forward "
                "pass (hooks not called?); layers are sent after it"
            )

    def abandon(self) -> None:
        for s in self.streams:
            s.cancel()
        self._watch()

    def _watch(self) -> None:
        if not self.queued:
            self.queued = True
            self.mgr._watch_queue.put(self)

    def wait(self, timeout_s: float) -> None:
        if self.failed is not None:
            raise BanaserveError(self.failed)
        if not self.done.is_set() and all(s.state.terminal for s in self.streams):
            if self.t_done is None:  # noticed here before the watcher thread got the GIL
                self.t_done = time.perf_counter()
            self.done.set()
        if not self.done.wait(timeout_s):
            for s in self.streams:
                s.cancel()
            raise TimeoutError(f"layer streams not done after {timeout_s}s")
        for s in self.streams:
            if s.state.name != "DONE":
                raise BanaserveError(f"layer stream ended {s.state.name}")


@dataclass
class RoomStats:
    layer_bytes: int = 0
    late_bytes: int = 0
    chunk_bytes: int = 0
    last: LayerSend | None = None
    seen: set[int] = field(default_factory=set)
    t_first_enqueued: float | None = None  # the room's first chunk handed over by SGLang
    write_s: float = 0.0  # time the per-chunk KV WRITEs took, submit to completion

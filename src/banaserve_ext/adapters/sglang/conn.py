# SPDX-License-Identifier: Apache-2.0
"""The ``banaserve`` PD transfer backend: SGLang's manager/sender/receiver/bootstrap classes on
top of :mod:`banaserve_ext.transfer`.

SGLang's ``Common*`` classes keep doing what is SGLang's business: the HTTP bootstrap server,
rank mapping, per-room poll state machine, status frames, heartbeats and timeouts. This module
adds the data plane and its control messages (:mod:`.wire`):

* every rank runs one :class:`~banaserve_ext.transfer.TransferEngine` on the rank's IP and
  registers its KV and aux buffers; the KV pool is one *layout* (a buffer per layer and K/V,
  pages of equal size), so a chunk is posted as one batch of page indices: the C++ engine does
  the address arithmetic and coalescing (no Python loop per page, layer or token);
* a decode rank sends ``RegisterMsg`` (engine metadata + its layouts) once per prefill rank and a
  ``RequestMsg`` (destination pages, aux slot) per request;
* the prefill rank's transfer thread posts each chunk as an engine WRITE (``shm`` for a peer on
  the same host, ``tcp`` otherwise, chosen by the engine), the aux row with the last chunk, waits
  for completion and then reports Success, or Failed with the reason, over SGLang's status
  channel. Any error on the way becomes ``KVPoll.Failed`` and ``failure_exception()``'s message.

Layer-wise overlap: :mod:`.layerwise` opens, before a prefill forward pass, one engine
``SendStream`` per request and decode peer (:meth:`BanaserveKVManager.open_layer_send`) and marks
each layer ready as the model's attention writes it. When SGLang then hands the chunk over
(``add_transfer_request``), the pages a stream already carries are only waited for and the rest
(e.g. a cached prefix, or everything when the model could not be hooked) is posted per chunk as
before. The aux row still goes last.

SGLang's classes and constants come from the host layer (:mod:`.host`, feature ``pd``):
:func:`build_classes` mixes :class:`ManagerCore` into the base classes of a namespace, SGLang's
for the server, a fake host's in the unit tests (``python_tests/unit/test_sglang_conn_fake.py``).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ... import _env
from ...errors import BanaserveError, InvalidArgumentError
from . import wire
from .layer_send import LayerSend, RoomStats
from .pages import uncovered_ranges

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Peer:
    """A registered decode rank, as the prefill side sees it."""

    peer_id: str
    kv: Any  # PreparedList (remote layout)
    aux: list[Any]
    rejected: str | None = None
    layout: wire.BufferLayout | None = None
    kv_layered: Any = None  # PreparedList of the same buffers in layer order (layer-wise path)


@dataclass
class _Chunk:
    room: int
    kv_indices: npt.NDArray[np.int32]
    index_slice: slice
    is_last: bool
    aux_index: int | None
    wait_event: Any = None
    extra: dict = field(default_factory=dict)
    t_enqueued: float = field(default_factory=time.perf_counter)


class ManagerCore:
    """The banaserve KV manager's logic. The class SGLang instantiates is this mixed into
    SGLang's ``CommonKVManager`` (:func:`manager_class`); ``_sg`` is the namespace of SGLang
    objects it uses (the host's ``pd`` namespace, or a fake host's in the unit tests)."""

    _sg: Any = None
    #: SGLang's runtime role switch (``--enable-pd-role-switch``, ``POST /pd_role_switch``) tears
    #: the manager down with :meth:`teardown` and builds one for the new role
    supports_role_switch = True
    kv_status_msg_tag = wire.TAG_STATUS
    kv_status_msg_carries_reason = True
    reports_transfer_latency = True
    sender_trace_module = None

    @property
    def _poll(self) -> Any:
        return self._sg.KVPoll

    def __init__(
        self,
        args: Any,
        disaggregation_mode: Any,
        server_args: Any,
        is_mla_backend: bool | None = False,
    ) -> None:
        base_init = super().__init__  # SGLang's CommonKVManager (or a fake host's)
        base_init(args, disaggregation_mode, server_args, is_mla_backend)  # type: ignore[call-arg]
        from ...transfer import TransferEngine

        sg = self._sg

        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.session = f"{self.local_ip}:{self.rank_port}"
        self._buffers = wire.kv_layout(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens)
        self._aux_buffers = wire.aux_layouts(
            args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens
        )
        self.transfer_timeout_s = _env.get(_env.TRANSFER_TIMEOUT_S)
        self.engine = TransferEngine(tcp_host=self.local_ip).start()
        self._registrations = [
            self.engine.register(int(p), int(n))
            for p, n in _unique_regions(
                list(args.kv_data_ptrs) + list(args.aux_data_ptrs),
                list(args.kv_data_lens) + list(args.aux_data_lens),
            )
        ]
        self._local_kv = self._prepare(self._buffers)
        self._local_aux = [self._prepare(a) for a in self._aux_buffers]
        if disaggregation_mode == sg.DisaggregationMode.PREFILL:
            self._peers: dict[str, _Peer] = {}
            self._peers_lock = threading.Lock()
            self._queue: queue.Queue = queue.Queue()
            # layer-wise path (enabled by .layerwise once the model is hooked)
            self._layer_order: list[int] | None = None
            self._layer_bpl = 0
            self._local_kv_layered: Any = None
            self._layer_sends: dict[int, list[LayerSend]] = {}
            self._pending: dict[int, int] = {}  # chunks of a room queued for the transfer thread
            self._room_stats: dict[int, RoomStats] = {}
            self._layer_lock = threading.Lock()
            self._watch_queue: queue.Queue = queue.Queue()
            self.counters = {"layer_bytes": 0, "late_layer_bytes": 0, "chunk_bytes": 0,
                             "fallback_requests": 0}  # fmt: skip
            self._log_transfers = _env.get(_env.SGLANG_TRANSFER_LOG)
            self._fault_hold_ms = _env.get(_env.SGLANG_FAULT_HOLD_MS)
            self._spawn("banaserve-prefill-control", self._prefill_control_loop)
            self._spawn("banaserve-prefill-transfer", self._transfer_loop)
            self._spawn("banaserve-prefill-layer-watch", self._watch_loop)
            logger.info(
                "banaserve transfer backend: engine %s on %s, %d KV buffers x %d pages of %d B",
                self.engine.engine_id, self.local_ip, len(self._buffers.bases),
                self._buffers.num_items, self._buffers.item_nbytes,
            )  # fmt: skip
        elif disaggregation_mode == sg.DisaggregationMode.DECODE:
            self._spawn("banaserve-decode-control", self._decode_control_loop)
            self._threads.append(self._start_heartbeat_checker_thread())

    # -- helpers ---------------------------------------------------------------------------
    def _prepare(self, layout: wire.BufferLayout, peer: str | None = None) -> Any:
        return self.engine.prepare_layout(
            np.asarray(layout.bases, dtype=np.uint64), layout.item_nbytes, layout.num_items,
            peer=peer,
        )  # fmt: skip

    def _spawn(self, name: str, target: Any) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- decode side: messages to prefill ----------------------------------------------------
    def build_receiver_registration_message(self) -> list[bytes]:
        return wire.encode(
            wire.TAG_REGISTER,
            wire.RegisterMsg(
                session=self.session,
                engine_metadata=self.engine.metadata(),
                kv=self._buffers,
                aux=self._aux_buffers,
                tp_rank=int(self.kv_args.engine_rank),
                attn_tp_size=int(self.attn_tp_size),
            ),
        )

    def build_receiver_metadata_message(
        self,
        *,
        bootstrap_room: int,
        required_dst_info_num: int,
        kv_indices: npt.NDArray[np.int32],
        aux_index: int | None,
        state_indices: list | None,
        decode_prefix_len: int | None,
        is_dummy: bool,
        device_kv_indices: npt.NDArray[np.int32] | None = None,
    ) -> list[bytes]:
        if state_indices and any(s is not None and len(s) for s in state_indices):
            raise InvalidArgumentError(
                "the banaserve backend moves KV pages and aux rows only; this model also "
                "needs extra state (mamba/SWA/DSA), which it does not transfer"
            )
        return wire.encode(
            wire.TAG_REQUEST,
            wire.RequestMsg(
                room=int(bootstrap_room),
                session=self.session,
                kv_indices=b"" if is_dummy else np.asarray(kv_indices, np.int32).tobytes(),
                aux_index=-1 if is_dummy or aux_index is None else int(aux_index),
                required_dst_info_num=int(required_dst_info_num),
                is_dummy=bool(is_dummy),
                decode_prefix_len=int(decode_prefix_len or 0),
            ),
        )

    def _decode_control_loop(self) -> None:
        recv = self._make_worker_recv(self.server_socket)
        while not self._stopped:
            msg = recv()
            if msg is None or self.handle_abort_ack_message(msg):
                continue
            parsed = self.parse_kv_status_message(msg)
            if parsed is None:
                continue
            room, status, prefill_rank, reason = parsed
            self.apply_prefill_status(
                bootstrap_room=room, status=status, prefill_rank=prefill_rank,
                failure_reason=reason,
            )  # fmt: skip

    # -- prefill side: control ---------------------------------------------------------------
    def _prefill_control_loop(self) -> None:
        recv = self._make_worker_recv(self.server_socket)
        while not self._stopped:
            frames = recv()
            if frames is None:
                continue
            try:
                if frames and frames[0] == self._sg.ABORT_TAG:
                    self._on_abort(frames)
                    continue
                msg = wire.decode(frames)
                if isinstance(msg, wire.RegisterMsg):
                    self._on_register(msg)
                elif isinstance(msg, wire.RequestMsg):
                    self._on_request(msg)
                else:
                    logger.warning("banaserve: dropping unknown control message %r", frames[:1])
            except Exception:  # never let one bad message kill the control thread
                logger.exception("banaserve: control message failed")

    def _on_register(self, msg: wire.RegisterMsg) -> None:
        rejected = None
        try:
            if msg.attn_tp_size != self.attn_tp_size:
                raise InvalidArgumentError(
                    f"decode attention TP {msg.attn_tp_size} != prefill {self.attn_tp_size}; "
                    "the banaserve backend needs equal TP on both sides"
                )
            wire.check_compatible(self._buffers, msg.kv)
            if len(msg.aux) != len(self._aux_buffers):
                self.check_peer_aux_buffer_count(msg.session, len(msg.aux))
            peer_id = self.engine.add_peer(msg.engine_metadata)
            peer = _Peer(
                peer_id,
                self._prepare(msg.kv, peer_id),
                [self._prepare(a, peer_id) for a in msg.aux],
                layout=msg.kv,
            )
            logger.info(
                "banaserve: decode %s registered (engine %s, backend %s)",
                msg.session, peer_id, self.engine.backend_for(peer_id),
            )  # fmt: skip
        except BanaserveError as exc:
            rejected = f"decode {msg.session} rejected at registration: {exc}"
            logger.error("banaserve: %s", rejected)
            peer = _Peer("", None, [], rejected=rejected)
        with self._peers_lock:
            self._peers[msg.session] = peer

    def _on_request(self, msg: wire.RequestMsg) -> None:
        infos = self.transfer_infos.setdefault(msg.room, {})
        infos[msg.session] = msg
        if len(infos) == msg.required_dst_info_num:
            self.req_to_decode_prefix_len[msg.room] = next(
                (i.decode_prefix_len for i in infos.values() if i.decode_prefix_len), 0
            )
            self.update_status(msg.room, self._poll.WaitingForInput)

    def _on_abort(self, frames: list[bytes]) -> None:
        note = self._sg.AbortNotification.from_zmq(frames)
        if note is None:
            return
        status = self.request_status.get(note.room)
        if status is not None and status != self._poll.Success:
            self.record_failure(note.room, "Aborted by the decode side")
            self.update_status(note.room, self._poll.Failed)
        if note.decode_ip is not None and note.decode_port is not None:
            try:
                self._send_multipart_locked(
                    f"tcp://{note.decode_ip}:{note.decode_port}",
                    [self._sg.ABORT_ACK_TAG, str(note.room).encode("ascii")],
                )
            except Exception as exc:
                logger.warning("banaserve: ABORT_ACK for room %s failed: %s", note.room, exc)

    # -- prefill side: layer-wise path -------------------------------------------------------
    def enable_layerwise(self, order: list[int], buffers_per_layer: int) -> None:
        """Called by :mod:`.layerwise` once the model is hooked: ``order`` lists the KV buffers
        (indices into ``kv_args.kv_data_ptrs``) layer by layer, ``buffers_per_layer`` each."""
        if (
            sorted(order) != list(range(len(self._buffers.bases)))
            or buffers_per_layer <= 0
            or (len(order) % buffers_per_layer)
        ):
            raise InvalidArgumentError(
                f"layer order {order} does not cover {len(self._buffers.bases)} KV buffers "
                f"in groups of {buffers_per_layer}"
            )
        self._local_kv_layered = self._prepare(_reordered(self._buffers, order))
        self._layer_bpl = buffers_per_layer
        self._layer_order = list(order)

    def count_fallback(self, why: str) -> None:
        self.counters["fallback_requests"] += 1
        logger.debug("banaserve: request sent per chunk: %s", why)

    def _peer_layered(self, peer: _Peer) -> Any:
        if peer.kv_layered is None and peer.layout is not None and self._layer_order:
            peer.kv_layered = self._prepare(_reordered(peer.layout, self._layer_order),
                                            peer.peer_id)  # fmt: skip
        return peer.kv_layered

    def open_layer_send(self, room: int, pages: npt.NDArray[np.int64], first_pos: int,
                        num_layers: int) -> LayerSend | None:  # fmt: skip
        """Opens the layer streams of one request's chunk (scheduler thread, before the forward
        pass); None when this request goes per chunk (destination or peer not known yet)."""
        if self._layer_order is None or num_layers * self._layer_bpl != len(self._layer_order):
            return None
        infos = self.transfer_infos.get(room)
        if (
            not infos
            or self.request_status.get(room) == self._poll.Failed
            or any(len(infos) != i.required_dst_info_num for i in infos.values())
        ):
            self.count_fallback("destination unknown at forward time")
            return None
        targets = []
        for session, info in list(infos.items()):
            if info.is_dummy:
                continue
            with self._peers_lock:
                peer = self._peers.get(session)
            if peer is None or peer.rejected or self._peer_layered(peer) is None:
                self.count_fallback("decode peer not registered")
                return None
            try:
                src, dst = wire.chunk_indices(
                    pages, info.dst_kv_indices(), slice(first_pos, first_pos + len(pages)),
                    self._prefix_pages(info),
                )  # fmt: skip
            except InvalidArgumentError as exc:
                self.count_fallback(str(exc))
                return None
            if len(src):
                targets.append((peer, src, dst))
        if not targets:
            return None
        streams = [
            self.engine.open_stream(
                secrets.randbits(63) | 1, num_layers, self._local_kv_layered, src,
                peer.kv_layered, dst, buffers_per_layer=self._layer_bpl,
                timeout_s=self.transfer_timeout_s,
            )
            for peer, src, dst in targets
        ]  # fmt: skip
        layer_nbytes = sum(len(src) for _, src, _ in targets) * self._buffers.item_nbytes
        send = LayerSend(self, room, first_pos, pages, streams,
                          layer_nbytes * self._layer_bpl, num_layers)  # fmt: skip
        with self._layer_lock:
            stale_rooms = [r for r in self._layer_sends if r != room and (
                r not in self.request_status or self.request_status[r] == self._poll.Failed
            )]  # fmt: skip
            for stale in stale_rooms:
                for old in self._layer_sends.pop(stale):
                    old.abandon()
                self._room_stats.pop(stale, None)
            self._layer_sends.setdefault(room, []).append(send)
        return send

    def _watch_loop(self) -> None:
        """Stamps each layer send's completion as soon as its streams finish."""
        while True:
            send = self._watch_queue.get()
            if send is _STOP:
                return
            for s in send.streams:
                s.wait(None if self.transfer_timeout_s is None else self.transfer_timeout_s * 2)
            send.t_done = time.perf_counter()
            send.done.set()

    def _covered(self, chunk: _Chunk) -> tuple[list[LayerSend], list[tuple[int, int]]]:
        """Layer sends that carry pages of ``chunk`` (same source pages at the same positions)
        and the position ranges of the chunk that none carries."""
        a = chunk.index_slice.start or 0
        b = a + len(chunk.kv_indices)
        with self._layer_lock:
            sends = list(self._layer_sends.get(chunk.room, ()))
        used, ranges = [], []
        for send in sends:
            if send.failed is not None:  # its pages go per chunk (same bytes, same places)
                continue
            lo, hi = max(a, send.positions[0]), min(b, send.positions[1])
            if lo >= hi:
                continue
            p0 = send.positions[0]
            if not np.array_equal(np.asarray(chunk.kv_indices[lo - a:hi - a], np.int64),
                                  send.pages[lo - p0:hi - p0]):  # fmt: skip
                logger.warning("banaserve: room %s: streamed pages differ from the chunk's; "
                               "sending the chunk again", chunk.room)  # fmt: skip
                continue
            used.append(send)
            ranges.append((lo, hi))
        return used, uncovered_ranges(a, b, ranges)

    # -- prefill side: data ------------------------------------------------------------------
    def add_transfer_request(
        self,
        bootstrap_room: int,
        kv_indices: npt.NDArray[np.int32],
        index_slice: slice,
        is_last_chunk: bool,
        aux_index: int | None = None,
        state_indices: list | None = None,
        num_kv_tokens: int | None = None,
        *,
        wait_event: Any = None,
        indices_event: Any = None,
        trace_ctx: Any = None,
    ) -> None:
        if (
            bootstrap_room not in self.request_status
            or self.check_status(bootstrap_room) == self._poll.Failed
            or bootstrap_room not in self.transfer_infos
        ):
            return
        chunk = _Chunk(
            bootstrap_room, np.asarray(kv_indices), index_slice, is_last_chunk, aux_index,
            wait_event,
        )  # fmt: skip
        if self._inline_ready(chunk):
            self._run_chunk(chunk)
            return
        with self._layer_lock:
            self._pending[bootstrap_room] = self._pending.get(bootstrap_room, 0) + 1
        self._queue.put(chunk)

    def _inline_ready(self, chunk: _Chunk) -> bool:
        """True when layer streams already delivered every page of ``chunk`` and no earlier
        chunk of its room is still queued: what is left (at most the aux row, microseconds) is
        done on the caller's thread, saving the hand-over to the transfer thread (which waits
        for the GIL behind the busy scheduler thread for up to the interpreter's switch
        interval, 5 ms)."""
        if self._layer_order is None or chunk.wait_event is not None or self._fault_hold_ms:
            return False
        with self._layer_lock:
            if self._pending.get(chunk.room, 0):
                return False
        sends, todo = self._covered(chunk)
        return (
            not todo
            and bool(sends)
            and all(s.state.terminal for send in sends for s in send.streams)
        )

    def _transfer_loop(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is _STOP:
                return
            try:
                self._run_chunk(chunk)
            finally:
                with self._layer_lock:
                    left = self._pending.get(chunk.room, 1) - 1
                    if left > 0:
                        self._pending[chunk.room] = left
                    else:
                        self._pending.pop(chunk.room, None)

    def _run_chunk(self, chunk: _Chunk) -> None:
        try:
            self._transfer_chunk(chunk)
        except Exception as exc:
            reason = f"banaserve transfer of room {chunk.room} failed: {exc}"
            logger.error(reason)
            with self._layer_lock:
                dropped = self._layer_sends.pop(chunk.room, [])
                self._room_stats.pop(chunk.room, None)
            for send in dropped:
                send.abandon()
            self.conclude_failure(bootstrap_room=chunk.room, failure_reason=reason)

    def _transfer_chunk(self, chunk: _Chunk) -> None:
        from ...transfer import Op

        if chunk.wait_event is not None and hasattr(chunk.wait_event, "synchronize"):
            chunk.wait_event.synchronize()
        infos = self.transfer_infos.get(chunk.room)
        if not infos or self.request_status.get(chunk.room) == self._poll.Failed:
            return
        self._maybe_hold(chunk)
        a = chunk.index_slice.start or 0
        sends, todo = self._covered(chunk)
        stats = self._room_stats.setdefault(chunk.room, RoomStats())
        if stats.t_first_enqueued is None:
            stats.t_first_enqueued = chunk.t_enqueued
        t_write = time.perf_counter()
        handles = []
        aux_posts = []
        for session, info in list(infos.items()):
            if info.is_dummy:
                continue
            with self._peers_lock:
                peer = self._peers.get(session)
            if peer is None:
                raise InvalidArgumentError(f"decode {session} sent a request before registering")
            if peer.rejected:
                raise InvalidArgumentError(peer.rejected)
            for lo, hi in todo:  # pages no layer stream carries: one WRITE per range
                src, dst = wire.chunk_indices(
                    chunk.kv_indices[lo - a:hi - a], info.dst_kv_indices(), slice(lo, hi),
                    self._prefix_pages(info),
                )  # fmt: skip
                if len(src):
                    handles.append(self.engine.submit(Op.WRITE, self._local_kv, src, peer.kv, dst))
                    stats.chunk_bytes += (
                        len(src) * self._buffers.item_nbytes * len(self._buffers.bases)
                    )
            if chunk.is_last and chunk.aux_index is not None and info.aux_index >= 0:
                aux_posts.append((peer, info.aux_index))
        self._wait_all(handles)
        if handles:
            stats.write_s += time.perf_counter() - t_write
        if chunk.is_last:  # every layer send of the room, also any no chunk claimed
            with self._layer_lock:
                sends = self._layer_sends.pop(chunk.room, [])
        for send in sends:
            if send.failed is not None:
                continue
            send.wait(self.transfer_timeout_s)
            if id(send) not in stats.seen:
                stats.layer_bytes += send.num_marked * send.layer_nbytes
                stats.late_bytes += send.late_layers * send.layer_nbytes
                stats.last = send
                stats.seen.add(id(send))
        if aux_posts:  # the aux row last, once every KV byte of the request is in place
            one_src = np.array([chunk.aux_index], dtype=np.int64)
            self._wait_all([
                self.engine.submit(Op.WRITE, local, one_src, remote,
                                   np.array([aux_index], dtype=np.int64))
                for peer, aux_index in aux_posts
                for local, remote in zip(self._local_aux, peer.aux, strict=False)
            ])  # fmt: skip
        if chunk.is_last:
            self._room_stats.pop(chunk.room, None)
            self._account(chunk.room, stats)
            self.conclude_transfer(bootstrap_room=chunk.room, status=self._poll.Success)

    def _wait_all(self, handles: list[Any]) -> None:
        for h in handles:
            if not h.wait(self.transfer_timeout_s):
                h.cancel()
                raise TimeoutError(
                    f"no completion after {self.transfer_timeout_s}s ({h.state.name})"
                )
            if h.state.name != "DONE":
                raise BanaserveError(f"transfer ended {h.state.name}")

    def _maybe_hold(self, chunk: _Chunk) -> None:
        """Test-only fault injection (BANASERVE_SGLANG_FAULT_HOLD_MS): holds a large request's
        last chunk before its posts, so a test can kill the decode side mid-transfer."""
        hold_ms = self._fault_hold_ms
        if hold_ms <= 0 or not chunk.is_last:
            return
        if (chunk.index_slice.stop or 0) < _env.get(_env.SGLANG_FAULT_HOLD_MIN_PAGES):
            return
        logger.warning("banaserve: fault hold: room %d held %d ms before its last posts",
                       chunk.room, hold_ms)  # fmt: skip
        time.sleep(hold_ms / 1000)

    def _account(self, room: int, stats: RoomStats) -> None:
        c = self.counters
        c["layer_bytes"] += stats.layer_bytes
        c["late_layer_bytes"] += stats.late_bytes
        c["chunk_bytes"] += stats.chunk_bytes
        if not self._log_transfers:
            return
        last = stats.last
        tail_ms = stream_ms = -1.0
        if last is not None and last.t_done is not None and last.t_last is not None:
            tail_ms = (last.t_done - last.t_last) * 1e3
            stream_ms = (last.t_done - (last.t_first or last.t_last)) * 1e3
        backend_ms = (time.perf_counter() - (stats.t_first_enqueued or 0.0)) * 1e3
        logger.info(
            "banaserve transfer: room=%d layer_bytes=%d late_layer_bytes=%d chunk_bytes=%d "
            "tail_ms=%.3f stream_ms=%.3f chunk_write_ms=%.3f backend_ms=%.3f | totals "
            "layer_bytes=%d late_layer_bytes=%d chunk_bytes=%d fallback_requests=%d",
            room, stats.layer_bytes, stats.late_bytes, stats.chunk_bytes, tail_ms, stream_ms,
            stats.write_s * 1e3, backend_ms, c["layer_bytes"], c["late_layer_bytes"],
            c["chunk_bytes"], c["fallback_requests"],
        )  # fmt: skip

    def _prefix_pages(self, info: wire.RequestMsg) -> int:
        page = int(self.kv_args.page_size or 1)
        return int(info.decode_prefix_len) // page

    # -- teardown ------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Stops this role's threads and releases its sockets and engine (SGLang's role switch
        discards the manager and builds a new one; the KV pool itself stays)."""
        self._stopped = True
        if self.disaggregation_mode == self._sg.DisaggregationMode.PREFILL:
            self._queue.put(_STOP)
            self._watch_queue.put(_STOP)
        shutdown = self.__dict__.get("_heartbeat_shutdown")  # SGLang sets it on decode only
        if shutdown is not None:
            shutdown.set()
        # the control loops poll with a timeout under --enable-pd-role-switch; join them before
        # closing the socket they read (ZMQ sockets are not thread-safe)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=3.0)
        self._threads = []
        with self._socket_lock:
            for sock in self._socket_cache.values():
                sock.close(linger=0)
            self._socket_cache.clear()
        self.server_socket.close(linger=0)
        self._zmq_ctx.destroy(linger=0)
        self.engine.stop()


def _reordered(layout: wire.BufferLayout, order: list[int]) -> wire.BufferLayout:
    return wire.BufferLayout([layout.bases[i] for i in order], layout.item_nbytes,
                             layout.num_items)  # fmt: skip


def _unique_regions(ptrs: list[int], lens: list[int]) -> list[tuple[int, int]]:
    seen: set[tuple[int, int]] = set()
    out = []
    for p, n in zip(ptrs, lens, strict=True):
        if n and (p, n) not in seen:
            seen.add((p, n))
            out.append((int(p), int(n)))
    return out


def build_classes(sg: Any) -> dict[str, type]:
    """The four classes SGLang's ``get_kv_class`` hands out for ``banaserve``, built on the
    base classes of ``sg`` (the host's ``pd`` namespace, or a fake one in tests)."""

    def make(name: str, core: type | None, base: type, **attrs: Any) -> type:
        bases = (core, base) if core is not None else (base,)
        cls = type(name, bases, {"__module__": __name__, "_sg": sg, **attrs})
        cls.__qualname__ = name
        return cls

    return {
        "manager": make("BanaserveKVManager", ManagerCore, sg.CommonKVManager),
        # The host-index fast path of prefill.py pins host memory (CUDA only): plain indices.
        "sender": make(
            "BanaserveKVSender", None, sg.CommonKVSender, supports_host_tensor_indices=False
        ),  # fmt: skip
        "receiver": make("BanaserveKVReceiver", None, sg.CommonKVReceiver),
        "bootstrap_server": make(
            "BanaserveKVBootstrapServer", None, sg.CommonKVBootstrapServer
        ),  # fmt: skip
    }


_CLASSES: list[dict[str, type]] = []  # built once per process, on SGLang's first request


def _classes() -> dict[str, type]:
    if not _CLASSES:
        from .host import ns

        _CLASSES.append(build_classes(ns("pd")))
    return _CLASSES[0]


def manager_class() -> type:
    return _classes()["manager"]


def sender_class() -> type:
    return _classes()["sender"]


def receiver_class() -> type:
    return _classes()["receiver"]


def bootstrap_server_class() -> type:
    return _classes()["bootstrap_server"]

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

Layer-wise overlap is not hooked into SGLang's model loop yet: KV is sent per prefill chunk once
the chunk's forward pass is done (logged once at start-up).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import (
    ABORT_ACK_TAG,
    ABORT_TAG,
    AbortNotification,
    CommonKVBootstrapServer,
    CommonKVManager,
    CommonKVReceiver,
    CommonKVSender,
)
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.server_args import ServerArgs

from ... import _env
from ...errors import BanaserveError, InvalidArgumentError
from . import wire

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Peer:
    """A registered decode rank, as the prefill side sees it."""

    peer_id: str
    kv: Any  # PreparedList (remote layout)
    aux: list[Any]
    rejected: str | None = None


@dataclass
class _Chunk:
    room: int
    kv_indices: npt.NDArray[np.int32]
    index_slice: slice
    is_last: bool
    aux_index: int | None
    wait_event: Any = None
    extra: dict = field(default_factory=dict)


class BanaserveKVManager(CommonKVManager):
    kv_status_msg_tag = wire.TAG_STATUS
    kv_status_msg_carries_reason = True
    reports_transfer_latency = True
    sender_trace_module = None

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: ServerArgs,
        is_mla_backend: bool | None = False,
    ) -> None:
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        from ...transfer import TransferEngine

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
        if disaggregation_mode == DisaggregationMode.PREFILL:
            self._peers: dict[str, _Peer] = {}
            self._peers_lock = threading.Lock()
            self._queue: queue.Queue = queue.Queue()
            self._spawn("banaserve-prefill-control", self._prefill_control_loop)
            self._spawn("banaserve-prefill-transfer", self._transfer_loop)
            logger.info(
                "banaserve transfer backend: engine %s on %s, %d KV buffers x %d pages of %d B; "
                "sending per prefill chunk (layer-wise overlap is not hooked into the model)",
                self.engine.engine_id, self.local_ip, len(self._buffers.bases),
                self._buffers.num_items, self._buffers.item_nbytes,
            )  # fmt: skip
        elif disaggregation_mode == DisaggregationMode.DECODE:
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
                if frames and frames[0] == ABORT_TAG:
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
            self.update_status(msg.room, KVPoll.WaitingForInput)

    def _on_abort(self, frames: list[bytes]) -> None:
        note = AbortNotification.from_zmq(frames)
        if note is None:
            return
        status = self.request_status.get(note.room)
        if status is not None and status != KVPoll.Success:
            self.record_failure(note.room, "Aborted by the decode side")
            self.update_status(note.room, KVPoll.Failed)
        if note.decode_ip is not None and note.decode_port is not None:
            try:
                self._send_multipart_locked(
                    f"tcp://{note.decode_ip}:{note.decode_port}",
                    [ABORT_ACK_TAG, str(note.room).encode("ascii")],
                )
            except Exception as exc:
                logger.warning("banaserve: ABORT_ACK for room %s failed: %s", note.room, exc)

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
            or self.check_status(bootstrap_room) == KVPoll.Failed
            or bootstrap_room not in self.transfer_infos
        ):
            return
        self._queue.put(
            _Chunk(
                bootstrap_room, np.asarray(kv_indices), index_slice, is_last_chunk,
                aux_index, wait_event,
            )
        )  # fmt: skip

    def _transfer_loop(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is _STOP:
                return
            try:
                self._transfer_chunk(chunk)
            except Exception as exc:
                reason = f"banaserve transfer of room {chunk.room} failed: {exc}"
                logger.error(reason)
                self.conclude_failure(bootstrap_room=chunk.room, failure_reason=reason)

    def _transfer_chunk(self, chunk: _Chunk) -> None:
        from ...transfer import Op

        if chunk.wait_event is not None and hasattr(chunk.wait_event, "synchronize"):
            chunk.wait_event.synchronize()
        infos = self.transfer_infos.get(chunk.room)
        if not infos or self.request_status.get(chunk.room) == KVPoll.Failed:
            return
        handles = []
        for session, info in list(infos.items()):
            if info.is_dummy:
                continue
            with self._peers_lock:
                peer = self._peers.get(session)
            if peer is None:
                raise InvalidArgumentError(f"decode {session} sent a request before registering")
            if peer.rejected:
                raise InvalidArgumentError(peer.rejected)
            src, dst = wire.chunk_indices(
                chunk.kv_indices, info.dst_kv_indices(), chunk.index_slice,
                self._prefix_pages(info),
            )  # fmt: skip
            if len(src):
                handles.append(self.engine.submit(Op.WRITE, self._local_kv, src, peer.kv, dst))
            if chunk.is_last and chunk.aux_index is not None and info.aux_index >= 0:
                one_src = np.array([chunk.aux_index], dtype=np.int64)
                one_dst = np.array([info.aux_index], dtype=np.int64)
                for local, remote in zip(self._local_aux, peer.aux, strict=False):
                    handles.append(self.engine.submit(Op.WRITE, local, one_src, remote, one_dst))
        for h in handles:
            if not h.wait(self.transfer_timeout_s):
                h.cancel()
                raise TimeoutError(
                    f"no completion after {self.transfer_timeout_s}s ({h.state.name})"
                )
            if h.state.name != "DONE":
                raise BanaserveError(f"transfer ended {h.state.name}")
        if chunk.is_last:
            self.conclude_transfer(bootstrap_room=chunk.room, status=KVPoll.Success)

    def _prefix_pages(self, info: wire.RequestMsg) -> int:
        page = int(self.kv_args.page_size or 1)
        return int(info.decode_prefix_len) // page

    # -- teardown ------------------------------------------------------------------------------
    def teardown(self) -> None:
        self._stopped = True
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            self._queue.put(_STOP)
        self.engine.stop()


def _unique_regions(ptrs: list[int], lens: list[int]) -> list[tuple[int, int]]:
    seen: set[tuple[int, int]] = set()
    out = []
    for p, n in zip(ptrs, lens, strict=True):
        if n and (p, n) not in seen:
            seen.add((p, n))
            out.append((int(p), int(n)))
    return out


class BanaserveKVSender(CommonKVSender):
    # The host-index fast path of prefill.py pins host memory (CUDA only); use plain indices.
    supports_host_tensor_indices = False


class BanaserveKVReceiver(CommonKVReceiver):
    pass


class BanaserveKVBootstrapServer(CommonKVBootstrapServer):
    pass

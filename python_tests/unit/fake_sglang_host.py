# SPDX-License-Identifier: Apache-2.0
"""A fake of the host layer's ``pd`` namespace: the SGLang objects the banaserve PD backend
uses (``adapters/sglang/conn.py``), with just enough behaviour to drive its logic without
SGLang: a per-room status table, failure records, and control sockets replaced by queues.

Only what SGLang's ``CommonKVManager`` contributes to our manager is here; the real one is
exercised by the real-SGLang tests (python_tests/sglang/test_sglang_pd.py).
"""

from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


class KVPoll(enum.IntEnum):
    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class DisaggregationMode(enum.Enum):
    NULL = "null"
    PREFILL = "prefill"
    DECODE = "decode"


ABORT_TAG = b"FAKE_ABORT"
ABORT_ACK_TAG = b"FAKE_ABORT_ACK"


@dataclass
class AbortNotification:
    room: int
    decode_ip: str | None = None
    decode_port: int | None = None

    @classmethod
    def from_zmq(cls, frames: list[bytes]) -> AbortNotification | None:
        if len(frames) < 2:
            return None
        ip, _, port = frames[2].decode().partition(":") if len(frames) > 2 else ("", "", "")
        return cls(int(frames[1]), ip or None, int(port) if port else None)


@dataclass
class KVArgs:
    kv_data_ptrs: list[int] = field(default_factory=list)
    kv_data_lens: list[int] = field(default_factory=list)
    kv_item_lens: list[int] = field(default_factory=list)
    aux_data_ptrs: list[int] = field(default_factory=list)
    aux_data_lens: list[int] = field(default_factory=list)
    aux_item_lens: list[int] = field(default_factory=list)
    engine_rank: int = 0
    page_size: int = 1


class _Inbox(queue.Queue):
    """The fake control socket: frames put here are received; ``close`` as a ZMQ socket's."""

    closed = False

    def close(self, linger: int | None = None) -> None:
        self.closed = True


class _Context:
    """The fake ZMQ context SGLang's manager owns (destroyed at teardown)."""

    destroyed = False

    def destroy(self, linger: int | None = None) -> None:
        self.destroyed = True


class CommonKVManager:
    """What our manager inherits from SGLang, faked: status per room, failures, concluded
    transfers (recorded for the test), the control socket as an inbox queue."""

    _next_port = 40000

    def __init__(self, args: KVArgs, disaggregation_mode: DisaggregationMode, server_args: Any,
                 is_mla_backend: bool | None = False) -> None:  # fmt: skip
        self.kv_args = args
        self.disaggregation_mode = disaggregation_mode
        self.server_args = server_args
        self.local_ip = "127.0.0.1"
        CommonKVManager._next_port += 1
        self.rank_port = CommonKVManager._next_port
        self.server_socket = _Inbox()  # the "socket": frames put here are received
        self._socket_lock = threading.Lock()  # SGLang's cache of sockets to peers, and its lock
        self._socket_cache: dict[str, Any] = {}
        self._zmq_ctx = _Context()
        self.attn_tp_size = int(getattr(server_args, "attn_tp_size", 1))
        self.transfer_infos: dict[int, dict[str, Any]] = {}
        self.request_status: dict[int, KVPoll] = {}
        self.req_to_decode_prefix_len: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        self.concluded: dict[int, KVPoll] = {}
        self.sent: list[tuple[str, list[bytes]]] = []
        self.done = threading.Condition()

    # -- the SGLang methods our manager calls --------------------------------------------------
    def _make_worker_recv(self, sock: queue.Queue) -> Any:
        def recv() -> list[bytes] | None:
            try:
                return sock.get(timeout=0.05)
            except queue.Empty:
                return None

        return recv

    def update_status(self, room: int, status: KVPoll) -> None:
        old = self.request_status.get(room)
        if old == KVPoll.Failed:
            return
        self.request_status[room] = status if old is None else max(old, status) \
            if status != KVPoll.Failed else status  # fmt: skip

    def check_status(self, room: int) -> KVPoll | None:
        return self.request_status.get(room)

    def record_failure(self, room: int, reason: str) -> None:
        self.failures[room] = reason

    def conclude_transfer(self, *, bootstrap_room: int, status: KVPoll) -> None:
        with self.done:
            self.update_status(bootstrap_room, status)
            self.concluded[bootstrap_room] = status
            self.done.notify_all()

    def conclude_failure(self, *, bootstrap_room: int, failure_reason: str) -> None:
        with self.done:
            self.record_failure(bootstrap_room, failure_reason)
            self.update_status(bootstrap_room, KVPoll.Failed)
            self.concluded[bootstrap_room] = KVPoll.Failed
            self.done.notify_all()

    def wait_concluded(self, room: int, timeout_s: float = 30.0) -> KVPoll | None:
        with self.done:
            self.done.wait_for(lambda: room in self.concluded, timeout_s)
            return self.concluded.get(room)

    def handle_abort_ack_message(self, msg: list[bytes]) -> bool:
        return bool(msg) and msg[0] == ABORT_ACK_TAG

    def parse_kv_status_message(self, msg: list[bytes]) -> Any:
        return None

    def apply_prefill_status(self, **kwargs: Any) -> None:
        pass

    def check_peer_aux_buffer_count(self, session: str, count: int) -> None:
        from banaserve_ext.errors import InvalidArgumentError

        raise InvalidArgumentError(f"decode {session} has {count} aux buffers")

    def _send_multipart_locked(self, endpoint: str, frames: list[bytes]) -> None:
        self.sent.append((endpoint, frames))

    def _start_heartbeat_checker_thread(self) -> threading.Thread:
        t = threading.Thread(target=lambda: None, daemon=True)
        t.start()
        return t


class CommonKVSender:
    pass


class CommonKVReceiver:
    pass


class CommonKVBootstrapServer:
    pass


def pd_namespace() -> SimpleNamespace:
    """The fake ``pd`` namespace (same short names as adapters/sglang/host/table.py)."""
    return SimpleNamespace(
        KVPoll=KVPoll, DisaggregationMode=DisaggregationMode, ABORT_TAG=ABORT_TAG,
        ABORT_ACK_TAG=ABORT_ACK_TAG, AbortNotification=AbortNotification, KVArgs=KVArgs,
        CommonKVManager=CommonKVManager, CommonKVSender=CommonKVSender,
        CommonKVReceiver=CommonKVReceiver, CommonKVBootstrapServer=CommonKVBootstrapServer,
    )  # fmt: skip

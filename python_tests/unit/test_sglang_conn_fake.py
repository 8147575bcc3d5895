# SPDX-License-Identifier: Apache-2.0
"""The banaserve PD backend's logic (adapters/sglang/conn.py) against a fake host: no SGLang
process, real transfer engines on this host, real memory. Covers the page arithmetic (chunks,
decode-side prefix), the per-room state machine and the failure reasons; the real-SGLang proof
is python_tests/sglang/test_sglang_pd.py."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from fake_sglang_host import KVArgs, KVPoll, pd_namespace

from banaserve_ext.adapters.sglang import conn, wire
from banaserve_ext.errors import InvalidArgumentError

LAYERS, PAGES, PAGE_BYTES, AUX_ROWS, AUX_BYTES = 2, 16, 64, 8, 32


def _transfer_available() -> bool:
    try:
        from banaserve_ext.transfer import TransferEngine  # noqa: F401
    except Exception:  # noqa: BLE001 - no _core build
        return False
    return True


pytestmark = pytest.mark.skipif(not _transfer_available(), reason="no banaserve_ext._core")


class Side:
    """One rank's memory (KV buffers: K and V per layer; one aux buffer) and its manager."""

    def __init__(self, classes: dict[str, type], mode: object, fill: int, attn_tp: int = 1) -> None:
        rng = np.random.default_rng(fill)
        self.kv = [rng.integers(0, 255, PAGES * PAGE_BYTES, dtype=np.uint8)
                   for _ in range(2 * LAYERS)]  # fmt: skip
        self.aux = rng.integers(0, 255, AUX_ROWS * AUX_BYTES, dtype=np.uint8)
        args = KVArgs(
            kv_data_ptrs=[b.ctypes.data for b in self.kv],
            kv_data_lens=[b.nbytes for b in self.kv],
            kv_item_lens=[PAGE_BYTES] * len(self.kv),
            aux_data_ptrs=[self.aux.ctypes.data], aux_data_lens=[self.aux.nbytes],
            aux_item_lens=[AUX_BYTES],
        )  # fmt: skip
        self.mgr = classes["manager"](args, mode, SimpleNamespace(attn_tp_size=attn_tp))

    def page(self, buf: int, page: int) -> bytes:
        return self.kv[buf][page * PAGE_BYTES : (page + 1) * PAGE_BYTES].tobytes()

    def aux_row(self, row: int) -> bytes:
        return self.aux[row * AUX_BYTES : (row + 1) * AUX_BYTES].tobytes()


@pytest.fixture
def classes() -> dict[str, type]:
    return conn.build_classes(pd_namespace())


@pytest.fixture
def pair(classes: dict[str, type]) -> Iterator[tuple[Side, Side]]:
    sg = pd_namespace()
    prefill = Side(classes, sg.DisaggregationMode.PREFILL, 1)
    decode = Side(classes, sg.DisaggregationMode.DECODE, 2)
    try:
        yield prefill, decode
    finally:
        prefill.mgr.teardown()
        decode.mgr.teardown()


def register(prefill: Side, decode: Side) -> None:
    msg = wire.decode(decode.mgr.build_receiver_registration_message())
    prefill.mgr._on_register(msg)


def request(prefill: Side, decode: Side, room: int, dst: list[int], aux: int,
            prefix_len: int = 0) -> None:  # fmt: skip
    prefill.mgr.request_status[room] = KVPoll.Bootstrapping  # SGLang's sender does this
    frames = decode.mgr.build_receiver_metadata_message(
        bootstrap_room=room, required_dst_info_num=1, kv_indices=np.array(dst, np.int32),
        aux_index=aux, state_indices=None, decode_prefix_len=prefix_len, is_dummy=False,
    )  # fmt: skip
    prefill.mgr._on_request(wire.decode(frames))


def test_classes_are_built_on_the_hosts_bases(classes: dict[str, type]) -> None:
    sg = pd_namespace()
    assert issubclass(classes["manager"], conn.ManagerCore)
    assert issubclass(classes["manager"], sg.CommonKVManager)
    assert classes["manager"].__name__ == "BanaserveKVManager"
    assert classes["sender"].supports_host_tensor_indices is False
    assert issubclass(classes["receiver"], sg.CommonKVReceiver)


def test_one_request_moves_its_pages_and_aux_row_then_succeeds(pair) -> None:
    prefill, decode = pair
    register(prefill, decode)
    request(prefill, decode, room=7, dst=[9, 3, 12], aux=5)
    assert prefill.mgr.request_status[7] == KVPoll.WaitingForInput
    prefill.mgr.add_transfer_request(7, np.array([1, 2, 4], np.int32), slice(0, 3), True, 2)
    assert prefill.mgr.wait_concluded(7) == KVPoll.Success, prefill.mgr.failures
    for buf in range(2 * LAYERS):
        for src, dst in ((1, 9), (2, 3), (4, 12)):
            assert decode.page(buf, dst) == prefill.page(buf, src)
    assert decode.aux_row(5) == prefill.aux_row(2)
    assert prefill.mgr.counters["chunk_bytes"] == 3 * PAGE_BYTES * 2 * LAYERS


def test_chunks_land_at_their_slice_and_skip_the_decode_prefix(pair) -> None:
    prefill, decode = pair
    register(prefill, decode)
    before = [decode.page(b, 10) for b in range(2 * LAYERS)]
    # 4 pages, the first already on decode (its prefix cache): pages 11, 12, 13 are written
    request(prefill, decode, room=3, dst=[10, 11, 12, 13], aux=1, prefix_len=1)
    prefill.mgr.add_transfer_request(3, np.array([0, 5], np.int32), slice(0, 2), False)
    prefill.mgr.add_transfer_request(3, np.array([6, 7], np.int32), slice(2, 4), True, 0)
    assert prefill.mgr.wait_concluded(3) == KVPoll.Success, prefill.mgr.failures
    for b in range(2 * LAYERS):
        assert decode.page(b, 10) == before[b]  # the prefix page is not overwritten
        assert [decode.page(b, p) for p in (11, 12, 13)] == [prefill.page(b, p) for p in (5, 6, 7)]


def test_a_chunk_past_the_decode_allocation_fails_with_the_reason(pair) -> None:
    prefill, decode = pair
    register(prefill, decode)
    request(prefill, decode, room=4, dst=[1, 2], aux=0)
    prefill.mgr.add_transfer_request(4, np.array([1, 2, 3], np.int32), slice(0, 3), True, 0)
    assert prefill.mgr.wait_concluded(4) == KVPoll.Failed
    reason = prefill.mgr.failures[4]
    assert "room 4" in reason and "decode allocated 2 pages" in reason


def test_a_decode_of_another_tp_size_is_rejected_and_its_requests_fail(classes) -> None:
    sg = pd_namespace()
    prefill = Side(classes, sg.DisaggregationMode.PREFILL, 1, attn_tp=1)
    decode = Side(classes, sg.DisaggregationMode.DECODE, 2, attn_tp=2)
    try:
        register(prefill, decode)
        request(prefill, decode, room=5, dst=[1], aux=0)
        prefill.mgr.add_transfer_request(5, np.array([1], np.int32), slice(0, 1), True, 0)
        assert prefill.mgr.wait_concluded(5) == KVPoll.Failed
        reason = prefill.mgr.failures[5]
        assert "rejected at registration" in reason and "attention TP 2 != prefill 1" in reason
    finally:
        prefill.mgr.teardown()
        decode.mgr.teardown()


def test_a_request_before_registration_fails_clearly(pair) -> None:
    prefill, decode = pair
    request(prefill, decode, room=6, dst=[1], aux=0)
    prefill.mgr.add_transfer_request(6, np.array([1], np.int32), slice(0, 1), True, 0)
    assert prefill.mgr.wait_concluded(6) == KVPoll.Failed
    assert "sent a request before registering" in prefill.mgr.failures[6]


def test_status_waits_for_every_destination(pair) -> None:
    prefill, decode = pair
    register(prefill, decode)
    prefill.mgr.request_status[8] = KVPoll.Bootstrapping
    frames = decode.mgr.build_receiver_metadata_message(
        bootstrap_room=8, required_dst_info_num=2, kv_indices=np.array([1], np.int32),
        aux_index=0, state_indices=None, decode_prefix_len=0, is_dummy=False,
    )  # fmt: skip
    prefill.mgr._on_request(wire.decode(frames))
    assert prefill.mgr.request_status[8] == KVPoll.Bootstrapping  # 1 of 2 destinations


def test_extra_state_is_refused_at_the_decode_side(pair) -> None:
    _, decode = pair
    with pytest.raises(InvalidArgumentError, match="extra state"):
        decode.mgr.build_receiver_metadata_message(
            bootstrap_room=1, required_dst_info_num=1, kv_indices=np.array([1], np.int32),
            aux_index=0, state_indices=[[3]], decode_prefix_len=0, is_dummy=False,
        )  # fmt: skip


def test_an_abort_from_decode_fails_the_room_and_is_acknowledged(pair) -> None:
    prefill, decode = pair
    register(prefill, decode)
    request(prefill, decode, room=11, dst=[1], aux=0)
    sg = pd_namespace()
    prefill.mgr._on_abort([sg.ABORT_TAG, b"11", b"127.0.0.1:5555"])
    assert prefill.mgr.request_status[11] == KVPoll.Failed
    assert prefill.mgr.failures[11] == "Aborted by the decode side"
    assert prefill.mgr.sent == [("tcp://127.0.0.1:5555", [sg.ABORT_ACK_TAG, b"11"])]
    # a transfer handed over after the abort is dropped, not sent
    prefill.mgr.add_transfer_request(11, np.array([1], np.int32), slice(0, 1), True, 0)
    assert 11 not in prefill.mgr.concluded


def test_layer_order_must_cover_every_buffer(pair) -> None:
    prefill, _ = pair
    with pytest.raises(InvalidArgumentError, match="does not cover"):
        prefill.mgr.enable_layerwise([0, 1, 2], buffers_per_layer=2)
    prefill.mgr.enable_layerwise([0, 2, 1, 3], buffers_per_layer=2)
    assert prefill.mgr._layer_order == [0, 2, 1, 3]


def test_teardown_for_a_role_switch_stops_threads_and_releases_sockets(
    classes: dict[str, type],
) -> None:
    # SGLang's runtime role switch discards the manager (teardown) and builds one for the new
    # role; our manager opts in, so teardown must leave no thread, socket or engine behind
    assert classes["manager"].supports_role_switch is True
    sg = pd_namespace()
    side = Side(classes, sg.DisaggregationMode.PREFILL, 3)
    threads = list(side.mgr._threads)
    assert threads and all(t.is_alive() for t in threads)
    side.mgr.teardown()
    assert not any(t.is_alive() for t in threads)
    assert side.mgr.server_socket.closed and side.mgr._zmq_ctx.destroyed
    assert side.mgr._threads == []

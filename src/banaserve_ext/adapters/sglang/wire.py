# SPDX-License-Identifier: Apache-2.0
"""Control-plane messages of the ``banaserve`` SGLang backend and the pure layout arithmetic.

No sglang, torch or engine import here, so all of it is unit-tested on its own. Messages travel
over SGLang's per-rank ZMQ PUSH/PULL sockets as two frames ``[tag, msgpack(payload)]`` (never
positional frames); status messages reuse SGLang's own tagged status format.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from ...errors import InvalidArgumentError

TAG_REGISTER = b"BNS_REGISTER"  # decode -> prefill: engine metadata + buffer layout, once per peer
TAG_REQUEST = b"BNS_REQUEST"  # decode -> prefill: destination pages of one request
TAG_STATUS = b"BNS_STATUS"  # prefill -> decode: terminal status (SGLang's tagged status frames)


class BufferLayout(msgspec.Struct, frozen=True):
    """``len(bases)`` equally shaped buffers of ``num_items`` items of ``item_nbytes`` each."""

    bases: list[int]
    item_nbytes: int
    num_items: int


class RegisterMsg(msgspec.Struct, frozen=True):
    """A decode rank introduces itself to a prefill rank."""

    session: str  # "ip:port" of the decode rank's status socket; the peer's key on prefill
    engine_metadata: bytes
    kv: BufferLayout
    aux: list[BufferLayout]  # one per aux buffer (their item sizes differ)
    tp_rank: int
    attn_tp_size: int


class RequestMsg(msgspec.Struct, frozen=True):
    """Where decode wants one request's pages (``kv_indices``: int32 little-endian bytes)."""

    room: int
    session: str
    kv_indices: bytes
    aux_index: int
    required_dst_info_num: int
    is_dummy: bool = False
    decode_prefix_len: int = 0

    @property
    def endpoint(self) -> str:
        return self.session.rsplit(":", 1)[0]

    @property
    def dst_port(self) -> int:
        return int(self.session.rsplit(":", 1)[1])

    def dst_kv_indices(self) -> np.ndarray:
        return np.frombuffer(self.kv_indices, dtype=np.int32)


_encoder = msgspec.msgpack.Encoder()
_register_decoder = msgspec.msgpack.Decoder(RegisterMsg)
_request_decoder = msgspec.msgpack.Decoder(RequestMsg)


def encode(tag: bytes, msg: msgspec.Struct) -> list[bytes]:
    return [tag, _encoder.encode(msg)]


def decode(frames: Sequence[bytes]) -> RegisterMsg | RequestMsg | None:
    """The message in ``frames``, or None when the frames are not one of ours."""
    if len(frames) != 2:
        return None
    try:
        if frames[0] == TAG_REGISTER:
            return _register_decoder.decode(frames[1])
        if frames[0] == TAG_REQUEST:
            return _request_decoder.decode(frames[1])
    except msgspec.DecodeError as exc:
        raise InvalidArgumentError(f"malformed {frames[0]!r} message: {exc}") from None
    return None


def kv_layout(ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int]) -> BufferLayout:
    """The layout of SGLang's KV buffers (one per layer and K/V, as in ``KVArgs``).

    All buffers must share one item size and one length (dense MHA pools); anything else is a
    pool this backend does not handle, and says so.
    """
    if not (len(ptrs) == len(lens) == len(item_lens)) or not ptrs:
        raise InvalidArgumentError(
            f"KV buffer lists disagree or are empty: {len(ptrs)} ptrs, {len(lens)} lens, "
            f"{len(item_lens)} item lens"
        )
    item = int(item_lens[0])
    if item <= 0 or any(int(x) != item for x in item_lens):
        raise InvalidArgumentError(f"KV buffers of different item sizes {sorted(set(item_lens))}")
    if any(int(n) != int(lens[0]) for n in lens) or int(lens[0]) % item:
        raise InvalidArgumentError(
            f"KV buffers of different lengths or not a multiple of the item size {item}"
        )
    return BufferLayout([int(p) for p in ptrs], item, int(lens[0]) // item)


def aux_layouts(
    ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int]
) -> list[BufferLayout]:
    """One single-buffer layout per aux (metadata) buffer."""
    if not (len(ptrs) == len(lens) == len(item_lens)):
        raise InvalidArgumentError("aux buffer lists disagree in length")
    out = []
    for p, n, item in zip(ptrs, lens, item_lens, strict=True):
        if item <= 0 or n % item:
            raise InvalidArgumentError(f"aux buffer of {n} bytes is not made of {item}-byte items")
        out.append(BufferLayout([int(p)], int(item), int(n) // int(item)))
    return out


def check_compatible(local: BufferLayout, remote: BufferLayout) -> None:
    """Prefill and decode KV pools must pair buffer for buffer and item for item."""
    if len(local.bases) != len(remote.bases):
        raise InvalidArgumentError(
            f"peer has {len(remote.bases)} KV buffers, this side {len(local.bases)} "
            "(different models or layer counts?)"
        )
    if local.item_nbytes != remote.item_nbytes:
        raise InvalidArgumentError(
            f"peer KV item is {remote.item_nbytes} bytes, this side {local.item_nbytes} "
            "(page size, head count or dtype differ)"
        )


def chunk_indices(
    src_pages: np.ndarray, dst_pages: np.ndarray, index_slice: slice, decode_prefix_pages: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination page indices (int64) of one chunk of a request.

    ``index_slice`` positions the chunk in the request's page list; pages before
    ``decode_prefix_pages`` already sit on decode (its own prefix cache) and are skipped.
    """
    src = np.asarray(src_pages)
    start = max(index_slice.start or 0, decode_prefix_pages)
    stop = index_slice.stop if index_slice.stop is not None else len(dst_pages)
    if stop - (index_slice.start or 0) != len(src):
        raise InvalidArgumentError(
            f"chunk of {len(src)} pages does not match its slice {index_slice}"
        )
    if stop > len(dst_pages):
        raise InvalidArgumentError(
            f"chunk ends at page {stop} but decode allocated {len(dst_pages)} pages"
        )
    skip = start - (index_slice.start or 0)
    if skip >= len(src):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    return (
        src[skip:].astype(np.int64, copy=False),
        np.asarray(dst_pages[start:stop], dtype=np.int64),
    )

# SPDX-License-Identifier: Apache-2.0
"""Attention-level KV migration inside SGLang (the ``kv`` / ``kv_back`` kinds of
``POST /banaserve/migrate``) and the split attention that keeps the output exact.

``kv``: ``{"kind": "kv", "rid", "peer": "host:port", "start"?, "end"? | "fraction"?}`` moves
positions [start, end) of a running request's KV, all layers, through the transfer engine into an
attention peer (:mod:`banaserve_ext.migration.attn_peer`), then gives those KV slots back to
SGLang's allocator (other requests may take them at once). ``fraction`` f picks the oldest
⌊f·committed⌋ tokens. ``kv_back``: ``{"kind": "kv_back", "rid"}`` allocates slots again, reads
the slice back and joins the row.

Hooks (registered through the host layer when the server opted into ``kv_migration``, applied
by SGLang in the scheduler process; the feature's state lives on one :class:`KvMigration`):

* ``TorchNativeAttnBackend.forward_decode`` (AROUND): after SGLang's own decode attention, the
  rows of split requests are recomputed — the local partial over the positions still held, the
  peer's partial over the migrated ones (one round trip per peer and layer, batched over its
  split requests), merged exactly (:func:`~banaserve_ext.migration.attn_math.merge_states_auto`).
  SGLang's value for those rows read freed slots and is discarded.
* ``BasePrefixCache.free_kv_row`` (AROUND): the migrated positions are not the row's any more;
  they are cut out of every range it frees (no double free at request end).
* ``release_kv_cache`` (AROUND): a split request is released without a radix checkpoint (its row
  has holes), then the split is dissolved and the peer's slice freed.
* ``backup_kv_cache`` (AROUND): SGLang retracting a split request on a PD decode server copies
  the row's slots to a host backup to restore it later without recompute; the migrated
  positions' slots are no longer the request's, so after SGLang's copy the peer's slice is read
  into the backup at [start, end) (:mod:`.kv_retraction`). If that fails the backup is dropped
  and SGLang aborts the request (503, ``AttentionPeerError``, worded by an AFTER hook on
  ``ScheduleBatch.retract_decode``); it never resumes on wrong KV. A unified server's
  retraction keeps no backup (it prefills the request again from its token ids), and the split
  is simply dissolved on release.
* ``Scheduler.process_batch_result`` (BEFORE): a request whose peer failed during the step is
  finished with an abort (503, ``AttentionPeerError``) before its token is accepted: the client
  gets a clear error, never a token computed without part of its context.

Limits: ``torch_native`` attention, page size 1, ``--disable-radix-cache`` (a radix tree would
key the migrated positions), no overlap scheduling, no mixed chunks or speculative decoding (a
split request must only ever run in decode forwards), tensor parallelism 1, dense MHA/GQA KV
pools; all are checked and refused with a 501.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec

from ... import _env
from ...errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    NotSupportedError,
    ResourceExhaustedError,
    TransferTimeoutError,
)
from . import admin, kv_retraction

logger = logging.getLogger(__name__)

TRANSFER_TIMEOUT_S = 60.0
PEER_TIMEOUT_S = 10.0


class KvMigrate(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    rid: str
    peer: str
    start: int | None = None
    end: int | None = None
    fraction: float | None = None
    #: fill the freed slots with NaN before giving them back (a test aid: any later read of
    #: them that is not overwritten first shows up in the output)
    scrub: bool = False


class KvMigrateBack(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    rid: str


def subtract_range(ranges: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """Half-open ``ranges`` minus [a, b), order kept, empty pieces dropped."""
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        for lo, hi in ((s, min(e, a)), (max(s, b), e)):
            if lo < hi:
                out.append((lo, hi))
    return out


def pick_range(committed: int, protected: int, body: KvMigrate) -> tuple[int, int]:
    """The positions [start, end) a ``kv`` request names, checked against the row: they must lie
    in [protected, committed) — KV the request owns and has written."""
    if body.fraction is not None:
        if body.start is not None or body.end is not None:
            raise InvalidArgumentError("give either fraction or start/end, not both")
        if not 0.0 < body.fraction <= 1.0:
            raise InvalidArgumentError(f"fraction must be in (0, 1], got {body.fraction}")
        start = protected
        end = start + int(body.fraction * (committed - protected))
    else:
        if body.start is None or body.end is None:
            raise InvalidArgumentError("give fraction, or both start and end")
        start, end = body.start, body.end
    if not protected <= start < end <= committed:
        raise InvalidArgumentError(
            f"token range [{start}, {end}) must be non-empty and inside [{protected}, "
            f"{committed}), the KV this request owns and has written"
        )
    return start, end


# ---- state in the scheduler process -------------------------------------------------------------
@dataclass
class Split:
    rid: str
    req_pool_idx: int
    start: int
    end: int
    peer: Any  # _PeerLink
    slice_id: int
    bases: list[int]  # the peer's buffer addresses of the slice (for reading it back)
    nbytes: int
    failed: str | None = None


class _PeerLink:
    """One attention peer seen from the owner: the RPC client and its transfer-engine id."""

    def __init__(self, address: str) -> None:
        from ...migration.attn_peer import AttnPeerClient

        self.address = address
        self.client = AttnPeerClient(address, timeout_s=PEER_TIMEOUT_S)
        self.engine_peer: str | None = None

    def ensure(self) -> None:
        if not self.client.connected:
            self.client.start()


class _Owner:
    """The owner's transfer engine and the layout over SGLang's KV buffers (built once)."""

    def __init__(self, pool: Any) -> None:
        from ...transfer import TransferEngine

        self.pool = pool
        self.layers = int(pool.layer_num)
        self.start_layer = int(getattr(pool, "start_layer", 0) or 0)
        bufs = []
        for i in range(self.layers):
            lid = self.start_layer + i
            bufs += [pool.get_key_buffer(lid), pool.get_value_buffer(lid)]
        first = bufs[0]
        if first.dim() != 3 or first.device.type != "cpu":
            raise NotSupportedError(
                f"KV buffers of shape {tuple(first.shape)} on {first.device} are not supported "
                "(dense [slots, kv_heads, head_dim] CPU buffers only)"
            )
        for b in bufs:
            if not b.is_contiguous() or b.shape != first.shape or b.dtype != first.dtype:
                raise NotSupportedError("KV buffers must be contiguous and alike")
        self.rows, self.kv_heads, self.head_dim = (int(x) for x in first.shape)
        self.dtype = str(first.dtype).removeprefix("torch.")
        self.item_nbytes = self.kv_heads * self.head_dim * first.element_size()
        self.buffers = bufs
        self.engine = TransferEngine().start()
        # by address: numpy's DLPack import has no bfloat16; self.buffers keeps the memory alive
        self.regs = [self.engine.register(b.data_ptr(), b.numel() * b.element_size()) for b in bufs]
        self.local = self.engine.prepare_layout(
            [b.data_ptr() for b in bufs], self.item_nbytes, self.rows
        )

    def scrub(self, slots: Any) -> None:
        import torch

        idx = slots.to(self.buffers[0].device, torch.int64)
        for b in self.buffers:
            b[idx] = float("nan")


class KvMigration:
    """The ``kv_migration`` feature in one scheduler process: splits, peers, the owner's engine."""

    def __init__(self, host: Any) -> None:
        self.sg = host.ns("kv_migration")
        self.splits: dict[int, Split] = {}
        #: where split attention spends its time (reported by ``kv_splits``)
        self.counters: dict[str, float] = {"split_layer_calls": 0, "split_attention_s": 0.0,
                                           "peer_wait_s": 0.0, "retraction_backups_patched": 0,
                                           "retraction_backups_dropped": 0}  # fmt: skip
        self.peers: dict[str, _PeerLink] = {}
        self._owner: _Owner | None = None
        self.held: list[Any] = []  # slot tensors taken by the test aid ``test_kv_hold``
        #: rid -> why its retraction backup was dropped (SGLang aborts it; we word the abort)
        self.dropped: dict[str, str] = {}

    def owner(self, scheduler: Any) -> _Owner:
        if self._owner is None:
            self._owner = _Owner(scheduler.token_to_kv_pool_allocator.get_kvcache())
        return self._owner

    def _check_deployment(self, scheduler: Any) -> None:
        args = scheduler.server_args
        if args.attention_backend != "torch_native":
            raise NotSupportedError("KV migration hooks the torch_native attention backend only")
        if not args.disable_radix_cache:
            raise NotSupportedError("KV migration needs --disable-radix-cache")
        if int(scheduler.token_to_kv_pool_allocator.page_size) != 1:
            raise NotSupportedError("KV migration supports page size 1 only")
        # split rows are recomputed in decode forwards only: a decode request inside an extend
        # batch (mixed chunks) or a verify pass (speculative decoding) would read freed slots
        if args.enable_mixed_chunk or args.speculative_algorithm:
            raise NotSupportedError(
                "KV migration does not support --enable-mixed-chunk or speculative decoding"
            )

    def _transfer(
        self, owner: _Owner, op: Any, slots: Any, remote: Any, n: int, local: Any = None
    ) -> None:
        import numpy as np

        local = owner.local if local is None else local
        h = owner.engine.submit(op, local, slots, remote, np.arange(n, dtype=np.int64))
        with h:
            if not h.wait(TRANSFER_TIMEOUT_S):
                raise TransferTimeoutError(
                    f"KV transfer of {n} tokens took over {TRANSFER_TIMEOUT_S}s"
                )

    def _remote_layout(self, owner: _Owner, link: _PeerLink, meta: dict, n: int) -> Any:
        link.engine_peer = owner.engine.add_peer(meta["metadata"])
        return owner.engine.prepare_layout(
            meta["bases"], int(meta["item_nbytes"]), n, peer=link.engine_peer
        )

    def migrate_kv(self, scheduler: Any, body: dict) -> dict:
        """Handler of ``kv`` (runs on the scheduler thread between steps)."""
        from ...transfer import Op

        req_body = msgspec.convert(body, KvMigrate)
        self._check_deployment(scheduler)
        req = admin.find_request(scheduler, req_body.rid)
        idx = int(req.kv.req_pool_idx)
        if idx in self.splits:
            raise AlreadyExistsError(f"request {req.rid!r} already has migrated KV")
        start, end = pick_range(
            int(req.kv.kv_committed_len), int(req.kv.cache_protected_len), req_body
        )
        n = end - start
        owner = self.owner(scheduler)
        allocator = scheduler.token_to_kv_pool_allocator
        available_before = int(allocator.available_size())
        link = self.peers.get(req_body.peer) or _PeerLink(req_body.peer)
        link.ensure()
        self.peers[req_body.peer] = link
        t0 = time.perf_counter()
        meta = link.client.call({
            "op": "alloc", "layers": owner.layers, "tokens": n, "kv_heads": owner.kv_heads,
            "head_dim": owner.head_dim, "dtype": owner.dtype,
        })  # fmt: skip
        slots = scheduler.req_to_token_pool.req_to_token[idx, start:end].to("cpu").clone()
        try:
            remote = self._remote_layout(owner, link, meta, n)
            t1 = time.perf_counter()
            self._transfer(owner, Op.WRITE, slots.numpy(), remote, n)
            t2 = time.perf_counter()
        except Exception:
            try:
                link.client.call({"op": "free", "slice": meta["slice"]})
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise
        nbytes = 2 * owner.layers * n * owner.item_nbytes
        self.splits[idx] = Split(
            req.rid, idx, start, end, link, int(meta["slice"]), list(meta["bases"]), nbytes
        )
        if req_body.scrub:
            owner.scrub(slots)
        allocator.free(slots.to(scheduler.req_to_token_pool.req_to_token.device))
        return {
            "rid": req.rid, "peer": req_body.peer, "start": start, "end": end, "tokens": n,
            "layers": owner.layers, "bytes": nbytes, "transfer_ms": (t2 - t1) * 1e3,
            "setup_ms": (t1 - t0) * 1e3, "freed_slots": n, "kv_available_before": available_before,
            "kv_available_after": int(allocator.available_size()),
        }  # fmt: skip

    def migrate_kv_back(self, scheduler: Any, body: dict) -> dict:
        """Handler of ``kv_back``: the slice comes home into freshly allocated slots."""
        import torch

        from ...transfer import Op

        req_body = msgspec.convert(body, KvMigrateBack)
        req = admin.find_request(scheduler, req_body.rid)
        split = self.splits.get(int(req.kv.req_pool_idx))
        if split is None:
            raise NotFoundError(f"request {req.rid!r} has no migrated KV")
        if split.failed:
            raise NotSupportedError(f"the peer of {req.rid!r} failed: {split.failed}")
        owner = self.owner(scheduler)
        allocator = scheduler.token_to_kv_pool_allocator
        n = split.end - split.start
        slots = allocator.alloc(n)
        if slots is None:
            raise ResourceExhaustedError(
                f"no room for {n} KV slots (have {allocator.available_size()})"
            )
        t0 = time.perf_counter()
        try:
            meta = {"metadata": split.peer.client.call({"op": "meta"})["metadata"]}
            meta.update(bases=split.bases, item_nbytes=owner.item_nbytes)
            remote = self._remote_layout(owner, split.peer, meta, n)
            self._transfer(owner, Op.READ, slots.to("cpu", torch.int64).numpy(), remote, n)
        except Exception:
            allocator.free(slots)
            raise
        t1 = time.perf_counter()
        req_to_token = scheduler.req_to_token_pool.req_to_token
        req_to_token[split.req_pool_idx, split.start : split.end] = slots
        del self.splits[split.req_pool_idx]
        self._drop_slice(split)
        return {
            "rid": req.rid, "start": split.start, "end": split.end, "tokens": n,
            "bytes": split.nbytes, "transfer_ms": (t1 - t0) * 1e3,
            "kv_available_after": int(allocator.available_size()),
        }  # fmt: skip

    def _read_slice(self, split: Split) -> Any:
        """The peer's slice as a CPU tensor [2·layers, n, kv_heads, head_dim] (K0, V0, K1, ...:
        the order of the owner's buffers), read through the transfer engine into a staging
        buffer registered for the call."""
        import numpy as np
        import torch

        from ...transfer import Op

        owner = self._owner
        assert owner is not None  # a split exists only after a migration built the owner
        n = split.end - split.start
        first = owner.buffers[0]
        stage = torch.empty((len(owner.buffers), n, owner.kv_heads, owner.head_dim),
                            dtype=first.dtype)  # fmt: skip
        reg = owner.engine.register(stage.data_ptr(), stage.numel() * stage.element_size())
        try:
            local = owner.engine.prepare_layout(
                [stage[i].data_ptr() for i in range(len(owner.buffers))], owner.item_nbytes, n
            )
            meta = {"metadata": split.peer.client.call({"op": "meta"})["metadata"]}
            meta.update(bases=split.bases, item_nbytes=owner.item_nbytes)
            remote = self._remote_layout(owner, split.peer, meta, n)
            self._transfer(owner, Op.READ, np.arange(n, dtype=np.int64), remote, n, local)
        finally:
            reg.release()
        return stage

    def _patch_backup(self, split: Split, backup: Any, tree_cache: Any, backend: str) -> None:
        """Writes the peer's slice into SGLang's retraction backup at positions [start, end)."""
        stage = self._read_slice(split)
        if backend == "cpu_tensor":
            chunk = int(self._owner.pool.cpu_offloading_chunk_size)  # type: ignore[union-attr]
            kv_retraction.patch_cpu_backup(backup.cpu_tensors, chunk, split.start, stage)
        elif backend == "host_pool":
            host = tree_cache.cache_controller.storage_host_pool  # the KV (anchor) pool
            kv_retraction.patch_host_pool(host, backup.host_indices, split.start, stage)
        else:
            raise NotSupportedError(f"retraction backup {backend!r}")

    def around_backup_kv_cache(
        self, original: Any, req: Any, tree_cache: Any, req_to_token_pool: Any,
        allocator: Any, backend: str, *a: Any, **kw: Any,
    ) -> Any:  # fmt: skip
        idx = req.kv.req_pool_idx
        split = self.splits.get(idx) if (self.splits and idx is not None) else None
        saved = original(req, tree_cache, req_to_token_pool, allocator, backend, *a, **kw)
        backup = req.kv.retraction_backup
        if split is None or not saved or backup is None:
            return saved  # no split, SGLang aborts anyway, or a recompute (no copy of the KV)
        try:
            if split.failed:
                raise RuntimeError(split.failed)
            self._patch_backup(split, backup, tree_cache, backend)
            self.counters["retraction_backups_patched"] += 1
            return saved
        except Exception as exc:  # noqa: BLE001 - never resume on KV with a hole
            why = (f"retracted for lack of KV while {split.end - split.start} tokens of its KV "
                   f"lived on attention peer {split.peer.address}, which could not be read "
                   f"back ({exc})")  # fmt: skip
            logger.error("banaserve: request %s %s; it is aborted", req.rid, why)
            self.dropped[req.rid] = why
            self.sg.discard_kv_cache_backup(req, tree_cache, backend)
            self.counters["retraction_backups_dropped"] += 1
            return False

    def after_retract_decode(self, result: Any, *a: Any, **kw: Any) -> None:
        """SGLang aborts a retracted request whose backup we dropped; the client is told why."""
        if not self.dropped:
            return None
        for req in result[2]:  # (retracted, new token ratio, aborted)
            why = self.dropped.pop(req.rid, None)
            if why is not None:
                req.to_finish = self.sg.FINISH_ABORT(
                    f"banaserve: {why}", HTTPStatus.SERVICE_UNAVAILABLE, "AttentionPeerError"
                )
        self.dropped.clear()  # requests SGLang retracted anyway (none expected)
        return None

    def _drop_slice(self, split: Split) -> None:
        if split.failed:
            return
        try:
            split.peer.client.call({"op": "free", "slice": split.slice_id})
        except Exception as exc:  # noqa: BLE001 - the owner side is consistent either way
            logger.warning("banaserve: freeing slice %d at %s failed: %s", split.slice_id,
                           split.peer.address, exc)  # fmt: skip

    # ---- hooks ---------------------------------------------------------------------------------
    def _split_rows(self, forward_batch: Any) -> list[tuple[int, Split]]:
        idxs = forward_batch.req_pool_indices.tolist()
        return [(i, self.splits[p]) for i, p in enumerate(idxs) if p in self.splits]

    def around_forward_decode(
        self, original: Any, backend: Any, q: Any, k: Any, v: Any, layer: Any,
        forward_batch: Any, *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        o = original(backend, q, k, v, layer, forward_batch, *args, **kwargs)
        if not self.splits:
            return o
        rows = self._split_rows(forward_batch)
        if rows:
            t0 = time.perf_counter()
            self._fix_split_rows(backend, q, o, layer, forward_batch, rows)
            self.counters["split_layer_calls"] += 1
            self.counters["split_attention_s"] += time.perf_counter() - t0
        return o

    def _fix_split_rows(
        self, backend: Any, q: Any, o: Any, layer: Any, forward_batch: Any,
        rows: list[tuple[int, Split]],
    ) -> None:  # fmt: skip
        import torch

        from ...migration.attn_math import merge_states_auto, partial_attention

        hq, dq, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        q3 = q.reshape(-1, hq, dq)
        o3 = o.view(-1, hq, dv)
        pool = backend.token_to_kv_pool
        k_cache = pool.get_key_buffer(layer.layer_id)
        v_cache = pool.get_value_buffer(layer.layer_id)
        req_to_token = backend.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens.tolist()
        rel_layer = layer.layer_id - int(getattr(pool, "start_layer", 0) or 0)
        # post every peer's share first, then compute the local partials while the peers work
        by_peer: dict[str, list[int]] = {}
        for j, (_, split) in enumerate(rows):
            if not split.failed:
                by_peer.setdefault(split.peer.address, []).append(j)
        pending: list[tuple[list[int], Any, Any]] = []  # (rows, link, call or exception)
        for js in by_peer.values():
            link = rows[js[0]][1].peer
            qs = torch.cat([q3[rows[j][0] : rows[j][0] + 1] for j in js]).float()
            try:
                call: Any = link.client.begin_attend(
                    rel_layer, [rows[j][1].slice_id for j in js], qs, layer.scaling
                )
            except Exception as exc:  # noqa: BLE001 - handled with the replies below
                call = exc
            pending.append((js, link, call))
        local_o, local_lse = [], []
        for i, split in rows:
            row = req_to_token[split.req_pool_idx]
            slots = torch.cat((row[: split.start], row[split.end : seq_lens[i]]))
            lo, ll = partial_attention(q3[i : i + 1], k_cache[slots], v_cache[slots], layer.scaling)
            local_o.append(lo)
            local_lse.append(ll)
        o_loc, lse_loc = torch.cat(local_o), torch.cat(local_lse)  # [R, Hq, Dv], [R, Hq]
        o_far, lse_far = torch.empty_like(o_loc), torch.empty_like(lse_loc)
        merged = torch.zeros(len(rows), dtype=torch.bool)
        for js, link, call in pending:
            try:
                if isinstance(call, Exception):
                    raise call
                t_wait = time.perf_counter()
                po, plse = call.result()
                self.counters["peer_wait_s"] += time.perf_counter() - t_wait
            except Exception as exc:  # noqa: BLE001 - every affected request fails, clearly
                why = f"attention peer {link.address} failed at layer {layer.layer_id}: {exc}"
                logger.error("banaserve: %s", why)
                for j in js:
                    rows[j][1].failed = why
                continue
            o_far[js], lse_far[js], merged[js] = po, plse, True
        if bool(merged.all()):
            out, _ = merge_states_auto(o_loc, lse_loc, o_far, lse_far)
        else:  # failed rows keep their local part: finite; the request is aborted after the step
            out = o_loc.clone()
            if bool(merged.any()):
                out[merged] = merge_states_auto(
                    o_loc[merged], lse_loc[merged], o_far[merged], lse_far[merged]
                )[0]
        o3[[i for i, _ in rows]] = out.to(o3.dtype)

    def around_free_kv_row(
        self, original: Any, cache: Any, kv: Any, ranges: list[tuple[int, int]], *a: Any,
        **kw: Any,
    ) -> Any:  # fmt: skip
        split = self.splits.get(kv.req_pool_idx) if self.splits else None
        if split is not None:
            ranges = subtract_range(list(ranges), split.start, split.end)
        return original(cache, kv, ranges, *a, **kw)

    def around_release_kv_cache(
        self, original: Any, req: Any, tree_cache: Any, *a: Any, checkpoint: bool = False,
        **kw: Any,
    ) -> Any:  # fmt: skip
        idx = req.kv.req_pool_idx
        split = self.splits.get(idx) if (self.splits and idx is not None) else None
        if split is None:
            return original(req, tree_cache, *a, checkpoint=checkpoint, **kw)
        try:
            return original(req, tree_cache, *a, checkpoint=False, **kw)
        finally:
            self.splits.pop(idx, None)
            self._drop_slice(split)

    def before_process_batch_result(self, scheduler: Any, batch: Any, *a: Any, **kw: Any) -> None:
        if not self.splits or batch is None:
            return None

        for req in batch.reqs:
            split = self.splits.get(req.kv.req_pool_idx)
            if split is not None and split.failed and not req.finished():
                req.to_finish = self.sg.FINISH_ABORT(
                    f"banaserve: part of this request's KV lived on a failed {split.failed}",
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "AttentionPeerError",
                )
        return None

    def hold_handler(self, scheduler: Any, body: dict) -> dict:
        """The test aid ``test_kv_hold`` (:func:`.kv_retraction.hold`)."""
        return kv_retraction.hold(self.held, scheduler.token_to_kv_pool_allocator, body)

    def splits_handler(self, scheduler: Any, body: dict) -> dict:
        """Handler of ``kv_splits``: the current splits and what each peer holds."""
        peers = {}
        for addr, link in self.peers.items():
            try:
                peers[addr] = link.client.call({"op": "stats"}) if link.client.connected else None
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                peers[addr] = {"error": str(exc)}
        try:
            self._check_deployment(scheduler)
            blocked = None
        except NotSupportedError as exc:
            blocked = str(exc)  # this server cannot hand KV away (the controller plans so)
        return {
            "blocked": blocked,
            "splits": [
                {"rid": s.rid, "start": s.start, "end": s.end, "peer": s.peer.address,
                 "bytes": s.nbytes, "failed": s.failed}
                for s in self.splits.values()
            ],
            "peers": peers,
            "counters": dict(self.counters),
        }  # fmt: skip


def activate(host: Any) -> KvMigration:
    """Activation of the ``kv_migration`` feature: its kinds and its six hooks."""
    mig = KvMigration(host)
    channel = host.state("admin")
    channel.register("kv", mig.migrate_kv)
    channel.register("kv_back", mig.migrate_kv_back)
    channel.register("kv_splits", mig.splits_handler, quiescent=False)
    if _env.get(_env.SGLANG_TEST_AIDS):  # a test aid: KV pressure on demand, never by default
        channel.register("test_kv_hold", mig.hold_handler)
    host.hook("kv_migration", "TorchNativeAttnBackend.forward_decode", mig.around_forward_decode)
    host.hook("kv_migration", "BasePrefixCache.free_kv_row", mig.around_free_kv_row)
    host.hook("kv_migration", "release_kv_cache", mig.around_release_kv_cache)
    host.hook("kv_migration", "backup_kv_cache", mig.around_backup_kv_cache)
    host.hook("kv_migration", "ScheduleBatch.retract_decode", mig.after_retract_decode, "AFTER")
    host.hook("kv_migration", "Scheduler.process_batch_result", mig.before_process_batch_result,
              "BEFORE")  # fmt: skip
    return mig

# SPDX-License-Identifier: Apache-2.0
"""SGLang retracting a request whose KV is split with an attention peer (part of the
``kv_migration`` feature, :mod:`.kv_migration`), and a test aid that forces retractions.

When a decode step finds no free KV slot, SGLang 0.5.23 retracts running requests
(``ScheduleBatch.retract_decode`` -> ``release_req``). What happens to their KV depends on the
server:

* a **unified** server keeps nothing: the request goes back to the waiting queue and is prefilled
  again from ``origin_input_ids + output_ids``. The split only has to be dissolved when the row is
  released (``KvMigration.around_release_kv_cache``); the recomputed KV is complete.
* a **PD decode** server backs the KV up (``mem_cache.common.backup_kv_cache``, before the row is
  released) and restores it into fresh slots when the request resumes, without recompute. The
  copy reads the row's slots ``req_to_token[idx, :seqlen-1]``; the migrated positions [start, end)
  point at slots already given back to the allocator (another request's KV by then). The
  functions below write the peer's slice over those positions of the backup:

  - ``cpu_tensor`` backup (``MHATokenToKVPool.get_cpu_copy``): per layer, a list of chunks of
    ``cpu_offloading_chunk_size`` positions, each ``[k, v]`` of shape [chunk, heads, dim];
  - ``host_pool`` backup (the host pool of SGLang's unified tree cache): ``host_indices[p]`` is
    the host page of position p; with page size 1 a page is one token, and its flat form
    (``set_from_flat_data_page``) is [2 (k, v), layers, heads, dim] in every layout.

The slice comes as ``stage``, a CPU tensor [2·layers, n, heads, dim] in the owner's buffer order
(K0, V0, K1, V1, ...).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ...errors import InvalidArgumentError, NotSupportedError, ResourceExhaustedError


def patch_cpu_backup(cpu_tensors: Any, chunk_size: int, start: int, stage: Any) -> None:
    """Writes ``stage`` into a ``cpu_tensor`` backup at positions [start, start + n)."""
    layers, n = stage.shape[0] // 2, stage.shape[1]
    for j in range(n):
        c, off = divmod(start + j, chunk_size)
        for layer in range(layers):
            k_cpu, v_cpu = cpu_tensors[layer][c]
            k_cpu[off] = stage[2 * layer, j]
            v_cpu[off] = stage[2 * layer + 1, j]


def patch_host_pool(host: Any, host_indices: Any, start: int, stage: Any) -> None:
    """Writes ``stage`` into the host pool pages of positions [start, start + n)."""
    layers, n = stage.shape[0] // 2, stage.shape[1]
    if int(host.page_size) != 1 or int(host.layer_num) != layers:
        raise NotSupportedError(
            f"host backup pool with page size {host.page_size} and {host.layer_num} layers "
            f"(page size 1 and {layers} layers only)"
        )
    # [2L, n, H, D] -> [n, 2 (k, v), L, H, D]: one flat page per token
    pages = stage.view(layers, 2, *stage.shape[1:]).permute(2, 1, 0, 3, 4)
    for j in range(n):
        host.set_from_flat_data_page(int(host_indices[start + j]), pages[j].flatten())


# ---- test aid ---------------------------------------------------------------------------------
class KvHold(msgspec.Struct, forbid_unknown_fields=True):
    """Body of the test aid ``test_kv_hold``: ``tokens`` slots (None: every free one) are taken
    from SGLang's allocator and kept; ``release`` gives every held slot back."""

    kind: str
    tokens: int | None = None
    release: bool = False


def hold(held: list[Any], allocator: Any, body: dict) -> dict:
    """TEST AID (kind ``test_kv_hold``), not for production use: takes KV slots away from
    SGLang's allocator so that a test can put a server under KV pressure at a chosen moment
    (SGLang then retracts running requests); ``release`` gives them back. ``held`` keeps the
    slot tensors between calls."""
    req_body = msgspec.convert(body, KvHold)
    if req_body.release:
        released = sum(len(h) for h in held)
        for slots in held:
            allocator.free(slots)
        held.clear()
        return {"released": released, "kv_available_after": int(allocator.available_size())}
    n = int(allocator.available_size()) if req_body.tokens is None else req_body.tokens
    if n <= 0:
        raise InvalidArgumentError(f"nothing to hold ({n} tokens)")
    slots = allocator.alloc(n)
    if slots is None:
        raise ResourceExhaustedError(f"no room for {n} KV slots")
    held.append(slots)
    return {"held": sum(len(h) for h in held),
            "kv_available_after": int(allocator.available_size())}  # fmt: skip

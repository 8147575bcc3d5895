# SPDX-License-Identifier: Apache-2.0
"""Worker process of the hammer test: random overlapping puts and verified gets.

usage: python kvpool_hammer.py POOL WRITER_ID ITERATIONS N_KEYS PAGE_SIZE [ADDRESS]
→ prints one JSON line. With ADDRESS (HOST:PORT of ``banaserve pool serve --listen``) the worker
goes through the pool service (RemoteKVPool) instead of attaching to the segment.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from kvpool_testlib import checksummed_page, page_is_intact

from banaserve_ext.kvpool import KVPool, RemoteKVPool


def main() -> int:
    name, writer, iterations, n_keys, page_size = sys.argv[1], *map(int, sys.argv[2:6])
    address = sys.argv[6] if len(sys.argv) > 6 else ""
    pool = RemoteKVPool(address, pool=name).start() if address else KVPool.attach(name)
    rng = np.random.default_rng(writer)
    corrupt = gets = hits = stored = 0
    batch = 8
    src = np.zeros((batch, page_size), np.uint8)
    dst = np.zeros((batch, page_size), np.uint8)
    for _ in range(iterations):
        ids = rng.choice(n_keys, batch, replace=False)
        keys = [f"key-{i}" for i in ids]
        for j, key in enumerate(keys):
            src[j] = checksummed_page(key, writer, page_size)
        res = pool.batch_set(keys, src, raise_on_full=False)
        stored += int((res == 0).sum())
        ids = rng.choice(n_keys, batch, replace=False)
        keys = [f"key-{i}" for i in ids]
        dst[:] = 0
        found = pool.batch_get(keys, dst)
        gets += batch
        for j in np.flatnonzero(found):
            hits += 1
            page = dst[j]
            owner = int(np.frombuffer(page[:8].tobytes(), np.uint64)[0])
            if not page_is_intact(page) or not np.array_equal(
                page, checksummed_page(keys[j], owner, page_size)
            ):
                corrupt += 1
    print(json.dumps({"corrupt": corrupt, "gets": gets, "hits": hits, "stored": stored}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

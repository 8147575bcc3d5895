# SPDX-License-Identifier: Apache-2.0
"""Client process of the remote-pool tests (talks to ``banaserve pool serve --listen``).

usage:
  kvpool_remote_worker.py put ADDRESS PREFIX N PAGE_SIZE WRITER   → {"results": [...]}
  kvpool_remote_worker.py get ADDRESS PREFIX N PAGE_SIZE          → {"found", "intact", "owners"}
  kvpool_remote_worker.py killloop ADDRESS ROUNDS N_KEYS PAGE_SIZE SEED
      forks ROUNDS writers in turn; each connects and puts random batches of checksummed pages
      until it is SIGKILLed at a random moment (mostly mid-put)   → {"rounds", "batches"}
  kvpool_remote_worker.py killgets ADDRESS ROUNDS N_KEYS PAGE_SIZE SEED
      the same with readers: batch_get of the keys "kill-*" until SIGKILLed
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
from kvpool_testlib import checksummed_page, page_is_intact

from banaserve_ext.kvpool import RemoteKVPool


def _keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def put(address: str, prefix: str, n: int, page: int, writer: int) -> dict[str, object]:
    keys = _keys(prefix, n)
    src = np.stack([checksummed_page(k, writer, page) for k in keys])
    with RemoteKVPool(address, page_size=page) as pool:
        res = pool.batch_set(keys, src, raise_on_full=False)
    return {"results": res.tolist()}


def get(address: str, prefix: str, n: int, page: int) -> dict[str, object]:
    keys = _keys(prefix, n)
    dst = np.zeros((n, page), np.uint8)
    with RemoteKVPool(address, page_size=page) as pool:
        found = pool.batch_get(keys, dst)
    intact = [
        bool(page_is_intact(dst[i]))
        and np.array_equal(
            dst[i], checksummed_page(keys[i], int(dst[i, :8].view(np.uint64)[0]), page)
        )
        for i in range(n)
    ]
    owners = [int(dst[i, :8].view(np.uint64)[0]) for i in range(n)]
    return {"found": found.tolist(), "intact": intact, "owners": owners}


def _reader(address: str, keys: list[str], pages: np.ndarray, seed: int, w: int) -> None:
    dst = np.zeros_like(pages)
    pool = RemoteKVPool(address, page_size=pages.shape[1]).start()
    os.write(w, b"x")
    while True:
        pool.batch_get(keys, dst)
        os.write(w, b"b")


def _writer(address: str, keys: list[str], pages: np.ndarray, seed: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    batch = 64
    pool = RemoteKVPool(address, page_size=pages.shape[1]).start()
    os.write(w, b"x")
    while True:  # back-to-back puts: a kill lands mostly inside one
        ids = np.sort(rng.choice(len(keys), batch, replace=False))
        pool.batch_set([keys[i] for i in ids], pages[ids], raise_on_full=False)
        os.write(w, b"b")


def killloop(
    address: str, rounds: int, n_keys: int, page: int, seed: int, *, readers: bool = False
) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    keys = [f"kill-{i}" for i in range(n_keys)]
    pages = np.stack([checksummed_page(k, 7, page) for k in keys])  # inherited by the children
    batches = 0
    for r in range(rounds):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                body = _reader if readers else _writer
                body(address, keys, pages, seed * 1000 + r, wfd)
            finally:
                os._exit(1)
        os.close(wfd)
        os.read(rfd, 1)  # connected
        time.sleep(float(rng.uniform(0.0, 0.03)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.set_blocking(rfd, False)
        try:
            batches += len(os.read(rfd, 1 << 16))
        except BlockingIOError:
            pass
        os.close(rfd)
    return {"rounds": rounds, "batches": batches}


def main() -> int:
    mode, address, *rest = sys.argv[1:]
    if mode == "put":
        out = put(address, rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    elif mode == "get":
        out = get(address, rest[0], int(rest[1]), int(rest[2]))
    elif mode == "killloop":
        out = killloop(address, *map(int, rest))
    elif mode == "killgets":
        out = killloop(address, *map(int, rest), readers=True)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

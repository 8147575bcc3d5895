# SPDX-License-Identifier: Apache-2.0
"""Cost of one routing decision (select + dispatch + complete), per policy and fleet size.

.venv/bin/python -m pytest bench/router/bench_policies.py --benchmark-only
"""

from __future__ import annotations

import itertools

import pytest

from banaserve_ext.policies import RequestInfo, WorkerLoad, make_policy


@pytest.mark.parametrize("n_workers", [2, 16, 1024])
@pytest.mark.parametrize("name", ["load_aware", "power_of_two", "round_robin", "cache_aware"])
def bench_policy_decision(benchmark, name: str, n_workers: int) -> None:  # type: ignore[no-untyped-def]
    policy = make_policy(name, seed=0)
    workers = [WorkerLoad(f"http://127.0.0.1:{9000 + i}", "prefill") for i in range(n_workers)]
    prefix = "system prompt " * 150
    counter = itertools.count()

    def one() -> None:
        k = next(counter)
        r = RequestInfo(str(k), 550, text=prefix + str(k))
        w = workers[policy.select(r, workers, k * 1e-3)]
        policy.on_dispatch(r, w, k * 1e-3)
        policy.on_complete(r, w, k * 1e-3)

    benchmark(one)

# SPDX-License-Identifier: Apache-2.0
"""The test bed itself: a real SGLang server on CPU answers, and teardown leaves nothing."""

from __future__ import annotations

import pytest
from sglang_testbed.cluster import generate

from banaserve_ext.launch.servers import group_members

pytestmark = pytest.mark.sglang


def test_single_server_generates_deterministically(sglang_cluster) -> None:
    cfg, proc = sglang_cluster.server("single")
    first = generate(cfg.url, text="the quick brown fox", max_new_tokens=12)
    again = generate(cfg.url, text="the quick brown fox", max_new_tokens=12)
    assert len(first["output_ids"]) == 12
    assert first["meta_info"]["prompt_tokens"] > 0
    assert first["output_ids"] == again["output_ids"]  # greedy: same prompt, same tokens
    other = generate(cfg.url, input_ids=[5, 6, 7, 8, 9, 10, 11], max_new_tokens=12)
    assert len(other["output_ids"]) == 12

    # teardown by PID takes the scheduler/detokenizer children with it
    pid = proc.pid
    assert pid is not None and proc.group_alive()
    sglang_cluster.stop(proc)
    assert not proc.alive() and not proc.group_alive()
    # no live process of the server's group is left (zombies awaiting a reaper do not count:
    # a container's PID 1 may never reap the orphaned children)
    assert group_members(pid) == []

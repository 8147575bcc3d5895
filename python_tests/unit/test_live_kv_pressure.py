# SPDX-License-Identifier: Apache-2.0
"""The live KV-pressure rule against a fake decode server (no SGLang): what comes back when the
pressure is gone. The real mechanism runs in python_tests/sglang/test_sglang_kv_pressure.py."""

from __future__ import annotations

from banaserve_ext.live.kv_pressure import KvPressure, KvPressureConfig, split_tokens

URL = "http://d0:1"


class FakeDecode:
    """A decode server's ``kv_splits`` and ``kv_back``: ``used`` KV tokens of ``total``."""

    def __init__(self, used: int, splits: dict[str, int]) -> None:
        self.used, self.total = used, 1000
        self.splits = dict(splits)  # rid -> tokens on the peer

    def call(self, url: str, body: dict, timeout_s: float = 0.0) -> tuple[int, dict]:
        assert url == URL
        if body["kind"] == "kv_splits":
            return 200, {"splits": [{"rid": r, "peer": "p:1", "start": 0, "end": n}
                                    for r, n in self.splits.items()]}  # fmt: skip
        if body["kind"] == "kv_back":
            self.used += self.splits.pop(body["rid"])
            return 200, {"duration_ms": 1.0, "bytes": 8}
        raise AssertionError(body)

    def signals(self) -> dict:
        return {"mode": "decode", "kv_total": self.total, "kv_used": self.used}


def _rule(server: FakeDecode) -> tuple[KvPressure, list[tuple]]:
    records: list[tuple] = []

    def record(action: str, inputs: dict, outcome: str, **kw: object) -> dict:
        records.append((action, inputs.get("rid"), outcome))
        return {"action": action, "outcome": outcome}

    cfg = KvPressureConfig(peers=("p:1",), high=0.8, low=0.3, fraction=0.9)
    return KvPressure(cfg, record, server.call), records


def test_kv_comes_back_only_when_the_use_with_it_back_stays_below_low() -> None:
    """Right after a move the local use is far below ``low``; the KV on the peer comes back only
    once the use counting it is at or below ``low`` (here: when the big split's request ended),
    and then all of it."""
    server = FakeDecode(used=40, splits={"a": 300, "b": 50})
    rule, records = _rule(server)
    rule.step(URL, server.signals())  # 0.04 local, 0.39 with the splits: nothing comes back
    assert records == [] and server.splits == {"a": 300, "b": 50}
    server.used = 0
    rule.step(URL, server.signals())  # 0.35 with the splits: still above low
    assert records == [] and server.splits == {"a": 300, "b": 50}
    del server.splits["a"]  # its request finished (its split ends with it)
    server.used = 200
    rule.step(URL, server.signals())  # 0.25 with b's 50 tokens back
    assert records == [("MigrateKVBack", "b", "ok")] and server.used == 250
    assert server.splits == {}


def test_split_tokens_counts_what_the_peers_hold() -> None:
    splits = [{"rid": r, "start": s, "end": e} for r, s, e in (("a", 0, 40), ("b", 10, 30))]
    assert split_tokens(splits) == 60 and split_tokens([]) == 0

# SPDX-License-Identifier: Apache-2.0
"""``POST /banaserve/migrate`` and attention-level KV migration against a real CPU SGLang server
(the tiny Llama in float32, radix cache off). One server (module scope) serves every test here."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sglang_testbed.cluster import Cluster

from banaserve_ext.launch.servers import SGLangServerConfig, http_json
from banaserve_ext.migration.attn_peer import AttnPeerProcess

#: idle OpenMP threads that spin starve the attention peer on a small box (see README)
SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "BANASERVE_SGLANG_TEST_AIDS": "1"}  # test_kv_hold

pytestmark = pytest.mark.sglang

SERVER_ARGS = ("--dtype", "float32", "--disable-radix-cache")


@pytest.fixture(scope="module")
def peer() -> Iterator[AttnPeerProcess]:
    with AttnPeerProcess() as p:
        yield p


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SGLangServerConfig]:
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("migration-logs"))
    try:
        cfg, _ = cluster.server(extra_args=SERVER_ARGS, env=SERVER_ENV, features=("kv_migration",))
        yield cfg
    finally:
        cluster.close()


PROMPT = [(7 * i + 3) % 1000 + 1 for i in range(40)]


def generate_raw(url: str, input_ids: list[int], max_new_tokens: int, rid: str) -> tuple:
    payload = {
        "input_ids": input_ids,
        "rid": rid,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        },
    }
    return http_json(f"{url}/generate", payload, timeout_s=180)


def generate(url: str, input_ids: list[int], max_new_tokens: int, rid: str) -> dict:
    status, body = generate_raw(url, input_ids, max_new_tokens, rid)
    assert status == 200 and isinstance(body, dict), (status, body)
    return body


def wait_running(
    cfg: SGLangServerConfig, rid: str, min_output: int = 1, timeout_s: float = 120.0
) -> dict:
    """Polls ``status`` until ``rid`` runs with at least ``min_output`` tokens; its entry."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, reply = migrate(cfg, {"kind": "status"})
        assert status == 200, reply
        for r in reply["running"]:
            if r["rid"] == rid and r["output_len"] >= min_output:
                return r
        time.sleep(0.005)
    raise AssertionError(f"{rid} never ran with {min_output} output tokens")


def migrate(cfg: SGLangServerConfig, body: object) -> tuple[int, dict]:
    status, reply = http_json(f"{cfg.url}/banaserve/migrate", body)  # type: ignore[arg-type]
    assert isinstance(reply, dict), reply
    return status, reply


# ---- the admin endpoint ------------------------------------------------------------------------
def test_status_runs_on_the_scheduler_and_reports_the_pool(server: SGLangServerConfig) -> None:
    status, reply = migrate(server, {"kind": "status"})
    assert status == 200, reply
    assert reply["kind"] == "status" and reply["running"] == []
    assert reply["kv_total"] > 0 and 0 < reply["kv_available"] <= reply["kv_total"]
    assert {"status", "kv", "kv_back"} <= set(reply["kinds"])
    assert "layers" not in reply["kinds"]  # layer migration was not opted into
    assert reply["duration_ms"] >= 0
    # the opted-in server's scheduler listens on the admin channel (a plain one does not:
    # test_sglang_host.py)
    unix = Path("/proc/net/unix").read_text().split()
    assert f"@banaserve-admin-{server.port}" in unix


def test_status_sees_a_request_mid_generation(server: SGLangServerConfig) -> None:
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(generate, server.url, input_ids=PROMPT, max_new_tokens=400, rid="probe")
        seen = wait_running(server, "probe")
        out = fut.result(timeout=120)
    assert seen["input_len"] == len(PROMPT)
    assert len(PROMPT) <= seen["kv_committed_len"] < len(PROMPT) + 400
    assert seen["output_len"] >= 1
    assert len(out["output_ids"]) == 400
    _, after = migrate(server, {"kind": "status"})
    assert after["running"] == []


@pytest.mark.parametrize(
    ("body", "code", "etype"),
    [
        ({"kind": "no-such-kind"}, 400, "InvalidArgumentError"),
        ({"rid": "x"}, 400, "InvalidArgumentError"),  # no kind
        ({"kind": 7}, 400, "InvalidArgumentError"),  # kind of the wrong type
        ([1, 2], 400, "InvalidArgumentError"),  # not an object
        (
            {"kind": "kv", "rid": "nobody", "fraction": 0.5, "peer": "127.0.0.1:1"},
            404,
            "NotFoundError",
        ),
        (
            {"kind": "kv", "rid": "x", "fraction": "half", "peer": "127.0.0.1:1"},
            400,
            "ValidationError",
        ),
    ],
    ids=["unknown-kind", "no-kind", "kind-type", "not-object", "unknown-rid", "bad-field"],
)
def test_bad_bodies_get_typed_4xx(
    server: SGLangServerConfig, body: object, code: int, etype: str
) -> None:
    status, reply = migrate(server, body)
    assert status == code, reply
    assert reply["error"]["type"] == etype and reply["error"]["message"]


def test_malformed_json_is_400(server: SGLangServerConfig) -> None:
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        body = b"{not json"
        s.sendall(
            b"POST /banaserve/migrate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 400"), head[:200]


# ---- KV migration ------------------------------------------------------------------------------
#: mixed lengths: (prompt length, new tokens)
BATCH = [(20, 120), (90, 90), (200, 150), (50, 60)]


def prompt(i: int, n: int) -> list[int]:
    return [(31 * i + 7 * j) % 1000 + 1 for j in range(n)]


def run_batch(cfg: SGLangServerConfig, tag: str, during=None) -> list[list[int]]:
    """The batch concurrently; ``during(tag)`` runs while it generates. Output ids per request."""
    with ThreadPoolExecutor(len(BATCH)) as pool:
        futs = [
            pool.submit(generate, cfg.url, prompt(i, n), new, f"{tag}-{i}")
            for i, (n, new) in enumerate(BATCH)
        ]
        if during is not None:
            during(tag)
        return [f.result(timeout=300)["output_ids"] for f in futs]


def idle_available(cfg: SGLangServerConfig) -> int:
    status, reply = migrate(cfg, {"kind": "status"})
    assert status == 200 and reply["running"] == [], reply
    return reply["kv_available"]


def test_kv_migration_mid_generation_keeps_greedy_tokens_and_frees_slots(
    server: SGLangServerConfig, peer: AttnPeerProcess
) -> None:
    idle = idle_available(server)
    baseline = run_batch(server, "base")
    assert idle_available(server) == idle
    replies: dict[str, dict] = {}

    def migrations(tag: str) -> None:
        seen = wait_running(server, f"{tag}-0", min_output=10)
        status, r = migrate(server, {"kind": "kv", "rid": f"{tag}-0", "peer": peer.address,
                                     "fraction": 0.6, "scrub": True})  # fmt: skip
        assert status == 200, r
        replies["a"] = r
        assert r["start"] == 0
        assert r["tokens"] == r["end"] - r["start"] >= int(0.6 * seen["kv_committed_len"])
        status, r = migrate(server, {"kind": "kv", "rid": f"{tag}-2", "peer": peer.address,
                                     "start": 30, "end": 150, "scrub": True})  # fmt: skip
        assert status == 200, r
        replies["c"] = r
        status, r = migrate(server, {"kind": "kv", "rid": f"{tag}-2", "peer": peer.address,
                                     "start": 0, "end": 10})  # fmt: skip
        assert status == 409 and r["error"]["type"] == "AlreadyExistsError", r
        status, r = migrate(server, {"kind": "kv_splits"})
        assert {s["rid"] for s in r["splits"]} == {f"{tag}-0", f"{tag}-2"}, r
        assert r["peers"][peer.address]["slices"] == 2
        # the first request's KV comes home later, mid-generation, while the third stays split
        wait_running(server, f"{tag}-0", min_output=60)
        status, r = migrate(server, {"kind": "kv_back", "rid": f"{tag}-0"})
        assert status == 200, r
        replies["a_back"] = r

    migrated = run_batch(server, "mig", migrations)
    for i, (got, want) in enumerate(zip(migrated, baseline, strict=True)):
        assert got == want, f"request {i} diverged at token {first_diff(got, want)}"
    for key in ("a", "c"):
        r = replies[key]
        # what moved: every layer's K and V of each token (tiny Llama: 2 layers, 2 KV heads,
        # head dim 32, float32)
        assert r["layers"] == 2 and r["bytes"] == r["tokens"] * 2 * 2 * 2 * 32 * 4
        # the slots really went back to SGLang's allocator, all of them, and at once
        assert r["freed_slots"] == r["tokens"]
        assert r["kv_available_after"] - r["kv_available_before"] == r["tokens"]
    assert replies["c"]["tokens"] == 120
    assert replies["a_back"]["tokens"] == replies["a"]["tokens"]
    # after the batch: no split left, the peer holds nothing, no slot leaked or freed twice
    _, r = migrate(server, {"kind": "kv_splits"})
    assert r["splits"] == [] and r["peers"][peer.address]["slices"] == 0
    assert idle_available(server) == idle


def first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)


def test_migration_refusals_are_typed(server: SGLangServerConfig, peer: AttnPeerProcess) -> None:
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(generate, server.url, PROMPT, 200, "refuse")
        seen = wait_running(server, "refuse", min_output=2)
        committed = seen["kv_committed_len"]
        cases = [
            ({"start": 0, "end": committed + 50}, 400, "InvalidArgumentError"),
            ({"fraction": 0.5, "start": 1}, 400, "InvalidArgumentError"),
            ({"fraction": 0.5, "peer": "127.0.0.1:1"}, 503, "UnavailableError"),
        ]
        for extra, code, etype in cases:
            body = {"kind": "kv", "rid": "refuse", "peer": peer.address, **extra}
            status, r = migrate(server, body)
            assert (status, r["error"]["type"]) == (code, etype), r
        status, r = migrate(server, {"kind": "kv_back", "rid": "refuse"})
        assert status == 404 and "no migrated KV" in r["error"]["message"]
        assert len(fut.result(timeout=120)["output_ids"]) == 200


def test_killed_peer_fails_only_its_split_request_clearly(server: SGLangServerConfig) -> None:
    idle = idle_available(server)
    with AttnPeerProcess() as doomed, ThreadPoolExecutor(2) as pool:
        victim = pool.submit(generate_raw, server.url, prompt(9, 60), 300, "victim")
        bystander = pool.submit(generate, server.url, prompt(8, 40), 200, "bystander")
        wait_running(server, "victim", min_output=5)
        status, r = migrate(server, {"kind": "kv", "rid": "victim", "peer": doomed.address,
                                     "fraction": 0.5})  # fmt: skip
        assert status == 200, r
        wait_running(server, "victim", min_output=20)
        doomed.stop()
        status, body = victim.result(timeout=120)
        other = bystander.result(timeout=120)
    assert status != 200, body
    assert "attention peer" in str(body) and "failed" in str(body), body
    # the bystander, unsplit, was untouched and the server serves on
    alone = generate(server.url, prompt(8, 40), 200, "bystander-again")
    assert other["output_ids"] == alone["output_ids"]
    _, r = migrate(server, {"kind": "kv_splits"})
    assert r["splits"] == []
    assert idle_available(server) == idle


def test_retracted_split_request_is_recomputed_on_a_unified_server(
    server: SGLangServerConfig, peer: AttnPeerProcess
) -> None:
    """A unified server retracts a request by freeing its KV and prefilling it again later from
    its token ids (no KV backup: SGLang 0.5.23 backs up only on a PD decode server). The split is
    dissolved when the request's KV is released, the peer's slice freed, and the recomputed
    request's output equals the unsplit run's. The test aid ``test_kv_hold`` takes every free
    slot so that SGLang must retract; the migrated slots were scrubbed (NaN) first."""
    reqs = [(prompt(11, 60), 160), (prompt(12, 60), 160)]
    idle = idle_available(server)
    with ThreadPoolExecutor(len(reqs)) as pool:
        futs = [pool.submit(generate, server.url, p, n, f"rbase-{i}")
                for i, (p, n) in enumerate(reqs)]  # fmt: skip
        baseline = [f.result(timeout=300)["output_ids"] for f in futs]
    _, before = migrate(server, {"kind": "kv_splits"})
    with ThreadPoolExecutor(len(reqs)) as pool:
        futs = [pool.submit(generate, server.url, p, n, f"retract-{i}")
                for i, (p, n) in enumerate(reqs)]  # fmt: skip
        for i in range(len(reqs)):
            wait_running(server, f"retract-{i}", min_output=10)
        for i in range(len(reqs)):
            body = {"kind": "kv", "rid": f"retract-{i}", "peer": peer.address,
                    "fraction": 0.5, "scrub": True}  # fmt: skip
            status, r = migrate(server, body)
            assert status == 200, r
        status, r = migrate(server, {"kind": "test_kv_hold"})
        assert status == 200 and r["kv_available_after"] == 0, r
        try:
            deadline = time.monotonic() + 120
            while True:  # a split dissolved while both requests still run: a retraction
                _, r = migrate(server, {"kind": "kv_splits"})
                if len(r["splits"]) < len(reqs):
                    break
                assert time.monotonic() < deadline, "SGLang never retracted a split request"
                time.sleep(0.02)
            gone = {f"retract-{i}" for i in range(len(reqs))} - {s["rid"] for s in r["splits"]}
            assert not any(f.done() for f in futs), gone
            _, st = migrate(server, {"kind": "status"})
            assert gone.isdisjoint(x["rid"] for x in st["running"]), st  # it waits: retracted
        finally:
            status, r = migrate(server, {"kind": "test_kv_hold", "release": True})
            assert status == 200, r
        outs = [f.result(timeout=300)["output_ids"] for f in futs]
    for i, (got, want) in enumerate(zip(outs, baseline, strict=True)):
        assert got == want, f"request {i} diverged at token {first_diff(got, want)}"
    _, r = migrate(server, {"kind": "kv_splits"})
    assert r["splits"] == [] and r["peers"][peer.address]["slices"] == 0
    # no backup to complete on a unified server: its retraction recomputes
    assert r["counters"]["retraction_backups_patched"] == before["counters"][
        "retraction_backups_patched"]  # fmt: skip
    assert idle_available(server) == idle

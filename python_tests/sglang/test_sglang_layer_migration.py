# SPDX-License-Identifier: Apache-2.0
"""Layer-level weight migration inside a real CPU SGLang server (tiny Llama, float32, radix cache
off): greedy tokens of concurrent requests of mixed length are identical with and without the
migration triggered mid-generation; the owner frees the migrated weights and KV; every split
step is bit-identical to the local layers (verify mode); migrating back works; a layer server
killed mid-generation fails the affected requests with a clear error, never a hang."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sglang_testbed.cluster import Cluster
from sglang_testbed.layer_server import LayerServerProc

from banaserve_ext.launch.servers import SGLangServerConfig, http_json
from banaserve_ext.launch.tiny_model import TinyModelSpec

pytestmark = pytest.mark.sglang

SERVER_ARGS = ("--dtype", "float32", "--disable-radix-cache")
#: (prompt length, new tokens): mixed, concurrent
JOBS = [(5, 120), (37, 60), (80, 150), (12, 90)]


def prompt(n: int, seed: int) -> list[int]:
    return [(11 * i + 7 * seed + 3) % 1000 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[SGLangServerConfig]:  # fmt: skip
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("layermig-logs"))
    try:
        cfg, _ = cluster.server(extra_args=SERVER_ARGS, features=("layer_migration",))
        yield cfg
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def layer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LayerServerProc]:
    srv = LayerServerProc(tmp_path_factory.mktemp("layer-server"))
    try:
        yield srv
    finally:
        srv.kill()


def generate(url: str, ids: list[int], n: int, rid: str) -> tuple[int, dict]:
    payload = {
        "input_ids": ids,
        "rid": rid,
        "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
    }
    status, body = http_json(f"{url}/generate", payload, timeout_s=180)
    assert isinstance(body, dict), (status, body)
    return status, body


def migrate(cfg: SGLangServerConfig, body: dict) -> dict:
    status, reply = http_json(f"{cfg.url}/banaserve/migrate", body, timeout_s=120)
    assert status == 200 and isinstance(reply, dict), (status, reply)
    return reply


def run_batch(cfg: SGLangServerConfig, tag: str, during=None) -> tuple[list[list[int]], object]:
    """Runs JOBS concurrently; once all are running, calls ``during()`` (mid-generation)."""
    with ThreadPoolExecutor(len(JOBS)) as pool:
        futs = [pool.submit(generate, cfg.url, prompt(n, i), m, f"{tag}-{i}")
                for i, (n, m) in enumerate(JOBS)]  # fmt: skip
        extra = None
        if during is not None:
            deadline = time.monotonic() + 60
            while True:
                running = migrate(cfg, {"kind": "status"})["running"]
                if len({r["rid"] for r in running if r["rid"].startswith(tag)}) == len(JOBS):
                    break
                assert time.monotonic() < deadline, "requests never ran together"
                time.sleep(0.005)
            extra = during()
        outs = [f.result(timeout=180) for f in futs]
    for status, body in outs:
        assert status == 200, body
    return [body["output_ids"] for _, body in outs], extra


def layer_bytes() -> int:
    s = TinyModelSpec()
    d = s.hidden_size // s.num_attention_heads
    qkv = (s.num_attention_heads + 2 * s.num_key_value_heads) * d * s.hidden_size
    o = s.hidden_size * s.num_attention_heads * d
    mlp = 3 * s.hidden_size * s.intermediate_size
    return 4 * (qkv + o + mlp + 2 * s.hidden_size)


@pytest.fixture(scope="module")
def reference(server: SGLangServerConfig) -> list[list[int]]:
    outs, _ = run_batch(server, "ref")
    assert [len(o) for o in outs] == [m for _, m in JOBS]
    return outs


def test_migrate_mid_generation_then_back_keeps_tokens_and_frees_memory(
    server: SGLangServerConfig, layer_server: LayerServerProc, reference: list[list[int]]
) -> None:
    body = {"kind": "layers", "first": 1, "port": layer_server.port}
    outs, reply = run_batch(server, "mig", lambda: migrate(server, body))
    assert outs == reference
    spec = TinyModelSpec()
    moved, freed = reply["moved"], reply["freed"]
    assert moved["layers"] == [1]
    # the rotary cos/sin cache travels too (SGLang pads it past max_position_embeddings)
    rope_row = (spec.hidden_size // spec.num_attention_heads) * 4
    rope = moved["weight_bytes"] - layer_bytes()
    assert rope % rope_row == 0 and rope >= spec.max_position_embeddings * rope_row
    kv_row = 2 * spec.num_key_value_heads * (spec.hidden_size // spec.num_attention_heads) * 4
    assert reply["kv_slots"] > sum(n for n, _ in JOBS)  # every prompt was in the cache
    assert moved["kv_bytes"] == reply["kv_slots"] * kv_row
    assert freed["weight_bytes"] == layer_bytes() and freed["not_freed"] == []
    assert freed["kv_bytes"] >= 2 * 4096 * kv_row // 2  # the whole K/V buffer of layer 1
    # requests that start while split (prefill on the split model) are unchanged too
    outs, _ = run_batch(server, "split")
    assert outs == reference
    status = migrate(server, {"kind": "layers_status"})
    assert status["split"] and status["steps"] > 0 and status["failed"] is None
    # back, mid-generation
    outs, back = run_batch(server, "back", lambda: migrate(server, {"kind": "layers_back"}))
    assert outs == reference
    assert back["restored_weight_bytes"] == layer_bytes() and back["kv_slots"] > 0
    assert migrate(server, {"kind": "layers_status"})["split"] is False
    outs, _ = run_batch(server, "after")
    assert outs == reference


def test_every_split_step_is_bit_identical_to_the_local_layers(
    server: SGLangServerConfig, layer_server: LayerServerProc, reference: list[list[int]]
) -> None:
    body = {"kind": "layers", "first": 1, "port": layer_server.port, "verify": True}
    outs, reply = run_batch(server, "ver", lambda: migrate(server, body))
    assert outs == reference and reply["verify"] is True
    status = migrate(server, {"kind": "layers_status"})
    assert status["verified_steps"] > 50 and status["mismatched_steps"] == 0
    migrate(server, {"kind": "layers_back"})


def stream_ids(url: str, ids: list[int], n: int, on_first_chunk) -> list[int]:
    """A streamed greedy /generate; calls ``on_first_chunk()`` once the first chunk arrived;
    returns the output ids of the last chunk (SGLang streams cumulative output ids)."""
    import json
    import urllib.request

    payload = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True},
    }
    req = urllib.request.Request(f"{url}/generate", json.dumps(payload).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    chunks: list[dict] = []
    with urllib.request.urlopen(req, timeout=180) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[len("data:") :]))
            if len(chunks) == 1:
                on_first_chunk()
    assert len(chunks) > 2, "the stream was not streamed"
    return chunks[-1]["output_ids"]


def test_a_streamed_request_keeps_streaming_across_migration_and_back(
    server: SGLangServerConfig, layer_server: LayerServerProc, reference: list[list[int]]
) -> None:
    n, m = JOBS[2]
    body = {"kind": "layers", "first": 1, "port": layer_server.port}
    got = stream_ids(server.url, prompt(n, 2), m, lambda: migrate(server, body))
    assert got == reference[2]
    got = stream_ids(server.url, prompt(n, 2), m,
                     lambda: migrate(server, {"kind": "layers_back"}))  # fmt: skip
    assert got == reference[2]
    assert migrate(server, {"kind": "layers_status"})["split"] is False


def test_bad_migrations_are_refused(server: SGLangServerConfig) -> None:
    for body, code in (({"kind": "layers", "first": 0, "port": 1}, 400),
                       ({"kind": "layers", "first": 2, "port": 1}, 400),
                       ({"kind": "layers", "first": 1, "port": 1}, 503),
                       ({"kind": "layers_back"}, 400)):  # fmt: skip
        status, reply = http_json(f"{server.url}/banaserve/migrate", body, timeout_s=60)
        assert status == code, (body, reply)


def test_keep_local_offloads_compute_and_survives_a_lost_layer_server(
    server: SGLangServerConfig, reference: list[list[int]], tmp_path: Path
) -> None:
    """``keep_local`` (what the live controller uses): nothing freed, the layer server computes
    the block and returns the new K/V rows, which the owner writes into its own buffers; when
    the layer server dies mid-generation the owner's local layers take over: no request fails,
    outputs unchanged."""
    victim = LayerServerProc(tmp_path)
    try:
        body = {"kind": "layers", "first": 1, "port": victim.port, "keep_local": True,
                "timeout_s": 10}  # fmt: skip
        outs, reply = run_batch(server, "keep", lambda: migrate(server, body))
        assert outs == reference
        assert reply["keep_local"] is True and reply["freed"]["weight_bytes"] == 0
        status = migrate(server, {"kind": "layers_status"})
        assert status["split"] and status["keep_local"] and status["steps"] > 0
        outs, _ = run_batch(server, "keepkill", victim.kill)
        assert outs == reference
        status = migrate(server, {"kind": "layers_status"})
        assert status["failed"] and status["fallback_steps"] == 1
        assert status["aborted_requests"] == 0
        back = migrate(server, {"kind": "layers_back"})
        assert back["failed"] and back["split_steps"] > 0
        assert migrate(server, {"kind": "layers_status"})["split"] is False
        outs, _ = run_batch(server, "keepafter")
        assert outs == reference
    finally:
        victim.kill()


def test_layer_server_killed_mid_generation_fails_requests_clearly(
    server: SGLangServerConfig, tmp_path: Path
) -> None:
    victim = LayerServerProc(tmp_path)
    try:
        migrate(server, {"kind": "layers", "first": 1, "port": victim.port, "timeout_s": 10})
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(generate, server.url, prompt(9, i), 400, f"kill-{i}")
                    for i in range(2)]  # fmt: skip
            time.sleep(0.3)
            victim.kill()
            t0 = time.monotonic()
            outs = [f.result(timeout=60) for f in futs]
        assert time.monotonic() - t0 < 30
        for status, body in outs:
            assert status == 503 and "layer server" in body["message"], (status, body)
        # later requests fail at once with the same reason
        status, body = generate(server.url, prompt(4, 9), 8, "kill-later")
        assert status == 503 and "layer server" in body["message"], (status, body)
        status = migrate(server, {"kind": "layers_status"})
        assert status["failed"] and status["aborted_requests"] >= 3
    finally:
        victim.kill()

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

pytestmark = pytest.mark.sglang

SERVER_ARGS = ("--dtype", "float32", "--disable-radix-cache")


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SGLangServerConfig]:
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("migration-logs"))
    try:
        cfg, _ = cluster.server(extra_args=SERVER_ARGS)
        yield cfg
    finally:
        cluster.close()


PROMPT = [(7 * i + 3) % 1000 + 1 for i in range(40)]


def generate(url: str, input_ids: list[int], max_new_tokens: int, rid: str) -> dict:
    payload = {
        "input_ids": input_ids,
        "rid": rid,
        "sampling_params": {
            "max_new_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        },
    }
    status, body = http_json(f"{url}/generate", payload, timeout_s=180)
    assert status == 200 and isinstance(body, dict), (status, body)
    return body


def wait_running(cfg: SGLangServerConfig, rid: str, timeout_s: float = 60.0) -> dict:
    """Polls ``status`` until ``rid`` runs; returns its entry."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, reply = migrate(cfg, {"kind": "status"})
        assert status == 200, reply
        for r in reply["running"]:
            if r["rid"] == rid:
                return r
        time.sleep(0.01)
    raise AssertionError(f"{rid} never showed up as running")


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
    assert reply["duration_ms"] >= 0


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

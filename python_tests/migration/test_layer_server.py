# SPDX-License-Identifier: Apache-2.0
"""The layer server in its own process: weights and KV move through the transfer engine, the
split stack is bit-identical to the local one, migrating back returns every byte, and a server
that dies mid-step fails the step at once with UnavailableError."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from banaserve_ext.errors import InvalidArgumentError, UnavailableError
from banaserve_ext.migration import layer_server as ls
from banaserve_ext.migration.llama_stack import KV_NAMES, WEIGHT_NAMES, StackConfig

torch = pytest.importorskip("torch")

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, ROWS = 4, 64, 4, 2, 16, 96, 128
EXECUTOR = "banaserve_ext.migration.llama_stack:build"


def make_tensors(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    pos = torch.arange(256, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    cache = torch.cat(((pos * inv).cos(), (pos * inv).sin()), dim=-1)
    out = {}
    for layer in range(LAYERS):

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.1

        out[layer] = {
            "input_layernorm.weight": 1 + r(HIDDEN),
            "self_attn.qkv_proj.weight": r(q + 2 * kv, HIDDEN),
            "self_attn.o_proj.weight": r(HIDDEN, q),
            "post_attention_layernorm.weight": 1 + r(HIDDEN),
            "mlp.gate_up_proj.weight": r(2 * INTER, HIDDEN),
            "mlp.down_proj.weight": r(HIDDEN, INTER),
            "self_attn.rotary_emb.cos_sin_cache": cache.clone(),
            "k_buffer": torch.zeros(ROWS, KV_HEADS, HEAD_DIM),
            "v_buffer": torch.zeros(ROWS, KV_HEADS, HEAD_DIM),
        }
    return out


def config(layers: list[int]) -> StackConfig:
    return StackConfig(layers=layers, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       rotary_dim=HEAD_DIM, rms_eps=1e-6)  # fmt: skip


class Batch:
    """Two requests (5 and 3 prompt tokens) prefilled, then decoded one token at a time."""

    def __init__(self) -> None:
        self.slots = [list(range(1, 6)), list(range(20, 23))]

    def extend(self) -> tuple[str, dict]:
        lens = [len(s) for s in self.slots]
        rows = [x for s in self.slots for x in s]
        return "extend", {
            "positions": torch.tensor([i for n in lens for i in range(n)]),
            "out_cache_loc": torch.tensor(rows),
            "seq_lens": torch.tensor(lens),
            "extend_prefix_lens": torch.zeros(2, dtype=torch.int64),
            "token_rows": torch.tensor(rows),
        }

    def decode(self) -> tuple[str, dict]:
        new = [s[-1] + 1 for s in self.slots]
        for s, n in zip(self.slots, new, strict=True):
            s.append(n)
        lens = [len(s) for s in self.slots]
        return "decode", {
            "positions": torch.tensor([n - 1 for n in lens]),
            "out_cache_loc": torch.tensor(new),
            "seq_lens": torch.tensor(lens),
            "extend_prefix_lens": None,
            "token_rows": torch.tensor([x for s in self.slots for x in s]),
        }


def run_local(stack, mode: str, t: dict, h: torch.Tensor, r: torch.Tensor):
    from banaserve_ext.migration.llama_stack import StepInputs

    return stack.run(StepInputs(mode, t["positions"], t["out_cache_loc"], t["seq_lens"],
                                t["extend_prefix_lens"], t["token_rows"]), h, r)  # fmt: skip


def start_server(tmp: Path) -> tuple[subprocess.Popen, int]:
    ready = tmp / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "banaserve_ext.migration.layer_server", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "layer server did not start"
        time.sleep(0.05)
    return proc, int(ready.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def server_proc(tmp_path_factory: pytest.TempPathFactory):
    proc, port = start_server(tmp_path_factory.mktemp("layer-server"))
    try:
        yield proc, port
    finally:
        stop_server(proc)


@pytest.fixture
def victim_proc(tmp_path: Path):
    proc, port = start_server(tmp_path)
    try:
        yield proc, port
    finally:
        stop_server(proc)


def test_split_stack_is_bit_identical_and_migrates_back(server_proc) -> None:
    from banaserve_ext.migration.llama_stack import LlamaStack

    proc, port = server_proc
    ref_t, own_t = make_tensors(), make_tensors()
    ref = LlamaStack(config(list(range(LAYERS))), ref_t)
    head = LlamaStack(config([0, 1]), own_t)
    g = torch.Generator().manual_seed(1)
    batch = Batch()
    client = ls.LayerServerClient("127.0.0.1", port).start()
    try:
        # prefill locally on the owner (all layers), as SGLang would before the migration
        mode, t = batch.extend()
        emb = torch.randn(8, HIDDEN, generator=g)
        run_local(ref, mode, t, emb, None)
        h, r = run_local(head, mode, t, emb, None)
        run_local(LlamaStack(config([2, 3]), own_t), mode, t, h, r)
        # migrate layers 2..3 with the KV rows in use
        used = np.array(batch.slots[0] + batch.slots[1])
        ship = {
            layer: [ls.ShipTensor(n, own_t[layer][n]) for n in WEIGHT_NAMES]
            + [ls.ShipTensor(n, own_t[layer][n], used) for n in KV_NAMES]
            for layer in (2, 3)
        }
        rep = ls.ship_layers(client, ship, EXECUTOR, msgspec.msgpack.encode(config([2, 3])))
        per_layer_w = sum(own_t[2][n].numel() * 4 for n in WEIGHT_NAMES)
        assert rep["weight_bytes"] == 2 * per_layer_w
        assert rep["kv_bytes"] == 2 * 2 * len(used) * KV_HEADS * HEAD_DIM * 4
        # several decode steps: owner runs 0..1, the server 2..3; bitwise equal to local
        for _ in range(4):
            mode, t = batch.decode()
            emb = torch.randn(2, HIDDEN, generator=g)
            want = run_local(ref, mode, t, emb, None)
            h, r = run_local(head, mode, t, emb, None)
            got = ls.remote_step(client, mode, {**t, "hidden": h, "residual": r})
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # migrate back into fresh tensors: weights identical, KV rows equal the reference's
        back = {
            layer: [ls.ShipTensor(n, torch.empty_like(own_t[layer][n])) for n in WEIGHT_NAMES]
            + [ls.ShipTensor(n, torch.zeros_like(own_t[layer][n]),
                             np.array(batch.slots[0] + batch.slots[1])) for n in KV_NAMES]
            for layer in (2, 3)
        }  # fmt: skip
        ls.fetch_layers(client, back, rep["remote_addrs"])
        for layer in (2, 3):
            got = {st.name: st.tensor for st in back[layer]}
            for n in WEIGHT_NAMES:
                assert torch.equal(got[n], own_t[layer][n])
            for n in KV_NAMES:
                assert torch.equal(got[n], ref_t[layer][n])
        with pytest.raises(Exception, match="before install"):
            ls.remote_step(client, "decode", {**batch.decode()[1], "hidden": h, "residual": r})
    finally:
        client.close()


def test_server_killed_mid_step_fails_fast_and_stays_failed(victim_proc) -> None:
    proc, port = victim_proc
    own_t = make_tensors()
    client = ls.LayerServerClient("127.0.0.1", port, timeout_s=20).start()
    try:
        ship = {
            3: [ls.ShipTensor(n, own_t[3][n]) for n in WEIGHT_NAMES]
            + [ls.ShipTensor(n, own_t[3][n], np.array([1, 2])) for n in KV_NAMES]
        }
        ls.ship_layers(client, ship, EXECUTOR, msgspec.msgpack.encode(config([3])))
        mode, t = Batch().extend()
        h = torch.zeros(8, HIDDEN)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="lost during 'step'"):
            client.call({"op": "step", "mode": mode, "fail": True},
                        [(k, v) for k, v in {**t, "hidden": h, "residual": h}.items()
                         if v is not None])  # fmt: skip
        assert time.monotonic() - t0 < 10
        assert proc.wait(10) == 17
        with pytest.raises(UnavailableError, match="lost"):
            ls.remote_step(client, mode, {**t, "hidden": h, "residual": h})
    finally:
        client.close()


def test_a_reserved_arena_is_taken_by_the_next_prepare_that_fits(server_proc) -> None:
    _, port = server_proc
    client = ls.LayerServerClient("127.0.0.1", port).start()
    try:
        res, _ = client.call({"op": "reserve", "nbytes": 1 << 16})
        spec = {"layer": 0, "tensors": [{"name": "w", "dtype": "float32", "shape": [8, 8]}]}
        body = {"op": "prepare", "executor": EXECUTOR, "config": b"", "layers": [spec]}
        first, _ = client.call(body)
        assert first["addrs"][0][0] == res["addr"]  # the reserved arena
        client.call({"op": "release"})
    finally:
        client.close()


def test_bad_requests_are_typed_errors(server_proc) -> None:
    _, port = server_proc
    client = ls.LayerServerClient("127.0.0.1", port).start()
    try:
        with pytest.raises(InvalidArgumentError, match="module:function"):
            client.call({"op": "prepare", "layers": [], "executor": "nope", "config": b""})
        with pytest.raises(Exception, match="unknown op"):
            client.call({"op": "bogus"})
    finally:
        client.close()
    with pytest.raises(UnavailableError):
        ls.LayerServerClient("127.0.0.1", 1, timeout_s=2).start()

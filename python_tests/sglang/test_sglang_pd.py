# SPDX-License-Identifier: Apache-2.0
"""End to end: real SGLang prefill + decode servers with ``--disaggregation-transfer-backend
banaserve`` behind ``sglang_router`` in PD mode, on CPU, on 127.0.0.1.

One module-scoped deployment (3 SGLang servers: a single reference server, a prefill and a
decode; the box allows at most 3) serves every test in order, so start-up is paid once.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sglang_testbed.cluster import Cluster, generate

# Server start-up dominates; on a loaded 2-core box one test can take minutes.
pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

CHUNK = 64  # --chunked-prefill-size: prompts longer than this prefill in several chunks


def _needs_cross_process_transport() -> None:
    from banaserve_ext.transfer import available_backends

    if not {"shm", "tcp"} & set(available_backends()):
        pytest.skip("this build of banaserve_ext._core has no cross-process transfer backend")


def _prompts() -> list[list[int]]:
    """≥ 20 prompts as token ids: short, medium, longer than one chunk, and a repeated prefix.
    Ids stay below 1000 < the tiny model's vocabulary (1024)."""
    import numpy as np

    rng = np.random.default_rng(7)
    lengths = [1, 3, 5, 8, 13, 21, 34, 50, 63, 64, 65, 90, 128, 150, 200, 257, 300, 420]
    prompts = [rng.integers(4, 1000, size=n).tolist() for n in lengths]
    prefix = rng.integers(4, 1000, size=150).tolist()  # shared by the next three (> 2 chunks)
    prompts += [prefix + [11, 12], prefix + [13, 14, 15, 16], prefix]
    return prompts


@pytest.fixture(scope="module")
def deployment(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    _needs_cross_process_transport()
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("pd-logs"))
    try:
        single, _ = cluster.server("single", wait=False, chunked_prefill_size=CHUNK)
        # a request whose decode side never shows up fails on the prefill side after this long
        pre_env = {
            "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "30",
            # one line per request with the bytes sent layer by layer vs per chunk
            "BANASERVE_SGLANG_TRANSFER_LOG": "1",
            # test-only fault: hold the last chunk of >= 800-page requests (only the kill test
            # sends such requests) so the decode can be killed mid-transfer
            "BANASERVE_SGLANG_FAULT_HOLD_MS": "3000",
            "BANASERVE_SGLANG_FAULT_HOLD_MIN_PAGES": "800",
        }
        prefill, pproc = cluster.server(
            "prefill", wait=False, chunked_prefill_size=CHUNK, env=pre_env
        )
        decode, dproc = cluster.server(
            "decode", wait=False, env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60"}
        )
        cluster.wait_all()
        router, _ = cluster.router([prefill], [decode])
        yield cluster, single, prefill, pproc, decode, dproc, router
    finally:
        cluster.close()


def test_pd_output_ids_match_a_single_server(deployment) -> None:
    _, single, _, _, _, _, router = deployment
    prompts = _prompts()
    assert len(prompts) >= 20 and max(map(len, prompts)) > CHUNK
    for ids in prompts:
        want = generate(single.url, input_ids=ids, max_new_tokens=12)
        got = generate(router.url, input_ids=ids, max_new_tokens=12)
        assert got["output_ids"] == want["output_ids"], f"prompt of {len(ids)} tokens"
        assert got["meta_info"]["prompt_tokens"] == len(ids)


def test_pd_eight_concurrent_requests(deployment) -> None:
    _, single, _, _, _, _, router = deployment
    prompts = _prompts()[-8:]
    want = [generate(single.url, input_ids=p, max_new_tokens=16)["output_ids"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(
            lambda p: generate(router.url, input_ids=p, max_new_tokens=16)["output_ids"], prompts
        ))  # fmt: skip
    assert got == want


_TRANSFER_LINE = re.compile(
    r"banaserve transfer: room=(\d+) layer_bytes=(\d+) late_layer_bytes=(\d+) "
    r"chunk_bytes=(\d+) tail_ms=([-0-9.]+)"
)
_HOLD = re.compile(r"fault hold: room (\d+) held")
_POOL_LINE = re.compile(r"(\d+) KV buffers x \d+ pages of (\d+) B")


def _transfer_lines(log_path: Path) -> list[tuple[int, ...]]:
    text = log_path.read_text(errors="replace")
    return [tuple(int(float(x)) for x in m.groups()[:4]) for m in _TRANSFER_LINE.finditer(text)]


def test_pd_kv_goes_layer_by_layer_during_the_forward(deployment) -> None:
    """The layer-wise path is really used: a fresh prompt (no cached prefix) is carried entirely
    by the per-layer streams, every layer posted from the attention hook while the forward pass
    ran (none late, after it), nothing by the per-chunk WRITE, and output ids equal a single
    server's. A prompt sharing a cached prefix sends that prefix per chunk and the rest by layer."""
    _, single, _, pproc, _, _, router = deployment
    log = pproc.log_path
    assert "layer-wise KV overlap on" in log.read_text(errors="replace")
    pool = _POOL_LINE.search(log.read_text(errors="replace"))
    assert pool is not None
    num_buffers, item_nbytes = int(pool.group(1)), int(pool.group(2))

    def run(ids: list[int]) -> tuple[int, ...]:
        before = len(_transfer_lines(log))
        want = generate(single.url, input_ids=ids, max_new_tokens=8)["output_ids"]
        got = generate(router.url, input_ids=ids, max_new_tokens=8)["output_ids"]
        assert got == want
        deadline = time.monotonic() + 30
        while len(lines := _transfer_lines(log)) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(lines) == before + 1, lines[before:]
        return lines[-1]

    import numpy as np

    rng = np.random.default_rng(1234)
    fresh = rng.integers(4, 1000, size=3 * CHUNK + 17).tolist()  # four prefill chunks
    _, layer_bytes, late, chunk_bytes = run(fresh)
    assert (layer_bytes, late, chunk_bytes) == (len(fresh) * num_buffers * item_nbytes, 0, 0)

    _, layer_bytes, late, chunk_bytes = run(fresh[: 2 * CHUNK] + [5, 6, 7])  # cached prefix
    assert late == 0 and layer_bytes > 0 and chunk_bytes > 0
    assert (layer_bytes + chunk_bytes) % (num_buffers * item_nbytes) == 0


@pytest.fixture(scope="module")
def banaserve_router(deployment):
    """This project's router (python -m banaserve_ext.router, same flags as sglang_router) in
    front of the same prefill and decode servers."""
    cluster, _, prefill, _, decode, _, _ = deployment
    cfg, _ = cluster.router([prefill], [decode], module="banaserve")
    return cfg


def test_banaserve_router_passes_real_sglang_outputs_through(deployment, banaserve_router) -> None:
    _, single, *_ = deployment
    for ids in _prompts()[::4]:
        want = generate(single.url, input_ids=ids, max_new_tokens=12)
        got = generate(banaserve_router.url, input_ids=ids, max_new_tokens=12)
        assert got["output_ids"] == want["output_ids"], f"prompt of {len(ids)} tokens"
        assert got["text"] == want["text"]


def test_banaserve_router_streams_real_sglang_chunk_by_chunk(deployment, banaserve_router) -> None:
    import http.client
    import json

    _, single, *_ = deployment
    ids = _prompts()[12]
    want = generate(single.url, input_ids=ids, max_new_tokens=10)["output_ids"]
    body = json.dumps(
        {
            "input_ids": ids,
            "stream": True,
            "sampling_params": {"max_new_tokens": 10, "temperature": 0.0},
        }
    )
    conn = http.client.HTTPConnection(
        "127.0.0.1", int(banaserve_router.url.rsplit(":", 1)[1]), timeout=120
    )
    conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data:") and line != "data: [DONE]":
            events.append(json.loads(line[5:]))
    conn.close()
    assert len(events) >= 2, "the stream arrived as one piece"
    cumulative = events[-1]["output_ids"]
    incremental = [t for e in events for t in e["output_ids"]]
    assert want in (cumulative, incremental)


def test_banaserve_router_rejects_malformed_requests(banaserve_router) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{banaserve_router.url}/generate",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400


def test_decode_killed_mid_transfer_prefill_reports_and_keeps_serving(deployment) -> None:
    """Runs last: kills the decode server while a transfer is in flight. The prefill server holds
    the last chunk of requests of >= 800 pages (BANASERVE_SGLANG_FAULT_HOLD_MS, test-only fault
    injection) and logs it; the test kills the decode at that moment, so the kill always lands
    mid-transfer: the prefill must fail that request with a reason in its log, stay healthy, and
    serve a fresh decode server afterwards."""
    cluster, single, prefill, pproc, _, dproc, router = deployment
    long_prompt = [4 + i % 990 for i in range(900)]  # 900 pages >= the hold threshold (800)
    log_start = len(pproc.log_path.read_text(errors="replace"))
    pool = ThreadPoolExecutor(2)
    futures = [
        pool.submit(generate, router.url, input_ids=long_prompt[i:], max_new_tokens=64,
                    retry_503_s=0.0, timeout_s=30.0)
        for i in range(2)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        held = None
        while held is None and time.monotonic() < deadline:
            held = _HOLD.search(pproc.log_path.read_text(errors="replace")[log_start:])
            time.sleep(0.05)
        assert held is not None, "no request reached the held transfer"
        cluster.stop(dproc)  # SIGTERM then SIGKILL of the whole decode process group

        failed = f"banaserve transfer of room {held.group(1)} failed"
        deadline = time.monotonic() + 60
        while failed not in (log := pproc.log_path.read_text(errors="replace")):
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.2)
        assert pproc.alive()

        # ...and a new decode server + router pair is served by the same prefill server.
        decode2, _ = cluster.server("decode")
        router2, _ = cluster.router([prefill], [decode2])
        ids = _prompts()[12]
        want = generate(single.url, input_ids=ids, max_new_tokens=12)
        got = generate(router2.url, input_ids=ids, max_new_tokens=12)
        assert got["output_ids"] == want["output_ids"]
    finally:
        pool.shutdown(wait=True)
    # the held request never completed (the router answers an error or never answers)
    assert any(f.exception() is not None for f in futures)

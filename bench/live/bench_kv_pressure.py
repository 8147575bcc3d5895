# SPDX-License-Identifier: Apache-2.0
"""KV pressure on a CPU SGLang decode server, without and with the live controller (a
benchmark, not a test).

The scenario of python_tests/sglang/test_sglang_kv_pressure.py: tiny Llama (float32), 1 prefill +
1 decode server behind this project's router; the decode server has ``--max-total-tokens``
``--kv`` (default 720) and ``--num-reserved-decode-tokens 16``; ``--requests`` prompts of
``--prompt-len`` tokens each generate ``--max-new`` tokens, all at once. Each repetition runs the
phase without the controller, then with it (:class:`~banaserve_ext.live.LiveController`, its
KV-pressure rule, one attention peer), on the same servers. Retractions come from the decode
server's ``signals`` counters; output tokens/s is all requests' output tokens over the phase's
wall time. Outputs are compared with the first phase's (greedy, float32: they must be equal).

All processes share this host's cores: on a 2-core box the two SGLang servers, the router, the
peer and the controller compete for the CPU, so the throughput ratio shows the cost of split
attention (one peer round trip per layer and step) on a tiny model, not what a GPU deployment
would see. Report same-run ratios only.

``.venv/bin/python bench/live/bench_kv_pressure.py [--repeat 3] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from banaserve_ext.bench.kv_pressure import run_phase
from banaserve_ext.control import BanaServeConfig
from banaserve_ext.launch.servers import (
    RouterConfig,
    ServerProcess,
    SGLangServerConfig,
    free_port,
    http_json,
)
from banaserve_ext.launch.tiny_model import create_tiny_llama
from banaserve_ext.live.clients import InstanceSpec
from banaserve_ext.live.controller import LiveConfig, LiveController
from banaserve_ext.live.kv_pressure import KvPressureConfig
from banaserve_ext.migration.attn_peer import AttnPeerProcess

FEATURES = ("signals", "kv_migration")


def _start(procs: list[ServerProcess], name: str, cmd: list[str], ready: str, log: Path,
           env: dict[str, str] | None = None) -> ServerProcess:  # fmt: skip
    proc = ServerProcess(name, cmd, ready, log / f"{name}.log", env or {})
    procs.append(proc)
    return proc.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kv", type=int, default=720, help="decode server --max-total-tokens")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=160)
    p.add_argument("--max-new", type=int, default=100)
    p.add_argument("--high", type=float, default=0.8)
    p.add_argument("--low", type=float, default=0.3)
    p.add_argument("--fraction", type=float, default=0.6)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-kv-pressure-"))
    model = create_tiny_llama(work / "model")
    rng = np.random.default_rng(14)
    prompts = [rng.integers(4, 1000, size=args.prompt_len).tolist() for _ in range(args.requests)]
    procs: list[ServerProcess] = []
    rows: list[dict] = []
    try:
        pre = SGLangServerConfig(
            str(model), free_port(), "prefill", bootstrap_port=free_port(),
            max_total_tokens=16384, dtype="float32", features=FEATURES,
        )  # fmt: skip
        dec = SGLangServerConfig(
            str(model), free_port(), "decode", bootstrap_port=free_port(),
            max_total_tokens=args.kv, dtype="float32", features=FEATURES,
            extra_args=("--disable-radix-cache", "--num-reserved-decode-tokens", "16"),
        )  # fmt: skip
        servers = [
            _start(procs, f"{c.role}-{c.port}", c.command(), f"{c.url}/health", work, c.env())
            for c in (pre, dec)
        ]
        for s in servers:
            s.wait_ready(300)
        rcfg = RouterConfig(free_port(), ((pre.url, int(pre.bootstrap_port or 0)),), (dec.url,),
                            module="banaserve")  # fmt: skip
        _start(procs, "router", rcfg.command(), f"{rcfg.url}/health", work).wait_ready(180)
        deadline = time.monotonic() + 60
        while http_json(f"{rcfg.url}/generate", {"input_ids": [5, 6, 7],
                        "sampling_params": {"max_new_tokens": 1}})[0] != 200:  # fmt: skip
            if time.monotonic() > deadline:
                raise SystemExit("the router did not serve within 60 s")
            time.sleep(0.5)
        reference = None
        with AttnPeerProcess() as peer:
            for rep in range(args.repeat):
                for with_ctl in (False, True):
                    ctl = None
                    if with_ctl:
                        ctl = LiveController(LiveConfig(
                            router=rcfg.url,
                            instances=(InstanceSpec(pre.url, pre.bootstrap_port),
                                       InstanceSpec(dec.url, dec.bootstrap_port)),
                            control=BanaServeConfig(flip_high=2.0, flip_low=1.5),
                            window_s=0.25,
                            kv_pressure=KvPressureConfig(peers=(peer.address,), high=args.high,
                                                         low=args.low, fraction=args.fraction),
                        )).start()  # fmt: skip
                    try:
                        res = run_phase(rcfg.url, dec.url, prompts, args.max_new, reference,
                                        tick=None if ctl is None else ctl.tick)  # fmt: skip
                    finally:
                        if ctl is not None:
                            ctl.close()
                    res.pop("records")
                    outs = res.pop("outputs")
                    res["rep"] = rep
                    rows.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "failures"}
                                     | {"failures": len(res["failures"])}), flush=True)  # fmt: skip
                    if reference is None and not res["failures"]:
                        # the first phase's outputs (greedy, float32) are every later phase's
                        reference = {tuple(pr): o for pr, o in zip(prompts, outs, strict=True)}
    except KeyboardInterrupt:
        print("interrupted: the table shows the phases that finished", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop(2.0)
    _table(rows)
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2))  # fmt: skip
    return 1 if any(r["failures"] for r in rows) else 0


def _table(rows: list[dict]) -> None:
    def med(key: str, ctl: bool) -> float:
        vals = [r[key] for r in rows if r["controller"] is ctl]
        return statistics.median(vals) if vals else float("nan")

    n = sum(r["controller"] for r in rows)
    print(f"\nKV pressure, median of {n} runs each (same servers, same run, alternating)")
    print(f"{'':22}{'without':>10}{'with':>10}")
    for key, fmt in (("retracted", ".0f"), ("max_waiting_kv_full", ".0f"),
                     ("max_kv_frac", ".2f"), ("kv_moved", ".0f"), ("kv_back", ".0f"),
                     ("output_tok_s", ".1f"), ("wall_s", ".1f")):  # fmt: skip
        print(f"{key:22}{med(key, False):>10{fmt}}{med(key, True):>10{fmt}}")
    fails = sum(len(r["failures"]) for r in rows)
    print(f"failed or differing requests: {fails}")


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""``banaserve launch``: N prefill + M decode SGLang servers with the ``banaserve`` transfer
backend behind a PD router, on this host.

    banaserve launch                              # tiny embedded model on CPU, 1 prefill + 1 decode
    banaserve launch --replay                     # the shipped Mooncake slice (banaserve_ext.data)
    banaserve launch --replay ../shared/data/traces/mooncake_fast25/conversation_trace.jsonl

Waits for every server, prints the router URL, and serves until Ctrl-C (or, with ``--replay``,
replays a scaled slice of the trace, prints TTFT/TPOT/throughput and exits). Every process is
stopped by PID on the way out, also on errors.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..data import LAUNCH_TRACE
from ..errors import BanaserveError, InvalidArgumentError
from .servers import LOOPBACK, RouterConfig, ServerProcess, SGLangServerConfig, free_port

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "banaserve" / "tiny-llama"
#: one CPU SGLang server takes about 2.1 GB of RSS
SERVER_RSS_GB = 2.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model path (default: the embedded tiny Llama, created locally)")
    p.add_argument("--prefill", type=int, default=1, help="prefill servers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode servers (default 1)")
    p.add_argument("--transfer-backend", default="banaserve",
                   help="--disaggregation-transfer-backend of the servers (default banaserve)")
    p.add_argument("--device", default="cpu", help="SGLang --device (default cpu)")
    p.add_argument("--host", default=LOOPBACK, help="address every process binds")
    p.add_argument("--port", type=int, default=0, help="router port (default: a free one)")
    p.add_argument("--max-total-tokens", type=int, default=4096)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument("--log-dir", type=Path, default=Path("out") / "launch",
                   help="server logs (default out/launch)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for every SGLang server (repeatable)")
    g = p.add_argument_group("replay")
    g.add_argument("--replay", type=Path, nargs="?", const=LAUNCH_TRACE, metavar="TRACE",
                   help="trace to replay (.jsonl Mooncake or .csv Azure); without a path, the "
                   f"shipped slice {LAUNCH_TRACE.name}")
    g.add_argument("--replay-requests", type=int, default=40, help="first N requests (default 40)")
    g.add_argument("--replay-rate", type=float, default=2.0,
                   help="mean arrival rate after scaling, requests/s (default 2)")
    g.add_argument("--replay-length-scale", type=float, default=1 / 16,
                   help="input length multiplier (default 1/16)")
    g.add_argument("--replay-max-input", type=int, default=1024)
    g.add_argument("--replay-max-output", type=int, default=32)
    g.add_argument("--json", action="store_true", help="print the replay summary as JSON")


def _model_path(args: argparse.Namespace) -> tuple[str, int]:
    """The model directory and its vocabulary size."""
    if args.model:
        cfg = Path(args.model) / "config.json"
        vocab = json.loads(cfg.read_text()).get("vocab_size", 32000) if cfg.is_file() else 32000
        return str(args.model), int(vocab)
    from .tiny_model import create_tiny_llama

    path = create_tiny_llama(DEFAULT_MODEL_DIR)
    return str(path), int(json.loads((path / "config.json").read_text())["vocab_size"])


def plan(
    args: argparse.Namespace, model: str
) -> tuple[list[SGLangServerConfig], list[SGLangServerConfig]]:
    """Server configs of the deployment (ports picked now)."""
    if args.prefill < 1 or args.decode < 1:
        raise InvalidArgumentError("need at least one prefill and one decode server")
    common = dict(
        model_path=model, host=args.host, device=args.device,
        transfer_backend=args.transfer_backend, max_total_tokens=args.max_total_tokens,
        chunked_prefill_size=args.chunked_prefill_size, extra_args=tuple(args.server_arg),
    )  # fmt: skip
    prefill = [
        SGLangServerConfig(port=free_port(args.host), role="prefill",
                           bootstrap_port=free_port(args.host), **common)  # type: ignore[arg-type]
        for _ in range(args.prefill)
    ]  # fmt: skip
    decode = [
        SGLangServerConfig(port=free_port(args.host), role="decode", **common)  # type: ignore[arg-type]
        for _ in range(args.decode)
    ]
    return prefill, decode


def main(args: argparse.Namespace) -> int:
    if args.replay is not None and not Path(args.replay).is_file():  # before any server starts
        print(f"banaserve launch: trace file not found: {args.replay} (--replay without a path "
              f"replays the shipped slice {LAUNCH_TRACE.name})", file=sys.stderr)  # fmt: skip
        return 2
    n = args.prefill + args.decode
    if args.device == "cpu":
        print(f"banaserve launch: {args.prefill} prefill + {args.decode} decode CPU servers "
              f"(~{n * SERVER_RSS_GB:.1f} GB RSS)", file=sys.stderr)  # fmt: skip
    model, vocab = _model_path(args)
    prefill, decode = plan(args, model)
    log_dir = args.log_dir
    procs: list[ServerProcess] = []
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        for cfg in prefill + decode:
            name = f"{cfg.role}-{cfg.port}"
            procs.append(
                ServerProcess(name, cfg.command(), f"{cfg.url}/health", log_dir / f"{name}.log",
                              cfg.env()).start()
            )  # fmt: skip
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda p: p.wait_ready(args.ready_timeout), procs))
        router = RouterConfig(
            port=args.port or free_port(args.host),
            prefill=tuple((p.url, int(p.bootstrap_port or 0)) for p in prefill),
            decode=tuple(d.url for d in decode), host=args.host,
        )  # fmt: skip
        rproc = ServerProcess(f"router-{router.port}", router.command(), f"{router.url}/health",
                              log_dir / f"router-{router.port}.log").start()  # fmt: skip
        procs.append(rproc)
        rproc.wait_ready(60.0)
        print(f"banaserve launch: ready in {time.monotonic() - t0:.0f}s; router {router.url} "
              f"(logs in {log_dir})", file=sys.stderr, flush=True)  # fmt: skip
        if args.replay is None:
            print(router.url, flush=True)
            while all(p.alive() for p in procs):
                time.sleep(0.5)
            dead = [p.name for p in procs if not p.alive()]
            print(f"banaserve launch: {dead} exited; shutting down", file=sys.stderr)
            return 1
        return _replay(args, router.url, vocab)
    except KeyboardInterrupt:
        interrupted = True
        print("banaserve launch: interrupted; shutting down", file=sys.stderr)
        return 130
    except BanaserveError as exc:
        print(f"banaserve launch: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
        for p in reversed(procs):
            p.stop(grace_s=2.0 if interrupted else 10.0)


def _replay(args: argparse.Namespace, url: str, vocab: int) -> int:
    from . import replay

    trace = replay.load_trace(args.replay, args.replay_requests)
    reqs = replay.scale(
        trace, rate_rps=args.replay_rate, length_scale=args.replay_length_scale,
        max_input=min(args.replay_max_input, args.max_total_tokens // 2),
        max_output=args.replay_max_output, vocab_size=vocab,
    )  # fmt: skip
    _wait_router(url)
    t0 = time.perf_counter()
    results = replay.run(url, reqs)
    summary = replay.summarize(results, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"replayed {int(summary['requests'])} requests of {args.replay.name} "
              f"({int(summary['failed'])} failed) in {summary['wall_s']:.1f}s")  # fmt: skip
        print(f"  TTFT  mean {summary['ttft_mean_s'] * 1e3:8.1f} ms  p50 "
              f"{summary['ttft_p50_s'] * 1e3:8.1f} ms  p99 {summary['ttft_p99_s'] * 1e3:8.1f} ms")
        print(f"  TPOT  mean {summary['tpot_mean_s'] * 1e3:8.1f} ms  p50 "
              f"{summary['tpot_p50_s'] * 1e3:8.1f} ms  p99 {summary['tpot_p99_s'] * 1e3:8.1f} ms")
        print(f"  throughput {summary['output_tokens_per_s']:.1f} output tokens/s")
    errors = {r.error for r in results if not r.ok}
    for e in sorted(errors)[:3]:
        print(f"  error: {e}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1


def _wait_router(url: str, timeout_s: float = 60.0) -> None:
    """The router answers 503 for a few seconds after its workers turn healthy."""
    from .servers import http_json

    deadline = time.monotonic() + timeout_s
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}}
    while True:
        status, out = http_json(f"{url}/generate", body, timeout_s=60.0)
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise BanaserveError(f"router at {url} still answers {status}: {out}")
        time.sleep(0.5)

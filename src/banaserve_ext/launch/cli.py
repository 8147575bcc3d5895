# SPDX-License-Identifier: Apache-2.0
"""``banaserve launch``: BanaServe on this host — N prefill + M decode SGLang servers, the global
KV store, this project's router and the live controller (:mod:`.deploy` has the parts).

    banaserve launch                              # tiny embedded model on CPU, 1 prefill + 1 decode
    banaserve launch --replay                     # the shipped Mooncake slice (banaserve_ext.data)
    banaserve launch --baseline sglang            # the stock deployment, for side-by-side runs
    banaserve launch --replay ../shared/data/traces/mooncake_fast25/conversation_trace.jsonl

Waits for every process, prints the router URL, shows a live status line every
``--status-interval`` seconds, and serves until Ctrl-C / SIGINT / SIGTERM (or, with ``--replay``,
replays a scaled slice of the trace, prints TTFT/TPOT/throughput and exits). Every process is
stopped by PID on the way out, also on errors. SIGINT gets an explicit handler: a job started in
the background by a non-interactive shell inherits SIGINT *ignored*, and Python keeps an inherited
ignore unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..data import LAUNCH_TRACE
from ..errors import BanaserveError, UnavailableError
from .deploy import BASELINES, Deployment, plan_deployment
from .servers import LOOPBACK, ServerProcess, SGLangServerConfig, http_json

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "banaserve" / "tiny-llama"
#: one CPU SGLang server takes about 2.1 GB of RSS
SERVER_RSS_GB = 2.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model path (default: the embedded tiny Llama, created locally)")
    p.add_argument("--prefill", type=int, default=1, help="prefill servers (default 1)")
    p.add_argument("--decode", type=int, default=1, help="decode servers (default 1)")
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default="banaserve",
        help="banaserve (default: store, role switch, load_aware router, controller) "
        "or sglang (stock sglang_router cache_aware, no store, no controller)",
    )
    p.add_argument(
        "--transfer-backend",
        default=None,
        help="--disaggregation-transfer-backend (default banaserve; the sglang "
        "baseline uses mooncake when it is installed)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="router policy (default load_aware; cache_aware for the baseline)",
    )
    p.add_argument("--dtype", default="bfloat16", help="model dtype on CPU (default bfloat16)")
    p.add_argument("--no-store", action="store_true", help="BanaServe without the KV store")
    p.add_argument("--no-controller", action="store_true", help="BanaServe without controller")
    p.add_argument(
        "--attn-peers",
        type=int,
        default=1,
        help="attention peers for KV migration under KV pressure (default 1)",
    )
    p.add_argument(
        "--no-attn-targets",
        action="store_true",
        help="no attention peer beside each server (the controller's attention migrations)",
    )
    p.add_argument(
        "--layer-migration",
        action="store_true",
        help="a layer server beside each prefill server, which opts into layer_migration "
        "(the controller's layer migrations; needs --no-store)",
    )
    p.add_argument(
        "--no-handoff",
        action="store_true",
        help="the router serves requests on its ordinary path: a role flip waits for the drained "
        "server's running requests instead of moving them to another pair (docs/handoff.md; "
        "without the store there is no hand-off either)",
    )
    p.add_argument("--store-size", default="256MiB", help="KV store capacity (default 256MiB)")
    p.add_argument(
        "--controller-arg",
        action="append",
        default=[],
        help="extra argument for `banaserve control` (repeatable)",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        help="seconds between live status lines (0: none)",
    )
    p.add_argument("--device", default="cpu", help="SGLang --device (default cpu)")
    p.add_argument("--host", default=LOOPBACK, help="address every process binds")
    p.add_argument("--port", type=int, default=0, help="router port (default: a free one)")
    p.add_argument("--max-total-tokens", type=int, default=4096)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument(
        "--log-dir",
        type=Path,
        default=Path("out") / "launch",
        help="server logs (default out/launch)",
    )
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for every SGLang server (repeatable)",
    )
    g = p.add_argument_group("replay")
    g.add_argument(
        "--replay",
        type=Path,
        nargs="?",
        const=LAUNCH_TRACE,
        metavar="TRACE",
        help="trace to replay (.jsonl Mooncake or .csv Azure); without a path, the "
        f"shipped slice {LAUNCH_TRACE.name}",
    )
    g.add_argument("--replay-requests", type=int, default=40, help="first N requests (default 40)")
    g.add_argument(
        "--replay-rate",
        type=float,
        default=2.0,
        help="mean arrival rate after scaling, requests/s (default 2)",
    )
    g.add_argument(
        "--replay-length-scale",
        type=float,
        default=1 / 16,
        help="input length multiplier (default 1/16)",
    )
    g.add_argument("--replay-max-input", type=int, default=1024)
    g.add_argument("--replay-max-output", type=int, default=32)
    g.add_argument("--json", action="store_true", help="print the replay summary as JSON")
    g.add_argument(
        "--replay-conversations",
        action="store_true",
        help="replay whole multi-turn conversations (requests sharing their first two prefix "
        "hashes) instead of the first N requests: real prefix reuse on a short slice",
    )
    g.add_argument(
        "--replay-out",
        type=Path,
        default=None,
        help="write the replay's full record here (JSON: summary, prefix hits local/store, "
        "per-server prefill tokens and cache counters, KV store counters; the servers need "
        "--server-arg=--enable-metrics for the counters)",
    )


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
    """Server configs of the deployment (ports picked now); :func:`.deploy.plan_deployment` has
    the whole deployment."""
    d = plan_deployment(args, model)
    return d.prefill, d.decode


def _start(procs: list[ServerProcess], proc: ServerProcess) -> ServerProcess:
    procs.append(proc)
    return proc.start()


def main(args: argparse.Namespace) -> int:
    if args.replay is not None and not Path(args.replay).is_file():  # before any server starts
        print(f"banaserve launch: trace file not found: {args.replay} (--replay without a path "
              f"replays the shipped slice {LAUNCH_TRACE.name})", file=sys.stderr)  # fmt: skip
        return 2
    n = args.prefill + args.decode
    if args.device == "cpu":
        print(f"banaserve launch: {args.prefill} prefill + {args.decode} decode CPU servers "
              f"(~{n * SERVER_RSS_GB:.1f} GB RSS)", file=sys.stderr)  # fmt: skip
    log_dir = args.log_dir
    procs: list[ServerProcess] = []
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # explicit for SIGINT too: a background job inherits SIGINT ignored (see the module doc)
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        model, vocab = _model_path(args)
        dep = plan_deployment(args, model)
        for note in dep.notes:
            print(f"banaserve launch: {note}", file=sys.stderr)
        t0 = time.monotonic()
        if dep.pool is not None:
            pool = _start(
                procs,
                ServerProcess(
                    f"pool-{dep.pool.name}",
                    dep.pool.command(),
                    dep.pool.ready_url,
                    log_dir / "pool.log",
                ),
            )
            pool.wait_ready(60.0)
        servers = [
            _start(procs, ServerProcess(f"{c.role}-{c.port}", c.command(), f"{c.url}/health",
                                        log_dir / f"{c.role}-{c.port}.log", c.env()))
            for c in dep.prefill + dep.decode
        ]  # fmt: skip
        with ThreadPoolExecutor(len(servers)) as ex:
            list(ex.map(lambda p: p.wait_ready(args.ready_timeout), servers))
        router = dep.router
        rproc = _start(
            procs,
            ServerProcess(
                f"router-{router.port}",
                router.command(),
                f"{router.url}/health",
                log_dir / f"router-{router.port}.log",
            ),
        )
        rproc.wait_ready(60.0)
        for peer in dep.peers + [p for _, p in dep.attn_targets]:
            _start(
                procs,
                PeerProcess(
                    f"attn-peer-{peer.port}",
                    peer.command(),
                    "",
                    log_dir / f"attn-peer-{peer.port}.log",
                ),
            ).wait_ready(60.0)
        for ls in dep.layer_servers:
            lp = PeerProcess(f"layer-server-{ls.port}", ls.command(), "",
                             log_dir / f"layer-server-{ls.port}.log")  # fmt: skip
            lp.marker = "layer server on "
            _start(procs, lp).wait_ready(60.0)
        if dep.controller is not None:
            _wait_router(router.url)  # the controller checks the router's workers at start
            c = dep.controller
            _start(
                procs,
                ServerProcess(
                    "controller", c.command(), f"{c.url}/status", log_dir / "controller.log"
                ),
            ).wait_ready(60.0)
        print(
            f"banaserve launch: {_describe(dep)} ready in {time.monotonic() - t0:.0f}s; "
            f"router {router.url} (logs in {log_dir})",
            file=sys.stderr,
            flush=True,
        )
        if dep.controller is not None:
            print(
                f"banaserve launch: controller {dep.controller.url}/status "
                f"(banaserve status --controller {dep.controller.url})",
                file=sys.stderr,
            )
        if args.replay is None:
            print(router.url, flush=True)
            next_status = time.monotonic()
            while all(p.alive() for p in procs):
                if args.status_interval > 0 and time.monotonic() >= next_status:
                    _status_line(dep)
                    next_status = time.monotonic() + args.status_interval
                time.sleep(0.5)
            dead = [p.name for p in procs if not p.alive()]
            print(f"banaserve launch: {dead} exited; shutting down", file=sys.stderr)
            return 1
        return _replay(args, dep, vocab)
    except KeyboardInterrupt:
        interrupted = True
        print("banaserve launch: interrupted; shutting down", file=sys.stderr)
        return 130
    except BanaserveError as exc:
        print(f"banaserve launch: {exc}", file=sys.stderr)
        return 1
    finally:
        # no second Ctrl-C may cut the teardown short
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        for p in reversed(procs):
            p.stop(grace_s=2.0 if interrupted else 10.0)
        for sig, handler in old.items():
            signal.signal(sig, handler)


class PeerProcess(ServerProcess):
    """An attention peer (or layer server): not HTTP; ready once it printed ``marker``."""

    marker = "READY "

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise UnavailableError(f"{self.name} exited; log {self.log_path}:\n"
                                       f"{self.log_tail()}")  # fmt: skip
            if self.marker in self.log_tail():
                return
            time.sleep(poll_s)
        raise UnavailableError(f"{self.name} not ready after {timeout_s:.0f}s")


def _describe(dep: Deployment) -> str:
    parts = [f"{dep.kind}: {len(dep.prefill)}P+{len(dep.decode)}D",
             f"transfer {dep.prefill[0].transfer_backend}",
             f"router {dep.router.module}/{dep.router.policy}"]  # fmt: skip
    parts.append("store " + (dep.pool.name if dep.pool else "off"))
    parts.append("controller " + ("on" if dep.controller else "off"))
    if dep.peers:
        parts.append(f"{len(dep.peers)} attention peer(s)")
    if dep.attn_targets:
        parts.append(f"{len(dep.attn_targets)} attention target(s)")
    if dep.layer_servers:
        parts.append(f"{len(dep.layer_servers)} layer server(s)")
    return ", ".join(parts)


def _status_line(dep: Deployment) -> None:
    """One live status line on stderr: the controller's view, or the router's counts."""
    from ..live.status import fetch, one_line

    try:
        if dep.controller is not None:
            line = one_line(fetch(dep.controller.url))
        else:
            status, body = http_json(f"{dep.router.url}/workers", timeout_s=5.0)
            workers = body.get("workers", []) if isinstance(body, dict) else []
            line = (
                "  ".join(
                    f"{str(w.get('worker_type', '?'))[:1].upper()}:"
                    f"{str(w.get('url', '')).rsplit(':', 1)[-1]} "
                    f"inflight {w.get('active_requests', '?')}"
                    for w in workers
                    if isinstance(w, dict)
                )
                or f"router {status}"
            )
    except BanaserveError as exc:
        line = f"status unavailable: {exc}"
    print(f"banaserve launch: {line}", file=sys.stderr, flush=True)


def _replay(args: argparse.Namespace, dep: Deployment, vocab: int) -> int:
    from . import replay

    url = dep.router.url

    conversations = getattr(args, "replay_conversations", False)
    trace = replay.load_trace(
        args.replay, args.replay_requests * 100 if conversations else args.replay_requests
    )
    if conversations:
        trace = replay.conversation_slice(trace, args.replay_requests)
    reqs = replay.scale(
        trace, rate_rps=args.replay_rate, length_scale=args.replay_length_scale,
        max_input=min(args.replay_max_input, args.max_total_tokens // 2),
        max_output=args.replay_max_output, vocab_size=vocab,
    )  # fmt: skip
    _wait_router(url)
    t0 = time.perf_counter()
    done = threading.Event()

    def status_loop() -> None:
        while not done.wait(args.status_interval):
            _status_line(dep)

    if args.status_interval > 0:
        threading.Thread(target=status_loop, name="launch-status", daemon=True).start()
    urls = [s.url for s in dep.prefill + dep.decode]
    pool_url = dep.pool.ready_url if dep.pool else None
    before = replay.read_counters(urls, pool_url)
    try:
        results = replay.run(url, reqs)
    finally:
        done.set()
    summary = replay.summarize(results, time.perf_counter() - t0)
    out = getattr(args, "replay_out", None)
    if out is not None:
        delta = replay.counter_delta(before, replay.read_counters(urls, pool_url))
        record = {
            "deployment": _describe(dep), "kind": dep.kind, "notes": dep.notes,
            "transfer_backend": dep.prefill[0].transfer_backend, "trace": str(args.replay),
            "conversations": conversations, "summary": summary,
            "cache": replay.cache_summary(results), "counters": delta,
            "prefill_load": replay.prefill_load(delta, [s.url for s in dep.prefill]),
            "errors": sorted({r.error for r in results if not r.ok})[:5],
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"replayed {int(summary['requests'])} requests of {args.replay.name} "
              f"({int(summary['failed'])} failed) in {summary['wall_s']:.1f}s")  # fmt: skip
        print(
            f"  TTFT  mean {summary['ttft_mean_s'] * 1e3:8.1f} ms  p50 "
            f"{summary['ttft_p50_s'] * 1e3:8.1f} ms  p99 {summary['ttft_p99_s'] * 1e3:8.1f} ms"
        )
        print(
            f"  TPOT  mean {summary['tpot_mean_s'] * 1e3:8.1f} ms  p50 "
            f"{summary['tpot_p50_s'] * 1e3:8.1f} ms  p99 {summary['tpot_p99_s'] * 1e3:8.1f} ms"
        )
        print(f"  throughput {summary['output_tokens_per_s']:.1f} output tokens/s")
    if dep.controller is not None:
        _status_line(dep)
    errors = {r.error for r in results if not r.ok}
    for e in sorted(errors)[:3]:
        print(f"  error: {e}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1


def _wait_router(url: str, timeout_s: float = 60.0) -> None:
    """The router answers 503 for a few seconds after its workers turn healthy."""
    deadline = time.monotonic() + timeout_s
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}}
    while True:
        status, out = http_json(f"{url}/generate", body, timeout_s=60.0)
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise BanaserveError(f"router at {url} still answers {status}: {out}")
        time.sleep(0.5)

# SPDX-License-Identifier: Apache-2.0
"""``banaserve control``: the live controller as a process.

    banaserve control --router http://127.0.0.1:R \\
        --instance http://127.0.0.1:P1,B1 --instance http://127.0.0.1:D1,B2 ... \\
        [--port 0] [--decisions out/decisions.jsonl] [--window 2]

Every ``--window`` seconds it runs one :meth:`LiveController.tick`. It serves ``GET /status``
(JSON: instances, roles, busy share, KV use, queues, last actions; what ``banaserve status``
shows) and ``GET /metrics`` (Prometheus text) on ``--host:--port``. SIGINT/SIGTERM stop it between
two windows; serving is unaffected by the controller stopping or dying (the router and SGLang
keep running; a restarted controller reads the current state back from them).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..control import BanaServeConfig
from ..errors import BanaserveError
from .actuators import Targets, parse_target
from .clients import InstanceSpec
from .controller import LiveConfig, LiveController
from .kv_pressure import KvPressureConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, help="URL of the PD router")
    p.add_argument(
        "--instance",
        action="append",
        default=[],
        required=True,
        metavar="URL,BOOTSTRAP_PORT",
        help="an SGLang instance (repeat for each)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address of /status and /metrics")
    p.add_argument("--port", type=int, default=0, help="port of /status and /metrics (0: free)")
    p.add_argument("--window", type=float, default=2.0, help="seconds per control window")
    p.add_argument("--decisions", type=Path, default=None, help="append decisions (JSON lines)")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument(
        "--flip-cost",
        type=float,
        default=1.0,
        help="predicted seconds of a flip (drain + switch), logged beside the measured",
    )
    p.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="the model's config.json (layers and bytes for the migration cost model)",
    )
    k = p.add_argument_group("attention-level KV migration on KV pressure")
    k.add_argument(
        "--attn-peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an attention peer (python -m banaserve_ext.migration.attn_peer)",
    )
    kd = KvPressureConfig()
    k.add_argument("--kv-high", type=float, default=kd.high, help="KV use that starts migration")
    k.add_argument("--kv-low", type=float, default=kd.low, help="KV use that brings KV back")
    k.add_argument(
        "--kv-fraction",
        type=float,
        default=kd.fraction,
        help="share of a request's KV moved (oldest tokens)",
    )
    m = p.add_argument_group("migrations decided by the controller (live/actuators.py)")
    m.add_argument(
        "--layer-server",
        action="append",
        default=[],
        metavar="URL=HOST:PORT",
        help="the layer server beside instance URL (receives layer migrations)",
    )
    m.add_argument(
        "--attn-target",
        action="append",
        default=[],
        metavar="URL=HOST:PORT",
        help="the attention peer beside instance URL (receives attention "
        "migrations; not one of --attn-peer)",
    )
    m.add_argument(
        "--link-costs",
        type=Path,
        default=None,
        help='JSON {"attention_link"|"layer_link": {"fixed_s", "bandwidth_Bps"}}',
    )
    m.add_argument(
        "--calibrate",
        action="store_true",
        help="without --link-costs: measure them at start against the targets",
    )
    g = p.add_argument_group("controller thresholds (BanaServeConfig)")
    d = BanaServeConfig()
    for name in ("flip_high", "flip_low", "high", "low", "cooldown_s", "budget_s", "warmup_s"):
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    g.add_argument("--persist", type=int, default=d.persist)


def config_from_args(args: argparse.Namespace) -> LiveConfig:
    control = BanaServeConfig(
        flip_high=args.flip_high, flip_low=args.flip_low, high=args.high, low=args.low,
        persist=args.persist, cooldown_s=args.cooldown_s, budget_s=args.budget_s,
        warmup_s=args.warmup_s,
    )  # fmt: skip
    layers, wbytes, kvbytes = 2, 0, 0
    if args.model_config is not None:
        layers, wbytes, kvbytes = model_geometry(json.loads(args.model_config.read_text()))
    return LiveConfig(
        router=args.router, instances=tuple(InstanceSpec.parse(s) for s in args.instance),
        control=control, window_s=args.window, drain_timeout_s=args.drain_timeout,
        flip_cost_s=args.flip_cost, decisions_path=args.decisions, total_layers=layers,
        weight_bytes_per_layer=wbytes, kv_bytes_per_token_layer=kvbytes,
        kv_pressure=KvPressureConfig(peers=tuple(args.attn_peer), high=args.kv_high,
                                     low=args.kv_low, fraction=args.kv_fraction),
        targets=Targets(layer_servers=tuple(parse_target(t) for t in args.layer_server),
                        attn_peers=tuple(parse_target(t) for t in args.attn_target)),
        link_costs=args.link_costs, calibrate=args.calibrate,
    )  # fmt: skip


def model_geometry(cfg: dict, dtype_bytes: int = 4) -> tuple[int, int, int]:
    """(layers, weight bytes per layer, KV bytes per token and layer) of a Llama-like config."""
    layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    params = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter + 2 * hidden
    return layers, params * dtype_bytes, 2 * kv_heads * head_dim * dtype_bytes


def prometheus(ctl: LiveController) -> str:
    lines = ["# TYPE banaserve_controller_windows_total counter",
             f"banaserve_controller_windows_total {ctl.ticks}",
             "# TYPE banaserve_controller_decisions_total counter"]  # fmt: skip
    for (action, outcome), n in sorted(ctl.counts.items()):
        lines.append(f'banaserve_controller_decisions_total{{action="{action}",'
                     f'outcome="{outcome}"}} {n}')  # fmt: skip
    gauges = ("busy", "attn_share", "kv_frac", "kv_used", "waiting", "running", "router_inflight")
    for g in gauges:
        lines.append(f"# TYPE banaserve_instance_{g} gauge")
        for row in ctl.status()["instances"]:
            v = row.get(g)
            if v is not None:
                lines.append(f'banaserve_instance_{g}{{url="{row["url"]}",'
                             f'role="{row["mode"]}"}} {float(v)}')  # fmt: skip
    if ctl.flip_seconds:
        lines += ["# TYPE banaserve_flip_seconds summary",
                  f"banaserve_flip_seconds_sum {sum(ctl.flip_seconds)}",
                  f"banaserve_flip_seconds_count {len(ctl.flip_seconds)}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def serve_http(ctl: LiveController, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?")[0]
            if path == "/status":
                body, ctype = json.dumps(ctl.status()).encode(), "application/json"
            elif path == "/metrics":
                body, ctype = prometheus(ctl).encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="banaserve-control-http",
                     daemon=True).start()  # fmt: skip
    return server


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # explicit handlers: a background job inherits SIGINT ignored otherwise
        signal.signal(sig, lambda *_: stop.set())
    try:
        ctl = LiveController(config_from_args(args)).start()
        if ctl.link_report:
            print(f"banaserve control: link costs {json.dumps(ctl.link_report)}", flush=True)
    except BanaserveError as exc:
        print(f"banaserve control: {exc}", file=sys.stderr)
        return 2
    server = serve_http(ctl, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"banaserve control: http://{host}:{port}/status", flush=True)
    try:
        while not stop.wait(args.window):
            ctl.tick()  # /status reads without the lock: a flip may take a while
    finally:
        server.shutdown()
        server.server_close()
        ctl.close()
    return 0

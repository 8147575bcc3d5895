# SPDX-License-Identifier: Apache-2.0
"""``banaserve pool``: create and own a pool (``serve``), print its statistics (``stats``),
remove a stale one (``rm``).

``serve`` creates the shared-memory segment, reclaims the pins and reservations of dead
processes once a second, exports Prometheus text on ``--metrics-port`` (127.0.0.1 by default),
with ``--listen HOST:PORT`` serves hosts that cannot map the segment (:class:`.server.PoolServer`:
a control connection, pages over the transfer engine's TCP path; clients use ``RemoteKVPool``),
and on SIGTERM/SIGINT closes the segment (attached clients get ``UnavailableError`` and reattach
to the next pool of that name) and removes the name.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import BanaserveError
from .memory import parse_size
from .metrics import prometheus_text
from .pool import KVPool
from .server import PoolServer
from .wire import parse_address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="create a pool and own it until SIGTERM")
    serve.add_argument("--name", required=True, help="pool name ([A-Za-z0-9_.-], up to 64)")
    serve.add_argument("--size", default="1GiB", help="page data capacity, e.g. 8GiB")
    serve.add_argument("--page-size", default="16KiB", help="bytes per page, fixed per pool")
    serve.add_argument("--max-key-len", type=int, default=128)
    serve.add_argument("--max-clients", type=int, default=64)
    serve.add_argument("--high-watermark", type=float, default=0.95)
    serve.add_argument("--low-watermark", type=float, default=0.90)
    serve.add_argument("--metrics-host", default="127.0.0.1")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus text at /metrics (0 picks a free port)",
    )
    serve.add_argument("--reap-interval", type=float, default=1.0, help="seconds")
    serve.add_argument(
        "--replace", action="store_true", help="remove a leftover pool of the same name first"
    )
    serve.add_argument("--no-populate", action="store_true", help="do not pre-fault the segment")
    serve.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="also serve remote clients (RemoteKVPool) here; port 0 picks a free one",
    )
    serve.add_argument(
        "--ops-per-client",
        type=int,
        default=8,
        help="concurrent gets/pins per process; the service pins remote reads with these",
    )
    serve.add_argument(
        "--transfer-timeout", type=float, default=30.0, help="seconds per remote page batch"
    )
    stats = sub.add_parser("stats", help="print a pool's statistics")
    stats.add_argument("--name", required=True)
    stats.add_argument("--format", choices=("prom", "json"), default="prom")
    rm = sub.add_parser("rm", help="remove a pool's name (attached processes keep their mapping)")
    rm.add_argument("--name", required=True)


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "serve":
            return _serve(args)
        if args.action == "stats":
            with KVPool(args.name) as pool:
                stats = pool.stats()
            if args.format == "json":
                print(json.dumps(stats, sort_keys=True))
            else:
                sys.stdout.write(prometheus_text(stats, args.name))
            return 0
        if args.action == "rm":
            KVPool.unlink(args.name)
            return 0
    except BanaserveError as exc:
        print(f"banaserve pool {args.action}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


def _metrics_server(pool: KVPool, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = prometheus_text(pool.stats(), pool.name).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def _serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pool = KVPool(
        args.name,
        create=True,
        capacity_bytes=parse_size(args.size),
        page_size=parse_size(args.page_size),
        max_key_len=args.max_key_len,
        max_clients=args.max_clients,
        ops_per_client=args.ops_per_client,
        high_watermark=args.high_watermark,
        low_watermark=args.low_watermark,
        populate=not args.no_populate,
        replace=args.replace,
    )
    listen = parse_address(args.listen, listen=True) if args.listen else None
    with pool:
        server = None
        remote: PoolServer | None = None
        where = ""
        if listen is not None:
            remote = PoolServer(
                pool,
                listen[0],
                listen[1],
                pin_handles=args.ops_per_client,
                transfer_timeout_s=args.transfer_timeout,
            ).start()
            where += f" remote={remote.address}"
        if args.metrics_port is not None:
            server = _metrics_server(pool, args.metrics_host, args.metrics_port)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            host, port = server.server_address[:2]
            where += f" metrics=http://{host}:{port}/metrics"
        stats = pool.stats()
        print(
            f"banaserve pool: serving {args.name!r}: {stats['num_pages']} pages of "
            f"{stats['page_size']} bytes, segment {stats['segment_bytes']} bytes "
            f"(index overhead {stats['overhead_bytes'] / max(1, stats['segment_bytes']):.2%})"
            f"{where}",
            flush=True,
        )
        try:
            while not stop.wait(args.reap_interval):
                pool.reap()
        finally:
            if remote is not None:
                remote.stop()
            if server is not None:
                server.shutdown()
                server.server_close()
    print(f"banaserve pool: {args.name!r} closed", flush=True)
    return 0

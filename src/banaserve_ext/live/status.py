# SPDX-License-Identifier: Apache-2.0
"""``banaserve status``: the live controller's view of the deployment, as a table.

banaserve status --controller http://127.0.0.1:C      # once
banaserve status --controller http://127.0.0.1:C --watch 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import BanaserveError
from ..launch.servers import http_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", required=True, help="URL of `banaserve control` (its /status)")
    p.add_argument("--watch", type=float, default=0.0, help="repeat every N seconds until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the raw status JSON")


def fetch(url: str) -> dict:
    status, body = http_json(f"{url.rstrip('/')}/status", timeout_s=10.0)
    if status != 200 or not isinstance(body, dict):
        raise BanaserveError(f"{url}/status answered {status}: {body}")
    return body


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(st: dict) -> str:
    head = (f"{'#':>2} {'instance':<24} {'mode':<8} {'router':<8} {'busy':>5} {'attn':>5} "
            f"{'kv':>6} {'kv_used':>7} {'wait':>4} {'run':>4} {'infl':>4}")  # fmt: skip
    lines = [f"router {st.get('router')}  window {st.get('window')}", head]
    for r in st.get("instances", []):
        url = str(r.get("url", "")).removeprefix("http://")
        mode = "DEAD" if r.get("dead") else str(r.get("mode"))
        lines.append(
            f"{r.get('idx'):>2} {url:<24} {mode:<8} {str(r.get('router_role') or '-'):<8} "
            f"{_fmt(r.get('busy'), '5.0%')} {_fmt(r.get('attn_share'), '5.0%')} "
            f"{_fmt(r.get('kv_frac'), '6.1%')} {_fmt(r.get('kv_used'), '>7')} "
            f"{_fmt(r.get('waiting'), '>4')} {_fmt(r.get('running'), '>4')} "
            f"{_fmt(r.get('router_inflight'), '>4')}"
        )
    recent = st.get("recent", [])[-3:]
    for a in recent:
        cost = a.get("measured_cost_s")
        lines.append(f"   last: w{a.get('window')} {a.get('action')} -> {a.get('outcome')}"
                     + (f" ({cost:.2f}s)" if isinstance(cost, float) else "")
                     + (f": {a.get('detail')}" if a.get("detail") else ""))  # fmt: skip
    return "\n".join(lines)


def one_line(st: dict) -> str:
    """A compact status line (for `banaserve launch`)."""
    parts = []
    for r in st.get("instances", []):
        mode = "dead" if r.get("dead") else (r.get("mode") or "?")[:1].upper()
        parts.append(
            f"{mode}{r.get('idx')}:{_fmt(r.get('busy'), '.0%')}"
            f" kv{_fmt(r.get('kv_frac'), '.0%')} q{r.get('waiting')}/{r.get('running')}"
        )
    recent = st.get("recent") or []
    last = f" | last {recent[-1].get('action')}->{recent[-1].get('outcome')}" if recent else ""
    return f"[w{st.get('window')}] " + "  ".join(parts) + last


def main(args: argparse.Namespace) -> int:
    try:
        while True:
            st = fetch(args.controller)
            print(json.dumps(st) if args.json else render(st), flush=True)
            if args.watch <= 0:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    except BanaserveError as exc:
        print(f"banaserve status: {exc}", file=sys.stderr)
        return 1

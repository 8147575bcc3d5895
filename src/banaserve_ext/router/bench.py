# SPDX-License-Identifier: Apache-2.0
"""Peer benchmark: our router against smg and sglang-router on 2 prefill × 2 decode fake workers.

    python -m banaserve_ext.router.bench \\
        --peer smg=/work/scratch/router-peers/smg/bin/python:smg.launch_router \\
        --peer sglang-router=/work/scratch/router-peers/sgr/bin/python:sglang_router.launch_router

Every router runs as its own process with the same sglang_router command line; the fake workers
(one process, :mod:`banaserve_ext.router.testing`) and this client are shared, and routers are
interleaved run by run, so all see the same box. Each figure is the median over ``--runs`` runs.

Cases: ``direct`` (the client talks to one decode worker: the floor), ``c1`` (non-streaming, one
request in flight: p50/p99 latency and router CPU per request), ``c16`` (closed loop, 16 in
flight: requests/s), ``stream`` (streaming on one keep-alive connection, 8 chunks), ``poisson``
(open-loop Poisson arrivals on finite-capacity workers, 80 % of prompts sharing one hot prefix:
p50/p99 latency and the busiest prefill worker's share of requests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .http11 import build_request
from .upstream import UpstreamPool

JSON = "application/json"
_enc = msgspec.json.encode
_dec = msgspec.json.decode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_tree_cpu_s(pid: int) -> float:
    """utime+stime of ``pid`` and all its descendants (threads included), seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()
        ppid = int(rest[1])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = (int(rest[11]) + int(rest[12])) / tick
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        total += stats.get(p, 0.0)
        stack.extend(children.get(p, []))
    return total


@dataclass
class Fleet:
    proc: subprocess.Popen
    prefill: list[tuple[int, int]]  # (port, bootstrap port)
    decode: list[int]

    def urls(self) -> tuple[list[str], list[str]]:
        return (
            [f"http://127.0.0.1:{p}" for p, _ in self.prefill],
            [f"http://127.0.0.1:{p}" for p in self.decode],
        )


@contextlib.contextmanager
def fake_fleet(extra: list[str], log: bool = True) -> Iterator[Fleet]:
    pre = [(free_port(), free_port()) for _ in range(2)]
    dec = [free_port() for _ in range(2)]
    cmd = [sys.executable, "-m", "banaserve_ext.router.testing", "--max-seconds", "3600"]
    for p, b in pre:
        cmd += ["--prefill", f"127.0.0.1:{p}:{b}"]
    for p in dec:
        cmd += ["--decode", f"127.0.0.1:{p}"]
    if not log:
        cmd.append("--no-log")
    proc = subprocess.Popen(cmd + extra, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"fake workers did not start: {line!r}")
        yield Fleet(proc, pre, dec)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RouterProc:
    name: str
    python: str
    module: str
    policy: str
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self, fleet: Fleet) -> None:
        self.port = free_port()
        pre, dec = fleet.urls()
        cmd = [self.python, "-m", self.module, "--pd-disaggregation"]
        for url, (_, bp) in zip(pre, fleet.prefill, strict=True):
            cmd += ["--prefill", url, str(bp)]
        for url in dec:
            cmd += ["--decode", url]
        cmd += [
            "--host", "127.0.0.1", "--port", str(self.port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--shutdown-grace-period-secs", "1", "--log-level", "warn", "--policy", self.policy,
        ]  # fmt: skip
        env = dict(os.environ)
        # peers try to fetch tokenizers from the network: point them at a dead loopback proxy
        env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
        env.update(HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _body(i: int, prefix: str, stream: bool, n_tokens: int = 8) -> bytes:
    text = prefix + f"{i:08d}" + "s" * 192
    obj: dict[str, Any] = {
        "text": text,
        "sampling_params": {"max_new_tokens": n_tokens, "temperature": 0},
    }
    if stream:
        obj["stream"] = True
    return _enc(obj)


def _direct_body(i: int, prefix: str, stream: bool, bp: int) -> bytes:
    obj = _dec(_body(i, prefix, stream))
    obj.update(bootstrap_host="127.0.0.1", bootstrap_port=bp, bootstrap_room=i)
    return _enc(obj)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _wait_ready(port: int, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last: Any = None
    while loop.time() < end:
        pool = UpstreamPool("r", "127.0.0.1", port, loop)
        try:
            data = build_request(
                "POST", f"127.0.0.1:{port}", "/generate", _body(0, "w", False), "application/json"
            )
            head, _ = await pool.fetch(data, 5.0)
            if head.status == 200:
                # peers register workers asynchronously: wait until several calls succeed
                ok = 0
                for k in range(20):
                    h, _ = await pool.fetch(
                        build_request("POST", "r", "/generate", _body(k, "w", False), JSON), 5.0
                    )
                    ok += h.status == 200
                if ok == 20:
                    return
            last = head.status
        except Exception as exc:  # noqa: BLE001 - anything means "not yet"
            last = exc
        finally:
            pool.close()
        await asyncio.sleep(0.2)
    raise RuntimeError(f"router on port {port} never became ready: {last}")


async def closed_loop(
    port: int, n: int, conc: int, stream: bool, direct_bp: int | None = None, warmup: int = 20
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    pools = [UpstreamPool("c", "127.0.0.1", port, loop) for _ in range(conc)]
    host = f"127.0.0.1:{port}"
    lat: list[float] = []
    counter = iter(range(10**9))
    errors = 0

    def make(i: int) -> bytes:
        if direct_bp is not None:
            body = _direct_body(i, "p" * 2000, stream, direct_bp)
        else:
            body = _body(i, "p" * 2000, stream)
        return build_request("POST", host, "/generate", body, "application/json")

    async def one(pool: UpstreamPool, record: bool) -> None:
        nonlocal errors
        i = next(counter)
        data = make(i)
        t = time.perf_counter()
        head, body = await pool.fetch(data, 30.0)
        dt = time.perf_counter() - t
        if head.status != 200 or (stream and not body.endswith(b"data: [DONE]\n\n")):
            errors += 1
        if record:
            lat.append(dt)

    for _ in range(warmup):
        await one(pools[0], False)
    per = n // conc

    async def worker(pool: UpstreamPool) -> None:
        for _ in range(per):
            await one(pool, True)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(p) for p in pools))
    wall = time.perf_counter() - t0
    for p in pools:
        p.close()
    return {
        "p50_ms": pct(lat, 0.5) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "rps": len(lat) / wall,
        "n": len(lat),
        "errors": errors,
    }


async def poisson(
    port: int, rate: float, duration_s: float, hot_frac: float, seed: int
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    idle: list[UpstreamPool] = []
    host = f"127.0.0.1:{port}"
    lat: list[float] = []
    errors = 0
    hot = "H" * 2000
    tasks = []

    async def one(i: int) -> None:
        nonlocal errors
        pool = idle.pop() if idle else UpstreamPool("c", "127.0.0.1", port, loop)
        prefix = hot if rng.random() < hot_frac else f"{i:06d}" * 333
        data = build_request("POST", host, "/generate", _body(i, prefix, False), "application/json")
        t = time.perf_counter()
        try:
            head, _ = await pool.fetch(data, 60.0)
            if head.status != 200:
                errors += 1
            lat.append(time.perf_counter() - t)
        except Exception:  # noqa: BLE001 - counted
            errors += 1
        idle.append(pool)

    t0 = loop.time()
    t_next = t0
    i = 0
    while t_next - t0 < duration_s:
        delay = t_next - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i)))
        i += 1
        t_next += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    for p in idle:
        p.close()
    return {
        "p50_ms": pct(lat, 0.5) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "n": len(lat),
        "errors": errors,
    }


async def worker_counts(fleet: Fleet) -> tuple[list[int], list[int]]:
    loop = asyncio.get_running_loop()
    out = []
    for port in [p for p, _ in fleet.prefill] + fleet.decode:
        pool = UpstreamPool("c", "127.0.0.1", port, loop)
        _, body = await pool.fetch(build_request("GET", "x", "/__fake/requests"), 10.0)
        out.append(len(_dec(body)))
        await pool.fetch(build_request("POST", "x", "/__fake/reset", b"{}"), 10.0)
        pool.close()
    return out[:2], out[2:]


@dataclass
class Results:
    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, router: str, key: str, value: float) -> None:
        self.rows.setdefault(router, {}).setdefault(key, []).append(value)

    def med(self, router: str, key: str) -> float:
        xs = self.rows.get(router, {}).get(key, [])
        return statistics.median(xs) if xs else float("nan")


async def run_overhead(routers: list[RouterProc], runs: int, n: int, res: Results) -> None:
    with fake_fleet([], log=False) as fleet:
        for r in range(runs):
            d = await closed_loop(fleet.decode[0], n, 1, False, direct_bp=fleet.prefill[0][1])
            res.add("direct", "c1_p50", d["p50_ms"])
            res.add("direct", "c1_p99", d["p99_ms"])
            d = await closed_loop(fleet.decode[0], n, 1, True, direct_bp=fleet.prefill[0][1])
            res.add("direct", "stream_p50", d["p50_ms"])
            d = await closed_loop(fleet.decode[0], n * 4, 16, False, direct_bp=fleet.prefill[0][1])
            res.add("direct", "c16_rps", d["rps"])
            order = routers if r % 2 == 0 else list(reversed(routers))
            for rp in order:
                rp.start(fleet)
                try:
                    assert rp.proc is not None
                    await _wait_ready(rp.port)
                    cpu0 = proc_tree_cpu_s(rp.proc.pid)
                    c1 = await closed_loop(rp.port, n, 1, False)
                    cpu1 = proc_tree_cpu_s(rp.proc.pid)
                    res.add(rp.name, "c1_p50", c1["p50_ms"])
                    res.add(rp.name, "c1_p99", c1["p99_ms"])
                    res.add(rp.name, "cpu_us", (cpu1 - cpu0) / (c1["n"] + 20) * 1e6)
                    cpu0 = proc_tree_cpu_s(rp.proc.pid)
                    c16 = await closed_loop(rp.port, n * 4, 16, False)
                    cpu1 = proc_tree_cpu_s(rp.proc.pid)
                    res.add(rp.name, "cpu16_us", (cpu1 - cpu0) / (c16["n"] + 20) * 1e6)
                    res.add(rp.name, "c16_rps", c16["rps"])
                    res.add(rp.name, "c16_p50", c16["p50_ms"])
                    st = await closed_loop(rp.port, n, 1, True)
                    res.add(rp.name, "stream_p50", st["p50_ms"])
                    res.add(rp.name, "stream_p99", st["p99_ms"])
                    errs = c1["errors"] + c16["errors"] + st["errors"]
                    res.add(rp.name, "errors", errs)
                finally:
                    rp.stop()
                print(f"  run {r + 1}/{runs} {rp.name}: done", file=sys.stderr, flush=True)


async def run_poisson(
    routers: list[RouterProc], runs: int, rate: float, duration: float, res: Results
) -> None:
    fake = [
        "--prefill-ms", "4", "--prefill-us-per-token", "12", "--prefill-slots", "2",
        "--decode-ms", "10", "--decode-slots", "32", "--kv-wait-s", "30",
    ]  # fmt: skip
    with fake_fleet(fake) as fleet:
        for r in range(runs):
            order = routers if r % 2 == 0 else list(reversed(routers))
            for rp in order:
                rp.start(fleet)
                try:
                    assert rp.proc is not None
                    await _wait_ready(rp.port)
                    await worker_counts(fleet)  # reset the logs after warm-up
                    out = await poisson(rp.port, rate, duration, 0.8, seed=r)
                    pc, dc = await worker_counts(fleet)
                    res.add(rp.name, "poisson_p50", out["p50_ms"])
                    res.add(rp.name, "poisson_p99", out["p99_ms"])
                    res.add(rp.name, "poisson_share", max(pc) / max(1, sum(pc)) * len(pc))
                    res.add(rp.name, "poisson_dshare", max(dc) / max(1, sum(dc)) * len(dc))
                    res.add(rp.name, "poisson_errors", out["errors"])
                finally:
                    rp.stop()
                print(f"  poisson run {r + 1}/{runs} {rp.name}: done", file=sys.stderr, flush=True)


def render(res: Results, names: list[str]) -> str:
    cols = [
        ("c1 p50 ms", "c1_p50", "{:.3f}"),
        ("c1 p99 ms", "c1_p99", "{:.3f}"),
        ("added p50 ms", None, "{:.3f}"),
        ("CPU µs/req c1", "cpu_us", "{:.0f}"),
        ("CPU µs/req c16", "cpu16_us", "{:.0f}"),
        ("c16 req/s", "c16_rps", "{:.0f}"),
        ("stream p50 ms", "stream_p50", "{:.3f}"),
        ("stream added ms", None, "{:.3f}"),
    ]
    lines = ["| router | " + " | ".join(c[0] for c in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name in ["direct", *names]:
        if "c1_p50" not in res.rows.get(name, {}):
            continue
        cells = []
        for title, key, fmt in cols:
            if title == "added p50 ms":
                v = res.med(name, "c1_p50") - res.med("direct", "c1_p50")
            elif title == "stream added ms":
                v = res.med(name, "stream_p50") - res.med("direct", "stream_p50")
            else:
                assert key is not None
                v = res.med(name, key)
            cells.append("–" if v != v else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pnames = [n for n in names if "poisson_p99" in res.rows.get(n, {})]
    if pnames:
        lines += [
            "",
            "| router (Poisson, hot prefix) | p50 ms | p99 ms | busiest prefill share / fair"
            " | busiest decode share / fair | errors |",
            "|---|---|---|---|---|---|",
        ]
        for name in pnames:
            m = res.med
            lines.append(
                f"| {name} | {m(name, 'poisson_p50'):.1f} | {m(name, 'poisson_p99'):.1f}"
                f" | {m(name, 'poisson_share'):.2f} | {m(name, 'poisson_dshare'):.2f}"
                f" | {sum(res.rows[name]['poisson_errors']):.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m banaserve_ext.router.bench", description=__doc__)
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=PYTHON:MODULE",
        help="a peer router launched as PYTHON -m MODULE with sglang_router flags",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--n", type=int, default=300, help="measured requests at c=1")
    p.add_argument("--rate", type=float, default=200.0, help="Poisson arrivals per second")
    p.add_argument("--duration", type=float, default=8.0, help="Poisson run length, seconds")
    p.add_argument("--peer-policies", default="cache_aware,power_of_two")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-poisson", action="store_true")
    a = p.parse_args(argv)
    ours = RouterProc("banaserve load_aware", sys.executable, "banaserve_ext.router", "load_aware")
    peers: list[tuple[str, str, str]] = []
    for spec in a.peer:
        name, _, rest = spec.partition("=")
        python, _, module = rest.partition(":")
        peers.append((name, python, module))
    overhead = [ours] + [RouterProc(n, py, m, "round_robin") for n, py, m in peers]
    pois = [ours]
    for n, py, m in peers:
        for pol in a.peer_policies.split(","):
            pois.append(RouterProc(f"{n} {pol}", py, m, pol))
    res = Results()

    async def go() -> None:
        if not a.skip_overhead:
            await run_overhead(overhead, a.runs, a.n, res)
        if not a.skip_poisson:
            await run_poisson(pois, a.runs, a.rate, a.duration, res)

    asyncio.run(go())
    names = list(dict.fromkeys([r.name for r in overhead] + [r.name for r in pois]))
    print(render(res, names))
    print()
    print(_enc(res.rows).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

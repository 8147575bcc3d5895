# SPDX-License-Identifier: Apache-2.0
"""Server processes of a deployment: command lines, start, readiness, teardown by PID.

Every server runs in its own session (``start_new_session``), so its process group id equals its
PID and :meth:`ServerProcess.stop` ends the server *and* the scheduler/detokenizer children it
spawned with one ``killpg(pid)``; nothing is ever looked up by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from ..errors import InvalidArgumentError, TransferTimeoutError, UnavailableError

Role = Literal["single", "prefill", "decode"]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


DECODE_RADIX_FLAG = "--disaggregation-decode-enable-radix-cache"


def flipped_decode_radix_args(role: str, extra_args: tuple[str, ...]) -> list[str]:
    """The flag a prefill server with the role switch and a radix cache needs so that, once
    flipped to decode, it decodes on SGLang's decode-side radix path.

    SGLang gives a PD decode server no radix cache unless that flag is set; a prefill server
    flipped to decode keeps its radix tree, and without the flag SGLang 0.5.23 loses the prompt
    slots of every request whose sequence is already in the tree (a repeated prompt): the idle
    pool check then stops the scheduler with "pool memory leak detected". The flag is inert
    while the server prefills. Nothing is added for other roles, without the switch, or when
    the arguments already say how (``--disable-radix-cache`` or the flag itself)."""
    if role != "prefill" or "--enable-pd-role-switch" not in extra_args:
        return []
    if "--disable-radix-cache" in extra_args or DECODE_RADIX_FLAG in extra_args:
        return []
    return [DECODE_RADIX_FLAG]


@dataclass(frozen=True)
class SGLangServerConfig:
    """One SGLang server. ``transfer_backend`` matters only for prefill/decode roles."""

    model_path: str
    port: int
    role: Role = "single"
    host: str = LOOPBACK
    device: str = "cpu"
    bootstrap_port: int | None = None
    transfer_backend: str = "banaserve"
    max_total_tokens: int = 4096
    chunked_prefill_size: int | None = None
    page_size: int | None = None
    extra_args: tuple[str, ...] = ()
    #: opt-in plug-in features SGLang has no argument for (``admin``, ``kv_migration``,
    #: ``layer_migration``; see adapters/sglang/host/selection.py)
    features: tuple[str, ...] = ()
    #: --dtype of a CPU server (float32 keeps greedy ties from flipping between runs)
    dtype: str = "bfloat16"

    def command(self, python: str = sys.executable) -> list[str]:
        if self.role not in ("single", "prefill", "decode"):
            raise InvalidArgumentError(f"unknown server role {self.role!r}")
        if self.role == "prefill" and self.bootstrap_port is None:
            raise InvalidArgumentError("a prefill server needs a bootstrap_port")
        # On CPU, start through our compat launcher (see adapters/sglang/cpu_compat.py).
        module = (
            "banaserve_ext.adapters.sglang.serve_cpu"
            if self.device == "cpu"
            else "sglang.launch_server"
        )
        cmd = [
            python, "-m", module,
            "--model-path", self.model_path,
            "--host", self.host,
            "--port", str(self.port),
            "--device", self.device,
            "--max-total-tokens", str(self.max_total_tokens),
            "--skip-server-warmup",
        ]  # fmt: skip
        if self.device == "cpu":
            cmd += [
                "--attention-backend", "torch_native",
                "--disable-cuda-graph",
                "--dtype", self.dtype,
                # a radix-cache hit with overlap scheduling calls torch.cuda.Event()
                "--disable-overlap-schedule",
                # an idle scheduler otherwise spins on a core the busy ones need (CPU servers
                # share the machine's cores); the admin channel wakes it (adapters/sglang/admin)
                "--sleep-on-idle",
            ]  # fmt: skip
        if self.chunked_prefill_size is not None:
            cmd += ["--chunked-prefill-size", str(self.chunked_prefill_size)]
        if self.page_size is not None:
            cmd += ["--page-size", str(self.page_size)]
        if self.role != "single":
            cmd += [
                "--disaggregation-mode", self.role,
                "--disaggregation-transfer-backend", self.transfer_backend,
            ]  # fmt: skip
            if self.bootstrap_port is not None:
                cmd += ["--disaggregation-bootstrap-port", str(self.bootstrap_port)]
            if self.role == "decode" and self.device == "cpu":
                # the default backup (a host pool) sizes itself against free host memory and
                # refuses to start on a small box; a plain CPU tensor is enough here
                cmd += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
        if self.features and self.device == "cpu":  # our launcher takes the opt-in as a flag
            cmd += ["--banaserve-features", ",".join(self.features)]
        return cmd + list(self.extra_args) + flipped_decode_radix_args(self.role, self.extra_args)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for the server: its PD control plane (ZMQ, bootstrap registration, our
        transfer engine) binds to SGLANG_HOST_IP, which must match the serving host."""
        env = {"SGLANG_HOST_IP": self.host}
        if self.features and self.device != "cpu":  # sglang.launch_server: the opt-in variable
            from .. import _env

            env[_env.SGLANG_FEATURES.name] = ",".join(self.features)
        return env


@dataclass(frozen=True)
class RouterConfig:
    """A PD router in front of prefill (url, bootstrap port) and decode urls: ``sglang_router``
    (``module="sglang_router"``) or this project's drop-in (``module="banaserve"``), started with
    the same flags."""

    port: int
    prefill: tuple[tuple[str, int], ...]
    decode: tuple[str, ...]
    host: str = LOOPBACK
    policy: str = "round_robin"
    #: the router always exports Prometheus metrics (default 0.0.0.0:29000); bind them beside
    #: the router instead, on a port of their own, so several routers can run on one host
    prometheus_port: int = 0
    module: str = "sglang_router"
    #: further router flags (the hand-off path: ``--dynaserve-handoff --handoff-kv-pool NAME``)
    extra: tuple[str, ...] = ()

    def command(self, python: str = sys.executable) -> list[str]:
        if not self.prefill or not self.decode:
            raise InvalidArgumentError("a PD router needs at least one prefill and one decode")
        if self.module == "banaserve":
            cmd = [python, "-m", "banaserve_ext.router", "--pd-disaggregation"]
        elif self.module == "sglang_router":
            # through our wrapper: the router's imports reach torchvision (see cpu_compat)
            cmd = [python, "-m", "banaserve_ext.adapters.sglang.router_cpu", "--pd-disaggregation"]
        else:
            raise InvalidArgumentError(
                f"unknown router {self.module!r}: sglang_router or banaserve"
            )
        for url, bootstrap in self.prefill:
            cmd += ["--prefill", url, str(bootstrap)]
        for url in self.decode:
            cmd += ["--decode", url]
        cmd += ["--host", self.host, "--port", str(self.port), "--policy", self.policy]
        cmd += [
            "--prometheus-host",
            self.host,
            "--prometheus-port",
            str(self.prometheus_port or free_port(self.host)),
        ]
        return cmd + list(self.extra)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def http_json(
    url: str, payload: dict | None = None, timeout_s: float = 60.0
) -> tuple[int, dict | str]:
    """GET (no payload) or POST JSON; returns (status, decoded body). Never raises on HTTP
    status; raises :class:`UnavailableError` when the connection itself fails."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise UnavailableError(f"{url}: {exc}") from None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def kv_slots(url: str, timeout_s: float = 30.0) -> dict:
    """The KV slot counts of one SGLang server (data-parallel rank 0), read-only, from SGLang's
    own ``GET /v1/loads``: ``used`` = total slots - (free + evictable from the radix/HiCache
    tree), i.e. the slots held by requests; ``running``/``waiting`` requests, and the queues'
    paused and retracted requests."""
    status, body = http_json(f"{url}/v1/loads?include=core,queues", timeout_s=timeout_s)
    if status != 200 or not isinstance(body, dict) or not body.get("loads"):
        raise UnavailableError(f"{url}/v1/loads answered {status}: {str(body)[:200]}")
    load = body["loads"][0]
    queues = load.get("queues") or {}
    return {
        "total": int(load.get("max_total_num_tokens", 0)),
        "used": int(load.get("num_used_tokens", 0)),
        "running": int(load.get("num_running_reqs", 0)),
        "waiting": int(load.get("num_waiting_reqs", 0)),
        "paused": int(queues.get("paused", 0)),
        "retracted": int(queues.get("retracted", 0)),
    }


def kv_slot_leaks(url: str, settle_s: float = 30.0, poll_s: float = 0.25) -> list[str]:
    """What an idle SGLang server still holds: empty when every KV slot is free or evictable
    and no request is running or queued. Polls up to ``settle_s`` first (HiCache write-backs
    pin their tree nodes until the copy ends); the answer lists the last counts otherwise."""
    deadline = time.monotonic() + settle_s
    while True:
        c = kv_slots(url)
        held = [f"{k}={c[k]}" for k in ("used", "running", "waiting", "paused", "retracted")
                if c[k]]  # fmt: skip
        if not held or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if not held:
        return []
    return [f"{url}: {', '.join(held)} of {c['total']} KV slots after {settle_s:.0f} s idle"]


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes whose process group is ``pgid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(entry))
    return out


@dataclass
class ServerProcess:
    """A subprocess with a readiness probe. Not started by the constructor."""

    name: str
    command: list[str]
    ready_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> ServerProcess:
        if self._proc is not None:
            raise InvalidArgumentError(f"{self.name} already started (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **self.env}
        self._proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: pgid == pid
        )
        return self

    def alive(self) -> bool:
        """Whether the server process itself still runs (reaps it if it exited)."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, nbytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise UnavailableError(
                    f"{self.name} (pid {self.pid}) exited with "
                    f"{self._proc and self._proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                status, _ = http_json(self.ready_url, timeout_s=5.0)
                if status == 200:
                    return
            except UnavailableError:
                pass
            time.sleep(poll_s)
        raise TransferTimeoutError(
            f"{self.name} not ready after {timeout_s:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def kill_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        """Whether any live (non-zombie) process of this server's process group remains."""
        return self._proc is not None and bool(group_members(self._proc.pid))

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server (its own shutdown ends its children), then SIGKILL its whole
        process group, whatever is left of it after ``grace_s``. Idempotent."""
        if self._proc is None:
            return
        if self.alive():
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.alive() or self.group_alive()):
            time.sleep(0.1)
        if self.alive() or self.group_alive():
            self.kill_group(signal.SIGKILL)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5.0  # SIGKILLed children need a moment to be gone
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

# SPDX-License-Identifier: Apache-2.0
"""A group of SGLang servers (and routers) started for one test; see the package doc."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from banaserve_ext.launch.servers import (
    RouterConfig,
    ServerProcess,
    SGLangServerConfig,
    free_port,
    http_json,
)

from . import MAX_SERVERS

READY_TIMEOUT_S = 180.0
#: SGLang takes >10 s to exit gracefully after SIGTERM; tests do not wait for that.
STOP_GRACE_S = 2.0


class Cluster:
    def __init__(self, model_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.processes: list[ServerProcess] = []
        self._servers: list[ServerProcess] = []  # the SGLang servers among processes

    # -- starting -------------------------------------------------------------------------
    def _add(self, proc: ServerProcess) -> ServerProcess:
        self.processes.append(proc)
        proc.start()
        return proc

    def server(
        self,
        role: str = "single",
        *,
        wait: bool = True,
        env: dict[str, str] | None = None,
        **kw: object,
    ) -> tuple[SGLangServerConfig, ServerProcess]:
        if sum(p.group_alive() for p in self._servers) >= MAX_SERVERS:
            raise RuntimeError(f"test bed limit: at most {MAX_SERVERS} SGLang servers at once")
        port = free_port()
        if role == "prefill" and "bootstrap_port" not in kw:
            kw["bootstrap_port"] = free_port()
        cfg = SGLangServerConfig(model_path=str(self.model_dir), port=port, role=role, **kw)  # type: ignore[arg-type]
        # /health_generate runs a real forward pass; PD workers cannot serve it alone.
        ready = f"{cfg.url}/health_generate" if role == "single" else f"{cfg.url}/health"
        name = f"{role}-{port}"
        proc = ServerProcess(
            name,
            cfg.command(),
            ready,
            self.log_dir / f"{name}.log",
            {**cfg.env(), **self.env, **(env or {})},
        )
        self._servers.append(proc)
        self._add(proc)
        if wait:
            proc.wait_ready(READY_TIMEOUT_S)
        return cfg, proc

    def router(
        self,
        prefill: list[SGLangServerConfig],
        decode: list[SGLangServerConfig],
        module: str = "sglang_router",
    ) -> tuple[RouterConfig, ServerProcess]:
        cfg = RouterConfig(
            port=free_port(),
            prefill=tuple((p.url, int(p.bootstrap_port or 0)) for p in prefill),
            decode=tuple(d.url for d in decode),
            module=module,
        )
        name = f"router-{cfg.port}"
        proc = self._add(
            ServerProcess(name, cfg.command(), f"{cfg.url}/health", self.log_dir / f"{name}.log")
        )
        proc.wait_ready(READY_TIMEOUT_S)
        return cfg, proc

    def wait_all(self) -> None:
        for proc in self.processes:
            proc.wait_ready(READY_TIMEOUT_S)

    # -- teardown -------------------------------------------------------------------------
    def stop(self, proc: ServerProcess) -> None:
        proc.stop(STOP_GRACE_S)

    def close(self) -> None:
        errors = []
        for proc in reversed(self.processes):
            try:
                proc.stop(STOP_GRACE_S)
            except Exception as exc:  # keep stopping the others
                errors.append(f"{proc.name}: {exc}")
        leftover = [p.name for p in self.processes if p.group_alive()]
        self.processes.clear()
        self._servers.clear()
        if errors or leftover:
            raise RuntimeError(f"teardown failed: {errors} still running: {leftover}")


def generate(
    url: str,
    *,
    text: str | None = None,
    input_ids: list[int] | None = None,
    max_new_tokens: int = 16,
    retry_503_s: float = 30.0,
    timeout_s: float = 120.0,
) -> dict:
    """Greedy ``/generate``; retries the router's 503s that follow worker readiness."""
    payload: dict = {
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0},
    }
    if text is not None:
        payload["text"] = text
    if input_ids is not None:
        payload["input_ids"] = input_ids
    deadline = time.monotonic() + retry_503_s
    while True:
        status, body = http_json(f"{url}/generate", payload, timeout_s=timeout_s)
        if status == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        if status != 200 or not isinstance(body, dict):
            raise AssertionError(f"/generate at {url} answered {status}: {body}")
        return body


@contextmanager
def slowed(url: str, forward_sleep_s: float) -> Iterator[None]:
    """The server at ``url`` sleeps ``forward_sleep_s`` before each forward while the block
    runs (SGLang's own test endpoint ``POST /slow_down``), and runs at full speed again after,
    whatever happens. For tests that must act on a request mid-generation: N tokens then take
    over N x ``forward_sleep_s`` seconds however fast the box decodes."""

    def set_sleep(s: float) -> None:  # SGLang: 0 turns it off
        status, body = http_json(f"{url}/slow_down", {"forward_sleep_time": s}, timeout_s=60.0)
        if status != 200:
            raise AssertionError(f"/slow_down at {url} answered {status}: {body}")

    set_sleep(forward_sleep_s)
    try:
        yield
    finally:
        set_sleep(0)

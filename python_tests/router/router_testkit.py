# SPDX-License-Identifier: Apache-2.0
"""Helpers for the router tests: fake workers and a router on loopback in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import msgspec

from banaserve_ext.router import Router, RouterConfig, WorkerSpec
from banaserve_ext.router.http11 import ResponseHead, build_request
from banaserve_ext.router.testing import FakeConfig, FakeFleet, FakeSpec
from banaserve_ext.router.upstream import UpstreamPool


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class Client:
    """A keep-alive HTTP client to one server (our upstream pool: real sockets)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pool = UpstreamPool("client", "127.0.0.1", port, asyncio.get_running_loop())

    async def request(
        self, method: str, path: str, body: bytes = b"", timeout: float = 20.0
    ) -> tuple[ResponseHead, bytes]:
        data = build_request(method, f"127.0.0.1:{self.port}", path, body, "application/json")
        return await self.pool.fetch(data, timeout)

    async def post(self, path: str, obj: Any, timeout: float = 20.0) -> tuple[int, bytes]:
        head, body = await self.request("POST", path, msgspec.json.encode(obj), timeout)
        return head.status, body

    async def get(self, path: str) -> tuple[int, bytes]:
        head, body = await self.request("GET", path)
        return head.status, body

    def close(self) -> None:
        self.pool.close()


class Setup:
    def __init__(self, fleet: FakeFleet, router: Router, client: Client) -> None:
        self.fleet = fleet
        self.router = router
        self.client = client
        self.prefill = [s for s in fleet.specs if s.role == "prefill"]
        self.decode = [s for s in fleet.specs if s.role == "decode"]
        self.regular = [s for s in fleet.specs if s.role == "regular"]

    def log(self, spec: FakeSpec) -> list[dict]:
        return self.fleet.worker(spec.port).log

    def all_logs(self, role: str) -> list[dict]:
        return [e for s in self.fleet.specs if s.role == role for e in self.log(s)]


@contextlib.asynccontextmanager
async def _serve(fleet: FakeFleet, cfg: RouterConfig) -> AsyncIterator[Setup]:
    """A started router over a started fleet, with a client; stops all three after."""
    router = Router(cfg)
    try:
        await router.start()
        assert router.bound_port is not None
        client = Client(router.bound_port)
        try:
            yield Setup(fleet, router, client)
        finally:
            client.close()
            await router.stop(grace_s=1.0)
    finally:
        await fleet.stop()


@contextlib.asynccontextmanager
async def pd_setup(
    n_prefill: int = 2,
    n_decode: int = 2,
    fake: FakeConfig | None = None,
    **router_options: Any,
) -> AsyncIterator[Setup]:
    specs = [FakeSpec("127.0.0.1", 0, "prefill", 0) for _ in range(n_prefill)]
    specs += [FakeSpec("127.0.0.1", 0, "decode") for _ in range(n_decode)]
    fleet = FakeFleet(specs, fake or FakeConfig(kv_wait_s=5.0))
    await fleet.start()
    opts: dict[str, Any] = dict(port=0, prometheus_port=0, seed=1234, load_monitor_interval=0)
    opts.update(router_options)
    cfg = RouterConfig(
        prefill=[
            WorkerSpec(s.url, "prefill", s.bootstrap_port) for s in specs if s.role == "prefill"
        ],
        decode=[WorkerSpec(s.url, "decode") for s in specs if s.role == "decode"],
        **opts,
    )
    async with _serve(fleet, cfg) as setup:
        yield setup


@contextlib.asynccontextmanager
async def single_setup(
    n_workers: int = 2, fake: FakeConfig | None = None, **router_options: Any
) -> AsyncIterator[Setup]:
    """Single-worker mode (``--worker-urls``): ``n_workers`` regular fake workers."""
    specs = [FakeSpec("127.0.0.1", 0, "regular") for _ in range(n_workers)]
    fleet = FakeFleet(specs, fake or FakeConfig())
    await fleet.start()
    opts: dict[str, Any] = dict(port=0, prometheus_port=0, seed=1234, load_monitor_interval=0)
    opts.update(router_options)
    cfg = RouterConfig(
        workers=[WorkerSpec(s.url, "colocated") for s in specs], pd_disaggregation=False, **opts
    )
    async with _serve(fleet, cfg) as setup:
        yield setup


async def eventually(cond: Any, timeout: float = 5.0) -> bool:
    """Poll ``cond()`` until true or ``timeout`` passes (a bound, not a measurement)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return bool(cond())

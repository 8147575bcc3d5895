# SPDX-License-Identifier: Apache-2.0
"""What ``banaserve launch`` starts, as plain data (ports picked when planned, nothing started).

``banaserve`` (the default), BanaServe as a whole:

* the global KV store (``banaserve pool serve``), sized in pages of this model's HiCache page;
* every prefill server with HiCache L3 on that store (``--hicache-storage-backend dynamic``),
  every server with SGLang's runtime role switch (``--enable-pd-role-switch``, each with its own
  ``--disaggregation-bootstrap-port``: with role switch every instance runs a bootstrap server);
* the ``banaserve`` transfer backend, this project's router with ``load_aware``;
* the live controller (``banaserve control``) over all of them, with ``--attn-peers`` attention
  peers (1 by default) for attention-level KV migration under KV pressure, one attention peer
  beside each server as the target of the controller's attention migrations (not with
  ``--no-attn-targets``), and with ``--layer-migration`` a layer server beside each prefill
  server (layer migration moves within the prefill tier; it needs ``--no-store``: HiCache copies
  every layer's KV, and a migrated layer's KV is gone from the donor). The controller calibrates
  its link costs against these targets at start;
* the router serves requests on its hand-off path (``--dynaserve-handoff --handoff-kv-pool`` the
  store; not with ``--no-handoff`` or ``--no-store``): a flip's drain moves the decode server's
  running requests to another pair (docs/handoff.md) instead of waiting for them.

``sglang`` (``--baseline sglang``): the stock deployment for side-by-side runs: ``sglang_router``
with ``cache_aware``, no store, no role switch, no controller, Mooncake transfer when the
Mooncake package is installed (else ``banaserve``, said in :attr:`Deployment.notes`).

Decode servers get no HiCache here (not tried live: HiCache sits on the radix tree, which a PD
decode server runs without by default), so an instance started as decode and flipped to prefill
serves without L3 (no prefix reuse from the store) — see docs/live.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError
from .servers import LOOPBACK, RouterConfig, SGLangServerConfig, free_port

BASELINES = ("banaserve", "sglang")
#: plug-in features the BanaServe deployment's servers opt into (adapters/sglang/host): the live
#: controller reads ``signals`` and moves KV with ``kv_migration``
LIVE_FEATURES = ("signals", "kv_migration")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "half": 2, "float": 4}


@dataclass(frozen=True)
class PoolPlan:
    name: str
    page_bytes: int
    size: str
    metrics_port: int
    host: str = LOOPBACK

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "banaserve_ext", "pool", "serve", "--name", self.name,
                "--size", self.size, "--page-size", str(self.page_bytes), "--replace",
                "--no-populate", "--metrics-host", self.host,
                "--metrics-port", str(self.metrics_port)]  # fmt: skip

    @property
    def ready_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def hicache_args(self) -> tuple[str, ...]:
        extra = json.dumps({
            "backend_name": "banaserve",
            "module_path": "banaserve_ext.adapters.sglang.hicache",
            "class_name": "BanaserveHiCacheStorage",
            "pool": self.name,
            "interface_v1": 1,
        })  # fmt: skip
        return (
            "--enable-hierarchical-cache", "--hicache-io-backend", "direct",
            "--hicache-mem-layout", "layer_first", "--hicache-size", "1",
            "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", extra,
            # with the default `timeout` policy a small model outruns the prefetch
            "--hicache-storage-prefetch-policy", "wait_complete",
        )  # fmt: skip


@dataclass(frozen=True)
class PeerPlan:
    """An attention peer (``python -m banaserve_ext.migration.attn_peer``): where a decode
    server under KV pressure moves part of its requests' KV."""

    port: int
    host: str = LOOPBACK

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "banaserve_ext.migration.attn_peer", "--host", self.host,
                "--port", str(self.port)]  # fmt: skip

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class LayerServerPlan:
    """A layer server (``python -m banaserve_ext.migration.layer_server``) beside one prefill
    server: where a hot prefill server's last layers go."""

    port: int
    owner_url: str
    host: str = LOOPBACK

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "banaserve_ext.migration.layer_server", "--host", self.host,
                "--port", str(self.port)]  # fmt: skip

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


#: seconds the launched controller waits before its first action
WARMUP_S = 10.0


@dataclass(frozen=True)
class ControllerPlan:
    port: int
    router_url: str
    instances: tuple[str, ...]  # URL,BOOTSTRAP
    decisions: Path
    extra: tuple[str, ...] = ()
    host: str = LOOPBACK
    model_config: str | None = None

    def command(self, python: str = sys.executable) -> list[str]:
        cmd = [python, "-m", "banaserve_ext", "control", "--router", self.router_url,
               "--host", self.host, "--port", str(self.port),
               "--decisions", str(self.decisions)]  # fmt: skip
        for inst in self.instances:
            cmd += ["--instance", inst]
        if self.model_config:
            cmd += ["--model-config", self.model_config]
        return cmd + list(self.extra)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Deployment:
    kind: str
    prefill: list[SGLangServerConfig]
    decode: list[SGLangServerConfig]
    router: RouterConfig
    pool: PoolPlan | None = None
    controller: ControllerPlan | None = None
    peers: list[PeerPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the controller's migration targets: (instance URL, plan) pairs
    attn_targets: list[tuple[str, PeerPlan]] = field(default_factory=list)
    layer_servers: list[LayerServerPlan] = field(default_factory=list)


def hicache_page_bytes(model_config: dict, dtype: str, page_size: int = 1) -> int:
    """Bytes of one HiCache page (``layer_first``, MHA: K and V of every layer)."""
    heads = int(model_config["num_attention_heads"])
    kv_heads = int(model_config.get("num_key_value_heads", heads))
    head_dim = int(model_config.get("head_dim") or int(model_config["hidden_size"]) // heads)
    if dtype not in DTYPE_BYTES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; one of {sorted(DTYPE_BYTES)}")
    layers = int(model_config["num_hidden_layers"])
    return 2 * layers * page_size * kv_heads * head_dim * DTYPE_BYTES[dtype]


def mooncake_installed() -> bool:
    return importlib.util.find_spec("mooncake") is not None


def plan_deployment(args, model: str) -> Deployment:  # noqa: ANN001 - argparse namespace
    """The whole deployment for ``args`` (see :func:`banaserve_ext.launch.cli.add_arguments`)."""
    kind = getattr(args, "baseline", None) or "banaserve"
    if kind not in BASELINES:
        raise InvalidArgumentError(f"--baseline must be one of {BASELINES}, got {kind!r}")
    if args.prefill < 1 or args.decode < 1:
        raise InvalidArgumentError("need at least one prefill and one decode server")
    ours = kind == "banaserve"
    notes: list[str] = []
    backend = args.transfer_backend
    if not ours and backend is None:
        backend = "mooncake" if mooncake_installed() else "banaserve"
        if backend != "mooncake":
            notes.append("Mooncake is not installed: the baseline uses the banaserve transfer "
                         "backend (everything else stock)")  # fmt: skip
    backend = backend or "banaserve"
    if ours and backend != "banaserve":
        raise InvalidArgumentError(
            "the BanaServe deployment needs the banaserve transfer backend (role switch, "
            f"layer-wise send); got {backend!r} (use --baseline sglang for other backends)"
        )
    layer_mig = bool(getattr(args, "layer_migration", False))
    if layer_mig and (not ours or args.no_controller):
        raise InvalidArgumentError("--layer-migration is a BanaServe controller action: not with "
                                   "--baseline sglang or --no-controller")  # fmt: skip
    if layer_mig and not args.no_store:
        raise InvalidArgumentError(
            "--layer-migration needs --no-store: the store puts HiCache on every prefill server, "
            "and HiCache copies every layer's KV, which a migrated layer no longer has here "
            "(layer migration moves within the prefill tier, so no server could send)"
        )
    # a moved request's prompt KV comes from the store through the prefill servers' HiCache L3
    handoff = ours and not args.no_store and not getattr(args, "no_handoff", False)
    host = args.host
    model_cfg_path = Path(model) / "config.json"
    model_cfg = json.loads(model_cfg_path.read_text()) if model_cfg_path.is_file() else None
    pool = None
    if ours and not args.no_store:
        if model_cfg is None:
            raise InvalidArgumentError(f"{model_cfg_path} missing: cannot size the KV store pages")
        pool = PoolPlan(name=f"banaserve-launch-{os.getpid()}",
                        page_bytes=hicache_page_bytes(model_cfg, args.dtype),
                        size=args.store_size, metrics_port=free_port(host), host=host)  # fmt: skip
    role_switch = ("--enable-pd-role-switch",) if ours else ()
    common = dict(
        model_path=model, host=host, device=args.device, transfer_backend=backend,
        max_total_tokens=args.max_total_tokens, chunked_prefill_size=args.chunked_prefill_size,
        dtype=args.dtype, features=LIVE_FEATURES if ours else (),
    )  # fmt: skip
    pkw = dict(common, features=LIVE_FEATURES + ("layer_migration",)) if layer_mig else common
    prefill = [
        SGLangServerConfig(port=free_port(host), role="prefill", bootstrap_port=free_port(host),
                           extra_args=role_switch + (pool.hicache_args() if pool else ())
                           + tuple(args.server_arg), **pkw)  # type: ignore[arg-type]
        for _ in range(args.prefill)
    ]  # fmt: skip
    # a PD decode server runs without radix cache anyway (SGLang resolves it so), but
    # `server_args.disable_radix_cache` stays False unless given, and the KV-migration kinds
    # check that flag
    no_radix = ("--disable-radix-cache",) if ours else ()
    decode = [
        SGLangServerConfig(port=free_port(host), role="decode",
                           bootstrap_port=free_port(host) if ours else None,
                           extra_args=role_switch + no_radix + tuple(args.server_arg),
                           **common)  # type: ignore[arg-type]
        for _ in range(args.decode)
    ]  # fmt: skip
    router = RouterConfig(
        port=args.port or free_port(host),
        prefill=tuple((p.url, int(p.bootstrap_port or 0)) for p in prefill),
        decode=tuple(d.url for d in decode), host=host,
        policy=args.policy or ("load_aware" if ours else "cache_aware"),
        module="banaserve" if ours else "sglang_router",
        extra=("--dynaserve-handoff", "--handoff-kv-pool", pool.name) if handoff and pool else (),
    )  # fmt: skip
    controller = None
    peers: list[PeerPlan] = []
    targets: list[tuple[str, PeerPlan]] = []
    layer_servers: list[LayerServerPlan] = []
    if ours and not args.no_controller:
        peers = [PeerPlan(free_port(host), host) for _ in range(args.attn_peers)]
        peer_args = tuple(a for p in peers for a in ("--attn-peer", p.address))
        if not getattr(args, "no_attn_targets", False):
            targets = [(s.url, PeerPlan(free_port(host), host)) for s in prefill + decode]
        layer_servers = [LayerServerPlan(free_port(host), s.url, host) for s in prefill
                         if layer_mig]  # fmt: skip
        peer_args += tuple(a for u, p in targets for a in ("--attn-target", f"{u}={p.address}"))
        peer_args += tuple(
            a for ls in layer_servers for a in ("--layer-server", f"{ls.owner_url}={ls.address}")
        )
        if targets or layer_servers:
            peer_args += ("--calibrate",)
        controller = ControllerPlan(
            port=free_port(host), router_url=router.url,
            instances=tuple(f"{s.url},{s.bootstrap_port}" for s in prefill + decode),
            decisions=args.log_dir / "decisions.jsonl",
            # no action while the servers warm up and the first windows fill (a --controller-arg
            # --warmup-s given by the user comes later and wins)
            extra=peer_args + ("--warmup-s", str(WARMUP_S)) + tuple(args.controller_arg),
            host=host, model_config=str(model_cfg_path) if model_cfg else None,
        )  # fmt: skip
    return Deployment(kind, prefill, decode, router, pool, controller, peers, notes, targets,
                      layer_servers)  # fmt: skip

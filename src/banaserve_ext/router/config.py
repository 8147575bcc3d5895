# SPDX-License-Identifier: Apache-2.0
"""Router configuration and the command line, compatible with ``sglang_router.launch_router``'s
PD flags (a user swaps the module name and nothing else).

Flags sglang_router accepts that this router does not act on (``--dp-aware``, ``--api-key``,
service discovery, ...) are accepted and reported once at start-up, so an existing launch line
keeps working.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import InvalidArgumentError
from ..policies import POLICIES
from .slo import SLOTargets

DEFAULT_MAX_PAYLOAD = 512 * 1024 * 1024


@dataclass
class WorkerSpec:
    url: str
    role: str  # prefill | decode | colocated
    bootstrap_port: int | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        return split_url(self.url)


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidArgumentError(f"worker URL must look like http://HOST:PORT, got {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise InvalidArgumentError(f"bad port in worker URL {url!r}") from None
    if parts.path not in ("", "/"):
        raise InvalidArgumentError(f"worker URL must not have a path, got {url!r}")
    return parts.hostname, port


def normalize_url(url: str) -> str:
    host, port = split_url(url)
    return f"http://{host}:{port}"


@dataclass
class RouterConfig:
    prefill: list[WorkerSpec] = field(default_factory=list)
    decode: list[WorkerSpec] = field(default_factory=list)
    #: non-PD mode: plain workers, one leg per request
    workers: list[WorkerSpec] = field(default_factory=list)
    pd_disaggregation: bool = True
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "load_aware"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 1 << 26
    worker_overload_shed: bool = False
    seed: int | None = None
    prometheus_host: str | None = "127.0.0.1"
    prometheus_port: int | None = 29000
    request_timeout_secs: float = 1800.0
    shutdown_grace_period_secs: float = 180.0
    max_payload_size: int = DEFAULT_MAX_PAYLOAD
    retry_max_retries: int = 5
    retry_initial_backoff_ms: float = 50.0
    retry_max_backoff_ms: float = 30000.0
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    disable_circuit_breaker: bool = False
    health_check_interval_secs: float = 60.0
    health_check_timeout_secs: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False
    load_monitor_interval: float = 10.0
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: float = 60.0
    chars_per_token: float = 4.0
    tokenizer_path: str | None = None
    log_level: str = "warning"
    #: hand-off path for /generate (docs/handoff.md): DynaServe segments between two workers;
    #: in PD mode, PD legs that live migration moves off a decode worker
    dynaserve_handoff: bool = False
    handoff_kv_pool: str | None = None
    handoff_l3_wait_secs: float = 10.0
    #: SLO targets that give every hand-off segment a deadline priority (docs/handoff.md,
    #: "SLO-aware batch formation"); None: segments go without one
    handoff_slo_ttft_ms: float | None = None
    handoff_slo_tbt_ms: float | None = None

    def validate(self) -> None:
        for name in (self.policy, self.prefill_policy, self.decode_policy):
            if name is not None and name not in POLICIES:
                raise InvalidArgumentError(
                    f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}"
                )
        if self.pd_disaggregation and self.workers:
            raise InvalidArgumentError("--worker-urls is for non-PD mode; use --prefill/--decode")
        if self.max_payload_size <= 0:
            raise InvalidArgumentError("--max-payload-size must be > 0")
        if self.request_timeout_secs <= 0:
            raise InvalidArgumentError("--request-timeout-secs must be > 0")
        if self.chars_per_token <= 0:
            raise InvalidArgumentError("--chars-per-token must be > 0")
        for spec in (*self.prefill, *self.decode, *self.workers):
            split_url(spec.url)
        if self.handoff_l3_wait_secs < 0:
            raise InvalidArgumentError("--handoff-l3-wait-secs must be >= 0")
        slo = SLOTargets.from_ms(self.handoff_slo_ttft_ms, self.handoff_slo_tbt_ms)
        if slo is not None and not self.dynaserve_handoff:
            raise InvalidArgumentError(
                "--handoff-slo-ttft-ms/--handoff-slo-tbt-ms act on the hand-off path only: "
                "add --dynaserve-handoff"
            )


def _prefill_spec(values: list[str]) -> WorkerSpec:
    if not 1 <= len(values) <= 2:
        raise InvalidArgumentError(f"--prefill takes URL [BOOTSTRAP_PORT|none], got {values}")
    port: int | None = None
    if len(values) == 2 and values[1].lower() != "none":
        try:
            port = int(values[1])
        except ValueError:
            raise InvalidArgumentError(f"bad bootstrap port {values[1]!r} for --prefill") from None
        if not 0 < port < 65536:
            raise InvalidArgumentError(f"bootstrap port out of range: {port}")
    return WorkerSpec(normalize_url(values[0]), "prefill", port)


#: sglang_router flags accepted for compatibility and not acted on: name -> nargs
_IGNORED_FLAGS: dict[str, str | None] = {
    "--dp-aware": None,
    "--enable-igw": None,
    "--api-key": "?",
    "--log-dir": "?",
    "--log-json": None,
    "--service-discovery": None,
    "--selector": "*",
    "--prefill-selector": "*",
    "--decode-selector": "*",
    "--service-discovery-port": "?",
    "--service-discovery-namespace": "?",
    "--bootstrap-port-annotation": "?",
    "--worker-startup-timeout-secs": "?",
    "--worker-startup-check-interval": "?",
    "--bucket-adjust-interval-secs": "?",
    "--request-id-headers": "*",
    "--cors-allowed-origins": "*",
    "--cb-window-duration-secs": "?",
    "--rate-limit-tokens-per-second": "?",
    "--model-path": "?",
    "--chat-template": "?",
    "--disable-tokenizer-autoload": None,
    "--pd-admission-wait-secs": "?",
    "--prefill-max-inflight-requests-per-worker": "?",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workers (sglang_router PD flags)")
    g.add_argument("--pd-disaggregation", action="store_true", help="PD mode (the default)")
    g.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=[],
        metavar="URL [BOOTSTRAP_PORT|none]",
        help="a prefill worker and its bootstrap port (repeatable)",
    )
    g.add_argument("--decode", nargs=1, action="append", default=[], metavar="URL")
    g.add_argument("--worker-urls", nargs="*", default=[], help="non-PD mode: plain workers")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=30000)
    g.add_argument("--prometheus-host", default="127.0.0.1")
    g.add_argument("--prometheus-port", type=int, default=29000, help="0 disables")
    g.add_argument("--log-level", default="warning")
    g.add_argument("--shutdown-grace-period-secs", type=float, default=180.0)
    g.add_argument("--request-timeout-secs", type=float, default=1800.0)
    g.add_argument("--max-payload-size", type=int, default=DEFAULT_MAX_PAYLOAD)
    g.add_argument("--max-concurrent-requests", type=int, default=-1, help="-1: no limit")
    g.add_argument("--queue-size", type=int, default=100)
    g.add_argument("--queue-timeout-secs", type=float, default=60.0)
    g = p.add_argument_group("policies")
    names = sorted(POLICIES)
    g.add_argument("--policy", choices=names, default="load_aware")
    g.add_argument("--prefill-policy", choices=names, default=None)
    g.add_argument("--decode-policy", choices=names, default=None)
    g.add_argument("--cache-threshold", type=float, default=0.3)
    g.add_argument("--balance-abs-threshold", type=int, default=64)
    g.add_argument("--balance-rel-threshold", type=float, default=1.5)
    g.add_argument("--eviction-interval-secs", type=float, default=60.0)
    g.add_argument("--max-tree-size", type=int, default=1 << 26)
    g.add_argument(
        "--worker-overload-shed",
        action="store_true",
        help="503 when every decode worker is overloaded, instead of using the least loaded",
    )
    g.add_argument("--load-monitor-interval", type=float, default=10.0, help="0 disables polls")
    g.add_argument("--chars-per-token", type=float, default=4.0, help="prompt-length estimate")
    g.add_argument("--tokenizer-path", default=None, help="tokenizer.json (needs `tokenizers`)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--dynaserve-handoff",
        action="store_true",
        help="split /generate requests over two workers through the global KV store; in PD "
        "mode: serve them as PD legs that POST /handoff/migrate can move to another pair",
    )
    g.add_argument("--handoff-kv-pool", default=None, help="KV pool name of the workers' HiCache")
    g.add_argument("--handoff-l3-wait-secs", type=float, default=10.0)
    g.add_argument(
        "--handoff-slo-ttft-ms",
        type=float,
        default=None,
        help="time-to-first-token target: each hand-off segment gets its deadline as SGLang "
        "priority (earliest first; workers need --enable-priority-scheduling "
        "--schedule-low-priority-values-first); needs --handoff-slo-tbt-ms",
    )
    g.add_argument(
        "--handoff-slo-tbt-ms",
        type=float,
        default=None,
        help="time-between-tokens target for the deadline of a continuation segment",
    )
    g = p.add_argument_group("retries")
    g.add_argument("--retry-max-retries", type=int, default=5)
    g.add_argument("--retry-initial-backoff-ms", type=float, default=50.0)
    g.add_argument("--retry-max-backoff-ms", type=float, default=30000.0)
    g.add_argument("--retry-backoff-multiplier", type=float, default=1.5)
    g.add_argument("--retry-jitter-factor", type=float, default=0.2)
    g.add_argument("--disable-retries", action="store_true")
    g = p.add_argument_group("circuit breaker")
    g.add_argument("--cb-failure-threshold", type=int, default=10)
    g.add_argument("--cb-success-threshold", type=int, default=3)
    g.add_argument("--cb-timeout-duration-secs", type=float, default=60.0)
    g.add_argument("--disable-circuit-breaker", action="store_true")
    g = p.add_argument_group("health checks")
    g.add_argument("--health-check-interval-secs", type=float, default=60.0)
    g.add_argument("--health-check-timeout-secs", type=float, default=5.0)
    g.add_argument("--health-failure-threshold", type=int, default=3)
    g.add_argument("--health-success-threshold", type=int, default=2)
    g.add_argument("--health-check-endpoint", default="/health")
    g.add_argument("--disable-health-check", action="store_true")
    g = p.add_argument_group("accepted for sglang_router compatibility, not acted on")
    for flag, nargs in _IGNORED_FLAGS.items():
        if nargs is None:
            g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
        else:
            g.add_argument(flag, nargs=nargs, default=None, help=argparse.SUPPRESS)


def ignored_flags_used(args: argparse.Namespace) -> list[str]:
    used = []
    for flag in _IGNORED_FLAGS:
        v = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if v not in (None, False, []):
            used.append(flag)
    return used


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    prefill = [_prefill_spec(v) for v in args.prefill]
    decode = [WorkerSpec(normalize_url(v[0]), "decode") for v in args.decode]
    workers = [WorkerSpec(normalize_url(u), "colocated") for u in args.worker_urls]
    pd = bool(args.pd_disaggregation or prefill or decode or not workers)
    cfg = RouterConfig(
        prefill=prefill,
        decode=decode,
        workers=workers,
        pd_disaggregation=pd,
        host=args.host,
        port=args.port,
        policy=args.policy,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        eviction_interval_secs=args.eviction_interval_secs,
        max_tree_size=args.max_tree_size,
        worker_overload_shed=args.worker_overload_shed,
        seed=args.seed,
        prometheus_host=args.prometheus_host,
        prometheus_port=args.prometheus_port or None,
        request_timeout_secs=args.request_timeout_secs,
        shutdown_grace_period_secs=args.shutdown_grace_period_secs,
        max_payload_size=args.max_payload_size,
        retry_max_retries=args.retry_max_retries,
        retry_initial_backoff_ms=args.retry_initial_backoff_ms,
        retry_max_backoff_ms=args.retry_max_backoff_ms,
        retry_backoff_multiplier=args.retry_backoff_multiplier,
        retry_jitter_factor=args.retry_jitter_factor,
        disable_retries=args.disable_retries,
        cb_failure_threshold=args.cb_failure_threshold,
        cb_success_threshold=args.cb_success_threshold,
        cb_timeout_duration_secs=args.cb_timeout_duration_secs,
        disable_circuit_breaker=args.disable_circuit_breaker,
        health_check_interval_secs=args.health_check_interval_secs,
        health_check_timeout_secs=args.health_check_timeout_secs,
        health_failure_threshold=args.health_failure_threshold,
        health_success_threshold=args.health_success_threshold,
        health_check_endpoint=args.health_check_endpoint,
        disable_health_check=args.disable_health_check,
        load_monitor_interval=args.load_monitor_interval,
        max_concurrent_requests=args.max_concurrent_requests,
        queue_size=args.queue_size,
        queue_timeout_secs=args.queue_timeout_secs,
        chars_per_token=args.chars_per_token,
        tokenizer_path=args.tokenizer_path,
        log_level=args.log_level,
        dynaserve_handoff=args.dynaserve_handoff,
        handoff_kv_pool=args.handoff_kv_pool,
        handoff_l3_wait_secs=args.handoff_l3_wait_secs,
        handoff_slo_ttft_ms=args.handoff_slo_ttft_ms,
        handoff_slo_tbt_ms=args.handoff_slo_tbt_ms,
    )
    cfg.validate()
    return cfg

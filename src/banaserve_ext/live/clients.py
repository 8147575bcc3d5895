# SPDX-License-Identifier: Apache-2.0
"""HTTP clients of one SGLang instance (signals, role switch) and of the PD router's worker API.

Router endpoints used (``banaserve_ext.router``, in smg 1.13's shapes; see docs/router.md):
``GET /workers`` (list: ``url``, ``worker_type``, ``status``, ``active_requests``), ``POST
/workers`` with ``{"url", "worker_type", "bootstrap_port"}`` (202: registered and routable),
``DELETE /workers?url=U&worker_type=R`` (the worker leaves rotation at once; 202 while its
in-flight requests finish, during which it is listed with ``status: draining``), and, when
the router runs the hand-off path, ``POST /handoff/migrate?url=U`` (moves its requests away).
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import BanaserveError, InvalidArgumentError, NotFoundError, UnavailableError
from ..launch.servers import http_json

SIGNALS_ROUTE = "/banaserve/migrate"


#: a worker entry in this state is leaving the router (its in-flight requests finish): it no
#: longer takes work, so the controller does not count it as the instance's router role
DRAINING = "draining"


def _check(status: int, body: object, what: str) -> dict:
    if not 200 <= status < 300 or not isinstance(body, dict):
        raise BanaserveError(f"{what}: HTTP {status}: {body}")
    return body


@dataclass(frozen=True)
class InstanceSpec:
    """One SGLang instance: its URL and the bootstrap port it serves as a prefill instance
    (with ``--enable-pd-role-switch`` every instance runs a bootstrap server)."""

    url: str
    bootstrap_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> InstanceSpec:
        """``http://host:port[,bootstrap_port]``."""
        url, _, bp = text.partition(",")
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise InvalidArgumentError(f"instance {text!r}: expected http://host:port[,bootstrap]")
        try:
            return cls(url, int(bp) if bp.strip() else None)
        except ValueError:
            raise InvalidArgumentError(f"instance {text!r}: bad bootstrap port {bp!r}") from None


class InstanceClient:
    def __init__(self, spec: InstanceSpec, timeout_s: float = 10.0) -> None:
        self.spec = spec
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self.spec.url

    def signals(self) -> dict:
        status, body = http_json(f"{self.url}{SIGNALS_ROUTE}", {"kind": "signals"},
                                 timeout_s=self.timeout_s)  # fmt: skip
        return _check(status, body, f"{self.url} signals")

    def role_switch(self, new_role: str, timeout_s: float = 120.0) -> tuple[int, dict]:
        """``POST /pd_role_switch``; returns (HTTP status, SGLang's answer)."""
        body: dict = {"new_role": new_role}
        if new_role == "decode":
            # SGLang asks for the decode CUDA-graph headroom before capturing graphs on a flip
            # to decode; 0 GB: no headroom check (CPU, or graphs captured within free memory)
            body["decode_cuda_graph_memory_gb"] = 0.0
        status, out = http_json(f"{self.url}/pd_role_switch", body, timeout_s=timeout_s)
        return status, out if isinstance(out, dict) else {"message": str(out)}

    def healthy(self) -> bool:
        try:
            status, _ = http_json(f"{self.url}/health", timeout_s=5.0)
        except UnavailableError:
            return False
        return status == 200


class RouterClient:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def workers(self) -> list[dict]:
        status, body = http_json(f"{self.url}/workers", timeout_s=self.timeout_s)
        listed = _check(status, body, "router /workers").get("workers", [])
        return [w for w in listed if w.get("status") != DRAINING]

    def add(self, url: str, role: str, bootstrap_port: int | None = None) -> dict:
        body: dict = {"url": url, "worker_type": role}
        if role == "prefill":
            if bootstrap_port is None:
                raise InvalidArgumentError(f"{url}: a prefill worker needs its bootstrap port")
            body["bootstrap_port"] = int(bootstrap_port)
        status, out = http_json(f"{self.url}/workers", body, timeout_s=self.timeout_s)
        return _check(status, out, f"router add {url} as {role}")

    def hand_off(self, url: str) -> int | None:
        """``POST /handoff/migrate?url=U``: the router moves the hand-off requests running on
        ``url`` to other workers (docs/handoff.md). Returns how many it moved, or None when
        the router has no hand-off path (404: the drain then waits for them)."""
        q = urllib.parse.urlencode({"url": url})
        status, out = http_json(f"{self.url}/handoff/migrate?{q}", {}, timeout_s=self.timeout_s)
        if status in (404, 405):
            return None
        body = _check(status, out, f"router hand-off of {url}")
        return int(body.get("migrated") or 0)

    def remove(self, url: str, role: str | None = None) -> None:
        q = {"url": url} | ({"worker_type": role} if role else {})
        req = urllib.request.Request(
            f"{self.url}/workers?{urllib.parse.urlencode(q)}", method="DELETE"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotFoundError(f"router has no worker {url} ({role})") from None
            raise BanaserveError(f"router remove {url}: HTTP {exc.code}: {exc.read()!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UnavailableError(f"router {self.url}: {exc}") from None

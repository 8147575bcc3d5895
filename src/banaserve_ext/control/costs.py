# SPDX-License-Identifier: Apache-2.0
"""Measured costs the controllers charge: the role-flip time, the fitted migration links and
the request hand-off through the global KV store (DynaServe's segment 2, live migration).

They live in one small JSON file shipped with the package, ``banaserve_ext/data/costs.json``,
so that a live measurement (the live controller's flip: SGLang's role switch after the drain; the
migration benchmarks' :meth:`LinkCost.fit`) replaces a number in one place and both the simulator
and the live controller pick it up. Every entry carries a ``source`` note; a value nobody has
measured yet says "not yet measured".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import InvalidArgumentError
from .banaserve import LinkCost


@dataclass(frozen=True)
class HandoffCost:
    """A request handed off at a boundary of ``tokens`` tokens: ``fixed_s + tokens *
    per_token_s`` from segment 1's end to segment 2's first token (store write-back wait and
    the second instance's prefetch and first step, bench/handoff), measured with
    ``page_tokens``-token store pages. The per-token times of the planner's cost model come from
    the same run."""

    fixed_s: float
    per_token_s: float
    page_tokens: int = 1
    prefill_s_per_token: float = 1e-4
    decode_s_per_token: float = 2e-2

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + max(0, tokens) * self.per_token_s


@dataclass(frozen=True)
class MeasuredCosts:
    flip_cost_s: float
    layer_link: LinkCost
    attention_link: LinkCost
    #: entry -> where its number comes from
    sources: dict[str, str]
    path: str
    #: None when the file has no ``handoff`` entry
    handoff: HandoffCost | None = None

    @property
    def flip_measured(self) -> bool:
        return "not yet measured" not in self.sources.get("flip_cost_s", "")


def default_costs_path() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "costs.json"


def parse_costs(data: dict, where: str) -> MeasuredCosts:
    try:
        flip = float(data["flip_cost_s"]["value"])
        links = {
            k: LinkCost(float(data[k]["bandwidth_Bps"]), float(data[k]["fixed_s"]))
            for k in ("layer_link", "attention_link")
        }
        sources = {
            k: str(data[k].get("source", ""))
            for k in ("flip_cost_s", "layer_link", "attention_link", "handoff")
            if k in data
        }
        handoff = None
        if "handoff" in data:
            h = data["handoff"]
            handoff = HandoffCost(
                float(h["fixed_s"]),
                float(h["per_token_s"]),
                int(h.get("page_tokens", 1)),
                float(h["prefill_s_per_token"]),
                float(h["decode_s_per_token"]),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{where}: malformed costs file ({exc!r}); needs "
            "flip_cost_s.value and {layer,attention}_link."
            "{bandwidth_Bps,fixed_s} (and, optional, handoff.{fixed_s,per_token_s,"
            "prefill_s_per_token,decode_s_per_token})"
        ) from exc
    if not flip >= 0:
        raise InvalidArgumentError(f"{where}: flip_cost_s must be >= 0, got {flip}")
    if handoff is not None and (
        min(handoff.fixed_s, handoff.per_token_s) < 0
        or min(handoff.prefill_s_per_token, handoff.decode_s_per_token) <= 0
        or handoff.page_tokens < 1
    ):
        raise InvalidArgumentError(f"{where}: handoff costs must be >= 0 (per-token times > 0)")
    return MeasuredCosts(
        flip, links["layer_link"], links["attention_link"], sources, where, handoff
    )


def measured_costs(path: str | None = None) -> MeasuredCosts:
    """The costs file at ``path`` (default: the package's ``data/costs.json``, read once per
    process)."""
    if path is None:
        return _default_costs()
    return _read(Path(path))


@lru_cache(maxsize=1)
def _default_costs() -> MeasuredCosts:
    return _read(default_costs_path())


def _read(p: Path) -> MeasuredCosts:
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read costs file {p}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{p}: not JSON ({exc})") from exc
    return parse_costs(data, str(p))

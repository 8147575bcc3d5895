# SPDX-License-Identifier: Apache-2.0
"""Which banaserve features a server asked for, from its own arguments.

SGLang calls the plug-in's entry point early in every process: in the launcher before it parses
its command line (so our CLI choice can be added first), in the scheduler, detokenizer and
data-parallel processes right at their start. The arguments are found, in this order, as

1. a ``ServerArgs`` object in a calling frame (the subprocesses receive it as ``server_args``);
2. the keyword arguments of ``sglang.Engine(...)`` in a calling frame (in-process engines);
3. the process's command line (the launcher; spawned children inherit it), of which only the
   few flags below are read, in SGLang's own spelling (``--flag value`` or ``--flag=value``).

Features:

* ``pd`` (+ ``layerwise`` on a prefill server, or one started with ``--enable-pd-role-switch``,
  unless ``BANASERVE_SGLANG_LAYERWISE=0``):
  ``--disaggregation-transfer-backend banaserve``;
* ``hicache``: ``--hicache-storage-backend dynamic`` whose extra config names our module;
* ``signals``, ``kv_migration``, ``layer_migration`` (each with ``admin``): the explicit opt-in
  ``BANASERVE_SGLANG_FEATURES`` (comma list; the CPU launcher also takes
  ``--banaserve-features``), because SGLang has no argument of its own to carry it;
* ``cpu_launcher`` / ``hicache_cpu``: the process was started through our CPU launcher (and, for
  the latter, HiCache is on).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from .... import _env

#: features that can be opted into with BANASERVE_SGLANG_FEATURES / --banaserve-features
OPT_IN = ("admin", "signals", "kv_migration", "layer_migration")
HICACHE_MODULE = "banaserve_ext.adapters.sglang.hicache"

#: the ServerArgs fields selection reads, with SGLang's default
FIELDS: dict[str, Any] = {
    "disaggregation_mode": "null",
    "disaggregation_transfer_backend": "mooncake",
    "enable_hierarchical_cache": False,
    "enable_pd_role_switch": False,
    "hicache_storage_backend": None,
    "hicache_storage_backend_extra_config": None,
}
_FLAGS = {"--" + f.replace("_", "-"): f for f in FIELDS}
_BOOL_FIELDS = {f for f, d in FIELDS.items() if isinstance(d, bool)}


def from_argv(argv: Iterable[str]) -> dict[str, Any]:
    """The fields of :data:`FIELDS` given on a command line (defaults for the rest)."""
    out = dict(FIELDS)
    items = list(argv)
    for i, tok in enumerate(items):
        flag, eq, inline = tok.partition("=")
        field = _FLAGS.get(flag)
        if field is None:
            continue
        if field in _BOOL_FIELDS:
            out[field] = True
        elif eq:
            out[field] = inline
        elif i + 1 < len(items):
            out[field] = items[i + 1]
    return out


def from_object(args: Any) -> dict[str, Any]:
    return {f: getattr(args, f, d) for f, d in FIELDS.items()}


def from_mapping(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if "server_args" in kwargs:
        return from_object(kwargs["server_args"])
    return {f: kwargs.get(f, d) for f, d in FIELDS.items()}


def current_args() -> tuple[dict[str, Any], str]:
    """This process's server arguments (see the module doc) and where they came from."""
    try:
        from sglang.srt.server_args import ServerArgs
    except Exception:  # noqa: BLE001 - SGLang not importable: only the command line is left
        ServerArgs = None  # noqa: N806
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        cand = local.get("server_args")
        if ServerArgs is not None and isinstance(cand, ServerArgs):
            return from_object(cand), f"ServerArgs in {frame.f_code.co_name}()"
        kw = local.get("kwargs")
        if frame.f_code.co_name == "__init__" and type(local.get("self")).__name__ == "Engine" \
                and isinstance(kw, dict):  # fmt: skip
            return from_mapping(kw), "Engine(**kwargs)"
        frame = frame.f_back
    return from_argv(sys.argv[1:]), "command line"


def _extra_config(raw: Any) -> dict:
    if isinstance(raw, dict):
        return raw
    if not raw or not isinstance(raw, str) or raw.startswith("@"):
        return {}  # a config file: read by SGLang later; named module checked then
    try:
        val = json.loads(raw)
    except ValueError:
        return {}
    return val if isinstance(val, dict) else {}


FEATURES_FLAG = "--banaserve-features"


def take_features(argv: list[str]) -> tuple[list[str], str | None]:
    """The CPU launcher's opt-in: removes ``--banaserve-features LIST`` (or ``=LIST``) from
    ``argv`` (SGLang's parser would refuse it); returns the rest and LIST (None if absent)."""
    rest: list[str] = []
    value: str | None = None
    it = iter(argv)
    for tok in it:
        if tok == FEATURES_FLAG:
            value = next(it, "")
        elif tok.startswith(FEATURES_FLAG + "="):
            value = tok.split("=", 1)[1]
        else:
            rest.append(tok)
    return rest, value


def opt_ins() -> list[str]:
    raw = _env.get(_env.SGLANG_FEATURES)
    return [f.strip() for f in raw.split(",") if f.strip()]


def select(args: Mapping[str, Any], *, opted: Iterable[str] = (), cpu_launcher: bool = False,
           layerwise: bool = True) -> list[str]:  # fmt: skip
    """The features a server with ``args`` runs (pure; order = activation order)."""
    chosen: list[str] = []
    if cpu_launcher:
        chosen.append("cpu_launcher")
    backend = str(args.get("disaggregation_transfer_backend") or "")
    mode = str(getattr(args.get("disaggregation_mode"), "value", args.get("disaggregation_mode")))
    if backend == "banaserve":
        chosen.append("pd")
        # a decode server that may be switched to prefill at runtime gets it too: its hooks act
        # only while the scheduler's current role is prefill
        if layerwise and (mode == "prefill" or args.get("enable_pd_role_switch")):
            chosen.append("layerwise")
    hicache = bool(args.get("enable_hierarchical_cache"))
    if hicache and cpu_launcher:
        chosen.append("hicache_cpu")
    extra = _extra_config(args.get("hicache_storage_backend_extra_config"))
    if args.get("hicache_storage_backend") == "dynamic" and extra.get("module_path") == \
            HICACHE_MODULE:  # fmt: skip
        chosen.append("hicache")
    opted = list(opted)
    unknown = [f for f in opted if f not in OPT_IN]
    if unknown:
        from ....errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"{_env.SGLANG_FEATURES.name}: unknown feature(s) {unknown}; known: {list(OPT_IN)}"
        )
    if opted:
        chosen.append("admin")
    chosen += [f for f in OPT_IN if f != "admin" and f in opted]
    return chosen

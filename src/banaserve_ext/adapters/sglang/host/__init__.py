# SPDX-License-Identifier: Apache-2.0
"""The SGLang host layer: the one place that names SGLang internals, probes them, and hooks.

* :mod:`.table` lists every SGLang internal the adapters use, grouped by feature;
* :mod:`.probe` checks them against the installed SGLang;
* :mod:`.selection` reads which features a server asked for from its own arguments;
* :class:`Host` (one per process, built by the plug-in's entry point) probes the selected
  features, refuses a feature whose internals are missing with a message naming the internal,
  the feature and both SGLang versions, and activates the others: each feature's ``activate``
  gets the host and registers its hooks through :meth:`Host.hook`. An unselected feature is not
  imported, probed or hooked.

A new feature is one :class:`Feature` entry in :data:`FEATURES` plus its internals in
:data:`.table.INTERNALS` (and, if it is opt-in, its name in :data:`.selection.OPT_IN`).

Feature code reaches SGLang objects through :func:`ns` (``ns("pd").CommonKVManager``), which
only resolves names listed in the table.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .... import _env
from . import selection
from .probe import TESTED_SGLANG, Internal, Result, probe, refusal, resolve, sglang_version
from .table import INTERNALS

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "Feature", "Host", "Internal", "Result", "TESTED_SGLANG", "current",
           "load", "ns", "probe_table", "sglang_version"]  # fmt: skip


@dataclass(frozen=True)
class Feature:
    """One feature of the plug-in.

    ``activate``: ``"module:function"`` called with the :class:`Host` once the feature's
    internals are all present; it registers the feature's hooks (:meth:`Host.hook`) and returns
    the feature's state object (or None). ``requires``: features that must be active first.
    ``fatal``: when its internals are missing the server does not start (the server's own
    arguments ask for something that cannot work, e.g. our transfer backend); otherwise the
    feature alone is off and says why (``refusals``). ``kinds``: admin kinds it provides (a
    refused feature's kinds answer 501 with the refusal).
    """

    name: str
    doc: str
    activate: str | None = None
    requires: tuple[str, ...] = ()
    fatal: bool = False
    hooks: bool = True
    kinds: tuple[str, ...] = ()


_A = "banaserve_ext.adapters.sglang."
FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "cpu_launcher",
            "SGLang fixes for processes started by the CPU launcher",
            _A + "cpu_compat:activate",
            hooks=False,
        ),  # fmt: skip
        Feature(
            "pd", "the banaserve PD transfer backend", _A + "plugin:activate_pd", fatal=True
        ),  # fmt: skip
        Feature(
            "layerwise",
            "layer-wise KV overlap in the prefill forward",
            _A + "layerwise:activate",
            requires=("pd",),
        ),  # fmt: skip
        Feature(
            "hicache", "HiCache L3 storage backend over the KV pool", None, fatal=True, hooks=False
        ),  # fmt: skip
        Feature(
            "hicache_cpu",
            "HiCache host tier on a CPU-only host",
            _A + "hicache_cpu:activate",
            fatal=True,
            hooks=False,
        ),  # fmt: skip
        Feature(
            "admin",
            "POST /banaserve/migrate and the scheduler channel",
            _A + "admin:activate",
            kinds=("status",),
        ),  # fmt: skip
        Feature(
            "signals",
            "scheduler load signals (busy share, queues, KV use) for the live controller",
            _A + "signals:activate",
            requires=("admin",),
            kinds=("signals",),
        ),  # fmt: skip
        Feature(
            "kv_migration",
            "attention-level KV migration",
            _A + "kv_migration:activate",
            requires=("admin",),
            kinds=("kv", "kv_back", "kv_splits"),
        ),  # fmt: skip
        Feature(
            "layer_migration",
            "layer-level weight migration",
            _A + "layer_migration:activate",
            requires=("admin",),
            kinds=("layers", "layers_back", "layers_status"),
        ),  # fmt: skip
    )
}


class FeatureRefused(RuntimeError):
    """A feature cannot start: an SGLang internal it needs is missing or changed."""


class Namespace:
    """The SGLang objects of one feature, by their short names in :data:`.table.INTERNALS`."""

    def __init__(self, feature: str, table: Mapping[str, Mapping[str, Internal]]) -> None:
        self._feature = feature
        self._table = table
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            entry = self._table[self._feature].get(name) or self._table["plugin"].get(name)
            if entry is None:
                raise KeyError(f"{name!r} is not an internal of feature {self._feature!r} "
                               "(add it to adapters/sglang/host/table.py)")  # fmt: skip
            self._cache[name] = resolve(entry.path)
        return self._cache[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(str(exc)) from None


_NAMESPACES: dict[str, Namespace] = {}


def ns(feature: str) -> Namespace:
    """The SGLang objects feature ``feature`` may use (resolved on first use)."""
    if feature not in _NAMESPACES:
        if feature not in INTERNALS:
            raise KeyError(f"unknown feature {feature!r}")
        _NAMESPACES[feature] = Namespace(feature, INTERNALS)
    return _NAMESPACES[feature]


def probe_feature(
    feature: str,
    table: Mapping[str, Mapping[str, Internal]] = INTERNALS,
    *,
    with_plugin: bool = True,
    launcher: bool = True,
) -> list[Result]:
    """Probes ``feature``'s internals (``launcher=False``: not those used only there)."""
    entries = list(table.get(feature, {}).values())
    if with_plugin and feature != "plugin":
        entries = list(table.get("plugin", {}).values()) + entries
    return [probe(i) for i in entries if launcher or i.where != "launcher"]


def probe_table(features: list[str] | None = None,
                table: Mapping[str, Mapping[str, Internal]] = INTERNALS,
                ) -> list[tuple[str, Result]]:  # fmt: skip
    """(feature, result) for every internal of ``features`` (default: all)."""
    out = []
    for feature in features or list(table):
        out += [(feature, r) for r in probe_feature(feature, table, with_plugin=False)]
    return out


@dataclass
class Host:
    """The plug-in in one SGLang process: selected features, their state, their refusals.

    ``hook_register(target_path, fn, hook_type_name)`` defaults to SGLang's
    ``HookRegistry.register``; tests pass a fake together with a fake ``table``.
    """

    features: Mapping[str, Feature] = field(default_factory=lambda: FEATURES)
    table: Mapping[str, Mapping[str, Internal]] = field(default_factory=lambda: INTERNALS)
    hook_register: Callable[[str, Callable, str], None] | None = None
    selected: list[str] = field(default_factory=list)
    active: dict[str, Any] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    hooks: list[tuple[str, str, str]] = field(default_factory=list)  # feature, target, type
    source: str = ""
    #: the launcher process (SGLang's HTTP server); subprocesses skip launcher-only internals
    launcher: bool = True

    # -- used by features ----------------------------------------------------------------------
    def ns(self, feature: str) -> Namespace:
        return ns(feature) if self.table is INTERNALS else Namespace(feature, self.table)

    def hook(self, feature: str, name: str, fn: Callable, hook_type: str = "AROUND") -> None:
        """Wraps the table's hook target ``name`` of ``feature`` with ``fn``."""
        entry = self.table[feature][name]
        if not entry.hook:
            raise KeyError(f"{feature}.{name} is not a hook target in the table")
        if self.hook_register is None:
            from sglang.srt.plugins.hook_registry import HookRegistry, HookType

            HookRegistry.register(entry.path, fn, HookType[hook_type])
        else:
            self.hook_register(entry.path, fn, hook_type)
        self.hooks.append((feature, entry.path, hook_type))

    def state(self, feature: str) -> Any:
        return self.active.get(feature)

    def refusal_for_kind(self, kind: str) -> str | None:
        for name, msg in self.refusals.items():
            if kind in self.features[name].kinds:
                return msg
        return None

    # -- loading -------------------------------------------------------------------------------
    def load(self, selected: list[str], source: str = "") -> Host:
        """Probes and activates ``selected`` in order. A fatal feature's refusal raises
        :class:`FeatureRefused`; any other refusal turns that feature (and those that require
        it) off with an error log."""
        self.source = source
        self.selected = list(selected)
        for name in selected:
            feature = self.features[name]
            missing_req = [r for r in feature.requires if r not in self.active]
            if missing_req:
                self._refuse(feature, f"banaserve feature {name!r} is off: it needs "
                             f"{missing_req}, which did not start")  # fmt: skip
                continue
            results = probe_feature(
                name, self.table, with_plugin=feature.hooks, launcher=self.launcher
            )
            msg = refusal(name, results)
            if msg is None:
                msg = self._activate(feature)
            if msg is not None:
                self._refuse(feature, msg)
        return self

    def _activate(self, feature: Feature) -> str | None:
        if feature.activate is None:
            self.active[feature.name] = None
            return None
        mod_name, _, fn_name = feature.activate.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
            self.active[feature.name] = fn(self)
        except FeatureRefused as exc:
            return str(exc)
        return None

    def _refuse(self, feature: Feature, msg: str) -> None:
        self.refusals[feature.name] = msg
        if feature.fatal:
            logger.error("%s", msg)
            raise FeatureRefused(msg)
        logger.error("%s; the server runs without it", msg)

    def summary(self) -> str:
        hooks = ", ".join(f"{t.rsplit('.', 2)[-2]}.{t.rsplit('.', 1)[-1]}" for _, t, _ in
                          self.hooks) or "none"  # fmt: skip
        return (f"banaserve plug-in (pid {os.getpid()}, args from {self.source or '?'}): "
                f"features {self.selected or 'none'}; active {sorted(self.active) or 'none'}; "
                f"refused {sorted(self.refusals) or 'none'}; hooks: {hooks}")  # fmt: skip


_CURRENT: list[Host] = []


def current() -> Host | None:
    """This process's host, once :func:`load` ran (None in processes without the plug-in)."""
    return _CURRENT[0] if _CURRENT else None


def _configure_logging() -> None:
    if not _env.is_set(_env.LOG_LEVEL):
        return
    root = logging.getLogger("banaserve_ext")
    if not any(getattr(h, "_banaserve", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s: %(message)s"))
        handler._banaserve = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(_env.get(_env.LOG_LEVEL).upper())


def load() -> Host:
    """The plug-in's entry point body: once per process, select, probe, activate.

    A fatal refusal ends the process (``SystemExit`` with the message: SGLang's plug-in loader
    catches ordinary exceptions and would go on without the feature the server asked for)."""
    if _CURRENT:
        return _CURRENT[0]
    _configure_logging()
    from .. import cpu_compat

    args, source = selection.current_args()
    chosen = selection.select(args, opted=selection.opt_ins(), cpu_launcher=cpu_compat.active(),
                              layerwise=_env.get(_env.SGLANG_LAYERWISE))  # fmt: skip
    import multiprocessing

    host = Host(launcher=multiprocessing.parent_process() is None)
    _CURRENT.append(host)
    try:
        host.load(chosen, source)
    except FeatureRefused as exc:
        raise SystemExit(str(exc)) from None
    finally:
        logger.info("%s", host.summary())
    return host

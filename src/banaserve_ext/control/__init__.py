# SPDX-License-Identifier: Apache-2.0
"""Control policies as plain objects: they read views of the instances and return decisions;
a runtime (the simulator's actuators in :mod:`banaserve_ext.sim.systems`, or the live
controller ``banaserve control``) carries the decisions out. No clock, no I/O, no threads.

The interface a runtime implements (the simulator and the live controller run the same
objects):

* every window (1 s in the simulator) build one :class:`InstanceView` per instance from
  observable signals: ``role``, ``util`` (busy share of the window), ``kv_frac``/``kv_tokens``,
  ``layers_held``, ``attn_share``, ``accepting`` (in the router), and the optional queue fields
  ``queue_len``, ``queue_delay_s``, ``running``, ``step_s``, ``preempted`` (0 when unknown);
* call ``BanaServeController.plan(views, now_s)`` (``now_s``: seconds since the controller
  started; nothing happens before ``config.warmup_s``) and carry out what it returns:
  :class:`FlipRole` (drain ``idx`` out of the router, switch it to ``new_role``; ``cost_s`` is
  the predicted switch time), :class:`MigrateLayers`, :class:`MigrateAttention`,
  :class:`Revert`. Every action has a ``reason`` string for the action log;
* the role-flip cost and the migration link costs come from ``banaserve_ext/data/costs.json``
  (:func:`measured_costs`), the file the live measurement updates;
* the starting P:D split comes from a short online profile, :func:`choose_prefill_count`.

All fields added since the first version have defaults, so older callers keep working."""

from __future__ import annotations

from .banaserve import (
    BanaServeConfig,
    BanaServeController,
    FlipRole,
    InstanceView,
    LinkCost,
    MigrateAttention,
    MigrateLayers,
    Revert,
)
from .costs import HandoffCost, MeasuredCosts, measured_costs
from .dynaserve import DynaServeSplitter, LoadView, SplitPlan, with_handoff_cost
from .llumnix import LlumnixMigrator, Migration
from .profile import WorkloadProfile, choose_prefill_count
from .semipd import SemiPDController

__all__ = [
    "BanaServeConfig",
    "BanaServeController",
    "DynaServeSplitter",
    "FlipRole",
    "HandoffCost",
    "InstanceView",
    "LinkCost",
    "LlumnixMigrator",
    "LoadView",
    "MeasuredCosts",
    "MigrateAttention",
    "MigrateLayers",
    "Migration",
    "Revert",
    "SemiPDController",
    "SplitPlan",
    "WorkloadProfile",
    "choose_prefill_count",
    "measured_costs",
    "with_handoff_cost",
]

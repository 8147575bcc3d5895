# SPDX-License-Identifier: Apache-2.0
"""Control policies as plain objects: they read views of the instances and return decisions;
a runtime (the simulator's actuators in :mod:`banaserve_ext.sim.systems`, or a live
controller) carries the decisions out. No clock, no I/O, no threads."""

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
from .dynaserve import DynaServeSplitter, LoadView, SplitPlan
from .llumnix import LlumnixMigrator, Migration
from .semipd import SemiPDController

__all__ = [
    "BanaServeConfig", "BanaServeController", "DynaServeSplitter", "FlipRole", "InstanceView",
    "LinkCost", "LlumnixMigrator", "LoadView", "MigrateAttention", "MigrateLayers", "Migration",
    "Revert", "SemiPDController", "SplitPlan",
]

# SPDX-License-Identifier: Apache-2.0
"""Routing policies: plain objects behind one interface (:mod:`.base`), run unchanged by the
HTTP router (:mod:`banaserve_ext.router`) and by the cluster simulator (:mod:`banaserve_ext.sim`)."""

from __future__ import annotations

from .base import RequestInfo, RoutingPolicy, WorkerLoad

__all__ = ["RequestInfo", "RoutingPolicy", "WorkerLoad"]

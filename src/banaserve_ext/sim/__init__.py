# SPDX-License-Identifier: Apache-2.0
"""Discrete-event simulator of a PD-disaggregated serving cluster.

It runs the same routing policy objects as the HTTP router (:mod:`banaserve_ext.policies`) and
the controllers of :mod:`banaserve_ext.control`, on cost models built from measured GPU data.
"""

from __future__ import annotations

from .cluster import Simulator
from .cost import FitCostModel, ProfileCostModel, load_fit_cost_model
from .engine import ClusterConfig, Instance, SimRequest
from .metrics import Slo, goodput, slo_attainment, summarize
from .models import GPUS, MODELS, get_gpu, get_model
from .traces import TraceRequest, load_azure, load_lengths_poisson, load_mooncake, load_trace

__all__ = [
    "GPUS",
    "MODELS",
    "ClusterConfig",
    "FitCostModel",
    "Instance",
    "ProfileCostModel",
    "SimRequest",
    "Simulator",
    "Slo",
    "TraceRequest",
    "get_gpu",
    "get_model",
    "goodput",
    "load_azure",
    "load_fit_cost_model",
    "load_lengths_poisson",
    "load_mooncake",
    "load_trace",
    "slo_attainment",
    "summarize",
]

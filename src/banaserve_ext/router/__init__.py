# SPDX-License-Identifier: Apache-2.0
"""The load-aware PD router: a drop-in for ``sglang_router``'s PD mode.

``python -m banaserve_ext.router --pd-disaggregation --prefill URL PORT --decode URL ...`` or
``banaserve router ...`` with the same flags; in code::

    async with Router(RouterConfig(prefill=[...], decode=[...], port=0)) as router:
        ...
"""

from __future__ import annotations

from .config import RouterConfig, WorkerSpec
from .server import Router

__all__ = ["Router", "RouterConfig", "WorkerSpec"]

# SPDX-License-Identifier: Apache-2.0
"""``python -m banaserve_ext.adapters.sglang.router_cpu ARGS``: ``sglang_router.launch_router``
on a host where torchvision cannot load its C extension (see :mod:`.cpu_compat`)."""

from __future__ import annotations

import runpy

from banaserve_ext.adapters.sglang.cpu_compat import install_torchvision_placeholders

if __name__ == "__main__":
    install_torchvision_placeholders()
    runpy.run_module("sglang_router.launch_router", run_name="__main__", alter_sys=True)

# SPDX-License-Identifier: Apache-2.0
"""Lets ``import torchvision`` succeed when its C extension cannot load (a CUDA build of
torchvision on a CPU-only host, which is what the CPU SGLang stack gets: see
:mod:`.cpu_compat`).

torchvision imports ``_meta_registrations``, which registers fake kernels for its C ops with
``torch.library.register_fake("torchvision::nms")`` and fails (``operator torchvision::nms does
not exist``) when the extension did not define them; SGLang's config package imports
torchvision, so every SGLang process, and SGLang's own tools (``python -m
sglang.bench_serving``), die at import. :func:`install` adds an import hook that gives torchvision
empty ``_meta_registrations`` / ``_autograd_registrations`` modules, and only when torchvision
itself reports its extension missing (``torchvision.extension._has_ops()`` is False): those
modules only register kernels for the C ops, which text models never call; calling one still
fails with torchvision's own error.

Imports nothing but :mod:`sys` and :mod:`importlib.machinery`, because ``.ci/install-sglang-cpu``
runs it from a ``.pth`` file at the start of every process of the venv.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec

NAMES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


class TorchvisionRegistrationsGuard:
    """A meta-path finder and loader for the two modules (see the module doc)."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> ModuleSpec | None:
        if fullname not in NAMES:
            return None
        ext = sys.modules.get("torchvision.extension")  # imported by torchvision before these
        if ext is None or ext._has_ops():
            return None  # a working extension: the real modules
        return ModuleSpec(fullname, self)

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: object) -> None:
        module.__doc__ = "empty: torchvision's C extension did not load (banaserve_ext)"


def install() -> None:
    """Adds the hook (idempotent)."""
    if not any(isinstance(f, TorchvisionRegistrationsGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionRegistrationsGuard())

# SPDX-License-Identifier: Apache-2.0
"""Run stock SGLang on a CPU-only host that lacks SGLang's CPU kernel build.

Opt-in only: nothing here runs unless :func:`install` is called, which happens when a server is
started through ``python -m banaserve_ext.adapters.sglang.serve_cpu`` (what ``banaserve launch
--device cpu`` and the integration tests do). Plain ``python -m sglang.launch_server`` and GPU
hosts are never touched.

What it does, and why:

* ``sgl_kernel`` stand-in. SGLang's CPU engine imports a few ``*_cpu`` helpers from
  ``sgl_kernel`` at module load; the real CPU build must be compiled from SGLang's source and
  targets Intel AMX. For a dense model with the ``torch_native`` attention backend none of them is
  called, so a module that provides the names is enough. Each raises :class:`NotImplementedError`
  if it is ever called, so a code path that needs a real kernel fails loudly instead of computing
  something wrong. ``torch.ops.sgl_kernel.*`` is left empty, so ``cpu_has_amx_support()`` stays
  False and layers take their native torch paths.
* torchvision. The only torchvision wheel reachable here is a CUDA build whose C extension cannot
  load; its ``_meta_registrations`` / ``_autograd_registrations`` then fail at import, and SGLang's
  config package imports torchvision. Both modules are replaced by empty placeholders; the detection
  ops they register (nms, roi_align...) are unused by text models.
* ``SGLANG_USE_CPU_ENGINE=1`` unless already set (otherwise rotary embedding imports vllm).

The SGLang-internal patches that only matter once SGLang is imported (Mooncake's host-index path)
are applied by :func:`apply_sglang_patches`, which the host layer's ``cpu_launcher`` feature
(:func:`activate`) calls in processes started through this launcher; the SGLang internals they
touch are listed under that feature in ``host/table.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable

from ... import _env

logger = logging.getLogger(__name__)

# Names SGLang's CPU code imports from sgl_kernel at module load (SGLang 0.5.23).
SGL_KERNEL_CPU_NAMES: tuple[str, ...] = (
    "assign_req_to_token_pool_cpu",
    "copy_all_layer_kv_cache_cpu",
)



def _unavailable(name: str) -> Callable[..., object]:
    def call(*args: object, **kwargs: object) -> object:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this process runs SGLang on CPU through "
            "banaserve_ext.adapters.sglang.cpu_compat, which provides only the names SGLang "
            "imports; build sgl_kernel for CPU from SGLang's sources to use this code path"
        )

    call.__name__ = name
    return call


class _StandInModule(types.ModuleType):
    """``sgl_kernel`` stand-in: known names are present up front; any other attribute asked for
    by a ``from sgl_kernel import x`` also resolves to a function that raises when called."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        fn = _unavailable(name)
        setattr(self, name, fn)
        return fn


def _install_sgl_kernel_stand_in() -> None:
    if "sgl_kernel" in sys.modules:
        return
    if importlib.util.find_spec("sgl_kernel") is not None:
        return  # a real build is installed: use it
    mod = _StandInModule("sgl_kernel", "banaserve CPU stand-in for SGLang's kernel package")
    mod.__version__ = "0.0.0+banaserve.cpu.standin"
    mod.__path__ = []  # a package, so `import sgl_kernel.x` fails with a clear ModuleNotFoundError
    for name in SGL_KERNEL_CPU_NAMES:
        setattr(mod, name, _unavailable(name))
    sys.modules["sgl_kernel"] = mod


def _torchvision_c_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to fix
    import glob

    for loc in spec.submodule_search_locations:
        libs = glob.glob(os.path.join(loc, "_C*.so"))
        if not libs:
            continue
        import ctypes

        import torch  # noqa: F401  (the extension links against libtorch)

        try:
            ctypes.CDLL(libs[0])
            return True
        except OSError:
            return False
    return False


def install_torchvision_placeholders() -> None:
    """Let `import torchvision` succeed when its C extension cannot load (see module doc)."""
    if "torchvision" in sys.modules or _torchvision_c_extension_loads():
        return
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))


def install() -> None:
    """Make this process (and, through the environment, its children) able to run SGLang on CPU.
    Idempotent."""
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ[_env.SGLANG_CPU_COMPAT.name] = "1"  # inherited by SGLang's child processes
    _install_sgl_kernel_stand_in()
    install_torchvision_placeholders()


def set_features(features: str) -> None:
    """The launcher's ``--banaserve-features``: exported for this process and its children."""
    os.environ[_env.SGLANG_FEATURES.name] = features


def active() -> bool:
    """True in processes started through the CPU launcher (or their children)."""
    return _env.get(_env.SGLANG_CPU_COMPAT)


def apply_sglang_patches() -> None:
    """SGLang-internal CPU fixes, applied by the plug-in when :func:`active`."""
    try:
        from sglang.srt.disaggregation.mooncake import conn as mooncake_conn
    except Exception:  # mooncake not installed: nothing to patch (optional in the host table)
        return
    # Mooncake's sender advertises a GPU-only path (pinned host staging) that fails on CPU.
    mooncake_conn.MooncakeKVSender.supports_host_tensor_indices = False


def activate(host: object) -> None:
    """Activation of the host layer's ``cpu_launcher`` feature."""
    apply_sglang_patches()

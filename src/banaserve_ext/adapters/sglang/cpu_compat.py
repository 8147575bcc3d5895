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
  load; its ``_meta_registrations`` then fails at import (``operator torchvision::nms does not
  exist``), and SGLang's config package imports torchvision. When (and only when) torchvision
  reports its extension missing, an import hook (:mod:`.torchvision_guard`) gives it empty
  ``_meta_registrations`` / ``_autograd_registrations`` modules; the detection ops they register
  (nms, roi_align...) are unused by text models, and calling one still fails with torchvision's
  own error. ``.ci/install-sglang-cpu`` installs the same hook in every process of its venv (a
  ``.pth`` file), so SGLang's own tools run there too.
* post-warmup GC freeze (an SGLang patch, :func:`patch_http_server`). Servers started with
  ``--skip-server-warmup`` (ours are) POST ``/freeze_gc`` to themselves before uvicorn listens,
  so every start logged ``post-warmup freeze_gc failed`` with a ``Connection refused``
  traceback and the scheduler, detokenizer and tokenizer never froze their start-up objects.
  The patch waits until the HTTP port accepts connections, then lets SGLang post.
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
from typing import Any

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


def install_torchvision_placeholders() -> None:
    """Let ``import torchvision`` succeed when its C extension cannot load (see module doc and
    :mod:`.torchvision_guard`). Idempotent, imports nothing heavy."""
    from . import torchvision_guard

    torchvision_guard.install()


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


#: how long the post-warmup GC freeze waits for the server's own HTTP port
FREEZE_GC_WAIT_S = 120.0


def _wait_until_listening(url: str, timeout_s: float) -> bool:
    import socket
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, parts.port or 80), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def patch_http_server(sg: Any) -> None:
    """SGLang patch for the process that runs the HTTP server (the CPU launcher's main process,
    which calls it with its ``ns("cpu_launcher")``; importing the HTTP server elsewhere would only
    cost time): the post-warmup GC freeze waits until the server listens. Idempotent."""
    http_server = sg["http_server"]
    original = sg["http_server._freeze_gc_after_server_warmup"]
    if getattr(original, "_banaserve_waits", False):
        return

    def freeze_gc_once_listening(server_args: object) -> None:
        _wait_until_listening(server_args.url(), FREEZE_GC_WAIT_S)  # type: ignore[attr-defined]
        original(server_args)  # still logs SGLang's own warning if the port never opened

    freeze_gc_once_listening._banaserve_waits = True  # type: ignore[attr-defined]
    http_server._freeze_gc_after_server_warmup = freeze_gc_once_listening


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

# SPDX-License-Identifier: Apache-2.0
"""Real-SGLang test bed shared by every integration test.

Use from a test directory's ``conftest.py``::

    from sglang_testbed.fixtures import *  # noqa: F403  (tiny_model_dir, sglang_cluster)

* ``tiny_model_dir`` (session): the tiny Llama + byte-level BPE tokenizer, created locally once
  per session by :func:`banaserve_ext.launch.tiny_model.create_tiny_llama`.
* ``sglang_cluster`` (function): a factory that starts SGLang servers and ``sglang_router`` as
  subprocesses on 127.0.0.1 (CPU, through ``banaserve_ext.adapters.sglang.serve_cpu``), waits for
  readiness, and always stops them by PID (process group) at teardown, also when the test failed.
  At most :data:`MAX_SERVERS` SGLang servers at once (~2.1 GB RSS each).

How the CPU stack copes with what SGLang lacks on CPU (``sgl_kernel``, torchvision's CUDA build):
see ``src/banaserve_ext/adapters/sglang/cpu_compat.py``; the test bed only uses it.
"""

from __future__ import annotations

MAX_SERVERS = 3

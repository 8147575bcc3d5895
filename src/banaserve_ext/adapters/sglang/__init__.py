# SPDX-License-Identifier: Apache-2.0
"""SGLang adapter: the ``banaserve`` PD transfer backend plug-in (``plugin.register`` is the
``sglang.srt.plugins`` entry point) and, for hosts without GPUs, :mod:`.cpu_compat`.

Importing this package imports neither torch nor sglang.
"""

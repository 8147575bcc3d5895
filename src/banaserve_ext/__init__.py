# SPDX-License-Identifier: Apache-2.0
"""banaserve-ext: self-balancing prefill/decode disaggregated serving for SGLang.

``import banaserve_ext`` is light: it never imports torch or sglang, and loads the compiled core
(``banaserve_ext._core``) only when a component that needs it is imported.
"""

from __future__ import annotations

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["__version__", *_errors_all]

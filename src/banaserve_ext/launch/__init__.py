# SPDX-License-Identifier: Apache-2.0
"""``banaserve launch``: start a PD deployment of SGLang servers with the ``banaserve`` transfer
backend, wait for it, optionally replay a trace against it, and tear it down.

Importing this package imports neither torch nor sglang.
"""

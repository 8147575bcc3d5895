# SPDX-License-Identifier: Apache-2.0
"""``python -m banaserve_ext.adapters.sglang.serve_cpu ARGS``: an SGLang server on CPU.

Takes the same arguments as ``python -m sglang.launch_server``. The compat layer
(:mod:`.cpu_compat`) is installed at import of this module, on purpose at top level: SGLang
starts its scheduler and detokenizer with the ``spawn`` start method, which re-imports the main
module in each child (as ``__mp_main__``) before unpickling anything, so the children get it
before their first ``import sglang``. This module therefore stays the main module and calls
SGLang's launcher functions itself instead of handing ``__main__`` over to it.
"""

from __future__ import annotations

import os
import sys

from banaserve_ext.adapters.sglang import cpu_compat

cpu_compat.install()


def main(argv: list[str]) -> None:
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    cpu_compat.patch_http_server()
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main(sys.argv[1:])

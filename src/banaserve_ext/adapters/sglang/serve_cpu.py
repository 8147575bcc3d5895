# SPDX-License-Identifier: Apache-2.0
"""``python -m banaserve_ext.adapters.sglang.serve_cpu ARGS``: an SGLang server on CPU.

Takes the same arguments as ``python -m sglang.launch_server``, plus ``--banaserve-features
LIST`` (comma list: ``admin``, ``kv_migration``, ``layer_migration``), the opt-in of features
SGLang has no argument for (see ``adapters/sglang/host/selection.py``). The compat layer
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
    from banaserve_ext.adapters.sglang.host.selection import take_features

    argv, features = take_features(argv)
    if features is not None:  # the opt-in, for this process and (inherited) SGLang's children
        cpu_compat.set_features(features)
    from banaserve_ext.adapters.sglang.host import ns

    sg = ns("cpu_launcher")  # SGLang's launcher functions (listed in host/table.py)
    sg.load_plugins()
    cpu_compat.patch_http_server(sg)
    server_args = sg.prepare_server_args(argv)
    try:
        sg["launch_server.run_server"](server_args)
    finally:
        sg.kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main(sys.argv[1:])

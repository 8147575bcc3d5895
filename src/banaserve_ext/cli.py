# SPDX-License-Identifier: Apache-2.0
"""``banaserve``: one command, one subcommand per component.

Each subcommand lives in its component's package as a module exposing
``add_arguments(parser)`` and ``main(args) -> int``; this file only dispatches, and imports a
component only when its subcommand runs (so ``banaserve sim`` never imports the router).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("banaserve_ext.bench.cli", "run a standard benchmark against the installed peers"),
    "pool": ("banaserve_ext.kvpool.cli", "serve, inspect or remove a shared-memory KV pool"),
    "router": ("banaserve_ext.router.cli", "load-aware PD router (sglang_router PD flags)"),
    "sim": ("banaserve_ext.sim.cli", "cluster simulator: replay, run, routing ablation, compare"),
    "launch": ("banaserve_ext.launch.cli", "start a PD deployment of SGLang servers"),
    "sglang": (
        "banaserve_ext.adapters.sglang.host.cli",
        "SGLang plug-in: `probe` the installed SGLang for the internals it needs",
    ),
    "control": ("banaserve_ext.live.cli", "live controller: rebalance a running deployment"),
    "status": ("banaserve_ext.live.status", "show the live controller's view of a deployment"),
}


def _usage() -> str:
    lines = ["usage: banaserve COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"banaserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"banaserve {name}", description=help_text)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())

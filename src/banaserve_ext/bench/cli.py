# SPDX-License-Identifier: Apache-2.0
"""``banaserve bench NAME``: one sub-benchmark per component, imported only when chosen."""

from __future__ import annotations

import argparse
import importlib

# name -> (module exposing add_arguments(parser) and main(args) -> int, help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "transfer": ("banaserve_ext.bench.transfer", "transfer engine vs Mooncake TE (two processes)"),
    "cuda": ("banaserve_ext.bench.cuda", "GPU data paths vs cudaMemcpy (needs a CUDA build + GPU)"),
    "store": ("banaserve_ext.bench.store", "shared-memory KV pool vs Mooncake Store"),
    "layer-migration": ("banaserve_ext.bench.layer_migration", "layer migration vs cost model"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(p)


def main(args: argparse.Namespace) -> int:
    module = importlib.import_module(args._bench_module)
    return int(module.main(args) or 0)

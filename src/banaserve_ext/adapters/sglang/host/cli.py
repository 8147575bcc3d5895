# SPDX-License-Identifier: Apache-2.0
"""``banaserve sglang probe``: what each plug-in feature needs inside SGLang, found or not.

Probes the installed SGLang the way the plug-in does at load (without starting a server) and
prints one row per internal: feature, short name, kind, status, detail. Exit status 1 when an
internal a feature needs is missing (that feature would refuse to start), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys

from ....errors import InvalidArgumentError
from . import FEATURES, TESTED_SGLANG, probe_table, sglang_version
from .table import INTERNALS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("probe", help="probe the installed SGLang for the plug-in's internals")
    p.add_argument("--feature", action="append", default=[],
                   help=f"only this feature (repeatable): {', '.join(INTERNALS)}")  # fmt: skip
    p.add_argument("--missing", action="store_true", help="print only what is not found")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def _prepare_cpu_host() -> None:
    """Importing SGLang on a host without its GPU kernels needs the CPU launcher's fixes."""
    import importlib.util

    from .. import cpu_compat

    if importlib.util.find_spec("sgl_kernel") is None:
        cpu_compat.install()
    else:
        cpu_compat.install_torchvision_placeholders()


def main(args: argparse.Namespace) -> int:
    features = list(args.feature) or list(INTERNALS)
    unknown = [f for f in features if f not in INTERNALS]
    if unknown:
        raise InvalidArgumentError(f"unknown feature(s) {unknown}; known: {list(INTERNALS)}")
    version = sglang_version()
    if version != "not installed":
        _prepare_cpu_host()
    rows = probe_table(features)
    missing = [(f, r) for f, r in rows if not r.found and not r.internal.optional]
    names = {id(i): n for f in INTERNALS for n, i in INTERNALS[f].items()}
    if args.json:
        print(json.dumps({
            "sglang": version, "tested": TESTED_SGLANG,
            "rows": [{"feature": f, "name": names.get(id(r.internal), r.internal.name),
                      "internal": r.internal.name, "kind": r.internal.kind,
                      "hook": r.internal.hook, "status": r.status, "detail": r.detail}
                     for f, r in rows if r.found is False or not args.missing],
        }))  # fmt: skip
        return 1 if missing else 0
    print(f"SGLang {version} (banaserve tested with {TESTED_SGLANG})")
    print(f"{'feature':<16} {'status':<17} {'kind':<7} internal")
    for f, r in rows:
        if args.missing and r.found:
            continue
        kind = "hook" if r.internal.hook else r.internal.kind
        detail = f"  [{r.detail}]" if r.detail and not r.found else ""
        print(f"{f:<16} {r.status:<17} {kind:<7} {r.internal.name}{detail}")
    by_feature = {f: sum(1 for g, _ in missing if g == f) for f in features}
    print()
    for f in features:
        doc = FEATURES[f].doc if f in FEATURES else "used by every feature that hooks"
        state = "ok" if not by_feature[f] else f"REFUSES TO START ({by_feature[f]} missing)"
        print(f"{f:<16} {state:<30} {doc}")
    return 1 if missing else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="banaserve sglang")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

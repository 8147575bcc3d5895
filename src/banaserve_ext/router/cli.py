# SPDX-License-Identifier: Apache-2.0
"""``banaserve router`` / ``python -m banaserve_ext.router``: sglang_router's PD command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..errors import BanaserveError
from .config import add_arguments as _add_config_arguments
from .config import config_from_args, ignored_flags_used

log = logging.getLogger("banaserve_ext.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument(
        "--event-loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="uvloop when installed (auto), or the standard asyncio loop",
    )


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found]

            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise BanaserveError("--event-loop uvloop: uvloop is not installed") from None
    return asyncio.new_event_loop()


def main(args: argparse.Namespace) -> int:
    level = getattr(logging, str(args.log_level).upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except BanaserveError as exc:
        print(f"banaserve router: {exc}", file=sys.stderr)
        return 2
    ignored = ignored_flags_used(args)
    if ignored:
        log.warning("accepted for compatibility, not acted on: %s", ", ".join(ignored))
    from .server import Router

    loop = _new_loop(args.event_loop)
    try:
        loop.run_until_complete(Router(cfg).serve_forever())
    except OSError as exc:
        print(f"banaserve router: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m banaserve_ext.router",
        description="load-aware PD router (sglang_router-compatible flags)",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))

# SPDX-License-Identifier: Apache-2.0
import argparse
import sys

from .cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m banaserve_ext.bench")
add_arguments(parser)
sys.exit(main(parser.parse_args()))

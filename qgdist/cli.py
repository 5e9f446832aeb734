"""The ``qgdist`` command line: a thin table of subcommands.

Each stage owns its subcommands in a small ``commands`` module exposing ``register(subparsers)``; that function
adds argparse parsers whose ``func`` default maps the flags onto the stage's typed config and runs it. Command
modules import heavy libraries (torch, ray, mlflow) inside their run functions, so ``qgdist --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from qgdist.subcommands import register_modules

#: Modules that contribute subcommands, in pipeline order.
COMMAND_MODULES = [
    "qgdist.generate.commands",   # generate toy | pythia
    "qgdist.data.commands",       # convert, inspect
    "qgdist.train.commands",      # train, quickstart
    "qgdist.train.eval_commands", # evaluate, export
    "qgdist.track.commands",      # tracker
    "qgdist.cluster.commands",    # submit, jobs
    "qgdist.bench.commands",      # bench convert | knn | step | loader | train | physics
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgdist", description="Distributed streaming quark/gluon jet tagging (Ray, PyTorch, MLflow).")
    parser.add_argument("--version", action="version", version=f"qgdist {importlib.import_module('qgdist').__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_modules(subparsers, COMMAND_MODULES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qgdist`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

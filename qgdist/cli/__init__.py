"""The ``qgdist`` command line: one module per command group, wired here in a static table.

Each group module exposes ``register(subparsers)``; its parsers are generated from the stage configs
(``qgdist.core.config``), and its run functions import the heavy libraries (torch, ray, mlflow) when called, so
``qgdist --help`` stays fast. A group module that fails to import is an error, never a missing command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import qgdist
from qgdist.core.errors import QgdistError
from qgdist.core.secrets import redact
from qgdist.cli import bench, cluster, data, evaluate, generate, pipelines, track, train
from qgdist.cli.parser import Parser

#: Command groups in pipeline order (``qgdist --help`` lists them so).
GROUPS = (generate, data, train, evaluate, track, cluster, pipelines, bench)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``qgdist`` parser (also used by ``qgdist submit`` to check a job's arguments before sending)."""
    parser = Parser(
        prog="qgdist", description="Distributed streaming quark/gluon jet tagging (Ray, PyTorch, MLflow).")
    parser.add_argument("--version", action="version", version=f"qgdist {qgdist.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qgdist`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except QgdistError as err:   # one clear line, not a traceback: the user's settings or data are wrong
        message = f"{getattr(args, 'command_name', 'qgdist')}: {err}" + (f"\n({err.hint})" if err.hint else "")
        print(redact(message), file=sys.stderr)   # an error may name an input or server URL with credentials
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)

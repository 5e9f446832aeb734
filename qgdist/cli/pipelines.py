"""``qgdist quickstart``: the whole pipeline on toy data."""

from __future__ import annotations

import argparse

from qgdist.core.config import add_arguments, from_args
from qgdist.pipelines.quickstart import QuickstartConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="toy data in both formats -> convert -> train both models -> report")
    add_arguments(p, QuickstartConfig)
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from qgdist.pipelines.quickstart import quickstart

    report = quickstart(from_args(QuickstartConfig, args))
    print(f"report: {report}")
    return 0

"""``qgdist generate toy|pythia``: each generator module adds its own subcommand."""

from __future__ import annotations

import argparse

from qgdist.subcommands import register_modules

GENERATOR_MODULES = ["qgdist.generate.toy", "qgdist.generate.pythia"]


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="write jets in the public source formats (toy or Pythia)")
    register_modules(gen.add_subparsers(dest="generator", metavar="GENERATOR", required=True), GENERATOR_MODULES)

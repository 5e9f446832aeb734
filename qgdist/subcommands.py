"""How command modules plug into the CLI: each exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence


def register_modules(subparsers: argparse._SubParsersAction, modules: Sequence[str]) -> None:
    """Let each module in ``modules`` add its parsers; a module that does not exist is skipped."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(subparsers)

"""The parser class of every ``qgdist`` command: argparse's own refusals in qgdist's one-line form.

argparse reports a bad flag value as a usage block and ``qgdist train: error: argument --epochs: invalid int
value: 'abc'``. Every other refusal of a setting reads ``qgdist train: epochs: <reason>`` (``qgdist.cli.main``),
so argparse's are rewritten the same way: the field, then argparse's reason, then a hint to ``--help``; exit 2.
"""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

_ARGUMENT = re.compile(r"argument ([^:]+): (.*)", re.S)
_REQUIRED = re.compile(r"the following arguments are required: (.*)", re.S)


def _field(names: str) -> str:
    """``--batch-size`` (or ``-b/--batch-size``, or ``COMMAND``) -> the config field it sets: ``batch_size``."""
    name = names.split("/")[-1].strip()
    return name.lstrip("-").replace("-", "_") if name.startswith("-") else name


def one_line(message: str) -> str:
    """argparse's error message as ``field: reason``."""
    if found := _ARGUMENT.fullmatch(message):
        return f"{_field(found[1])}: {found[2]}"
    if found := _REQUIRED.fullmatch(message):
        return "; ".join(f"{_field(name)}: required" for name in found[1].split(", "))
    return message


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose refusals are one line, ``PROG: field: reason``, and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {one_line(message)}\n(see {self.prog} --help)\n")

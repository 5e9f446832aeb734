"""A pytest plugin for mutation runs only (loaded by ``[tool.mutmut] pytest_add_cli_args``): fastest tests first.

mutmut runs each mutant's tests with ``-x``, in no particular order, so a mutant that a 0.1 s test kills may first
wait for a 40 s loader test to pass. Ordering by the durations mutmut recorded in its clean run changes no verdict
(the same tests run; a survivor still runs them all), only how soon a killed mutant stops. Tests stay grouped by
file (the cheapest file first), so a module-scoped fixture is built once.
"""

from __future__ import annotations

import json
from pathlib import Path

STATS = Path("mutmut-stats.json")   # mutmut runs the tests in mutants/, where it keeps this file


def pytest_collection_modifyitems(items: list) -> None:
    try:
        durations = json.loads(STATS.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return

    def cost(item) -> float:
        return durations.get(item.nodeid, float("inf"))   # a test new since the clean run: last

    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    per_file: dict[str, float] = {}
    for item in items:
        per_file[file_of(item)] = per_file.get(file_of(item), 0.0) + cost(item)
    items.sort(key=lambda item: (per_file[file_of(item)], cost(item)))

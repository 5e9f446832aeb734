"""Raw source files -> units of work: the readers by source, input expansion and row-range planning.

``qgdist convert`` and ``qgdist predict`` both read raw files in units (row ranges of one file; for CMS whole row
groups), planned here from file footers and headers alone, so the same file spreads over the same tasks whichever
command reads it, and neither inference nor training reaches into the conversion pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import fsspec

from qgdist.core.errors import InputError
from qgdist.data.sources import cms, columnar, energyflow
from qgdist.data.sources.base import Plan, Unit, file_name
from qgdist.data.sources.errors import BadRowError, Rejected

Source = Literal["cms", "energyflow", "columnar"]
READERS = {"cms": cms, "energyflow": energyflow, "columnar": columnar}
KINDS = {"cms": "image", "energyflow": "cloud", "columnar": "cloud"}
EXTENSIONS = {"cms": ".parquet", "energyflow": ".npz", "columnar": columnar.EXTENSIONS}
#: Rows per task: a CMS unit of 1024 jets is ~5 MB of shards and ~1-2 s of work; clouds are ~10x cheaper (and an
#: EnergyFlow unit holds at most ``energyflow.UNIT_BYTES`` of padded rows, fewer jets in a file padded wider).
ROWS_PER_TASK = {"cms": 1024, "energyflow": 16384, "columnar": 16384}


def expand_inputs(inputs: list[str], source: str) -> list[str]:
    """Files named directly, the matching files of directories, and glob matches, in sorted order."""
    out: list[str] = []
    for item in inputs:
        fs, path = fsspec.core.url_to_fs(item)
        protocol = item.split("://")[0] + "://" if "://" in item else ""
        try:
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
            elif fs.isdir(path):
                found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(EXTENSIONS[source]))
            else:
                found = [path]
        except OSError as err:   # a server that does not answer, refused credentials (aiohttp's are OSErrors too)
            raise InputError(f"{item}: cannot be listed ({type(err).__name__}: {err})", file=item) from None
        out += [protocol + p if protocol else p for p in found]
    names = [file_name(p) for p in out]
    if len(set(names)) != len(names):
        raise ValueError("two inputs share a file name; keys and splits are derived from it: rename one")
    return out


def plan_inputs(source: str, inputs: list[str], cpus: int = 1, rows_per_task: int | None = None,
                on_bad_row: str = "error", options: dict[str, Any] | None = None,
                ) -> tuple[list[Unit], int, list[Rejected]]:
    """Units of every input (numbered), total rows, and rows/files rejected while planning.

    Without an explicit ``rows_per_task``, units shrink until there are at least ``cpus`` of them, so a small
    input still keeps every CPU busy (planning reads footers only, so planning twice is cheap). A deflated
    EnergyFlow file is cut like any other: its units are ``stream`` units, inflated once by one streaming reader
    (``qgdist.data.sources.stream``). Under ``on_bad_row="error"`` the first bad file or row raises
    ``BadRowError``. ``options``: the reader's own keyword arguments (a columnar file's branch names).
    """
    per_task = rows_per_task or ROWS_PER_TASK[source]
    options = options or {}
    if source == "energyflow" and rows_per_task is None:   # the user's rows per unit, else a unit's bytes bound it
        options = {**options, "max_unit_bytes": energyflow.UNIT_BYTES}
    units, rows, rejected = _plan(source, inputs, per_task, True, on_bad_row, options)
    if rows_per_task is None and 0 < len(units) < cpus and rows > len(units):
        units, rows, rejected = _plan(source, inputs, max(1, -(-rows // cpus)), True, on_bad_row, options)
    return [dataclasses.replace(u, index=i) for i, u in enumerate(units)], rows, rejected


def _plan(source: str, inputs: list[str], per_task: int, split_deflated: bool, on_bad_row: str,
          options: dict[str, Any]) -> tuple[list[Unit], int, list[Rejected]]:
    units, rows, rejected = [], 0, []
    for path in inputs:
        try:
            plan: Plan = READERS[source].plan(path, per_task, split_deflated=split_deflated, **options)
        except BadRowError as err:
            if on_bad_row == "error":
                raise
            rejected.append(err.record)
            continue
        if plan.rejected and on_bad_row == "error":
            raise BadRowError.from_record(plan.rejected[0])
        units += plan.units
        rows += plan.rows
        rejected += plan.rejected
    return units, rows, rejected

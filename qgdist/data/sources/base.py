"""What every source reader shares: work units, plans and the chunks a reader yields."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from qgdist.data.shards.schema import JetChunk, Sample
from qgdist.data.sources.errors import BadRowError, Rejected


@dataclass(frozen=True)
class Unit:
    """One read task: rows [row_start, row_stop) of one input file (CMS: made of whole ``row_groups``).

    ``stream``: the rows lie in a compressed stream without random access (a deflated npz member); the file's
    units are then inflated once, in order, by one streaming reader (``qgdist.data.sources.stream``) that hands
    each unit its raw rows, instead of each unit inflating everything before it.
    """

    path: str
    row_start: int
    row_stop: int
    row_groups: tuple[int, ...] = ()
    index: int = -1
    stream: bool = False

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class Plan:
    """The units of one input file, its row count, and rows already known to be bad from its header."""

    units: list[Unit]
    rows: int
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class Chunk:
    """Part of a unit after decoding: the good jets as columns (``block``, in source-row order) and rejected rows."""

    block: JetChunk | None = None
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.block) if self.block is not None else 0

    @property
    def rows(self) -> list[int]:
        """Source rows of the good jets."""
        return self.block.jets["row"].tolist() if self.block is not None else []

    @property
    def samples(self) -> list[Sample]:
        """The good jets one by one (tests and tools; the conversion works on ``block``)."""
        return self.block.samples() if self.block is not None else []


def file_name(path: str) -> str:
    """The base name that identifies an input in keys, metadata, splits and error messages."""
    return posixpath.basename(fsspec.core.strip_protocol(path).rstrip("/"))


def open_input(path: str) -> tuple[Any, str]:
    """(filesystem, path) for a local path or fsspec URL; a missing or 0-byte file is a whole-file error."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise BadRowError(file_name(path), None, "<file>", "file not found")
    if fs.size(p) == 0:
        raise BadRowError(file_name(path), None, "<file>", "empty file (0 bytes)")
    return fs, p


def row_units(path: str, rows: int, rows_per_unit: int) -> list[Unit]:
    """Consecutive row ranges of at most ``rows_per_unit`` rows."""
    return [Unit(path, lo, min(lo + rows_per_unit, rows)) for lo in range(0, rows, rows_per_unit)]

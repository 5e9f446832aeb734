"""One streaming reader per deflated file: its units' raw rows, inflated once and in order.

Deflate has no random access: a unit that starts at row r of a deflated npz member can only get there by
inflating rows 0..r-1, so U units that each read their own rows would inflate the file (U + 1) / 2 times. Instead
the planner marks such units ``stream`` and ``inflate`` walks the member once, cutting it into each unit's raw
rows (``Rows``: the npy bytes as stored, with the unit's labels). Inflating is the cheap part (~210 MB/s here:
2.3 CPU-seconds for a 100k-jet toy file); the expensive part -- validation, encoding and writing in
``qgdist convert``, the network in ``qgdist predict`` -- then runs on every task or actor, as for a stored file.

``with_rows(units)`` is the in-process form (each file inflated once, units in order);
``qgdist.data.sources.ray_units`` is the Ray Data form (a generator read task per file feeding a parallel stage).
A unit decoded from ``Rows`` yields exactly the chunks -- the same blocks of rows, the same rejected rows -- as
the unit reading its own rows, so outputs are byte-identical either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qgdist.data.sources.base import Unit
from qgdist.data.sources.energyflow import InflateError, _header, _labels, _member, _open_zip

#: Rows inflated per read: the blocks a unit's own read uses, so a corrupt block loses the same rows.
READ_ROWS = 1024


@dataclass
class Rows:
    """A unit's raw rows of ``X`` (npy data as stored, row after row) and labels ``y``, inflated ahead.

    When the stream broke at row ``failed_at`` (a block start), ``x`` holds the rows before it and ``error`` says
    what broke; the unit's read rejects ``failed_at`` onwards, as a read of its own would have.
    """

    x: bytes | bytearray | memoryview
    y: np.ndarray
    xdtype: str
    row_shape: tuple[int, ...]
    start: int
    failed_at: int | None = None
    error: str = ""

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.xdtype).itemsize

    def block(self, lo: int, hi: int) -> memoryview:
        """Raw bytes of rows [lo, hi) (no copy); raises ``InflateError`` from the row where the stream broke."""
        if self.failed_at is not None and hi > self.failed_at:
            raise InflateError(self.error)
        return memoryview(self.x)[(lo - self.start) * self.row_bytes:(hi - self.start) * self.row_bytes]

    def meta(self) -> str:
        """Everything but the bytes, as JSON."""
        return json.dumps({"xdtype": self.xdtype, "row_shape": list(self.row_shape), "start": self.start,
                           "failed_at": self.failed_at, "error": self.error})

    @classmethod
    def from_parts(cls, x: Any, y: Any, meta: str) -> Rows:
        """The inverse of (``x``, ``y`` bytes, ``meta()``); ``x`` and ``y`` may be any buffers (no copy)."""
        m = json.loads(meta)
        return cls(x, np.frombuffer(y, np.float64), m["xdtype"], tuple(m["row_shape"]), m["start"], m["failed_at"],
                   m["error"])


def inflate(units: Sequence[Unit], read_rows: int = READ_ROWS) -> Iterator[tuple[Unit, Rows]]:
    """The raw rows of ``units`` (of one deflated file, in row order), inflating the member once.

    Memory: one unit's rows (plus one block). A block that cannot be inflated (corrupt or truncated stream) ends
    the stream: that unit keeps the rows before it, and every later unit of the file gets none (all rejected).
    """
    path = units[0].path
    if any(u.path != path for u in units) or any(a.row_stop > b.row_start for a, b in zip(units, units[1:])):
        raise ValueError(f"{path}: inflate takes the units of one file in row order")
    f, zf = _open_zip(path)
    with f, zf:
        info = _member(zf, "X", path)
        shape, xdtype, header = _header(zf, info, path)
        y = _labels(zf, path)
        row_shape = tuple(shape[1:])
        row_bytes = int(np.prod(row_shape)) * xdtype.itemsize
        error, at = "", 0   # at: the member offset the stream has reached (the npy header comes first)
        with zf.open(info) as stream:
            for u in units:
                rows = Rows(bytearray(u.rows * row_bytes), y[u.row_start:u.row_stop], xdtype.str, row_shape,
                            u.row_start)
                if error:
                    rows.x, rows.failed_at, rows.error = b"", u.row_start, error
                    yield u, rows
                    continue
                view = memoryview(rows.x)
                for lo in range(u.row_start, u.row_stop, read_rows):
                    hi = min(lo + read_rows, u.row_stop)
                    try:
                        if at < header + lo * row_bytes:   # rows no unit asked for
                            stream.seek(header + lo * row_bytes)
                        data = stream.read((hi - lo) * row_bytes)
                        at = header + lo * row_bytes + len(data)
                        if len(data) != (hi - lo) * row_bytes:
                            raise EOFError(f"file ends after {len(data) // max(row_bytes, 1)} of {hi - lo} rows")
                    except Exception as err:   # the stream cannot go on past a corrupt or truncated block
                        error = f"{type(err).__name__}: {err}"
                        rows.x, rows.failed_at, rows.error = view[:(lo - u.row_start) * row_bytes], lo, error
                        break
                    view[(lo - u.row_start) * row_bytes:(hi - u.row_start) * row_bytes] = data
                yield u, rows


def stream_groups(units: Sequence[Unit]) -> list[tuple[Unit, ...]]:
    """``units`` in groups: each ``stream`` file's units together (in row order), every other unit alone; groups
    ordered by their first unit."""
    groups: dict[Any, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.path if u.stream else id(u), []).append(u)
    return [tuple(sorted(g, key=lambda u: u.row_start)) for g in groups.values()]


def with_rows(units: Sequence[Unit]) -> Iterator[tuple[Unit, Rows | None]]:
    """Every unit with its raw rows when it is a ``stream`` unit (each such file inflated once), else None."""
    for group in stream_groups(units):
        if group[0].stream:
            yield from inflate(group)
        else:
            yield group[0], None

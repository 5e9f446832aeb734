"""Streaming reader of CMS End-to-End jet-image parquet files (``X_jets`` 3x125x125, ``pt``, ``m0``, ``y``).

The public files hold one row group per jet, so a unit is many consecutive row groups, and each read coalesces up
to ``read_rows`` of them into one ``ParquetFile.read_row_groups`` call. ``X_jets`` is decoded by flattening the
three list levels with Arrow (no Python loop over elements); list items may be named ``item`` or ``element`` and
values may be double or float. The list lengths of every level are checked, so a jet of the wrong shape is a
rejected row, not a crash or a silently misaligned image.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from qgdist.data.labels import LabelConvention
from qgdist.data.shards.schema import IMAGE_JET, ImageChunk
from qgdist.data.sources.base import Chunk, Plan, Unit, file_name, open_input
from qgdist.data.sources.errors import BadRowError, Rejected

COLUMNS = ("X_jets", "pt", "m0", "y")
IMAGE_SHAPE = (3, 125, 125)
#: Pixels down to this (in the file's unit, GeV) are detector noise around zero and kept as they are; one below it
#: rejects the row. The E2E authors zero every pixel below 1e-3 before training (REFERENCE 1), so anything within
#: that band of zero carries no signal either way; a clearly negative energy is a corrupt value.
NEGATIVE_PIXEL_TOLERANCE = 1e-3


def plan(path: str, rows_per_unit: int, split_deflated: bool = True) -> Plan:
    """Units of whole row groups (about ``rows_per_unit`` rows each) from the parquet footer alone."""
    fs, p = open_input(path)
    try:
        with fs.open(p, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for truncated or corrupt footers
        raise BadRowError(file_name(path), None, "<file>", f"not a readable parquet file ({err})") from None
    if meta.num_rows == 0:
        raise BadRowError(file_name(path), None, "<file>", "file has no rows")
    units, groups, start, row = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        row += meta.row_group(g).num_rows
        if row - start >= rows_per_unit or g == meta.num_row_groups - 1:
            units.append(Unit(path, start, row, tuple(groups)))
            groups, start = [], row
    return Plan(units, meta.num_rows)


def _is_image_type(t: pa.DataType) -> bool:
    for _ in range(3):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return False
        t = t.value_type
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _lengths(arr: pa.Array) -> np.ndarray:
    """List lengths with nulls as -1 (a null list is never the right shape)."""
    return arr.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def decode_images(x: pa.Array, shape: tuple[int, int, int] = IMAGE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(good, pixels): which rows of a list<list<list<number>>> array have ``shape``, and their pixels as a
    (k, C*H*W) array of the column's own type (float64 for the public files; no copy when every row is good)."""
    c, h, w = shape
    n = len(x)
    l0 = _lengths(x)
    mid = x.flatten()
    l1 = _lengths(mid)
    inner = mid.flatten()
    l2 = _lengths(inner)
    values = inner.flatten().to_numpy(zero_copy_only=False)  # nulls come back as NaN and are caught later
    seg1 = np.repeat(np.arange(n), np.maximum(l0, 0))
    seg2 = np.repeat(seg1, np.maximum(l1, 0))
    bad1 = np.bincount(seg1, weights=(l1 != h), minlength=n) > 0
    bad2 = np.bincount(seg2, weights=(l2 != w), minlength=n) > 0
    good = (l0 == c) & ~bad1 & ~bad2
    if good.all():
        return good, values.reshape(n, c * h * w)
    per_row = np.bincount(seg2, weights=np.maximum(l2, 0), minlength=n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    images = [values[s: s + c * h * w] for s in starts[good]]
    return good, (np.stack(images) if images else np.zeros((0, c * h * w)))


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy().astype(np.float64)  # nulls -> NaN


def decode_table(table: pa.Table, rows: np.ndarray, name: str, labels: LabelConvention, dtype: str) -> Chunk:
    """Validate and encode the rows of a CMS table; ``rows`` are their indices in the source file.

    Vectorised over the rows: every image becomes sparse (flat index, value) pairs in one boolean ``flatnonzero``
    over the whole block; only rejected rows are visited one by one (to name their problem).
    """
    column = table.column("X_jets")   # one chunk per read: no copy (combine_chunks would copy all the pixels)
    good, flat = decode_images(column.chunk(0) if column.num_chunks == 1 else column.combine_chunks())
    pt, m0, y = (_column(table, c) for c in ("pt", "m0", "y"))
    size = flat.shape[1]
    # Sparse in one pass: the non-zero entries of all images at once (a boolean nonzero is ~7x faster than
    # np.nonzero of the 2-D float array); NaN and inf are non-zero, so checking those values checks every pixel.
    where = np.flatnonzero(flat != 0)
    img = where // size
    values = flat.reshape(-1)[where].astype(np.float32)
    decoded = np.flatnonzero(good)                      # row of each decoded image
    finite_img, negative_img, empty_img = (np.zeros(len(rows), dtype=bool) for _ in range(3))
    finite_img[decoded] = True
    finite_img[decoded[img[~np.isfinite(values)]]] = False
    negative_img[decoded[img[values < -NEGATIVE_PIXEL_TOLERANCE]]] = True
    empty_img[decoded] = np.bincount(img, minlength=len(decoded)) == 0
    pt_ok = np.isfinite(pt) & (pt > 0)
    m0_ok = np.isfinite(m0) & (m0 >= 0)
    ok = good & finite_img & ~negative_img & ~empty_img & pt_ok & m0_ok & ((y == 0.0) | (y == 1.0))
    rejected = []
    for i in np.flatnonzero(~ok).tolist():
        if not good[i]:
            problem = ("X_jets", f"image shape is not {list(IMAGE_SHAPE)} (or null)")
        elif not finite_img[i]:
            problem = ("X_jets", "NaN or inf pixel")
        elif negative_img[i]:
            problem = ("X_jets", f"pixel value below -{NEGATIVE_PIXEL_TOLERANCE:g} (a negative energy)")
        elif empty_img[i]:
            problem = ("X_jets", "image is empty (no non-zero pixel)")
        elif not pt_ok[i]:
            problem = ("pt", f"jet pt {float(pt[i])!r} is not a positive finite number")
        elif not m0_ok[i]:
            problem = ("m0", f"jet mass {float(m0[i])!r} is not a non-negative finite number")
        else:
            problem = ("y", f"label {float(y[i])!r} is not 0 or 1")
        rejected.append(Rejected(name, int(rows[i]), *problem))
    ok_img = ok[good]                                   # over the decoded images
    keep = ok_img[img] & (values != 0)                  # (a double too small for float32 is no pixel)
    pix = (where - img * size)[keep]
    img, values = (np.cumsum(ok_img) - 1)[img[keep]], values[keep].astype(dtype)
    index_dtype = np.uint16 if size <= np.iinfo(np.uint16).max + 1 else np.int32
    sel = np.flatnonzero(ok)
    jets = np.zeros(len(sel), IMAGE_JET)
    jets["row"], jets["is_quark"], jets["pt"], jets["mass"] = rows[sel], labels.is_quark(y[sel]), pt[sel], m0[sel]
    jets["n"] = np.bincount(img, minlength=len(sel))
    block = ImageChunk(file=name, source="cms", jets=jets, dtype=dtype, pix=pix.astype(index_dtype), val=values,
                       image_shape=IMAGE_SHAPE)
    return Chunk(block, rejected)


def _read_groups(pf: pq.ParquetFile, groups: list[int], first_row: int, name: str) -> tuple[list, Chunk]:
    """Read row groups; a group that fails to decode is rejected row by row, naming the column that failed."""
    try:
        # one thread: a task owns one CPU, and Arrow's thread pool only adds contention here
        return [(pf.read_row_groups(groups, columns=list(COLUMNS), use_threads=False), first_row)], Chunk()
    except Exception:
        if len(groups) == 1:
            bad = Chunk()
            n = pf.metadata.row_group(groups[0]).num_rows
            for col in COLUMNS:
                try:
                    pf.read_row_group(groups[0], columns=[col])
                except Exception as err:
                    bad.rejected = [Rejected(name, first_row + r, col, f"unreadable ({err})") for r in range(n)]
                    return [], bad
            raise
    tables, rejected, row = [], Chunk(), first_row
    for g in groups:  # isolate the broken groups
        got, bad = _read_groups(pf, [g], row, name)
        tables += got
        rejected.rejected += bad.rejected
        row += pf.metadata.row_group(g).num_rows
    return tables, rejected


def read(unit: Unit, labels: LabelConvention, dtype: str = "float32", read_rows: int = 32) -> Iterator[Chunk]:
    """Yield the unit's rows as chunks of at most ~``read_rows`` rows (one coalesced read each).

    32 jets a read: ~6 MB of float64 pixels, which keeps a task near 240 MB (128 a read: ~430 MB) at the same speed.
    """
    name = file_name(unit.path)
    fs, p = open_input(unit.path)
    local = isinstance(fs, LocalFileSystem)
    # A local file is read by Arrow's own reader (no Python file object, so no GIL on the read-ahead thread).
    with (nullcontext(p) if local else fs.open(p, "rb")) as f:
        pf = pq.ParquetFile(f, pre_buffer=True)
        missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
        bad_type = not missing and not _is_image_type(pf.schema_arrow.field("X_jets").type)
        if missing or bad_type:
            field = missing[0] if missing else "X_jets"
            reason = "missing column" if missing else f"type {pf.schema_arrow.field('X_jets').type} is not nested lists"
            yield Chunk(rejected=[Rejected(name, r, field, reason) for r in range(unit.row_start, unit.row_stop)])
            return
        sizes = [pf.metadata.row_group(g).num_rows for g in unit.row_groups]
        reads, row, i = [], unit.row_start, 0
        while i < len(sizes):
            j, rows = i, 0
            while j < len(sizes) and (rows == 0 or rows + sizes[j] <= read_rows):
                rows += sizes[j]
                j += 1
            reads.append((list(unit.row_groups[i:j]), row))
            row, i = row + rows, j
        def decoded(read: Future) -> Chunk:
            tables, bad = read.result()
            blocks = []
            for table, first in tables:
                chunk = decode_table(table, np.arange(first, first + table.num_rows), name, labels, dtype)
                blocks.append(chunk.block)
                bad.rejected += chunk.rejected
            bad.block = ImageChunk.concat(blocks) if blocks else None
            bad.rejected.sort(key=lambda r: r.row)
            return bad

        # A pipeline of two helper threads, two blocks deep: one decodes row groups with Arrow (which releases the
        # GIL), one turns them into sparse chunks, while the caller encodes and writes.
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as decoder:
            pending: deque[Future] = deque()
            todo = iter(reads)
            while True:
                while len(pending) < 2 and (groups := next(todo, None)) is not None:
                    pending.append(decoder.submit(decoded, reader.submit(_read_groups, pf, *groups, name)))
                if not pending:
                    break
                yield pending.popleft().result()
    # Once per unit (per block, the freed pages would only be faulted in again by the next read): a long-lived
    # worker's footprint stays flat across units.
    pa.default_memory_pool().release_unused()

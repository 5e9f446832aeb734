"""Writers for the two public source formats, quirks included, shared by the toy and Pythia generators.

* CMS End-to-End parquet: columns ``X_jets`` (list<list<list<double>>>, 3x125x125), ``pt``, ``m0``, ``y`` (all
  double), **one row group per jet** (the original writer called ``write_table`` once per jet), nested list items
  named ``item`` (older pyarrow) unless told ``element``; ``y = 1`` means gluon.
* EnergyFlow npz: ``X`` float64 (N, M, 4) = (pt, rapidity, phi, pdgid) zero-padded to the file's own maximum
  multiplicity M, ``y`` float64 with ``y = 1`` quark; members stored or deflated (``compress``).

Both writers are atomic (``qgdist.core.atomic.atomic_path``): they write a temporary file and rename (or upload)
it into place, so a reader never sees half a file. Paths may be local or fsspec URLs.
"""

from __future__ import annotations

import tempfile
import zipfile
from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qgdist.core.atomic import atomic_path

#: The most bytes of padded particles the EnergyFlow writer holds at once while it writes ``X``.
PAD_BYTES = 8 << 20


def _nested_list(values: np.ndarray, item_name: str) -> pa.Array:
    """(n, C, H, W) float64 -> list<list<list<double>>> with list items named ``item_name``."""
    n, c, h, w = values.shape
    t_inner = pa.list_(pa.field(item_name, pa.float64()))
    t_mid = pa.list_(pa.field(item_name, t_inner))
    t_outer = pa.list_(pa.field(item_name, t_mid))
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float64).reshape(-1))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c * h * w + 1, w, dtype=np.int32)), flat, type=t_inner)
    mid = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c * h + 1, h, dtype=np.int32)), inner, type=t_mid)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)), mid, type=t_outer)


def cms_table(images: np.ndarray, pt: np.ndarray, m0: np.ndarray, y: np.ndarray, item_name: str = "item") -> pa.Table:
    """A CMS-schema table for (n, 3, H, W) images and per-jet ``pt``, ``m0``, raw label ``y``."""
    return pa.table({
        "X_jets": _nested_list(images, item_name),
        "pt": pa.array(np.asarray(pt, dtype=np.float64)),
        "m0": pa.array(np.asarray(m0, dtype=np.float64)),
        "y": pa.array(np.asarray(y, dtype=np.float64)),
    })


class CMSParquetWriter:
    """Appends jets to a CMS-format parquet file, one row group per jet, and renames it into place on close
    (a ``with`` block that raises leaves no file).

    ``item_name="element"`` writes the modern list-item name instead of the legacy ``item``.
    """

    def __init__(self, path: str, item_name: str = "item"):
        self.path = path
        self.item_name = item_name
        self._commit = ExitStack()  # the open temporary file inside its atomic_path block
        tmp = self._commit.enter_context(atomic_path(path))
        self._file = self._commit.enter_context(open(tmp, "wb"))
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, images: np.ndarray, pt: np.ndarray, m0: np.ndarray, y: np.ndarray) -> None:
        table = cms_table(images, pt, m0, y, self.item_name)
        if self._writer is None:
            writer = pq.ParquetWriter(self._file, table.schema, compression="snappy",
                                      use_compliant_nested_type=(self.item_name == "element"))
            self._writer = self._commit.enter_context(writer)  # closed before the file (last in, first out)
        for i in range(table.num_rows):  # one row group per jet, as the original CMS writer did
            self._writer.write_table(table.slice(i, 1), row_group_size=1)
        self.rows += table.num_rows

    def close(self) -> None:
        self._commit.close()  # closes the parquet writer and the file, then renames (or uploads) it into place

    def __enter__(self) -> "CMSParquetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._commit.__exit__(exc_type, exc, tb)  # closes writer and file; atomic_path removes the file


def write_energyflow_npz(path: str, X: np.ndarray, y: np.ndarray, compress: bool = True) -> None:
    """Write an EnergyFlow-format npz (``X`` (N, M, 4) float64 zero-padded, ``y`` (N,) float64, 1 = quark)."""
    save = np.savez_compressed if compress else np.savez
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        save(f, X=np.asarray(X, dtype=np.float64), y=np.asarray(y, dtype=np.float64))


class EnergyFlowNpzWriter:
    """Appends jets to an EnergyFlow npz without holding the file in memory; renames it into place on close.

    The file's M (its largest multiplicity) is known only after the last jet, and ``X`` is padded to it: so the
    jets are spooled unpadded (their particles and counts) to temporary files, and ``close()`` writes the npz
    member by member, padding at most ``PAD_BYTES`` of jets at a time. Memory: one written chunk while jets
    come, one padded slice while ``X`` is written, whatever the file's M; disk: the particles once more.
    The members are what ``np.savez`` / ``np.savez_compressed`` write (``X.npy``, then ``y.npy``, npy format 1.0,
    stored or deflated at zlib's default level), so readers cannot tell the two apart.
    """

    def __init__(self, path: str, compress: bool = True):
        self.path, self.compress = path, compress
        self._particles = tempfile.TemporaryFile(prefix="qgdist-ef-")   # (n_i, 4) float64 rows, jet after jet
        self._labels = tempfile.TemporaryFile(prefix="qgdist-ef-")      # y float64
        self._chunks: list[np.ndarray] = []                              # per written chunk: its multiplicities
        self.rows, self.max_particles = 0, 0

    def write(self, clouds: list[np.ndarray], y: np.ndarray) -> None:
        """Add one chunk: per jet a (n_i, 4) array of (pt, rapidity, phi, pdgid), and its raw label."""
        if len(clouds) != len(y):
            raise ValueError(f"{self.path}: {len(clouds)} clouds but {len(y)} labels")
        counts = np.array([len(c) for c in clouds], np.int64)
        if len(clouds):
            np.ascontiguousarray(np.concatenate(clouds), dtype=np.float64).tofile(self._particles)
        np.asarray(y, dtype=np.float64).tofile(self._labels)
        self._chunks.append(counts)
        self.rows += len(clouds)
        self.max_particles = max(self.max_particles, int(counts.max(initial=0)))

    def close(self) -> None:
        """Write the npz (atomically: a temporary file renamed or uploaded into place) and drop the spool."""
        method = zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED
        try:
            with atomic_path(self.path) as tmp, zipfile.ZipFile(tmp, "w", method, allowZip64=True) as npz:
                with npz.open("X.npy", "w", force_zip64=True) as member:
                    _npy_header(member, (self.rows, self.max_particles, 4))
                    self._particles.seek(0)
                    counts = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int64)
                    # A slice of at most PAD_BYTES padded: memory does not follow the file's padded width.
                    step = max(1, PAD_BYTES // (max(1, self.max_particles) * 4 * 8))
                    for lo in range(0, len(counts), step):
                        part = counts[lo:lo + step]
                        flat = np.fromfile(self._particles, np.float64, int(part.sum()) * 4).reshape(-1, 4)
                        padded = np.zeros((len(part), self.max_particles, 4), np.float64)
                        padded[np.arange(self.max_particles)[None, :] < part[:, None]] = flat
                        member.write(memoryview(padded).cast("B"))   # the array's own bytes: no copy
                with npz.open("y.npy", "w", force_zip64=True) as member:
                    _npy_header(member, (self.rows,))
                    self._labels.seek(0)
                    for chunk in self._chunks:
                        member.write(self._labels.read(8 * len(chunk)))
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the spooled jets without writing anything."""
        self._particles.close()
        self._labels.close()

    def __enter__(self) -> EnergyFlowNpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _npy_header(member, shape: tuple[int, ...]) -> None:
    """The npy header ``np.save`` writes for a C-ordered little-endian float64 array of ``shape``."""
    np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": shape})


def pad_clouds(clouds: list[np.ndarray]) -> np.ndarray:
    """Zero-pad a list of (n_i, 4) particle arrays to (N, max n_i, 4), the file's own M."""
    m = max((len(c) for c in clouds), default=0)
    out = np.zeros((len(clouds), m, 4), dtype=np.float64)
    for i, c in enumerate(clouds):
        out[i, : len(c)] = c
    return out

"""The three columnar file formats behind ``columnar``: open a file, list its branches, read a block of entries.

``RootSource`` (uproot: one ``TBranch.array(entry_start, entry_stop)`` per branch and block), ``ParquetSource``
(pyarrow: ``iter_batches`` over a unit's row groups) and ``HDF5Source`` (h5py: ``dataset[lo:hi]``; variable-length
or zero-padded per-particle datasets). Each opens its file through fsspec, so paths may be URLs, and turns an
unreadable file into a whole-file ``BadRowError`` naming it. Every branch comes back as a ``Column``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qgdist.core.errors import InputError
from qgdist.data.sources.base import file_name, open_input
from qgdist.data.sources.errors import BadRowError

#: File extensions this reader takes, and the format each means.
FORMATS = {".root": "root", ".parquet": "parquet", ".h5": "hdf5", ".hdf5": "hdf5"}
EXTENSIONS = tuple(FORMATS)


@dataclass
class Column:
    """One branch over a block of entries: ``values`` (flat over particles for per-particle branches) and
    ``counts`` (values per entry; -1 marks a null list; None for a per-jet branch)."""

    values: np.ndarray
    counts: np.ndarray | None = None


def file_format(path: str) -> str:
    ext = posixpath.splitext(file_name(path))[1].lower()
    if ext not in FORMATS:
        raise BadRowError(file_name(path), None, "<file>", f"not a columnar file ({', '.join(EXTENSIONS)})")
    return FORMATS[ext]


class Source:
    """An open columnar file: ``rows``, ``names`` (branch -> "jet" | "particle"), ``read(names, lo, hi)``."""

    rows: int
    names: dict[str, str]
    where: str

    def read(self, names: list[str], lo: int, hi: int) -> dict[str, Column]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RootSource(Source):
    def __init__(self, path: str, tree: str) -> None:
        import uproot

        fs, p = open_input(path)
        self._file = fs.open(p, "rb")
        name = file_name(path)
        try:
            self._root = uproot.open(self._file)
            trees = sorted({k.split(";")[0] for k, c in self._root.classnames().items() if c == "TTree"})
        except Exception as err:  # uproot raises ValueError/OSError/its own for files that are not ROOT
            self._file.close()
            raise BadRowError(name, None, "<file>", f"not a readable ROOT file ({err})") from None
        if not tree:
            if len(trees) != 1:
                self.close()
                raise BadRowError(name, None, "<tree>", f"{len(trees)} TTrees ({', '.join(trees) or 'none'}): "
                                  "name one with --branch tree=NAME")
            tree = trees[0]
        if tree not in trees:
            self.close()
            raise BadRowError(name, None, tree, f"no TTree {tree!r} (TTrees: {', '.join(trees) or 'none'})")
        self._tree = self._root[tree]
        self.where = f"TTree {tree!r}"
        self.rows = int(self._tree.num_entries)
        self.names = {}
        for key in self._tree.keys(recursive=False):
            typename = self._tree[key].typename
            self.names[key] = "particle" if typename.endswith("[]") or "vector<" in typename else "jet"

    def read(self, names: list[str], lo: int, hi: int) -> dict[str, Column]:
        import awkward as ak

        out = {}
        for name in names:
            try:
                array = self._tree[name].array(entry_start=lo, entry_stop=hi, library="ak")
            except Exception as err:  # a corrupt or truncated basket
                raise Unreadable(name, f"unreadable ({type(err).__name__}: {err})") from err
            if array.ndim > 1:
                out[name] = Column(ak.to_numpy(ak.flatten(array)), ak.to_numpy(ak.num(array, axis=1)))
            else:
                out[name] = Column(ak.to_numpy(array))
        return out

    def close(self) -> None:
        self._root.close()
        self._file.close()


class ParquetSource(Source):
    def __init__(self, path: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, p = open_input(path)
        self._file = fs.open(p, "rb")
        try:
            self._pf = pq.ParquetFile(self._file)
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for truncated or corrupt footers
            self._file.close()
            raise BadRowError(file_name(path), None, "<file>", f"not a readable parquet file ({err})") from None
        self.where = "the parquet schema"
        self.rows = self._pf.metadata.num_rows
        schema = self._pf.schema_arrow
        self.names = {f.name: "particle" if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) else "jet"
                      for f in schema}
        self.row_groups = [self._pf.metadata.row_group(g).num_rows for g in range(self._pf.metadata.num_row_groups)]

    def batches(self, names: list[str], row_groups: tuple[int, ...], size: int) -> Iterator[dict[str, Column]]:
        import pyarrow as pa

        for batch in self._pf.iter_batches(batch_size=size, row_groups=list(row_groups), columns=names,
                                           use_threads=False):
            out = {}
            for name in names:
                arr = batch.column(name)
                if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                    counts = arr.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
                    out[name] = Column(arr.flatten().to_numpy(zero_copy_only=False), counts)
                else:   # nulls come back as NaN (floats, or ints made float) and are refused by the checks
                    out[name] = Column(arr.to_numpy(zero_copy_only=False))
            yield out

    def close(self) -> None:
        self._file.close()


class HDF5Source(Source):
    def __init__(self, path: str, group: str) -> None:
        import h5py

        fs, p = open_input(path)
        self._file = fs.open(p, "rb")
        name = file_name(path)
        try:
            self._h5 = h5py.File(self._file, "r")
        except Exception as err:  # h5py raises OSError for files that are not HDF5
            self._file.close()
            raise BadRowError(name, None, "<file>", f"not a readable HDF5 file ({err})") from None
        if group and group not in self._h5:
            self.close()
            raise BadRowError(name, None, group, f"no HDF5 group {group!r}")
        node = self._h5[group] if group else self._h5
        self._group = node
        self.where = f"HDF5 group {group or '/'!r}"
        self.names, self.padded, lengths = {}, set(), set()
        for key, ds in node.items():
            if not isinstance(ds, h5py.Dataset):
                continue
            if h5py.check_vlen_dtype(ds.dtype) is not None and ds.ndim == 1:
                self.names[key] = "particle"
            elif ds.ndim == 2:
                self.names[key] = "particle"
                self.padded.add(key)
            elif ds.ndim == 1:
                self.names[key] = "jet"
            else:
                continue
            lengths.add(ds.shape[0])
        self.rows = min(lengths) if lengths else 0
        self._lengths = {key: node[key].shape[0] for key in self.names}

    def read(self, names: list[str], lo: int, hi: int, counts_name: str = "") -> dict[str, Column]:
        out: dict[str, Column] = {}
        try:
            n = np.asarray(self._group[counts_name][lo:hi], np.int64) if counts_name else None
        except Exception as err:
            raise Unreadable(counts_name, f"unreadable ({type(err).__name__}: {err})") from err
        for name in names:
            try:
                block = self._group[name][lo:hi]
            except Exception as err:
                raise Unreadable(name, f"unreadable ({type(err).__name__}: {err})") from err
            if name in self.padded:       # zero-padded (k, M): the first counts[i] values of row i are real
                width = block.shape[1]
                real = np.arange(width)[None, :] < np.minimum(n, width)[:, None]
                counts = np.where(n > width, -2, n)       # -2: the counts branch promises more than the row holds
                out[name] = Column(np.asarray(block[real], np.float64), counts)
            elif self.names.get(name) == "particle":      # variable-length rows
                counts = np.fromiter((len(v) for v in block), np.int64, len(block))
                values = np.concatenate(block) if len(block) else np.zeros(0)
                out[name] = Column(np.asarray(values, np.float64), counts)
            else:
                out[name] = Column(np.asarray(block))
        return out

    def close(self) -> None:
        self._h5.close()
        self._file.close()


class Unreadable(InputError):
    """A branch could not be read for a block of entries (corrupt or truncated data)."""

    def __init__(self, branch: str, reason: str) -> None:
        super().__init__(reason)
        self.branch, self.reason = branch, reason

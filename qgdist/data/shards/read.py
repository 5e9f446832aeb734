"""Reading shards: whole shards in order with the stock ``webdataset`` reader, or single chunks by byte range.

A shard (schema 2) is a tar of chunks of jets plus an index member giving each chunk's byte range and jet count
(the manifest says where the index lies). Evaluation and scoring stream shards in order with ``webdataset``;
training fetches chunks one by one in a shuffled order by their byte ranges (``os.pread`` locally, one range
request on object storage). ``ShardPart`` names a shard, or a strided part of one when there are fewer shards
than readers.
"""

from __future__ import annotations

import io
import itertools
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import webdataset as wds
from webdataset.gopen import gopen_schemes

from qgdist.data.shards.schema import INDEX_MEMBER, load_npy


@dataclass(frozen=True)
class ShardPart:
    """A piece of work: shard ``path``, part ``part`` of ``parts`` (strided by chunk), holding ``samples`` jets;
    ``index`` is the byte range of the shard's chunk index member (from the manifest)."""

    path: str
    part: int
    parts: int
    samples: int
    index: tuple[int, ...] = ()
    sha256: str = ""


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    return fsspec.open(url, mode).open()


def _register_url_scheme(path: str) -> None:
    """Let webdataset open ``s3://`` (and any other fsspec URL) through fsspec, as the rest of qgdist does.

    webdataset opens local paths, ``file://``, ``pipe:``, http(s) and a few more itself; for a scheme it has no
    handler for it raises "no gopen handler defined". Its dispatch table is the documented extension point.
    """
    scheme = urlparse(path).scheme
    if len(scheme) > 1 and scheme not in gopen_schemes:
        gopen_schemes[scheme] = _fsspec_gopen


def _part_chunks(unit: ShardPart) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) chunks of one shard part, in order, read with the stock webdataset pipeline."""
    _register_url_scheme(unit.path)   # here, in the DataLoader worker process that opens the shard
    ds = wds.WebDataset(unit.path, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    yield from itertools.islice(iter(ds), unit.part, None, unit.parts)


def read_parts(units: list[ShardPart]) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) chunks of ``units``, one part after another."""
    for unit in units:
        yield from _part_chunks(unit)


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """Every raw (undecoded) chunk of one shard file, in order: what ``Collate`` takes."""
    return read_parts([ShardPart(path, 0, 1, 0)])


def _members(data: bytes, url: str) -> dict[str, Any]:
    """The members of a byte range holding whole tar members, grouped as the stock reader groups them."""
    out: dict[str, Any] = {"__url__": url}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            key, _, ext = info.name.rpartition("/")[2].partition(".")
            out["__key__"] = key
            out[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return out


class ChunkRef:
    """One chunk of a shard, fetched alone by its byte range (``read`` parses its tar members) when first needed.

    ``rows`` selects some of the chunk's jets (by row within the chunk; None: all ``jets`` of them): what is left
    of a chunk when an elastic run re-deals an epoch's remaining jets (``qgdist.data.epoch_plan``).
    """

    __slots__ = ("path", "start", "end", "jets", "rows")

    def __init__(self, path: str, start: int, end: int, jets: int, rows: np.ndarray | None = None):
        self.path, self.start, self.end, self.rows = path, start, end, rows
        self.jets = jets if rows is None else len(rows)

    def read(self) -> dict[str, Any]:
        """The chunk's members, as the stock reader groups them (``__key__``, ``__url__``, ``ext -> bytes``)."""
        return _members(_read_range(self.path, self.start, self.end), self.path)

    def row_ids(self) -> np.ndarray:
        """The selected rows of the chunk (int64)."""
        return np.arange(self.jets, dtype=np.int64) if self.rows is None else self.rows.astype(np.int64)

    def with_rows(self, rows: np.ndarray) -> ChunkRef:
        """The same chunk with only ``rows`` selected."""
        return ChunkRef(self.path, self.start, self.end, len(rows), np.sort(rows))


_INDEXES: dict[tuple[str, str], np.ndarray] = {}  # (shard, its sha256) -> its chunk index, per process


def _read_range(path: str, start: int, end: int) -> bytes:
    if "://" not in path or path.startswith("file://"):
        fd = os.open(path[len("file://"):] if path.startswith("file://") else path, os.O_RDONLY)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    fs, p = fsspec.core.url_to_fs(path)
    return fs.cat_file(p, start=start, end=end)   # one range request on object storage


def chunk_index(path: str, where: tuple[int, ...], sha256: str = "") -> np.ndarray:
    """A shard's (chunks, 3) index of (first byte, end byte, jets), read from its byte range (cached per process
    by the shard's sha256, so a re-converted shard is read afresh)."""
    if len(where) != 2:
        raise ValueError(f"{path}: the manifest gives no chunk index for it: re-run `qgdist convert`")
    key = (path, sha256 or repr(where))
    if key not in _INDEXES:
        if len(_INDEXES) >= 4096:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = load_npy(_members(_read_range(path, *where), path)[INDEX_MEMBER])
    return _INDEXES[key]

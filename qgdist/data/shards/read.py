"""Reading shards: whole shards in order with the stock ``webdataset`` reader, or single chunks by byte range.

A shard (schema 2) is a tar of chunks of jets plus an index member giving each chunk's byte range and jet count
(the manifest says where the index lies). Evaluation and scoring stream shards in order with ``webdataset``;
training fetches chunks one by one in a shuffled order by their byte ranges (``os.pread`` locally, one range
request on object storage). ``ShardPart`` names a shard, or a strided part of one when there are fewer shards
than readers.

Every read error names the shard, and the chunk where there is one (``InputError``): a truncated or damaged
shard never surfaces as a bare ``tarfile.ReadError``. ``verify_shard`` checks a shard's sha256 against the manifest
once per process (``--verify-shards``).
"""

from __future__ import annotations

import hashlib
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

from qgdist.core.errors import InputError
from qgdist.data.shards.schema import INDEX_MEMBER, load_npy

#: How to get past a damaged shard, said with every read error.
REPAIR = ("re-run `qgdist convert` to rewrite the dataset (`qgdist inspect DIR --verify` lists every shard whose "
          "sha256 no longer matches the manifest)")
#: What a shard read can raise on damaged bytes: tar's own errors and what numpy, gzip and json raise on garbage.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, KeyError, IndexError)


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
    last, count = None, 0
    try:
        for chunk in itertools.islice(iter(ds), unit.part, None, unit.parts):
            last, count = chunk.get("__key__"), count + 1
            yield chunk
    except READ_ERRORS as err:
        raise _locate(unit, last, err) from err
    if len(unit.index) == 2:   # a zeroed tar header reads as the end of the archive: count what came
        expected = len(chunk_index(unit.path, unit.index, unit.sha256)[unit.part::unit.parts])
        if count != expected:
            raise _locate(unit, last, EOFError(f"the stream ended after {count} of {expected} chunks"))


def _locate(unit: ShardPart, last: str | None, err: Exception) -> InputError:
    """The error to report for a shard that broke while streamed: the stock reader looks one member ahead and says
    nothing of where it was, so its chunks are read again one by one from the chunk index, and the first that
    fails (or the index itself, for a truncated shard) is named."""
    if len(unit.index) == 2:
        try:
            for start, end, jets in chunk_index(unit.path, unit.index, unit.sha256).tolist():
                ChunkRef(unit.path, start, end, jets).read()
        except InputError as found:
            return found
    where = f"after chunk {last}" if last else "in its first chunks"
    return InputError(f"{unit.path}: unreadable {where} ({type(err).__name__}: {err})", file=unit.path, hint=REPAIR)


def read_parts(units: list[ShardPart]) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) chunks of ``units``, one part after another."""
    for unit in units:
        yield from _part_chunks(unit)


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """Every raw (undecoded) chunk of one shard file, in order: what ``Collate`` takes."""
    return read_parts([ShardPart(path, 0, 1, 0)])


def _members(data: bytes, url: str, what: str) -> dict[str, Any]:
    """The members of a byte range holding whole tar members, grouped as the stock reader groups them; ``what``
    names the range in errors."""
    out: dict[str, Any] = {"__url__": url}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                key, _, ext = info.name.rpartition("/")[2].partition(".")
                out["__key__"] = key
                out[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except READ_ERRORS as err:
        raise InputError(f"{url}: {what}: not readable tar members ({type(err).__name__}: {err})", file=url,
                         hint=REPAIR) from err
    if "__key__" not in out:   # a zero block reads as the end of the archive
        raise InputError(f"{url}: {what}: not readable tar members (no member where the chunk index says one "
                         "starts: zeroed or overwritten bytes)", file=url, hint=REPAIR)
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
        return _members(_read_range(self.path, self.start, self.end), self.path,
                        f"chunk at bytes {self.start}-{self.end}")

    def row_ids(self) -> np.ndarray:
        """The selected rows of the chunk (int64)."""
        return np.arange(self.jets, dtype=np.int64) if self.rows is None else self.rows.astype(np.int64)

    def with_rows(self, rows: np.ndarray) -> ChunkRef:
        """The same chunk with only ``rows`` selected."""
        return ChunkRef(self.path, self.start, self.end, len(rows), np.sort(rows))


_INDEXES: dict[tuple[str, str], np.ndarray] = {}  # (shard, its sha256) -> its chunk index, per process


def _read_range(path: str, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of a shard; a shard that ends before ``end`` (truncated) is an ``InputError``."""
    try:
        if "://" not in path or path.startswith("file://"):
            fd = os.open(path[len("file://"):] if path.startswith("file://") else path, os.O_RDONLY)
            try:
                data = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        else:
            fs, p = fsspec.core.url_to_fs(path)
            data = fs.cat_file(p, start=start, end=end)   # one range request on object storage
    except OSError as err:
        raise InputError(f"{path}: cannot read bytes {start}-{end} ({err})", file=path, hint=REPAIR) from err
    if len(data) != end - start:
        raise InputError(f"{path}: truncated: bytes {start}-{end} wanted, the shard ends {end - start - len(data)} "
                         "bytes short", file=path, hint=REPAIR)
    return data


def chunk_index(path: str, where: tuple[int, ...], sha256: str = "") -> np.ndarray:
    """A shard's (chunks, 3) index of (first byte, end byte, jets), read from its byte range (cached per process
    by the shard's sha256, so a re-converted shard is read afresh)."""
    if len(where) != 2:
        raise ValueError(f"{path}: the manifest gives no chunk index for it: re-run `qgdist convert`")
    key = (path, sha256 or repr(where))
    if key not in _INDEXES:
        if len(_INDEXES) >= 4096:
            _INDEXES.pop(next(iter(_INDEXES)))
        members = _members(_read_range(path, *where), path, f"chunk index at bytes {where[0]}-{where[1]}")
        try:
            index = load_npy(members[INDEX_MEMBER])
        except READ_ERRORS as err:
            raise InputError(f"{path}: chunk index at bytes {where[0]}-{where[1]}: unreadable ({err})", file=path,
                             hint=REPAIR) from err
        _INDEXES[key] = index
    return _INDEXES[key]


_VERIFIED: set[tuple[str, str]] = set()   # (shard, sha256) this process has hashed and found intact


def verify_shard(path: str, sha256: str) -> None:
    """Hash the whole shard and compare it with the manifest's ``sha256`` (once per process and shard); an
    ``InputError`` names a shard that differs. Costs one sequential read of the shard."""
    if (path, sha256) in _VERIFIED:
        return
    try:
        with fsspec.open(path, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise InputError(f"{path}: cannot read it to check its sha256 ({err})", file=path, hint=REPAIR) from err
    if got != sha256:
        raise InputError(f"{path}: sha256 {got[:16]}... does not match the manifest's {sha256[:16]}...: the shard "
                         "was damaged or altered after conversion", file=path, expected=sha256, got=got, hint=REPAIR)
    _VERIFIED.add((path, sha256))

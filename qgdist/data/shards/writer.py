"""Atomic tar shard writer: each shard streams into ``qgdist.core.atomic.atomic_path`` (a hidden temporary file
beside it, or local scratch for a URL) and is renamed (or uploaded) into place only when complete.

A shard's sha256, byte count and jet count are taken while writing (no second read). Its last member is its chunk
index (``index.npy``: first byte, end byte and jets of every chunk), and the manifest records where that is, so a
reader can fetch any chunk alone without the manifest growing with the number of chunks. Samples are
written in the order given; the caller passes them sorted by key so every sample's members are contiguous and shards
are reproducible. Tar headers carry fixed owner and mtime, so the same input gives byte-identical shards.

``ChunkWriter`` sits in front of a ``ShardWriter``: it collects one split's jets as they are decoded and writes them
as chunks (tar samples) of ``chunk_jets`` jets.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from qgdist.core.atomic import atomic_path
from qgdist.core.storage import join
from qgdist.data.shards.manifest import ShardInfo
from qgdist.data.shards.schema import INDEX_MEMBER, JetChunk, npy_bytes


class _HashingSink:
    """A write-only file wrapper that hashes and counts every byte on its way to the real file."""

    def __init__(self, f: Any):
        self._f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        self._f.write(data)
        return len(data)


class _Aborted(Exception):
    """Thrown into a shard's ``atomic_path`` block to drop its temporary file without committing it."""


class ShardWriter:
    """Writes samples of one split into shards ``{name_fn(k)}`` of at most ``max_bytes`` (one sample may exceed it).

    Args:
        directory: output directory, a local path or any fsspec URL.
        split: the split these shards belong to (recorded in each ``ShardInfo``).
        name_fn: shard number k -> file name, e.g. ``lambda k: f"train-000042-{k:03d}.tar"``.
        max_bytes: target shard size; a new shard starts once the current one reaches it.
    """

    def __init__(self, directory: str, split: str, name_fn: Callable[[int], str], max_bytes: int = 64 << 20):
        self.directory = directory
        self.split = split
        self.name_fn = name_fn
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._commit: ExitStack | None = None  # the open shard's file inside its atomic_path block
        self._sink: _HashingSink | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._chunks: list[int] = []
        self._offsets: list[int] = []

    def _open(self) -> None:
        name = self.name_fn(len(self.shards))
        self._name = name
        self._commit = ExitStack()
        tmp = self._commit.enter_context(atomic_path(join(self.directory, name)))
        self._sink = _HashingSink(self._commit.enter_context(open(tmp, "wb")))
        # Last in, first out: the tar stream ends (or, on abort, is dropped), the file closes, then it is committed.
        self._tar = self._commit.enter_context(
            tarfile.open(fileobj=self._sink, mode="w|", format=tarfile.GNU_FORMAT))  # type: ignore[arg-type]
        self._count = 0
        self._chunks = []
        self._offsets = []

    def write(self, sample: dict[str, Any], jets: int = 1) -> None:
        """Append one WebDataset dict (``__key__`` plus ``ext -> bytes``) holding ``jets`` jets; members are written
        in sorted order."""
        if self._tar is None:
            self._open()
        key = sample["__key__"]
        self._offsets.append(self._tar.offset)  # type: ignore[union-attr]  # where this sample's first header starts
        for ext in sorted(k for k in sample if k != "__key__"):
            self._add(f"{key}.{ext}", sample[ext])
        self._last_key = key
        self._count += jets
        self._chunks.append(jets)
        if self._sink is not None and self._sink.bytes >= self.max_bytes:
            self._finish()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode, info.mtime, info.uname, info.gname = 0o644, 0, "qgdist", "qgdist"
        self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def _finish(self) -> None:
        assert self._tar is not None and self._sink is not None and self._commit is not None
        # The shard's chunk index, (first byte, end byte, jets) of every chunk, goes last, as one more member of the
        # last chunk (stock readers see it as that chunk's ``index.npy``); the manifest records where it is.
        bounds = self._offsets + [self._tar.offset]
        index = np.array([bounds[:-1], bounds[1:], self._chunks], dtype=np.int64).T
        start = self._tar.offset
        self._add(f"{self._last_key}.{INDEX_MEMBER}", npy_bytes(index))
        where = [start, self._tar.offset]
        self._commit.close()  # end-of-archive blocks through the sink, close the file, rename (or upload) it
        self.shards.append(ShardInfo(self._name, self.split, self._count, self._sink.bytes, self._sink.sha.hexdigest(),
                                     len(self._chunks), where))
        self._tar = self._sink = self._commit = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any sample went into it) and return every shard written."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file); finished shards stay."""
        if self._commit is not None:
            self._commit.__exit__(_Aborted, _Aborted(), None)  # closes tar and file; atomic_path removes it
        self._tar = self._sink = self._commit = None


#: Chunks per window: a chunk holds every WINDOW-th jet of WINDOW chunks' worth of consecutive jets.
WINDOW = 16


class ChunkWriter:
    """Collects one split's jets (``JetChunk`` blocks, in source-row order) and writes them as chunks of
    ``chunk_jets`` jets through a ``ShardWriter``.

    Jets are dealt to chunks by stride within windows of ``window`` chunks' worth of consecutive jets: chunk k of a
    window holds its jets k, k + window, k + 2 window, ... So every chunk samples ``window * chunk_jets``
    consecutive source rows (4,096 by default), and a source ordered by class within such a stretch still gives
    mixed chunks, which a loader reading chunks in random order needs. Rows stay increasing within a chunk. ``close``
    (or ``flush``) deals the remainder the same way over as few chunks as hold it.
    """

    def __init__(self, shards: ShardWriter, chunk_jets: int, compress: bool = True, window: int = WINDOW):
        if chunk_jets < 1 or window < 1:
            raise ValueError(f"chunk_jets and window must be >= 1, not {chunk_jets}, {window}")
        self.shards, self.chunk_jets, self.compress, self.window = shards, chunk_jets, compress, window
        self._pending: list[JetChunk] = []
        self._count = 0

    def add(self, block: JetChunk) -> None:
        if not len(block):
            return
        self._pending.append(block)
        self._count += len(block)
        if self._count >= self.chunk_jets * self.window:
            self._flush(final=False)

    def _deal(self, block: JetChunk) -> None:
        """Write ``block`` as ceil(len / chunk_jets) chunks, jet i to chunk i % chunks."""
        chunks = -(-len(block) // self.chunk_jets)
        for k in range(chunks):
            self._write(block.take(np.arange(k, len(block), chunks)) if chunks > 1 else block)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        block = type(self._pending[0]).concat(self._pending)
        size = self.chunk_jets * self.window
        full = len(block) // size * size
        for lo in range(0, full, size):
            self._deal(block.slice(lo, lo + size))
        rest = block.slice(full, len(block)) if full < len(block) else None
        self._pending, self._count = ([rest], len(rest)) if rest is not None else ([], 0)
        if final and rest is not None:
            self._deal(rest)
            self._pending, self._count = [], 0

    def _write(self, chunk: JetChunk) -> None:
        self.shards.write(chunk.encode(compress=self.compress), jets=len(chunk))

    def flush(self) -> None:
        """Write what is pending now, as a last shorter chunk if need be (e.g. before jets of another file)."""
        self._flush(final=True)

    def close(self) -> list[ShardInfo]:
        self._flush(final=True)
        return self.shards.close()

    def abort(self) -> None:
        self._pending, self._count = [], 0
        self.shards.abort()

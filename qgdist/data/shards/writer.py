"""Atomic tar shard writer: each shard streams into ``qgdist.core.atomic.atomic_path`` (a hidden temporary file
beside it, or local scratch for a URL) and is renamed (or uploaded) into place only when complete.

A shard's sha256, byte count and sample count are taken while writing (no second read). Samples are written in
the order given; the caller passes them sorted by key so every sample's members are contiguous and shards are
reproducible. Tar headers carry fixed owner and mtime, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from qgdist.core.atomic import atomic_path
from qgdist.core.storage import join
from qgdist.data.shards.manifest import ShardInfo


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

    def write(self, sample: dict[str, Any]) -> None:
        """Append one WebDataset dict (``__key__`` plus ``ext -> bytes``); members are written in sorted order."""
        if self._tar is None:
            self._open()
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode, info.mtime, info.uname, info.gname = 0o644, 0, "qgdist", "qgdist"
            self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
        self._count += 1
        if self._sink is not None and self._sink.bytes >= self.max_bytes:
            self._finish()

    def _finish(self) -> None:
        assert self._tar is not None and self._sink is not None and self._commit is not None
        self._commit.close()  # end-of-archive blocks through the sink, close the file, rename (or upload) it
        self.shards.append(ShardInfo(self._name, self.split, self._count, self._sink.bytes, self._sink.sha.hexdigest()))
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

"""Atomic writes: a reader sees the old file or the complete new one, never a partial one.

Locally: write ``.<name>.tmp`` in the same directory, then ``os.replace`` it over the target (atomic on POSIX).
On object storage (fsspec URLs such as ``s3://``) there is no rename, but one object appears whole when its
upload completes (a single PUT, or the completion of a multipart upload), so the object is written in place under
its final name; a directory of objects is committed by writing a small pointer object last (see
``qgdist.train.checkpoint``). Nothing here creates "directories" there: a prefix exists once an object does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgdist.core.storage import is_object_store, local_file, run_path

if TYPE_CHECKING:
    from upath import UPath

_local = local_file


def temp_name(path: str | os.PathLike[str]) -> str:
    """The temporary sibling name used while ``path`` is written: ``.<name>.tmp``."""
    return f".{os.path.basename(os.fspath(path))}.tmp"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a local temporary path to write; on success it replaces ``path``, on error it is removed.

    For libraries that want a file name (``pyarrow.parquet.write_table``, ``savefig``, ``torch.save``).
    ``path`` may be a URL: the file is then written locally and uploaded as one object. Locally the file's data
    reach the disk (fsync) before the rename, and the rename itself before we return (fsync of the directory), so
    a power loss after this returns cannot leave the name pointing at a hole.
    """
    local = _local(path)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(temp_name(local))
        try:
            yield tmp
            fsync(tmp)
            os.replace(tmp, local)
            fsync(local.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return
    import tempfile

    target = run_path(path)

    with tempfile.TemporaryDirectory(prefix="qgdist-") as scratch:
        tmp = Path(scratch) / target.name
        yield tmp
        _parent_dir(target)
        target.fs.put_file(str(tmp), target.path)  # streamed: a 64 MiB shard is not read into memory first


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a local file's (or directory's: its entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parent_dir(target: UPath) -> None:
    """Make ``target``'s parent where the storage has real directories (``memory://``, ``sftp://``, ...); object
    stores have none, and asking them would cost a request per write."""
    if is_object_store(target):
        return
    target.fs.makedirs(target.parent.path, exist_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` (local path or URL) atomically."""
    if _local(path) is None:
        target = run_path(path)
        _parent_dir(target)
        target.fs.pipe_file(target.path, bytes(data))  # one PUT: the object appears whole or not at all
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode())


def upload(local: Path, remote: UPath) -> None:
    """Copy a local file or directory tree to ``remote`` (a path or URL), each file written atomically."""
    if local.is_dir():
        for child in local.iterdir():
            upload(child, remote / child.name)
        return
    write_bytes(remote, local.read_bytes())


def write_json(path: str | os.PathLike[str], doc: Any, indent: int | None = 1) -> None:
    """Write ``doc`` as strict JSON to ``path`` atomically: NaN and infinities become ``null`` (Python's ``NaN``
    and ``Infinity`` tokens are not JSON, and strict readers reject them); other values JSON cannot hold are
    written with ``str``."""
    write_text(path, json.dumps(_finite(doc), indent=indent, default=str, sort_keys=False, allow_nan=False) + "\n")


def _finite(doc: Any) -> Any:
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_finite(v) for v in doc]
    return doc

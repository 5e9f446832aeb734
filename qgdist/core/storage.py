"""Where a run keeps what must outlive its machines: a local path or any fsspec URL (``file://``, ``s3://``, ...).

A run directory holds checkpoints, the MLflow run id and the final artifacts. It must be visible to every
worker: local disk on one machine, NFS or a PVC on a cluster, or object storage. Paths are ``UPath``s
(universal-pathlib): for a plain local path that *is* a ``pathlib.Path``, so local runs behave exactly as before,
and for a URL the same calls go through fsspec.

Two things cannot live on object storage and stay on local scratch (``scratch_dir``): MLflow's embedded sqlite
store and files being written (plots, ``model.pt``) before they are copied up.

Atomicity: on local disk (a plain path or ``file://``) a directory is written under a temporary name and renamed
(``move``, ``os.replace``). Object stores (``s3://``, ``gs://``, ...) have no rename: ``fs.mv`` of a "directory"
there is a copy of every object followed by a delete, so it is neither atomic nor cheap, and S3 has no directories
at all (a prefix exists only once an object under it does). There a single object appears whole when its write
completes, so a set of objects is committed by writing each under its final name and one small pointer object
last; ``Checkpointer`` does this, and ``renames`` tells which of the two ways a location takes.

Reads that decide what is committed (``read_bytes``, ``list_dirs``) go to the store itself rather than to
fsspec's listing cache, which another process's writes leave stale.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

from upath import UPath


def run_path(location: str | os.PathLike[str]) -> UPath:
    """A run directory (or a path inside one) as a ``UPath``; a local path stays a ``pathlib.Path``."""
    return location if isinstance(location, UPath) else UPath(location)


def absolute(location: str | None) -> str | None:
    """A local path made absolute (Ray workers run in another working directory); URLs and None unchanged."""
    return location if location is None or "://" in location else os.path.abspath(location)


def join(location: str, *names: str) -> str:
    """``location/name/...`` for a local path or a URL."""
    return str(run_path(location).joinpath(*names))


def is_local(path: str | os.PathLike[str]) -> bool:
    """True for a plain local path (not a URL)."""
    return isinstance(run_path(path), Path)


def local_file(path: str | os.PathLike[str]) -> Path | None:
    """The local path behind ``path`` (a plain path or a ``file://`` URL), or None for any other storage."""
    target = run_path(path)
    if isinstance(target, Path):
        return target
    if target.protocol in ("file", "local"):
        return Path(target.path)
    return None


#: fsspec protocols of object stores: no directories and no rename (a "directory" is a key prefix).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def is_object_store(path: str | os.PathLike[str]) -> bool:
    """True for a URL on an object store (``s3://``, ``gs://``, ``az://``, ...)."""
    target = run_path(path)
    protocols = {target.protocol} if isinstance(target.protocol, str) else set(target.protocol or ())
    return not isinstance(target, Path) and bool(protocols & OBJECT_STORES)


def renames(path: str | os.PathLike[str]) -> bool:
    """True where a directory can be renamed atomically (local disk); False for object stores and other URLs."""
    return local_file(path) is not None


def move(src: UPath, dst: UPath) -> None:
    """Rename ``src`` to ``dst`` (a file or a directory) on local disk, replacing a file at ``dst``.

    Refuses other storage: on an object store a "rename" copies and deletes every object, so it is not atomic;
    write objects under their final names and commit them with a pointer instead (see the module docstring).
    """
    local_src, local_dst = local_file(src), local_file(dst)
    if local_src is None or local_dst is None:
        raise ValueError(f"cannot rename {src} -> {dst}: object storage has no rename; write each object under its "
                         "final name and commit with a pointer object written last")
    os.replace(local_src, local_dst)


def remove_tree(path: UPath) -> None:
    """Delete a directory and everything in it (on object storage: every object under the prefix); nothing
    happens if it does not exist."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)
    except FileNotFoundError:
        pass


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of one file or object, fetched from the store (no cached listing is consulted); raises
    ``FileNotFoundError`` when there is none."""
    target = run_path(path)
    if isinstance(target, Path):
        return target.read_bytes()
    return target.fs.cat_file(target.path)


def list_names(location: str | os.PathLike[str], dirs_only: bool = False) -> list[str]:
    """Sorted names of the entries directly under ``location`` (sub-directories only with ``dirs_only``); empty
    when it does not exist, which on object storage is every prefix no object has been written under yet."""
    target = run_path(location)
    if isinstance(target, Path):
        try:
            return sorted(c.name for c in target.iterdir() if not dirs_only or c.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs = target.fs
    fs.invalidate_cache(target.path)  # another process (a Ray worker, a converter task) may have written since
    try:
        entries = fs.ls(target.path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    root = target.path.rstrip("/")
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e["name"].rstrip("/") != root and (not dirs_only or e["type"] == "directory"))


def list_dirs(location: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the sub-directories (prefixes) directly under ``location``; empty when it does not exist."""
    return list_names(location, dirs_only=True)


def scratch_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Local working directory for a run: the run directory itself when local, else a folder under
    ``$QGDIST_SCRATCH`` (default: the system temp dir) named after the URL."""
    path = run_path(run_dir)
    if isinstance(path, Path):
        return path
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(path)).strip("_")
    return Path(os.environ.get("QGDIST_SCRATCH", tempfile.gettempdir())) / "qgdist-runs" / name

"""Where a run keeps what must outlive its machines: a local path or any fsspec URL (``file://``, ``s3://``, ...).

A run directory holds checkpoints, the MLflow run id and the final artifacts. It must be visible to every
worker: local disk on one machine, NFS or a PVC on a cluster, or object storage. Paths are ``UPath``s
(universal-pathlib): for a plain local path that *is* a ``pathlib.Path``, so local runs behave exactly as before,
and for a URL the same calls go through fsspec.

Two things cannot live on object storage and stay on local scratch (``scratch_dir``): MLflow's embedded sqlite
store and files being written (plots, ``model.pt``) before they are copied up.

Atomicity: ``move`` is ``os.replace`` locally; on object stores a single object appears whole when its write
completes, and ``Checkpointer`` writes its pointer only after the checkpoint, so a reader never follows a pointer
to a partial checkpoint there either.
"""

from __future__ import annotations

import os
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


def move(src: UPath, dst: UPath) -> None:
    """Rename ``src`` to ``dst`` (a file or a directory), replacing a file at ``dst``."""
    if isinstance(src, Path):
        os.replace(src, dst)
    else:
        src.fs.mv(src.path, dst.path, recursive=True)


def remove_tree(path: UPath) -> None:
    """Delete a directory and everything in it; nothing happens if it does not exist."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def upload(local: Path, remote: UPath) -> None:
    """Copy a local file or directory tree to ``remote``, each file written atomically."""
    if local.is_dir():
        for child in local.iterdir():
            upload(child, remote / child.name)
        return
    from qgdist.core.atomic import write_bytes  # noqa: PLC0415 -- atomic builds on this module

    write_bytes(remote, local.read_bytes())


def scratch_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Local working directory for a run: the run directory itself when local, else a folder under
    ``$QGDIST_SCRATCH`` (default: the system temp dir) named after the URL."""
    path = run_path(run_dir)
    if isinstance(path, Path):
        return path
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(path)).strip("_")
    return Path(os.environ.get("QGDIST_SCRATCH", tempfile.gettempdir())) / "qgdist-runs" / name

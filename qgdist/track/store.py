"""An embedded MLflow store (sqlite) starts as a copy of an empty, fully migrated one kept in the user's cache.

MLflow builds a new sqlite store by creating its tables and then running each of its alembic migrations in turn:
1-2 s on a quiet 2-core machine, up to 5 s on a busy one, paid by the first run of every run directory (each
tracks to its own store by default). The result is the same for every store of one MLflow version except for the
Default experiment, whose artifact path is the store's own; so the cache keeps one store per MLflow version
without that experiment (MLflow adds it again, with the right path, when it opens a store that lacks it) and a
new store is a copy of it: ~40 ms.

Best effort: where the cache cannot be written or the file system cannot link, MLflow builds the store itself,
exactly as it would without this module.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from importlib import metadata
from pathlib import Path

from qgdist.core.atomic import fsync

#: Where the empty store is kept (default ``$XDG_CACHE_HOME/qgdist``, else ``~/.cache/qgdist``).
CACHE_ENV = "QGDIST_CACHE_DIR"


def cache_dir() -> Path:
    """qgdist's cache folder: ``$QGDIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/qgdist``, else ``~/.cache/qgdist``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qgdist"


def template_path() -> Path:
    """The cached empty store of the installed MLflow version (it may not exist yet)."""
    # The version from the package's metadata: importing mlflow here would cost `qgdist tracker` ~2 s.
    return cache_dir() / f"mlflow-{metadata.version('mlflow')}-empty.db"


def _template() -> Path:
    """The cached empty store, made first if missing (two processes making it at once each replace it whole)."""
    path = template_path()
    if path.exists():
        return path
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".mlflow-store-") as tmp:
        db = Path(tmp) / "store.db"
        store = SqlAlchemyStore(f"sqlite:///{db}", str(Path(tmp) / "artifacts"))
        store.engine.dispose()
        with closing(sqlite3.connect(db)) as con:   # the one per-store row: MLflow re-adds it on first open
            con.execute("DELETE FROM experiments WHERE experiment_id = 0")
            con.commit()
        fsync(db)
        os.replace(db, path)
    return path


def seed_local_store(uri: str) -> None:
    """Give a new embedded store its tables from the cached empty store: ``uri`` is a ``sqlite:///`` URI whose file
    does not exist yet. Any other URI, or a file that exists, is left alone; so is everything where the cache or
    the link fails (MLflow then builds the store itself)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists() or not path.parent.is_dir():
        return
    try:
        template = _template()
        seed = path.with_name(f".{path.name}.{os.getpid()}.seed")
        shutil.copyfile(template, seed)
        fsync(seed)
        try:
            os.link(seed, path)   # create-if-absent: a store another process made meanwhile is kept
        except FileExistsError:
            pass
        finally:
            seed.unlink()
    except Exception:  # noqa: BLE001 -- best effort: MLflow makes the store and reports its own errors
        return

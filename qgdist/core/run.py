"""A run directory: the one place that knows where a training run keeps what.

A run lives in ``STORAGE/RUN_NAME`` (``--storage``, ``--run-name``): a local path, or an fsspec URL such as
``s3://bucket/runs/pn`` that every worker sees. Its layout::

    checkpoints/step-000000120/state.pt   a complete checkpoint (qgdist.train.checkpoint)
    checkpoints/step-000000120/checkpoint.json   its files with their sizes and sha256, written last
    checkpoints/latest.json               pointer to the latest complete checkpoint: the commit
    checkpoints/best.json                 pointer to the one with the best validation AUC
    artifacts/                            config.json, metrics.json, model.pt, curves.png, roc.png (at the end)
    eval/<split>/                         qgdist evaluate's metrics.json, roc.png, scores.parquet
    mlflow_run_id                         the MLflow run this run reports to (resumes continue it)

and, on this machine's disk (the run directory itself when it is local, a scratch folder named after the URL
otherwise, because neither can live on object storage)::

    mlflow/mlflow.db, mlflow/artifacts/   the embedded MLflow store (when no tracking server is given)
    mlflow_unsent.jsonl                   what a tracker outage kept from the server, replayed later
    mlflow_run_ids.json                   provisional MLflow run ids (tracker away at start) -> the runs made later
    ray.log                               Ray's own log lines, off the terminal unless --verbose

``Run`` is the only code that spells these names; everyone else asks it. Paths come back as ``UPath`` (a plain
``pathlib.Path`` for a local run) or, for the machine-local entries, ``pathlib.Path``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from upath import UPath

from qgdist.core.atomic import upload, write_text
from qgdist.core.storage import absolute, is_local, join, run_path, scratch_dir

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
BEST = "best.json"
STATE_FILE = "state.pt"
INDEX_FILE = "checkpoint.json"
CHECKPOINT_PREFIX = "step-"
ARTIFACTS = "artifacts"
MODEL_FILE = "model.pt"
EVAL = "eval"
RUN_ID_FILE = "mlflow_run_id"
MLFLOW_DIR = "mlflow"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "artifacts"
UNSENT_FILE = "mlflow_unsent.jsonl"
RUN_IDS_FILE = "mlflow_run_ids.json"
LOG_FILE = "ray.log"


@dataclass(frozen=True)
class Run:
    """One run directory (``location``: an absolute local path or a URL)."""

    location: str

    @classmethod
    def at(cls, storage: str, name: str) -> Run:
        """The run ``name`` under ``storage`` (a directory or URL); a relative local path is made absolute."""
        return cls(join(absolute(storage) or storage, name))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike[str]) -> Run | None:
        """The run a checkpoint directory belongs to (``RUN/checkpoints/step-N``), or None for a loose one."""
        path = run_path(checkpoint)
        if path.name == STATE_FILE:
            path = path.parent
        return cls(str(path.parent.parent)) if path.parent.name == CHECKPOINTS else None

    # -- where things are -----------------------------------------------------------------------------------------
    @property
    def path(self) -> UPath:
        return run_path(self.location)

    @property
    def is_local(self) -> bool:
        """True for a plain local path (then everything below lives in it, scratch included)."""
        return is_local(self.location)

    @property
    def scratch(self) -> Path:
        """This machine's working folder for the run: the run directory when local, else one named after the URL."""
        return scratch_dir(self.location)

    @property
    def checkpoints(self) -> UPath:
        return self.path / CHECKPOINTS

    def checkpoint(self, global_step: int) -> UPath:
        """The directory of the checkpoint written at ``global_step``."""
        return self.checkpoints / checkpoint_name(global_step)

    def pointer(self, which: str = LATEST) -> UPath:
        """``latest.json`` or ``best.json``."""
        return self.checkpoints / which

    @property
    def artifacts(self) -> UPath:
        return self.path / ARTIFACTS

    @property
    def local_artifacts(self) -> Path:
        """Where the final artifacts are written before ``publish`` copies them to a remote run directory."""
        return self.scratch / ARTIFACTS

    @property
    def model_file(self) -> UPath:
        """The trained model for inference (``artifacts/model.pt``)."""
        return self.artifacts / MODEL_FILE

    def eval_dir(self, split: str) -> UPath:
        return self.path / EVAL / split

    def local_eval_dir(self, split: str) -> Path:
        return self.scratch / EVAL / split

    @property
    def run_id_file(self) -> UPath:
        return self.path / RUN_ID_FILE

    @property
    def mlflow_store(self) -> Path:
        """The embedded MLflow store (``mlflow.db`` + ``artifacts/``), always on this machine's disk."""
        return self.scratch / MLFLOW_DIR

    @property
    def log_dir(self) -> Path:
        """Where ``ray.log`` goes."""
        return self.scratch

    # -- small chores ---------------------------------------------------------------------------------------------
    def read_run_id(self) -> str | None:
        """The MLflow run id kept beside the checkpoints, if any."""
        try:
            return self.run_id_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_run_id(self, run_id: str) -> None:
        write_text(self.run_id_file, run_id)

    def publish(self, local: Path, remote: UPath) -> None:
        """Copy a locally written folder to its place in a remote run directory (nothing to do for a local run)."""
        if not self.is_local:
            upload(local, remote)

    def __str__(self) -> str:
        return self.location


def checkpoint_name(global_step: int) -> str:
    """``step-000000120``: zero-padded, so names sort in step order."""
    return f"{CHECKPOINT_PREFIX}{global_step:09d}"


def local_store_uri(store: str | os.PathLike[str]) -> str:
    """The sqlite URI of an embedded MLflow store folder (``Run.mlflow_store``, or ``qgdist tracker --store``)."""
    return f"sqlite:///{Path(store).resolve() / MLFLOW_DB}"


def local_store_artifacts(store: str | os.PathLike[str]) -> Path:
    """The artifact folder of an embedded MLflow store folder."""
    return Path(store) / MLFLOW_ARTIFACTS

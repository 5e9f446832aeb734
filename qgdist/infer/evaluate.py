"""Evaluate a trained checkpoint on one split: metrics table, ROC plot, per-jet scores.

``evaluate_checkpoint(EvalConfig(checkpoint, data, split="test"))`` writes into ``out`` (default
``<run_dir>/eval/<split>``)::

    metrics.json     loss, acc, auc, rej30, rej50, n_jets, split, checkpoint
    roc.png          ROC and gluon rejection vs quark efficiency (qgdist.train.plots.plot_roc)
    scores.parquet   one row per jet: file, row (of the source file), is_quark, score (quark probability), logit

``--checkpoint`` may be a checkpoint directory, its ``state.pt``, or a run directory (its best checkpoint by
validation AUC, else its latest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qgdist.core.atomic import atomic_path, write_json
from qgdist.core.config import option
from qgdist.core.device import Device
from qgdist.core.errors import InputError
from qgdist.core.storage import is_local, run_path, scratch_dir, upload

if TYPE_CHECKING:   # torch is imported when evaluating, so that the command line's parser stays light
    import torch

    from qgdist.data.preprocessing import Preprocessing
    from upath import UPath

METRIC_ORDER = ("loss", "acc", "auc", "rej30", "rej50")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: which checkpoint, on which data and split, written where (the flags of ``qgdist evaluate``)."""

    checkpoint: str = option(help="checkpoint directory, its state.pt, or a run directory (best checkpoint, else "
                                  "latest)")
    data: str = option(help="shard directory (manifest.json + tar shards)")
    split: Literal["train", "val", "test"] = option("test", "split to score")
    out: str | None = option(None, "output directory (default RUN_DIR/eval/SPLIT; written locally, copied up when "
                                   "the run directory is a URL)")
    batch_size: int = option(512, "jets per batch", min=1)
    device: Device = option("auto", "where the model runs; auto: CUDA when visible")
    progress: bool = option(True, "progress bar")
    track: bool = option(False, "also log SPLIT/* metrics and the outputs into the MLflow run that trained the "
                                "checkpoint")
    tracking_uri: str | None = option(None, "MLflow server of that run (default: $MLFLOW_TRACKING_URI, else the run "
                                            "directory's local store)")


def resolve_checkpoint(path: str | os.PathLike[str]) -> UPath:
    """A checkpoint directory from a checkpoint dir, a ``state.pt`` or a run dir (best, else latest); local or URL."""
    from qgdist.train.checkpoint import STATE_FILE, Checkpointer

    given = str(path)
    path = run_path(path)
    if path.is_file():
        return path.parent
    if (path / STATE_FILE).exists():
        return path
    if (path / "checkpoints").is_dir():
        ckpt = Checkpointer(path)
        found = ckpt.best() or ckpt.latest()
        if found is not None:
            return found
    if not path.exists():
        raise InputError(f"{given}: no such checkpoint or run directory", file=given,
                         hint="--checkpoint takes a run directory (STORAGE/RUN_NAME: its best checkpoint, else its "
                              "latest), a checkpoint directory (RUN_DIR/checkpoints/step-N) or its state.pt")
    raise InputError(f"{given}: neither a checkpoint (no {STATE_FILE}) nor a run directory with checkpoints",
                     file=given)


def model_from_checkpoint(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode, CPU) and return it with the checkpoint's state dict.

    The architecture comes from the checkpoint's config fingerprint (model name, model kwargs) and its
    preprocessing record (cloud models get ``in_features`` from the preset, as in training).
    """
    from qgdist.models import get_model
    from qgdist.train.checkpoint import load_checkpoint

    state = load_checkpoint(resolve_checkpoint(path))
    fp = state.get("fingerprint") or {}
    if "model" not in fp:
        raise ValueError(f"{path}: checkpoint has no config fingerprint naming its model")
    pre = checkpoint_preprocessing(state, str(path))
    kwargs = dict(fp.get("model_kwargs") or {})
    model = get_model(fp["model"], **kwargs)
    if model.kind == "cloud" and "in_features" not in kwargs:
        model = get_model(fp["model"], **kwargs, in_features=len(pre.feature_names))
    model.load_state_dict(state["model"])
    return model.eval(), state


def checkpoint_preprocessing(state: dict[str, Any], where: str) -> Preprocessing:
    """The preprocessing a checkpoint's model was trained with (never the scored dataset's statistics)."""
    from qgdist.data.preprocessing import Preprocessing

    doc = state.get("preprocessing")
    if not doc:
        raise ValueError(f"{where}: the checkpoint records no preprocessing (written by an older qgdist), so its "
                         "inputs cannot be reproduced on other data; resume the run once (qgdist train with the "
                         "same --run-name) to write a checkpoint that carries it")
    return Preprocessing.from_dict(doc)


def _jet_ids(batch: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Source file and row of each jet: from the batch if the loader passes them, else from the sample key."""
    if "file" in batch and "row" in batch:
        return list(batch["file"]), [int(r) for r in batch["row"]]
    files, rows = [], []
    for key in batch["key"]:   # schema.sample_key: "<file name with unsafe chars as _>-r<row:09d>"
        stem, _, row = key.rpartition("-r")
        files.append(stem)
        rows.append(int(row))
    return files, rows


def score_split(model: torch.nn.Module, state: dict[str, Any], cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """Run ``model`` over every jet of ``cfg.split`` once, with the checkpoint's preprocessing; returns columns
    file, row, is_quark, logit and the loss. Results stay on the device until the end (no sync per batch)."""
    import torch
    from tqdm import tqdm

    from qgdist.data.loader import LoaderConfig, ShardLoader, to_device

    pre = checkpoint_preprocessing(state, cfg.checkpoint)
    loader = ShardLoader(LoaderConfig(cfg.data, split=cfg.split, batch_size=cfg.batch_size, training=False,
                                      shuffle_buffer=0, device=str(device), preprocessing=pre))
    total = loader.manifest.splits.get(cfg.split, {}).get("samples")
    files: list[str] = []
    rows: list[int] = []
    logits, labels = [], []
    bar = tqdm(total=total, unit="jet", unit_scale=True,
               desc=f"evaluate {cfg.split}", disable=not cfg.progress, mininterval=1.0)
    for batch in loader.collated(0):
        inputs, label = to_device(batch, device)
        with torch.no_grad():
            logits.append(model(**inputs).float())
        labels.append(label)
        batch_files, batch_rows = _jet_ids(batch)
        files += batch_files
        rows += batch_rows
        bar.update(len(batch_rows))
    bar.close()
    if not logits:
        raise ValueError(f"{cfg.data}: the {cfg.split!r} split has no jets")
    logit, label = torch.cat(logits), torch.cat(labels)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label).item()
    cols = {"file": files, "row": rows, "is_quark": label.to(torch.uint8).cpu().tolist(),
            "logit": logit.cpu().tolist()}
    return {"columns": cols, "loss": loss}


def write_scores(cols: dict[str, list], path: Path) -> Path:
    """Per-jet scores as parquet (atomic): file, row, is_quark, score (sigmoid of logit), logit."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    logits = torch.tensor(cols["logit"], dtype=torch.float64)
    table = pa.table({"file": pa.array(cols["file"], pa.string()), "row": pa.array(cols["row"], pa.int64()),
                      "is_quark": pa.array(cols["is_quark"], pa.uint8()),
                      "score": pa.array(torch.sigmoid(logits).tolist(), pa.float32()),
                      "logit": pa.array(cols["logit"], pa.float32())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def format_table(metrics: dict[str, float], title: str) -> str:
    """A small markdown table of the metrics."""
    names = {"loss": "loss", "acc": "accuracy", "auc": "ROC AUC", "rej30": "1/eps_B @ eps_S=30%",
             "rej50": "1/eps_B @ eps_S=50%"}
    lines = [f"| {title} | value |", "|---|---|"]
    lines += [f"| {names[k]} | {metrics[k]:.4f} |" for k in METRIC_ORDER if k in metrics]
    return "\n".join(lines)


def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split`` of ``cfg.data``; writes metrics.json, roc.png, scores.parquet."""
    import torch
    from torchmetrics.functional.classification import binary_roc

    from qgdist.core.device import resolve_device
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.train.metrics import compute_metrics
    from qgdist.train.plots import plot_roc

    read_manifest(cfg.data)   # a missing --data is named before the checkpoint is loaded
    ckpt_dir = resolve_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device)
    model, state = model_from_checkpoint(ckpt_dir)
    model.to(device)
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    out = Path(cfg.out) if cfg.out else scratch_dir(run_dir) / "eval" / cfg.split
    out.mkdir(parents=True, exist_ok=True)

    scored = score_split(model, state, cfg, device)
    cols = scored["columns"]
    logits, labels = torch.tensor(cols["logit"]), torch.tensor(cols["is_quark"])
    metrics = compute_metrics(logits, labels, loss=scored["loss"])
    fpr, tpr, _ = binary_roc(torch.sigmoid(logits.double()), labels.long(), thresholds=None)
    name = (state.get("fingerprint") or {}).get("model", "model")
    paths = {"roc": plot_roc({f"{name} ({cfg.split})": (fpr.tolist(), tpr.tolist())}, out / "roc.png"),
             "scores": write_scores(cols, out / "scores.parquet"), "metrics": out / "metrics.json"}
    doc = {**metrics, "n_jets": len(logits), "n_quark": int(labels.sum()), "split": cfg.split, "model": name,
           "checkpoint": str(ckpt_dir), "epoch": state.get("epoch"), "global_step": state.get("global_step")}
    write_json(paths["metrics"], doc)
    if not cfg.out and not is_local(run_dir):
        upload(out, run_dir / "eval" / cfg.split)
    if cfg.track:
        track_results(cfg, scratch_dir(run_dir), state, metrics, paths)
    return {"metrics": metrics, "paths": {k: str(v) for k, v in paths.items()}, "n_jets": len(logits),
            "table": format_table(metrics, f"{name} on {cfg.split} ({len(logits)} jets)")}


def track_results(cfg: EvalConfig, run_dir: Path, state: dict[str, Any], metrics: dict[str, float],
                  paths: dict[str, Path]) -> str:
    """Add ``<split>/<metric>`` (at the checkpoint's global step) and the outputs to the run that trained it.

    The tracker is ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the run directory's local store: the
    same rule as training (``qgdist.core.tracking``), so a run trained against a server is found there.
    """
    import math

    from qgdist.core.tracking import resolve_tracking_uri
    from qgdist.track.tracker import Tracker

    run_id = state.get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"{cfg.checkpoint}: the checkpoint names no MLflow run (trained with tracking off?)")
    tracker = Tracker(run_dir, resolve_tracking_uri(cfg.tracking_uri))
    tracker.start(f"evaluate {cfg.split}", run_id=run_id)
    with tracker:
        tracker.log_metrics({f"{cfg.split}/{k}": v for k, v in metrics.items() if math.isfinite(v)},
                            step=int(state.get("global_step") or 0))
        for path in paths.values():
            tracker.log_artifact(path, artifact_path=f"eval/{cfg.split}")
    return run_id

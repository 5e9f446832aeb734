"""Evaluate a trained checkpoint on one split: metrics table, ROC plot, per-jet scores.

``evaluate_checkpoint(EvalConfig(checkpoint, data, split="test"))`` writes into ``out`` (default
``<run_dir>/eval/<split>``)::

    metrics.json     loss, acc, auc, rej30, rej50, n_jets, split, checkpoint, seen_jets, files (written last)
    roc.png          ROC and gluon rejection vs quark efficiency (qgdist.train.plots.plot_roc)
    scores.parquet   one row per jet: file, row (of the source file), is_quark, score (quark probability), logit

An earlier evaluation there is refused unless ``--overwrite``; then the new files go beside it (``g-<id>/``) and
``metrics.json``'s ``files`` names them (``qgdist.core.output``).

``--checkpoint`` may be a checkpoint directory, its ``state.pt``, an ``artifacts/model.pt``, or a run directory
(its best checkpoint by validation AUC, else its latest). The model is rebuilt from the checkpoint's own model
config and fed with the checkpoint's preprocessing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qgdist.core.atomic import atomic_path, write_json
from qgdist.core.config import option
from qgdist.core.device import Device
from qgdist.core.errors import InputError
from qgdist.core.memory import SCORING_TRIM_EVERY, trim_every
from qgdist.core.output import Output
from qgdist.core.run import Run

if TYPE_CHECKING:   # torch is imported when evaluating, so that the command line's parser stays light
    import torch
    from upath import UPath

    from qgdist.data.preprocessing import Preprocessing
    from qgdist.train.checkpoint import Checkpoint

METRIC_ORDER = ("loss", "acc", "auc", "rej30", "rej50")
METRICS = "metrics.json"
_OUR_FILES = re.compile(r"^\.?(?:scores\.parquet|roc\.png)(?:\.tmp)?$")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: which checkpoint, on which data and split, written where (the flags of ``qgdist evaluate``)."""

    checkpoint: str = option(help="checkpoint directory, its state.pt, a model.pt, or a run directory (best "
                                  "checkpoint, else latest)")
    data: str = option(help="shard directory (manifest.json + tar shards)")
    split: Literal["train", "val", "test"] = option("test", "split to score")
    out: str | None = option(None, "output directory (default RUN_DIR/eval/SPLIT; written locally, copied up when "
                                   "the run directory is a URL)")
    batch_size: int = option(512, "jets per batch", min=1)
    device: Device = option("auto", "where the model runs; auto: CUDA when visible")
    progress: bool = option(True, "progress bar")
    track: bool = option(False, "also log SPLIT/* metrics and the outputs into the MLflow run that trained the "
                                "checkpoint")
    overwrite: bool = option(False, "replace an evaluation already in the output directory (the old one stays whole "
                                    "until the new metrics.json is written)")
    score_seen: bool = option(False, "score the split even if it holds jets the model trained or validated on "
                                     "(refused otherwise; their count goes into metrics.json)",
                              flag="--score-seen-jets")
    tracking_uri: str | None = option(None, "MLflow server of that run (default: $MLFLOW_TRACKING_URI, else the run "
                                            "directory's local store)")


def load_model(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, Checkpoint, UPath]:
    """The model a user names as ``--checkpoint`` (a checkpoint directory, its ``state.pt``, ``model.pt`` or a run
    directory: its best checkpoint, else its latest), rebuilt from its stored model config, in eval mode on the
    CPU; with its checkpoint and where it was found."""
    from qgdist.train.checkpointer import find_checkpoint, load_checkpoint

    found = find_checkpoint(path)
    checkpoint = load_checkpoint(found)
    return checkpoint.build_model(), checkpoint, found


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


def score_split(model: torch.nn.Module, pre: Preprocessing, cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """Run ``model`` over every jet of ``cfg.split`` once, with the checkpoint's preprocessing ``pre``; returns
    columns file, row, is_quark, logit and the loss. Results stay on the device until the end (no sync per batch)."""
    import torch
    from tqdm import tqdm

    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader, to_device

    loader = ShardLoader(DataConfig(cfg.data, batch_size=cfg.batch_size), cfg.split, training=False,
                         device=str(device), preprocessing=pre)
    total = loader.manifest.splits.get(cfg.split, {}).get("samples")
    files: list[str] = []
    rows: list[int] = []
    logits, labels = [], []
    bar = tqdm(total=total, unit="jet", unit_scale=True,
               desc=f"evaluate {cfg.split}", disable=not cfg.progress, mininterval=1.0)
    for batches, batch in enumerate(loader.collated(0), 1):
        inputs, label = to_device(batch, device)
        with torch.no_grad():
            logits.append(model(**inputs).float())
        labels.append(label)
        batch_files, batch_rows = _jet_ids(batch)
        files += batch_files
        rows += batch_rows
        bar.update(len(batch_rows))
        trim_every(batches, SCORING_TRIM_EVERY)
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
    from qgdist.data.identity import TrainedOn
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.infer.seen import check_seen
    from qgdist.train.metrics import compute_metrics
    from qgdist.train.plots import plot_roc

    device = resolve_device(cfg.device)
    manifest = read_manifest(cfg.data)   # a missing --data is named before the checkpoint is loaded
    model, checkpoint, found = load_model(cfg.checkpoint)
    trained = TrainedOn.from_dict(checkpoint.dataset)
    seen = check_seen(trained, trained.seen_in_dataset(manifest, [cfg.split]) if trained and manifest.sources
                      else None, f"{cfg.data} ({cfg.split} split)", cfg.score_seen)
    model.to(device)
    run = Run.of_checkpoint(found) or Run(str(found.parent))   # a loose checkpoint or model.pt: beside it
    out = Path(cfg.out) if cfg.out else run.local_eval_dir(cfg.split)
    # Everything is checked: only now is the output touched, beside an earlier one (qgdist.core.output).
    output = Output(str(out), METRICS, "an evaluation", cfg.overwrite, ours=_OUR_FILES)
    old = list(json.loads((out / METRICS).read_text()).get("files", {}).values()) if output.committed() else []
    output.begin()

    scored = score_split(model, checkpoint.preprocessing, cfg, device)
    cols = scored["columns"]
    logits, labels = torch.tensor(cols["logit"]), torch.tensor(cols["is_quark"])
    metrics = compute_metrics(logits, labels, loss=scored["loss"], logits=True)
    fpr, tpr, _ = binary_roc(torch.sigmoid(logits.double()), labels.long(), thresholds=None)
    name = checkpoint.model_name
    files = {"roc": output.name("roc.png"), "scores": output.name("scores.parquet")}
    paths = {"roc": plot_roc({f"{name} ({cfg.split})": (fpr.tolist(), tpr.tolist())}, out / files["roc"]),
             "scores": write_scores(cols, out / files["scores"]), "metrics": out / METRICS}
    doc = {**metrics, "n_jets": len(logits), "n_quark": int(labels.sum()), "split": cfg.split, "model": name,
           "checkpoint": str(found), "epoch": checkpoint.epoch, "global_step": checkpoint.global_step,
           "dataset_id": manifest.dataset_id or None, "seen_jets": seen, "files": files}
    write_json(paths["metrics"], doc)   # the commit
    output.finish(old)
    if not cfg.out:
        run.publish(out, run.eval_dir(cfg.split))
    if cfg.track:
        track_results(cfg, run, checkpoint, metrics, paths)
    return {"metrics": metrics, "paths": {k: str(v) for k, v in paths.items()}, "n_jets": len(logits),
            "table": format_table(metrics, f"{name} on {cfg.split} ({len(logits)} jets)")}


def track_results(cfg: EvalConfig, run: Run, checkpoint: Checkpoint, metrics: dict[str, float],
                  paths: dict[str, Path]) -> str:
    """Add ``<split>/<metric>`` (at the checkpoint's global step) and the outputs to the run that trained it.

    The tracker is ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the run directory's local store: the
    same rule as training (``qgdist.core.tracking``), so a run trained against a server is found there.
    """
    import math

    from qgdist.core.tracking import resolve_tracking_uri
    from qgdist.track.tracker import Tracker

    run_id = checkpoint.mlflow_run_id
    if not run_id:
        raise InputError(f"{cfg.checkpoint}: the checkpoint names no MLflow run (trained with tracking off?)",
                         file=cfg.checkpoint, field="mlflow_run_id")
    tracker = Tracker(run.scratch, resolve_tracking_uri(cfg.tracking_uri))
    tracker.start(f"evaluate {cfg.split}", run_id=run_id)
    with tracker:
        tracker.log_metrics({f"{cfg.split}/{k}": v for k, v in metrics.items() if math.isfinite(v)},
                            step=checkpoint.global_step)
        for path in paths.values():
            tracker.log_artifact(path, artifact_path=f"eval/{cfg.split}")
    return run_id

"""``qgdist predict``: score any dataset with a trained model, distributed with Ray Data, streaming.

Inputs are qgdist shard directories or the raw source files themselves (CMS parquet, EnergyFlow npz, columnar ROOT
/ jagged parquet / HDF5), read by the same readers as ``qgdist convert``, so nothing needs converting first. The driver plans **units** (a shard
file, or a row range of a source file, as ``convert`` plans them) and never reads jets itself;
``ray.data.from_items(units).map_batches(Scorer, concurrency=N)`` hands each unit to one of N scoring actors
(``qgdist.infer.scorer``).
An actor holds the model (on its GPU when the cluster has GPUs), reads its unit's jets, turns them into inputs
with the *checkpoint's* preprocessing (``qgdist.data.preprocessing``) through the loader's own ``Collate`` (shard
chunks and blocks decoded from source rows alike), scores them in batches and writes ``part-<unit>.parquet``
atomically; only a small record travels back. Memory per actor is one unit plus one batch, whatever the dataset's
size.

Output directory::

    part-000000.parquet ...   file, row (of the source file), is_quark (label when known), score, logit
    summary.json              jets, rows in / rejected, quarantine, parts, metrics (when labels exist), timing
    roc.png                   when labels exist

``summary.json`` is written last and names the parts (and ``roc``) it covers: read those. Scores already in
``--out`` are refused unless ``--overwrite``; then the new ones go into a generation folder beside them
(``g-<id>/part-...``) and the old ones are deleted after the new summary is written (``qgdist.core.output``).

Raw files carry labels in both formats (``y``), so metrics are computed whenever every jet has one.

On a cluster, a node lost under the scoring actors is one plain line on the terminal (``qgdist.core.nodes``;
Ray's own dump goes to ``ray.log``): Ray Data restarts the actors elsewhere and sends their units again, each
unit's part is rewritten whole, and the summary counts the nodes lost and the actors restarted.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qgdist.core.config import option
from qgdist.core.errors import InputError
from qgdist.core.output import Output

if TYPE_CHECKING:
    from qgdist.data.identity import TrainedOn
from qgdist.core.nodes import NodeWatch
from qgdist.infer.scorer import Scorer, source_unit

ROC = "roc.png"
_OUR_FILES = re.compile(r"^\.?(?:part-\d{6}\.parquet|roc\.png)(?:\.tmp)?$")
SUMMARY = "summary.json"
Input = Literal["auto", "shards", "cms", "energyflow", "columnar"]


@dataclass(frozen=True)
class PredictConfig:
    """``qgdist predict``: which model scores which jets, where the scores go and how the work spreads."""

    checkpoint: str = option(help="checkpoint directory, its state.pt, a model.pt, or a run directory (best, else "
                                  "latest)")
    data: list[str] = option(help="shard directories (holding manifest.json), or CMS parquet / EnergyFlow npz / "
                                  "ROOT / jagged parquet / HDF5 files, directories or globs; paths or fsspec URLs")
    out: str = option(help="output directory: part-*.parquet, summary.json, roc.png")
    overwrite: bool = option(False, "replace scores already in --out (written beside them; the old ones stay whole "
                                    "until the new summary.json is written)")
    input: Input = option("auto", "what --data holds (auto: shards when a manifest.json is there, else by "
                                  "file extension)")
    split: Literal["all", "train", "val", "test"] = option("all", "shards: which split to score")
    batch_size: int = option(512, "jets per forward pass", min=1)
    workers: int | None = option(None, "scoring actors (default: one per GPU when the cluster has GPUs, else "
                                       "one per CPU)", min=1)
    gpus_per_worker: float | None = option(None, "GPUs per actor (default: 1 when the cluster has GPUs, else 0)",
                                           min=0)
    on_bad_row: Literal["error", "quarantine"] = option(
        "error", "raw files: error stops at the first bad row (exit 2); quarantine skips, counts and lists them")
    label_quark_value: Literal[0, 1] | None = option(
        None, "raw files: the raw y that means quark (default: the source's, cms 0, energyflow 1)")
    branches: dict[str, str] = option({}, "columnar files: branch names that differ from the weaver/ParT layout "
                                          "(as qgdist convert --branch)", flag="--branch", metavar="KEY=BRANCH")
    rows_per_task: int | None = option(None, "raw files: rows per unit (default: as qgdist convert)", min=1)
    address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS or a private local Ray)")
    num_cpus: int | None = option(None, "CPUs of a private local Ray (default: all)", min=1)
    executor: Literal["ray", "local"] = option("ray", "ray: actors on a cluster; local: this process, no Ray",
                                               aliases={"--no-ray": "local"})
    score_seen: bool = option(False, "score jets the model trained or validated on too (refused otherwise; their "
                                     "count goes into summary.json)", flag="--score-seen-jets")
    progress: bool = option(True, "progress bar (jets/s) and summary")
    verbose: bool = option(False, "show Ray's own log lines on the terminal")


# -- planning (driver) ----------------------------------------------------------------------------------------------
def detect_input(paths: list[str]) -> str:
    """``shards``, ``cms``, ``energyflow`` or ``columnar`` from what the paths hold; mixed inputs are refused."""
    import fsspec

    from qgdist.data.shards.manifest import MANIFEST_NAME

    kinds = set()
    for path in paths:
        fs, p = fsspec.core.url_to_fs(path)
        if not any(ch in p for ch in "*?[") and not fs.exists(p):
            raise InputError(f"{path}: no such file or directory", file=path)
        if fs.isdir(p) and fs.exists(posixpath.join(p, MANIFEST_NAME)):
            kinds.add("shards")
        elif p.endswith((".root", ".h5", ".hdf5")) or (fs.isdir(p) and any(
                fs.glob(posixpath.join(p, f"*{ext}")) for ext in (".root", ".h5", ".hdf5"))):
            kinds.add("columnar")
        elif p.endswith(".parquet") or (fs.isdir(p) and fs.glob(posixpath.join(p, "*.parquet"))):
            kinds.add(_parquet_kind(fs, p))
        elif p.endswith(".npz") or (fs.isdir(p) and fs.glob(posixpath.join(p, "*.npz"))):
            kinds.add("energyflow")
        else:
            raise InputError(f"{path}: neither a shard directory (no {MANIFEST_NAME}) nor .parquet / .npz / .root / "
                             ".h5 files; give --input", file=path)
    if len(kinds) != 1:
        raise InputError(f"--data mixes {sorted(kinds)}: score one kind of input per call", field="data")
    return kinds.pop()


def _parquet_kind(fs: Any, path: str) -> str:
    """``cms`` for CMS End-to-End image files (an ``X_jets`` column), else ``columnar`` (jagged particle columns)."""
    import pyarrow.parquet as pq

    first = path if not fs.isdir(path) else sorted(fs.glob(posixpath.join(path, "*.parquet")))[0]
    with fs.open(first, "rb") as f:
        return "cms" if "X_jets" in pq.ParquetFile(f).schema_arrow.names else "columnar"


def plan_units(cfg: PredictConfig, kind: str, pre: Any, cpus: int,
               trained: TrainedOn | None = None) -> tuple[list[dict[str, Any]], int, list, dict[str, int] | None]:
    """The units to score (JSON-able dicts), the jets planned, rows rejected while planning, and per file the jets
    among them that the model trained or validated on (``trained``; None when that cannot be known)."""
    import collections

    import numpy as np

    from qgdist.core.storage import join
    from qgdist.data.identity import source_records
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.data.sources import columnar
    from qgdist.data.sources.plan import expand_inputs, plan_inputs

    if kind == "shards":
        units, total = [], 0
        seen: dict[str, int] | None = {} if trained is not None else None
        splits = ("train", "val", "test") if cfg.split == "all" else (cfg.split,)
        for data in cfg.data:
            manifest = read_manifest(data)
            pre.check_fits(manifest, data)
            if seen is not None:   # a dataset converted before identities cannot be checked
                seen = seen | trained.seen_in_dataset(manifest, splits) if manifest.sources else None
            for split in splits:
                for shard in manifest.shards_of(split):
                    units.append({"type": "shard", "path": join(data, shard.name), "index": len(units)})
                    total += shard.samples
        return units, total, [], seen
    pre.check_source(kind, " ".join(cfg.data))
    branches = dict(cfg.branches) if kind == "columnar" else {}
    options = {"branches": columnar.Branches.of(branches)} if kind == "columnar" else {}
    inputs = expand_inputs(list(cfg.data), kind)
    planned, rows, rejected = plan_inputs(kind, inputs, cpus, cfg.rows_per_task, cfg.on_bad_row, options)
    units = [{"type": kind, "unit": {**u.__dict__, "row_groups": list(u.row_groups)}, "index": u.index,
              "branches": branches} for u in planned]
    if trained is None:
        return units, rows, rejected, None
    per_file = collections.Counter()
    for u in planned:
        per_file[u.path] += u.rows
    # one streamed read of each input for its sha256: the files are identified by content, not by name
    sources = source_records(sorted(per_file), dict(per_file))
    seen = trained.seen_in_files((name, s["sha256"], np.arange(s["rows"])) for name, s in sources.items())
    return units, rows, rejected, seen


# -- the driver -----------------------------------------------------------------------------------------------------
def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Score ``cfg.data`` with ``cfg.checkpoint``; writes parts, ``summary.json`` (and ``roc.png``) to ``cfg.out``.

    Raises ``BadRowError`` at the first bad raw row unless ``on_bad_row="quarantine"``, and
    ``PreprocessingMismatch`` for data that does not fit the model (other kind, source or schema).
    """
    from tqdm import tqdm

    from qgdist.data.identity import TrainedOn
    from qgdist.data.sources.errors import BadRowError, Rejected
    from qgdist.core.ray import native_stderr_to_log
    from qgdist.infer.seen import check_seen
    from qgdist.train.checkpointer import find_checkpoint, load_checkpoint

    start = time.perf_counter()
    kind = detect_input(list(cfg.data)) if cfg.input == "auto" else cfg.input   # a missing --data, first
    checkpoint = str(find_checkpoint(cfg.checkpoint))
    loaded = load_checkpoint(checkpoint)
    pre, trained = loaded.preprocessing, TrainedOn.from_dict(loaded.dataset)
    cpus, gpus, ray_seconds = 1, 0, 0.0
    if cfg.executor == "ray":
        import ray

        from qgdist.core.ray import ensure_ray

        ensure_ray(cfg.address, cfg.num_cpus, log_dir=_local_dir(cfg.out), verbose=cfg.verbose, dashboard=False)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        ray_seconds = time.perf_counter() - start
    units, total, quarantine, seen_counts = plan_units(cfg, kind, pre, cpus, trained)
    seen = check_seen(trained, seen_counts, " ".join(cfg.data), cfg.score_seen)
    # Everything is checked: only now is the output touched, beside an earlier one (qgdist.core.output).
    output = Output(cfg.out, SUMMARY, "scores", cfg.overwrite, ours=_OUR_FILES)
    old = _committed_files(cfg.out) if output.committed() else []
    prefix = output.begin()
    records = _run_ray(cfg, checkpoint, units, cpus, gpus, prefix) if cfg.executor == "ray" else _run_local(
        cfg, checkpoint, units, prefix)
    quarantine = [r.to_dict() for r in quarantine]
    jets, rows_in, parts, restarted = 0, sum(1 for r in quarantine if r.get("row") is not None), [], 0
    # Ray's C++ lines (the actor pool's start) go to ray.log; our bar and lines stay on the terminal.
    quiet = native_stderr_to_log(_local_dir(cfg.out), cfg.verbose) if cfg.executor == "ray" else nullcontext()
    with quiet:
        bar = tqdm(total=total, unit="jet", unit_scale=True, desc="predict", disable=not cfg.progress,
                   file=sys.stderr, smoothing=0.1)
        # A node lost under the scoring actors: one line; Ray restarts them elsewhere and scores their units again.
        watch = NodeWatch(on_lost=lambda node: bar.write(
            f"node {node.address} lost: Ray restarts its scoring actors on the other nodes and scores their units "
            "again", file=sys.stderr)) if cfg.executor == "ray" else nullcontext()
        with bar, watch:
            for record in records:
                if "error" in record:
                    raise BadRowError.from_record(Rejected(**record["error"]))
                jets += record["jets"]
                rows_in += record["rows_in"]
                quarantine += record["rejected"]
                parts.append(record["part"])
                if record.get("restarted"):
                    restarted += 1
                    bar.write("a scoring actor was lost and restarted by Ray; the units it held are scored again",
                              file=sys.stderr)
                bar.update(record["rows_in"])
    lost = [node.address for node in getattr(watch, "lost", [])]
    rejected = sum(1 for r in quarantine if r.get("row") is not None)
    if kind != "shards" and jets + rejected != rows_in:   # a bug, never bad input
        raise RuntimeError(f"row accounting broken: in {rows_in}, scored {jets} + rejected {rejected}")
    seconds = time.perf_counter() - start
    summary = {"checkpoint": checkpoint, "input": kind, "data": list(cfg.data), "jets": jets, "rows_in": rows_in,
               "rejected": rejected, "quarantine": quarantine[:1000], "parts": sorted(parts),
               "seen_jets": seen, "seconds": round(seconds, 3), "ray_seconds": round(ray_seconds, 3),
               "jets_per_s": round(jets / max(seconds - ray_seconds, 1e-9), 1),
               "nodes_lost": lost, "actors_restarted": restarted}
    summary |= _metrics(output, sorted(parts), pre)
    from qgdist.core.atomic import write_json
    from qgdist.core.storage import join

    write_json(join(cfg.out, SUMMARY), summary)   # the commit
    output.finish(old)
    if cfg.progress:
        line = f"scored {jets} jets ({rejected} rejected) in {seconds:.1f} s, {summary['jets_per_s']:.0f} jets/s"
        if "metrics" in summary:
            m = summary["metrics"]
            line += f"; auc {m['auc']:.4f} acc {m['acc']:.4f} 1/eps_B@50% {m['rej50']:.1f}"
        if lost or restarted:
            line += (f"\n{len(lost)} node(s) lost ({', '.join(lost) or 'none'}), {restarted} scoring actor(s) "
                     "restarted; every unit is in the output once")
        print(line + f"\n{join(cfg.out, SUMMARY)}", file=sys.stderr)
    return summary


def _local_dir(out: str) -> str | None:
    return None if "://" in out else out


def _committed_files(out: str) -> list[str]:
    """The files an earlier summary.json names (its parts and ROC plot)."""
    from qgdist.core.storage import join, read_bytes

    doc = json.loads(read_bytes(join(out, SUMMARY)))
    return list(doc.get("parts", [])) + ([doc["roc"]] if doc.get("roc") else [])


def _run_local(cfg: PredictConfig, checkpoint: str, units: list[dict[str, Any]],
               prefix: str) -> Iterator[dict[str, Any]]:
    from qgdist.data.sources.stream import with_rows

    scorer = Scorer(checkpoint, cfg.out, cfg.batch_size, cfg.on_bad_row, cfg.label_quark_value, prefix=prefix)
    sources = [source_unit(u) for u in units]
    streamed = [s for s in sources if s is not None and s.stream]
    for item, source in zip(units, sources):
        if source is None or not source.stream:
            yield scorer.score(item)
    by_index = {u["index"]: u for u in units}
    for source, rows in with_rows(streamed):   # each deflated file inflated once, its units in order
        yield scorer.score(by_index[source.index], rows)


def _run_ray(cfg: PredictConfig, checkpoint: str, units: list[dict[str, Any]], cpus: int,
             gpus: int, prefix: str) -> Iterator[dict[str, Any]]:
    """One block per unit through an actor pool; records stream back as units finish."""
    if not units:
        return
    import logging

    import ray

    gpus_per_worker = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    workers = cfg.workers or max(1, int(gpus / gpus_per_worker) if gpus_per_worker else cpus)
    workers = min(workers, len(units))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False   # our bar counts jets; Ray's operator bars would interleave with it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    from qgdist.data.sources.ray_units import UNIT_BATCHES, unit_dataset

    # a deflated file's rows are inflated once by a streaming read task and scored by every actor
    ds = unit_dataset(units, [source_unit(u) for u in units], consumers=workers, inflaters=1 + cpus // 8)
    ds = ds.map_batches(
        Scorer, **UNIT_BATCHES, concurrency=workers, num_cpus=0 if gpus_per_worker else 1,
        num_gpus=gpus_per_worker,
        fn_constructor_kwargs={"checkpoint": checkpoint, "out": cfg.out, "batch_size": cfg.batch_size,
                               "on_bad_row": cfg.on_bad_row, "label_quark_value": cfg.label_quark_value,
                               "prefix": prefix})
    for row in ds.iter_rows():
        yield json.loads(row["record"])


def _metrics(output: Output, parts: list[str], pre: Any) -> dict[str, Any]:
    """Metrics and ROC over every part when every jet has a label (read back two columns per part)."""
    import pyarrow.parquet as pq
    import torch

    from qgdist.core.storage import join, run_path
    from qgdist.train.metrics import compute_metrics

    logits, labels = [], []
    for name in parts:
        with run_path(join(output.root, name)).open("rb") as f:
            table = pq.read_table(f, columns=["logit", "is_quark"])
        if table.column("is_quark").null_count:
            return {}
        # torch.tensor copies: Arrow's buffers are read-only, which torch.from_numpy warns about
        logits.append(torch.tensor(table.column("logit").to_numpy()))
        labels.append(torch.tensor(table.column("is_quark").to_numpy()))
    if not logits:
        return {}
    logit, label = torch.cat(logits), torch.cat(labels)
    if label.min() == label.max():   # one class only: no ROC
        return {}
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit.double(), label.double()).item()
    metrics = compute_metrics(logit, label, loss=loss, logits=True)
    from torchmetrics.functional.classification import binary_roc

    from qgdist.train.plots import plot_roc

    fpr, tpr, _ = binary_roc(torch.sigmoid(logit.double()), label.long(), thresholds=None)
    plot_roc({f"predict ({len(logit)} jets)": (fpr.numpy(), tpr.numpy())}, output.path(ROC))
    return {"metrics": metrics, "label_convention": pre.label_convention, "roc": output.name(ROC)}

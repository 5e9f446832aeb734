"""Real quark and gluon jets from Pythia 8 + FastJet, written in both source formats.

The run is split into tasks of a fixed number of jets (``jets_per_task``). Task ``i`` derives its seeds from
``(seed, i)`` (``mc_settings.task_seeds``), generates half quark and half gluon jets with two Pythia instances,
shuffles them and writes its own files: ``energyflow/pythia_s{seed}_t{i:05d}.npz`` (EnergyFlow npz, y = 1 quark)
and/or ``cms/pythia_s{seed}_t{i:05d}.parquet`` (CMS End-to-End parquet, y = 1 gluon), or with ``--format root``,
``parquet-jagged`` or ``h5`` ``columnar/pythia_s{seed}_t{i:05d}.{root,parquet,h5}`` (the ParT layout, label 1 =
quark, the same constituents as the npz), then a small ``tasks/...json`` record with its statistics. Tasks run as Ray tasks (``--workers`` at a time) or, with
``--no-ray``, one after another in this process. A task whose record already exists with the same settings is
reused, so an interrupted run continues where it stopped. Same seed -> bit-identical arrays in every file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import numpy as np

from qgdist.core.atomic import write_json
from qgdist.core.secrets import redact_config
from qgdist.data.labels import DEFAULT_QUARK_VALUE
from qgdist.generate.columnar import FORMATS as COLUMNAR_FORMATS
from qgdist.generate.columnar import write_clouds
from qgdist.generate.mc_settings import PythiaConfig, pythia_settings, task_seeds
from qgdist.generate.pythia_ray import run_tasks_on_ray

#: Config fields that decide a task's content (a reused task record must agree on all of them).
_CONTENT_FIELDS = ("format", "seed", "pthat_min", "jets_per_task", "ecm", "jet_r", "pt_min", "pt_max", "max_abs_y",
                   "batch_events")
_IMAGE_CHUNK = 64  # jets per CMSParquetWriter.write call: bounds memory at 64 x 375 KB of float64 images


def _stem(cfg: PythiaConfig, task_index: int) -> str:
    return f"pythia_s{cfg.seed}_t{task_index:05d}"


def task_paths(cfg: PythiaConfig, task_index: int) -> dict[str, str]:
    """Output paths of one task: ``energyflow`` / ``cms`` data files (as the format asks) and its ``record``."""
    stem = _stem(cfg, task_index)
    paths = {"record": os.path.join(cfg.out, "tasks", stem + ".json")}
    if cfg.format in ("energyflow", "both"):
        paths["energyflow"] = os.path.join(cfg.out, "energyflow", stem + ".npz")
    if cfg.format in ("cms", "both"):
        paths["cms"] = os.path.join(cfg.out, "cms", stem + ".parquet")
    if cfg.format in COLUMNAR_FORMATS:
        paths["columnar"] = os.path.join(cfg.out, "columnar", stem + COLUMNAR_FORMATS[cfg.format])
    return paths


def _generate_class(cfg: PythiaConfig, kind: str, n: int, pythia_seed: int, progress: Callable[[int], None]):
    """``n`` accepted jets of one class; returns (jets, events generated, events dropped as c/b)."""
    import pythia8mc

    from qgdist.generate.jets import JetSelector

    pythia = pythia8mc.Pythia("", False)  # False: no banner
    for line in pythia_settings(cfg, kind, pythia_seed):
        pythia.readString(line)
    if not pythia.init():
        raise RuntimeError(f"Pythia failed to initialise the {kind} process (settings: {pythia_settings(cfg, kind, pythia_seed)})")
    selector = JetSelector(cfg.jet_r, cfg.pt_min, cfg.pt_max, cfg.max_abs_y, pythia.particleData.charge)
    jets, events = [], 0
    while len(jets) < n:
        batch = pythia.nextBatch(cfg.batch_events)
        events += len(batch)
        new = selector.select(batch, light_quarks_only=(kind == "quark"))[: n - len(jets)]
        jets.extend(new)
        progress(len(new))
    return jets, events, selector.dropped_heavy


def generate_task(cfg: PythiaConfig, task_index: int, n_jets: int,
                  progress: Callable[[int], None] = lambda n: None) -> dict:
    """Generate, shuffle and write one task's ``n_jets`` jets (half quark, half gluon); returns its record."""
    from qgdist.generate.formats import CMSParquetWriter, pad_clouds, write_energyflow_npz
    from qgdist.generate.images import jet_image

    start = time.time()
    seeds = task_seeds(cfg.seed, task_index)
    half = n_jets // 2
    quarks, q_events, q_heavy = _generate_class(cfg, "quark", half, seeds.quark, progress)
    gluons, g_events, _ = _generate_class(cfg, "gluon", half, seeds.gluon, progress)
    order = np.random.default_rng(seeds.shuffle).permutation(n_jets)
    jets = [(quarks + gluons)[i] for i in order]
    is_quark = (order < half).astype(np.uint8)
    paths = task_paths(cfg, task_index)
    if "energyflow" in paths:
        qv = DEFAULT_QUARK_VALUE["energyflow"]
        write_energyflow_npz(paths["energyflow"], pad_clouds([j.constituents for j in jets]),
                             np.where(is_quark == 1, qv, 1 - qv), compress=cfg.compress)
    if "columnar" in paths:
        qv = DEFAULT_QUARK_VALUE["columnar"]
        write_clouds(paths["columnar"], cfg.format, [j.constituents for j in jets], np.where(is_quark == 1, qv, 1 - qv))
    if "cms" in paths:
        qv = DEFAULT_QUARK_VALUE["cms"]
        with CMSParquetWriter(paths["cms"]) as writer:
            for lo in range(0, n_jets, _IMAGE_CHUNK):
                chunk = jets[lo:lo + _IMAGE_CHUNK]
                writer.write(np.stack([jet_image(j.window) for j in chunk]), np.array([j.pt for j in chunk]),
                             np.array([j.mass for j in chunk]),
                             np.where(is_quark[lo:lo + _IMAGE_CHUNK] == 1, qv, 1 - qv))
    mult = {k: float(np.mean([len(j.constituents) for j in js])) for k, js in (("quark", quarks), ("gluon", gluons))}
    record = {
        "task": task_index, "jets": n_jets, "quark_jets": half, "gluon_jets": half,
        "events": {"quark": q_events, "gluon": g_events}, "dropped_heavy_quark_events": q_heavy,
        "mean_multiplicity": mult, "seconds": round(time.time() - start, 2),
        "pythia_seeds": {"quark": seeds.quark, "gluon": seeds.gluon},
        "files": {k: os.path.relpath(v, cfg.out) for k, v in paths.items() if k != "record"},
        "settings": {k: getattr(cfg, k) for k in _CONTENT_FIELDS},
    }
    write_json(paths["record"], record)
    return record


def _reusable(cfg: PythiaConfig, task_index: int, n_jets: int) -> dict | None:
    """The existing record of a finished task with the same settings, else None."""
    paths = task_paths(cfg, task_index)
    if not os.path.exists(paths["record"]):
        return None
    with open(paths["record"]) as f:
        record = json.load(f)
    wanted = {k: getattr(cfg, k) for k in _CONTENT_FIELDS}
    if record.get("settings") != wanted or record.get("jets") != n_jets:
        raise ValueError(f"{paths['record']}: {cfg.out} holds a run with other settings "
                         f"({record.get('settings')}, jets={record.get('jets')}); use another --out")
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    return record


def run_pythia(cfg: PythiaConfig) -> dict:
    """Generate ``cfg.jets`` jets into ``cfg.out``; returns a summary (also written to ``out/summary.json``)."""
    from tqdm import tqdm

    cfg.validate()
    for sub in ("tasks", "energyflow", "cms", "columnar"):
        if sub == "tasks" or cfg.format in (sub, "both") or (sub == "columnar" and cfg.format in COLUMNAR_FORMATS):
            os.makedirs(os.path.join(cfg.out, sub), exist_ok=True)
    sizes = cfg.task_sizes()
    records: dict[int, dict] = {}
    todo = []
    for i, n in enumerate(sizes):
        rec = _reusable(cfg, i, n)
        if rec is None:
            todo.append(i)
        else:
            records[i] = rec
    start = time.time()
    with tqdm(total=cfg.jets, initial=sum(r["jets"] for r in records.values()), unit="jet",
              desc="pythia jets", smoothing=0.1, mininterval=1.0) as bar:
        if todo and cfg.use_ray:
            records.update(run_tasks_on_ray(cfg, [(i, sizes[i]) for i in todo], bar, generate_task))
        else:
            for i in todo:
                records[i] = generate_task(cfg, i, sizes[i], bar.update)
    summary = _summarise(cfg, [records[i] for i in range(len(sizes))], time.time() - start, len(todo))
    write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def _summarise(cfg: PythiaConfig, records: list[dict], seconds: float, generated_tasks: int) -> dict:
    def total(key: str) -> int:
        return sum(r[key] for r in records)

    def mean_mult(kind: str) -> float:
        n = sum(r[f"{kind}_jets"] for r in records)
        return sum(r["mean_multiplicity"][kind] * r[f"{kind}_jets"] for r in records) / max(n, 1)

    events = {k: sum(r["events"][k] for r in records) for k in ("quark", "gluon")}
    return {
        "config": redact_config(dataclasses.asdict(cfg)), "tasks": len(records),
        "tasks_generated_now": generated_tasks,
        "jets": total("jets"), "quark_jets": total("quark_jets"), "gluon_jets": total("gluon_jets"),
        "events": events, "acceptance": {k: total(f"{k}_jets") / max(events[k], 1) for k in events},
        "mean_multiplicity": {k: mean_mult(k) for k in ("quark", "gluon")},
        "dropped_heavy_quark_events": total("dropped_heavy_quark_events"),
        "wall_seconds": round(seconds, 1), "files": [f for r in records for f in r["files"].values()],
    }

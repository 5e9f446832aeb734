"""``qgdist bench physics``: Pythia jets -> shards -> ParticleNet(-Lite) and ResNet-15, next to the literature.

Steps: generate N quark/gluon jets with the EnergyFlow recipe (``qgdist.generate.pythia``), or reuse the finished
tasks of an earlier ``qgdist generate pythia`` directory; convert the EnergyFlow npz files (clouds) and the CMS-style
parquet files (images) into shards (``qgdist.data.convert``); train each model with the default recipe on the train
split with the plain loop (``qgdist.train.loop``); evaluate the checkpoint with the best validation AUC on the test
split; print accuracy, AUC and background rejection 1/eps_B at 50% signal (quark) efficiency next to the ParticleNet
paper's figures (trained on 1.6M jets) and the seed notebooks' results, with the number of training jets used.

Learning curve (``--train-jets 5000,20000,50000``): the first generated files holding ``--test-jets`` jets are
converted alone as the test set (``--split 0,0,1``: never trained or validated on; the first files, so the test
set stays the same while more files are generated); for each N, the next files holding N training jets are
converted with a 90/10 train/validation split, each cloud model is trained on them and tested on that same test set.
Writes ``learning_curve.json`` and ``learning_curve.png`` in ``--out``; a re-run with the same ``--out`` keeps the
points already there (same model, N, epochs and test set) and adds the others.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Literal

from qgdist.bench import comma_ints, comma_names
from qgdist.core.config import option
from qgdist.core.device import Device

#: Literature figures (REFERENCE.md section 4; ParticleNet paper Table 3, quark/gluon with PID, 1.6M training jets).
PAPER = {
    "particlenet-lite": {"acc": 0.835, "auc": 0.9079, "rej50": 37.1, "note": "PN paper, EnergyFlow QG with PID"},
    "particlenet": {"acc": 0.840, "auc": 0.9116, "rej50": 39.8, "note": "PN paper, EnergyFlow QG with PID"},
    "resnet15": {"acc": None, "auc": 0.80, "rej50": None,
                 "note": "E2E paper on CMS Open Data (detector sim + pileup, pT 70-337 GeV): not the same jets"},
}
#: What the seed notebooks reached (REFERENCE.md sections 1 and 4).
SEEDS = {
    "particlenet-lite": {"acc": 0.742, "note": "seed GNN notebook, raw (pt, y, phi, pid), EnergyFlow data"},
    "particlenet": {"acc": 0.742, "note": "seed GNN notebook (its only GNN)"},
    "resnet15": {"acc": 0.513, "note": "seed Keras CNN on CMS parquet (chance)"},
}
IMAGE_MODELS = ("resnet15", "seed-cnn")


@dataclass(frozen=True)
class PhysicsBenchConfig:
    """One ``qgdist bench physics`` run."""

    jets: int = option(4000, "jets to use (whole generated files, half quark)", min=2)
    out: str = option("runs/bench_physics", "shards, training runs, physics.json and physics_roc.png")
    pythia_dir: str | None = option(None, "reuse the finished tasks of a `qgdist generate pythia` dir")
    seed: int = option(2026, "generator seed when generating", min=0)
    workers: int = option(1, "generator tasks at once (Ray when > 1)", min=1)
    models: tuple[str, ...] = option(("particlenet-lite", "particlenet", "resnet15"), "models to train and test")
    epochs: int = option(20, "training epochs per model", min=1)
    batch_size: int = option(256, "jets per training step", min=1)
    lr: float | None = option(None, "peak learning rate (default: the recipe's, 3e-3; the ParT paper trained ParT "
                                    "with 1e-3)", gt=0)
    preset: Literal["kin", "kinpid"] = option("kinpid", "particle features of the cloud models (the paper's "
                                                        "headline numbers use particle ID: kinpid)")
    max_steps: int | None = option(None, "cap on training steps per model (smoke runs)", min=1)
    executor: Literal["local", "ray"] = option("local", "conversion executor (local: in this process, no Ray)")
    device: Device = option("auto", "where training and testing run (auto: CUDA when visible)")
    train_jets: tuple[int, ...] = option((), "learning curve: training-set sizes, e.g. 5000,20000,50000 (cloud "
                                             "models; uses every finished generated file)", parse=comma_ints, min=1)
    test_jets: int = option(5000, "learning curve: jets of the held-out test files (the first generated ones)",
                         min=1)

    def __post_init__(self) -> None:
        if isinstance(self.models, str):  # "a,b" from a --config file
            object.__setattr__(self, "models", comma_names(self.models))


def pythia_files(cfg: PhysicsBenchConfig, formats: set[str]) -> tuple[dict[str, list[str]], int]:
    """Generated files per format and the number of jets they hold (whole files, at least ``cfg.jets`` if there)."""
    if cfg.pythia_dir:
        directory = cfg.pythia_dir
    else:
        from qgdist.generate.mc_settings import PythiaConfig
        from qgdist.generate.pythia import run_pythia

        directory = os.path.join(cfg.out, "pythia")
        fmt = "both" if len(formats) == 2 else next(iter(formats))
        run_pythia(PythiaConfig(out=directory, jets=cfg.jets, format=fmt, workers=cfg.workers, seed=cfg.seed,
                                use_ray=cfg.workers > 1))
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "tasks", "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    if not records:
        raise FileNotFoundError(f"{directory}/tasks: no finished Pythia tasks to use")
    chosen, jets = [], 0
    for rec in sorted(records, key=lambda r: r["task"]):
        if jets >= cfg.jets:
            break
        chosen.append(rec)
        jets += rec["jets"]
    files = {fmt: [os.path.join(directory, r["files"][fmt]) for r in chosen] for fmt in formats}
    for fmt, paths in files.items():
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: listed in its task record but missing (format {fmt})")
    return files, jets


def convert_files(source: str, files: list[str], out: str, executor: str,
                  split: tuple[float, float, float] | None = None):
    """Shards of ``files`` under ``out`` (reused when the manifest there lists exactly these inputs)."""
    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.core.errors import InputError
    from qgdist.data.shards.manifest import read_manifest

    try:
        manifest = read_manifest(out)
        if sorted(os.path.basename(p) for p in manifest.inputs) == sorted(os.path.basename(p) for p in files):
            return manifest
    except InputError:   # not converted yet
        pass
    extra = {"split": split} if split is not None else {}
    return convert(ConvertConfig(source=source, inputs=files, out=out, executor=executor, **extra))


def train_and_test(cfg: PhysicsBenchConfig, model: str, data: str, test_data: str | None = None,
                   run_name: str | None = None) -> dict:
    """Train ``model`` on ``data`` with the default recipe; metrics of the best-validation checkpoint on the test
    split of ``test_data`` (default: ``data``)."""
    from qgdist.core.device import resolve_device
    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader
    from qgdist.models import count_parameters
    from qgdist.train.checkpointer import Checkpointer, load_checkpoint
    from qgdist.train.config import TrainConfig, resolve
    from qgdist.train.loop import evaluate, train

    device = resolve_device(cfg.device)
    tcfg = resolve(TrainConfig.of(data=data, model=model, storage=os.path.join(cfg.out, "runs"),
                                  run_name=run_name or model, epochs=cfg.epochs, batch_size=cfg.batch_size, preset=cfg.preset,
                                  max_steps=cfg.max_steps, track=False, workers=0, seed=0, lr=cfg.lr),
                   cuda_available=device.type == "cuda")
    shutil.rmtree(tcfg.run_dir, ignore_errors=True)  # a fresh run: the loop would otherwise resume the last one
    start = time.perf_counter()
    result = train(tcfg, device=device)
    seconds = time.perf_counter() - start
    best = Checkpointer(tcfg.run).best() or result.checkpoint
    checkpoint = load_checkpoint(best)
    loader = ShardLoader(DataConfig(test_data or data, batch_size=512), "test", training=False, device=str(device),
                         preprocessing=checkpoint.preprocessing)
    net = checkpoint.build_model().to(device)
    test, roc = evaluate(net, loader, device, tcfg.optim.precision)
    return {"roc": roc, "model": model, "parameters": count_parameters(net), "train_seconds": round(seconds, 1),
            "epochs_run": result.epoch, "steps": result.global_step, "checkpoint": str(best), "test": test}


def run_learning_curve(cfg: PhysicsBenchConfig) -> dict:
    """Train each cloud model on growing training sets, test all on one held-out set; ``learning_curve.json``."""
    import math

    from qgdist.core.atomic import write_json
    from qgdist.train.plots import plot_curves

    if cfg.pythia_dir is None:
        raise ValueError("--train-jets needs --pythia-dir: a finished `qgdist generate pythia` directory")
    models = [m for m in cfg.models if m not in IMAGE_MODELS]
    files, jets = pythia_files(dataclasses.replace(cfg, jets=10**12), {"energyflow"})   # every finished file
    ef = files["energyflow"]
    per_file = jets / len(ef)
    n_test = math.ceil(cfg.test_jets / per_file)
    pool = ef[n_test:]
    test_dir = os.path.join(cfg.out, "shards-test")
    test_manifest = convert_files("energyflow", ef[:n_test], test_dir, cfg.executor, split=(0.0, 0.0, 1.0))
    path = os.path.join(cfg.out, "learning_curve.json")
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f)["rows"] if r.get("test_files") == n_test]
    rows: list[dict] = []
    history: dict[str, tuple[list, list]] = {}
    for n in sorted(cfg.train_jets):
        k = math.ceil(n / 0.9 / per_file)
        if k > len(pool):
            raise ValueError(f"--train-jets {n} needs {k} generated files besides the {n_test} test files; "
                             f"{cfg.pythia_dir} has {len(pool)}")
        data = os.path.join(cfg.out, f"shards-train-{n}")
        splits = convert_files("energyflow", pool[:k], data, cfg.executor, split=(0.9, 0.1, 0.0)).splits
        for model in models:
            same = [r for r in kept if (r["model"], r["requested"], r["epochs"], r["batch_size"], r.get("lr")) ==
                    (model, n, cfg.epochs, cfg.batch_size, cfg.lr)]
            if same:
                row = same[0]
            else:
                row = train_and_test(cfg, model, data, test_data=test_dir, run_name=f"{model}-{n}")
                row.pop("roc")
                row.update(train_jets=splits["train"]["samples"], test_jets=test_manifest.rows["written"],
                           source="energyflow", files=k, test_files=n_test, requested=n, epochs=cfg.epochs,
                           batch_size=cfg.batch_size, lr=cfg.lr)
            rows.append(row)
            print(f"{model} on {row['train_jets']} jets: test " + " ".join(
                f"{k}={v:.4f}" for k, v in row["test"].items()), flush=True)
    rows += [r for r in kept if r not in rows]
    for row in sorted(rows, key=lambda r: r["train_jets"]):
        for key in ("auc", "rej50", "rej30"):
            xs, ys = history.setdefault(f"{row['model']} ({row['epochs']} epochs)/{key}", ([], []))
            xs.append(row["train_jets"])
            ys.append(row["test"][key])
    results = {"config": asdict(cfg), "generated_jets": jets, "rows": rows, "paper": PAPER, "seeds": SEEDS}
    write_json(path, results)
    results["plot"] = str(plot_curves(history, os.path.join(cfg.out, "learning_curve.png"), xlabel="training jets"))
    print(format_table(results))
    return results


def run_physics(cfg: PhysicsBenchConfig) -> dict:
    """Run the benchmark; returns (and writes to ``out/physics.json``) the results."""
    from qgdist.core.atomic import write_json
    from qgdist.data.shards.manifest import read_manifest

    if cfg.train_jets:
        return run_learning_curve(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    formats = {"cms" if m in IMAGE_MODELS else "energyflow" for m in cfg.models}
    files, jets = pythia_files(cfg, formats)
    data = {}
    for fmt in sorted(formats):
        shards = os.path.join(cfg.out, f"shards-{fmt}")
        convert_files(fmt, files[fmt], shards, cfg.executor)
        data[fmt] = shards
    rows, curves = [], {}
    for model in cfg.models:
        fmt = "cms" if model in IMAGE_MODELS else "energyflow"
        splits = read_manifest(data[fmt]).splits
        row = train_and_test(cfg, model, data[fmt])
        roc = row.pop("roc")
        if roc is not None:
            curves[model] = tuple(t.detach().cpu().numpy() for t in roc)
        row.update(train_jets=splits["train"]["samples"], test_jets=splits.get("test", {}).get("samples", 0),
                   source=fmt)
        rows.append(row)
        print(f"{model}: test " + " ".join(f"{k}={v:.4f}" for k, v in row["test"].items()), flush=True)
    results = {"config": asdict(cfg), "generated_jets": jets, "rows": rows, "paper": PAPER, "seeds": SEEDS}
    write_json(os.path.join(cfg.out, "physics.json"), results)
    if curves:
        from qgdist.train.plots import plot_roc

        results["roc_plot"] = str(plot_roc(curves, os.path.join(cfg.out, "physics_roc.png"),
                                           title=f"Pythia quark vs gluon, test split ({jets} jets generated)"))
    print(format_table(results))
    return results


def _fmt(v, spec: str) -> str:
    """``format(v, spec)``, or a dash as wide as the spec's width for a missing figure."""
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))


def format_table(results: dict) -> str:
    """The side-by-side table: ours on test, the paper's, the seeds'."""
    lines = [f"Pythia 8 quark/gluon jets (EnergyFlow recipe): {results['generated_jets']} generated; "
             f"the paper trained on 1.6M jets.",
             f"{'model':18s} {'train':>6s} {'test':>6s} {'epochs':>6s} | {'acc':>6s} {'AUC':>6s} {'1/eB50':>7s} "
             f"{'1/eB30':>7s} | "
             f"{'paper acc':>9s} {'AUC':>6s} {'1/eB50':>7s} | {'seed acc':>8s}"]
    for r in results["rows"]:
        t, p, s = r["test"], PAPER.get(r["model"], {}), SEEDS.get(r["model"], {})
        lines.append(f"{r['model']:18s} {r['train_jets']:6d} {r['test_jets']:6d} {r['epochs_run']:6d} | "
                     f"{t['acc']:6.3f} {t['auc']:6.4f} {_fmt(t.get('rej50'), '7.1f')} {_fmt(t.get('rej30'), '7.1f')} | "
                     f"{_fmt(p.get('acc'), '9.3f')} {_fmt(p.get('auc'), '6.4f')} {_fmt(p.get('rej50'), '7.1f')} | "
                     f"{_fmt(s.get('acc'), '8.3f')}")
    lines.append("notes: " + "; ".join(f"{m}: {PAPER[m]['note']}" for m in PAPER if any(
        r["model"] == m for r in results["rows"])))
    return "\n".join(lines)

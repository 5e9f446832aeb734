"""``qgdist quickstart``: the whole pipeline on toy data, on this machine, in a few minutes.

1. generate toy jets in both public formats (EnergyFlow npz clouds, CMS parquet images);
2. convert both to WebDataset shards with Ray (``qgdist convert``);
3. train ``particlenet-lite`` and ``resnet15`` with Ray Train DDP (``workers`` CPU workers), tracked to the local
   MLflow store of each run directory;
4. evaluate the best checkpoint of each on the test split (metrics, ROC PNG, per-jet scores);
5. write ``report.md`` with a table next to the seed notebooks' baselines, plus the PNGs.

The seed baselines were measured on the real datasets; the toy data only imitate the quark/gluon differences, so
the comparison shows the pipeline works end to end, not which model is better on real jets.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgdist.core import atomic
from qgdist.core.config import option
from qgdist.core.run import Run

#: Test accuracy of the seed notebooks on the real datasets (REFERENCE.md section 1 and 4).
SEED_BASELINES = {"resnet15": ("seed Keras CNN, CMS images", 0.513),
                  "particlenet-lite": ("seed Keras ParticleNet-Lite, EnergyFlow clouds", 0.742)}


@dataclass(frozen=True)
class QuickstartConfig:
    """Sizes of the quickstart run (the defaults finish in under 10 minutes on 2 cores)."""

    out: str = option("quickstart", "directory for data, runs and the report")
    jets: int = option(6000, "toy clouds; images are a third of that (each costs ~20x more to train on)",
                       min=1)
    epochs: int = option(3, "training epochs of each model", min=1)
    workers: int = option(2, "Ray Train workers", min=1)
    cloud_batch: int = option(128, "batch size per worker of particlenet-lite", min=1)
    image_batch: int = option(32, "batch size per worker of resnet15", min=1)
    seed: int = option(0, "seed of the toy data and the training runs", min=0)
    verbose: bool = option(False, "show Ray's own log lines on the terminal")
    model_kwargs: dict[str, dict[str, Any]] = option({}, "model settings by model name (tiny test runs)", cli=False)


def _stage(name: str, t0: float) -> None:
    print(f"[quickstart {time.perf_counter() - t0:6.1f} s] {name}", flush=True)


def quickstart(cfg: QuickstartConfig) -> Path:
    """Run the pipeline and return the path of the markdown report."""
    from qgdist.core.ray import ensure_ray
    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.pipelines.toy_data import toy_file
    from qgdist.train.config import TrainConfig, resolve
    from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint
    from qgdist.train.ray_trainer import fit

    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    image_jets = max(cfg.jets // 3, 60)
    _stage(f"generating {cfg.jets} toy clouds and {image_jets} toy images", t0)
    toy_file("energyflow", cfg.jets, raw / "toy_qg.npz", cfg.seed)
    toy_file("cms", image_jets, raw / "toy_cms.parquet", cfg.seed + 1)

    ensure_ray(log_dir=out, verbose=cfg.verbose)
    datasets = {}
    for source, kind, inputs in (("energyflow", "cloud", raw / "toy_qg.npz"), ("cms", "image", raw / "toy_cms.parquet")):
        _stage(f"converting {inputs.name} with Ray", t0)
        datasets[kind] = str(out / "data" / kind)
        convert(ConvertConfig(source=source, inputs=[str(inputs)], out=datasets[kind], progress=False))

    rows, runs = [], out / "runs"
    for model, kind, batch in (("particlenet-lite", "cloud", cfg.cloud_batch), ("resnet15", "image", cfg.image_batch)):
        _stage(f"training {model} with {cfg.workers} Ray Train workers", t0)
        shutil.rmtree(Run.at(str(runs), model).location, ignore_errors=True)  # the quickstart always starts afresh
        train_cfg = TrainConfig.of(data=datasets[kind], model=model, model_kwargs=cfg.model_kwargs.get(model, {}),
                                   run_name=model, storage=str(runs), workers=cfg.workers, epochs=cfg.epochs,
                                   batch_size=batch, seed=cfg.seed, shuffle_buffer=1000, checkpoint_every=0,
                                   log_every=5, max_failures=0, verbose=cfg.verbose)
        result = fit(resolve(train_cfg))
        _stage(f"evaluating {model} on the test split", t0)
        # The run directory names its best checkpoint (by validation AUC), else its latest.
        ev = evaluate_checkpoint(EvalConfig(checkpoint=result.run_dir, data=datasets[kind], split="test",
                                            progress=False))
        rows.append((model, kind, ev, Run(result.run_dir)))

    report = _write_report(out, rows, cfg, time.perf_counter() - t0)
    _stage(f"report written to {report}", t0)
    return report


def _write_report(out: Path, rows: list, cfg: QuickstartConfig, seconds: float) -> Path:
    lines = ["# qgdist quickstart report", "",
             f"Toy data ({cfg.jets} clouds, {max(cfg.jets // 3, 60)} images), {cfg.epochs} epochs, "
             f"{cfg.workers} Ray Train workers, {seconds:.0f} s in all.", "",
             "| model | data | test jets | accuracy | ROC AUC | 1/eps_B @30% | 1/eps_B @50% | seed baseline (real data) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, kind, ev, _ in rows:
        m = ev["metrics"]
        what, acc = SEED_BASELINES[model]
        lines.append(f"| {model} | toy {kind}s | {ev['n_jets']} | {m['acc']:.3f} | {m['auc']:.3f} | "
                     f"{m['rej30']:.1f} | {m['rej50']:.1f} | accuracy {acc:.3f} ({what}) |")
    lines += ["", "The seed baselines were measured on the real CMS and EnergyFlow data; these models ran on toy jets, "
              "so the table shows the pipeline end to end, not a physics comparison.", ""]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    for model, _, ev, run in rows:
        for src, name in ((Path(ev["paths"]["roc"]), f"{model}-test-roc.png"),
                          (run.local_artifacts / "curves.png", f"{model}-curves.png")):
            if src.exists():
                shutil.copyfile(src, figures / name)
                lines.append(f"![{name}](figures/{name})")
        lines.append(f"MLflow store: `qgdist tracker --store {run.mlflow_store}`; run directory `{run}`.")
        lines.append("")
    report = out / "report.md"
    atomic.write_text(report, "\n".join(lines) + "\n")
    return report

"""``qgdist bench predict``: ``qgdist predict`` throughput and memory, from raw source files and from shards.

For each model (default ParticleNet-Lite on EnergyFlow-format clouds and ResNet-15 on CMS-format images) it
generates a 1x and a ``scale``x toy input, converts the 1x one to shards, writes a checkpoint (one training step:
throughput does not depend on the weights), then runs ``qgdist predict`` as a subprocess on the raw 1x file,
the raw ``scale``x file and the 1x shards. Each run reports jets/s of the scoring loop (Ray start-up excluded,
reported apart), wall seconds, and the peak memory of its whole process tree (Ray's processes included): summed
PSS and RSS sampled every 0.2 s (``qgdist.bench.memory``), and the sum of each process's kernel peak mark.
Streaming means the ``scale``x run's memory stays within ~10% of the 1x run's. With ``$RAY_ADDRESS`` set, each run
joins that cluster instead.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgdist.bench import comma_names, joined_ray
from qgdist.core.config import option

#: model -> (source format, toy jets relative to --jets: images cost ~20x more to score)
MODELS = {"particlenet-lite": ("energyflow", 1.0), "resnet15": ("cms", 0.2)}


@dataclass(frozen=True)
class BenchPredictConfig:
    """``qgdist bench predict`` settings."""

    models: tuple[str, ...] = option(tuple(MODELS), "comma-separated models", flag="--model", parse=comma_names)
    jets: int = option(2000, "clouds in the 1x input (images: a fifth of that)", min=5)
    scale: int = option(10, "the large input is this many times bigger", min=1)
    workers: int = option(2, "scoring actors", min=1)
    batch_size: int = option(256, "jets per forward pass", min=1)
    workdir: str = option("runs/bench_predict", "inputs, checkpoints, outputs and bench_predict.json")

    def __post_init__(self) -> None:
        unknown = set(self.models) - set(MODELS)
        if unknown:
            raise ValueError(f"bench predict knows {sorted(MODELS)}, not {sorted(unknown)}")


def one_step_checkpoint(model: str, shards: str, root: Path) -> str:
    """A run directory under ``root`` holding ``model`` trained for one step on ``shards`` (scoring speed does not
    depend on the weights)."""
    from qgdist.train.config import TrainConfig, resolve
    from qgdist.train.loop import train

    cfg = resolve(TrainConfig.of(data=shards, model=model, workers=0, epochs=1, batch_size=8, max_steps=1,
                                 storage=str(root / "runs"), run_name=model, track=False, progress=False,
                                 checkpoint_every=0))
    return train(cfg).run_dir


def _predict(checkpoint: str, data: str, out: Path, cfg: BenchPredictConfig) -> dict[str, Any]:
    from qgdist.bench.memory import measure_tree

    cmd = [sys.executable, "-m", "qgdist", "predict", "--checkpoint", checkpoint, "--data", data, "--out", str(out),
           "--workers", str(cfg.workers), "--num-cpus", str(cfg.workers), "--batch-size", str(cfg.batch_size),
           "--no-progress", "--score-seen-jets"]   # the checkpoint trained on the 1x jets: scoring speed is the same
    run = measure_tree(cmd, check=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"jets": summary["jets"], "jets_per_s": summary["jets_per_s"], "ray_seconds": summary["ray_seconds"],
            "wall_seconds": round(run["wall_s"], 2), "peak_pss_mb": run["peak_pss_mb"],
            "peak_rss_mb": run["peak_rss_mb"], "sum_hwm_mb": run["sum_hwm_mb"]}


def run(cfg: BenchPredictConfig) -> dict[str, Any]:
    """Measure every model on raw 1x, raw ``scale``x and shards 1x; print the table, write bench_predict.json."""
    import shutil

    from qgdist.core.atomic import write_json
    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.pipelines.toy_data import toy_file

    root = Path(cfg.workdir)
    shutil.rmtree(root, ignore_errors=True)
    results: dict[str, Any] = {}
    for model in cfg.models:
        source, share = MODELS[model]
        jets = max(50, int(cfg.jets * share))
        ext = "npz" if source == "energyflow" else "parquet"
        small = toy_file(source, jets, root / model / f"small.{ext}", seed=1)
        large = toy_file(source, jets * cfg.scale, root / model / f"large.{ext}", seed=2)
        shards = str(root / model / "shards")
        convert(ConvertConfig(source=source, inputs=[small], out=shards, split=(1.0, 0.0, 0.0), executor="local",
                              progress=False))
        checkpoint = one_step_checkpoint(model, shards, root / model)
        results[model] = {
            "raw 1x": _predict(checkpoint, small, root / model / "out_raw1", cfg),
            f"raw {cfg.scale}x": _predict(checkpoint, large, root / model / "out_rawN", cfg),
            "shards 1x": _predict(checkpoint, shards, root / model / "out_shards", cfg)}
        print(table({model: results[model]}), flush=True)
    joined = joined_ray()
    if joined:
        print(joined)
    write_json(root / "bench_predict.json", {"config": cfg.__dict__, "joined_ray": joined, "results": results})
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| model | input | jets | jets/s (loop) | Ray start s | wall s | peak PSS MB | peak RSS MB | sum HWM MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {model} | {name} | {r['jets']} | {r['jets_per_s']:.0f} | {r['ray_seconds']:.1f} | "
                         f"{r['wall_seconds']:.1f} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['sum_hwm_mb']:.0f} |")
        raw = [v for k, v in rows.items() if k.startswith("raw")]
        if len(raw) == 2:
            lines.append(f"| {model} | memory {list(rows)[1]} / 1x | | | | | {raw[1]['peak_pss_mb'] / raw[0]['peak_pss_mb']:.2f} "
                         f"| {raw[1]['peak_rss_mb'] / raw[0]['peak_rss_mb']:.2f} | "
                         f"{raw[1]['sum_hwm_mb'] / raw[0]['sum_hwm_mb']:.2f} |")
    return "\n".join(lines)

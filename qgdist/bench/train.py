"""``qgdist bench train``: Ray Train DDP (N workers) vs the plain loop doing the same work, side by side.

Both train the same model on the same data for the same epochs with the same global batch: the plain loop in this
process with batch ``N * B`` (torch uses every core), Ray Train with N one-CPU workers of batch ``B`` each (gloo
all-reduce). Steady-state throughput is the loop's own figure (global jets/s after the first steps of an epoch,
evaluation excluded); Ray's fixed cost is reported separately: ``ray.init``, and the time from ``fit()`` to the
first training step. Target: Ray >= 0.9x the plain loop.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

from qgdist.core.config import option


@dataclass(frozen=True)
class TrainBenchConfig:
    """``qgdist bench train`` settings."""

    data: str | None = option(None, "converted dataset (default: toy clouds)")
    model: str = option("particlenet-lite", "model to train (qgdist.models)")
    jets: int = option(4000, "toy clouds when no --data is given")
    workers: int = option(2, "Ray Train workers (one CPU each); the plain loop's batch is workers x batch size")
    batch_size: int = option(128, "per Ray worker")
    epochs: int = option(1, "epochs of each run (validation runs after every epoch)")
    plain_threads: int | None = option(None, "torch threads for the plain loop (default: torch's, one per core); "
                                             "on a shared, oversubscribed machine 1 can be faster")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers: Ray Train needs at least one worker")


def run(cfg: TrainBenchConfig) -> dict[str, float]:
    """Train the plain loop, then Ray Train, on the same data; print and return the throughput figures."""
    import ray
    import torch

    from qgdist.core.ray import ensure_ray
    from qgdist.pipelines.toy_data import toy_dataset
    from qgdist.train.config import TrainConfig, resolve
    from qgdist.train.loop import train
    from qgdist.train.ray_trainer import fit

    with tempfile.TemporaryDirectory(prefix="qgdist-bench-train-") as tmp:
        data = cfg.data or toy_dataset("cloud", cfg.jets, tmp)
        common = {"data": data, "model": cfg.model, "epochs": cfg.epochs, "storage": tmp, "track": False,
                  "progress": False, "checkpoint_every": 0}

        if cfg.plain_threads:
            torch.set_num_threads(cfg.plain_threads)
        threads = torch.get_num_threads()
        t = time.time()
        plain = train(resolve(TrainConfig.of(run_name="plain", workers=0, batch_size=cfg.workers * cfg.batch_size,
                                             **common)))
        plain_start = plain["started_unix"] - t
        plain_speed = plain["history"]["train/jets_per_s"][-1][1]

        t = time.time()
        ensure_ray()
        ray_init = time.time() - t
        t = time.time()
        out = fit(resolve(TrainConfig.of(run_name="bench", workers=cfg.workers, batch_size=cfg.batch_size,
                                         **common)))
        fit_total = time.time() - t
        ray_start = out["metrics"]["started_unix"] - t
        ray_speed = out["metrics"]["jets_per_s"]
        ray.shutdown()

    row = {"plain_jets_s": plain_speed, "ray_jets_s": ray_speed, "ratio": ray_speed / plain_speed,
           "ray_init_s": ray_init, "ray_fit_to_first_step_s": ray_start, "plain_to_first_step_s": plain_start,
           "ray_fit_total_s": fit_total}
    print(f"model {cfg.model}, global batch {cfg.workers * cfg.batch_size}, {cfg.epochs} epoch(s)")
    print(f"  plain loop (1 process, {threads} thr) {plain_speed:9.0f} jets/s   first step after {plain_start:5.1f} s")
    print(f"  Ray Train ({cfg.workers} workers, gloo)  {ray_speed:9.0f} jets/s   first step after {ray_start:5.1f} s "
          f"of fit() (+ ray.init {ray_init:.1f} s; fit() total {fit_total:.1f} s)")
    print(f"  steady-state ratio Ray / plain: {row['ratio']:.2f}x  (target >= 0.9x)")
    return row

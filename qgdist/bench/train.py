"""``qgdist bench train``: Ray Train DDP (N workers) vs the plain loop doing the same work, side by side.

Both train the same model on the same data for the same epochs with the same global batch: the plain loop in this
process with batch ``N * B`` (torch uses every core), Ray Train with N one-CPU workers of batch ``B`` each (gloo
all-reduce). Steady-state throughput is the loop's own figure (global jets/s after the first steps of an epoch,
evaluation excluded); Ray's fixed cost is reported separately: ``ray.init``, and the time from ``fit()`` to the
first training step. Target: Ray >= 0.9x the plain loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainBenchConfig:
    data: str | None = None          # a converted dataset; default: toy clouds
    model: str = "particlenet-lite"
    jets: int = 4000
    workers: int = 2
    batch_size: int = 128            # per Ray worker; the plain loop uses workers * batch_size
    epochs: int = 1
    plain_threads: int | None = None  # torch threads of the plain loop (None: torch's default, one per core)


def run(cfg: TrainBenchConfig) -> dict[str, float]:
    import ray
    import torch

    from qgdist.bench.loader import _toy
    from qgdist.ray_runtime import ensure_ray
    from qgdist.train.config import TrainConfig
    from qgdist.train.loop import train
    from qgdist.train.ray_trainer import fit

    with tempfile.TemporaryDirectory(prefix="qgdist-bench-train-") as tmp:
        data = cfg.data or _toy("cloud", cfg.jets, Path(tmp))
        common = dict(epochs=cfg.epochs, track=False, progress=False, checkpoint_every=0, eval_every_epoch=False)

        if cfg.plain_threads:
            torch.set_num_threads(cfg.plain_threads)
        threads = torch.get_num_threads()
        t = time.time()
        plain = train(TrainConfig(data, cfg.model, run_dir=f"{tmp}/plain", batch_size=cfg.workers * cfg.batch_size,
                                  **common))
        plain_start = plain["started_unix"] - t
        plain_speed = plain["history"]["train/jets_per_s"][-1][1]

        t = time.time()
        ensure_ray()
        ray_init = time.time() - t
        t = time.time()
        out = fit(TrainConfig(data, cfg.model, run_name="bench", batch_size=cfg.batch_size, **common), tmp,
                  num_workers=cfg.workers)
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="Ray Train DDP vs plain loop throughput, Ray start-up cost")
    p.add_argument("--data", default=None, help="converted dataset (default: toy clouds)")
    p.add_argument("--model", default="particlenet-lite")
    p.add_argument("--jets", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="per Ray worker")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--plain-threads", type=int, default=None,
                   help="torch threads for the plain loop (default: torch's, one per core); on a shared, "
                        "oversubscribed machine 1 can be faster")
    p.set_defaults(func=lambda a: run(TrainBenchConfig(a.data, a.model, a.jets, a.workers, a.batch_size,
                                                       a.epochs, a.plain_threads)) and 0)

"""``qgdist train``: flags (or ``--config run.yaml``) -> a resolved ``TrainConfig`` -> the plain loop or Ray Train."""

from __future__ import annotations

import argparse

from qgdist.core.config import ConfigError, add_arguments, describe, from_args
from qgdist.train.config import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model with Ray Train DDP (or the plain loop: --workers 0)",
        description="Train a model on a converted dataset. Re-running the same command (same --run-name and "
                    "--storage) resumes mid-epoch from the latest checkpoint into the same MLflow run.")
    add_arguments(p, TrainConfig)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from qgdist.train.config import resolve

    from qgdist.data.shards.manifest import read_manifest

    cfg = from_args(TrainConfig, args)
    try:
        cfg = resolve(cfg)
    except ValueError as err:   # e.g. an unknown model name
        raise ConfigError(str(err)) from err
    read_manifest(cfg.data.data)   # a missing or unconverted --data is refused here, before Ray or a run directory
    print(f"training config (resolved):\n{describe(cfg)}", flush=True)
    if cfg.launch.workers == 0:
        from qgdist.train.loop import train as run
    else:
        from qgdist.train.ray_trainer import fit as run
    out = run(cfg)
    print(f"done: {out.run_dir}, epoch {out.epoch} step {out.step} (global step {out.global_step}), "
          f"checkpoint {out.checkpoint}")
    return 0

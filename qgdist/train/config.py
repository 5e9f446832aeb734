"""``TrainConfig``: everything one training run needs, the CLI maps flags onto it.

Recipes (``recipe``) fill the optimiser and schedule:

* ``paper`` (default): AdamW, weight decay 1e-4, the ParticleNet paper's one-cycle schedule -- learning rate
  3e-4 -> 3e-3 over the first 40% of steps, back to 3e-4 over the next 40%, then down to 5e-7
  (``torch.optim.lr_scheduler.OneCycleLR`` with ``three_phase=True`` is exactly this).
* ``seed``: what the seed notebooks did -- CNN: SGD lr 0.01 momentum 0.6, constant; GNN: Adam lr 1e-3, x0.1 after
  epoch 10 (the notebook's second step never fired).
* ``custom``: take ``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``schedule`` as given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

#: Fields that shape the training trajectory: a checkpoint written under other values cannot be resumed exactly.
TRAJECTORY_FIELDS = ("model", "model_kwargs", "epochs", "batch_size", "recipe", "optimizer", "lr", "weight_decay",
                     "momentum", "schedule", "grad_clip", "precision", "seed", "shuffle_buffer", "preset",
                     "max_particles", "loader_workers", "world_size")


@dataclass
class TrainConfig:
    """One training run (``batch_size`` is per rank; the global batch is ``batch_size * world_size``)."""

    data: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    run_dir: str = "runs/qgdist"
    run_name: str = "qgdist"
    epochs: int = 20
    batch_size: int = 256
    recipe: str = "paper"             # paper | seed | custom
    optimizer: str = "adamw"          # adamw | adam | sgd (custom recipe)
    lr: float = 3e-3                  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "onecycle"        # onecycle | step | constant
    grad_clip: float | None = 1.0
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    loader_workers: int = 0           # DataLoader worker processes per rank
    shuffle_buffer: int = 2000
    preset: str = "kin"
    max_particles: int = 128
    world_size: int = 1               # set by the Ray trainer; part of the fingerprint (shard plan depends on it)
    checkpoint_every: int = 0         # steps between mid-epoch checkpoints (0: epoch ends only)
    keep_last: int = 2
    max_steps: int | None = None      # stop after this many global steps (tests, benchmarks)
    eval_every_epoch: bool = True
    log_every: int = 20
    track: bool = True
    tracking_uri: str | None = None
    resume_from: str | None = None    # a checkpoint directory to start from instead of the run's latest
    allow_config_change: bool = False # resume even when the checkpoint's fingerprint differs
    progress: bool = True

    def __post_init__(self) -> None:
        if self.recipe not in ("paper", "seed", "custom"):
            raise ValueError(f"unknown recipe {self.recipe!r}; choose paper, seed or custom")
        if self.recipe == "paper":
            self.optimizer, self.lr, self.weight_decay, self.schedule = "adamw", 3e-3, 1e-4, "onecycle"
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adamw, adam or sgd")
        if self.schedule not in ("onecycle", "step", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose onecycle, step or constant")

    def apply_seed_recipe(self, model_kind: str) -> None:
        """Fill the seed notebooks' optimiser for ``model_kind`` ("image" | "cloud") when ``recipe == "seed"``."""
        if self.recipe != "seed":
            return
        if model_kind == "image":
            self.optimizer, self.lr, self.momentum, self.weight_decay, self.schedule = "sgd", 0.01, 0.6, 0.0, "constant"
        else:
            self.optimizer, self.lr, self.weight_decay, self.schedule = "adam", 1e-3, 0.0, "step"

    def fingerprint(self) -> dict[str, Any]:
        """The trajectory-shaping fields (see ``TRAJECTORY_FIELDS``) with a short hash under ``"hash"``."""
        # A JSON round trip makes tuples and lists (CLI JSON vs Python defaults) compare equal.
        fields = json.loads(json.dumps({k: getattr(self, k) for k in TRAJECTORY_FIELDS}, default=str))
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {**fields, "hash": digest}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

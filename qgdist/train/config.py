"""``TrainConfig``: everything one training run needs, in sections; the single source of ``qgdist train``'s flags.

Each field below is one flag (``qgdist.core.config`` builds the parser from these dataclasses), so adding a
training setting is one edit: a field with its default and help text in the right section.

A config is frozen. ``resolve`` turns what the user gave into the config that runs, before anything fingerprints
it: the recipe's optimiser settings fill only the fields the user left unset (an explicit ``--lr`` always wins),
``precision="auto"`` becomes the precision of the device the run will use, and local paths become absolute (Ray
Train workers run in another working directory).

Recipes (``recipe``):

* ``paper`` (default): AdamW, weight decay 1e-4, the ParticleNet paper's one-cycle schedule -- learning rate
  3e-4 -> 3e-3 over the first 40% of steps, back to 3e-4 over the next 40%, then down to 5e-7
  (``torch.optim.lr_scheduler.OneCycleLR`` with ``three_phase=True`` is exactly this).
* ``seed``: what the seed notebooks did -- CNN: SGD lr 0.01 momentum 0.6, constant; GNN: Adam lr 1e-3, x0.1 after
  epoch 10 (the notebook's second step never fired).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from qgdist.core.config import build, option, to_dict, to_flat_dict
from qgdist.core.device import resolve_precision
from qgdist.core.run import Run
from qgdist.core.storage import absolute
from qgdist.core.tracking import resolve_tracking_uri
from qgdist.data.config import DataConfig

Recipe = Literal["paper", "seed"]
Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["onecycle", "step", "constant"]

#: Optimiser settings of each recipe, by model kind ("image" | "cloud").
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {kind: {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "momentum": 0.9,
                     "schedule": "onecycle"} for kind in ("image", "cloud")},
    "seed": {"image": {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.6, "schedule": "constant"},
             "cloud": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "schedule": "step"}},
}


@dataclass(frozen=True)
class ModelConfig:
    """Which network."""

    model: str = option(help="model name: particlenet-lite, particlenet, resnet15, seed-cnn, ... (qgdist.models)")
    model_kwargs: dict[str, Any] = option({}, "extra model setting", flag="--model-arg")


@dataclass(frozen=True)
class OptimConfig:
    """How long and how the weights move; unset optimiser fields come from the recipe."""

    epochs: int = option(20, "passes over the training split", min=1)
    max_steps: int | None = option(None, "stop after this many global steps (tests, benchmarks)", min=1)
    recipe: Recipe = option("paper", "paper: AdamW + one-cycle; seed: the seed notebooks' optimiser")
    optimizer: Optimizer | None = option(None, "optimiser (default: the recipe's)")
    lr: float | None = option(None, "(peak) learning rate (default: the recipe's)", gt=0)
    weight_decay: float | None = option(None, "weight decay (default: the recipe's)", min=0)
    momentum: float | None = option(None, "SGD momentum (default: the recipe's)", min=0, max=1)
    schedule: Schedule | None = option(None, "learning-rate schedule (default: the recipe's)")
    grad_clip: float = option(1.0, "max gradient norm (0: off)", min=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast precision; auto: bf16 on GPU workers, fp32 on CPU")
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(0, "seed of weights, shuffling and dropout", min=0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the run lives and how it checkpoints and resumes."""

    run_name: str = option("qgdist", "run name: the run directory is STORAGE/RUN_NAME; re-running it resumes")
    storage: str = option("runs", "directory or fsspec URL (s3://...) holding run directories; every worker must see it")
    checkpoint_every: int = option(200, "steps between mid-epoch checkpoints (0: epoch ends only)", min=0)
    keep_last: int = option(2, "checkpoints kept besides the best one", min=1)
    resume_from: str | None = option(None, "checkpoint directory to start from instead of the run's latest")
    allow_config_change: bool = option(False, "resume although the checkpoint was written with another config")


@dataclass(frozen=True)
class TrackingConfig:
    """What the run reports, and where."""

    track: bool = option(True, "track the run with MLflow")
    tracking_uri: str | None = option(None, "MLflow server (default: $MLFLOW_TRACKING_URI, else the run's local store)")
    log_every: int = option(20, "steps between train-loss logs", min=1)
    progress: bool = option(True, "progress bar")
    verbose: bool = option(False, "show Ray's own log lines on the terminal (they always go to the run's log file)")


def parse_workers(text: str) -> int | tuple[int, int]:
    """``"2"`` -> 2; ``"1-4"`` -> (1, 4): an elastic range."""
    low, sep, high = text.strip().partition("-")
    try:
        return (int(low), int(high)) if sep and low else int(text)   # "-3": a number, refused by its range
    except ValueError:
        raise ValueError(f"want a number of workers N or a range MIN-MAX, got {text!r}") from None


@dataclass(frozen=True)
class LaunchConfig:
    """Where the workers run."""

    workers: int = option(2, "Ray Train workers (0: the plain loop in this process, no Ray); MIN-MAX: elastic, "
                             "the run goes on with as few as MIN when workers are lost and grows back to MAX",
                          parse=parse_workers, metavar="N|MIN-MAX", min=0)
    min_workers: int | None = option(None, "elastic runs: the fewest workers (set by --workers MIN-MAX)", cli=False)
    resize_check_s: float = option(60.0, "elastic runs: seconds between Ray's checks for room to grow", gt=0)
    gpu: bool = option(False, "one GPU per worker (nccl)")
    cpus_per_worker: float = option(1.0, "CPUs Ray reserves per worker", gt=0)
    max_failures: int = option(2, "worker-group restarts Ray may do (-1: no limit)", min=-1)
    worker_resources: dict[str, float] = option(
        {}, "extra Ray resource each worker needs, e.g. a node-type label (one worker per node)",
        flag="--worker-resource", metavar="NAME=AMOUNT", min=0)
    address: str | None = option(None, "Ray cluster address (default: $RAY_ADDRESS or a private local Ray)")

    def __post_init__(self) -> None:
        if isinstance(self.workers, tuple):   # --workers MIN-MAX
            low, high = self.workers
            object.__setattr__(self, "workers", high)
            object.__setattr__(self, "min_workers", low)
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ValueError(f"workers: an elastic range needs 1 <= MIN <= MAX, got {self.min_workers}-{self.workers}")
        if self.min_workers == self.workers:
            object.__setattr__(self, "min_workers", None)

    @property
    def workers_spec(self) -> str:
        """``"2"``, or ``"1-4"`` for an elastic run: the worker count as ``--workers`` takes it."""
        return f"{self.min_workers}-{self.workers}" if self.elastic else str(max(1, self.workers))

    @property
    def elastic(self) -> bool:
        """True when the worker group may shrink (to ``min_workers``) and grow back (to ``workers``)."""
        return self.min_workers is not None


#: Fields that shape the training trajectory: a checkpoint written under other values cannot be resumed exactly.
TRAJECTORY_FIELDS = ("model", "model_kwargs", "epochs", "batch_size", "recipe", "optimizer", "lr", "weight_decay",
                     "momentum", "schedule", "grad_clip", "precision", "seed", "shuffle_buffer", "preset",
                     "max_particles", "loader_workers", "world_size")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (``batch_size`` is per worker; the global batch is ``batch_size * world_size``)."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()

    @classmethod
    def of(cls, **flat: Any) -> TrainConfig:
        """Build from flat settings, as flags name them: ``TrainConfig.of(data="shards", model="resnet15", lr=1e-3)``."""
        return build(cls, flat, where="TrainConfig.of")

    @property
    def run(self) -> Run:
        """The run directory ``storage/run_name``: where checkpoints, artifacts and the local MLflow store go."""
        return Run.at(self.checkpoint.storage, self.checkpoint.run_name)

    @property
    def run_dir(self) -> str:
        """``storage/run_name`` as text (``str(cfg.run)``)."""
        return str(self.run)

    @property
    def world_size(self) -> int:
        """Training processes: the Ray Train workers (the most, for an elastic run), or 1 for the plain loop."""
        return max(1, self.launch.workers)

    def allows_world_size(self, world: int) -> bool:
        """Whether ``world`` processes may run this config (any size in the elastic range, else exactly one)."""
        low = self.launch.min_workers if self.launch.elastic else self.world_size
        return low <= world <= self.world_size  # type: ignore[operator]

    @property
    def resolved(self) -> bool:
        """True once ``resolve`` has filled every recipe field and the precision."""
        o = self.optim
        return None not in (o.optimizer, o.lr, o.weight_decay, o.momentum, o.schedule) and o.precision != "auto"

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with fields changed by flat name (``cfg.replace(lr=1e-3, run_name="x")``)."""
        sections = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            mine = {k: v for k, v in flat.items() if k in {g.name for g in dataclasses.fields(section)}}
            sections[f.name] = dataclasses.replace(section, **mine) if mine else section
        unknown = set(flat) - {g.name for s in sections.values() for g in dataclasses.fields(s)}
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return TrainConfig(**sections)

    def fingerprint(self) -> dict[str, Any]:
        """The trajectory-shaping fields (see ``TRAJECTORY_FIELDS``) with a short hash under ``"hash"``."""
        if not self.resolved:
            raise ValueError("fingerprint of an unresolved config: call resolve() first")
        flat = to_flat_dict(self) | {"model": self.model.model, "world_size": self.world_size}
        # A JSON round trip makes tuples and lists (CLI JSON vs Python defaults) compare equal.
        fields = json.loads(json.dumps({k: flat[k] for k in TRAJECTORY_FIELDS}, default=str))
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {**fields, "hash": digest}

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data: what travels to Ray workers and into MLflow and checkpoints."""
        return to_dict(self)


def resolve(cfg: TrainConfig, model_kind: str | None = None, cuda_available: bool | None = None) -> TrainConfig:
    """The config that runs: recipe defaults under explicit values, concrete precision, absolute local paths.

    ``model_kind`` ("image" | "cloud") picks the seed recipe's optimiser (default: looked up in the model
    registry); ``cuda_available`` decides ``precision="auto"`` for the plain loop (default: asks torch).
    Resolving a resolved config changes nothing.
    """
    o = cfg.optim
    if model_kind is None:
        from qgdist.models import model_kind as lookup  # noqa: PLC0415 -- the registry imports torch

        model_kind = lookup(cfg.model.model)
    recipe = RECIPES[o.recipe][model_kind]
    filled = {k: v if getattr(o, k) is None else getattr(o, k) for k, v in recipe.items()}
    precision = o.precision
    if precision == "auto":
        if cfg.launch.workers == 0 and not cfg.launch.gpu and cuda_available is None:
            import torch  # noqa: PLC0415

            cuda_available = torch.cuda.is_available()
        precision = resolve_precision(precision, cfg.launch.gpu or (cfg.launch.workers == 0 and bool(cuda_available)))
    c = cfg.checkpoint
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, data=absolute(cfg.data.data)),
        optim=dataclasses.replace(o, precision=precision, **filled),
        checkpoint=dataclasses.replace(c, storage=absolute(c.storage), resume_from=absolute(c.resume_from)),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri)))

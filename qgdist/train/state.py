"""Where a training run stands (``TrainState``), and what it hands back when it ends (``TrainResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from qgdist.train.config import OptimConfig


@dataclass
class TrainState:
    """The run's progress: position, metrics so far, the MLflow run it reports to. Checkpointed and restored."""

    epoch: int = 0
    step: int = 0                       # steps done in ``epoch``
    global_step: int = 0
    history: dict[str, list[list[float]]] = field(default_factory=dict)   # metric -> [[global_step, value], ...]
    val: dict[str, float] = field(default_factory=dict)                   # the last epoch-end validation metrics
    roc: tuple[torch.Tensor, torch.Tensor] | None = None                  # its ROC (fpr, tpr), for the artifacts
    mlflow_run_id: str | None = None
    started_unix: float | None = None   # when the first step of this process ended (bench train's start-up)
    evaluated: bool = False             # an epoch ended in this process
    epoch_seconds: float = 0.0          # how long the last epoch's training steps took here

    def record(self, metric: str, value: float) -> None:
        """Add ``value`` at the current global step to ``metric``'s history."""
        self.history.setdefault(metric, []).append([self.global_step, value])

    def stopped(self, o: OptimConfig) -> bool:
        """True once every epoch ran, or ``max_steps`` is reached."""
        return self.epoch >= o.epochs or (o.max_steps is not None and self.global_step >= o.max_steps)

    @property
    def jets_per_s(self) -> float:
        """The last steady-state training throughput measured (global jets/s), NaN before an epoch ended."""
        return self.history.get("train/jets_per_s", [[0, math.nan]])[-1][1]


@dataclass(frozen=True)
class TrainResult:
    """What ``train()`` (the plain loop) and ``fit()`` (Ray Train) both return."""

    run_dir: str
    checkpoint: str | None              # the latest complete checkpoint
    epoch: int
    step: int
    global_step: int
    val: dict[str, float]               # the last validation metrics
    history: dict[str, list[list[float]]]
    mlflow_run_id: str | None
    started_unix: float | None = None   # when the first training step ended (NaN/None when unknown)

    @classmethod
    def of(cls, run_dir: str, checkpoint: str | None, state: Any) -> TrainResult:
        """From a ``TrainState`` or a ``Checkpoint`` (its ``metrics`` are the validation metrics)."""
        val = state.val if isinstance(state, TrainState) else state.metrics
        return cls(run_dir=run_dir, checkpoint=checkpoint, epoch=state.epoch, step=state.step,
                   global_step=state.global_step, val=dict(val), history=dict(state.history),
                   mlflow_run_id=state.mlflow_run_id or None, started_unix=getattr(state, "started_unix", None))

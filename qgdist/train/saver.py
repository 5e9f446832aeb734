"""Taking a checkpoint of the running training: every rank's part gathered, rank 0 writes, Ray is told.

What differs between ranks (RNG states, loader positions, BatchNorm statistics) is gathered with collectives, so
every rank calls ``save`` at the same step; rank 0 composes the ``Checkpoint`` and commits it through the
``Checkpointer``. Under Ray Train every rank then reports to Ray (``report`` is a barrier there) at epoch ends and
at the run's last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from upath import UPath

from qgdist.core.secrets import redact_config
from qgdist.data.identity import TrainedOn
from qgdist.models import model_config
from qgdist.track.tracker import Tracker
from qgdist.train import parallel
from qgdist.train.build import TrainingData
from qgdist.train.checkpoint import Checkpoint, TrainingState, rng_state
from qgdist.train.checkpointer import Checkpointer
from qgdist.train.config import TrainConfig
from qgdist.train.optim import Optimisation
from qgdist.train.parallel import Placement
from qgdist.train.state import TrainState

#: Longest wait, at each checkpoint, for queued metrics to reach a reachable tracker (see Tracker.sync).
TRACKER_SYNC_S = 10.0
#: ``report(metrics, checkpoint directory or None)``: what the Ray Train worker loop passes to ``ray.train.report``.
Report = Callable[[dict[str, float], "UPath | None"], None]


@dataclass
class Saver:
    """Everything a checkpoint is taken from."""

    cfg: TrainConfig
    place: Placement
    model: torch.nn.Module           # the bare model (not the DDP wrapper)
    optim: Optimisation
    data: TrainingData
    state: TrainState
    checkpointer: Checkpointer
    tracker: Tracker
    report: Report | None = None
    last: UPath | None = None        # the latest checkpoint this process wrote
    trained_on: TrainedOn | None = field(init=False)

    def __post_init__(self) -> None:
        # Which jets the model trains and validates on: recorded in every checkpoint (and model.pt)
        self.trained_on = TrainedOn.of_manifest(self.data.train.manifest, self.cfg.data.data)

    def model_checkpoint(self, training: TrainingState | None = None) -> Checkpoint:
        """The model as it is now, with ``training`` state if given (else what ``model.pt`` holds)."""
        s = self.state
        return Checkpoint(
            model_name=self.cfg.model.model, model_config=model_config(self.model),
            weights=self.model.state_dict(), preprocessing=self.data.preprocessing,
            config=redact_config(self.cfg.to_dict()),   # the run uses the real URIs; what is kept masks them
            fingerprint=self.cfg.fingerprint(), epoch=s.epoch, step=s.step, global_step=s.global_step,
            metrics=dict(s.val), history=s.history, mlflow_run_id=s.mlflow_run_id or "", training=training,
            dataset=self.trained_on.to_dict() if self.trained_on else None)

    def save(self, epoch_end: bool = False, last: bool = False) -> UPath | None:
        """Checkpoint the run at its current step (every rank calls this); returns the directory on rank 0.

        Ray is told at epoch ends (it keeps a copy of those checkpoints) and at a run's ``last`` checkpoint, not
        at the others: each ``ray.train.report`` waits until Ray Train's controller has taken the one before, at
        its next poll of the workers (every 2 s by Ray's default), so frequent mid-epoch reports held every rank up
        to a poll's time each."""
        rngs = parallel.gather(rng_state())                  # collectives: every rank takes part
        positions = parallel.gather(self.data.train.state_dict())
        buffers = parallel.gather(parallel.buffers_state(self.model))
        path = None
        if self.place.rank == 0:
            self.tracker.sync(TRACKER_SYNC_S)
            if self.tracker.run_id and self.tracker.run_id != self.state.mlflow_run_id:
                # the MLflow run was created late (the tracker was away at start): checkpoints name it from now on
                self.state.mlflow_run_id = self.tracker.run_id
                self.cfg.run.write_run_id(self.tracker.run_id)
            o = self.optim.state_dict()
            training = TrainingState(optimizer=o["optimizer"], scheduler=o["scheduler"], scaler=o["scaler"],
                                     schedule_steps=o["schedule_steps"], rng=rngs, loader=positions, buffers=buffers)
            auc = self.state.val.get("auc") if epoch_end else None
            path = self.last = self.checkpointer.save(self.model_checkpoint(training), auc=auc)
        if self.report is not None and (epoch_end or last):
            s = self.state
            self.report({"epoch": s.epoch, "step": s.step, "global_step": s.global_step, "jets_per_s": s.jets_per_s,
                         "started_unix": s.started_unix or float("nan"), **(s.val if epoch_end else {})}, path)
        return path

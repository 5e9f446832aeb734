"""Resuming: a checkpoint's states put back into a freshly built run, and one line saying what happened."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qgdist.train.build import TrainingData
from qgdist.train.checkpoint import Checkpoint, check_dataset, check_fingerprint, set_rng_state
from qgdist.train.config import TrainConfig
from qgdist.train.optim import Optimisation
from qgdist.train.parallel import Placement
from qgdist.train.state import TrainState


def resume(checkpoint: Checkpoint, source: str, cfg: TrainConfig, model: torch.nn.Module, optim: Optimisation,
           data: TrainingData, place: Placement, say: Callable[[str], None]) -> TrainState:
    """Load ``checkpoint`` (read from ``source``) into ``model`` and ``optim``, restore this rank's RNG states, and
    return where training stands. A changed training config is refused unless ``--allow-config-change``."""
    training = checkpoint.training
    if training is None:
        raise ValueError(f"{source}: a model without training state (model.pt) cannot be resumed")
    say(f"resumed from {source} at epoch {checkpoint.epoch} step {checkpoint.step} "
        f"(global step {checkpoint.global_step})")
    changed = check_fingerprint(checkpoint.fingerprint, cfg.fingerprint(), source,
                                cfg.checkpoint.allow_config_change)
    moved = check_dataset(checkpoint, data.train.manifest, cfg.data.data, source, cfg.checkpoint.allow_config_change)
    if moved:
        say(moved)
    model.load_state_dict(checkpoint.weights)
    schedule_at = data.schedule_at
    if schedule_at is not None:
        say(f"world size {training.world_size} -> {place.world} at epoch {checkpoint.epoch} step {checkpoint.step}: "
            f"the epoch's undrawn jets re-dealt over {place.world} rank(s), "
            f"{data.steps[checkpoint.epoch] - checkpoint.step} steps left in it; the schedule goes on from "
            f"{schedule_at}/{data.schedule_steps}")
    elif changed:  # the schedule may have another length now: follow the new one from the same step
        say("config changed since the checkpoint (allowed):\n  " + "\n  ".join(changed))
        schedule_at = checkpoint.global_step
    optim.load_state_dict({"optimizer": training.optimizer, "scheduler": training.scheduler,
                           "scaler": training.scaler}, schedule_at=schedule_at)
    rngs = training.rng
    set_rng_state(rngs[place.rank] if place.rank < len(rngs) else rngs[0])
    return TrainState(epoch=checkpoint.epoch, step=checkpoint.step, global_step=checkpoint.global_step,
                      history=checkpoint.history, val=dict(checkpoint.metrics),
                      mlflow_run_id=checkpoint.mlflow_run_id or None)


def own_buffers(checkpoint: Checkpoint | None, world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's BatchNorm statistics from ``checkpoint`` when it ran with the same world size; after a resize
    (or on a fresh start) none: every rank keeps rank 0's, as DDP broadcasts them."""
    if checkpoint is None or checkpoint.training is None or checkpoint.training.world_size != world:
        return []
    return checkpoint.training.buffers

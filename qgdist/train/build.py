"""Building a run's parts: its data (loaders and step counts), its model, and its tracker.

Each is built the same way for a fresh run and a resumed one; what a resume changes (the preprocessing comes from
the checkpoint, an elastic run continues its epoch under another world size) is decided from the checkpoint here,
and the states are put back by ``qgdist.train.resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qgdist.core.config import to_flat_dict
from qgdist.core.errors import ConfigError
from qgdist.data.epoch_plan import Layout
from qgdist.data.loader import ShardLoader
from qgdist.data.preprocessing import Preprocessing
from qgdist.track.tracker import Tracker
from qgdist.train.checkpoint import Checkpoint
from qgdist.train.config import TrainConfig
from qgdist.train.elastic import continue_after_resize
from qgdist.train.parallel import Placement
from qgdist.train.state import TrainState


@dataclass
class TrainingData:
    """This rank's training and validation loaders, and the run's step counts."""

    train: ShardLoader
    val: ShardLoader
    steps: list[int]                 # training steps of each epoch, for this world size
    earlier: tuple[Layout, ...]      # the layouts that ran the resumed epoch's first steps (elastic runs)
    schedule_at: int | None          # where the learning-rate schedule goes on after a resize (None: as saved)
    schedule_steps: int              # the learning-rate schedule's length

    @property
    def preprocessing(self) -> Preprocessing:
        return self.train.preprocessing

    @classmethod
    def build(cls, cfg: TrainConfig, place: Placement, resumed: Checkpoint | None) -> TrainingData:
        """The loaders of ``cfg.data`` for this rank. The preprocessing (normalisation statistics, preset) comes
        from the training data's manifest on a fresh start and from the checkpoint on a resume: the model keeps
        the inputs it was trained on."""
        from qgdist.models import extra_inputs  # noqa: PLC0415 -- the registry imports torch-geometric

        def loader(split: str, training: bool, pre: Preprocessing | None) -> ShardLoader:
            return ShardLoader(cfg.data, split, training=training, rank=place.rank, world_size=place.world,
                               seed=cfg.optim.seed, device=str(place.device), preprocessing=pre,
                               vectors="vectors" in extra_inputs(cfg.model.model))

        train = loader("train", True, resumed.preprocessing if resumed is not None else None)
        val = loader("val", False, train.preprocessing)
        steps = [train.steps_in_epoch(e) for e in range(cfg.optim.epochs)]
        if resumed is None:
            return cls(train, val, steps, (), None, sum(steps))
        # An elastic run resumed with another world size: the epoch in progress continues with the jets its
        # earlier layouts left, and the schedule keeps the fraction of it done (qgdist.train.elastic).
        earlier, schedule_at, total = continue_after_resize(resumed, train, steps, place.world)
        return cls(train, val, steps, earlier, schedule_at, total)


def build_model(cfg: TrainConfig, data: TrainingData, device: torch.device) -> torch.nn.Module:
    """``cfg``'s network for ``data``'s kind (cloud models take the preset's feature count), on ``device``."""
    from qgdist.models import get_model  # noqa: PLC0415 -- the registry imports torch-geometric; only needed here

    kwargs = dict(cfg.model.model_kwargs)
    if data.train.kind == "cloud":
        kwargs.setdefault("in_features", data.train.in_features)
    model = get_model(cfg.model.model, **kwargs)
    if model.kind != data.train.kind:
        raise ConfigError(f"model: {cfg.model.model!r} takes {model.kind} inputs but {cfg.data.data} holds "
                          f"{data.train.kind}s", field="model", expected=data.train.kind, got=model.kind)
    return model.to(device)


def start_tracker(cfg: TrainConfig, place: Placement, state: TrainState, fresh: bool,
                  say: Callable[[str], None]) -> Tracker:
    """The run's MLflow tracker (active on rank 0 only), continuing the run's MLflow run when there is one.

    The MLflow run id is also kept beside the checkpoints, so a run killed before its first checkpoint (``fresh``:
    nothing was resumed) continues the same MLflow run too. Sets ``state.mlflow_run_id``.
    """
    run, t = cfg.run, cfg.tracking
    active = t.track and place.rank == 0
    run_id = state.mlflow_run_id or (run.read_run_id() if fresh else None)
    if active and t.tracking_uri is None and not run.is_local:
        say(f"note: run directory {run} is not a local path, so the embedded MLflow store lives in "
            f"{run.mlflow_store} on this machine; give --tracking-uri to keep runs centrally")
    tracker = Tracker(run.scratch, t.tracking_uri, enabled=active)
    # An elastic run's world size is a metric (one point per start or resize), not a parameter: params are fixed.
    params = to_flat_dict(cfg) | ({} if cfg.launch.elastic else {"world_size": place.world})
    state.mlflow_run_id = tracker.start(cfg.checkpoint.run_name, params, run_id=run_id)
    if cfg.launch.elastic:
        tracker.log_metrics({"cluster/world_size": place.world}, state.global_step)
    if state.mlflow_run_id and place.rank == 0:
        run.write_run_id(state.mlflow_run_id)
    return tracker

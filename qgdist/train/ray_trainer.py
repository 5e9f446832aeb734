"""Ray Train (V2) around the plain loop: DDP over ``num_workers`` Ray workers, gloo on CPU, nccl on GPU.

Every worker runs ``qgdist.train.loop.train`` unchanged; Ray provides the process group and the device. The run
lives in ``<storage>/<run_name>``: Ray's own files, our checkpoints (``checkpoints/``, with the atomic
``latest.json`` pointer) and the embedded MLflow store (``mlflow/``). Because of that pointer, three kinds of
restart all continue mid-epoch from the latest complete checkpoint:

* a worker dies: ``FailureConfig(max_failures)`` makes Ray restart the worker group, and ``train`` finds the pointer;
* the driver dies: re-running with the same ``run_name`` and ``storage`` builds a new trainer with the same
  ``RunConfig`` (Ray 2.60 has no ``TorchTrainer.restore``) and ``train`` again finds the pointer; if only Ray's
  own checkpoint exists, ``ray.train.get_checkpoint()`` provides it;
* ``resume_from``: a checkpoint directory given explicitly.

Elastic runs (``--workers MIN-MAX``, Ray Train V2's ``ScalingConfig(num_workers=(min, max))``): when workers are
lost Ray restarts the group with as many as the cluster has room for (at least MIN), and every
``--resize-check-s`` it checks whether there is room to grow back to MAX; either way the workers start again from
the latest checkpoint, and ``train`` continues the epoch with the new world size (``qgdist.train.elastic``).

What the user sees: rank 0's lines and bar, relayed to the driver (``qgdist.train.console``), and one plain line
for each node lost or joined and each restart, wait or resize of the worker group (``qgdist.train.events``, fed by
a callback in Ray Train's controller and by a watch on the node table); those lines are also added to the MLflow
run as tags ``qgdist.event.NNN`` when the run ends.

``storage`` must be a filesystem every worker sees: local disk on one machine, NFS / a PVC on a cluster, or an
fsspec URL such as ``s3://bucket/runs`` (see ``qgdist.core.storage``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qgdist.core.config import build
from qgdist.core.errors import QgdistError
from qgdist.train.config import TrainConfig
from qgdist.train.state import TrainResult

if TYPE_CHECKING:
    from upath import UPath


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker function: rebuild the driver's resolved config, train, and report to Ray at every
    checkpoint (all ranks)."""
    import ray.train
    import ray.train.torch

    from qgdist.core.storage import is_local
    from qgdist.train.console import Console
    from qgdist.train.loop import train

    cfg = build(TrainConfig, config["train"], where="the driver's config")
    ray_ckpt = ray.train.get_checkpoint()
    if cfg.checkpoint.resume_from is None and ray_ckpt is not None and not _has_intact_checkpoint(cfg):
        cfg = cfg.replace(resume_from=ray_ckpt.to_directory())  # our pointer is gone but Ray kept one: use it

    def report(metrics: dict[str, float], path: UPath | None) -> None:
        # Ray keeps a copy of epoch-end checkpoints only (mid-epoch ones are ours alone, to save copying); on
        # URL storage ours are already where Ray would copy them.
        checkpoint = None
        if path is not None and metrics.get("step") == 0 and is_local(path):
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint,
                         checkpoint_dir_name=path.name if checkpoint else None)

    console = Console(enabled=ray.train.get_context().get_world_rank() == 0, mailbox=config.get("console"))
    train(cfg, device=ray.train.torch.get_device(), report=report, console=console)


def _pointer(checkpointer: Any) -> dict | None:
    """The latest pointer's summary, None when there is none or it is unreadable (the events only say less)."""
    from qgdist.train.checkpointer import DamagedCheckpoint

    try:
        return checkpointer.pointer()
    except DamagedCheckpoint:
        return None


def _has_intact_checkpoint(cfg: TrainConfig) -> bool:
    from qgdist.train.checkpointer import Checkpointer, DamagedCheckpoint

    try:
        return Checkpointer(cfg.run).resume_point().checkpoint is not None
    except DamagedCheckpoint:
        return False


def fit(cfg: TrainConfig, worker_fn: Callable[[dict[str, Any]], None] = worker_loop) -> TrainResult:
    """Train the resolved ``cfg`` with ``cfg.launch.workers`` Ray Train workers; returns where the run ended, as
    the plain loop does."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from qgdist.core.ray import ensure_ray
    from qgdist.core.nodes import NodeWatch
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.train.checkpoint import check_dataset, check_fingerprint
    from qgdist.train.checkpointer import Checkpointer, load_checkpoint
    from qgdist.train.console import Relay
    from qgdist.train.controller_events import ControllerEvents
    from qgdist.train.events import Narrator

    launch, c = cfg.launch, cfg.checkpoint
    if launch.workers < 1:
        raise ValueError("fit() runs Ray Train workers: launch.workers must be at least 1 (0 is the plain loop)")
    # Refuse an incompatible resume here, in the driver, with a clear message (not from inside a worker).
    checkpointer = Checkpointer(cfg.run)
    point = checkpointer.resume_point(c.resume_from)   # rank 0 says which damaged ones it skips
    if point.checkpoint is not None:
        check_fingerprint(point.checkpoint.fingerprint, cfg.fingerprint(), str(point.path), c.allow_config_change)
        check_dataset(point.checkpoint, read_manifest(cfg.data.data), cfg.data.data, str(point.path),
                      c.allow_config_change)
    ensure_ray(launch.address, num_cpus=None, log_dir=cfg.run.log_dir, verbose=cfg.tracking.verbose)
    resources = {"CPU": launch.cpus_per_worker} | ({"GPU": 1} if launch.gpu else {}) | launch.worker_resources
    relay = Relay()
    # Node losses and restarts, one plain line each on this terminal (qgdist.train.events).
    narrator = Narrator(min_workers=launch.min_workers or launch.workers, max_workers=launch.workers,
                        per_worker=resources, max_failures=launch.max_failures, batch_size=cfg.data.batch_size,
                        say=relay.say, position=relay.position, stopped=relay.close_bar,
                        checkpoint=lambda: _pointer(checkpointer))
    relay.on_other = narrator.on_message
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"train": cfg.to_dict(), "console": relay.mailbox},
        torch_config=TorchConfig(backend="nccl" if launch.gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(launch.min_workers, launch.workers) if launch.elastic else launch.workers,
            use_gpu=launch.gpu, resources_per_worker=resources,
            elastic_resize_monitor_interval_s=launch.resize_check_s),
        run_config=ray.train.RunConfig(
            name=c.run_name, storage_path=c.storage,
            failure_config=ray.train.FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, c.keep_last)),
            callbacks=[ControllerEvents(relay.mailbox)]),
    )
    with relay, NodeWatch(on_lost=narrator.on_node_lost, on_joined=narrator.on_node_joined):
        try:
            result = trainer.fit()
        except ray.train.WorkerGroupError as err:
            # A worker refused the user's data or settings (a damaged shard, say): that one line, as the plain
            # loop gives it, not Ray's wrapper with every rank's traceback.
            user = _user_error(err)
            if user is None:
                raise
            raise user.with_traceback(None) from None
        finally:
            _record(cfg, narrator, relay)
    latest = checkpointer.latest()
    if latest is None:
        raise RuntimeError(f"{cfg.run}: Ray Train finished without a checkpoint")
    started = (result.metrics or {}).get("started_unix")
    return dataclasses.replace(TrainResult.of(str(cfg.run), str(latest), load_checkpoint(latest)),
                               started_unix=started)


def _user_error(err: BaseException) -> QgdistError | None:
    """The first ``QgdistError`` (lowest rank) behind Ray Train's ``WorkerGroupError``, or None."""
    for rank in sorted(getattr(err, "worker_failures", {}) or {}):
        failure: BaseException | None = err.worker_failures[rank]
        while failure is not None:
            cause = getattr(failure, "cause", None)   # a RayTaskError holds the worker's own exception
            if isinstance(cause, QgdistError):
                return cause
            if isinstance(failure, QgdistError) and cause is None:
                return failure
            failure = cause if isinstance(cause, BaseException) else failure.__cause__
    return None


def _record(cfg: TrainConfig, narrator: Any, relay: Any) -> None:
    """The run's cluster events into its MLflow run (tags), where rank 0's tracker wrote it."""
    from qgdist.core.run import local_store_uri
    from qgdist.train.events import record_events

    t, run = cfg.tracking, cfg.run
    if not (t.track and narrator.events):
        return
    run_id = run.read_run_id()   # written by rank 0 when it starts tracking
    # Without a tracking server the store is rank 0's local one: the driver sees it only on a local run dir.
    uri = t.tracking_uri or (local_store_uri(run.mlflow_store) if run.is_local else None)
    problem = record_events(narrator.events, run_id, uri)
    if problem:
        relay.say(f"note: the run's {len(narrator.events)} cluster events could not be added to MLflow ({problem})")

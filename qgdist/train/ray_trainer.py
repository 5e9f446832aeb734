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

``storage`` must be a filesystem every worker sees: local disk on one machine, NFS / a PVC on a cluster, or an
fsspec URL such as ``s3://bucket/runs`` (see ``qgdist.train.storage``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qgdist.train.config import TrainConfig

if TYPE_CHECKING:
    from upath import UPath


def worker_loop(config: dict[str, Any]) -> None:
    """The per-worker function: rebuild the config, train, and report to Ray at every checkpoint (all ranks)."""
    import ray.train
    import ray.train.torch

    from qgdist.train.checkpoint import Checkpointer
    from qgdist.train.loop import train
    from qgdist.train.storage import is_local

    cfg = TrainConfig(**config["train"])
    ray_ckpt = ray.train.get_checkpoint()
    if cfg.resume_from is None and Checkpointer(cfg.run_dir).latest() is None and ray_ckpt is not None:
        cfg.resume_from = ray_ckpt.to_directory()  # our pointer is gone but Ray kept one: use it

    def report(metrics: dict[str, float], path: UPath | None) -> None:
        # Ray keeps a copy of epoch-end checkpoints only (mid-epoch ones are ours alone, to save copying); on
        # URL storage ours are already where Ray would copy them.
        checkpoint = None
        if path is not None and metrics.get("step") == 0 and is_local(path):
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint,
                         checkpoint_dir_name=path.name if checkpoint else None)

    train(cfg, device=ray.train.torch.get_device(), report=report)


def fit(cfg: TrainConfig, storage: str, num_workers: int = 2, use_gpu: bool = False,
        cpus_per_worker: float = 1.0, max_failures: int = 0, address: str | None = None,
        worker_fn: Callable[[dict[str, Any]], None] = worker_loop) -> dict[str, Any]:
    """Train ``cfg`` with ``num_workers`` Ray Train workers; returns the final metrics and the run directory."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from qgdist.ray_runtime import ensure_ray
    from qgdist.train.checkpoint import STATE_FILE, Checkpointer, check_fingerprint, load_checkpoint
    from qgdist.train.storage import run_path

    storage = storage if "://" in storage else os.path.abspath(storage)
    cfg.run_dir = os.path.join(storage, cfg.run_name)
    cfg.world_size = num_workers
    # Refuse an incompatible resume here, in the driver, with a clear message (not from inside a worker).
    source = cfg.resume_from or Checkpointer(cfg.run_dir).latest()
    if source is not None and (run_path(source) / STATE_FILE).exists():
        check_fingerprint(load_checkpoint(source)["fingerprint"], cfg.fingerprint(), str(source),
                          cfg.allow_config_change)
    ensure_ray(address, num_cpus=None)
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"train": dataclasses.asdict(cfg)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.keep_last))),
    )
    result = trainer.fit()
    latest = Checkpointer(cfg.run_dir).latest()
    return {"metrics": dict(result.metrics or {}), "run_dir": cfg.run_dir,
            "checkpoint": str(latest) if latest else None}

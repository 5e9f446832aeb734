"""Ray Train DDP on a real local Ray (2 one-CPU workers, gloo), and a worker killed mid-epoch.

The uninterrupted cloud run here is also the reference that the worker-killed run must match bit for bit. The
image family's 2-worker DDP run is in tests/test_train_quickstart.py (quickstart trains both families).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from qgdist.train.checkpoint import Checkpointer, load_checkpoint
from qgdist.train.config import TrainConfig
from qgdist.train.ray_trainer import fit, worker_loop
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow

TINY = {"particlenet-lite": {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.1]]},
        "resnet15": {"fmaps": [4, 8], "nblocks": 1}}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from qgdist.ray_runtime import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship _dying_worker by value
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raydata")
    return {"cloud": write_dataset(str(root / "cloud"), "cloud", {"train": [32] * 4, "val": [16, 16]}, seed=7)}


def ray_cfg(data_dir: str, model: str, **kw) -> TrainConfig:
    base = dict(model_kwargs=TINY[model], epochs=2, batch_size=8, shuffle_buffer=16, track=False, progress=False,
                checkpoint_every=2, run_name=f"{model}-ref")
    return TrainConfig(data_dir, model, **(base | kw))


def final_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(Checkpointer(run_dir).latest())["model"]


@pytest.fixture(scope="module")
def reference(ray_local, data, tmp_path_factory):
    """An uninterrupted 2-worker run of the cloud model."""
    storage = tmp_path_factory.mktemp("ref")
    out = fit(ray_cfg(data["cloud"], "particlenet-lite"), str(storage), num_workers=2)
    return out


def test_ddp_trains_cloud_model(reference):
    latest = Checkpointer(reference["run_dir"]).pointer()
    assert latest["epoch"] == 2 and latest["step"] == 0
    assert reference["metrics"]["epoch"] == 2 and 0 <= reference["metrics"]["auc"] <= 1
    state = load_checkpoint(reference["checkpoint"])
    assert state["fingerprint"]["world_size"] == 2
    assert [p["rank"] for p in state["loader"]] == [0, 1]       # every rank's loader position is kept
    assert len(state["rng"]) == 2
    # 128 train jets, 2 ranks x batch 8: 8 steps per epoch on each rank.
    assert latest["global_step"] == 16


def _dying_worker(config: dict) -> None:
    """Rank 1 kills its own process (SIGKILL) in the middle of epoch 0, once; then the normal worker loop."""
    import ray.train

    import qgdist.train.loop as loop

    marker = Path(config["train"]["run_dir"]) / "killed-once"
    if ray.train.get_context().get_world_rank() == 1 and not marker.exists():
        real_step, calls = loop.train_step, [0]

        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 6:  # after the checkpoint at global step 4, before step 6 finishes
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(*args, **kwargs)

        loop.train_step = step
    worker_loop(config)


def test_worker_killed_mid_epoch_recovers_bit_identically(reference, data, tmp_path):
    cfg = ray_cfg(data["cloud"], "particlenet-lite", run_name="killed")
    out = fit(cfg, str(tmp_path), num_workers=2, max_failures=1, worker_fn=_dying_worker)
    assert (Path(out["run_dir"]) / "killed-once").exists()
    assert Checkpointer(out["run_dir"]).pointer()["global_step"] == 16
    a, b = final_weights(reference["run_dir"]), final_weights(out["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Ray Train DDP on a real local Ray (2 one-CPU workers, gloo), and a worker killed mid-epoch.

The uninterrupted cloud run here is also the reference that the worker-killed run must match bit for bit. The
image family's 2-worker DDP run is in tests/pipelines/test_quickstart.py (quickstart trains both families).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from qgdist.train.checkpoint import Checkpointer, load_checkpoint
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.ray_trainer import fit, worker_loop
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow

TINY = {"particlenet-lite": {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.1]]},
        "resnet15": {"fmaps": [4, 8], "nblocks": 1}}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from qgdist.core.ray import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship _dying_worker by value
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raydata")
    return {"cloud": write_dataset(str(root / "cloud"), "cloud", {"train": [32] * 4, "val": [16, 16]}, seed=7)}


def ray_cfg(data_dir: str, model: str, storage, **kw) -> TrainConfig:
    """A resolved 2-worker config (no worker-group restarts unless ``max_failures`` is given)."""
    base = dict(model_kwargs=TINY[model], storage=str(storage), workers=2, max_failures=0, epochs=2, batch_size=8,
                shuffle_buffer=16, track=False, progress=False, checkpoint_every=2, run_name=f"{model}-ref")
    return resolve(TrainConfig.of(data=data_dir, model=model, **(base | kw)))


def final_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(Checkpointer(run_dir).latest())["model"]


@pytest.fixture(scope="module")
def reference(ray_local, data, tmp_path_factory):
    """An uninterrupted 2-worker run of the cloud model."""
    storage = tmp_path_factory.mktemp("ref")
    out = fit(ray_cfg(data["cloud"], "particlenet-lite", storage))
    return out


def test_ddp_trains_cloud_model(reference):
    latest = Checkpointer(reference["run_dir"]).pointer()
    assert latest["epoch"] == 2 and latest["step"] == 0
    # It learned: the synthetic jets separate easily (quarks narrower, fewer particles); chance is 0.5 and the
    # 32 validation jets put a statistical error of about 0.1 on the AUC, so 0.75 is a clear margin.
    assert reference["metrics"]["epoch"] == 2 and reference["metrics"]["auc"] > 0.75
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

    run = config["train"]["checkpoint"]
    marker = Path(run["storage"]) / run["run_name"] / "killed-once"
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
    cfg = ray_cfg(data["cloud"], "particlenet-lite", tmp_path, run_name="killed", max_failures=1)
    out = fit(cfg, worker_fn=_dying_worker)
    assert (Path(out["run_dir"]) / "killed-once").exists()
    assert Checkpointer(out["run_dir"]).pointer()["global_step"] == 16
    a, b = final_weights(reference["run_dir"]), final_weights(out["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_recipe_run_resumes_under_ray(data, ray_local, tmp_path, capfd):
    """The seed recipe is resolved in the driver, before the fingerprint: a stopped run resumes (it was refused
    before, because workers applied the recipe after the driver had fingerprinted the config)."""
    cfg = ray_cfg(data["cloud"], "particlenet-lite", tmp_path, run_name="seed", recipe="seed", epochs=1)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.schedule) == ("adam", 1e-3, "step")
    first = fit(cfg.replace(max_steps=3))
    assert Checkpointer(first["run_dir"]).pointer()["global_step"] == 3
    capfd.readouterr()
    fit(cfg)
    relayed = capfd.readouterr().out
    assert "resumed from" in relayed and "at epoch 0 step 3" in relayed   # rank 0's line reached the driver
    assert "epoch 0: " in relayed and "auc=" in relayed
    state = load_checkpoint(Checkpointer(first["run_dir"]).latest())
    assert state["global_step"] == 8 and state["fingerprint"]["optimizer"] == "adam"
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3)


def test_a_tracker_outage_costs_no_worker_group_restart(ray_local, data, tmp_path):
    """The MLflow server is unreachable from the start and no worker-group restart is allowed: the run trains to
    its end anyway, and every metric waits in the run's spill file for `qgdist tracker --replay`."""
    from qgdist.core.storage import scratch_dir
    from qgdist.track.delivery import read
    from qgdist.track.server import free_port

    cfg = ray_cfg(data["cloud"], "particlenet-lite", tmp_path, run_name="outage", epochs=1, track=True, log_every=1,
                  tracking_uri=f"http://127.0.0.1:{free_port()}", max_failures=0)
    out = fit(cfg)
    assert load_checkpoint(out["checkpoint"])["mlflow_run_id"].startswith("pending-")
    records, skipped = read(scratch_dir(cfg.run_dir))
    assert skipped == 0 and "create" in records[0]
    assert sorted(r["step"] for r in records if r.get("key") == "train/loss") == list(range(1, 9))  # from step 1
    assert any(r.get("key") == "val/auc" for r in records) and records[-1].get("status") == "FINISHED"

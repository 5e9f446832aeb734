"""Elastic training on a real local Ray: ``--workers 1-2`` runs on what the cluster has room for.

A run starts on a Ray with 2 CPUs (2 workers) and stops mid-epoch; resumed on a Ray with 1 CPU it continues with
1 worker: the same MLflow run, the world size recorded at each start, the epoch finished with the jets the two
workers had not drawn (none twice), the learning-rate schedule continued from the same fraction. The node-loss
version (a worker node killed and regained while the run goes on) is in tests/cluster/test_multinode.py.
"""

from __future__ import annotations

import os

import pytest

from qgdist.train.checkpointer import Checkpointer, load_checkpoint
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.ray_trainer import fit
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow
TINY = {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.1]]}


def _ray(cpus: int) -> None:
    import ray

    from qgdist.core.ray import ensure_ray

    ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(num_cpus=cpus)


def test_a_run_shrinks_to_the_workers_there_is_room_for(tmp_path):
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [40] * 6, "val": [16, 16]}, seed=3, chunk_jets=4)
    cfg = resolve(TrainConfig.of(
        data=data, model="particlenet-lite", model_kwargs=TINY, workers="1-2", epochs=2, batch_size=8,
        shuffle_buffer=16, checkpoint_every=3, max_failures=0, storage=str(tmp_path / "runs"), run_name="elastic",
        progress=False, max_steps=6))
    try:
        _ray(2)
        fit(cfg)                                          # 2 workers, 6 steps, stops mid-epoch 0
        first = load_checkpoint(Checkpointer(cfg.run_dir).latest())
        assert first.training.loader[0]["world_size"] == 2 and (first.epoch, first.step) == (0, 6)

        _ray(1)
        fit(cfg.replace(max_steps=None))                 # room for 1 worker: the run goes on with 1
    finally:
        import ray

        ray.shutdown()

    state = load_checkpoint(Checkpointer(cfg.run_dir).latest())
    assert state.epoch == 2 and state.training.loader[0]["world_size"] == 1
    # Epoch 0 after the resize: 240 jets, 2 x 6 x 8 = 96 drawn by 2 ranks, 144 left for 1 rank: 18 more steps.
    val_steps = [s for s, _ in state.history["val/auc"]]
    assert val_steps[0] == 6 + 144 // 8, val_steps        # epoch 0 ended after exactly the jets left
    assert val_steps[1] == val_steps[0] + 240 // 8         # epoch 1 planned for 1 rank from the start
    assert state.training.schedule_steps == state.training.scheduler["total_steps"]
    assert state.training.scheduler["last_epoch"] == state.training.schedule_steps   # the schedule ran out exactly at the end

    client = MlflowClient(tracking_uri=local_store_uri(cfg.run_dir))
    runs = client.search_runs([client.get_experiment_by_name("qgdist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"                      # continued, not duplicated
    sizes = [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "cluster/world_size")]
    assert sorted(sizes) == [(0, 2.0), (6, 1.0)]
    assert "world_size" not in runs[0].data.params

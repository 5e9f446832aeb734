"""Ray Train DDP on a real local Ray (2 one-CPU workers, gloo): DDP's correctness, and a worker killed mid-epoch,
twice.

The uninterrupted cloud run here (plain SGD, ``tests.train.ddpkit.DDP_OPTIM``) is recorded by a probe on every
rank and replayed in this process: both ranks must end with identical weights, equal to one process on the same
global batches, and the comparison must fail on a broken DDP (tests/train/ddpkit.py says how). It is also the
reference that the twice-killed run (the same training, its tracker unreachable) must match bit for bit. The image
family's 2-worker DDP run is in tests/pipelines/test_quickstart.py (quickstart trains both families); the seed
recipe's resume in tests/train/test_s3.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from qgdist.train.checkpointer import Checkpointer, load_checkpoint
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.ray_trainer import fit, worker_loop
from tests.train import ddpkit
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow

TINY = {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.0]]}   # no dropout: no random masks to replay


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from qgdist.core.ray import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(num_cpus=2)
    # ship this file's and ddpkit's worker functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(ddpkit)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raydata")
    return {"cloud": write_dataset(str(root / "cloud"), "cloud", {"train": [32] * 4, "val": [16, 16]}, seed=7)}


def ray_cfg(data_dir: str, storage, **kw) -> TrainConfig:
    """A resolved 2-worker config of the tiny cloud model under plain SGD (no worker-group restarts unless
    ``max_failures`` is given)."""
    base = dict(model_kwargs=TINY, storage=str(storage), workers=2, max_failures=0, epochs=2, batch_size=8,
                shuffle_buffer=16, track=False, progress=False, checkpoint_every=2, run_name="ref", **ddpkit.DDP_OPTIM)
    return resolve(TrainConfig.of(data=data_dir, model="particlenet-lite", **(base | kw)))


def final_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(Checkpointer(run_dir).latest()).weights


@pytest.fixture(scope="module")
def reference(ray_local, data, tmp_path_factory):
    """An uninterrupted 2-worker run of the cloud model, each rank recorded by ``ddpkit.probe``."""
    cfg = ray_cfg(data["cloud"], tmp_path_factory.mktemp("ref"))
    out = fit(cfg, worker_fn=ddpkit.probe)
    return {"cfg": cfg, "out": out, "ranks": ddpkit.probed(cfg)}


def test_ddp_trains_cloud_model(reference):
    out = reference["out"]
    latest = Checkpointer(out.run_dir).pointer()
    assert latest["epoch"] == 2 and latest["step"] == 0
    # It learned: the synthetic jets separate easily (quarks narrower, fewer particles); chance is 0.5 and the
    # 32 validation jets put a statistical error of about 0.1 on the AUC, so 0.75 is a clear margin.
    assert out.epoch == 2 and out.val["auc"] > 0.75
    state = load_checkpoint(out.checkpoint)
    assert state.fingerprint["world_size"] == 2
    assert [p["rank"] for p in state.training.loader] == [0, 1]       # every rank's loader position is kept
    assert len(state.training.rng) == 2
    # 128 train jets, 2 ranks x batch 8: 8 steps per epoch on each rank.
    assert latest["global_step"] == 16


def test_two_ranks_match_one_process_on_the_same_global_batches(reference):
    cfg, ranks = reference["cfg"], reference["ranks"]
    r0, r1 = ranks
    assert len(r0["batches"]) == len(r1["batches"]) == 16      # both epochs, across the checkpoints between
    # Not vacuous: the ranks trained on different jets, and the weights moved well beyond the tolerance.
    assert not torch.equal(r0["batches"][0][0]["features"][:1], r1["batches"][0][0]["features"][:1])
    moved = max((r0["final"][k] - r0["initial"][k]).abs().max().item() for k in r0["final"])
    assert moved > 1e3 * ddpkit.ATOL
    replay = ddpkit.single_process(cfg, ranks)
    off = max((replay[k] - r0["final"][k]).abs().max().item() for k in replay)
    print(f"DDP vs single process: max |diff| {off:.2e}; weights moved up to {moved:.2e}")
    assert ddpkit.mismatches(cfg, ranks) == []
    # The checkpoint fit() wrote holds exactly these weights.
    saved = final_weights(cfg.run_dir)
    assert all(torch.equal(saved[k], v) for k, v in r0["final"].items())


def test_the_comparison_fails_without_ddp(reference):
    problems = ddpkit.mismatches(reference["cfg"], ddpkit.broken(reference["cfg"], reference["ranks"], "no-ddp"))
    print("no-ddp:", problems[:2])
    assert any(p.startswith("ranks differ") for p in problems), problems


def test_the_comparison_fails_when_gradients_are_summed_not_averaged(reference):
    problems = ddpkit.mismatches(reference["cfg"], ddpkit.broken(reference["cfg"], reference["ranks"], "summed"))
    print("summed:", problems[:2])
    assert problems and not any(p.startswith("ranks differ") for p in problems), problems
    assert any(p.startswith("single process differs") for p in problems)


def test_a_private_rays_run_starts_no_preemption_watcher(reference):
    """On one machine nothing drains a node: the private Ray's processes run Ray Train without its preemption
    watcher, and with its controller's faster polls (qgdist.core.ray.PRIVATE_RAY_ENV); this process's
    environment is left as it was."""
    import ray
    from ray.util.state import list_actors

    from qgdist.core.ray import PRIVATE_RAY_ENV

    address = ray.get_runtime_context().gcs_address
    classes = {a.class_name for a in list_actors(address=address, limit=1000)}   # the run's, finished included
    assert "TrainController" in classes and "PreemptionWatcher" not in classes, classes
    seen = ray.get(ray.remote(num_cpus=0)(lambda: {k: os.environ.get(k) for k in PRIVATE_RAY_ENV}).remote())
    assert seen == PRIVATE_RAY_ENV
    assert not set(PRIVATE_RAY_ENV) & set(os.environ)


def _wait_for_rays_copy(run: Path) -> None:
    """Until Ray Train's controller has taken a checkpoint in (it lists it in its snapshot file). It takes each
    report at its next poll of the workers, so a worker dying right after an epoch-end report can leave Ray
    without a copy of that checkpoint: the lost volume this test plants must come once Ray has one."""
    import json

    snapshot, deadline = run / "checkpoint_manager_snapshot.json", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"Ray Train listed no checkpoint in {snapshot} within 120 s")


def _dying_worker(kills: dict[int, bool]):
    """A worker loop in which rank 1 kills its own process (SIGKILL) when the run reaches each global step of
    ``kills``, once each; for a step mapped to True, rank 0 first deletes the run's own checkpoints (a lost
    volume: only Ray's copies of the epoch-end checkpoints are left). Each process notes the global step it
    starts training from (the learning-rate scheduler's step count, restored with the checkpoint: 0 for a run
    started over) in ``started-rankR``: the proof of a resume that does not rest on what the run says of itself."""
    def worker(config: dict) -> None:
        import shutil

        import ray.train

        import qgdist.train.loop as loop

        run = Path(config["train"]["checkpoint"]["storage"]) / config["train"]["checkpoint"]["run_name"]
        rank = ray.train.get_context().get_world_rank()
        real_epoch, real_step, at = loop.train_epoch, loop.train_step, [None]

        def epoch(cfg, model, optim, *args, **kwargs):
            if at[0] is None:
                at[0] = optim.scheduler.last_epoch
                with open(run / f"started-rank{rank}", "a") as f:
                    f.write(f"{at[0]}\n")
            return real_epoch(cfg, model, optim, *args, **kwargs)

        def step(model, inputs, label, optimizer, **kwargs):
            at[0] += 1   # the global step this call trains
            wipe, killed = kills.get(at[0]), run / f"killed-at-{at[0]}"
            if wipe is not None and not killed.exists():
                if rank == 0 and wipe:
                    _wait_for_rays_copy(run)
                    shutil.rmtree(run / "checkpoints")
                    (run / f"wiped-at-{at[0]}").touch()
                elif rank == 1:
                    while wipe and not (run / f"wiped-at-{at[0]}").exists():   # rank 0 wipes first
                        time.sleep(0.01)
                    killed.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_step(model, inputs, label, optimizer, **kwargs)

        loop.train_epoch, loop.train_step = epoch, step
        worker_loop(config)

    return worker


def _resumed_at(printed: str) -> list[tuple[str, int]]:
    """The checkpoint and global step of each "resumed from" line a run printed."""
    lines = [line for line in printed.splitlines() if line.startswith("resumed from")]
    found = [re.fullmatch(r"resumed from (\S+) at epoch \d+ step \d+ \(global step (\d+)\)", line) for line in lines]
    assert all(found), lines
    return [(m[1], int(m[2])) for m in found]


@pytest.fixture(scope="module")
def killed_twice(ray_local, data, tmp_path_factory):
    """One run killed twice (the reference's training, its tracker unreachable throughout): rank 1 dies during
    global step 6 (the latest checkpoint is step 4, every 2 steps), and again during step 11 after rank 0 deleted
    the run's checkpoints (Ray's copy of the epoch-0 end, step 8, is all that is left). What it printed, and where
    each rank's processes started training."""
    from qgdist.track.server import free_port

    cfg = ray_cfg(data["cloud"], tmp_path_factory.mktemp("killed"), run_name="killed",
                  max_failures=2,   # the reference's training, its MLflow server unreachable
                  track=True, log_every=1, tracking_uri=f"http://127.0.0.1:{free_port()}")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = fit(cfg, worker_fn=_dying_worker({6: False, 11: True}))
    starts = [[int(v) for v in (Path(out.run_dir) / f"started-rank{r}").read_text().split()] for r in (0, 1)]
    return {"cfg": cfg, "out": out, "printed": printed.getvalue(), "resumed": _resumed_at(printed.getvalue()),
            "starts": starts}


def test_worker_killed_mid_epoch_resumes_from_its_last_checkpoint(killed_twice):
    cfg, resumed, starts = killed_twice["cfg"], killed_twice["resumed"], killed_twice["starts"]
    assert (Path(killed_twice["out"].run_dir) / "killed-at-6").exists()
    # Resumed, not restarted from scratch: from the checkpoint at step 4, one step redone ...
    where, step = resumed[0]
    assert step == 4 and where.endswith("checkpoints/step-000000004")
    assert 6 - 1 - step <= cfg.checkpoint.checkpoint_every
    # ... and the restarted processes of both ranks started training there (0 had they started over).
    assert [s[:2] for s in starts] == [[0, 4]] * 2


def test_with_its_checkpoints_lost_a_run_resumes_from_rays_copy_bit_identically(killed_twice, reference):
    """Our checkpoints directory is gone (a lost volume) when a worker dies in epoch 1: the restarted workers
    find Ray's copy of the epoch-0 checkpoint (ray.train.get_checkpoint); the run, killed twice, still ends
    bit-identical to an uninterrupted one."""
    out, resumed, starts = killed_twice["out"], killed_twice["resumed"], killed_twice["starts"]
    assert len(resumed) == 2
    where, step = resumed[1]
    assert step == 8 and "/checkpoints/" not in where   # Ray's copy, at the end of epoch 0
    assert starts == [[0, 4, 8]] * 2                     # not 0: not from scratch
    assert Checkpointer(out.run_dir).pointer()["global_step"] == 16
    a, b = final_weights(reference["out"].run_dir), final_weights(out.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_restarted_in_a_tracker_outage_keeps_every_metric(killed_twice):
    """The MLflow server is unreachable from the start: the run trains anyway, and every metric waits in the run's
    spill file for `qgdist tracker --replay`, once each, across both restarts (the steps redone after a restart
    are not spilled twice)."""
    from qgdist.track.delivery import read

    cfg, relayed = killed_twice["cfg"], killed_twice["printed"]
    assert relayed.count("resumed from") == 2                          # rank 0's lines reached the driver
    assert "epoch 0: " in relayed and "auc=" in relayed
    state = load_checkpoint(killed_twice["out"].checkpoint)
    assert state.global_step == 16 and state.mlflow_run_id.startswith("pending-")
    records, skipped = read(cfg.run.scratch)
    assert skipped == 0 and "create" in records[0]
    assert sorted(r["step"] for r in records if r.get("key") == "train/loss") == list(range(1, 17))  # once each
    assert any(r.get("key") == "val/auc" for r in records) and records[-1].get("status") == "FINISHED"


def test_a_damaged_shard_met_by_a_worker_is_the_one_line_the_plain_loop_gives(ray_local, tmp_path):
    """A worker's InputError reaches the caller as itself (naming the shard), not inside Ray's WorkerGroupError."""
    from qgdist.core.errors import InputError
    from qgdist.data.shards.manifest import read_manifest

    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [32] * 4, "val": [16, 16]}, seed=7)
    shard = next(s for s in read_manifest(data).shards if s.name.startswith("train-"))
    with open(Path(data) / shard.name, "r+b") as f:
        f.truncate(shard.bytes // 2)
    with pytest.raises(InputError, match=rf"{shard.name}: truncated") as err:
        fit(ray_cfg(data, tmp_path / "runs", epochs=1, workers=1))   # one worker meets it
    assert type(err.value) is InputError and "Traceback" not in str(err.value), str(err.value)[:2000]

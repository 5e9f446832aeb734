"""The plain training loop (no Ray): both model families, checkpoints, exact resume, --resume-from, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from qgdist.core.errors import IncompatibleCheckpoint
from qgdist.train.checkpointer import Checkpointer, load_checkpoint
from qgdist.core.storage import run_path
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.loop import train
from tests.trainkit import write_dataset

#: Tiny versions of the real models: the loop and the checkpoints are under test here, not the physics.
TINY = {"particlenet-lite": {"conv_params": ((4, (8, 8)),), "fc_params": ((16, 0.1),)},
        "resnet15": {"fmaps": (4, 8), "nblocks": 1}}


@pytest.fixture(scope="module")
def cloud_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("cloud")), "cloud",
                         {"train": [16, 16, 16, 16], "val": [16]}, seed=5)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("image")), "image", {"train": [16, 16, 16], "val": [16]}, seed=6)


def _cfg(data: str, model: str, run_dir, **kw) -> TrainConfig:
    """A resolved plain-loop config whose run directory is ``run_dir`` (a path or URL)."""
    run = run_path(str(run_dir))
    base = dict(model_kwargs=TINY[model], storage=str(run.parent), run_name=run.name, workers=0, epochs=2,
                batch_size=8, shuffle_buffer=16, checkpoint_every=0, track=False, progress=False, log_every=2)
    return resolve(TrainConfig.of(data=data, model=model, **(base | kw)))


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(Checkpointer(run_dir).latest()).weights


@pytest.fixture(scope="module")
def one_epoch(cloud_dir, tmp_path_factory) -> dict:
    """The reference that stopped and resumed runs of one epoch must match bit for bit: one uninterrupted epoch.
    (Checkpoints, their retention and tracking do not change what is trained.)"""
    run_dir = tmp_path_factory.mktemp("one_epoch") / "whole"
    out = train(_cfg(cloud_dir, "particlenet-lite", run_dir, epochs=1, checkpoint_every=2))
    return {"global_step": out.global_step, "weights": _weights(run_dir)}


@pytest.mark.parametrize("model", ["particlenet-lite", "resnet15"])
def test_plain_loop_trains_both_families(model, cloud_dir, image_dir, tmp_path):
    data = cloud_dir if model == "particlenet-lite" else image_dir
    out = train(_cfg(data, model, tmp_path, checkpoint_every=5))
    assert out.epoch == 2 and out.global_step > 0
    assert set(out.val) >= {"loss", "acc", "auc", "rej30", "rej50"}
    history = json.loads((tmp_path / "artifacts" / "metrics.json").read_text())["history"]
    assert history["val/auc"][-1][1] == pytest.approx(out.val["auc"])   # the artifact holds the measured value
    assert [s for s, _ in history["val/auc"]] == [out.global_step // 2, out.global_step]
    for name in ("curves.png", "roc.png", "model.pt", "config.json"):
        assert (tmp_path / "artifacts" / name).stat().st_size > 0
    ckpt = Checkpointer(tmp_path)
    latest = ckpt.pointer()
    assert latest["global_step"] == out.global_step and latest["epoch"] == 2 and latest["step"] == 0
    assert ckpt.best() is not None and ckpt.best().exists()
    # keep_last=2 plus the best one; the state loads with weights_only=True.
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) <= 3
    state = torch.load(ckpt.latest() / "state.pt", weights_only=True)
    assert state["fingerprint"]["hash"] == _cfg(data, model, tmp_path).fingerprint()["hash"]


@pytest.mark.slow   # several whole training runs, 8-13 s
def test_interrupted_and_resumed_run_is_bit_identical(cloud_dir, tmp_path, capsys):
    """Stop mid-epoch (max_steps), re-run the same config: same weights, bit for bit, as never stopping."""
    kw = dict(epochs=2, batch_size=16, loader_workers=2, checkpoint_every=3, track=True)
    whole = train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "whole", **kw))
    steps_per_epoch = whole.global_step // 2
    stop = steps_per_epoch // 2 + 1
    first = train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "cut", max_steps=stop, **kw))
    assert first.global_step == stop and first.epoch == 0
    capsys.readouterr()
    resumed = train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "cut", **kw))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("resumed from") and f"epoch 0 step {stop} (global step {stop})" in printed[0]
    assert resumed.global_step == whole.global_step
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val == whole.val
    # One MLflow run, continued, each train/loss step logged once.
    from mlflow.tracking import MlflowClient

    from qgdist.track.tracker import local_store_uri

    client = MlflowClient(local_store_uri(tmp_path / "cut"))
    assert resumed.mlflow_run_id == first.mlflow_run_id
    run = client.get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "particlenet-lite"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == whole.global_step
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"roc.png", "curves.png", "metrics.json", "model.pt"} <= artifacts


def test_resume_from_path_and_config_refusal(cloud_dir, tmp_path, capsys):
    train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "a", epochs=1))
    first_epoch = Checkpointer(tmp_path / "a").latest()
    # A changed batch size changes the trajectory: refused with the differing field named ...
    with pytest.raises(IncompatibleCheckpoint, match="batch_size: checkpoint 8 != now 4"):
        train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "a", batch_size=4))
    # ... and the same config resumes from an explicit path into a fresh run directory.
    capsys.readouterr()
    out = train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "b", epochs=1, resume_from=str(first_epoch)))
    assert capsys.readouterr().out.startswith(f"resumed from {first_epoch} at epoch 1 step 0")
    assert out.epoch == 1
    more = train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "c", epochs=2, resume_from=str(first_epoch),
                      allow_config_change=True))
    assert more.epoch == 2 and more.global_step > out.global_step


@pytest.mark.slow   # several whole training runs, 8-13 s
@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_run_directory_may_be_a_url(scheme, cloud_dir, one_epoch, tmp_path, capsys, monkeypatch):
    """--storage s3://... works like a path: checkpoints, pointer, run id and artifacts go through fsspec.

    ``file://`` and fsspec's in-memory filesystem stand in for object storage here; both are read back with
    fsspec itself. The run stops mid-epoch, resumes from the URL, and matches an uninterrupted local run.
    """
    import fsspec

    from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint

    monkeypatch.setenv("QGDIST_SCRATCH", str(tmp_path / "scratch"))
    url = (tmp_path / "remote").as_uri() if scheme == "file" else f"memory://qgdist-test/{tmp_path.name}"
    kw = dict(epochs=1, checkpoint_every=2, track=True)
    first = train(_cfg(cloud_dir, "particlenet-lite", url, max_steps=3, **kw))
    capsys.readouterr()
    resumed = train(_cfg(cloud_dir, "particlenet-lite", url, **kw))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("resumed from") and "checkpoints/step-000000003 at epoch 0 step 3" in printed[0]

    fs, root = fsspec.core.url_to_fs(url)
    latest = json.loads(fs.cat(f"{root}/checkpoints/latest.json"))
    assert latest["global_step"] == resumed.global_step and latest["epoch"] == 1
    assert fs.cat(f"{root}/mlflow_run_id").decode() == first.mlflow_run_id == resumed.mlflow_run_id
    names = {p.rsplit("/", 1)[-1] for p in fs.find(root)}
    assert {"model.pt", "metrics.json", "roc.png", "curves.png", "config.json", "state.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]   # every temporary name was moved into place
    with fs.open(f"{root}/checkpoints/{latest['name']}/state.pt", "rb") as f:
        remote = torch.load(f, weights_only=True)["weights"]
    local = one_epoch["weights"]
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)

    # evaluate takes the URL of the run and copies its outputs next to the checkpoints.
    out = evaluate_checkpoint(EvalConfig(checkpoint=url, data=cloud_dir, split="val", progress=False))
    assert out["n_jets"] == 16
    assert json.loads(fs.cat(f"{root}/eval/val/metrics.json"))["auc"] == pytest.approx(out["metrics"]["auc"])
    assert fs.exists(f"{root}/eval/val/scores.parquet")


def test_a_damaged_latest_checkpoint_costs_only_the_steps_since_the_previous_one(cloud_dir, one_epoch, tmp_path,
                                                                                   capsys):
    """A truncated latest state.pt (a disk filling up, a node dying mid-copy): the re-run says so in one line,
    resumes from the previous checkpoint and ends bit-identical to a run that was never interrupted."""
    kw = dict(epochs=1, checkpoint_every=2, keep_last=3)
    train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "cut", max_steps=5, **kw))   # checkpoints at 2, 4, 5
    state = Checkpointer(tmp_path / "cut").latest() / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    resumed = train(_cfg(cloud_dir, "particlenet-lite", tmp_path / "cut", **kw))
    printed = capsys.readouterr().out.splitlines()
    assert "step-000000005/state.pt" in printed[0] and printed[0].endswith("skipped"), printed[:2]
    assert printed[1].startswith("resumed from") and "(global step 4)" in printed[1], printed[:2]
    assert resumed.global_step == one_epoch["global_step"]
    a, b = one_epoch["weights"], _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_trims_the_heap_every_few_batches(tmp_path, monkeypatch):
    """A scoring loop has no backward pass: the freed heap piling up between trims sets its peak, so it trims
    every ``SCORING_TRIM_EVERY`` batches, not every ``TRIM_EVERY`` as training does."""
    from qgdist.core import memory
    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader
    from qgdist.train.loop import evaluate

    class Constant(torch.nn.Module):
        def forward(self, features: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
            return features.sum(dim=(1, 2)) * 0.0

    data = write_dataset(str(tmp_path / "clouds"), "cloud", {"train": [8], "val": [24]})
    trims: list[int] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1))
    metrics, _ = evaluate(Constant(), ShardLoader(DataConfig(data, batch_size=1), "val", training=False), "cpu", None)
    assert metrics["acc"] == 0.5 and len(trims) == 24 // memory.SCORING_TRIM_EVERY == 2


def test_ray_is_told_of_epoch_ends_and_the_last_checkpoint_only(cloud_dir, tmp_path):
    """Each ``ray.train.report`` waits until Ray Train's controller has taken the one before (it looks every
    poll interval), so the loop reports the checkpoints Ray keeps (epoch ends) and the run's last one, not the
    others: a run checkpointing every 2 steps and stopped by ``max_steps`` mid-epoch reports twice."""
    reports: list[tuple[dict, str | None]] = []
    cfg = _cfg(cloud_dir, "particlenet-lite", tmp_path / "run", checkpoint_every=2, max_steps=13)   # 8 per epoch
    train(cfg, report=lambda metrics, path: reports.append((metrics, path and path.name)))
    told = [(m["epoch"], m["step"], m["global_step"], name) for m, name in reports]
    assert told == [(1, 0, 8, "step-000000008"), (1, 5, 13, "step-000000013")], told
    assert "auc" in reports[0][0] and "auc" not in reports[1][0]   # an epoch end's validation goes with it
    assert Checkpointer(tmp_path / "run").pointer()["global_step"] == 13

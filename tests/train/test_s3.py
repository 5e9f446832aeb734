"""Shards and run directories on a real S3 API: moto's server mode on 127.0.0.1, no mocks in qgdist's code path.

The server is a separate process speaking the S3 REST API; qgdist reaches it through s3fs (and Ray Train through
pyarrow) exactly as it would reach AWS or MinIO, configured only by the environment: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` and ``AWS_ENDPOINT_URL`` (honoured by botocore, hence s3fs, and by pyarrow's S3
filesystem, hence Ray Train's storage). What S3 does differently from a disk, and what these tests pin down:

* a prefix exists only once an object under it does: ``qgdist convert --out s3://bucket/new-prefix`` must not list
  or "make" it first;
* there is no rename: a checkpoint is written object by object under its final name and committed by the
  ``latest.json`` pointer written last (``fs.mv`` of a directory copies and deletes every object, and fails on a
  prefix);
* readers follow the pointer only: objects of a save that died before its pointer are never resumed from.

The flow is convert -> train (2 Ray workers, SIGKILLed mid-epoch) -> resume -> evaluate, all on ``s3://``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("s3fs", reason="the s3 extra (pip install 'qgdist[s3]') is not installed")
pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")

from qgdist.train.checkpointer import Checkpointer, load_checkpoint  # noqa: E402
from qgdist.train.config import TrainConfig, resolve  # noqa: E402
from qgdist.train.loop import train  # noqa: E402

pytestmark = pytest.mark.slow

BUCKET = "qgdist-test"
TINY_ARGS = ["--model-arg", "conv_params=[[4,[8,8]]]", "--model-arg", "fc_params=[[16,0.1]]"]
TINY = {"conv_params": ((4, (8, 8)),), "fc_params": ((16, 0.1),)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs, boto and pyarrow at it."""
    import s3fs

    log = tmp_path_factory.mktemp("moto") / "server.log"
    for _ in range(3):  # the free port may be taken between the probe and the bind: try another
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()",
                                   "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        if server.poll() is None:
            break
    else:
        pytest.fail(f"moto server did not start:\n{log.read_text()}")
    env = {"AWS_ACCESS_KEY_ID": "qgdist-test-key", "AWS_SECRET_ACCESS_KEY": "qgdist-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "QGDIST_SCRATCH": str(tmp_path_factory.mktemp("scratch")), "RAY_AUTH_MODE": "disabled"}
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()   # no client made for another endpoint is reused
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory):
    """Toy EnergyFlow jets converted by ``qgdist convert`` (Ray Data tasks) into a prefix that does not exist yet."""
    src = tmp_path_factory.mktemp("src") / "jets.npz"
    qgdist = [sys.executable, "-m", "qgdist"]
    subprocess.run(qgdist + ["generate", "toy", "--format", "energyflow", "--jets", "3000", "--out", str(src)],
                   check=True, capture_output=True)
    url = f"s3://{BUCKET}/shards/new-prefix"
    assert not s3.exists(url)
    done = subprocess.run(qgdist + ["convert", "--source", "energyflow", "--out", url, "--num-cpus", "2",
                                    "--rows-per-task", "1000", "--quiet", str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return url


def test_convert_writes_a_new_prefix_and_never_destroys_a_dataset_on_rerun(s3, shards, tmp_path):
    import numpy as np

    from qgdist.core.errors import InputError
    from qgdist.data.convert import ConvertConfig, convert, verify_output
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.data.sources.errors import BadRowError

    manifest = read_manifest(shards)
    assert manifest.rows == {"in": 3000, "written": 3000, "rejected": 0}
    assert verify_output(shards) == []   # every shard there, sha256 as recorded, none unlisted
    names = {p.rsplit("/", 1)[-1] for p in s3.ls(shards.removeprefix("s3://"), refresh=True)}
    assert names == {"manifest.json"} | {s.name for s in manifest.shards}
    assert len({s.name.split("-")[1] for s in manifest.shards}) == 3   # three Ray tasks wrote their own shards

    # Re-converting into a used prefix: refused without --overwrite; with it, a rerun that fails on a bad row
    # halfway leaves the earlier dataset complete, and one that succeeds leaves only its own shards.
    copy = f"s3://{BUCKET}/shards/copy"
    s3.cp(shards.removeprefix("s3://"), copy.removeprefix("s3://"), recursive=True)
    from qgdist.generate.toy import ToyConfig, run
    npz, bad = tmp_path / "few.npz", tmp_path / "bad.npz"
    run(ToyConfig("energyflow", 300, str(npz), seed=4))
    with np.load(npz) as f:
        X, y = f["X"].copy(), f["y"]
    X[250, 0, 0] = np.nan   # a bad row in the second of two tasks: the first has written its shards by then
    np.savez(bad, X=X, y=y)
    with pytest.raises(InputError, match="already holds a converted dataset"):
        convert(ConvertConfig("energyflow", [str(npz)], copy, executor="local", progress=False))
    with pytest.raises(BadRowError, match="row 250"):
        convert(ConvertConfig("energyflow", [str(bad)], copy, rows_per_task=150, executor="local", progress=False,
                              overwrite=True))
    assert read_manifest(copy).rows == manifest.rows and verify_output(copy) == []
    again = convert(ConvertConfig("energyflow", [str(npz)], copy, rows_per_task=300, executor="local",
                                  progress=False, overwrite=True))
    left = {p.removeprefix(copy.removeprefix("s3://") + "/") for p in s3.find(copy.removeprefix("s3://"))}
    assert left == {"manifest.json"} | {s.name for s in again.shards}   # the old shards and the failed try: gone
    assert verify_output(copy) == [] and again.rows["in"] == 300
    # converting into a prefix never written before works (no directory to make on S3)
    convert(ConvertConfig("energyflow", [str(npz)], f"s3://{BUCKET}/never/written", executor="local",
                          progress=False))


def _cfg(data: str, storage: str, run_name: str, **kw) -> TrainConfig:
    base = dict(model_kwargs=TINY, storage=storage, run_name=run_name, workers=0, epochs=1, batch_size=64,
                shuffle_buffer=64, checkpoint_every=4, keep_last=1, track=False, progress=False)
    return resolve(TrainConfig.of(data=data, model="particlenet-lite", **(base | kw)))


def test_plain_loop_checkpoints_by_pointer_and_resumes_bit_identically(s3, shards, tmp_path, monkeypatch):
    """Stop mid-epoch, resume from s3://, match an uninterrupted local run bit for bit; and the commit protocol:
    no rename, no temporary names, a save that dies before its pointer is never followed."""
    import qgdist.core.storage as storage

    storage_url = f"s3://{BUCKET}/runs"
    run_dir = f"{storage_url}/plain"

    # fs.mv is what failed on S3; it must not even be attempted.
    def no_rename(*args, **kwargs):
        raise AssertionError("a rename was attempted on object storage")

    monkeypatch.setattr(type(s3), "mv", no_rename)
    first = train(_cfg(shards, storage_url, "plain", max_steps=6))
    assert first.global_step == 6 and first.epoch == 0
    ckpt = Checkpointer(run_dir)
    assert ckpt.pointer() | {"val_auc": None} == {"name": "step-000000006", "epoch": 0, "step": 6,
                                                   "global_step": 6, "val_auc": None}
    keys = {p.removeprefix(f"{BUCKET}/runs/plain/") for p in s3.find(f"{BUCKET}/runs/plain")}
    # keep_last=1: step 4 was pruned once step 6 was committed; nothing under a temporary name.
    assert keys == {"checkpoints/latest.json", "checkpoints/step-000000006/state.pt",
                    "checkpoints/step-000000006/checkpoint.json"}

    # A save that dies after writing its state object but before the pointer: the pointer still names step 6,
    # and the orphan is neither resumed from nor kept.
    import dataclasses

    import qgdist.train.checkpointer as checkpoint

    def dies(path, text):
        raise KeyboardInterrupt("killed before the pointer was written")

    state = load_checkpoint(ckpt.latest())
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "write_text", dies)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(dataclasses.replace(state, global_step=7, step=7))
    assert s3.exists(f"{BUCKET}/runs/plain/checkpoints/step-000000007/state.pt")
    assert ckpt.pointer()["name"] == "step-000000006" and ckpt.latest().name == "step-000000006"
    # Pruning counts the last K up to the pointer only: the uncommitted step 7 goes, the committed step 6 stays.
    Checkpointer(run_dir, keep_last=1)._prune()
    assert storage.list_dirs(f"{run_dir}/checkpoints") == ["step-000000006"]
    with monkeypatch.context() as mp:   # and once more, for the resume below to meet an orphan
        mp.setattr(checkpoint, "write_text", dies)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(dataclasses.replace(state, global_step=7, step=7))

    resumed = train(_cfg(shards, storage_url, "plain"))
    assert resumed.epoch == 1 and resumed.global_step > 6
    latest = Checkpointer(run_dir).pointer()
    assert latest["epoch"] == 1 and latest["step"] == 0 and latest["val_auc"] is not None
    dirs = storage.list_dirs(f"{run_dir}/checkpoints")
    assert "step-000000007" not in dirs and latest["name"] in dirs and len(dirs) <= 2   # keep_last 1 + best
    assert not [k for k in s3.find(f"{BUCKET}/runs/plain") if k.endswith(".tmp")]
    with s3.open(f"{BUCKET}/runs/plain/checkpoints/{latest['name']}/state.pt", "rb") as f:
        remote = torch.load(f, weights_only=True)["weights"]

    whole = train(_cfg(shards, str(tmp_path), "whole"))
    assert whole.global_step == resumed.global_step
    local = load_checkpoint(Checkpointer(tmp_path / "whole").latest()).weights
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    # The local run took the rename path: its checkpoint directories exist, no temporary one is left.
    assert not list((tmp_path / "whole" / "checkpoints").glob(".*"))


def _latest(s3, run_dir: str) -> dict | None:
    try:
        return json.loads(s3.cat_file(f"{run_dir.removeprefix('s3://')}/checkpoints/latest.json"))
    except FileNotFoundError:
        return None


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session we started (the driver, its private Ray, the Ray workers) at once, as
    when the machine dies; Ray puts its workers in process groups of their own, so a group kill would miss them."""
    import psutil

    for _ in range(20):
        alive = []
        for pid in psutil.pids():
            try:
                if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} survive SIGKILL")


def test_ray_train_killed_mid_epoch_resumes_and_evaluates_on_s3(s3, shards, tmp_path):
    """``qgdist train --data s3://... --storage s3://...`` with 2 Ray workers, SIGKILLed (driver, Ray and workers)
    after its first mid-epoch checkpoint, then re-run: it resumes from the pointer, finishes and continues the one
    MLflow run (local store in the scratch directory); ``evaluate`` takes the run's URL. The run uses the seed
    recipe, which the driver resolves before it fingerprints the config, so the re-run resumes (a stopped
    seed-recipe run was refused before, because its workers applied the recipe after that). (Until 2026-12-06
    tests/train/test_resume_driver.py ran the same kill and re-run with a ``file://`` run directory; the plain
    loop's ``file://`` run directories are in tests/train/test_loop.py.)"""
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint

    storage_url = f"s3://{BUCKET}/runs"
    run_dir = f"{storage_url}/ray"
    cmd = [sys.executable, "-m", "qgdist", "train", "--data", shards, "--storage", storage_url, "--run-name", "ray",
           "--workers", "2", "--max-failures", "0", "--model", "particlenet-lite", *TINY_ARGS, "--epochs", "1",
           "--recipe", "seed", "--batch-size", "16", "--checkpoint-every", "5", "--log-every", "1", "--no-progress"]
    # ~2400 train jets / (2 ranks x 16) = ~75 steps in its one epoch: the kill comes a few steps after step 5.
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _latest(s3, run_dir) is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert _latest(s3, run_dir) is not None, "no checkpoint within 300 s"
    finally:
        _kill_session(proc.pid)
        proc.wait()
    killed_at = _latest(s3, run_dir)
    assert proc.returncode == -signal.SIGKILL
    assert killed_at["epoch"] == 0 and killed_at["step"] > 0, killed_at   # mid-epoch

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (f"resumed from {run_dir}/checkpoints/{killed_at['name']} at epoch 0 step {killed_at['step']}"
            in done.stdout), done.stdout[-3000:]
    latest = _latest(s3, run_dir)
    assert latest["epoch"] == 1 and latest["step"] == 0 and latest["global_step"] > killed_at["global_step"]
    state = load_checkpoint(Checkpointer(run_dir).latest())
    assert state.fingerprint["world_size"] == 2 and [p["rank"] for p in state.training.loader] == [0, 1]
    assert state.fingerprint["optimizer"] == "adam"                       # the seed recipe's, as resolved
    assert state.training.optimizer["param_groups"][0]["initial_lr"] == pytest.approx(1e-3)
    keys = [k for k in s3.find(f"{BUCKET}/runs/ray") if "/checkpoints/" in k]
    assert not [k for k in keys if ".tmp" in k]
    assert {k.rsplit("/", 1)[-1] for k in s3.find(f"{BUCKET}/runs/ray/artifacts")} >= {"model.pt", "metrics.json"}

    # One MLflow run, continued by the re-run, each train/loss step logged once. sqlite cannot live on object
    # storage: the local store is in the scratch directory ($QGDIST_SCRATCH, set by the s3 fixture).
    from mlflow.tracking import MlflowClient

    from qgdist.core.storage import scratch_dir
    from qgdist.track.tracker import local_store_uri

    assert not s3.exists(f"{BUCKET}/runs/ray/mlflow")
    client = MlflowClient(local_store_uri(scratch_dir(run_dir)))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == list(range(1, latest["global_step"] + 1)), steps

    out = evaluate_checkpoint(EvalConfig(checkpoint=run_dir, data=shards, split="test", progress=False,
                                         device="cpu"))
    assert out["n_jets"] == sum(s.samples for s in read_manifest(shards).shards if s.split == "test")
    metrics = json.loads(s3.cat_file(f"{BUCKET}/runs/ray/eval/test/metrics.json"))
    assert metrics["auc"] == pytest.approx(out["metrics"]["auc"]) and metrics["auc"] > 0.6
    assert s3.exists(f"{BUCKET}/runs/ray/eval/test/scores.parquet")

"""The driver dies mid-epoch (SIGKILL of ``qgdist train`` and its private Ray); the same command resumes mid-epoch.

``--storage`` is given as a ``file://`` URL, so the Ray path through fsspec run directories is the one under test
(Ray gets the URL as its ``storage_path`` too); plain paths are covered by the other Ray tests and the quickstart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow


def _command(data: str, storage: str) -> list[str]:
    return [sys.executable, "-m", "qgdist", "train", "--data", data, "--model", "particlenet-lite",
            "--model-arg", "conv_params=[[4, [8, 8]]]", "--model-arg", "fc_params=[[16, 0.1]]",
            "--workers", "2", "--epochs", "3", "--batch-size", "8", "--shuffle-buffer", "16",
            "--checkpoint-every", "2", "--run-name", "drv", "--storage", storage, "--no-progress", "--log-every", "2"]


def test_driver_killed_mid_epoch_resumes_mid_epoch(tmp_path, monkeypatch):
    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [32] * 4, "val": [16, 16]}, seed=7)
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "QGDIST_SCRATCH": str(tmp_path / "scratch")}
    storage = (tmp_path / "runs").as_uri()
    pointer = tmp_path / "runs" / "drv" / "checkpoints" / "latest.json"
    first = subprocess.Popen(_command(data, storage), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if pointer.exists():
                doc = json.loads(pointer.read_text())
                if doc["step"] > 0:  # a mid-epoch checkpoint is on disk: kill everything at once
                    os.killpg(first.pid, signal.SIGKILL)
                    killed_at = doc
                    break
            time.sleep(0.05)
    finally:
        if first.poll() is None and killed_at is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert killed_at is not None, "the run ended (or timed out) before a mid-epoch checkpoint appeared"

    again = subprocess.run(_command(data, storage), env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = [line for line in (again.stdout + again.stderr).splitlines() if "resumed from" in line]
    assert resumed, again.stdout[-3000:]
    # It continued from a mid-epoch checkpoint at or after the one we saw before the kill.
    words = resumed[0].split("resumed from ", 1)[1].split()
    epoch, step = int(words[words.index("epoch") + 1]), int(words[words.index("step") + 1])
    assert step > 0 and (epoch, step) >= (killed_at["epoch"], killed_at["step"])
    final = json.loads(pointer.read_text())
    assert final["epoch"] == 3 and final["step"] == 0 and final["global_step"] == 24

    # One MLflow run, continued by the re-run, each train/loss step logged once.
    from mlflow.tracking import MlflowClient

    from qgdist.track.tracker import local_store_uri
    from qgdist.core.storage import scratch_dir

    assert not (tmp_path / "runs" / "drv" / "mlflow").exists()   # sqlite cannot live on object storage: scratch
    monkeypatch.setenv("QGDIST_SCRATCH", env["QGDIST_SCRATCH"])
    client = MlflowClient(local_store_uri(scratch_dir(f"{storage}/drv")))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 24

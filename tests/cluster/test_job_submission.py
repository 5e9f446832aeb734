"""``qgdist submit`` / ``qgdist jobs`` against a real ``ray start --head`` on 127.0.0.1, with token auth on.

One private head per module (own temp dir, own ports, 2 CPUs, RAY_AUTH_MODE=token with a random token). It is
stopped by killing only the processes it launched (its process group and their children), never with
``ray stop``, which would kill every Ray on the machine. Jobs run the working tree (runtime_env working_dir = the
repository) with the jobs/*.yaml runtime envs minus their pip list, since the head runs the project's venv.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.cluster.raykit import VENV_BIN, RayNode

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Head(RayNode):
    """A private ``ray start --head`` (2 CPUs) with token authentication on and a random token."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # `python` in a job's entrypoint is looked up on the head's PATH: make it the venv's.
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        super().__init__(num_cpus=2, env=env)

    def stop(self, remove_temp_dir: bool = True) -> None:
        super().stop(remove_temp_dir)


@pytest.fixture(scope="module")
def head():
    if shutil.which("ray", path=str(VENV_BIN)) is None:
        pytest.skip(f"no `ray` executable next to {sys.executable}: install ray[default]")
    cluster = Head()
    try:
        yield cluster
    finally:
        cluster.stop()


def qgdist(head: Head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``qgdist`` console command as a user would, from the repository root, against ``head``."""
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_")}
    env.update(HOME=head.temp_dir, RAY_AUTH_TOKEN=head.token)
    return subprocess.run([sys.executable, "-m", "qgdist", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli(head, capsys, monkeypatch):
    """``qgdist`` in this process (saves an interpreter start per call): returns (exit code, stdout, stderr)."""
    from qgdist.cli import main

    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", head.temp_dir)  # no ~/.ray/auth_token of the machine's user leaks in
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.chdir(REPO)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, "--address", head.address] if args[0] == "jobs" else list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return run


def submitted_id(stderr: str) -> str:
    return stderr.split("submitted ", 1)[1].split()[0]


def test_client_without_token_is_refused_with_a_clear_error(cli, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    code, _, err = cli("jobs", "list")
    assert code == 2 and "RAY_AUTH_TOKEN" in err and "Traceback" not in err, err


def test_convert_then_train_jobs_leave_shards_checkpoint_and_mlflow_run(head, cli, tmp_path):
    import webdataset as wds
    from mlflow import MlflowClient

    from qgdist.generate.toy import ToyConfig, run

    (tmp_path / "raw").mkdir()
    run(ToyConfig(format="energyflow", jets=240, out=str(tmp_path / "raw" / "toy.npz"), seed=5))
    stage = ["--address", head.address, "--no-pip", "--env", f"QGDIST_STORAGE={tmp_path}", "--wait"]

    # Convert through the real console command: `$QGDIST_STORAGE` expands on the cluster from the runtime_env.
    result = qgdist(head, "submit", "convert", "--runtime-env", "jobs/convert.yaml", *stage, "--",
                    "--source", "energyflow", "--out", "${QGDIST_STORAGE}/shards/toy", "--quiet",
                    "${QGDIST_STORAGE}/raw/toy.npz")
    assert result.returncode == 0, result.stdout + result.stderr
    shards = tmp_path / "shards" / "toy"
    chunks = list(wds.WebDataset(sorted(map(str, shards.glob("*.tar"))), shardshuffle=False).decode())
    assert sum(len(c["jets.npy"]) for c in chunks) == 240 and (shards / "manifest.json").is_file()

    # Train (plain loop: Ray Train's ~30 s start-up is covered by the training tests), tracking to the store
    # that the runtime_env's MLFLOW_TRACKING_URI names.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = cli("submit", "train", "--runtime-env", "jobs/train.yaml", *stage, "--env",
                         f"MLFLOW_TRACKING_URI={tracking_uri}", "--", "--tracking-uri", "${MLFLOW_TRACKING_URI}",
                         "--data", "${QGDIST_STORAGE}/shards/toy", "--model",
                         "particlenet-lite", "--workers", "0", "--epochs", "1", "--batch-size", "64",
                         "--run-name", "job-test", "--storage", "${QGDIST_STORAGE}/runs",
                         "--no-progress")
    assert code == 0, out + err
    run_dir = tmp_path / "runs" / "job-test"
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    state = torch.load(run_dir / "checkpoints" / latest["name"] / "state.pt", weights_only=True)
    # A real checkpoint of the run the job trained, loadable without unpickling code.
    assert state["global_step"] == latest["global_step"] > 0 and state["model_name"] == "particlenet-lite"
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags.get("mlflow.runName", r.info.run_name) for r in runs] == ["job-test"]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["model"] == "particlenet-lite"
    assert "val/loss" in runs[0].data.metrics, runs[0].data.metrics

    job_id = submitted_id(err)
    code, out, _ = cli("jobs", "list")
    assert code == 0 and job_id in out and "SUCCEEDED" in out
    code, out, _ = cli("jobs", "status", job_id)
    assert code == 0 and f"{job_id} SUCCEEDED" in out
    code, out, _ = cli("jobs", "logs", job_id, "--tail", "3")
    assert code == 0 and 0 < out.count("\n") <= 3


def test_failing_job_is_reported_failed_with_its_log_tail(head, cli, tmp_path):
    # --no-check lets the bad flag through to the cluster, where qgdist's own parser rejects it.
    result = qgdist(head, "submit", "generate", "--address", head.address, "--wait", "--no-check", "--tail", "5",
                    "--", "toy", "--format", "energyflow", "--jets", "10", "--out", str(tmp_path / "x.npz"),
                    "--no-such-flag")
    assert result.returncode == 1, result.stdout + result.stderr
    tail = result.stderr.split("--- last 5 log lines of ", 1)[1]
    assert "FAILED" in result.stderr and "unrecognized arguments: --no-such-flag" in tail
    code, out, _ = cli("jobs", "status", submitted_id(result.stderr))
    assert code == 1 and "FAILED" in out


def test_bad_arguments_are_rejected_before_anything_is_submitted(cli):
    before = cli("jobs", "list")[1].count("\n")
    # `--env N=1` stays the string "1" (Ray refuses other types), so the arguments are what gets refused.
    code, _, err = cli("submit", "generate", "--env", "N=1", "--", "toy", "--no-such-flag")
    assert code == 2 and "nothing was submitted" in err and "env_vars" not in err, err
    code, _, err = cli("submit", "evaluate", "--", "--data", "shards")   # parses, but --checkpoint is required
    assert code == 2 and "--checkpoint is required" in err and "nothing was submitted" in err, err
    assert cli("jobs", "list")[1].count("\n") == before


def test_stop_ends_a_running_job(head, cli, tmp_path):
    code, out, err = cli("submit", "generate", "--address", head.address, "--", "toy", "--format", "energyflow",
                         "--jets", "20000000", "--out", str(tmp_path / "big.npz"))
    assert code == 0, err
    job_id = out.strip()
    code, out, err = cli("jobs", "stop", job_id, "--wait")
    assert code == 0 and f"{job_id} STOPPED" in out, out + err
    # ... and nothing of it goes on: once, Ray stopped the entrypoint's shell before it had forked qgdist, and the
    # generation ran on, orphaned, for the rest of the CI run (the entrypoint now execs qgdist).
    out_file = str(tmp_path / "big.npz")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (left := [p for p in psutil.process_iter(["cmdline"])
                                                    if out_file in " ".join(p.info["cmdline"] or [])]):
        time.sleep(0.5)
    assert not left, [p.info["cmdline"] for p in left]
    code, _, err = cli("jobs", "status", "no-such-job")
    assert code == 2 and "no-such-job" in err

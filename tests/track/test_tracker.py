"""The tracker against a real MLflow server on 127.0.0.1 and against the local sqlite store.

The server is started once for the module through the ``qgdist tracker`` command itself (stopped with Ctrl-C,
restarted on the same port and store for the outage test). Everything is read back with MLflow's own client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from qgdist.track.server import free_port
from qgdist.track.tracker import UNSENT_FILE, Tracker, flatten_config
from tests.commands import qgdist

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.99)


@dataclass
class Config:
    model: str = "resnet15"
    epochs: int = 2
    optim: Optim = field(default_factory=Optim)


def _ctrl_c_enabled() -> None:
    # A shell script that runs the tests in the background hands every child SIGINT ignored (POSIX), and the
    # ignore survives exec: the command would never see our Ctrl-C. A terminal user's process has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class TrackerCommand:
    """``qgdist tracker`` run as a user would: started in a subprocess, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, store: Path, port: int) -> None:
        self.store, self.port = store, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "TrackerCommand":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qgdist", "tracker", "--store", str(self.store), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_ctrl_c_enabled)
        lines = []
        for line in self.process.stdout:   # the command prints the UI URL once the server answers /health
            lines.append(line)
            if line.startswith("MLflow UI:"):
                assert line.split()[-1] == self.url
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    assert reply.status == 200
                return self
        raise RuntimeError("qgdist tracker exited early:\n" + "".join(lines))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(60) == 130   # the CLI's exit code for Ctrl-C, after stopping the server
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{self.url}/health", timeout=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> TrackerCommand:
    srv = TrackerCommand(tmp_path_factory.mktemp("mlflow-server"), free_port()).start()
    yield srv
    srv.stop()
    assert (srv.store / "mlflow.db").exists() and (srv.store / "artifacts").is_dir()


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_flatten_config_nested_dataclass() -> None:
    assert flatten_config(Config()) == {"model": "resnet15", "epochs": "2", "optim.lr": "0.001",
                                        "optim.betas": "[0.9, 0.99]"}
    assert flatten_config({"model_kwargs": {}, "grad_clip": None}) == {"model_kwargs": "{}", "grad_clip": "None"}


def test_run_on_server_holds_params_metrics_artifacts_and_status(server: TrackerCommand, tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, tracking_uri=server.url)
    run_id = tracker.start("roundtrip", Config())
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.log_metrics({"val/auc": 0.7, "val/rej50": 5.5}, step=5)
    (tmp_path / "metrics.json").write_text(json.dumps({"auc": 0.7}))
    tracker.log_artifact(tmp_path / "metrics.json")
    tracker.finish("FINISHED")

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "roundtrip"
    assert run.data.params == flatten_config(Config())
    assert history(client, run_id, "train/loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert run.data.metrics["val/rej50"] == pytest.approx(5.5)
    local = client.download_artifacts(run_id, "metrics.json", str(tmp_path / "down"))
    assert json.loads(Path(local).read_text()) == {"auc": 0.7}


def test_failed_run_is_marked_failed(server: TrackerCommand, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with Tracker(tmp_path, tracking_uri=server.url) as tracker:
            run_id = tracker.start("boom", {"a": 1})
            raise RuntimeError("training crashed")
    assert MlflowClient(server.url).get_run(run_id).info.status == "FAILED"


def test_resume_continues_same_run_without_duplicated_steps(server: TrackerCommand, tmp_path: Path) -> None:
    first = Tracker(tmp_path, tracking_uri=server.url)
    run_id = first.start("resumed", Config())
    for step in range(1, 8):   # the job logged up to step 7, its last checkpoint was at step 4, then it died
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/auc": 0.6}, step=4)
    assert first.flush(timeout_s=30)   # sent; the "dead" job never calls finish

    second = Tracker(tmp_path, tracking_uri=server.url)
    assert second.start("resumed", Config(), run_id=run_id) == run_id
    for step in range(5, 11):   # replays 5..7 from the checkpoint, then goes on
        second.log_metrics({"train/loss": float(step) + 0.5}, step=step)
        if step == 8:
            second.log_metrics({"val/auc": 0.65}, step=8)
    second.finish()
    assert second.history["train/loss"][0] == list(range(1, 11))   # read back from the run, then extended

    client = MlflowClient(server.url)
    steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert steps == list(range(1, 11))   # each step exactly once
    assert history(client, run_id, "train/loss")[6] == (7, 7.0)   # the first write of a step is kept
    assert [s for s, _ in history(client, run_id, "val/auc")] == [4, 8]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id],
                                  "attributes.run_name = 'resumed'")) == 1


def test_outage_buffers_then_delivers_without_duplicates(server: TrackerCommand, tmp_path: Path) -> None:
    # retry_s: while the server is away the sender waits for a wake-up (flush, sync), never for its timer
    tracker = Tracker(tmp_path / "a", tracking_uri=server.url, flush_s=0.1, retry_s=3600)
    run_id = tracker.start("outage", {"a": 1})
    # A second run whose job ends while the server is down: what it cannot send is spilled to a file.
    ending = Tracker(tmp_path / "b", tracking_uri=server.url, finish_timeout_s=1)
    ending_id = ending.start("ends-in-outage", {"a": 2})
    dying = Tracker(tmp_path / "c", tracking_uri=server.url, finish_timeout_s=1)   # its job dies, then resumes
    dying_id = dying.start("dies-in-outage", {"a": 3})
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert tracker.flush(timeout_s=30)
    server.stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.log_metrics({"train/loss": 2.0}, step=2)   # training goes on: no exception
        ending.log_metrics({"loss": 0.5}, step=3)
        # flush returns once the sender has tried and found the server away (an event, not its 30 s timeout)
        assert not tracker.flush(timeout_s=30) and tracker.outages == 1
        for step in range(3, 6):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        assert tracker.pending == 3
        # A checkpoint's sync while the server is away writes the queue to disk at once: nothing only in memory.
        assert tracker.sync(timeout_s=30) and tracker.pending == 0
        spilled = [json.loads(line) for line in (tmp_path / "a" / UNSENT_FILE).read_text().splitlines()]
        assert [(r["run_id"], r["step"]) for r in spilled] == [(run_id, s) for s in range(2, 6)]
        ending.finish()
        dying.log_metrics({"loss": 0.7}, step=2)
        dying.finish("FAILED")
        server.start()   # same port, same sqlite backend
        tracker.log_metrics({"train/loss": 6.0}, step=6)
        assert tracker.flush(timeout_s=60) and tracker.pending == 0
        assert not (tmp_path / "a" / UNSENT_FILE).exists()   # the spilled steps went first, then the file went
    messages = [str(w.message) for w in caught if "tracker:" in str(w.message)]
    assert tracker.outages == 1   # warned once, not once per step or per retry
    assert sum("reachable again" in m for m in messages) == 1
    assert any("could not be sent" in m for m in messages)
    tracker.finish()
    client = MlflowClient(server.url)
    assert history(client, run_id, "train/loss") == [(s, float(s)) for s in range(1, 7)]
    assert client.get_run(run_id).info.status == "FINISHED"
    rows = [json.loads(line) for line in (tmp_path / "b" / UNSENT_FILE).read_text().splitlines()]
    assert [(r["run_id"], r["key"], r["value"], r["step"]) for r in rows if "key" in r] == [(ending_id, "loss", 0.5, 3)]
    assert [r["status"] for r in rows if "status" in r] == ["FINISHED"]   # the server was down at finish, too
    assert client.get_run(ending_id).info.status == "RUNNING"

    # Once the tracker is back, `qgdist tracker --replay RUN_DIR` delivers the spilled file and removes it.
    replay = ["tracker", "--replay", tmp_path / "b", "--tracking-uri", server.url]
    done = qgdist(*replay, timeout=120)
    assert "replayed 2 records" in done.stdout, done.stdout + done.stderr
    assert history(client, ending_id, "loss") == [(3, 0.5)]
    assert client.get_run(ending_id).info.status == "FINISHED"
    assert not (tmp_path / "b" / UNSENT_FILE).exists()
    assert "nothing to replay" in qgdist(*replay, timeout=120).stdout

    # A run resumed in the same run directory sends what its last attempt spilled before it goes on.
    resumed = Tracker(tmp_path / "c", tracking_uri=server.url)
    assert resumed.start("dies-in-outage", {"a": 3}, run_id=dying_id) == dying_id
    assert resumed.history["loss"] == ([2], [0.7]) and not (tmp_path / "c" / UNSENT_FILE).exists()
    resumed.log_metrics({"loss": 0.6}, step=2)   # the resumed job replays step 2: dropped, not duplicated
    resumed.log_metrics({"loss": 0.5}, step=3)
    resumed.finish()
    assert history(client, dying_id, "loss") == [(2, 0.7), (3, 0.5)]
    assert client.get_run(dying_id).info.status == "FINISHED"


KILLED_AT_START = """
import os, sys
from qgdist.track.tracker import Tracker
tracker = Tracker(sys.argv[1], tracking_uri=sys.argv[2], retry_s=3600)
print(tracker.start("killed", {"lr": 0.1}), flush=True)
for step in range(3):
    tracker.log_metrics({"train/loss": 1.0 + step}, step=step)
assert tracker.sync(timeout_s=60)   # a checkpoint commits: the steps are on disk
os._exit(9)                          # the node is lost: no finish, no flush
"""


def test_a_server_away_at_start_costs_no_metric(tmp_path: Path) -> None:
    """The server is unreachable when runs start: they train on, spill from step 0, and all of it arrives -- by
    the tracker itself once the server is back, by `qgdist tracker --replay` for a run killed meanwhile, and a
    resume from a checkpoint that holds the provisional run id continues the run that was created for it."""
    late = TrackerCommand(tmp_path / "store", free_port())
    live_dir, killed_dir = tmp_path / "live", tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_START, str(killed_dir), late.url], capture_output=True,
                            text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert killed.returncode == 9, killed.stderr
    assert killed.stdout.startswith("pending-") and "unreachable at start" in killed.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(live_dir, tracking_uri=late.url, flush_s=0.1, retry_s=0.2)
        pending = tracker.start("late", Config())
        assert pending.startswith("pending-") and tracker.outages == 1
        for step in range(5):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        assert tracker.sync(timeout_s=30) and not tracker.flush(timeout_s=30)
        late.start()
        try:
            assert tracker.flush(timeout_s=120)   # the tracker created the run and replayed the spill itself
            tracker.log_metrics({"train/loss": 0.1}, step=5)
            tracker.finish()
            client = MlflowClient(late.url)
            real = tracker.run_id
            assert real != pending and json.loads((live_dir / "mlflow_run_ids.json").read_text()) == {pending: real}
            run = client.get_run(real)
            assert run.info.run_name == "late" and run.info.status == "FINISHED"
            assert run.data.params == flatten_config(Config())
            assert [s for s, _ in history(client, real, "train/loss")] == list(range(6))   # from step 0 on
            assert not (live_dir / UNSENT_FILE).exists()
            assert any("unreachable at start" in str(w.message) for w in caught)

            # A checkpoint written during the outage holds the provisional id: resuming it continues the same run.
            resumed = Tracker(live_dir, tracking_uri=late.url)
            assert resumed.start("late", Config(), run_id=pending) == real
            resumed.finish()
            experiment = client.get_experiment_by_name("qgdist").experiment_id
            assert len(client.search_runs([experiment], "attributes.run_name = 'late'")) == 1

            # The run killed during the outage: its create record and three steps wait in its run directory.
            done = qgdist("tracker", "--replay", killed_dir, "--tracking-uri", late.url, timeout=120)
            assert "replayed 4 records" in done.stdout, done.stdout + done.stderr
            created = json.loads((killed_dir / "mlflow_run_ids.json").read_text())[killed.stdout.strip()]
            assert [s for s, _ in history(client, created, "train/loss")] == [0, 1, 2]
            assert client.get_run(created).data.params == {"lr": "0.1"}
        finally:
            late.stop()


def test_a_run_restarted_during_an_outage_spills_each_step_once(tmp_path: Path) -> None:
    """A worker group restarted while the server is away resumes from its checkpoint and redoes the steps since:
    those the run already spilled are not spilled again, as a server's are not sent again online (found by the
    twice-killed Ray Train run of tests/train/test_ray_trainer.py, whose spill held 19 train/loss records for its
    16 steps, step 5 twice)."""
    from qgdist.track.delivery import read

    uri = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "unreachable at start", said twice
        killed = Tracker(tmp_path, tracking_uri=uri, flush_s=0.05, retry_s=3600)
        pending = killed.start("restarted", Config())
        for step in range(1, 7):
            killed.log_metrics({"train/loss": 1.0 / step}, step=step)
        assert killed.sync(timeout_s=30)     # spilled; then the process is gone (no finish)
        restarted = Tracker(tmp_path, tracking_uri=uri, flush_s=0.05, retry_s=3600)
        assert restarted.start("restarted", Config(), run_id=pending) == pending
    for step in range(5, 9):                  # resumed from the checkpoint of step 4: 5 and 6 again
        restarted.log_metrics({"train/loss": 0.5 / step}, step=step)
    assert restarted.sync(timeout_s=30)
    records, _ = read(tmp_path)
    assert sorted(r["step"] for r in records if r.get("key") == "train/loss") == list(range(1, 9))
    assert restarted.history["train/loss"][0] == list(range(1, 9))   # the curves keep the steps before


def test_a_tracker_that_answers_no_at_start_fails_loudly(server: TrackerCommand, tmp_path: Path) -> None:
    """Unreachable is an outage; a server that answers with a refusal (here: no such run to resume) is an error."""
    from mlflow.exceptions import RestException

    with pytest.raises(RestException, match="f" * 32):
        Tracker(tmp_path, tracking_uri=server.url).start("nope", run_id="f" * 32)
    assert not (tmp_path / UNSENT_FILE).exists()


def test_local_store_default_needs_no_server(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path / "run")
    run_id = tracker.start("local", Config())
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    tracker.log_metrics({"train/loss": 0.4}, step=2)   # within flush_s: queued, sent by finish
    (tmp_path / "cfg.json").write_text("{}")
    tracker.log_artifact(tmp_path / "cfg.json", artifact_path="config")
    tracker.finish()
    assert (tmp_path / "run" / "mlflow" / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"
    assert history(client, run_id, "train/loss") == [(1, 0.5), (2, 0.4)]
    assert [f.path for f in client.list_artifacts(run_id, "config")] == ["config/cfg.json"]
    assert (tmp_path / "run" / "mlflow" / "artifacts" / run_id / "artifacts" / "config" / "cfg.json").exists()


def test_sync_sends_the_queue_before_a_checkpoint_commits(tmp_path: Path) -> None:
    """A process killed right after a checkpoint (a node lost) must not take metrics of earlier steps with it."""
    tracker = Tracker(tmp_path / "run", flush_s=3600)   # the timer alone would not send within this test
    run_id = tracker.start("sync", {})
    tracker.log_metrics({"cluster/world_size": 2}, step=0)
    assert tracker.sync(timeout_s=30) and tracker.pending == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")
    assert history(client, run_id, "cluster/world_size") == [(0, 2.0)]   # stored before finish
    tracker.finish()


def test_disabled_tracker_on_other_ranks_does_nothing(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, enabled=False)
    assert tracker.start("rank1", Config()) is None
    tracker.log_metrics({"x": 1.0}, step=1)
    tracker.finish()
    assert not any(tmp_path.iterdir())


def test_artifacts_files_plots_and_model_directory(server: TrackerCommand, tmp_path: Path) -> None:
    from qgdist.train.plots import plot_curves

    checkpoint = tmp_path / "checkpoints" / "step-000000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(b"weights")
    tracker = Tracker(tmp_path, tracking_uri=server.url)
    run_id = tracker.start("artifacts", Config())
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    (tmp_path / "metrics.json").write_text(json.dumps({"auc": 0.6}))
    tracker.log_artifact(tmp_path / "metrics.json")
    tracker.log_artifact(plot_curves(tracker.history, tmp_path / "curves.png"))
    tracker.log_artifact(checkpoint, artifact_path="model")   # a directory
    tracker.finish()
    client = MlflowClient(server.url)
    assert {f.path for f in client.list_artifacts(run_id)} == {"metrics.json", "curves.png", "model"}
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/state.pt"]
    down = Path(client.download_artifacts(run_id, "curves.png", str(tmp_path / "down")))
    assert down.read_bytes()[:4] == b"\x89PNG"
    assert tracker.history["train/loss"] == ([1, 2, 3], [1.0, 0.5, pytest.approx(1 / 3)])


def test_evaluate_track_adds_test_metrics_to_the_training_run(server: TrackerCommand, tmp_path: Path) -> None:
    from tests.trainkit import write_dataset

    from qgdist.cli import main
    from qgdist.data.preprocessing import Preprocessing
    from qgdist.models import get_model, model_config
    from qgdist.train.checkpoint import Checkpoint
    from qgdist.train.checkpointer import Checkpointer
    from qgdist.train.config import TrainConfig, resolve

    data = write_dataset(str(tmp_path / "data"), "cloud", {"train": [16], "test": [24]})
    cfg = resolve(TrainConfig.of(data=data, model="particlenet-lite", storage=str(tmp_path), run_name="run"))
    tracker = Tracker(cfg.run_dir, tracking_uri=server.url)
    run_id = tracker.start("trained", cfg)
    tracker.log_metrics({"val/auc": 0.5}, step=7)
    tracker.finish()
    model = get_model("particlenet-lite", in_features=7)
    Checkpointer(cfg.run_dir).save(Checkpoint(
        model_name="particlenet-lite", model_config=model_config(model), weights=model.state_dict(),
        preprocessing=Preprocessing.from_dict(_preprocessing(data)), config=cfg.to_dict(),
        fingerprint=cfg.fingerprint(), epoch=1, global_step=7, mlflow_run_id=run_id))
    assert main(["evaluate", "--checkpoint", cfg.run_dir, "--data", data, "--no-progress", "--track",
                 "--tracking-uri", server.url]) == 0
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    written = json.loads((Path(cfg.run_dir) / "eval" / "test" / "metrics.json").read_text())
    assert run.info.status == "FINISHED"
    assert history(client, run_id, "test/auc") == [(7, pytest.approx(written["auc"]))]
    assert {f.path for f in client.list_artifacts(run_id, "eval/test")} == {
        "eval/test/metrics.json", "eval/test/roc.png", "eval/test/scores.parquet"}
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'trained'")) == 1


def test_evaluate_track_finds_the_server_run_through_the_environment(server: TrackerCommand, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Train against the server named only by $MLFLOW_TRACKING_URI, then `qgdist evaluate --track` (no
    --tracking-uri): the test metrics land in that same server run, and nothing in the run's local store."""
    import pyarrow.parquet as pq
    import torch
    from tests.trainkit import write_dataset

    from qgdist.cli import main
    from qgdist.train.config import TrainConfig, resolve
    from qgdist.train.loop import train
    from qgdist.train.metrics import compute_metrics

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    data = write_dataset(str(tmp_path / "data"), "cloud", {"train": [16, 16], "val": [16], "test": [24]}, seed=3)
    tiny = {"conv_params": ((4, (8, 8)),), "fc_params": ((16, 0.1),)}
    cfg = resolve(TrainConfig.of(data=data, model="particlenet-lite", model_kwargs=tiny, storage=str(tmp_path),
                                 run_name="env-run", workers=0, epochs=1, max_steps=3, batch_size=8,
                                 shuffle_buffer=16, checkpoint_every=0, log_every=1, track=True, progress=False))
    trained = train(cfg)

    assert main(["evaluate", "--checkpoint", cfg.run_dir, "--data", data, "--no-progress", "--track"]) == 0
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("qgdist")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'env-run'")
    assert len(runs) == 1   # evaluate added to the training run instead of starting one
    run_id = runs[0].info.run_id
    assert [s for s, _ in history(client, run_id, "train/loss")] == [1, 2, 3]   # the run training logged
    # The AUC logged at the checkpoint's step is the one of metrics.json and, recomputed from the per-jet scores
    # that evaluate wrote, the same again.
    written = json.loads((tmp_path / "env-run" / "eval" / "test" / "metrics.json").read_text())
    scores = pq.read_table(tmp_path / "env-run" / "eval" / "test" / "scores.parquet").to_pydict()
    recomputed = compute_metrics(torch.tensor(scores["logit"]), torch.tensor(scores["is_quark"]), logits=True)
    assert written["n_jets"] == 24 and written["global_step"] == trained.global_step == 3
    assert history(client, run_id, "test/auc") == [(3, pytest.approx(written["auc"]))]
    assert history(client, run_id, "test/auc")[0][1] == pytest.approx(recomputed["auc"], rel=1e-5)
    assert {f.path for f in client.list_artifacts(run_id, "eval/test")} == {
        "eval/test/metrics.json", "eval/test/roc.png", "eval/test/scores.parquet"}
    assert not (tmp_path / "env-run" / "mlflow").exists()   # neither command fell back to the local store


def test_credentials_in_uris_never_leave_the_process(server: TrackerCommand, tmp_path: Path, capsys) -> None:
    """A tracking URI (and a Ray address) with a password: the run uses it -- its metrics reach the server -- but
    the password is in nothing printed, tracked or saved: not stdout, the MLflow params or artifacts, the
    checkpoints or artifacts/config.json."""
    from tests.trainkit import write_dataset

    from qgdist.cli import main
    from qgdist.train.checkpointer import Checkpointer, load_checkpoint

    secret = "hunter2secret"
    data = write_dataset(str(tmp_path / "data"), "cloud", {"train": [16, 16], "val": [16]}, seed=3)
    uri = server.url.replace("http://", f"http://qguser:{secret}@")
    assert main(["train", "--data", data, "--model", "particlenet-lite", "--model-arg", "conv_params=[[4,[8,8]]]",
                 "--model-arg", "fc_params=[[16,0.1]]", "--workers", "0", "--epochs", "1", "--batch-size", "8",
                 "--shuffle-buffer", "16", "--log-every", "1", "--no-progress", "--storage", str(tmp_path / "runs"),
                 "--run-name", "secretive", "--tracking-uri", uri,
                 "--address", f"ray://admin:{secret}@head:10001"]) == 0
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err and "qguser:***@" in printed.out
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("qgdist").experiment_id
    run = client.search_runs([experiment], "attributes.run_name = 'secretive'")[0]
    assert history(client, run.info.run_id, "train/loss")                      # the real URI was used
    assert run.data.params["tracking_uri"] == uri.replace(secret, "***")
    assert secret not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    config = Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / "down")))
    assert secret not in config.read_text()
    run_dir = tmp_path / "runs" / "secretive"
    assert secret not in (run_dir / "artifacts" / "config.json").read_text()
    assert secret not in json.dumps(load_checkpoint(Checkpointer(str(run_dir)).latest()).config)
    for path in run_dir.rglob("*"):   # every file the run wrote, checkpoints included, byte for byte
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_a_torn_last_line_is_skipped_and_counted_never_blocking_a_resume(tmp_path: Path) -> None:
    from qgdist.track import delivery

    first = Tracker(tmp_path)
    run_id = first.start("torn", {})
    first.finish()
    good = {"run_id": run_id, "attempt": "x", "key": "loss", "value": 0.5, "timestamp": 1, "step": 1}
    delivery.append(tmp_path, [good])
    with open(tmp_path / UNSENT_FILE, "a") as spill:   # a process killed in the middle of its write
        spill.write(json.dumps({**good, "step": 2})[:25])
    later = {**good, "step": 3, "value": 0.25}
    delivery.append(tmp_path, [later])   # a later append starts a line of its own: the torn one stays alone
    assert delivery.read(tmp_path) == ([good, later], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = Tracker(tmp_path)
        assert resumed.start("torn", {}, run_id=run_id) == run_id   # the resume goes on
    assert any("skipped 1 unreadable line" in str(w.message) for w in caught)
    assert resumed.history["loss"] == ([1, 3], [0.5, 0.25])   # the readable records were delivered
    resumed.finish()
    assert not (tmp_path / UNSENT_FILE).exists()


def test_spill_appends_one_write_per_record_then_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each record is one write() of a whole line (so a crash cuts at most the last line), fsync-ed before the
    caller goes on. The real calls run; the test only counts them."""
    from qgdist.track import delivery

    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(delivery.os, "write", lambda fd, data: calls.append("write") or real_write(fd, data))
    monkeypatch.setattr(delivery.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    records = [{"run_id": "r", "key": "loss", "value": v, "timestamp": 1, "step": i} for i, v in enumerate([1, 2, 3])]
    assert delivery.append(tmp_path, records) == 3
    assert calls == ["write", "write", "write", "fsync"]
    assert delivery.read(tmp_path) == (records, 0)


def _preprocessing(data: str) -> dict:
    """What a training run on ``data`` records in its checkpoints (docs/scoring.md)."""
    from qgdist.data.preprocessing import Preprocessing
    from qgdist.data.shards.manifest import read_manifest

    return Preprocessing.from_manifest(read_manifest(data), data).to_dict()

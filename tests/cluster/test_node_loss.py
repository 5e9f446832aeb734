"""What a user sees when nodes are lost under `qgdist train --workers 1-2` on a cluster of several Ray nodes.

A head (no CPUs, the driver's node) and two worker nodes are started with ``ray start`` on this machine, and
``qgdist train`` runs as a user would run it, its terminal (stdout and stderr, not a TTY) read line by line.
Mid-run, the process of the console relay (the actor that carries rank 0's lines and bar to the driver) is
SIGKILLed, and later a whole worker node (a lost machine, never started again). The run must go on with one
worker and say so in one plain line per event, print its later epoch lines and its final result, and let no raw
Ray line through (no ``(raylet)`` log tail, no colour codes). The events are in its MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.raykit import RayNode, two_node_cluster
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow
HANG_S = 900   # only catches a hang: every wait below is on an event
EVENT = re.compile(r"(node \S+ (lost|joined)|waiting for workers|could not place|restarted with|room for"
                   r"|worker failed)")


class Terminal:
    """A subprocess's merged stdout and stderr, read in a thread; tqdm's carriage returns split lines."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.raw = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self.raw += chunk

    @property
    def text(self) -> str:
        return bytes(self.raw).decode(errors="replace")

    def lines(self) -> list[str]:
        return [line.strip() for line in re.split(r"[\r\n]+", self.text) if line.strip()]

    def finish(self, timeout: float = HANG_S) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        self._thread.join(timeout=10)
        return rc


@pytest.fixture(scope="module")
def cluster():
    yield from two_node_cluster()


def _relay(head: RayNode):
    """The console relay's actor (its ``Mailbox``) as the State API sees it, once alive."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        alive = list_actors(address=head.address, filters=[("class_name", "=", "Mailbox"),
                                                           ("state", "=", "ALIVE")], detail=True)
        if alive:
            assert len(alive) == 1, alive
            return alive[0]
        time.sleep(0.5)
    raise AssertionError("the console relay never came alive")


def _wait_pointer(run_dir: Path, good) -> dict:
    """The latest checkpoint's pointer, once ``good(pointer)``."""
    path = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        try:
            pointer = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pointer = None
        if pointer and good(pointer):
            return pointer
        time.sleep(0.05)
    raise AssertionError(f"no such checkpoint within {HANG_S} s")


def _bar_jets(text: str) -> float:
    """The jets done on the last epoch bar drawn in ``text`` (tqdm's "336/1.46k"), 0 if none."""
    found = re.findall(r"epoch \d:\s+\d+%\|[^|]*\|\s*([\d.]+)(k?)/", text)
    return float(found[-1][0]) * (1000 if found[-1][1] else 1) if found else 0.0


def test_the_relay_lives_on_the_drivers_node(cluster):
    """Left to Ray, a zero-CPU actor goes to any node; each of these relays must be on the driver's."""
    import ray

    from qgdist.train.console import Relay

    here = ray.get_runtime_context().get_node_id()
    relays = [Relay() for _ in range(6)]
    try:
        where = ray.get([r.mailbox.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                         for r in relays])
    finally:
        for relay in relays:
            ray.kill(relay.mailbox)
    assert where == [here] * 6, where


def test_lost_relay_process_and_lost_node_are_told_in_plain_lines(cluster, tmp_path):
    import ray
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [64] * 24, "val": [32, 32]}, seed=11)
    run_dir = tmp_path / "runs" / "lose"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "qgdist", "train", "--data", data, "--model", "particlenet-lite",
           "--model-arg", "conv_params=[[4, [8, 8]]]", "--model-arg", "fc_params=[[16, 0.1]]",
           "--workers", "1-2", "--worker-resource", "qgdist_node=1", "--address", cluster["head"].gcs_address,
           "--epochs", "2", "--batch-size", "16", "--shuffle-buffer", "32", "--checkpoint-every", "5",
           "--max-failures", "3", "--resize-check-s", "600", "--log-every", "5",
           "--run-name", "lose", "--storage", str(tmp_path / "runs")]
    term = Terminal(cmd, env)
    try:
        # 1. The relay lives on the driver's node (the head: `ray.init` from this machine attaches there), and
        #    rank 0's bar goes on reaching the terminal after its process is killed and Ray restarts it.
        before_relay = _wait_pointer(run_dir, lambda p: p["step"] > 0)
        relay = _relay(cluster["head"])
        head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and not n["Resources"].get("qgdist_node"))
        assert relay["node_id"] == head_id
        jets_then = _bar_jets(term.text)
        os.kill(relay["pid"], signal.SIGKILL)
        killed_relay_at = len(term.text)
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline and _bar_jets(term.text[killed_relay_at:]) <= jets_then:
            assert term.proc.poll() is None, term.text[-4000:]
            time.sleep(0.2)

        # 2. A worker node is lost for good, mid-epoch, after a checkpoint written since.
        at_kill = _wait_pointer(run_dir, lambda p: p["step"] > 0 and p["global_step"] > before_relay["global_step"])
        before = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        cluster["nodes"][1].kill()
        rc = term.finish()
    finally:
        if term.proc.poll() is None:
            os.killpg(term.proc.pid, signal.SIGKILL)
    text, lines = term.text, term.lines()
    (tmp_path / "terminal.txt").write_text(text)   # kept by pytest for a look after a failure
    assert rc == 0, text[-4000:]
    dead = [n for i, n in before.items() if i not in {m["NodeID"] for m in ray.nodes() if m["Alive"]}]
    assert len(dead) == 1, dead
    address = f"{dead[0]['NodeManagerAddress']}:{dead[0]['NodeManagerPort']}"

    # One plain line per event, in order: lost, waiting, (Ray Train may first fail to place the old size,)
    # resumed with the one worker left.
    events = [line for line in lines if EVENT.match(line)]
    lost = re.fullmatch(rf"node {re.escape(address)} lost at epoch (\d) step (\d+) \(1 of 2 workers ran there\)",
                        events[0])
    assert lost, events
    assert (int(lost[1]), int(lost[2])) >= (at_kill["epoch"], at_kill["step"]), (events[0], at_kill)  # bar live
    assert events[1] == "waiting for workers: 1 of 2 fit, minimum 1 (restart 1 of 3)", events
    assert all(e.startswith("could not place 2 workers; waiting for workers: 1 of 2 fit, minimum 1")
               for e in events[2:-1]), events
    assert events[-1] == "restarted with 1 of 2 workers", events
    # Rank 0 says where it resumed: a checkpoint at or after the one written before the kill.
    resumed = [re.fullmatch(r"resumed from \S+ at epoch \d step \d+ \(global step (\d+)\)", line)
               for line in lines[lines.index(events[-1]):]]
    resumed = [m for m in resumed if m]
    assert len(resumed) == 1 and int(resumed[0][1]) >= at_kill["global_step"], events
    # Rank 0's lines after the relay's restart and after the loss: epoch lines and the final result.
    assert re.search(r"^epoch 0: loss=", text[killed_relay_at:], re.M), text[killed_relay_at:][-3000:]
    after = lines[lines.index(events[-1]):]
    assert any(line.startswith("world size 2 -> 1 at epoch") for line in after), after
    assert any(line.startswith("epoch 1: loss=") for line in after), after
    assert lines[-1].startswith("done: "), lines[-5:]
    # No raw Ray line: no log tail of the dead raylet, no worker prefixes, no colour codes.
    assert "\x1b[" not in text
    assert not [line for line in lines if re.search(r"\((raylet|pid=|RayTrainWorker|autoscaler)", line)], text
    assert "marked dead" not in text and "raylet.out" not in text

    # MLflow: the events as tags, the world sizes as cluster/world_size.
    client = MlflowClient(tracking_uri=local_store_uri(run_dir))
    run = client.search_runs([client.get_experiment_by_name("qgdist").experiment_id])[0]
    tags = [v for k, v in sorted(run.data.tags.items()) if k.startswith("qgdist.event.")]
    assert [t.split(" ", 1)[1] for t in tags] == events, tags
    sizes = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "cluster/world_size"),
                                     key=lambda m: m.step)]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes
    print("\n" + "\n".join(line for line in lines if not re.match(r"epoch \d:\s+\d+%", line)))

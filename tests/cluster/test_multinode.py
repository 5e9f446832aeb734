"""Several Ray nodes on one machine: a head (no CPUs, the driver's node) and two worker nodes started with
``ray start``, shared by every test here (a cluster took 34-42 s to start in the suite, 2026-12-07).

Each worker node has one logical CPU and a ``qgdist_node`` resource, and training asks for one of those per
worker (``--worker-resource qgdist_node=1``), so Ray Train must place its two workers on the two nodes and
conversion tasks must run on both. Two runs lose a worker node mid-epoch (its whole process tree SIGKILLed: a lost
machine):

* ``qgdist train --workers 2`` as a user runs it, its terminal read line by line: the process of the console relay
  (the actor that carries rank 0's lines and bar to the driver) is SIGKILLed first, then a node is lost; the run
  waits, says so in one plain line per event, resumes from its latest checkpoint once the node is back, and
  finishes; no raw Ray line reaches the terminal, and the events are in its MLflow run.
* an elastic run (``--workers 1-2``) does not wait: it goes on with the one worker left, and grows back to two
  once the node returns; each restarted process notes the global step it starts training from, the proof of a
  resume that does not rest on what the run says of itself.

What each loss cost is printed (``-s``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from qgdist.data.convert import ConvertConfig, convert
from qgdist.pipelines.toy_data import toy_file
from qgdist.train.checkpointer import Checkpointer, load_checkpoint
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.ray_trainer import fit, worker_loop
from tests.cluster.raykit import FAST_NODE_DEATH, NODE, RayNode, two_node_cluster
from tests.commands import Terminal
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow
TINY = {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.1]]}
HANG_S = 900   # only catches a hang: every wait below is on an event
EVENT = re.compile(r"(node \S+ (lost|joined)|waiting for workers|could not place|restarted with|room for"
                   r"|worker failed)")


@pytest.fixture(scope="module")
def cluster():
    yield from two_node_cluster()


def _regain_node(cluster: dict) -> None:
    """Start worker node 1 again (after a kill), as the fixture started it."""
    cluster["nodes"][1] = RayNode(cluster["head"], num_cpus=1, resources=NODE, ray_settings=FAST_NODE_DEATH)


def _record_node(config: dict, hold_alone: bool = False) -> None:
    """The normal worker loop, after noting which node this rank runs on (and when); the note also gets the global
    step this process starts training from (AdamW's restored step count at its first step: 0 for a run started
    over) and counts the steps it trains.

    With ``hold_alone``, a lone worker (world size 1) that has trained two checkpoints' worth of steps waits
    (sleeping, up to 5 minutes) until the run grows back and replaces it, instead of training on: the regrowth
    then happens at the same point of every run, however slow the machine, and the run needs only a few epochs'
    data instead of enough to outlast a node's restart."""
    import ray
    import ray.train

    from qgdist.train import loop

    run = config["train"]["checkpoint"]
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    out = Path(run["storage"]) / run["run_name"] / "placement"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.time():.3f}-rank{rank}.json"
    record = {"rank": rank, "world": world, "node": ray.get_runtime_context().get_node_id(), "time": time.time(),
              "steps": 0, "start": None}

    def note() -> None:   # whole or not at all: the node may be killed mid-write
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)

    real_step = loop.train_step

    def counted_step(model, inputs, label, optimizer, **kwargs):
        if record["start"] is None:
            adam = next(iter(optimizer.state.values()), {})
            record["start"] = int(adam["step"]) if "step" in adam else 0
        if hold_alone and world == 1 and record["steps"] >= 2 * run["checkpoint_every"]:
            deadline = time.monotonic() + 300   # a checkpoint is committed: the regrown group resumes from it
            while time.monotonic() < deadline:
                time.sleep(0.5)
        loss = real_step(model, inputs, label, optimizer, **kwargs)
        record["steps"] += 1
        note()
        return loss

    note()
    loop.train_step = counted_step
    worker_loop(config)


def _record_node_holding_alone(config: dict) -> None:
    _record_node(config, hold_alone=True)


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


def test_conversion_tasks_spread_over_the_worker_nodes(cluster, tmp_path):
    import ray
    from ray.util.state import list_tasks

    raw = toy_file("energyflow", 2000, tmp_path / "toy.npz", seed=3)
    convert(ConvertConfig(source="energyflow", inputs=[raw], out=str(tmp_path / "shards"), rows_per_task=250,
                          progress=False))
    workers = {n.get("NodeID") for n in ray.nodes() if n["Alive"] and n["Resources"].get("qgdist_node")}
    deadline = time.monotonic() + 30   # the State API sees finished tasks with a short delay
    ran_on: set[str] = set()
    while time.monotonic() < deadline and len(ran_on) < 2:
        tasks = list_tasks(address=cluster["head"].address, filters=[("state", "=", "FINISHED")], detail=True,
                           limit=1000)   # this cluster's, whatever other Ray runs on the machine
        ran_on = {t.node_id for t in tasks if "Map" in t.name and t.node_id in workers}
        time.sleep(1)
    assert ran_on == workers, (ran_on, workers)


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


def test_a_lost_node_is_told_in_plain_lines_waited_for_and_regained(cluster, tmp_path):
    """``qgdist train --workers 2``: the relay's process and then a worker node are lost mid-epoch; the run waits for
    the node, resumes once it is back, and tells each event in one plain line."""
    import ray
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [64] * 24, "val": [32, 32]}, seed=11)
    run_dir = tmp_path / "runs" / "lose"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "qgdist", "train", "--data", data, "--model", "particlenet-lite",
           "--model-arg", "conv_params=[[4, [8, 8]]]", "--model-arg", "fc_params=[[16, 0.1]]",
           "--workers", "2", "--worker-resource", "qgdist_node=1", "--address", cluster["head"].gcs_address,
           "--epochs", "2", "--batch-size", "16", "--shuffle-buffer", "32", "--checkpoint-every", "5",
           "--max-failures", "3", "--log-every", "5", "--run-name", "lose", "--storage", str(tmp_path / "runs")]
    term = Terminal(cmd, env)
    events: dict[str, float] = {}
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
        term.wait_for(lambda t: _bar_jets(t.text[killed_relay_at:]) > jets_then, HANG_S)

        # 2. A worker node is lost mid-epoch, after a checkpoint written since; once the run says it waits, the
        #    node is started again.
        at_kill = _wait_pointer(run_dir, lambda p: p["step"] > 0 and p["global_step"] > before_relay["global_step"])
        before = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        events["killed"] = time.time()
        cluster["nodes"][1].kill()
        term.wait_for(lambda t: any(line.startswith("waiting for workers") for line in t.lines()), HANG_S)
        events["waiting"] = time.time()
        _regain_node(cluster)
        events["restarted"] = time.time()
        rc = term.finish(HANG_S)
    finally:
        term.kill()
    text, lines = term.text, term.lines()
    (tmp_path / "terminal.txt").write_text(text)   # kept by pytest for a look after a failure
    assert rc == 0, text[-4000:]
    dead = [n for i, n in before.items() if i not in {m["NodeID"] for m in ray.nodes() if m["Alive"]}]
    assert len(dead) == 1, dead
    address = f"{dead[0]['NodeManagerAddress']}:{dead[0]['NodeManagerPort']}"

    # One plain line per event, in order: lost, waiting (a fixed-size run needs both nodes), the node back (Ray
    # Train may fail to place the group while it is away), restarted with both workers.
    told = [line for line in lines if EVENT.match(line)]
    lost = re.fullmatch(rf"node {re.escape(address)} lost at epoch (\d) step (\d+) \(1 of 2 workers ran there\)",
                        told[0])
    assert lost, told
    assert (int(lost[1]), int(lost[2])) >= (at_kill["epoch"], at_kill["step"]), (told[0], at_kill)   # bar live
    assert told[1] == "waiting for workers: 1 of 2 fit, minimum 2 (restart 1 of 3)", told
    joined = [e for e in told[2:-1] if re.fullmatch(r"node \S+ joined: 2 of 2 workers fit", e)]
    assert len(joined) == 1, told
    assert all(e in joined or re.fullmatch(r"could not place 2 workers; waiting for workers: [12] of 2 fit, "
                                           r"minimum 2", e) for e in told[2:-1]), told
    assert told[-1] == "restarted with 2 workers", told
    # Rank 0 says where it resumed: a checkpoint at or after the one written before the kill.
    resumed = [re.fullmatch(r"resumed from \S+ at epoch \d step \d+ \(global step (\d+)\)", line)
               for line in lines[lines.index(told[-1]):]]
    resumed = [m for m in resumed if m]
    assert len(resumed) == 1 and int(resumed[0][1]) >= at_kill["global_step"], told
    # Rank 0's lines after the relay's restart and after the loss: epoch lines and the final result.
    assert re.search(r"^epoch 0: loss=", text[killed_relay_at:], re.M), text[killed_relay_at:][-3000:]
    after = lines[lines.index(told[-1]):]
    assert not any(line.startswith("world size") for line in after), after     # the same size throughout
    assert any(line.startswith("epoch 1: loss=") for line in after), after
    assert lines[-1].startswith("done: "), lines[-5:]
    # No raw Ray line: no log tail of the dead raylet, no worker prefixes, no colour codes.
    assert "\x1b[" not in text
    assert not [line for line in lines if re.search(r"\((raylet|pid=|RayTrainWorker|autoscaler)", line)], text
    assert "marked dead" not in text and "raylet.out" not in text

    # MLflow: the events as tags; a fixed-size run's world size is a parameter.
    client = MlflowClient(tracking_uri=local_store_uri(run_dir))
    run = client.search_runs([client.get_experiment_by_name("qgdist").experiment_id])[0]
    tags = [v for k, v in sorted(run.data.tags.items()) if k.startswith("qgdist.event.")]
    assert [t.split(" ", 1)[1] for t in tags] == told, tags
    assert run.data.params["world_size"] == "2" and "cluster/world_size" not in run.data.metrics
    print(f"\nnode lost at global step >= {at_kill['global_step']} (latest checkpoint); the run said it waits "
          f"{events['waiting'] - events['killed']:.1f} s after the kill; node restarted "
          f"{events['restarted'] - events['killed']:.1f} s after the kill\n"
          + "\n".join(line for line in lines if not re.match(r"epoch \d:\s+\d+%", line)))


def test_an_elastic_run_goes_on_with_one_node_and_grows_back(cluster, tmp_path):
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    # Shards written directly: conversion on the cluster is the first test's (a Ray Data job here costs ~20 CPU-s).
    data = write_dataset(str(tmp_path / "cloud"), "cloud", {"train": [64] * 15, "val": [32, 32]}, seed=5)
    cfg = resolve(TrainConfig.of(
        data=data, model="particlenet-lite", model_kwargs=TINY, workers="1-2", resize_check_s=2.0,
        worker_resources=NODE, epochs=2, batch_size=16, shuffle_buffer=64, checkpoint_every=5, max_failures=3,
        storage=str(tmp_path / "runs"), run_name="elastic", progress=False))
    pointer = tmp_path / "runs" / "elastic" / "checkpoints" / "latest.json"
    placement = tmp_path / "runs" / "elastic" / "placement"
    events: dict[str, float] = {}

    def worlds_since(t: float) -> set[int]:
        return {json.loads(p.read_text())["world"] for p in placement.glob("*.json")
                if json.loads(p.read_text())["time"] > t} if placement.exists() else set()

    def lose_a_node_then_regain_it() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and "killed" not in events:
            if pointer.exists() and json.loads(pointer.read_text())["step"] > 0:   # mid-epoch checkpoint
                events["checkpoint_step"] = json.loads(pointer.read_text())["global_step"]
                events["killed"] = time.time()
                cluster["nodes"][1].kill()
            time.sleep(0.05)
        while time.monotonic() < deadline and 1 not in worlds_since(events.get("killed", 0)):
            time.sleep(0.1)
        events["shrunk"] = time.time()
        shrunk_at = json.loads(pointer.read_text())["global_step"]
        while time.monotonic() < deadline and json.loads(pointer.read_text())["global_step"] <= shrunk_at:
            time.sleep(0.1)                                     # one checkpoint written by the lone worker
        events["lone_checkpoint_step"] = json.loads(pointer.read_text())["global_step"]
        _regain_node(cluster)
        events["restarted"] = time.time()

    killer = threading.Thread(target=lose_a_node_then_regain_it, daemon=True)
    killer.start()
    out = fit(cfg, worker_fn=_record_node_holding_alone)
    killer.join(timeout=60)
    assert "restarted" in events, f"the run ended before the node could be lost and regained: {events}"

    state = load_checkpoint(Checkpointer(out.run_dir).latest())
    assert state.epoch == 2 and state.step == 0
    # The learning-rate schedule was planned for the whole run and continued across both resizes: it ran out
    # exactly at the last step.
    assert state.training.schedule_steps == state.training.scheduler["total_steps"]
    assert state.training.scheduler["last_epoch"] == state.training.schedule_steps
    records = sorted((json.loads(p.read_text()) for p in placement.glob("*.json")), key=lambda r: r["time"])
    worlds = [r["world"] for r in records if r["rank"] == 0]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds     # 2 -> 1 -> 2
    # Resumed, not started over: every process that trained after the kill started from a checkpoint at or past
    # the one written before it (0 had it started over), and the regrown group from one the lone worker wrote.
    trained = [r for r in records if r["start"] is not None]
    assert {r["start"] for r in trained if r["time"] < events["killed"]} == {0}, trained
    lone = [r for r in trained if r["world"] == 1]
    regrown = [r for r in trained if r["time"] > events["restarted"] and r["world"] == 2]
    assert lone and all(r["start"] >= events["checkpoint_step"] for r in lone), (lone, events)
    assert regrown and all(r["start"] >= events["lone_checkpoint_step"] for r in regrown), (regrown, events)
    client = MlflowClient(tracking_uri=local_store_uri(out.run_dir))
    runs = client.search_runs([client.get_experiment_by_name("qgdist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"            # one MLflow run, continued
    sizes = [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, "cluster/world_size"),
                                     key=lambda m: m.step)]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes          # each resize recorded
    grown = min(r["time"] for r in records if r["time"] > events["restarted"] and r["world"] == 2)
    print(f"\nelastic: node lost at global step >= {events['checkpoint_step']} (latest checkpoint); training "
          f"again on 1 worker {events['shrunk'] - events['killed']:.1f} s after the kill; node back "
          f"{events['restarted'] - events['killed']:.1f} s after it; 2 workers again "
          f"{grown - events['restarted']:.1f} s after that (resize check every {cfg.launch.resize_check_s:.0f} s); "
          f"work redone at each change: the steps since the latest checkpoint (at most "
          f"{cfg.checkpoint.checkpoint_every})")

"""Several Ray nodes on one machine: a head (no CPUs) and two worker nodes started with ``ray start``.

Each worker node has one logical CPU and a ``qgdist_node`` resource, and training asks for one of those per
worker (``--worker-resource qgdist_node=1``), so Ray Train must place its two workers on the two nodes and
conversion tasks must run on both. Then one worker node is SIGKILLed mid-epoch (its whole process tree: a lost
machine) and started again: the run restarts its worker group from the latest checkpoint once the node is back,
and finishes with the same number of steps as an uninterrupted run. An elastic run (``--workers 1-2``) does not
wait: it goes on with the one worker left, and grows back to two once the node returns. What the loss cost is
printed (``-s``).
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.slow
TINY = {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.1]]}


@pytest.fixture(scope="module")
def cluster():
    yield from two_node_cluster()


def _record_node(config: dict, hold_alone: bool = False) -> None:
    """The normal worker loop, after noting which node this rank runs on (and when); the note then counts the
    steps this process trains, the proof of a resume that does not rest on what the run says of itself.

    With ``hold_alone``, a lone worker (world size 1) that has trained two checkpoints' worth of steps waits
    (sleeping, up to 5 minutes) until the run grows back and replaces it, instead of training on: the regrowth
    then happens at the same point of every run, however slow the machine, and the run needs only a few epochs'
    data instead of enough to outlast a node's restart."""
    import os

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
              "steps": 0}

    def note() -> None:   # whole or not at all: the node may be killed mid-write
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)

    real_step = loop.train_step

    def counted_step(*args, **kwargs):
        if hold_alone and world == 1 and record["steps"] >= 2 * run["checkpoint_every"]:
            deadline = time.monotonic() + 300   # a checkpoint is committed: the regrown group resumes from it
            while time.monotonic() < deadline:
                time.sleep(0.5)
        loss = real_step(*args, **kwargs)
        record["steps"] += 1
        note()
        return loss

    note()
    loop.train_step = counted_step
    worker_loop(config)


def _record_node_holding_alone(config: dict) -> None:
    _record_node(config, hold_alone=True)


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


def test_a_lost_node_is_regained_and_training_finishes(cluster, tmp_path):
    raw = toy_file("energyflow", 1200, tmp_path / "toy.npz", seed=4)
    data = str(tmp_path / "shards")
    convert(ConvertConfig(source="energyflow", inputs=[raw], out=data, progress=False))
    cfg = resolve(TrainConfig.of(
        data=data, model="particlenet-lite", model_kwargs=TINY, workers=2, worker_resources=NODE, epochs=2,
        batch_size=16, shuffle_buffer=64, checkpoint_every=5, max_failures=3, storage=str(tmp_path / "runs"),
        run_name="lost", track=False, progress=False))
    pointer = tmp_path / "runs" / "lost" / "checkpoints" / "latest.json"
    events: dict[str, float] = {}

    def lose_and_regain_a_node() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if pointer.exists() and json.loads(pointer.read_text())["step"] > 0:   # mid-epoch checkpoint
                events["checkpoint_step"] = json.loads(pointer.read_text())["global_step"]
                events["killed"] = time.time()
                cluster["nodes"][1].kill()
                time.sleep(5)
                cluster["nodes"][1] = RayNode(cluster["head"], num_cpus=1, resources=NODE,
                                              ray_settings=FAST_NODE_DEATH)
                events["restarted"] = time.time()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_and_regain_a_node, daemon=True)
    killer.start()
    out = fit(cfg, worker_fn=_record_node)
    killer.join(timeout=60)
    assert "killed" in events, "no mid-epoch checkpoint was seen: the node was never lost"

    state = load_checkpoint(Checkpointer(out.run_dir).latest())
    steps_per_epoch = state.global_step // 2
    assert state.epoch == 2 and state.step == 0 and steps_per_epoch > 5
    placements = [json.loads(p.read_text()) for p in sorted((Path(out.run_dir) / "placement").glob("*.json"))]
    first, after = placements[:2], [p for p in placements if p["time"] > events["killed"]]
    assert {p["rank"] for p in first} == {0, 1} and len({p["node"] for p in first}) == 2   # one worker per node
    assert {p["rank"] for p in after} >= {0, 1} and len({p["node"] for p in after[-2:]}) == 2
    # Resumed, not started over: the ranks that finished trained only the steps after a checkpoint at or past
    # the one written before the kill.
    finishers = after[-2:]
    assert all(0 < p["steps"] <= state.global_step - events["checkpoint_step"] for p in finishers), \
        (finishers, state.global_step, events)
    back = min(p["time"] for p in after)
    print(f"\nnode lost at global step >= {events['checkpoint_step']} (latest checkpoint); node restarted "
          f"{events['restarted'] - events['killed']:.1f} s after the kill; workers running again "
          f"{back - events['killed']:.1f} s after the kill; work redone: the steps since that checkpoint "
          f"(at most --checkpoint-every = {cfg.checkpoint.checkpoint_every})")


def test_an_elastic_run_goes_on_with_one_node_and_grows_back(cluster, tmp_path):
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    raw = toy_file("energyflow", 1200, tmp_path / "toy.npz", seed=5)
    data = str(tmp_path / "shards")
    convert(ConvertConfig(source="energyflow", inputs=[raw], out=data, progress=False))
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
        cluster["nodes"][1] = RayNode(cluster["head"], num_cpus=1, resources=NODE, ray_settings=FAST_NODE_DEATH)
        events["restarted"] = time.time()

    killer = threading.Thread(target=lose_a_node_then_regain_it, daemon=True)
    killer.start()
    out = fit(cfg, worker_fn=_record_node_holding_alone)
    killer.join(timeout=60)
    assert "restarted" in events, f"the run ended before the node could be lost and regained: {events}"

    state = load_checkpoint(Checkpointer(out.run_dir).latest())
    assert state.epoch == 2 and state.step == 0
    records = sorted((json.loads(p.read_text()) for p in placement.glob("*.json")), key=lambda r: r["time"])
    worlds = [r["world"] for r in records if r["rank"] == 0]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds     # 2 -> 1 -> 2
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

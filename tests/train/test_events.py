"""The lines the driver prints when the cluster changes under a run (qgdist.train.events), the messages Ray
Train's controller callback sends for them (qgdist.train.controller_events), and their record in MLflow.

In-process and fast: the narrator is fed the messages the callback would send and a node table as
``ray.nodes()`` would give it; the callback is fed Ray Train's own state and error objects.
tests/cluster/test_multinode.py runs the whole chain on several Ray nodes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qgdist.core.nodes import Node, NodeWatch, workers_that_fit
from qgdist.train.events import Narrator, record_events

A = Node("a" * 56, "10.0.0.1:40001", {"CPU": 1.0, "qgdist_node": 1.0})
B = Node("b" * 56, "10.0.0.2:40002", {"CPU": 1.0, "qgdist_node": 1.0})
HEAD = Node("h" * 56, "10.0.0.9:40009", {"CPU": 0.0})
PER_WORKER = {"CPU": 1.0, "qgdist_node": 1.0}


class World:
    """What the narrator asks about: alive nodes, the bar's position, the latest checkpoint pointer."""

    def __init__(self) -> None:
        self.alive = {n.id: n for n in (HEAD, A, B)}
        self.bar = ("", 0)
        self.pointer = None
        self.lines: list[str] = []
        self.stops = 0   # times the relay was told to close rank 0's bar

    def narrator(self, low: int = 1, high: int = 2, max_failures: int = 3) -> Narrator:
        def stopped() -> None:
            self.stops += 1

        return Narrator(min_workers=low, max_workers=high, per_worker=PER_WORKER, max_failures=max_failures,
                        batch_size=16, say=self.lines.append, position=lambda: self.bar,
                        checkpoint=lambda: self.pointer, nodes=lambda: dict(self.alive), clock=lambda: 1.0,
                        stopped=stopped)


def test_a_lost_node_is_one_line_then_the_wait_then_the_resume():
    world = World()
    narrator = world.narrator()
    narrator.on_message(("cluster", "state", {"state": "SCHEDULING", "num_workers": 2}))
    narrator.on_message(("cluster", "group", {"nodes": [A.id, B.id]}))
    assert world.lines == []                                   # the first start is rank 0's to tell
    world.bar, world.pointer = ("epoch 0", 7 * 32), {"epoch": 0, "step": 5, "global_step": 5}
    del world.alive[B.id]
    narrator.on_message(("cluster", "state", {"state": "RESTARTING", "error": "rank 1 ActorDiedError (...)"}))
    narrator.on_node_lost(B)                                   # the node watch sees it too: told once
    narrator.on_message(("cluster", "state", {"state": "SCHEDULING", "num_workers": 2}))
    narrator.on_message(("cluster", "state", {"state": "RESCHEDULING", "error": "timeout"}))
    narrator.on_message(("cluster", "state", {"state": "SCHEDULING", "num_workers": 1}))
    narrator.on_message(("cluster", "group", {"nodes": [A.id]}))
    assert world.lines == [
        "node 10.0.0.2:40002 lost at epoch 0 step 7 (1 of 2 workers ran there)",
        "waiting for workers: 1 of 2 fit, minimum 1 (restart 1 of 3)",
        "could not place 2 workers; waiting for workers: 1 of 2 fit, minimum 1",
        "restarted with 1 of 2 workers",
    ]
    assert narrator.events == [(1.0, line) for line in world.lines]
    assert world.stops == 1                                    # the stale bar closed once, at the restart


def test_unlimited_restarts_are_said_so():
    world = World()
    narrator = world.narrator(max_failures=-1)
    narrator.on_group([A.id, B.id])
    narrator.on_state("RESTARTING", {"error": "rank 0 RuntimeError (boom)"})
    assert world.lines[-1] == "waiting for workers: 2 of 2 fit, minimum 1 (restart 1 of unlimited)"


def test_a_failed_worker_on_a_live_node_is_named_with_its_error_and_a_fixed_run_waits_for_all():
    world = World()
    narrator = world.narrator(low=2, high=2, max_failures=2)
    narrator.on_group([A.id, B.id])
    world.bar = ("epoch 1", 3 * 32 + 5)
    narrator.on_state("RESTARTING", {"error": "rank 1 RuntimeError (boom)"})
    narrator.on_group([A.id, B.id])
    assert world.lines == ["worker failed at epoch 1 step 3: rank 1 RuntimeError (boom)",
                           "waiting for workers: 2 of 2 fit, minimum 2 (restart 1 of 2)",
                           "restarted with 2 workers"]


def test_a_vanished_worker_waits_for_its_node_to_be_declared_lost():
    """Ray Train may see a worker vanish seconds before the GCS declares its node dead: still one line."""
    world = World()
    narrator = world.narrator()
    narrator.on_group([A.id, B.id])
    world.bar = ("epoch 0", 9 * 32)
    narrator.on_state("RESTARTING", {"error": "rank 1 ActorUnavailableError (...)", "lost_process": True})
    narrator.on_state("SCHEDULING", {"num_workers": 2})
    assert world.lines == []
    del world.alive[B.id]
    world.bar = ("epoch 0", 11 * 32)                    # a late bar update must not move the loss
    narrator.on_node_lost(B)
    assert world.lines == ["node 10.0.0.2:40002 lost at epoch 0 step 9 (1 of 2 workers ran there)",
                           "waiting for workers: 1 of 2 fit, minimum 1 (restart 1 of 3)"]


def test_a_vanished_worker_whose_node_stays_is_a_failed_worker_once_the_restart_goes_on():
    world = World()
    narrator = world.narrator()
    narrator.on_group([A.id, B.id])
    narrator.on_state("RESTARTING", {"error": "rank 1 ActorDiedError (killed)", "lost_process": True})
    narrator.on_group([A.id, B.id])
    assert world.lines == ["worker failed at the start: rank 1 ActorDiedError (killed)",
                           "waiting for workers: 2 of 2 fit, minimum 1 (restart 1 of 3)",
                           "restarted with 2 of 2 workers"]


def test_where_is_the_later_of_the_bar_and_the_checkpoint():
    world = World()
    narrator = world.narrator()
    assert narrator.where() == "the start"
    narrator.on_group([A.id, B.id])
    world.bar = ("epoch 0", 4 * 32)                            # rank 0 sends the bar at most once a second
    world.pointer = {"epoch": 0, "step": 5, "global_step": 5}  # ... so a checkpoint may be ahead of it
    assert narrator.where() == "epoch 0 step 5"
    world.bar = ("epoch 0", 9 * 32)
    assert narrator.where() == "epoch 0 step 9"
    world.bar, world.pointer = ("epoch 0", 12 * 32), {"epoch": 1, "step": 0, "global_step": 12}
    assert narrator.where() == "epoch 1 step 0"


def test_joins_idle_losses_and_resizes_are_told():
    world = World()
    narrator = world.narrator()
    narrator.on_group([A.id])
    del world.alive[B.id]
    narrator.on_node_lost(B)
    world.alive[B.id] = B
    narrator.on_node_joined(B)
    narrator.on_state("RESIZING", {"num_workers": 2})
    narrator.on_message(("say", "not an event"))
    assert world.lines == ["node 10.0.0.2:40002 lost at the start (no worker ran there)",
                           "node 10.0.0.2:40002 joined: 2 of 2 workers fit",
                           "room for 2 of 2 workers (1 running): restarting from the latest checkpoint to resize"]
    assert world.stops == 1


def test_workers_that_fit_counts_each_nodes_capacity():
    assert workers_that_fit([HEAD, A, B], PER_WORKER) == 2
    assert workers_that_fit([HEAD, A], PER_WORKER) == 1
    assert workers_that_fit([Node("c", "x:1", {"CPU": 4.0, "qgdist_node": 1.0})], PER_WORKER) == 1
    assert workers_that_fit([Node("c", "x:1", {"CPU": 4.0})], {"CPU": 1.0}) == 4


def test_node_watch_reports_changes_after_its_first_look_and_survives_errors():
    tables = [{A.id: A, B.id: B}, RuntimeError("GCS away"), {A.id: A}, {A.id: A, B.id: B}]
    lost, joined = [], []

    def nodes():
        table = tables.pop(0)
        if isinstance(table, Exception):
            raise table
        return table

    def broken(node):
        lost.append(node)
        raise ValueError("a callback that fails must not stop the watch")

    watch = NodeWatch(on_lost=broken, on_joined=joined.append, nodes=nodes)
    for _ in range(4):
        watch.check()
    assert lost == [B] and joined == [B] and watch.lost == [B] and watch.joined == [B]


def test_controller_events_sends_state_changes_once_with_their_details():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2._internal.execution.controller.state import (
        ReschedulingState, RestartingState, RunningState, SchedulingState)
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from qgdist.train.controller_events import ControllerEvents

    sent: list[tuple] = []
    mailbox = SimpleNamespace(post=SimpleNamespace(remote=sent.append))   # an actor handle's shape
    events = ControllerEvents(mailbox)
    lost = WorkerGroupError("rank 1 lost", {1: WorkerHealthCheckFailedError(
        "A worker health check failed.", failure=ActorDiedError())})
    running = RunningState()
    for old, new in [(None, SchedulingState(ResizeDecision(num_workers=2, resources_per_worker={"CPU": 1}))),
                     (None, running), (running, running), (running, running),
                     (running, RestartingState(training_failed_error=lost)),
                     (None, ReschedulingState(training_failed_error=WorkerGroupError("x", {})))]:
        events.after_controller_state_update(old, new)
    workers = [SimpleNamespace(metadata=SimpleNamespace(node_id=n)) for n in (A.id, B.id)]
    events.after_worker_group_start(SimpleNamespace(get_workers=lambda: workers))
    assert sent == [
        ("cluster", "state", {"state": "SCHEDULING", "num_workers": 2}),
        ("cluster", "state", {"state": "RUNNING"}),
        ("cluster", "state", {"state": "RESTARTING", "lost_process": True,
                              "error": "rank 1 ActorDiedError (The actor died unexpectedly before finishing this task.)"}),
        ("cluster", "state", {"state": "RESCHEDULING", "error": "Training failed due to worker errors:",
                              "lost_process": False}),
        ("cluster", "group", {"nodes": [A.id, B.id]}),
    ]


def test_only_vanished_processes_and_their_peers_count_as_lost():
    from ray.exceptions import ActorUnavailableError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from qgdist.train.controller_events import error_summary, lost_process

    raised = WorkerGroupError("x", {0: ValueError("bad batch\ntraceback..."), 1: ActorUnavailableError("gone", None)})
    assert not lost_process(raised) and lost_process(WorkerGroupError("x", {1: ActorUnavailableError("gone", None)}))
    assert error_summary(raised) == ("rank 0 ValueError (bad batch); rank 1 ActorUnavailableError (The actor None is "
                                     "unavailable: gone. The task may or may not have been executed on the actor.)")
    assert not lost_process(RuntimeError("controller")) and error_summary(RuntimeError("a\nb")) == "a"
    # A rank whose collective lost its peer: the peer's process vanished (the controller may see this first).
    reset = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                         "[127.0.0.1]:55192: Connection reset by peer")
    assert lost_process(WorkerGroupError("x", {0: reset}))
    assert lost_process(WorkerGroupError("x", {0: reset, 1: ActorUnavailableError("gone", None)}))
    assert not lost_process(WorkerGroupError("x", {0: reset, 1: ValueError("bad batch")}))


@pytest.mark.slow
def test_events_become_numbered_tags_of_the_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    uri = local_store_uri(tmp_path)
    (tmp_path / "mlflow").mkdir()
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("qgdist")).info.run_id
    assert record_events([(0.0, "node 10.0.0.2:40002 lost at epoch 0 step 7 (1 of 2 workers ran there)"),
                          (60.0, "restarted with 1 of 2 workers")], run_id, uri) is None
    assert record_events([(120.0, "node 10.0.0.2:40002 joined: 2 of 2 workers fit")], run_id, uri) is None  # a re-run
    tags = {k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("qgdist.event.")}
    assert tags == {"qgdist.event.001": "1970-01-01T00:00:00Z node 10.0.0.2:40002 lost at epoch 0 step 7 (1 of 2 "
                                        "workers ran there)",
                    "qgdist.event.002": "1970-01-01T00:01:00Z restarted with 1 of 2 workers",
                    "qgdist.event.003": "1970-01-01T00:02:00Z node 10.0.0.2:40002 joined: 2 of 2 workers fit"}
    assert record_events([(0.0, "x")], "no-such-run", uri).startswith("MlflowException")

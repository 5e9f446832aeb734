"""What the driver tells the user when the cluster changes under a run: one plain line per event.

Three sources feed one ``Narrator`` on the driver:

* Ray Train's controller (``qgdist.train.controller_events``, a callback in the controller actor) sends its
  state changes (restarting, scheduling N workers, resizing) and the nodes of each worker group it starts, over
  the console relay (``qgdist.train.console``);
* ``qgdist.core.nodes.NodeWatch`` reports nodes lost and joined (the GCS node table);
* the relay's progress bar tells where training was (epoch and step).

The lines, as a user sees them (an elastic ``--workers 1-2`` run losing one of its two nodes)::

    node 127.0.0.1:40123 lost at epoch 0 step 25 (1 of 2 workers ran there)
    waiting for workers: 1 of 2 fit, minimum 1 (restart 1 of 3)
    restarted with 1 of 2 workers
    resumed from s3://runs/a/checkpoints/step-000000020 at epoch 0 step 20 (global step 20)   <- rank 0's

Each line is also kept (``events``) and recorded in the run's MLflow run as a tag ``qgdist.event.NNN`` at the
end (``record_events``); the world sizes themselves are rank 0's ``cluster/world_size`` series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from qgdist.core.nodes import Node, alive_nodes, workers_that_fit

EVENT_TAG = "qgdist.event."


class Narrator:
    """Turns cluster and controller events into plain lines (``say``) and keeps them (``events``).

    ``position()`` returns the progress bar's title ("epoch 3") and the jets done in it; ``checkpoint()`` the
    latest checkpoint pointer (``{"epoch", "step", "global_step"}``) or None; ``nodes()`` the alive nodes;
    ``stopped()`` is called when the worker group stops for a restart or a resize.
    Methods may be called from the relay thread and the node-watch thread at once.
    """

    def __init__(self, *, min_workers: int, max_workers: int, per_worker: Mapping[str, float], max_failures: int,
                 batch_size: int, say: Callable[[str], None] = print,
                 position: Callable[[], tuple[str, int]] = lambda: ("", 0),
                 checkpoint: Callable[[], Mapping[str, int] | None] = lambda: None,
                 nodes: Callable[[], dict[str, Node]] = alive_nodes, clock: Callable[[], float] = time.time,
                 stopped: Callable[[], None] = lambda: None) -> None:
        self.min_workers, self.max_workers, self.per_worker = min_workers, max_workers, dict(per_worker)
        self.max_failures, self.batch_size = max_failures, batch_size
        self.say_line, self.position, self.checkpoint, self.nodes, self.clock = say, position, checkpoint, nodes, clock
        self.stopped = stopped   # the worker group stopped: the relay closes rank 0's bar, which would stand still
        self.events: list[tuple[float, str]] = []
        self.group: list[str] = []          # node id of each rank of the running worker group
        self.groups_started = 0
        self.restarts = 0
        self.scheduling = 0                 # workers of the start in progress
        self._told_lost: set[str] = set()
        self._pending: tuple[str, str] | None = None   # (where, error) of a vanished worker, until its node is known
        self._known: dict[str, Node] = {}   # every node seen alive, for the address of one seen only by id
        self._lock = threading.RLock()

    # -- inputs ---------------------------------------------------------------------------------------------
    def on_message(self, message: tuple) -> None:
        """A message from the controller callback: ``("cluster", "group", {"nodes": [...]})`` or
        ``("cluster", "state", {"state": NAME, ...})``; anything else is ignored."""
        if len(message) != 3 or message[0] != "cluster":
            return
        _, kind, data = message
        if kind == "group":
            self.on_group(list(data["nodes"]))
        elif kind == "state":
            self.on_state(data["state"], data)

    def on_group(self, nodes: list[str]) -> None:
        """A worker group started, rank ``r`` on node ``nodes[r]``."""
        with self._lock:
            self._flush_failure()
            self.group, self.groups_started = nodes, self.groups_started + 1
            self._alive()   # remember the group's nodes by address while they are there to be asked
            # The first start is rank 0's to tell ("starting ..." / "resumed ..."). Which checkpoint a restart
            # resumes from is rank 0's to tell too: only it knows (Ray's own copy when ours is lost).
            if self.groups_started > 1:
                self._say(f"restarted with {self._workers(len(nodes))}")

    def on_state(self, state: str, detail: Mapping[str, Any]) -> None:
        """Ray Train's controller entered ``state`` (RESTARTING, SCHEDULING, RESCHEDULING, RESIZING, ...)."""
        with self._lock:
            if state == "SCHEDULING":
                self.scheduling = int(detail.get("num_workers") or 0)
            elif state == "RESTARTING":
                self.stopped()
                self._flush_failure()
                self.restarts += 1
                where = self.where()
                lost = [n for n in dict.fromkeys(self.group) if n not in self._alive()]
                for node_id in lost:
                    self._tell_lost(self._known.get(node_id, Node(node_id, node_id[:12])), where)
                failure = (where, detail.get("error") or "unknown error")
                if lost or not detail.get("lost_process"):
                    self._tell_failure(None if lost else failure)
                else:
                    # A worker vanished but its node still counts as alive: Ray Train may see the loss seconds
                    # before the GCS declares the node dead. Wait for the node watch (or the next step) to say
                    # which it was, so that a lost node is one line, not a failed worker and then a lost node.
                    self._pending = failure
            elif state == "RESCHEDULING":   # Ray Train could not place the group it tried to start
                self._flush_failure()
                self._say(f"could not place {self.scheduling} worker{'s' if self.scheduling != 1 else ''}; "
                          f"waiting for workers: {self._fit(self._alive())} of {self.max_workers} fit, minimum "
                          f"{self.min_workers}")
            elif state == "RESIZING":
                self.stopped()
                self._flush_failure()
                self._say(f"room for {self._workers(int(detail.get('num_workers') or 0))} "
                          f"({len(self.group)} running): restarting from the latest checkpoint to resize")

    def on_node_lost(self, node: Node) -> None:
        """The GCS declared ``node`` dead."""
        with self._lock:
            if self._pending is not None and node.id in self.group:
                where, self._pending = self._pending[0], None   # the vanished worker's node: that was the event
                self._tell_lost(node, where)
                self._tell_failure(None)
            else:
                self._tell_lost(node, self.where())

    def on_node_joined(self, node: Node) -> None:
        """A node joined the cluster."""
        with self._lock:
            alive = self._alive()
            alive.setdefault(node.id, node)
            self._say(f"node {node.address} joined: {self._fit(alive)} of {self.max_workers} workers fit")

    # -- helpers --------------------------------------------------------------------------------------------
    def where(self) -> str:
        """Where training was, as far as the driver knows: the later of the bar's epoch and step (rank 0 sends
        it at most once a second) and the latest checkpoint's (which training has passed)."""
        desc, done = self.position()
        world = len(self.group)
        bar = None
        if desc.startswith("epoch ") and desc[6:].isdigit() and world:
            bar = (int(desc[6:]), done // (self.batch_size * world))
        at = self.checkpoint()
        saved = (int(at["epoch"]), int(at["step"])) if at else None
        known = max(p for p in (bar, saved, (0, 0)) if p is not None)
        return f"epoch {known[0]} step {known[1]}" if bar or saved else "the start"

    def _tell_failure(self, failure: tuple[str, str] | None) -> None:
        """The restart's lines: the failure (unless a lost node already told it), then what the restart waits for."""
        if failure is not None:
            self._say(f"worker failed at {failure[0]}: {failure[1]}")
        self._say(f"waiting for workers: {self._fit(self._alive())} of {self.max_workers} fit, minimum "
                  f"{self.min_workers} (restart {self.restarts} of {self._limit()})")

    def _flush_failure(self) -> None:
        """A vanished worker whose node was not declared lost before the restart went on: a failed worker."""
        if self._pending is not None:
            failure, self._pending = self._pending, None
            self._tell_failure(failure)

    def _tell_lost(self, node: Node, where: str) -> None:
        if node.id in self._told_lost:
            return
        self._told_lost.add(node.id)
        ranks = sum(1 for n in self.group if n == node.id)
        ran = f"{ranks} of {len(self.group)} workers ran there" if ranks else "no worker ran there"
        self._say(f"node {node.address} lost at {where} ({ran})")

    def _alive(self) -> dict[str, Node]:
        try:
            alive = self.nodes()
        except Exception:  # noqa: BLE001 -- GCS briefly unreachable: say what we can without it
            return dict(self._known)
        self._known.update(alive)
        return alive

    def _limit(self) -> str:
        return str(self.max_failures) if self.max_failures >= 0 else "unlimited"   # --max-failures -1: no limit

    def _fit(self, alive: Mapping[str, Node]) -> int:
        return min(workers_that_fit(alive, self.per_worker), self.max_workers)

    def _workers(self, n: int) -> str:
        wanted = f" of {self.max_workers}" if self.min_workers != self.max_workers else ""
        return f"{n}{wanted} worker{'s' if n != 1 or wanted else ''}"

    def _say(self, text: str) -> None:
        self.events.append((self.clock(), text))
        try:
            self.say_line(text)
        except Exception:  # noqa: BLE001 -- a closed terminal must not stop the run
            pass


def record_events(events: list[tuple[float, str]], run_id: str | None, tracking_uri: str | None) -> str | None:
    """Add ``events`` to MLflow run ``run_id`` as tags ``qgdist.event.NNN`` = "<UTC time> <line>", numbered after
    those a previous driver of the same run recorded. Returns None, or why they could not be recorded."""
    if not events or not run_id or not tracking_uri:
        return None
    import os

    from mlflow import MlflowClient

    from qgdist.track.tracker import HTTP_DEFAULTS

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        tags = client.get_run(run_id).data.tags
        first = 1 + max((int(k[len(EVENT_TAG):]) for k in tags
                         if k.startswith(EVENT_TAG) and k[len(EVENT_TAG):].isdigit()), default=0)
        for i, (when, text) in enumerate(events, first):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
            client.set_tag(run_id, f"{EVENT_TAG}{i:03d}", f"{stamp} {text}")
    except Exception as err:  # noqa: BLE001 -- the run's outcome must not depend on the tracker
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None

"""The Ray nodes a driver runs on, watched from the driver: which are alive, which were lost, which joined.

Ray itself tells the driver of a lost node only as a raw error dump (the dead raylet's log tail, which
``qgdist.core.ray`` keeps in ``ray.log``). ``NodeWatch`` turns the GCS node table into one call per change, from
which each stage prints one plain line: training (``qgdist.train.events``), ``predict`` and ``convert``.

A node is named by its raylet's ``ip:port`` (``NodeManagerAddress:NodeManagerPort`` in ``ray.nodes()``): several
nodes may share an IP (one machine, or pods behind one address), and the port tells them apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Node:
    """One Ray node: its id, ``ip:port`` and total resources."""

    id: str
    address: str
    resources: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, entry: Mapping[str, Any]) -> Node:
        """From one entry of ``ray.nodes()``."""
        return cls(id=entry["NodeID"], address=f"{entry['NodeManagerAddress']}:{entry['NodeManagerPort']}",
                   resources=dict(entry.get("Resources") or {}))


def alive_nodes() -> dict[str, Node]:
    """The nodes the GCS holds alive now, by node id (a GCS call)."""
    import ray

    return {e["NodeID"]: Node.from_ray(e) for e in ray.nodes() if e.get("Alive")}


def workers_that_fit(nodes: Mapping[str, Node] | list[Node], per_worker: Mapping[str, float]) -> int:
    """How many workers needing ``per_worker`` resources the ``nodes`` hold in total (their whole capacity, as
    a restarted worker group would find it once the old group's resources are released)."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    values = nodes.values() if isinstance(nodes, Mapping) else nodes
    if not need:
        return 0 if not values else 1 << 30
    return sum(int(min(node.resources.get(k, 0.0) // v for k, v in need.items())) for node in values)


class NodeWatch:
    """Polls the GCS node table every ``period_s`` in a daemon thread and calls ``on_lost(node)`` /
    ``on_joined(node)`` for each change after the first look (the nodes there at the start are no news).

    Used as a context manager; ``lost`` and ``joined`` list what it saw. Callbacks run in the watch thread and
    must not raise (an exception there is swallowed so that watching never stops a run).
    """

    def __init__(self, on_lost: Callable[[Node], None] | None = None,
                 on_joined: Callable[[Node], None] | None = None, period_s: float = 1.0,
                 nodes: Callable[[], dict[str, Node]] = alive_nodes) -> None:
        self.on_lost, self.on_joined, self.period_s, self._nodes = on_lost, on_joined, period_s, nodes
        self.lost: list[Node] = []
        self.joined: list[Node] = []
        self._known: dict[str, Node] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qgdist-node-watch", daemon=True)

    def __enter__(self) -> NodeWatch:
        self.check()   # the first look, here: a node lost from now on is news even if it goes before the thread
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> None:
        """One look at the node table: report what changed since the last one."""
        with self._lock:
            self._check()

    def _check(self) -> None:
        try:
            now = self._nodes()
        except Exception:  # noqa: BLE001 -- the GCS may be briefly unreachable; look again next period
            return
        if self._known is not None:
            for node_id, node in self._known.items():
                if node_id not in now:
                    self.lost.append(node)
                    self._call(self.on_lost, node)
            for node_id, node in now.items():
                if node_id not in self._known:
                    self.joined.append(node)
                    self._call(self.on_joined, node)
        self._known = now

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.check()

    @staticmethod
    def _call(callback: Callable[[Node], None] | None, node: Node) -> None:
        if callback is None:
            return
        try:
            callback(node)
        except Exception:  # noqa: BLE001 -- a message that cannot be shown must not end the watch
            pass

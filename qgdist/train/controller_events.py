"""A Ray Train V2 callback, run inside the controller actor, that tells the driver what the controller does.

Ray Train's controller (an actor on the driver's node) decides restarts and resizes, but the driver only waits
on it; its own log lines go to Ray's session logs. ``ControllerEvents`` forwards, over the console relay's mailbox
(``qgdist.train.console``), two kinds of plain messages that ``qgdist.train.events.Narrator`` turns into lines:

* ``("cluster", "state", {"state": "RESTARTING", "error": ..., "lost_process": ...})`` at each change of the
  controller's state (``SCHEDULING`` and ``RESIZING`` carry ``num_workers``; ``RESTARTING`` and
  ``RESCHEDULING`` a short error, and whether the failed workers' processes vanished rather than raised);
* ``("cluster", "group", {"nodes": [node id of rank 0, rank 1, ...]})`` after each worker group starts.

The hooks used (``ControllerCallback.after_controller_state_update``, ``WorkerGroupCallback.
after_worker_group_start``) are Ray 2.60's DeveloperAPI, passed through ``RunConfig(callbacks=...)``, which hands
callbacks that are not ``UserCallback``s to the controller as they are. Messages are sent without waiting: the
controller's loop must never block on the driver.
"""

from __future__ import annotations

import re
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from qgdist.train.console import send


def state_name(state: Any) -> str:
    """``RestartingState`` -> ``"RESTARTING"``."""
    return type(state).__name__.removesuffix("State").upper()


#: What a rank's collective raises when the process at the other end of its connection is gone: gloo's TCP
#: transport ("[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:55192: Connection reset by peer") and
#: NCCL's ("remote process exited or there was a network error").
PEER_GONE = re.compile(r"gloo/transport/.*(Connection (reset|closed) by peer|Read error|Socket closed)"
                       r"|NCCL.*remote process exited")


def lost_process(error: Any) -> bool:
    """Whether a training failure is a worker process that vanished (its actor died or cannot be reached, as when
    its node is lost) rather than an exception raised by the training code. A rank whose collective failed
    because its peer's connection went is the same event seen from the other side: Ray Train's controller often
    sees it first (seconds before the GCS declares the peer's node dead)."""
    from ray.exceptions import RayActorError

    def vanished(exc: BaseException) -> bool:
        exc = getattr(exc, "health_check_failure", None) or exc
        return isinstance(exc, RayActorError) or (isinstance(exc, RuntimeError) and bool(PEER_GONE.search(str(exc))))

    failures = getattr(error, "worker_failures", None) or {}
    return bool(failures) and all(vanished(e) for e in failures.values())


def error_summary(error: Any) -> str:
    """One short line for a training failure: each failed rank and its exception type, or the first line."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        parts = []
        for rank, exc in sorted(failures.items()):
            exc = getattr(exc, "health_check_failure", None) or exc   # a failed poll: what failed it
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            parts.append(f"rank {rank} {type(exc).__name__}" + (f" ({first})" if first else ""))
        return "; ".join(parts)
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class ControllerEvents(ControllerCallback, WorkerGroupCallback):
    """Forwards the controller's state changes and worker-group placements to the driver's ``mailbox``."""

    def __init__(self, mailbox: Any) -> None:
        self.mailbox = mailbox
        self._last: tuple[str, int | None] | None = None

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        name = state_name(current_state)
        data: dict[str, Any] = {"state": name}
        decision = getattr(current_state, "scaling_decision", None)
        if decision is not None:
            data["num_workers"] = int(getattr(decision, "num_workers", 0) or 0)
        error = getattr(current_state, "training_failed_error", None)
        if error is not None:
            data["error"], data["lost_process"] = error_summary(error), lost_process(error)
        key = (name, data.get("num_workers"))
        if key == self._last:   # the controller sets its state at every loop, also when nothing changed
            return
        self._last = key
        send(self.mailbox, ("cluster", "state", data))

    def after_worker_group_start(self, worker_group: Any) -> None:
        nodes = [w.metadata.node_id for w in worker_group.get_workers()]
        send(self.mailbox, ("cluster", "group", {"nodes": nodes}))

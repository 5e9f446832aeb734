"""Starting or joining Ray, the same way for every stage (convert, train, generate), with a quiet terminal.

Unless ``verbose``, Ray's own lines stay off the terminal: workers' output is not forwarded to the driver
(``log_to_driver=False``; Ray still writes it to its session logs, ``<session>/logs/worker-*.out``), the
driver's ``ray`` loggers write to ``ray.log`` in the given log directory, and Ray Data's to its own
``ray-data.log`` in the session logs only. What a user should see from inside the
workers (progress, per-epoch metrics) reaches the driver through ``qgdist.train.console`` instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_NAME = "ray.log"


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, log_dir: str | os.PathLike[str] | None = None,
               verbose: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start a private local instance.

    A private instance (``address`` None) runs with token authentication disabled unless ``RAY_AUTH_MODE`` is
    already set (Ray 2.60 would otherwise warn at every start). It keeps its dashboard, on 127.0.0.1: Ray Train
    V2 polls the State API that the dashboard serves, and without it floods the log with "State API may be
    temporarily unavailable". Ray itself resolves a loopback
    node address to the machine's own IP and listens on all interfaces; on shared hosts, join a cluster started
    with ``ray start --head --node-ip-address ...`` and token authentication instead. ``address="auto"`` joins a
    cluster started with ``ray start --head`` on this machine; inside ``ray job submit`` Ray sets ``RAY_ADDRESS``.
    The first call in a process decides ``verbose``; later calls reuse the running instance.
    """
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        quiet_ray_loggers(log_dir)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from qgdist.core.memory import object_store_bytes

    # Ray sizes its object store from the host's memory even inside a smaller cgroup limit (qgdist.core.memory)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=verbose, configure_logging=False, object_store_memory=object_store_bytes())


def quiet_ray_loggers(log_dir: str | os.PathLike[str] | None) -> Path | None:
    """Send the driver's ``ray`` log records to ``log_dir/ray.log`` (or drop below WARNING when no directory)."""
    import ray.data  # noqa: F401 -- configures the "ray.data" logger (its own file in Ray's session logs + console)

    logger = logging.getLogger("ray")
    for name in ("ray", "ray.data"):
        for handler in list(logging.getLogger(name).handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logging.getLogger(name).removeHandler(handler)
    if log_dir is None or "://" in str(log_dir):
        logger.addHandler(logging.NullHandler())
        return None
    path = Path(log_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    return path

"""Starting or joining Ray, the same way for every stage (convert, train, generate)."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a private local instance.

    A private instance (``address`` None) runs with token authentication disabled unless ``RAY_AUTH_MODE`` is
    already set (Ray 2.60 would otherwise warn at every start). It keeps its dashboard, on 127.0.0.1: Ray Train
    V2 polls the State API that the dashboard serves, and without it floods the log with "State API may be
    temporarily unavailable". Ray itself resolves a loopback
    node address to the machine's own IP and listens on all interfaces; on shared hosts, join a cluster started
    with ``ray start --head --node-ip-address ...`` and token authentication instead. ``address="auto"`` joins a
    cluster started with ``ray start --head`` on this machine; inside ``ray job submit`` Ray sets ``RAY_ADDRESS``.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=True, configure_logging=False)

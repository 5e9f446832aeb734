"""Starting or joining Ray, the same way for every stage (convert, train, generate)."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a private local instance bound to 127.0.0.1.

    A private instance (``address`` None) gets token authentication disabled unless ``RAY_AUTH_MODE`` is already
    set: it listens on loopback only, and Ray 2.60 would otherwise warn at every start. ``address="auto"`` joins a
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
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True, configure_logging=False)

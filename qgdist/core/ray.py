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
import secrets
from pathlib import Path

LOG_NAME = "ray.log"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENVS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, log_dir: str | os.PathLike[str] | None = None,
               verbose: bool = False) -> None:
    """Join the Ray cluster at ``address``, or start a private local instance.

    A private instance (``address`` None) cannot be bound to loopback: Ray 2.60 turns a loopback node address into
    the machine's own IP (``ray._private.services.resolve_ip_for_localhost``) and its GCS, raylet and dashboard
    agent listen on every interface (measured with ``ss -ltnp``; only the dashboard itself is on 127.0.0.1). So it
    is never left open: unless ``RAY_AUTH_MODE`` is set, it runs with Ray's token authentication (its default for
    a new local instance) and a random token made for this process (``RAY_AUTH_TOKEN``, inherited by Ray's own
    processes; no ``~/.ray/auth_token`` is written), so another user or host reaching those ports is refused.
    ``RAY_AUTH_MODE=disabled`` opts out, as with plain Ray. It keeps its dashboard, on 127.0.0.1: Ray Train V2
    polls the State API that the dashboard serves, and without it floods the log with "State API may be
    temporarily unavailable". ``address="auto"`` joins a cluster started with ``ray start --head`` on this
    machine; inside ``ray job submit`` Ray sets ``RAY_ADDRESS``. The first call in a process decides ``verbose``;
    later calls reuse the running instance.
    """
    import ray

    if ray.is_initialized():
        return
    handler = None if verbose else quiet_ray_loggers(log_dir)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and AUTH_MODE_ENV not in os.environ and not any(os.environ.get(v) for v in TOKEN_ENVS):
        # Ray switches this process to token mode itself (and refreshes its cached config); we give the token.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_urlsafe(32)
    # ray.init(configure_logging=False) clears the "ray" logger's handlers before it logs its start-up warnings
    # (e.g. "Token authentication is enabled"), which Python's last-resort handler would print on stderr: while
    # Ray starts they go where its other lines go; afterwards our handler is attached again.
    last_resort = logging.lastResort
    if handler is not None:
        logging.lastResort = handler
    try:
        if address:
            ray.init(address=address, log_to_driver=verbose)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     log_to_driver=verbose, configure_logging=False)
    finally:
        logging.lastResort = last_resort
    if not verbose:
        quiet_ray_loggers(log_dir)


def quiet_ray_loggers(log_dir: str | os.PathLike[str] | None) -> logging.Handler:
    """Send the driver's ``ray`` log records to ``log_dir/ray.log`` (or drop them when no directory); returns the
    handler."""
    import ray.data  # noqa: F401 -- configures the "ray.data" logger (its own file in Ray's session logs + console)

    logger = logging.getLogger("ray")
    for name in ("ray", "ray.data"):
        for handler in list(logging.getLogger(name).handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logging.getLogger(name).removeHandler(handler)
    if log_dir is None or "://" in str(log_dir):
        handler: logging.Handler = logging.NullHandler()
    else:
        path = Path(log_dir) / LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for old in [h for h in logger.handlers if getattr(h, "qgdist", False)]:   # a second call replaces the first
        logger.removeHandler(old)
        old.close()
    handler.qgdist = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return handler

"""Starting or joining Ray, the same way for every stage (convert, train, generate), with a quiet terminal.

Unless ``verbose``, Ray's own lines stay off the terminal: workers' output is not forwarded to the driver
(``log_to_driver=False``; Ray still writes it to its session logs, ``<session>/logs/worker-*.out``), the
driver's ``ray`` loggers write to ``ray.log`` in the given log directory, and Ray Data's to its own
``ray-data.log`` in the session logs only. Errors the cluster publishes to every driver (a node marked dead, with
its raylet's log tail, printed as ``(raylet) ...`` in colour whatever ``log_to_driver`` says) go to the same
``ray.log``. What a user should see from inside the workers (progress, per-epoch metrics) reaches the driver
through ``qgdist.train.console`` instead, and lost nodes are told in plain lines (``qgdist.core.nodes``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOG_NAME = "ray.log"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENVS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_REPEAT_S = 10.0   # the same published error again within this many seconds is logged once
#: The dashboard modules a private Ray runs: the State API, which Ray Train V2 polls. The others (jobs, metrics,
#: nodes, events, Serve, Data, Train pages, ...) serve the web UI, each in a process of its own.
PRIVATE_DASHBOARD_MODULES = ("StateHead",)
#: Environment of a private Ray's own processes (this process keeps its own, so a cluster joined later is not
#: affected; a value the user set wins). One machine without an autoscaler never drains a node, so Ray Train's
#: preemption watcher (an actor per run polling Ray Core's drain state) only costs a process: a tiny 2-worker
#: fit took 51-52 CPU-s without it against 59-66 with it (two runs each, docs/testing.md). Ray Train's controller
#: polls its workers every 0.25 s instead of every 2 s: it notices a finished run, and takes each report, at its
#: next poll, which cost a tiny fit 1-3 s at its end; the faster polls cost no CPU that could be measured
#: (docs/operations.md).
PRIVATE_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *,
               log_dir: str | os.PathLike[str] | None = None, verbose: bool = False, dashboard: bool = True) -> None:
    """Join the Ray cluster at ``address``, or start a private local instance.

    A private instance (``address`` None) cannot be bound to loopback: Ray 2.60 turns a loopback node address into
    the machine's own IP (``ray._private.services.resolve_ip_for_localhost``) and its GCS, raylet and dashboard
    agent listen on every interface (measured with ``ss -ltnp``; only the dashboard itself is on 127.0.0.1). So it
    is never left open: unless ``RAY_AUTH_MODE`` is set, it runs with Ray's token authentication (its default for
    a new local instance) and a random token made for this process (``RAY_AUTH_TOKEN``, inherited by Ray's own
    processes; no ``~/.ray/auth_token`` is written), so another user or host reaching those ports is refused.
    ``RAY_AUTH_MODE=disabled`` opts out, as with plain Ray. It keeps its dashboard, on 127.0.0.1, with its State
    API module alone (``only_dashboard_modules``): Ray Train V2 polls the State API that the dashboard serves,
    and without it floods the log with "State API may be temporarily unavailable"; for Ray's whole web UI, start
    Ray yourself (``ray start --head``) and pass its address. Stages that only run Ray Data or tasks (convert,
    predict, Pythia generation) pass ``dashboard=False``: nothing of theirs reads it, so they start no dashboard
    at all (docs/operations.md). Its dashboard agent listens on a port the OS picks, not Ray's fixed 52365, so
    another Ray on the machine does not slow its start (``agent_port_chosen_by_the_os``). ``address="auto"``
    joins a cluster started with ``ray start --head`` on this machine; inside ``ray job submit`` Ray sets
    ``RAY_ADDRESS``. The first call in a process decides ``verbose`` and ``dashboard``; later calls reuse the
    running instance (the quickstart starts one with the dashboard for all its stages).
    """
    import ray

    if ray.is_initialized():
        return
    handler = None if verbose else quiet_ray_loggers(log_dir)
    if not verbose:
        log_cluster_errors()
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
            from qgdist.core.memory import object_store_bytes

            # Ray sizes its object store from the host's memory even inside a smaller cgroup limit
            # (qgdist.core.memory).
            with only_dashboard_modules(PRIVATE_DASHBOARD_MODULES), agent_port_chosen_by_the_os(), \
                    inherited_environ(PRIVATE_RAY_ENV):
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                         log_to_driver=verbose, configure_logging=False, object_store_memory=object_store_bytes())
    finally:
        logging.lastResort = last_resort
    if not verbose:
        quiet_ray_loggers(log_dir)


@contextlib.contextmanager
def inherited_environ(values: dict[str, str]) -> Iterator[None]:
    """Within the block, ``values`` are in ``os.environ`` (those not set already), for the processes it starts to
    inherit; afterwards this process's environment is as it was."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _rewritten_launches(process_type: str, rewrite: Callable[[list[str]], list[str]]) -> Iterator[None]:
    """Within the block, the command of every Ray process of ``process_type`` (a ``ray_constants.PROCESS_TYPE_*``
    name) that ``ray.init`` launches goes through ``rewrite`` first. Where Ray's internals differ from 2.60's,
    nothing is rewritten and Ray starts as it would."""
    try:
        from ray._private import ray_constants, services

        start = services.start_ray_process
        kind = getattr(ray_constants, process_type)
    except (ImportError, AttributeError):
        yield
        return

    def launch(command: list[str], kind_started: str, *args: Any, **kwargs: Any) -> Any:
        return start(rewrite(command) if kind_started == kind else command, kind_started, *args, **kwargs)

    services.start_ray_process = launch
    try:
        yield
    finally:
        services.start_ray_process = start


def only_dashboard_modules(names: tuple[str, ...]) -> contextlib.AbstractContextManager[None]:
    """Within the block, a dashboard that ``ray.init`` starts runs only the modules ``names``.

    ``ray.init`` cannot choose them (the dashboard's own ``--modules-to-load`` flag is set only without a
    dashboard), so its process launcher gets the flag added. Measured on a private 2-CPU Ray, idle, with an actor:
    summed PSS of Ray's processes 620 MB instead of 797, 9.7 CPU-s instead of 13.5 from start to stop (8 module
    processes fewer). Where Ray's internals differ from 2.60's, the dashboard starts whole, as before.
    """
    def with_modules(command: list[str]) -> list[str]:
        if any(arg.startswith("--modules-to-load") for arg in command):
            return command
        return [*command, "--modules-to-load=" + ",".join(names)]

    return _rewritten_launches("PROCESS_TYPE_DASHBOARD", with_modules)


def agent_port_chosen_by_the_os() -> contextlib.AbstractContextManager[None]:
    """Within the block, the dashboard agent of a node that ``ray.init`` starts listens on a port the OS picks.

    ``ray.init`` always gives it Ray's fixed default, 52365, and cannot be told otherwise. With another Ray on the
    machine already holding that port (a second qgdist command, a test beside it, a user's own cluster), the agent
    retried the bind for ~3.5 s, gave up its HTTP server, and the raylet waited for it: ``ray.init`` took 7.6-7.7 s
    instead of 4.7-5.6 s here (docs/operations.md). Ray's agent takes port 0 and records the port it bound, as a
    ``ray start --dashboard-agent-listen-port 0`` node does; the raylet's command for the agent is changed to ask
    for it. Where Ray's internals differ from 2.60's, the agent keeps Ray's default.
    """
    prefix = "--dashboard_agent_command="

    def with_any_port(command: list[str]) -> list[str]:
        return [re.sub(r"--listen-port=\d+", "--listen-port=0", arg) if arg.startswith(prefix) else arg
                for arg in command]

    return _rewritten_launches("PROCESS_TYPE_RAYLET", with_any_port)


class _PlainFormatter(logging.Formatter):
    """A log file holds text, not terminal colour codes (Ray colours even its "Started a local Ray" line)."""

    def format(self, record: logging.LogRecord) -> str:
        return _COLOUR.sub("", super().format(record))


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
        handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for old in [h for h in logger.handlers if getattr(h, "qgdist", False)]:   # a second call replaces the first
        logger.removeHandler(old)
        old.close()
    handler.qgdist = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return handler


def log_cluster_errors(logger: logging.Logger | None = None) -> None:
    """Send the errors Ray publishes to the driver (``(raylet) ...`` lines) to ``logger`` (the ``ray`` logger:
    ``ray.log``), colour codes removed, instead of the terminal. Call before ``ray.init``.

    Ray 2.60's driver prints them from a thread it starts in ``ray.init`` (``listen_error_messages``), through
    the module function ``ray._private.worker.print_to_stdstream``, whatever ``log_to_driver`` says; no setting
    turns that off. The function is looked up at each call, so replacing it reroutes those lines; worker
    output (only forwarded with ``log_to_driver=True``, i.e. ``--verbose``) is bound at connect and unaffected.
    A Ray without that function keeps printing them: tests/core/test_ray_logs.py notices.
    """
    import ray._private.worker as ray_worker

    if not hasattr(ray_worker, "print_to_stdstream"):
        return
    target = logger or logging.getLogger("ray")
    recent: dict[str, float] = {}   # Ray delivers some errors twice (and dedups them before printing): once here

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        who, now = data.get("pid") or "ray", time.monotonic()
        for line in data.get("lines") or []:
            text = f"({who}) {_COLOUR.sub('', str(line))}"
            if now - recent.get(text, -_REPEAT_S) >= _REPEAT_S:
                target.warning("%s", text)
            recent[text] = now
        if len(recent) > 1000:
            recent.clear()

    ray_worker.print_to_stdstream = to_log


@contextlib.contextmanager
def native_stderr_to_log(log_dir: str | os.PathLike[str] | None, verbose: bool = False) -> Iterator[None]:
    """For the duration, what Ray's C++ core writes straight to this process's stderr (file descriptor 2, e.g.
    core_worker.cc's warning about actor constructor arguments in the object store, ray-project/ray#57733) goes
    to ``log_dir/ray.log``, while Python's ``sys.stderr`` -- progress bars, our messages, tracebacks -- keeps
    writing to the terminal. Nothing changes with ``verbose`` or without a local ``log_dir``."""
    if verbose or log_dir is None or "://" in str(log_dir):
        yield
        return
    path = Path(log_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    python_stderr = sys.stderr
    try:
        os.dup2(log, 2)
        sys.stderr = terminal
        yield
    finally:
        terminal.flush()
        os.dup2(saved, 2)
        sys.stderr = python_stderr
        for fd in (log, saved):
            os.close(fd)
        terminal.close()

"""Ray's own lines stay off the terminal and go to ``ray.log`` (qgdist.core.ray), on a real local Ray.

The errors a Ray cluster publishes to every driver (a node marked dead, with its raylet's log tail) are printed
by the driver whatever ``log_to_driver`` says; here one is published for real and the driver's terminal (a
subprocess's stdout and stderr) must not show it, while ``ray.log`` holds it without colour codes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).parents[2]

DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ray
    from ray._private.utils import push_error_to_driver
    from qgdist.core.ray import ensure_ray

    log_dir, verbose = Path(sys.argv[1]), sys.argv[2] == "verbose"
    ensure_ray(num_cpus=1, log_dir=log_dir, verbose=verbose, dashboard=False)   # nothing here reads it
    message = "\\x1b[33mThe node with node id: 0123abcd has been marked dead because the detector has missed " \\
              "too many heartbeats from it.\\x1b[0m"
    push_error_to_driver(ray._private.worker.global_worker, "node_removed", message)   # to every driver
    push_error_to_driver(ray._private.worker.global_worker, "node_removed", "sentinel: published last")
    deadline = time.monotonic() + 60
    log = log_dir / "ray.log"
    while time.monotonic() < deadline and not (log.exists() and "sentinel" in log.read_text()) and not verbose:
        time.sleep(0.2)
    time.sleep(2 if verbose else 0)   # --verbose: the listener prints them; give it the time it takes
    print("driver done", flush=True)
    ray.shutdown()
""")


def _run_driver(tmp_path: Path, mode: str) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), mode], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "driver done" in done.stdout
    return done.stdout + done.stderr


def test_published_cluster_errors_go_to_ray_log_not_the_terminal(tmp_path):
    terminal = _run_driver(tmp_path, "quiet")
    assert "marked dead" not in terminal and "(raylet)" not in terminal and "\x1b[" not in terminal, terminal
    log = (tmp_path / "ray.log").read_text()
    assert "(raylet) The node with node id: 0123abcd has been marked dead" in log and "\x1b[" not in log, log
    assert log.count("marked dead") == 1, log     # Ray delivers it twice; its own printing dedups, so do we


def test_verbose_shows_them(tmp_path):
    terminal = _run_driver(tmp_path, "verbose")
    assert "(raylet)" in terminal and "has been marked dead" in terminal, terminal

"""Private Ray nodes on this machine for the cluster tests: a head and worker nodes started with ``ray start``.

Each node gets its own ports (several nodes on one machine must not share the dashboard agent's or the metrics
port) and runs in its own process session, so a test can stop exactly that node's processes, or SIGKILL them to
simulate a lost machine, without touching any other Ray on the machine (``ray stop`` would kill them all).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from qgdist.core.ray import PRIVATE_RAY_ENV

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent_ports() -> list[str]:
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


class RayNode:
    """One ``ray start`` node: the head when ``head`` is None, else a worker node joining ``head``.

    A worker node runs ``ray start --block`` so the starter stays alive as the root of the node's process tree;
    ``kill()`` SIGKILLs that tree at once (a lost machine), ``stop()`` ends it gracefully.
    """

    def __init__(self, head: RayNode | None = None, *, num_cpus: int, resources: dict[str, float] | None = None,
                 env: dict[str, str] | None = None, ray_settings: dict[str, str] | None = None) -> None:
        self.env = env or {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env |= {f"RAY_{k}": v for k, v in (ray_settings or {}).items()}   # Ray's system config, by env
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--disable-usage-stats",
                  "--resources", json.dumps(resources or {})]
        if head is None:
            # Ray gives a new head's raylet a fixed 30 s to register with its GCS (ray/_private/node.py), which a
            # loaded 2-core machine can miss ("The current node timed out during startup"): one more try.
            try:
                self._start_head([*common, *_agent_ports()])
            except RuntimeError:
                self._start_head([*common, *_agent_ports()])
            return
        self.temp_dir, self.gcs_address, self.address = head.temp_dir, head.gcs_address, head.address
        self._launch([str(VENV_BIN / "ray"), "start", "--address", head.gcs_address, "--block", *common,
                      *_agent_ports()])
        # Wait until the node runs before another starts: worker nodes started at the same instant on one
        # machine race for the session's socket names and one of them never registers.
        self.output: list[str] = []
        started = threading.Event()

        def drain() -> None:
            for line in self.starter.stdout:
                self.output.append(line)
                if "Ray runtime started" in line:
                    started.set()

        threading.Thread(target=drain, daemon=True).start()
        if not started.wait(timeout=120):
            self.stop()
            raise RuntimeError("ray start (worker node) did not start:\n" + "".join(self.output[-40:]))

    def _start_head(self, common: list[str]) -> None:
        # A short temp dir: Ray's unix sockets live below it and paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="qgray-", dir="/tmp")
        self.dashboard_port, port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
               "--temp-dir", self.temp_dir, *common]
        self._launch(cmd)
        output, _ = self.starter.communicate(timeout=120)
        if self.starter.returncode != 0:
            self.stop(remove_temp_dir=True)   # this attempt's own directory: a second try makes a new one
            raise RuntimeError(f"ray start --head failed:\n{output[-3000:]}")

    def _launch(self, cmd: list[str]) -> None:
        # A new session: every daemon `ray start` launches inherits its process group, our handle for stop().
        self.starter = subprocess.Popen(cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)

    def processes(self) -> list[psutil.Process]:
        """Every process of this node: its process group and all their children."""
        leader = self.starter.pid
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == leader:
                    found[proc.pid] = proc
            except (ProcessLookupError, psutil.Error):
                continue
        for proc in list(found.values()):
            try:
                found.update({child.pid: child for child in proc.children(recursive=True)})
            except psutil.Error:
                continue
        return list(found.values())

    def kill(self) -> None:
        """SIGKILL every process of the node at once: the machine is gone."""
        for proc in self.processes():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    def stop(self, remove_temp_dir: bool = False) -> None:
        """SIGTERM, then SIGKILL what is left after 3 s, of this node's processes only."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for proc in alive:  # gcs_server and raylet may ignore SIGTERM for a while
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for_nodes(count: int, timeout: float = 120) -> None:
    """Block until the connected Ray cluster has ``count`` alive nodes."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for n in ray.nodes() if n["Alive"]) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the cluster did not reach {count} alive nodes in {timeout} s")


#: A private Ray's environment (``qgdist.core.ray.PRIVATE_RAY_ENV``) as ``RayNode``'s ``ray_settings``.
PRIVATE_RAY_SETTINGS = {k.removeprefix("RAY_"): v for k, v in PRIVATE_RAY_ENV.items()}
#: The resource each worker node offers and each training worker asks for, so two workers land on two nodes.
NODE = {"qgdist_node": 1}
# A lost node is declared dead after ~3 missed 1 s health checks instead of Ray's default ~5 x 3 s, and Ray Train
# gives up starting a worker group that cannot be placed after 6 s instead of 60 s (an elastic run first retries
# its old size: Ray's autoscaling coordinator notices a lost node only at its next 20 s tick). The timeout bounds
# only the wait for the group's placement group, which forms at once once the nodes have room. With the defaults
# the elastic test went on with one worker ~80 s after the kill; docs/operations.md has the figures. Ray Train's
# controller polls its workers as often as on a private Ray.
FAST_NODE_DEATH = {"health_check_period_ms": "1000", "health_check_timeout_ms": "1000",
                   "health_check_failure_threshold": "3", "TRAIN_WORKER_GROUP_START_TIMEOUT_S": "6",
                   "TRAIN_HEALTH_CHECK_INTERVAL_S": PRIVATE_RAY_SETTINGS["TRAIN_HEALTH_CHECK_INTERVAL_S"]}


def two_node_cluster():
    """A module fixture's body: a head without CPUs and two one-CPU worker nodes offering ``NODE``, with this
    process attached as the driver; yields ``{"head", "nodes"}`` and stops every node after."""
    import pytest
    import ray

    if not (VENV_BIN / "ray").exists():
        pytest.skip(f"no `ray` executable next to {VENV_BIN}")
    head = RayNode(num_cpus=0, ray_settings=FAST_NODE_DEATH)
    nodes = []
    try:
        nodes = [RayNode(head, num_cpus=1, resources=NODE, ray_settings=FAST_NODE_DEATH) for _ in range(2)]
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=head.gcs_address, log_to_driver=False)
        wait_for_nodes(3)
        yield {"head": head, "nodes": nodes}
    finally:
        ray.shutdown()
        for node in nodes:
            node.stop()
        head.stop(remove_temp_dir=True)

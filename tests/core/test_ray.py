"""What a private Ray started by a qgdist command listens on, and who may talk to it.

Ray 2.60 cannot bind a local instance to loopback (a loopback node address becomes the machine's IP and the GCS,
raylet and dashboard agent listen on every interface), so ``ensure_ray`` runs it with token authentication and a
token of its own: the test lists the instance's listening sockets with ``ss``, then tries to join its GCS from
another process without the token (refused) and with it (joins), and calls its dashboard without the token (401).
The instance runs in a fresh interpreter so that its authentication mode stays out of this pytest process, with
Ray's fixed default port for the dashboard agent taken, as another Ray on the machine takes it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEFAULT_AGENT_PORT = 52365   # ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT, which ray.init always uses

PROBE = textwrap.dedent("""
    import json, os, subprocess, sys, urllib.error, urllib.request
    from qgdist.core.ray import ensure_ray
    import ray

    ensure_ray(num_cpus=1, log_dir=sys.argv[1])
    gcs = ray.get_runtime_context().gcs_address
    ours = set(subprocess.run(["pgrep", "-g", str(os.getpgrp())], capture_output=True, text=True).stdout.split())
    listening = [line.split()[3] for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True)
                 .stdout.splitlines() if any(f"pid={p}," in line for p in ours)]
    join = "import ray; ray.init(address=%r); print('JOINED')" % gcs
    # A refused join retries once a second, 20 times by default: 3 tries say the same in 3 s instead of 20.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_NUM_REDIS_GET_RETRIES": "3"}
    joins = {}
    for name, env in (("no token", clean | {"RAY_AUTH_MODE": "disabled"}),
                      ("wrong token", clean | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"}),
                      ("the token", clean | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN", "")})):
        done = subprocess.run([sys.executable, "-c", join], env=env | {"HOME": sys.argv[1]}, capture_output=True,
                              text=True, timeout=120)
        joins[name] = "JOINED" in done.stdout
    try:
        url = ray._private.worker._global_node.address_info["webui_url"]
        assert url.startswith("127.0.0.1:"), url
        urllib.request.urlopen(f"http://{url}/api/v0/actors", timeout=10)
        dashboard = 200
    except urllib.error.HTTPError as err:
        dashboard = err.code
    from ray.util.state import list_actors

    @ray.remote
    class Probe:
        def ready(self):
            return True

    probe = Probe.remote()
    ray.get(probe.ready.remote())   # alive before the State API is asked
    # with the token; this instance's address: another test's Ray may run beside it
    state_api = [a.class_name for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")])]
    modules = sorted(line.split()[0] for line in subprocess.run(["ps", "-o", "args=", "-g", str(os.getpgrp())],
                     capture_output=True, text=True).stdout.splitlines() if line.startswith("ray-dashboard-"))
    agent_log = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "dashboard_agent.log")
    agent = [line for line in open(agent_log) if "Dashboard agent http address" in line or "to bind" in line]
    print(json.dumps({"listening": listening, "joins": joins, "dashboard": dashboard, "state_api": state_api,
                      "modules": modules, "agent": agent}))
    ray.shutdown()
""")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list listening sockets")
def test_private_ray_listens_widely_but_only_with_its_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    with socket.socket() as held:   # Ray's fixed default port for the dashboard agent, taken as another Ray would
        try:
            held.bind(("127.0.0.1", DEFAULT_AGENT_PORT))   # loopback: the agent binds it too, after its own IP
            held.listen()
        except OSError:   # already taken by something else: as good
            pass
        done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # What the docs say: not only loopback (so a token is what protects it) ...
    assert any(not addr.startswith("127.0.0.1:") for addr in seen["listening"]), seen
    # ... and only the token opens it.
    assert seen["joins"] == {"no token": False, "wrong token": False, "the token": True}, seen
    assert seen["dashboard"] == 401, seen
    # Its dashboard runs the State API (Ray Train polls it) and no other module process.
    assert seen["state_api"] == ["Probe"], seen
    assert seen["modules"] == ["ray-dashboard-StateHead-0"], seen
    # With Ray's default agent port taken, the agent listened on another one the OS chose, at the first try.
    assert len(seen["agent"]) == 1 and not seen["agent"][0].rstrip().endswith(f":{DEFAULT_AGENT_PORT}"), seen["agent"]
    assert not (tmp_path / ".ray" / "auth_token").exists()   # the token was never written to the user's home
    assert "Token authentication" not in done.stderr   # Ray's start-up warning stays in ray.log, off the terminal
    assert "Token authentication is enabled" in (tmp_path / "ray.log").read_text()

"""A local MLflow tracking server (sqlite backend, artifacts proxied) bound to 127.0.0.1.

``qgdist tracker`` and the tests use it. The lean form (one worker, job execution off) is ready in ~10 s and
0.5 GB, against ~40 s and 2 GB for MLflow's default (REFERENCE.md section 7).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from qgdist.core.config import option
from qgdist.core.run import local_store_artifacts, local_store_uri
from qgdist.track.store import seed_local_store


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerConfig:
    """Where the server keeps its data and where it listens."""

    store: Path = option(Path("mlflow-store"), "directory for mlflow.db (runs, params, metrics) and artifacts/")
    port: int = option(5000, "port on 127.0.0.1", min=1, max=65535)
    # Not flags: the server binds to loopback only (reach it through an SSH tunnel or kubectl port-forward).
    host: str = option("127.0.0.1", "interface to bind", cli=False)
    ready_timeout_s: float = option(120.0, "seconds to wait for /health", cli=False, gt=0)


@dataclass(frozen=True)
class TrackerConfig:
    """``qgdist tracker``: serve a store for the UI, or (``replay``) send what a run could not deliver, then exit."""

    server: ServerConfig = ServerConfig()
    replay: Path | None = option(None, "instead of serving: send what a run could not deliver during a tracker "
                                       "outage (RUN_DIR/mlflow_unsent.jsonl) to --tracking-uri, then exit",
                                 metavar="RUN_DIR")
    tracking_uri: str | None = option(None, "with --replay: the tracker the run logged to (default: "
                                            "$MLFLOW_TRACKING_URI, else the run's own local store)")


@dataclass
class MlflowServer:
    """A running ``mlflow server`` process; ``stop()`` ends it (and only it)."""

    config: ServerConfig
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def command(self) -> list[str]:
        store = self.config.store.resolve()
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        return [mlflow, "server", "--workers", "1", "--host", self.config.host, "--port", str(self.config.port),
                "--backend-store-uri", local_store_uri(store),
                "--artifacts-destination", str(local_store_artifacts(store))]

    def start(self, log_path: Path | None = None) -> "MlflowServer":
        """Start the server and wait until ``/health`` answers; raises with the server's log if it does not."""
        self.config.store.mkdir(parents=True, exist_ok=True)
        seed_local_store(local_store_uri(self.config.store))
        log_path = log_path or self.config.store / "server.log"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(log_path, "ab") as log:
            # A new session so that stopping the server also stops the uvicorn worker it forks.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {log_path}:\n"
                                   + log_path.read_text()[-2000:])
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not ready after {self.config.ready_timeout_s} s; see {log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """Terminate the server's process group (its own session, so nothing else is touched)."""
        if self.process is None or self.process.poll() is not None:
            return
        import signal

        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "MlflowServer":
        return self if self.process else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

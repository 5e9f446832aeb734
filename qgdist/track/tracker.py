"""MLflow tracking for one training run, called from world rank 0 only; survives tracker outages.

The whole API (everything else is private)::

    tracker = Tracker(run_dir, tracking_uri=None, experiment="qgdist", enabled=(rank == 0))
    run_id = tracker.start(run_name, config, run_id=None)   # new run, or continue `run_id` (resume)
    tracker.log_metrics({"train/loss": 0.61}, step=global_step)
    tracker.log_artifact("run/roc.png")                       # a file (or a directory) from the local disk
    tracker.flush(timeout_s=10)                               # optional: wait until the queue is sent
    tracker.finish("FINISHED")                                # or "FAILED" / "KILLED"; sends what is queued
    tracker.history   # {"train/loss": ([steps], [values]), ...}: everything in the run, for loss-curve plots

* ``tracking_uri=None`` means the embedded local store ``sqlite:///<run_dir>/mlflow/mlflow.db`` with artifacts in
  ``<run_dir>/mlflow/artifacts``: no server needed; ``qgdist tracker --store <run_dir>/mlflow`` shows it in the UI.
  The tracker itself reads no environment: commands pass ``qgdist.core.tracking.resolve_tracking_uri(flag)``
  (the flag, else ``$MLFLOW_TRACKING_URI``, else None).
* ``config`` (a dataclass or nested dict) is flattened to ``a.b.c`` params.
* Resume: ``start(..., run_id=ID)`` (an empty id means a new run) reopens that run and drops any metric whose step
  is <= the last step already logged for that key, so a run resumed from an older checkpoint replays steps
  without duplicating them.
* ``log_metrics`` and ``log_artifact`` only queue; a background thread sends the queue in batches every
  ``flush_s`` seconds, so the training step never waits for the network or sqlite (~10 ms a write).
* Outage: while the server is unreachable, the thread retries every ``retry_s`` seconds and training goes on;
  one warning when the tracker is lost, one when it is back. Whatever ``finish`` still cannot send within
  ``finish_timeout_s`` is written to ``<run_dir>/mlflow_unsent.jsonl`` (with the run's final status if that
  could not be set either); ``replay_unsent`` sends it later (``qgdist tracker --replay RUN_DIR``), and a run
  resumed in the same run directory replays it by itself when it starts.
* A disabled tracker (``enabled=False``, the other ranks) does nothing and returns ``None`` from ``start``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qgdist.core.atomic import write_text
from qgdist.core.secrets import redact

#: Short HTTP timeouts so an unreachable server costs seconds, not minutes (MLflow's defaults: 120 s, 7 retries).
#: Set only where the user has not set them already.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PARAM_MAX_CHARS = 6000   # MLflow 3 rejects longer param values
BATCH_MAX_METRICS = 1000  # MLflow's log_batch limit
UNSENT_FILE = "mlflow_unsent.jsonl"


def local_store_uri(run_dir: str | Path) -> str:
    """The embedded sqlite store of a run directory (an absolute ``sqlite:////...`` URI)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow' / 'mlflow.db'}"


def flatten_config(config: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a dataclass / nested mapping into ``{"a.b": "value"}`` strings, as MLflow params want; credentials
    in URIs (a tracking URI with a password) are masked."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    flat: dict[str, str] = {}
    if isinstance(config, Mapping) and (config or not prefix):
        for key, value in config.items():
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    value = json.dumps(config, default=str) if isinstance(config, (list, tuple, Mapping)) else str(config)
    flat[prefix[:-1]] = redact(value)[:PARAM_MAX_CHARS]   # params are shown to everyone who can read the run
    return flat


class Tracker:
    """One MLflow run, logged through a queue that a background thread sends; survives the server going away."""

    def __init__(self, run_dir: str | Path, tracking_uri: str | None = None, experiment: str = "qgdist",
                 enabled: bool = True, retry_s: float = 10.0, flush_s: float = 2.0,
                 finish_timeout_s: float = 30.0) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.experiment = experiment
        # Floors keep the sender thread from spinning when a test asks for "immediately".
        self.retry_s, self.flush_s = max(retry_s, 0.05), max(flush_s, 0.05)
        self.finish_timeout_s = finish_timeout_s
        self.tracking_uri = tracking_uri or local_store_uri(self.run_dir)
        self.run_id: str | None = None
        self.history: dict[str, tuple[list[int], list[float]]] = {}
        self.outages = 0                          # how many times the tracker was lost (and warned about)
        self._client: Any = None
        # Producers only append; the sender thread only removes what it has sent from the front.
        self._pending_metrics: list[Any] = []     # mlflow.entities.Metric, original timestamps kept
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._last_step: dict[str, int] = {}      # per metric key, to drop replayed steps after a resume
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()            # set while the queue is empty
        self._stop = False
        self._online = True
        self._thread: threading.Thread | None = None

    # -- public API ---------------------------------------------------------------------------------------------
    def start(self, run_name: str, config: Any = None, run_id: str | None = None) -> str | None:
        """Create a run (or reopen ``run_id``), log ``config`` as params; returns the MLflow run id.

        Raises if the tracker cannot be reached at start: a wrong URI should fail loudly, before training.
        """
        if not self.enabled:
            return None
        from mlflow import MlflowClient

        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if self.tracking_uri.startswith("sqlite:"):
            (self.run_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if not run_id:
            run = self._client.create_run(self._experiment_id(), run_name=run_name,
                                          tags={"qgdist.run_name": run_name})
            self.run_id = run.info.run_id
            self._log_params(flatten_config(config or {}))
        else:
            run = self._client.get_run(run_id)   # raises a clear MlflowException for an unknown id
            if replay_unsent(self.run_dir, self.tracking_uri, run_id=run_id):   # what the last attempt spilled
                run = self._client.get_run(run_id)
            self.run_id = run_id
            self._last_step = {m.key: m.step for m in run.data._metric_objs}  # latest metric = highest step
            for key in self._last_step:
                points = sorted((m.step, m.value) for m in self._client.get_metric_history(run_id, key))
                self.history[key] = ([p[0] for p in points], [p[1] for p in points])
            self._client.update_run(run_id, status="RUNNING")
            self._client.set_tag(run_id, "qgdist.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._log_params(flatten_config(config or {}), known=run.data.params)
        self._idle.set()
        self._thread = threading.Thread(target=self._sender, name="qgdist-tracker", daemon=True)
        self._thread.start()
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` for the sender thread; never blocks on the network, never raises."""
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if step <= self._last_step.get(key, -1):
                    continue   # already logged before a resume
                self._last_step[key] = step
                self._pending_metrics.append(Metric(key, float(value), now, int(step)))
                steps, values = self.history.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
            self._idle.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a local file or directory for upload (read when sent: keep it until ``finish``); never raises."""
        if not self.enabled or self.run_id is None:
            return
        with self._lock:
            self._pending_artifacts.append((str(path), artifact_path))
            self._idle.clear()
        self._wake.set()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Ask the sender to send now and wait up to ``timeout_s`` until the queue is empty; True if it is."""
        if not self.enabled or self._thread is None:
            return True
        self._wake.set()
        return self._idle.wait(timeout_s)

    def sync(self, timeout_s: float) -> bool:
        """Send what is queued before a checkpoint commits, so that losing this process (a node lost) loses no
        metric the checkpoint's step has passed. Waits up to ``timeout_s`` while the tracker is reachable and not
        at all while it is away (training must not stall on it); True if the queue is empty."""
        if not self.enabled or self._thread is None:
            return True
        return self.flush(timeout_s if self._online else 0.0)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued (up to ``finish_timeout_s``), mark the run ``status``, spill what is left."""
        if not self.enabled or self.run_id is None or self._thread is None:
            return
        self.flush(self.finish_timeout_s)
        self._stop = True
        self._wake.set()
        self._thread.join(self.finish_timeout_s)
        self._thread = None
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001 -- the run must end even when the tracker is gone
            warnings.warn(f"tracker: could not mark MLflow run {self.run_id} {status}: {err}", stacklevel=2)
            self._spill(status)
            return
        if self.pending:
            self._spill()

    @property
    def pending(self) -> int:
        """How many metrics and artifacts wait for the server."""
        with self._lock:
            return len(self._pending_metrics) + len(self._pending_artifacts)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    # -- internals ----------------------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:"):   # otherwise mlflow would put artifacts in ./mlruns
            location = (self.run_dir / "mlflow" / "artifacts").resolve().as_uri()
        return self._client.create_experiment(self.experiment, artifact_location=location)

    def _log_params(self, params: dict[str, str], known: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Param

        known = known or {}
        changed = {k: v for k, v in params.items() if k in known and known[k] != v}
        new = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(new), 100):   # log_batch takes at most 100 params
            self._client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:   # params are immutable in MLflow: record overrides of a resumed run as tags
            warnings.warn(f"tracker: resumed run {self.run_id} has changed params {sorted(changed)}", stacklevel=3)
            for key, value in changed.items():
                self._client.set_tag(self.run_id, f"qgdist.override.{key}", value)

    def _sender(self) -> None:
        """The background thread: send the queue every ``flush_s`` (when woken: now), ``retry_s`` when offline."""
        while True:
            self._wake.wait(self.flush_s if self._online else self.retry_s)
            self._wake.clear()
            stopping = self._stop
            self._send()
            if stopping:
                return

    def _send(self) -> None:
        try:
            while True:
                with self._lock:
                    chunk = self._pending_metrics[:BATCH_MAX_METRICS]
                if not chunk:
                    break
                # Identical (key, value, timestamp, step) rows are stored once, so a resend after a lost reply
                # does not duplicate anything.
                self._client.log_batch(self.run_id, metrics=chunk)
                with self._lock:
                    del self._pending_metrics[:len(chunk)]
            while True:
                with self._lock:
                    if not self._pending_artifacts:
                        break
                    local, artifact_path = self._pending_artifacts[0]
                _log_local_artifact(self._client, self.run_id, local, artifact_path)
                with self._lock:
                    self._pending_artifacts.pop(0)
        except Exception as err:  # noqa: BLE001 -- connection errors surface as several exception types
            if self._online:
                self._online = False
                self.outages += 1
                warnings.warn(f"tracker: MLflow at {redact(self.tracking_uri)} unreachable ({type(err).__name__}: "
                              f"{redact(str(err))[:200]}); training goes on, buffering metrics until it is back",
                              stacklevel=2)
            return
        with self._lock:
            if not (self._pending_metrics or self._pending_artifacts):
                self._idle.set()
        if not self._online:
            self._online = True
            warnings.warn(f"tracker: MLflow at {redact(self.tracking_uri)} reachable again; buffered data sent",
                          stacklevel=2)

    def _spill(self, status: str | None = None) -> None:
        path = self.run_dir / UNSENT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        count = self.pending
        with open(path, "a") as out:
            for m in self._pending_metrics:
                out.write(json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value,
                                      "timestamp": m.timestamp, "step": m.step}) + "\n")
            for local, artifact_path in self._pending_artifacts:
                out.write(json.dumps({"run_id": self.run_id, "artifact": local, "artifact_path": artifact_path}) + "\n")
            if status is not None:
                out.write(json.dumps({"run_id": self.run_id, "status": status}) + "\n")
        warnings.warn(f"tracker: {count} metrics/artifacts could not be sent; written to {path} "
                      f"(send later with `qgdist tracker --replay {self.run_dir}`)", stacklevel=3)
        self._pending_metrics.clear()
        self._pending_artifacts.clear()


def _log_local_artifact(client: Any, run_id: str, local: str, artifact_path: str | None) -> None:
    """Upload a local file or directory to the run; a file deleted since it was queued is skipped with a warning."""
    if Path(local).is_dir():
        client.log_artifacts(run_id, local, artifact_path)
    elif Path(local).exists():
        client.log_artifact(run_id, local, artifact_path)
    else:
        warnings.warn(f"tracker: artifact {local} no longer exists; skipped", stacklevel=3)


def replay_unsent(run_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None) -> int:
    """Send what a run spilled to ``<run_dir>/mlflow_unsent.jsonl``; returns how many records were sent.

    Metrics keep their original timestamps and MLflow stores identical rows once, so replaying twice (or after a
    partial replay) duplicates nothing. Only records of ``run_id`` are sent when it is given; the others stay in
    the file. The file is rewritten atomically with what is left, and removed when nothing is.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    path = Path(run_dir) / UNSENT_FILE
    if not path.exists():
        return 0
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not JSON ({err}); fix or remove it") from err
    mine = [r for r in records if run_id in (None, r["run_id"])]
    rest = [r for r in records if run_id not in (None, r["run_id"])]
    client = MlflowClient(tracking_uri=tracking_uri or local_store_uri(run_dir))
    by_run: dict[str, list[dict]] = {}
    for record in mine:
        by_run.setdefault(record["run_id"], []).append(record)
    for rid, rows in by_run.items():
        metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows if "key" in r]
        for i in range(0, len(metrics), BATCH_MAX_METRICS):
            client.log_batch(rid, metrics=metrics[i:i + BATCH_MAX_METRICS])
        for r in rows:
            if "artifact" in r:
                _log_local_artifact(client, rid, r["artifact"], r["artifact_path"])
        for r in rows:
            if "status" in r:
                client.set_terminated(rid, status=r["status"])
    if rest:
        write_text(path, "".join(json.dumps(r) + "\n" for r in rest))
    else:
        path.unlink()
    return len(mine)

"""MLflow tracking for one training run, called from world rank 0 only; tracking never stops training.

The whole API (everything else is private)::

    tracker = Tracker(run_dir, tracking_uri=None, experiment="qgdist", enabled=(rank == 0))
    run_id = tracker.start(run_name, config, run_id=None)   # new run, or continue `run_id` (resume)
    tracker.log_metrics({"train/loss": 0.61}, step=global_step)
    tracker.log_artifact("run/roc.png")                       # a file (or a directory) from the local disk
    tracker.sync(timeout_s=10)                                # before a checkpoint commits: sent, or on disk
    tracker.flush(timeout_s=10)                               # optional: wait until everything is delivered
    tracker.finish("FINISHED")                                # or "FAILED" / "KILLED"; sends what is queued
    tracker.history   # {"train/loss": ([steps], [values]), ...}: everything in the run, for loss-curve plots

* ``tracking_uri=None`` means the embedded local store ``sqlite:///<run_dir>/mlflow/mlflow.db`` with artifacts in
  ``<run_dir>/mlflow/artifacts``: no server needed; ``qgdist tracker --store <run_dir>/mlflow`` shows it in the UI.
  The tracker itself reads no environment: commands pass ``qgdist.core.tracking.resolve_tracking_uri(flag)``
  (the flag, else ``$MLFLOW_TRACKING_URI``, else None).
* ``config`` (a dataclass or nested dict) is flattened to ``a.b.c`` params, credentials in URIs masked.
* Resume: ``start(..., run_id=ID)`` (an empty id means a new run) reopens that run and drops any metric whose step
  is <= the last step already logged for that key, so a run resumed from an older checkpoint replays steps
  without duplicating them.
* ``log_metrics`` and ``log_artifact`` only queue; a background thread sends the queue in batches every
  ``flush_s`` seconds, so the training step never waits for the network or sqlite (~10 ms a write).
* Outages, including a server that is unreachable when the run starts: ``start`` still returns (a provisional
  ``pending-...`` id if the run could not be created), one warning says so, and from then on the thread writes
  what it cannot send to the spill file ``<run_dir>/mlflow_unsent.jsonl`` (``qgdist.track.delivery``: one
  atomic append per record, fsync-ed) at every wake, and at once when a checkpoint ``sync``-s; every ``retry_s`` it
  tries the server again, and once it answers it creates or reopens the run, replays the spill and goes on, with a
  second warning. Nothing raises into the training loop, so an outage never costs a Ray worker-group restart.
  What is still unsent at ``finish`` stays in the file: ``qgdist tracker --replay RUN_DIR`` sends it later, and a
  run resumed in the same run directory sends it by itself.
* A tracker that answers but refuses (an unknown run id to resume, a permission error, a malformed URI) is an
  error at ``start``: a wrong setting should fail before training, not after it.
* A disabled tracker (``enabled=False``, the other ranks) does nothing and returns ``None`` from ``start``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qgdist.core.errors import ConfigError
from qgdist.core.run import MLFLOW_DIR
from qgdist.core.secrets import redact
from qgdist.track import delivery
from qgdist.track.delivery import (PENDING_PREFIX, UNSENT_FILE, local_store_uri, replay_unsent,  # noqa: F401 (API)
                                   resolve_run_id)
from qgdist.track.store import seed_local_store

#: Short HTTP timeouts so an unreachable server costs seconds, not minutes (MLflow's defaults: 120 s, 7 retries).
#: Set only where the user has not set them already.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PARAM_MAX_CHARS = 6000   # MLflow 3 rejects longer param values
BATCH_MAX_METRICS = delivery.BATCH_MAX_METRICS


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


def is_outage(err: BaseException) -> bool:
    """True for a server that could not be reached or failed (retry later); False for one that answered "no"."""
    from mlflow.exceptions import RestException

    if isinstance(err, RestException):   # the server answered with an error
        status = err.get_http_status_code()
        return status is None or status >= 500
    return True


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
        self.attempt = uuid.uuid4().hex[:12]      # tags this process's spilled records (see delivery.replay)
        self.history: dict[str, tuple[list[int], list[float]]] = {}
        self.outages = 0                          # how many times the tracker was lost (and warned about)
        self.spilled = 0                          # records this tracker wrote to the spill file
        self._client: Any = None
        # Producers append; the sender thread takes from the front (and puts back what it could not send).
        self._pending_metrics: list[Any] = []     # mlflow.entities.Metric, original timestamps kept
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._last_step: dict[str, int] = {}      # per metric key, to drop replayed steps after a resume
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()            # set while nothing of this run waits anywhere (delivered)
        self._safe = threading.Event()            # set while nothing waits in memory only (delivered or spilled)
        self._spill_now = threading.Event()
        self._tried = threading.Event()           # set after each round of the sender (sent, or spilled)
        self._stop = False
        self._online = True
        self._in_spill = False                    # some of this run's records wait in the spill file
        self._next_try = 0.0
        self._thread: threading.Thread | None = None

    # -- public API ---------------------------------------------------------------------------------------------
    def start(self, run_name: str, config: Any = None, run_id: str | None = None) -> str | None:
        """Create a run (or reopen ``run_id``), log ``config`` as params; returns the MLflow run id, or a
        provisional ``pending-...`` id when the server cannot be reached now (the run is created once it can).

        Raises if the tracker answers with a refusal (unknown run id, permissions) or the URI is malformed.
        """
        if not self.enabled:
            return None
        from mlflow import MlflowClient

        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if redact(self.tracking_uri) != self.tracking_uri:   # mlflow prints "View run at URI" with the password
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if self.tracking_uri.startswith("sqlite:"):
            (self.run_dir / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
            seed_local_store(self.tracking_uri)
        try:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as err:  # noqa: BLE001 -- mlflow raises several types for an unusable URI
            raise ConfigError(f"tracking_uri: {err}", field="tracking_uri", got=redact(self.tracking_uri)) from err
        params = flatten_config(config or {})
        run_id = resolve_run_id(self.run_dir, run_id) or None
        if run_id and run_id.startswith(PENDING_PREFIX) and not any(
                r["run_id"] == run_id and "create" in r for r in delivery.read(self.run_dir)[0]):
            warnings.warn(f"tracker: provisional run {run_id} was never created and its records are gone "
                          f"({self.run_dir / UNSENT_FILE} removed?); starting a new MLflow run", stacklevel=2)
            run_id = None
        try:
            if run_id and not run_id.startswith(PENDING_PREFIX):
                # what earlier attempts spilled goes first (a torn last line is skipped), then the run is reopened
                delivery.replay(self.run_dir, self.tracking_uri, run_id, client=self._client)
                run = delivery.reopen_run(self._client, run_id, params)
                self.run_id = run_id
                self._last_step = {m.key: m.step for m in run.data._metric_objs}
                for key in self._last_step:
                    points = sorted((m.step, m.value) for m in self._client.get_metric_history(run_id, key))
                    self.history[key] = ([p[0] for p in points], [p[1] for p in points])
            elif run_id:   # provisional: the replay of the spill creates it, if the server answers now
                delivery.replay(self.run_dir, self.tracking_uri, run_id, client=self._client)
                return self.start(run_name, config, resolve_run_id(self.run_dir, run_id))
            else:
                self.run_id = delivery.create_run(self._client, self.run_dir, self.tracking_uri, {
                    "run_name": run_name, "experiment": self.experiment, "params": params,
                    "tags": {"qgdist.run_name": run_name}})
        except Exception as err:  # noqa: BLE001 -- connection errors surface as several exception types
            if self.tracking_uri.startswith("sqlite:") or not is_outage(err):
                raise
            self._start_offline(run_name, params, run_id, err)
        return self._started(self.run_id)

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
            self._safe.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a local file or directory for upload (read when sent: keep it until ``finish``); never raises."""
        if not self.enabled or self.run_id is None:
            return
        with self._lock:
            self._pending_artifacts.append((str(path), artifact_path))
            self._idle.clear()
            self._safe.clear()
        self._wake.set()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Ask the sender to send now and wait up to ``timeout_s`` until everything is delivered; True if it is."""
        if not self.enabled or self._thread is None:
            return True
        self._tried.clear()
        self._next_try = 0.0
        self._wake.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._idle.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self._tried.wait(0.5 if left is None else min(left, 0.5)) and not self._online:
                return self._idle.is_set()   # tried and the tracker is away: no point in waiting longer
        return True

    def sync(self, timeout_s: float) -> bool:
        """Before a checkpoint commits: make sure no metric the checkpoint's step has passed lives only in this
        process (a node lost right after the checkpoint would take it along). Waits up to ``timeout_s`` for the
        queue to be sent while the tracker is reachable, and only for it to be spilled to disk while it is not;
        True if nothing waits in memory."""
        if not self.enabled or self._thread is None:
            return True
        if self._online:
            return self.flush(timeout_s) or self._safe.wait(0)
        self._spill_now.set()
        self._wake.set()
        return self._safe.wait(timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued (up to ``finish_timeout_s``), mark the run ``status``, spill what is left."""
        if not self.enabled or self.run_id is None or self._thread is None:
            return
        self.flush(self.finish_timeout_s)
        self._stop = True
        self._wake.set()
        self._thread.join(self.finish_timeout_s)
        self._thread = None
        final = [{"run_id": self.run_id, "attempt": self.attempt, "status": status}]
        if self._online and not self._in_spill:
            try:
                self._client.set_terminated(self.run_id, status=status)
                final = []
            except Exception as err:  # noqa: BLE001 -- the run must end even when the tracker is gone
                warnings.warn(f"tracker: could not mark MLflow run {self.run_id} {status}: {redact(str(err))[:200]}",
                              stacklevel=2)
        self._spill_queue(final)
        if self._in_spill:
            warnings.warn(f"tracker: {self.spilled} metrics/artifacts could not be sent; they are in "
                          f"{self.run_dir / UNSENT_FILE} (send later with `qgdist tracker --replay {self.run_dir}`)",
                          stacklevel=2)

    @property
    def pending(self) -> int:
        """How many metrics and artifacts wait in memory for the server (not counting those spilled to disk)."""
        with self._lock:
            return len(self._pending_metrics) + len(self._pending_artifacts)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

    # -- internals ----------------------------------------------------------------------------------------------
    def _started(self, run_id: str | None) -> str | None:
        if not self._in_spill:
            self._idle.set()
        self._safe.set()
        self._thread = threading.Thread(target=self._sender, name="qgdist-tracker", daemon=True)
        self._thread.start()
        return run_id

    def _start_offline(self, run_name: str, params: dict[str, str], run_id: str | None, err: Exception) -> None:
        """The server is away at start: record what starting needs in the spill, and go on without it."""
        self._online, self.outages, self._next_try = False, 1, time.monotonic() + self.retry_s
        if run_id:
            self.run_id = run_id
            opening = {"resume": {"params": params,
                                  "resumed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        else:
            self.run_id = delivery.new_pending_id()
            opening = {"create": {"run_name": run_name, "experiment": self.experiment, "params": params,
                                  "tags": {"qgdist.run_name": run_name}}}
        self.spilled += delivery.append(self.run_dir, [{"run_id": self.run_id, "attempt": self.attempt, **opening}])
        self._in_spill = True
        if run_id:
            self._steps_from_spill()
        warnings.warn(f"tracker: MLflow at {redact(self.tracking_uri)} unreachable at start ({type(err).__name__}: "
                      f"{redact(str(err))[:200]}); training goes on: metrics go to {self.run_dir / UNSENT_FILE} "
                      f"and are sent when it is back (or `qgdist tracker --replay {self.run_dir}`)", stacklevel=3)

    def _steps_from_spill(self) -> None:
        """A run resumed while its server is away: the steps it spilled before count as logged, as the server's
        do for a run resumed online, so the steps a restart redoes are not recorded twice (the spill holds each
        step once). Steps delivered before the outage are on the server, out of reach until it is back."""
        for record in delivery.read(self.run_dir)[0]:
            key, step = record.get("key"), record.get("step")
            if record.get("run_id") != self.run_id or key is None or step is None:
                continue
            if step > self._last_step.get(key, -1):
                self._last_step[key] = int(step)
                steps, values = self.history.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float("nan") if record.get("value") is None else float(record["value"]))

    def _sender(self) -> None:
        """The background thread: send the queue every ``flush_s`` (when woken: now); while the tracker is away,
        spill it to disk at every wake and try again every ``retry_s``."""
        while True:
            self._wake.wait(self.flush_s if self._online else self.retry_s)
            self._wake.clear()
            stopping = self._stop
            if not self._online and (self._spill_now.is_set() or stopping):
                self._spill_queue()   # a checkpoint waits on this: disk first, the network after
            if self._online or time.monotonic() >= self._next_try or stopping:
                self._send()
            if not self._online:
                self._spill_queue()
            self._tried.set()
            if stopping:
                return

    def _take(self) -> tuple[list[Any], list[tuple[str, str | None]]]:
        with self._lock:
            metrics, self._pending_metrics = self._pending_metrics, []
            artifacts, self._pending_artifacts = self._pending_artifacts, []
        return metrics, artifacts

    def _put_back(self, metrics: list[Any], artifacts: list[tuple[str, str | None]]) -> None:
        with self._lock:
            self._pending_metrics[:0] = metrics
            self._pending_artifacts[:0] = artifacts

    def _send(self) -> None:
        metrics: list[Any] = []
        artifacts: list[tuple[str, str | None]] = []
        try:
            if self._in_spill:   # back after an outage: what waits on disk goes first (and opens the run)
                self._replay_own()
            metrics, artifacts = self._take()
            # Identical (key, value, timestamp, step) rows are stored once: a resend after a lost reply is harmless.
            while metrics:
                delivery.send_metrics(self._client, self.run_id, metrics[:BATCH_MAX_METRICS])
                del metrics[:BATCH_MAX_METRICS]
            while artifacts:
                delivery.log_local_artifact(self._client, self.run_id, *artifacts[0])
                artifacts.pop(0)
        except Exception as err:  # noqa: BLE001 -- connection errors surface as several exception types
            self._put_back(metrics, artifacts)
            self._next_try = time.monotonic() + self.retry_s
            if self._online:
                self._online = False
                self.outages += 1
                warnings.warn(f"tracker: MLflow at {redact(self.tracking_uri)} unreachable ({type(err).__name__}: "
                              f"{redact(str(err))[:200]}); training goes on, metrics wait (on disk at each "
                              "checkpoint) until it is back", stacklevel=2)
            return
        with self._lock:
            if not (self._pending_metrics or self._pending_artifacts):
                self._safe.set()
                self._idle.set()
        if not self._online:
            self._online = True
            warnings.warn(f"tracker: MLflow at {redact(self.tracking_uri)} reachable again; buffered data sent",
                          stacklevel=2)

    def _replay_own(self) -> None:
        """Deliver this run's spilled records (creating or reopening the run), then adopt the real run id."""
        pending = self.run_id
        _, before = delivery.replay(self.run_dir, self.tracking_uri, pending, client=self._client,
                                    fresh_attempt=self.attempt)
        self.run_id = resolve_run_id(self.run_dir, pending)
        with self._lock:   # a resume that logged offline: drop its replayed steps still in memory, as online
            self._pending_metrics = [m for m in self._pending_metrics if m.step > before.get(m.key, -1)]
        self._in_spill = False

    def _spill_queue(self, extra: list[dict[str, Any]] | None = None) -> None:
        """Write what waits in memory (and ``extra``) to the spill file; the queue is then empty but not idle."""
        metrics, artifacts = self._take()
        records = [{"run_id": self.run_id, "attempt": self.attempt, "key": m.key, "value": m.value,
                    "timestamp": m.timestamp, "step": m.step} for m in metrics]
        records += [{"run_id": self.run_id, "attempt": self.attempt, "artifact": local, "artifact_path": where}
                    for local, where in artifacts]
        records += extra or []
        try:
            written = delivery.append(self.run_dir, records)
        except OSError as err:   # a full disk: keep them in memory, say so once per attempt
            self._put_back(metrics, artifacts)
            warnings.warn(f"tracker: could not write {self.run_dir / UNSENT_FILE} ({err}); metrics stay in memory",
                          stacklevel=2)
            return
        self.spilled += written
        if written:
            self._in_spill = True
        self._spill_now.clear()
        with self._lock:
            if not (self._pending_metrics or self._pending_artifacts):
                self._safe.set()

"""Getting a run's records into MLflow, now or later: the spill file, and the MLflow calls both senders share.

The live tracker (``qgdist.track.tracker``) and ``qgdist tracker --replay`` deliver the same records the same way.
What cannot be delivered -- the server is down, even since the run started -- waits in the run directory's spill
file, ``RUN_DIR/mlflow_unsent.jsonl``, one JSON record per line:

* ``{"run_id", "attempt", "create": {"run_name", "experiment", "params", "tags"}}``: a run that could not be
  created because the server was unreachable at start. Its ``run_id`` is provisional (``pending-<hex>``) until the
  run exists; ``RUN_DIR/mlflow_run_ids.json`` then maps it to the real id, so checkpoints written during the outage
  (which carry the provisional id) resume the real run.
* ``{"run_id", "attempt", "resume": {"params", "resumed_at"}}``: a resume that could not reopen its run.
* metrics ``{"run_id", "attempt", "key", "value", "timestamp", "step"}``, artifacts ``{"run_id", "attempt",
  "artifact", "artifact_path"}``, the final ``{"run_id", "attempt", "status"}``.

Appends are atomic in the sense that matters after a crash: each record is one ``write`` of a whole line to a file
opened with ``O_APPEND``, and the batch is ``fsync``-ed before the caller goes on, so a record is on disk or not
there at all -- except the last line of a process killed in the middle of its write. Such a torn line (and any
other line that is not JSON) is skipped and counted with a warning, never a reason to stop a resume; a new append
first ends the torn line, so the next record is never glued onto it.

Replaying is idempotent: a created run is remembered before anything else is sent, metrics keep their timestamps
(MLflow stores identical rows once), artifacts overwrite themselves, and the file is rewritten with what is left
only at the end.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qgdist.core.atomic import write_json, write_text
from qgdist.core.run import MLFLOW_DIR, RUN_IDS_FILE, UNSENT_FILE, local_store_artifacts
from qgdist.core.run import local_store_uri as store_uri

PENDING_PREFIX = "pending-"
BATCH_MAX_METRICS = 1000  # MLflow's log_batch limit
BATCH_MAX_PARAMS = 100


def local_store_uri(run_dir: str | Path) -> str:
    """The embedded sqlite store of a (local) run directory (an absolute ``sqlite:////...`` URI)."""
    return store_uri(Path(run_dir) / MLFLOW_DIR)


def new_pending_id() -> str:
    """A provisional run id, for a run whose tracker was unreachable when it started."""
    return PENDING_PREFIX + uuid.uuid4().hex


# -- the spill file ------------------------------------------------------------------------------------------------
def append(run_dir: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Append ``records`` to the run's spill file, one ``write`` per record, then ``fsync``; returns how many."""
    lines = [(json.dumps(r) + "\n").encode() for r in records]
    if not lines:
        return 0
    path = Path(run_dir) / UNSENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            _write_all(fd, b"\n")   # a torn last line (a process killed mid-write) stays a line of its own
        for line in lines:
            _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read(run_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The spill file's records and how many lines were skipped (not JSON: a torn last line, or damage)."""
    path = Path(run_dir) / UNSENT_FILE
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    records, skipped = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and "run_id" in record:
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def run_ids(run_dir: str | Path) -> dict[str, str]:
    """Provisional run id -> the MLflow run created for it later (empty when there is none)."""
    try:
        return json.loads((Path(run_dir) / RUN_IDS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def remember_run_id(run_dir: str | Path, pending: str, real: str) -> None:
    """Record that provisional run ``pending`` is MLflow run ``real`` (atomically, before anything else is sent)."""
    ids = run_ids(run_dir) | {pending: real}
    write_json(Path(run_dir) / RUN_IDS_FILE, ids)


def resolve_run_id(run_dir: str | Path, run_id: str | None) -> str | None:
    """The real MLflow run id of ``run_id`` (a provisional id once its run exists), else ``run_id`` itself."""
    return run_ids(run_dir).get(run_id, run_id) if run_id else run_id


# -- MLflow operations, shared by the live tracker and the replay ---------------------------------------------------
def experiment_id(client: Any, name: str, tracking_uri: str, run_dir: str | Path) -> str:
    """The id of experiment ``name``, created if needed (a local store keeps its artifacts in the run directory)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):   # otherwise mlflow would put artifacts in ./mlruns
        location = local_store_artifacts(Path(run_dir) / MLFLOW_DIR).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def create_run(client: Any, run_dir: str | Path, tracking_uri: str, create: Mapping[str, Any]) -> str:
    """Create the run a ``create`` record describes and log its params; returns its id."""
    run = client.create_run(experiment_id(client, create["experiment"], tracking_uri, run_dir),
                            run_name=create["run_name"], tags=dict(create.get("tags") or {}))
    log_params(client, run.info.run_id, create.get("params") or {})
    return run.info.run_id


def reopen_run(client: Any, run_id: str, params: Mapping[str, str], resumed_at: str | None = None) -> Any:
    """Mark a resumed run RUNNING again, tag when, record changed params; returns the run as it was."""
    run = client.get_run(run_id)   # an unknown id raises a clear MlflowException
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "qgdist.resumed_at", resumed_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log_params(client, run_id, params, known=run.data.params)
    return run


def log_params(client: Any, run_id: str, params: Mapping[str, str], known: Mapping[str, str] | None = None) -> None:
    """Log new params; changed ones (params are immutable in MLflow) become ``qgdist.override.<key>`` tags."""
    from mlflow.entities import Param

    known = known or {}
    changed = {k: v for k, v in params.items() if k in known and known[k] != v}
    new = [Param(k, v) for k, v in params.items() if k not in known]
    for i in range(0, len(new), BATCH_MAX_PARAMS):
        client.log_batch(run_id, params=new[i:i + BATCH_MAX_PARAMS])
    if changed:
        warnings.warn(f"tracker: resumed run {run_id} has changed params {sorted(changed)}", stacklevel=3)
        for key, value in changed.items():
            client.set_tag(run_id, f"qgdist.override.{key}", value)


def last_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last step logged for each metric key of a run (its latest value is the one at the highest step)."""
    return {m.key: m.step for m in client.get_run(run_id).data._metric_objs}


def log_local_artifact(client: Any, run_id: str, local: str, artifact_path: str | None) -> None:
    """Upload a local file or directory to the run; a file deleted since it was queued is skipped with a warning."""
    if Path(local).is_dir():
        client.log_artifacts(run_id, local, artifact_path)
    elif Path(local).exists():
        client.log_artifact(run_id, local, artifact_path)
    else:
        warnings.warn(f"tracker: artifact {local} no longer exists; skipped", stacklevel=3)


def send_metrics(client: Any, run_id: str, metrics: list[Any]) -> None:
    for i in range(0, len(metrics), BATCH_MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i:i + BATCH_MAX_METRICS])


# -- replay ----------------------------------------------------------------------------------------------------------
def replay(run_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None, *,
           client: Any = None, fresh_attempt: str | None = None) -> tuple[int, dict[str, int]]:
    """Send the spilled records (of ``run_id`` only, when given: the others stay); returns how many were sent and,
    for ``run_id``, the last step per metric key that MLflow held before ``fresh_attempt``'s metrics.

    ``fresh_attempt`` names a resumed attempt that logged offline without knowing what the run already held: its
    metrics at a step <= the run's last step for that key (replayed steps) are dropped, as a live resume does.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    path = Path(run_dir) / UNSENT_FILE
    records, skipped = read(run_dir)
    if skipped:
        warnings.warn(f"tracker: skipped {skipped} unreadable line(s) of {path} (a write cut short by a crash); "
                      "the other records are replayed", stacklevel=2)
    if not records:
        if path.exists():
            path.unlink()
        return 0, {}
    uri = tracking_uri or local_store_uri(run_dir)
    client = client or MlflowClient(tracking_uri=uri)
    ids = run_ids(run_dir)
    want = ids.get(run_id, run_id) if run_id else None
    mine = [r for r in records if want is None or ids.get(r["run_id"], r["run_id"]) == want]
    rest = [r for r in records if not (want is None or ids.get(r["run_id"], r["run_id"]) == want)]
    before: dict[str, int] = {}
    for rid in dict.fromkeys(r["run_id"] for r in mine):           # runs in the order they appear
        rows = [r for r in mine if r["run_id"] == rid]
        for r in rows:                                             # the run first: created or reopened
            if "create" in r and rid not in ids:
                ids[rid] = create_run(client, run_dir, uri, r["create"])
                remember_run_id(run_dir, rid, ids[rid])            # before anything else: never created twice
            elif "resume" in r:
                reopen_run(client, ids.get(rid, rid), r["resume"].get("params") or {}, r["resume"].get("resumed_at"))
        real = ids.get(rid, rid)
        earlier = [r for r in rows if "key" in r and r.get("attempt") != fresh_attempt]
        send_metrics(client, real, [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                                    for r in earlier])
        fresh = [r for r in rows if "key" in r and r.get("attempt") == fresh_attempt]
        if fresh_attempt is not None:
            before = last_steps(client, real)
            fresh = [r for r in fresh if r["step"] > before.get(r["key"], -1)]
        send_metrics(client, real, [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                                    for r in fresh])
        for r in rows:
            if "artifact" in r:
                log_local_artifact(client, real, r["artifact"], r.get("artifact_path"))
        for r in rows:
            if "status" in r:
                client.set_terminated(real, status=r["status"])
    if rest:
        write_text(path, "".join(json.dumps(r) + "\n" for r in rest))
    else:
        path.unlink()
    return len(mine), before


def replay_unsent(run_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None) -> int:
    """Send what a run spilled to ``<run_dir>/mlflow_unsent.jsonl``; returns how many records were sent.

    Only records of ``run_id`` are sent when it is given; the others stay in the file. A run that was never
    created (the server was down when it started) is created now. Replaying twice duplicates nothing.
    """
    return replay(run_dir, tracking_uri, run_id)[0]

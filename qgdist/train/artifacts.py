"""What a finished run leaves for people and for inference: ``RUN/artifacts/``.

``config.json`` (the resolved training config), ``metrics.json`` (final validation metrics and every metric's
history), ``model.pt`` (the ``Checkpoint`` without training state: what ``evaluate``, ``predict`` and ``export``
need), ``curves.png`` (loss and validation curves) and ``roc.png`` (validation ROC).
"""

from __future__ import annotations

from pathlib import Path

from qgdist.core import atomic
from qgdist.core.run import MODEL_FILE, Run
from qgdist.train.checkpoint import Checkpoint
from qgdist.train.state import TrainState


def write_artifacts(run: Run, model: Checkpoint, state: TrainState) -> list[Path]:
    """Write the artifacts (rank 0) locally -- the run directory, or its scratch folder when the run directory is
    a URL -- and copy them up; returns the local files."""
    from qgdist.train.plots import plot_curves, plot_roc  # noqa: PLC0415 -- matplotlib, at the end only

    out = run.local_artifacts
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, doc in (("config.json", model.config), ("metrics.json", {"val": state.val, "history": state.history})):
        atomic.write_json(out / name, doc)
        files.append(out / name)
    atomic.write_bytes(out / MODEL_FILE, model.for_inference().to_bytes())
    files.append(out / MODEL_FILE)
    if state.history:
        files.append(plot_curves({k: tuple(zip(*v)) for k, v in state.history.items() if v}, out / "curves.png"))
    if state.roc is not None:
        fpr, tpr = state.roc
        files.append(plot_roc({f"{model.model_name} val": (fpr.cpu().numpy(), tpr.cpu().numpy())}, out / "roc.png"))
    run.publish(out, run.artifacts)
    return files

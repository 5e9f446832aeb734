"""The typed checkpoint: what a run needs to continue exactly, and what a model needs to score jets anywhere.

``Checkpoint`` is one dataclass with two parts:

* **the model** -- registry name, the full model config it is built from, its weights, and the ``Preprocessing``
  that turns a jet into its inputs; plus the training config, its fingerprint, the identity of the training data
  and the validation metrics. This is all that ``evaluate``, ``predict`` and ``export`` read, and all that
  ``artifacts/model.pt`` holds (``for_inference()``); the ONNX metadata derive from it (``model_card()``).
* **the training state** (``TrainingState``, absent from ``model.pt``) -- optimiser, scheduler, grad scaler, and
  per rank its RNG states, loader position and BatchNorm statistics.

On disk it is ``state_dict()``: plain containers and tensors, with ``schema`` naming the layout, written by
``torch.save`` and read back with ``torch.load(weights_only=True)`` (nothing is unpickled as code).
``from_state_dict`` reads the current layout and migrates the older one (the untyped dict of qgdist before this
module, layout 1); a layout this qgdist does not know is refused with a message naming both versions.

Where checkpoints live and how they are committed is ``qgdist.train.checkpointer``'s business.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qgdist.core.errors import IncompatibleCheckpoint
from qgdist.data.preprocessing import Preprocessing
from qgdist.data.shards.manifest import Manifest

#: The layout written here. 1: the untyped dict written before (no ``schema`` key), migrated on load.
SCHEMA_VERSION = 2
READABLE = (1, 2)


@dataclass
class TrainingState:
    """What continuing the run exactly needs beyond the model: one entry per rank where ranks differ."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    schedule_steps: int                  # the learning-rate schedule's length when this was written
    rng: list[dict[str, Any]]            # per rank: python, numpy, torch (and the current CUDA device's) states
    loader: list[dict[str, Any]]         # per rank: ShardLoader.state_dict() (position and plan settings)
    buffers: list[dict[str, torch.Tensor]] = field(default_factory=list)   # per rank: BatchNorm statistics

    @property
    def world_size(self) -> int:
        """How many ranks wrote it."""
        return int(self.loader[0]["world_size"])


@dataclass
class Checkpoint:
    """A trained (or training) model with everything needed to score jets or to continue training exactly."""

    model_name: str
    model_config: dict[str, Any]         # the family's config dataclass, as built (``qgdist.models.model_config``)
    weights: dict[str, torch.Tensor]
    preprocessing: Preprocessing
    config: dict[str, Any]               # the resolved TrainConfig (``TrainConfig.to_dict()``)
    fingerprint: dict[str, Any]          # its trajectory-shaping fields (``TrainConfig.fingerprint()``)
    epoch: int = 0
    step: int = 0                        # steps done in ``epoch``
    global_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)        # validation metrics at the last epoch end
    history: dict[str, list[list[float]]] = field(default_factory=dict)   # metric -> [[global_step, value], ...]
    mlflow_run_id: str = ""
    dataset: dict[str, Any] | None = None   # the jets it trained and validated on (qgdist.data.identity.TrainedOn)
    training: TrainingState | None = None   # None in model.pt
    schema: int = SCHEMA_VERSION

    # -- what it is ---------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"image"`` or ``"cloud"``."""
        return self.preprocessing.kind

    def build_model(self) -> torch.nn.Module:
        """The network with its trained weights, in eval mode, on the CPU: built from the stored model config."""
        from qgdist.models import get_model  # noqa: PLC0415 -- the registry imports torch-geometric

        model = get_model(self.model_name, **self.model_config)
        model.load_state_dict(self.weights)
        return model.eval()

    def for_inference(self) -> Checkpoint:
        """The same model without the training state (what ``artifacts/model.pt`` holds)."""
        return dataclasses.replace(self, training=None)

    def model_card(self) -> dict[str, str]:
        """String key/value metadata describing the model (ONNX ``metadata_props``)."""
        return {"qgdist.checkpoint_schema": str(self.schema), "qgdist.model": self.model_name,
                "qgdist.model_config": json.dumps(self.model_config),
                "qgdist.preprocessing": json.dumps(self.preprocessing.to_dict()),
                "qgdist.trained_steps": str(self.global_step),
                "qgdist.val_metrics": json.dumps({k: v for k, v in self.metrics.items() if np.isfinite(v)})}

    # -- on disk ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (on the CPU), as ``torch.save(..., weights_only)`` loading accepts."""
        doc = _fields(self)
        doc["preprocessing"] = self.preprocessing.to_dict()
        doc["training"] = _fields(self.training) if self.training is not None else None
        return to_cpu(doc)

    @classmethod
    def from_state_dict(cls, doc: dict[str, Any], where: str = "checkpoint") -> Checkpoint:
        """Read a saved ``state_dict`` of any readable layout (see the module docstring)."""
        schema = doc.get("schema", 1) if isinstance(doc, dict) else None
        if schema not in READABLE:
            raise IncompatibleCheckpoint(
                f"{where}: checkpoint layout version {schema} is not one this qgdist reads (it writes version "
                f"{SCHEMA_VERSION} and reads {', '.join(map(str, READABLE))}): "
                + ("it was written by a newer qgdist; upgrade to use it" if isinstance(schema, int)
                   and schema > SCHEMA_VERSION else "not a qgdist checkpoint"),
                file=where, field="schema", expected=SCHEMA_VERSION, got=schema)
        if schema == 1:
            doc = _from_layout_1(doc, where)
        doc = dict(doc)
        doc["preprocessing"] = Preprocessing.from_dict(doc["preprocessing"])
        doc["training"] = TrainingState(**doc["training"]) if doc.get("training") else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "checkpoint") -> Checkpoint:
        """Load safely (``weights_only=True``) onto the CPU."""
        return cls.from_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), where)


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields, one level deep (``dataclasses.asdict`` would deep-copy every tensor)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _from_layout_1(old: dict[str, Any], where: str) -> dict[str, Any]:
    """The untyped dict of layout 1 in layout 2's fields; the model config is rebuilt from its fingerprint."""
    from qgdist.models import get_model, model_config  # noqa: PLC0415

    fp = old.get("fingerprint") or {}
    if "model" not in fp or not old.get("preprocessing"):
        raise IncompatibleCheckpoint(f"{where}: a layout-1 checkpoint without a fingerprint naming its model or a "
                                     "preprocessing record cannot be read; resume the run once with this qgdist to "
                                     "write a checkpoint of layout 2", file=where)
    pre = Preprocessing.from_dict(old["preprocessing"])
    kwargs = dict(fp.get("model_kwargs") or {})
    if pre.kind == "cloud":
        kwargs.setdefault("in_features", len(pre.feature_names))
    training = None
    if "optimizer" in old:
        training = {"optimizer": old["optimizer"], "scheduler": old["scheduler"], "scaler": old["scaler"],
                    "schedule_steps": old.get("schedule_steps") or old["scheduler"].get("total_steps", 0),
                    "rng": old["rng"], "loader": old["loader"], "buffers": old.get("buffers") or []}
    history = old.get("history") or {}
    last_val = {k.removeprefix("val/"): v[-1][1] for k, v in history.items() if k.startswith("val/") and v}
    return {"model_name": fp["model"], "model_config": model_config(get_model(fp["model"], **kwargs)),
            "weights": old["model"], "preprocessing": old["preprocessing"],
            "config": json.loads(old["config"]) if isinstance(old.get("config"), str) else old.get("config", {}),
            "fingerprint": fp, "epoch": old["epoch"], "step": old["step"], "global_step": old["global_step"],
            "metrics": last_val, "history": history, "mlflow_run_id": old.get("mlflow_run_id") or "",
            "training": training, "schema": SCHEMA_VERSION}


def check_dataset(checkpoint: Checkpoint, manifest: Manifest, data: str, where: str, allow: bool = False) -> str | None:
    """Refuse to continue a checkpoint on another dataset than it trained on (unless ``allow``); returns a line
    saying what changed when allowed, None when nothing did (or the checkpoint predates dataset ids)."""
    from qgdist.data.identity import TrainedOn  # noqa: PLC0415

    saved = TrainedOn.from_dict(checkpoint.dataset)
    if saved is None or saved.dataset_id == manifest.dataset_id:
        return None
    now = f"dataset {manifest.dataset_id or '(no id: converted by an older qgdist)'} ({data})"
    if not allow:
        raise IncompatibleCheckpoint(
            f"{where} was trained on {saved.describe()}, but --data is {now}: a resumed run would mix the two. "
            "Use another --run-name to train on this dataset, or --allow-config-change to continue anyway.",
            file=where, field="data", expected=saved.dataset_id, got=manifest.dataset_id)
    return f"dataset changed since the checkpoint (allowed): {saved.describe()} -> {now}"


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str, allow: bool = False) -> list[str]:
    """Differences between a checkpoint's fingerprint and this run's; raises unless ``allow``."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if k != "hash" and saved.get(k) != current.get(k)]
    if diffs and not allow:
        raise IncompatibleCheckpoint(
            f"{where} was written with a different training config, so it cannot be resumed exactly:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --run-name to start afresh, or --allow-config-change to resume anyway.",
            file=where, field="fingerprint", expected=saved.get("hash"), got=current.get("hash"))
    return diffs


# -- the pieces of a rank's state ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, and the current CUDA device's) in a form ``weights_only``
    loading accepts.

    Only the current device's CUDA state is kept: a rank drives one GPU, and a resume may see fewer GPUs or give
    the rank another local index, where a list of every visible GPU's state would not fit.
    """
    np_name, np_key, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_name, torch.from_numpy(np_key.astype(np.int64)), np_pos, np_gauss, np_cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # Checkpoints written before this change hold a list of every visible GPU's state: take the first.
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it moved to the CPU (dicts, lists and tuples are rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj

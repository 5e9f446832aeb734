"""Checkpoints: complete training state in a directory, an atomic pointer to the latest one, best + last K kept.

Layout under ``<run_dir>/checkpoints/``::

    step-000000120/state.pt   model, optimizer, scheduler, scaler, RNG states of every rank, position, fingerprint
    latest.json               {"name": "step-000000120", "epoch": 1, "step": 0, "global_step": 120, ...}
    best.json                 the same for the checkpoint with the highest validation AUC

The pointer is the commit: ``latest.json`` is written only once every file of its checkpoint is complete, and
readers (resume, ``evaluate``, ``fit``'s driver) find checkpoints only through it, never by listing. How the
checkpoint's files become complete depends on the storage (``qgdist.core.storage.renames``):

* local disk (a path or ``file://``): the directory is written under a temporary name ``.step-N.tmp`` and renamed
  when complete, then ``latest.json`` is replaced atomically (temp file + ``os.replace``);
* object storage (``s3://`` and other URLs): there is no rename (``fs.mv`` copies and deletes every object), so
  every object is written under its final name (one PUT each, which appears whole) and ``latest.json`` is
  written last, as one small object. An interrupted save leaves objects no pointer names, which the next save of
  the same step overwrites and pruning removes.

A run killed at any instant therefore leaves a pointer to a complete checkpoint (or none), which is why we keep
our own pointer instead of trusting Ray's bookkeeping (a SIGINT between Ray creating a checkpoint folder and
registering it makes a re-run start from scratch). Files are read with ``torch.load(weights_only=True)``: nothing
in them is unpickled as code.
"""

from __future__ import annotations

import io
import json
import os
import random
from typing import Any

import numpy as np
import torch
from upath import UPath

from qgdist.core.errors import IncompatibleCheckpoint
from qgdist.core.atomic import write_bytes, write_text
from qgdist.core.storage import list_dirs, move, read_bytes, remove_tree, renames, run_path

STATE_FILE = "state.pt"
LATEST = "latest.json"
BEST = "best.json"


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


class Checkpointer:
    """Saves and finds checkpoints of one run (call ``save`` on world rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike[str], keep_last: int = 2):
        self.root = run_path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def save(self, state: dict[str, Any], auc: float | None = None) -> UPath:
        """Write ``state`` (must hold ``global_step``, ``epoch``, ``step``) and move the pointers; returns its dir."""
        name = f"step-{state['global_step']:09d}"
        final = self.root / name
        buffer = io.BytesIO()
        torch.save(to_cpu(state), buffer)  # loadable on a machine without the GPU that trained it
        if renames(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{name}.tmp"
            remove_tree(tmp)
            tmp.mkdir()
            (tmp / STATE_FILE).write_bytes(buffer.getbuffer())
            remove_tree(final)  # a re-run that reaches the same step again
            move(tmp, final)
        else:
            # Object storage: each object under its final name (a re-run reaching this step overwrites it whole);
            # the pointer below commits the checkpoint.
            write_bytes(final / STATE_FILE, buffer.getbuffer())
        summary = {"name": name, "epoch": state["epoch"], "step": state["step"],
                   "global_step": state["global_step"], "val_auc": auc}
        write_text(self.root / LATEST, json.dumps(summary, indent=1, sort_keys=True))
        best = self.pointer(BEST)
        if auc is not None and (best is None or best.get("val_auc") is None or auc > best["val_auc"]):
            write_text(self.root / BEST, json.dumps(summary, indent=1, sort_keys=True))
        self._prune()
        return final

    def pointer(self, which: str = LATEST) -> dict[str, Any] | None:
        """The ``latest.json`` / ``best.json`` summary, or None when the run has no checkpoint yet."""
        try:  # read from the store itself: an existence check could answer from another process's stale listing
            return json.loads(read_bytes(self.root / which))
        except FileNotFoundError:
            return None

    def latest(self) -> UPath | None:
        """The latest complete checkpoint directory, or None."""
        doc = self.pointer(LATEST)
        return self.root / doc["name"] if doc else None

    def best(self) -> UPath | None:
        doc = self.pointer(BEST)
        return self.root / doc["name"] if doc else None

    def _prune(self) -> None:
        latest, best = self.pointer(LATEST), self.pointer(BEST)
        keep = {d["name"] for d in (latest, best) if d}
        names = [n for n in list_dirs(self.root) if n.startswith("step-")]  # never the local ".step-*.tmp"
        # The last K up to the latest: a name beyond it is a save that died before its pointer (object storage),
        # never committed, and must not push a committed checkpoint out of the K kept.
        committed = [n for n in names if latest is None or n <= latest["name"]]
        keep |= set(committed[-self.keep_last:])
        for name in names:
            if name not in keep:
                remove_tree(self.root / name)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint directory (or its ``state.pt``) safely (``weights_only=True``) onto the CPU."""
    path = run_path(path)
    data = None
    for file in (path / STATE_FILE, path):  # a checkpoint directory (or prefix), else the file itself
        try:
            data = read_bytes(file)
            break
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
    if data is None:
        raise FileNotFoundError(f"{path}: no {STATE_FILE} (not a qgdist checkpoint, or an incomplete one)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str, allow: bool = False) -> list[str]:
    """Differences between a checkpoint's fingerprint and this run's; raises unless ``allow``."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if k != "hash" and saved.get(k) != current.get(k)]
    if diffs and not allow:
        raise IncompatibleCheckpoint(
            f"{where} was written with a different training config, so it cannot be resumed exactly:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --run-name to start afresh, or --allow-config-change to resume anyway.")
    return diffs

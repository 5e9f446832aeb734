"""Where a run's checkpoints live, how each is committed, and how they are found again.

Layout (names in ``qgdist.core.run``)::

    RUN/checkpoints/step-000000120/state.pt   one Checkpoint (qgdist.train.checkpoint)
    RUN/checkpoints/latest.json               {"name": "step-000000120", "epoch": 1, "step": 0, "global_step": 120, ...}
    RUN/checkpoints/best.json                 the same for the checkpoint with the highest validation AUC

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
registering it makes a re-run start from scratch).
"""

from __future__ import annotations

import json
import os

from upath import UPath

from qgdist.core.atomic import write_bytes, write_text
from qgdist.core.errors import InputError
from qgdist.core.run import BEST, CHECKPOINT_PREFIX, LATEST, STATE_FILE, Run, checkpoint_name
from qgdist.core.storage import list_dirs, move, read_bytes, remove_tree, renames, run_path
from qgdist.train.checkpoint import Checkpoint


class Checkpointer:
    """Saves and finds checkpoints of one run (call ``save`` on world rank 0 only)."""

    def __init__(self, run: Run | str | os.PathLike[str], keep_last: int = 2):
        self.run = run if isinstance(run, Run) else Run(str(run))
        self.root = self.run.checkpoints
        self.keep_last = max(1, keep_last)

    def save(self, checkpoint: Checkpoint, auc: float | None = None) -> UPath:
        """Write ``checkpoint`` and move the pointers (``auc``: its validation AUC, at epoch ends); returns its
        directory."""
        name = checkpoint_name(checkpoint.global_step)
        final = self.root / name
        data = checkpoint.to_bytes()
        if renames(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{name}.tmp"
            remove_tree(tmp)
            tmp.mkdir()
            (tmp / STATE_FILE).write_bytes(data)
            remove_tree(final)  # a re-run that reaches the same step again
            move(tmp, final)
        else:
            # Object storage: each object under its final name (a re-run reaching this step overwrites it whole);
            # the pointer below commits the checkpoint.
            write_bytes(final / STATE_FILE, data)
        summary = {"name": name, "epoch": checkpoint.epoch, "step": checkpoint.step,
                   "global_step": checkpoint.global_step, "val_auc": auc}
        write_text(self.run.pointer(LATEST), json.dumps(summary, indent=1, sort_keys=True))
        best = self.pointer(BEST)
        if auc is not None and (best is None or best.get("val_auc") is None or auc > best["val_auc"]):
            write_text(self.run.pointer(BEST), json.dumps(summary, indent=1, sort_keys=True))
        self._prune()
        return final

    def pointer(self, which: str = LATEST) -> dict | None:
        """The ``latest.json`` / ``best.json`` summary, or None when the run has no checkpoint yet."""
        try:  # read from the store itself: an existence check could answer from another process's stale listing
            return json.loads(read_bytes(self.run.pointer(which)))
        except FileNotFoundError:
            return None

    def latest(self) -> UPath | None:
        """The latest complete checkpoint directory, or None."""
        doc = self.pointer(LATEST)
        return self.root / doc["name"] if doc else None

    def best(self) -> UPath | None:
        """The checkpoint with the best validation AUC, or None."""
        doc = self.pointer(BEST)
        return self.root / doc["name"] if doc else None

    def _prune(self) -> None:
        latest, best = self.pointer(LATEST), self.pointer(BEST)
        keep = {d["name"] for d in (latest, best) if d}
        names = [n for n in list_dirs(self.root) if n.startswith(CHECKPOINT_PREFIX)]  # never ".step-*.tmp"
        # The last K up to the latest: a name beyond it is a save that died before its pointer (object storage),
        # never committed, and must not push a committed checkpoint out of the K kept.
        committed = [n for n in names if latest is None or n <= latest["name"]]
        keep |= set(committed[-self.keep_last:])
        for name in names:
            if name not in keep:
                remove_tree(self.root / name)


    def resume_point(self, resume_from: str | None = None) -> tuple[UPath | None, Checkpoint | None]:
        """The checkpoint a (re)started run continues from, and where it was read: ``resume_from`` if given, else
        the run's latest; (None, None) for a fresh start."""
        source = run_path(resume_from) if resume_from else self.latest()
        return (source, load_checkpoint(source)) if source is not None else (None, None)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory, its ``state.pt``, or a ``model.pt`` (local or URL) onto the CPU."""
    path = run_path(path)
    for file in (path / STATE_FILE, path):  # a checkpoint directory (or prefix), else the file itself
        try:
            data = read_bytes(file)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
        return Checkpoint.from_bytes(data, str(file))
    raise InputError(f"{path}: no {STATE_FILE} (not a qgdist checkpoint, or an incomplete one)", file=str(path))


def find_checkpoint(path: str | os.PathLike[str]) -> UPath:
    """What a user names as ``--checkpoint``: a checkpoint directory, its ``state.pt``, a ``model.pt``, or a run
    directory (its best checkpoint by validation AUC, else its latest); local or URL."""
    path = run_path(path)
    if path.is_file():
        return path
    if (path / STATE_FILE).exists():
        return path
    ckpt = Checkpointer(Run(str(path)))
    found = ckpt.best() or ckpt.latest()
    if found is not None:
        return found
    raise InputError(f"{path}: neither a checkpoint (no {STATE_FILE}) nor a run directory with checkpoints",
                     file=str(path), field="checkpoint")

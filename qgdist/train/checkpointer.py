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
registering it makes a re-run start from scratch). Locally every file and directory is flushed to the disk (fsync)
before the pointer moves.

Damage: each checkpoint directory ends with ``checkpoint.json``, its files with their sizes and sha256 (written
last, like torch.distributed.checkpoint's ``.metadata``), and every load verifies them. A resume whose latest
checkpoint is damaged (truncated, altered, its index or the pointer torn) says so in one line and continues from
the newest intact checkpoint instead (``resume_point``); Ray's restarts and a Kubernetes retry go through the same
code. An explicitly named checkpoint (``--resume-from``, ``--checkpoint``) that is damaged is an error naming the
file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field

from upath import UPath

from qgdist.core.atomic import fsync, write_bytes, write_text
from qgdist.core.errors import InputError, QgdistError
from qgdist.core.run import BEST, CHECKPOINT_PREFIX, INDEX_FILE, LATEST, STATE_FILE, Run, checkpoint_name
from qgdist.core.storage import list_dirs, local_file, move, read_bytes, remove_tree, renames, run_path
from qgdist.train.checkpoint import Checkpoint


class DamagedCheckpoint(InputError):
    """A checkpoint whose files are missing, truncated or altered (``file`` names the one that failed)."""


@dataclass
class ResumePoint:
    """The checkpoint a (re)started run continues from (``path`` None: a fresh start), and the damaged ones that
    were skipped to find it (one line each, for the user)."""

    path: UPath | None = None
    checkpoint: Checkpoint | None = None
    skipped: list[str] = field(default_factory=list)


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
        files = {STATE_FILE: data,
                 INDEX_FILE: json.dumps({"global_step": checkpoint.global_step, "files": {
                     STATE_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}).encode()}
        if renames(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{name}.tmp"
            remove_tree(tmp)
            tmp.mkdir()
            for file, content in files.items():   # the index last
                (tmp / file).write_bytes(content)
                fsync(local_file(tmp / file))
            fsync(local_file(tmp))
            remove_tree(final)  # a re-run that reaches the same step again
            move(tmp, final)
            fsync(local_file(self.root))
        else:
            # Object storage: each object under its final name (a re-run reaching this step overwrites it whole),
            # the index last; the pointer below commits the checkpoint.
            for file, content in files.items():
                write_bytes(final / file, content)
        summary = {"name": name, "epoch": checkpoint.epoch, "step": checkpoint.step,
                   "global_step": checkpoint.global_step, "val_auc": auc}
        write_text(self.run.pointer(LATEST), json.dumps(summary, indent=1, sort_keys=True))
        best = self.pointer(BEST)
        if auc is not None and (best is None or best.get("val_auc") is None or auc > best["val_auc"]):
            write_text(self.run.pointer(BEST), json.dumps(summary, indent=1, sort_keys=True))
        self._prune()
        return final

    def pointer(self, which: str = LATEST) -> dict | None:
        """The ``latest.json`` / ``best.json`` summary, or None when the run has no checkpoint yet.

        Raises ``DamagedCheckpoint`` when the pointer exists but cannot be read."""
        path = self.run.pointer(which)
        try:  # read from the store itself: an existence check could answer from another process's stale listing
            doc = json.loads(read_bytes(path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as err:
            raise DamagedCheckpoint(f"{path}: not a readable pointer ({err})", file=str(path)) from None
        if not isinstance(doc, dict) or not str(doc.get("name", "")).startswith(CHECKPOINT_PREFIX):
            raise DamagedCheckpoint(f"{path}: not a readable pointer (no checkpoint name)", file=str(path))
        return doc

    def latest(self) -> UPath | None:
        """The latest complete checkpoint directory, or None."""
        doc = self.pointer(LATEST)
        return self.root / doc["name"] if doc else None

    def best(self) -> UPath | None:
        """The checkpoint with the best validation AUC, or None."""
        doc = self.pointer(BEST)
        return self.root / doc["name"] if doc else None

    def resume_point(self, resume_from: str | None = None) -> ResumePoint:
        """Where a (re)started run continues: ``resume_from`` if given (damaged: an error), else the latest intact
        checkpoint of the run -- the pointer's, or when that is damaged the newest intact one before it."""
        if resume_from:
            path = run_path(resume_from)
            return ResumePoint(path, load_checkpoint(path))
        point = ResumePoint()
        try:
            latest = self.pointer(LATEST)
        except DamagedCheckpoint as err:
            point.skipped.append(f"{err}: skipped")
            latest = {"name": "~"}   # sorts after every step-N: every listed checkpoint is a candidate
        if latest is None:
            return point
        names = [n for n in list_dirs(self.root) if n.startswith(CHECKPOINT_PREFIX) and n <= latest["name"]]
        for name in sorted(set(names) | ({latest["name"]} - {"~"}), reverse=True):
            try:
                point.path = self.root / name
                point.checkpoint = load_checkpoint(point.path)
                return point
            except DamagedCheckpoint as err:
                point.skipped.append(f"checkpoint {err}: skipped")
        raise DamagedCheckpoint(f"{self.root}: every checkpoint is damaged, so the run cannot continue:\n  "
                                + "\n  ".join(point.skipped)
                                + "\nMove the run directory aside (or use another --run-name) to start afresh.",
                                file=str(self.root))

    def _prune(self) -> None:
        try:
            latest, best = self.pointer(LATEST), self.pointer(BEST)
        except DamagedCheckpoint:
            return   # never delete by a pointer we cannot read
        keep = {d["name"] for d in (latest, best) if d}
        names = [n for n in list_dirs(self.root) if n.startswith(CHECKPOINT_PREFIX)]  # never ".step-*.tmp"
        # The last K up to the latest: a name beyond it is a save that died before its pointer (object storage),
        # never committed, and must not push a committed checkpoint out of the K kept.
        committed = [n for n in names if latest is None or n <= latest["name"]]
        keep |= set(committed[-self.keep_last:])
        for name in names:
            if name not in keep:
                remove_tree(self.root / name)



def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory, its ``state.pt``, or a ``model.pt`` (local or URL) onto the CPU, verifying the
    files its index lists; ``DamagedCheckpoint`` names what is wrong."""
    path = run_path(path)
    for file in (path / STATE_FILE, path):  # a checkpoint directory (or prefix), else the file itself
        try:
            data = read_bytes(file)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
        _verify(file, data)
        try:
            return Checkpoint.from_bytes(data, str(file))
        except QgdistError:   # read, and refused as it is (a newer layout, a model it cannot rebuild): not damage
            raise
        except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as err:
            raise DamagedCheckpoint(f"{file}: unreadable ({type(err).__name__}: {str(err)[:200]})",
                                    file=str(file)) from None
    raise DamagedCheckpoint(f"{path}: no {STATE_FILE} (not a qgdist checkpoint, or an incomplete one)",
                            file=str(path))


def _verify(file: UPath, data: bytes) -> None:
    """Compare ``data`` with the size and sha256 the checkpoint's index lists for ``file`` (an index-less file,
    such as model.pt or a checkpoint written before indexes, is checked by loading it)."""
    index_path = file.parent / INDEX_FILE
    try:
        index = json.loads(read_bytes(index_path))
    except FileNotFoundError:
        return
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{index_path}: unreadable index ({err})", file=str(index_path)) from None
    want = (index.get("files") or {}).get(file.name) if isinstance(index, dict) else None
    if want is None:
        raise DamagedCheckpoint(f"{index_path}: lists no {file.name}", file=str(index_path))
    if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise DamagedCheckpoint(f"{file}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}... "
                                f"(its index says {want['bytes']} bytes, {want['sha256'][:12]}...)",
                                file=str(file), expected=want["sha256"], got=hashlib.sha256(data).hexdigest())


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
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint or run directory", file=str(path), field="checkpoint",
                         hint="--checkpoint takes a run directory (STORAGE/RUN_NAME: its best checkpoint, else its "
                              "latest), a checkpoint directory (RUN_DIR/checkpoints/step-N), its state.pt or a "
                              "model.pt")
    raise InputError(f"{path}: neither a checkpoint (no {STATE_FILE}) nor a run directory with checkpoints",
                     file=str(path), field="checkpoint")

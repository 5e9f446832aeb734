"""Outputs a failed or killed command never destroys: written beside the old one, committed by one file last.

A command's output directory (``convert``'s dataset, ``predict``'s scores, ``evaluate``'s results) is a set of
files plus one **commit file** written last and atomically (``manifest.json``, ``summary.json``, ``metrics.json``)
that names the others. Readers trust only what the commit file names. So:

* before anything is written, every input and option has been checked (the command's job), and an existing
  complete output -- its commit file exists -- is refused unless ``--overwrite``;
* with ``--overwrite`` the new files go into a fresh *generation* folder beside the old ones (``g-<id>/``), the new
  commit file (naming ``g-<id>/...``) replaces the old one in one atomic write, and only then are the old files
  deleted. A rerun that fails or is killed at any point leaves the previous output complete: its commit file and
  every file it names are untouched, and the half-written generation folder is ignored and removed next time;
* an output directory with no commit file holds nothing complete: leftovers of a killed first run are removed and
  the files are written at the top level, as they always were.

Local paths and object storage (``s3://``) work alike: nothing here renames a directory.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec

from qgdist.core.errors import InputError
from qgdist.core.storage import is_object_store, join, list_names

GENERATION = re.compile(r"^g-[0-9a-f]{8}$")


@dataclass
class Output:
    """One command's output directory (``root``: path or URL) and the file that commits it."""

    root: str
    commit_file: str
    what: str                      # "a converted dataset", for the refusal message
    overwrite: bool = False
    ours: re.Pattern[str] = field(default=re.compile(r".*"))   # names this command writes at the top level
    prefix: str = ""               # where this run's files go: "" or "g-<id>/"

    def committed(self) -> bool:
        """True when a complete earlier output is there."""
        fs, root = fsspec.core.url_to_fs(self.root)
        return fs.exists(posixpath.join(root, self.commit_file))

    def check(self) -> None:
        """Refuse an existing complete output unless ``overwrite`` (call before any work)."""
        if self.committed() and not self.overwrite:
            raise InputError(f"out: {self.root} already holds {self.what} ({self.commit_file}); give --overwrite "
                             "to replace it (the old one stays whole until the new one is complete)",
                             file=self.root, field="out")

    def begin(self) -> str:
        """Choose where this run writes and return that prefix: a new generation folder beside a committed
        output, else the top level after removing a killed first run's leftovers."""
        self.check()
        fs, root = fsspec.core.url_to_fs(self.root)
        if not is_object_store(self.root):
            fs.makedirs(root, exist_ok=True)
        if self.committed():
            self.prefix = f"g-{uuid.uuid4().hex[:8]}/"
        else:
            self._remove([n for n in list_names(self.root) if self.ours.match(n) or GENERATION.match(n)])
            self.prefix = ""
        return self.prefix

    def name(self, name: str) -> str:
        """This run's file ``name`` relative to the root (what the commit file names)."""
        return self.prefix + name

    def path(self, name: str) -> str:
        """Where this run's file ``name`` goes (a path or URL)."""
        return join(self.root, self.prefix + name)

    def finish(self, old: Iterable[str] = ()) -> None:
        """After the new commit file is written: delete the files the old one named (``old``, relative names) that
        the new one does not, and every other generation folder."""
        keep = self.prefix.rstrip("/")
        self._remove([n for n in old if not n.startswith(self.prefix or "\0")])
        self._remove([n for n in list_names(self.root) if GENERATION.match(n) and n != keep])

    def _remove(self, names: list[str]) -> None:
        if not names:
            return
        fs, root = fsspec.core.url_to_fs(self.root)
        for name in names:
            try:
                fs.rm(posixpath.join(root, name), recursive=True)
            except FileNotFoundError:
                pass

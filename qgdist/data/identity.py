"""Which data a model saw: dataset ids, source-file hashes, and the jets a model trained or validated on.

A converted dataset is identified by its **dataset id** (``Manifest.dataset_id``): a hash of its sources (each
input file's sha256), the conversion settings that decide which jet lands where (source format, split fractions,
dtype, chunking, label convention) and its shards' sha256. Two conversions of the same files with the same
settings have the same id; anything else gives another.

A model's training and validation jets are identified compactly, without listing them: a jet is (source file,
row), a source file is its sha256, and the split of a row is a pure function of (file name, row, fractions)
(``qgdist.data.split``). So ``TrainedOn`` -- the training dataset's id, split fractions, its sources' names,
hashes and row counts, and the rows its conversion rejected -- tells for any jet of any dataset whether the model
trained or validated on it: the same file (same sha256, whatever its name now) and a row whose split under the
*training* conversion was train or val. ``evaluate`` and ``predict`` count those jets and refuse to report
metrics on them unless told to (their metrics would be optimistic).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np

from qgdist.data.shards.manifest import Manifest
from qgdist.data.sources.base import file_name
from qgdist.data.split import SPLIT_NAMES, assign_splits

_BLOCK = 8 << 20


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (local path or URL), streamed in 8 MiB blocks: never the whole file in memory."""
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def dataset_id(manifest: Manifest) -> str:
    """The id of a converted dataset (16 hex digits): sources, conversion settings and shard hashes."""
    doc = {"sources": {name: s["sha256"] for name, s in sorted(manifest.sources.items())},
           "settings": {"source": manifest.source, "split": manifest.split_fractions, "dtype": manifest.dtype,
                        "chunk_jets": manifest.chunk_jets, "labels": manifest.label_convention,
                        "schema": manifest.schema_version},
           "shards": sorted((s.name, s.sha256) for s in manifest.shards)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _rejected_rows(manifest: Manifest) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in manifest.quarantine:
        if r.get("row") is not None:
            out.setdefault(r["file"], []).append(int(r["row"]))
    return out


@dataclass(frozen=True)
class TrainedOn:
    """The compact identity of the jets a model trained and validated on (see the module docstring)."""

    dataset_id: str
    data: str                                        # where the training dataset was (for messages)
    split_fractions: tuple[float, float, float]
    sources: dict[str, dict[str, Any]]               # file name -> {"sha256", "rows", "bytes"}
    rejected: dict[str, list[int]] = field(default_factory=dict)   # file name -> rows its conversion left out

    @classmethod
    def of_manifest(cls, manifest: Manifest, data: str) -> TrainedOn | None:
        """The identity of a run training on ``manifest``'s train and val splits; None for a dataset converted
        before datasets had identities (nothing can then be checked)."""
        if not manifest.dataset_id or not manifest.sources:
            return None
        return cls(manifest.dataset_id, data, tuple(manifest.split_fractions[s] for s in SPLIT_NAMES),
                   dict(manifest.sources), _rejected_rows(manifest))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"split_fractions": list(self.split_fractions)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> TrainedOn | None:
        if not doc:
            return None
        return cls(**(doc | {"split_fractions": tuple(doc["split_fractions"])}))

    def describe(self) -> str:
        return f"dataset {self.dataset_id} ({self.data})"

    def seen(self, sha256: str, rows: np.ndarray) -> np.ndarray:
        """Which ``rows`` of the file with this ``sha256`` the model trained or validated on."""
        names = [name for name, s in self.sources.items() if s["sha256"] == sha256]
        if not names:
            return np.zeros(len(rows), bool)
        name = names[0]
        seen = assign_splits(name, rows, self.split_fractions) < SPLIT_NAMES.index("test")
        left_out = self.rejected.get(name)
        if left_out:
            seen &= ~np.isin(rows, left_out)
        return seen

    def seen_in_files(self, files: Iterable[tuple[str, str, np.ndarray]]) -> dict[str, int]:
        """Per scored file (name, sha256, the rows scored): how many of those rows the model has seen; only files
        with any."""
        counts = {}
        for name, sha, rows in files:
            n = int(self.seen(sha, rows).sum())
            if n:
                counts[name] = n
        return counts

    def seen_in_dataset(self, manifest: Manifest, splits: Iterable[str]) -> dict[str, int]:
        """Per source file of a converted dataset, how many jets of its ``splits`` the model has seen."""
        wanted = [SPLIT_NAMES.index(s) for s in splits]
        rejected = _rejected_rows(manifest)
        fractions = tuple(manifest.split_fractions[s] for s in SPLIT_NAMES)

        def scored() -> Iterable[tuple[str, str, np.ndarray]]:
            for name, source in manifest.sources.items():
                rows = np.arange(int(source["rows"]), dtype=np.int64)
                keep = np.isin(assign_splits(name, rows, fractions), wanted)
                if name in rejected:
                    keep &= ~np.isin(rows, rejected[name])
                yield name, source["sha256"], rows[keep]

        return self.seen_in_files(scored())


def source_records(paths: list[str], rows: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "bytes", "rows"}}`` of input files (``rows``: by path, as planned)."""
    out = {}
    for path in paths:
        fs, p = fsspec.core.url_to_fs(path)
        out[file_name(path)] = {"sha256": file_sha256(path), "bytes": int(fs.size(p)), "rows": int(rows.get(path, 0))}
    return out

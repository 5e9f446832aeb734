"""``manifest.json``: the table of contents of a converted dataset, written last and atomically.

A directory of shards is a dataset only once its manifest exists; a conversion that dies midway leaves none, so
nothing downstream ever reads a half-written dataset. Layout (``schema_version`` 2)::

    {
      "schema_version": 2,
      "source": "cms" | "energyflow",
      "kind": "image" | "cloud",
      "dtype": "float32" | "float16",
      "label_convention": "cms: y=0 is quark, y=1 is gluon",
      "inputs": ["file:///.../a.parquet", ...],
      "split_fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
      "chunk_jets": 256,
      "shards": [{"name": "train-000000-000.tar", "split": "train", "samples": 812, "bytes": 2345, "sha256": "...",
                  "chunks": 4, "index": [199680, 201216]}],
      "splits": {"train": {"shards": 9, "samples": 8012, "bytes": ...}, "val": {...}, "test": {...}},
      "rows": {"in": 10000, "written": 9990, "rejected": 10},
      "quarantine": [{"file": "a.parquet", "row": 17, "field": "X_jets", "reason": "NaN"}],
      "stats": {...},  # normalisation statistics from the train split only, see below
      "sources": {"a.parquet": {"sha256": "...", "bytes": 123456, "rows": 10000}},
      "dataset_id": "3f2a9c0e5b7d1a48"   # sources + conversion settings + shard hashes (qgdist.data.identity)
    }

A shard's ``samples`` counts **jets** and ``chunks`` its tar samples (chunks of jets). ``index`` is the byte range
of the shard's last member, ``<last key>.index.npy``: an int64 (chunks, 3) array of every chunk's first byte, end
byte and jets. One range read of it lets a reader fetch any chunk alone, and know the jets of any subset of chunks,
while the manifest itself stays one line per shard however many chunks there are.

``stats`` (train split only)::

    {"samples": 8012,
     "jet": {"log_pt": {"mean": m, "std": s}, "mass": {"mean": m, "std": s}},
     "image":    {"channel_mean": [3 floats], "channel_std": [3 floats]},              # image datasets
     "particle": {"features": ["deta", "dphi", ...], "mean": [...], "std": [...]}}    # cloud datasets
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from qgdist.core.atomic import write_text
from qgdist.core.errors import InputError
from qgdist.core.secrets import redact, redact_config
from qgdist.core.storage import join
from qgdist.data.shards.schema import CHUNK_JETS, SCHEMA_VERSION, SchemaError

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    chunks: int = 0                                 # chunks (tar samples) in the shard
    index: list[int] = field(default_factory=list)  # [first byte, end byte] of its chunk index member


@dataclass
class Manifest:
    source: str
    kind: str
    dtype: str
    label_convention: str
    inputs: list[str]
    split_fractions: dict[str, float]
    shards: list[ShardInfo]
    rows: dict[str, int]
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    chunk_jets: int = CHUNK_JETS
    schema_version: int = SCHEMA_VERSION
    #: input file name -> {"sha256", "bytes", "rows"}: what the dataset was made from (qgdist.data.identity)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: a hash of the sources, the conversion settings and the shards' sha256 ("" before datasets had ids)
    dataset_id: str = ""

    @property
    def splits(self) -> dict[str, dict[str, int]]:
        totals = {s: {"shards": 0, "samples": 0, "bytes": 0} for s in SPLITS}
        for shard in self.shards:
            t = totals.setdefault(shard.split, {"shards": 0, "samples": 0, "bytes": 0})
            t["shards"] += 1
            t["samples"] += shard.samples
            t["bytes"] += shard.bytes
        return totals

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        doc = asdict(self)
        doc["splits"] = self.splits
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        doc = json.loads(text)
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            if isinstance(version, int) and version < SCHEMA_VERSION:
                raise SchemaError(
                    f"{where}: shards in schema version {version} (one jet per tar sample); this qgdist reads "
                    f"schema version {SCHEMA_VERSION} (chunks of jets stored as columns): re-run `qgdist convert` "
                    "on the source files to rewrite the dataset")
            raise SchemaError(f"{where}: schema_version {version!r}, this qgdist reads {SCHEMA_VERSION} "
                              "(written by a newer qgdist?)")
        doc.pop("splits", None)
        doc["shards"] = [ShardInfo(**s) for s in doc["shards"]]
        return cls(**doc)


def write_manifest(manifest: Manifest, directory: str) -> str:
    """Write ``directory/manifest.json`` atomically (``qgdist.core.atomic``); returns its path or URL."""
    path = join(directory, MANIFEST_NAME)
    # The file outlives the process and is shared with the dataset: input URLs keep no credentials in it.
    shared = dataclasses.replace(manifest, inputs=[redact(i) for i in manifest.inputs],
                                 quarantine=redact_config(manifest.quarantine))
    write_text(path, shared.to_json())
    return path


def read_manifest(directory: str) -> Manifest:
    """Read the manifest of a converted dataset (local path or any fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(directory)
    path = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(path):
        if not fs.isdir(root):
            raise InputError(f"{directory}: no such dataset directory", file=directory,
                             hint="--data takes the --out directory of `qgdist convert`")
        raise InputError(f"{directory}: no {MANIFEST_NAME} (not a converted dataset, or conversion unfinished)",
                         file=directory)
    with fs.open(path, "r") as f:
        return Manifest.from_json(f.read(), where=path)

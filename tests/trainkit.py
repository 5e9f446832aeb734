"""Tiny synthetic shard datasets for the loader / training tests, written through the project's schema + manifest.

Quark jets are narrower and have fewer particles than gluon jets, so a model can learn something in a few steps.
Shards hold chunks of ``chunk_jets`` jets (schema 2), small by default so that even tiny shards hold several chunks
(strided shard parts are made of whole chunks).
"""

from __future__ import annotations

import json
import os

import numpy as np

from qgdist.data.features import jet_kinematics
from qgdist.data.shards.manifest import Manifest, write_manifest
from qgdist.data.shards.schema import CLOUD_JET, IMAGE_JET, CloudChunk, ImageChunk, JetChunk, sort_particles
from qgdist.data.shards.writer import ChunkWriter, ShardWriter
from qgdist.data.stats import StatSums

_PIDS = np.array([22, 211, -211, 130, 2112, 321, 11, 13])


def _clouds(rng: np.random.Generator, quark: np.ndarray, rows: np.ndarray) -> CloudChunk:
    kins, pids, jets = [], [], np.zeros(len(rows), CLOUD_JET)
    for i, q in enumerate(quark.tolist()):   # test data: one jet at a time is fine here
        n = int(rng.integers(8, 20) if q else rng.integers(18, 40))
        width = 0.05 if q else 0.12
        pt = rng.exponential(20.0, n).astype(np.float32) + 0.5
        kin = np.stack([pt, rng.normal(0.0, width, n), rng.normal(0.5, width, n)], axis=1).astype(np.float32)
        pid = rng.choice(_PIDS, n).astype(np.int32)
        axes = jet_kinematics(kin, pid)
        jets[i] = (rows[i], q, axes["pt"], axes["mass"], axes["jet_y"], axes["jet_phi"], n)
        kins.append(kin)
        pids.append(pid)
    kin, pid = sort_particles(np.concatenate(kins), np.concatenate(pids), jets["n"])
    return CloudChunk(file="toy.npz", source="energyflow", jets=jets, kin=kin, pid=pid)


def _images(rng: np.random.Generator, quark: np.ndarray, rows: np.ndarray, size: int) -> ImageChunk:
    imgs = np.zeros((len(rows), 3, size, size), np.float32)
    for i, q in enumerate(quark.tolist()):
        width, n = (1.5, 15) if q else (4.0, 30)
        xy = np.clip(rng.normal(size / 2, width, (n, 2)).astype(int), 0, size - 1)
        for c in range(3):
            imgs[i, c, xy[:, 0], xy[:, 1]] += rng.exponential(5.0, n).astype(np.float32)
    flat = imgs.reshape(len(rows), -1)
    img, pix = np.nonzero(flat)
    jets = np.zeros(len(rows), IMAGE_JET)
    jets["row"], jets["is_quark"] = rows, quark
    jets["pt"], jets["mass"] = rng.uniform(70, 300, len(rows)), rng.uniform(5, 50, len(rows))
    jets["n"] = np.bincount(img, minlength=len(rows))
    return ImageChunk(file="toy.parquet", source="cms", jets=jets, pix=pix.astype(np.uint16), val=flat[img, pix],
                      image_shape=(3, size, size))


def write_dataset(out: str, kind: str, samples: dict[str, list[int]], seed: int = 0, image_size: int = 16,
                  chunk_jets: int = 4, sorted_labels: bool = False) -> str:
    """Write shards ``{split}-{NNNNNN}.tar`` with the given jet counts per shard, plus a manifest; returns ``out``.

    ``sorted_labels``: each split's first half of jets (in shard order) are quarks, the rest gluons -- the worst
    case for a loader's shuffling."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, row, stats = [], 0, StatSums()
    for split, counts in samples.items():
        for i, count in enumerate(counts):
            rows = np.arange(row, row + count)
            quark = rng.integers(2, size=count).astype(np.uint8)
            if sorted_labels:
                half, before = sum(counts) / 2, sum(counts[:i])
                quark = (np.arange(before, before + count) < half).astype(np.uint8)
            block: JetChunk = _clouds(rng, quark, rows) if kind == "cloud" else _images(rng, quark, rows, image_size)
            writer = ChunkWriter(ShardWriter(out, split, lambda k, n=f"{split}-{i:06d}.tar": n), chunk_jets)
            writer.add(block)
            shards += writer.close()
            row += count
            if split == "train":
                stats.add(block)
    manifest = Manifest(source="energyflow" if kind == "cloud" else "cms", kind=kind, dtype="float32",
                        label_convention="synthetic", inputs=["synthetic"],
                        split_fractions={"train": 0.8, "val": 0.1, "test": 0.1}, shards=shards,
                        rows={"in": row, "written": row, "rejected": 0}, stats=stats.finish(), chunk_jets=chunk_jets)
    write_manifest(manifest, out)
    return out


def strict_json(text: str) -> dict:
    """Parse as a strict JSON reader would: NaN and Infinity are not JSON."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)

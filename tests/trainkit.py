"""Tiny synthetic shard datasets for the loader / training tests, written through the project's schema + manifest.

Quark jets are narrower and have fewer particles than gluon jets, so a model can learn something in a few steps.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import webdataset as wds

from qgdist.data.features import PRESETS, jet_kinematics, particle_features
from qgdist.data.shards.manifest import Manifest, ShardInfo, write_manifest
from qgdist.data.shards.schema import CloudSample, ImageSample, encode_sample, sample_key

_PIDS = np.array([22, 211, -211, 130, 2112, 321, 11, 13])


def _cloud(rng: np.random.Generator, quark: bool, row: int) -> CloudSample:
    n = int(rng.integers(8, 20) if quark else rng.integers(18, 40))
    width = 0.05 if quark else 0.12
    pt = rng.exponential(20.0, n).astype(np.float32) + 0.5
    kin = np.stack([pt, rng.normal(0.0, width, n), rng.normal(0.5, width, n)], axis=1).astype(np.float32)
    pid = rng.choice(_PIDS, n).astype(np.int32)
    meta = {"is_quark": int(quark), "file": "toy.npz", "row": row, "source": "energyflow", "n": n}
    meta |= jet_kinematics(kin, pid)
    return CloudSample(meta, kin, pid)


def _image(rng: np.random.Generator, quark: bool, row: int, size: int) -> ImageSample:
    img = np.zeros((3, size, size), np.float32)
    width = 1.5 if quark else 4.0
    n = 15 if quark else 30
    xy = np.clip(rng.normal(size / 2, width, (n, 2)).astype(int), 0, size - 1)
    for c in range(3):
        img[c, xy[:, 0], xy[:, 1]] += rng.exponential(5.0, n).astype(np.float32)
    meta = {"is_quark": int(quark), "pt": float(rng.uniform(70, 300)), "mass": float(rng.uniform(5, 50)),
            "file": "toy.parquet", "row": row, "source": "cms"}
    return ImageSample.from_dense(img, meta)


def write_dataset(out: str, kind: str, samples: dict[str, list[int]], seed: int = 0, image_size: int = 16) -> str:
    """Write shards ``{split}-{NNNNNN}.tar`` with the given sample counts per shard, plus a manifest; returns ``out``."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, row = [], 0
    log_pt, mass, feats = [], [], []
    for split, counts in samples.items():
        for i, count in enumerate(counts):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(os.path.join(out, name)) as tar:
                for _ in range(count):
                    quark = bool(rng.integers(2))
                    s = _cloud(rng, quark, row) if kind == "cloud" else _image(rng, quark, row, image_size)
                    tar.write(encode_sample(sample_key("toy", row), s))
                    row += 1
                    if split == "train":
                        log_pt.append(np.log(s.meta["pt"]))
                        mass.append(s.meta["mass"])
                        if kind == "cloud":
                            m = np.ones((1, len(s.kin)), bool)
                            _, f = particle_features(s.kin[None], s.pid[None], m, np.array([s.meta["jet_y"]]),
                                                     np.array([s.meta["jet_phi"]]), "kin")
                            feats.append(f[0])
            data = open(os.path.join(out, name), "rb").read()
            shards.append(ShardInfo(name, split, count, len(data), hashlib.sha256(data).hexdigest()))
    stats: dict = {"samples": len(log_pt), "jet": {"log_pt": {"mean": float(np.mean(log_pt)), "std": float(np.std(log_pt))},
                                                  "mass": {"mean": float(np.mean(mass)), "std": float(np.std(mass))}}}
    if kind == "cloud":
        f = np.concatenate(feats)
        stats["particle"] = {"features": PRESETS["kin"], "mean": f.mean(0).tolist(), "std": f.std(0).tolist()}
    manifest = Manifest(source="energyflow" if kind == "cloud" else "cms", kind=kind, dtype="float32",
                        label_convention="synthetic", inputs=["synthetic"],
                        split_fractions={"train": 0.8, "val": 0.1, "test": 0.1}, shards=shards,
                        rows={"in": row, "written": row, "rejected": 0}, stats=stats)
    write_manifest(manifest, out)
    return out

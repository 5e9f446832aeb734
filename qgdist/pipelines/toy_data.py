"""Toy datasets: toy jets generated (``qgdist.generate.toy``) and converted to shards in this process.

What the benches (and tests) train and read when no real dataset is given. Conversion uses the in-process
executor (no Ray), so a toy dataset costs only the generation and the encoding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Kind = Literal["cloud", "image"]

#: Dataset kind -> (source format it is generated in, raw file name).
SOURCES: dict[str, tuple[str, str]] = {"cloud": ("energyflow", "toy.npz"), "image": ("cms", "toy.parquet")}


def toy_file(format: str, jets: int, path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write ``jets`` toy jets to ``path`` in a public source format (``"energyflow"`` npz or ``"cms"`` parquet)."""
    from qgdist.generate.toy import ToyConfig
    from qgdist.generate.toy import run as generate

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    generate(ToyConfig(format=format, jets=jets, out=str(path), seed=seed, overwrite=True))   # our own scratch
    return str(path)


def toy_dataset(kind: Kind, jets: int, root: str | os.PathLike[str], seed: int = 0) -> str:
    """A converted toy dataset of ``jets`` jets under ``root``; returns its directory (``root/<kind>``).

    ``kind`` is the model kind it feeds: ``"cloud"`` (EnergyFlow-format particle clouds) or ``"image"``
    (CMS-format jet images). The raw file stays next to it (``root/toy.npz`` or ``root/toy.parquet``), so both
    kinds can share one ``root``.
    """
    from qgdist.data.convert import ConvertConfig, convert

    if kind not in SOURCES:
        raise ValueError(f"toy dataset kind must be one of {sorted(SOURCES)}, not {kind!r}")
    source, name = SOURCES[kind]
    root = Path(root)
    raw = toy_file(source, jets, root / name, seed)
    out = root / kind
    convert(ConvertConfig(source=source, inputs=[raw], out=str(out), executor="local", progress=False))
    return str(out)


def toy_shards(out: str, kind: Kind, samples: dict[str, list[int]], seed: int = 0, image_size: int = 20,
               chunk_jets: int = 4, sorted_labels: bool = False) -> str:
    """Shards of toy jets written directly, with the layout given: ``{split}-{NNNNNN}.tar`` holding
    ``samples[split][i]`` jets each, in chunks of ``chunk_jets``, plus a manifest; returns ``out``.

    The jets come from the toy generator (``qgdist.generate.toy``) like every toy dataset; what this adds is
    control over the shard layout (tests of the loader's dealing, strided parts, resumes) and tiny images
    (``image_size`` pixels a side, coarser pixels than CMS's so a jet still fits), without a conversion.
    Clouds go through the EnergyFlow reader's own decoding. ``sorted_labels``: each split's first half of jets (in
    shard order) are quarks, the rest gluons -- the worst case for a loader's shuffling.
    """
    import numpy as np

    from qgdist.data.labels import LabelConvention
    from qgdist.data.shards.manifest import Manifest, write_manifest
    from qgdist.data.shards.schema import IMAGE_JET, ImageChunk
    from qgdist.data.shards.writer import ChunkWriter, ShardWriter
    from qgdist.data.sources import energyflow
    from qgdist.data.stats import StatSums
    from qgdist.generate import toy
    from qgdist.generate.formats import pad_clouds

    if kind not in SOURCES:
        raise ValueError(f"toy dataset kind must be one of {sorted(SOURCES)}, not {kind!r}")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    source, name = SOURCES[kind]
    labels = LabelConvention.default(source)
    shards, row, stats = [], 0, StatSums()
    for split, counts in samples.items():
        for i, count in enumerate(counts):
            rows = np.arange(row, row + count)
            quark = rng.integers(2, size=count).astype(np.uint8)
            if sorted_labels:
                quark = (np.arange(sum(counts[:i]), sum(counts[:i]) + count) < sum(counts) / 2).astype(np.uint8)
            jets = toy.generate(quark, rng.uniform(500, 550, count), rng.uniform(-1.7, 1.7, count),
                                rng.uniform(0, 2 * np.pi, count), rng)
            if kind == "cloud":
                x = pad_clouds(toy.energyflow_clouds(jets))
                block = energyflow.decode_rows(x, quark.astype(np.float64), rows, name, labels, "float32").block
            else:
                flat = toy.cms_images(jets, rng, image_size, 2 * toy.R_JET / image_size).reshape(count, -1)
                img, pix = np.nonzero(flat)
                info = np.zeros(count, IMAGE_JET)
                info["row"], info["is_quark"] = rows, quark
                info["pt"], info["mass"] = toy.jet_sums(jets)
                info["n"] = np.bincount(img, minlength=count)
                block = ImageChunk(file=name, source=source, jets=info, pix=pix.astype(np.uint16),
                                   val=flat[img, pix].astype(np.float32), image_shape=(3, image_size, image_size))
            writer = ChunkWriter(ShardWriter(out, split, lambda k, n=f"{split}-{i:06d}.tar": n), chunk_jets)
            writer.add(block)
            shards += writer.close()
            row += count
            if split == "train":
                stats.add(block)
    manifest = Manifest(source=source, kind=kind, dtype="float32", label_convention=labels.describe(),
                        inputs=[f"toy generator, seed {seed}"], split_fractions={"train": 0.8, "val": 0.1, "test": 0.1},
                        shards=shards, rows={"in": row, "written": row, "rejected": 0}, stats=stats.finish(),
                        chunk_jets=chunk_jets)
    write_manifest(manifest, out)
    return out

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

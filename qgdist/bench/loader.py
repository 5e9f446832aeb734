"""``qgdist bench loader``: loader jets/s per core for both formats, next to what each model consumes per core.

For each format (clouds, images) it measures, in one run and one process each (so "per core" is one process):

* the loader: a full training epoch of ``ShardLoader`` (read tar -> shuffle buffer -> decode -> features /
  sparse pixels -> collate -> dense tensors on the CPU), ``num_workers=0`` so it runs on one core;
* the model: ``train_step`` throughput of the format's model on those same batches, with one torch thread.

The target is loader >= 5x model. Data: ``--cloud-data`` / ``--image-data`` (converted datasets), else toy data
generated and converted (in-process executor) into a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoaderBenchConfig:
    cloud_data: str | None = None
    image_data: str | None = None
    jets: int = 3000               # toy clouds when no data is given (images: a third)
    cloud_model: str = "particlenet-lite"
    image_model: str = "resnet15"
    cloud_batch: int = 128
    image_batch: int = 32
    model_steps: int = 6


def _toy(kind: str, jets: int, root: Path) -> str:
    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.generate.toy import ToyConfig
    from qgdist.generate.toy import run as make_toy

    source, name = ("energyflow", "toy.npz") if kind == "cloud" else ("cms", "toy.parquet")
    make_toy(ToyConfig(source, jets, str(root / name), 0))
    convert(ConvertConfig(source=source, inputs=[str(root / name)], out=str(root / kind), executor="local",
                          progress=False))
    return str(root / kind)


def loader_speed(data: str, batch_size: int) -> tuple[float, list]:
    """Jets/s of one training epoch on one core; returns the speed and the first few batches for the model."""
    from qgdist.data.loader import LoaderConfig, ShardLoader

    loader = ShardLoader(LoaderConfig(data, batch_size=batch_size, shuffle_buffer=1000))
    start, jets, kept = time.perf_counter(), 0, []
    for inputs, label in loader.epoch(0):
        jets += len(label)
        if len(kept) < 8:
            kept.append((inputs, label))
    return jets / (time.perf_counter() - start), kept


def model_speed(name: str, batches: list, in_features: int, steps: int) -> float:
    """Jets/s of ``train_step`` for model ``name`` on one thread (after one untimed step)."""
    import torch

    from qgdist.models import get_model
    from qgdist.train.step import train_step

    kwargs = {"in_features": in_features} if batches[0][0].get("features") is not None else {}
    model = get_model(name, **kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, *batches[0], opt)
    start, jets = time.perf_counter(), 0
    for i in range(steps):
        inputs, label = batches[i % len(batches)]
        train_step(model, inputs, label, opt)
        jets += len(label)
    return jets / (time.perf_counter() - start)


def run(cfg: LoaderBenchConfig) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # per core
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgdist-bench-loader-") as tmp:
        for kind, data, model, batch in (("cloud", cfg.cloud_data, cfg.cloud_model, cfg.cloud_batch),
                                         ("image", cfg.image_data, cfg.image_model, cfg.image_batch)):
            data = data or _toy(kind, cfg.jets if kind == "cloud" else max(cfg.jets // 3, 200), Path(tmp))
            load, batches = loader_speed(data, batch)
            in_features = batches[0][0]["features"].shape[-1] if kind == "cloud" else 0
            consume = model_speed(model, batches, in_features, cfg.model_steps)
            rows.append({"format": kind, "model": model, "batch": batch, "loader_jets_s": load,
                         "model_jets_s": consume, "ratio": load / consume})
    print(f"{'format':7} {'model':18} {'batch':>5} {'loader jets/s/core':>19} {'model jets/s/core':>18} "
          f"{'loader/model':>12}  (target >= 5x)")
    for r in rows:
        print(f"{r['format']:7} {r['model']:18} {r['batch']:5d} {r['loader_jets_s']:19.0f} "
              f"{r['model_jets_s']:18.1f} {r['ratio']:11.1f}x")
    return rows


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("loader", help="loader jets/s per core for both formats vs model consumption")
    p.add_argument("--cloud-data", default=None)
    p.add_argument("--image-data", default=None)
    p.add_argument("--jets", type=int, default=3000, help="toy clouds when no data is given (images: a third)")
    p.add_argument("--cloud-batch", type=int, default=128)
    p.add_argument("--image-batch", type=int, default=32)
    p.set_defaults(func=lambda a: run(LoaderBenchConfig(a.cloud_data, a.image_data, a.jets,
                                                        cloud_batch=a.cloud_batch, image_batch=a.image_batch))
                   and 0)

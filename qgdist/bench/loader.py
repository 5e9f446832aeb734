"""``qgdist bench loader``: loader jets/s per core for both formats, next to what each model consumes per core.

For each format (clouds, images) it measures, in one run and one process each (so "per core" is one process):

* the loader: a full training epoch of ``ShardLoader`` (read tar -> shuffle buffer -> decode -> features /
  sparse pixels -> collate -> dense tensors on the CPU), ``num_workers=0`` so it runs on one core;
* the model: ``train_step`` throughput of the format's model on those same batches, with one torch thread.

The target is loader >= 5x model. Data: ``--cloud-data`` / ``--image-data`` (converted datasets), else toy data
generated and converted (in-process executor) into a temporary directory.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

from qgdist.core.config import option


@dataclass(frozen=True)
class LoaderBenchConfig:
    """``qgdist bench loader`` settings."""

    cloud_data: str | None = option(None, "converted cloud dataset (default: toy clouds)")
    image_data: str | None = option(None, "converted image dataset (default: toy images)")
    jets: int = option(3000, "toy clouds when no data is given (images: a third)")
    cloud_model: str = option("particlenet-lite", "model that consumes the clouds")
    image_model: str = option("resnet15", "model that consumes the images")
    cloud_batch: int = option(128, "jets per cloud batch")
    image_batch: int = option(32, "jets per image batch")
    model_steps: int = option(6, "timed model steps per format")


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

    from qgdist.pipelines.toy_data import toy_dataset

    torch.set_num_threads(1)  # per core
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgdist-bench-loader-") as tmp:
        for kind, data, model, batch in (("cloud", cfg.cloud_data, cfg.cloud_model, cfg.cloud_batch),
                                         ("image", cfg.image_data, cfg.image_model, cfg.image_batch)):
            data = data or toy_dataset(kind, cfg.jets if kind == "cloud" else max(cfg.jets // 3, 200), tmp)
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

"""The data stage's settings as a training run sees them (the ``data`` section of ``TrainConfig``).

``ConvertConfig`` (``qgdist convert``) lives next to the conversion in ``qgdist.data.convert``; this module
holds what a trainer reads: which converted dataset, and how it is batched, shuffled and turned into features.
The loader takes this section as it is (``ShardLoader(cfg.data, ...)``): there is no second loader config.
It imports no torch, so command-line parsing stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qgdist.core.config import option

Preset = Literal["kin", "kinpid"]


@dataclass(frozen=True)
class DataConfig:
    """Which converted dataset a run reads and how each rank batches it."""

    data: str = option(help="converted dataset directory or fsspec URL (holds manifest.json)")
    batch_size: int = option(256, "jets per step on each worker (global batch = batch size x workers)", min=1)
    preset: Preset = option("kin", "particle feature preset of cloud models (kin: 7 features, kinpid: 13)")
    max_particles: int = option(128, "keep at most this many particles per jet, hardest first", min=1)
    shuffle_buffer: int = option(8192, "jets in each loader worker's shuffle pool beyond one batch, drawn from "
                                 "several chunks (0: no shuffling)", min=0)
    loader_workers: int = option(0, "DataLoader processes per training worker (0: decode in the training process)",
                                 min=0)
    verify_shards: bool = option(False, "check each shard's sha256 against the manifest the first time this process "
                                        "reads it (one extra sequential read of each shard; see bench loader)")

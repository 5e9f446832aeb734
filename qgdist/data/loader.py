"""Per-rank streaming loader: WebDataset shards -> model-ready batches, with exact mid-epoch positions.

How an epoch is laid out (all of it derived from ``seed``, ``epoch``, the manifest's shard sizes, the world size and
the number of DataLoader workers, so every rank computes the same plan without talking to the others):

1. The split's shards are shuffled with ``Random(seed, epoch)`` and dealt to ``world_size * num_workers`` *slots*
   (largest first, each to the slot holding the fewest samples: balanced and disjoint). Rank ``r`` owns slots
   ``r*W .. r*W+W-1``; its DataLoader worker ``w`` streams slot ``r*W+w``. When there are fewer shards than slots,
   a shard is split into strided parts (part ``j`` of ``n`` keeps samples ``j, j+n, ...``).
2. Each worker reads its shards with the stock ``webdataset`` library (our own node/worker split, so
   ``nodesplitter=None``), passes raw samples through a seeded shuffle buffer, decodes and collates them.
3. For training every worker yields the same number ``m`` of full batches (the smallest slot decides), so every
   rank runs exactly ``m * W`` steps: DDP needs equal step counts, and the DataLoader's round robin over workers
   makes batch ``i`` come from worker ``i % W`` -- which is what makes a position exact.

A position is ``(epoch, step)``; resuming at step ``s`` makes worker ``w`` replay its raw sample stream through the
same shuffle buffer and discard the first batches it had already delivered, without decoding them.

Images travel sparse (flat pixel indices + values) and are densified where the batch lands (on the GPU when
training there); clouds are sorted by pt, trimmed to ``max_particles`` and padded to the longest jet in the batch.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.filters import _shuffle
from webdataset.gopen import gopen_schemes

from qgdist.data.config import DataConfig
from qgdist.data.features import particle_features
from qgdist.data.preprocessing import Preprocessing
from qgdist.data.shards.manifest import Manifest, read_manifest


@dataclass
class LoaderConfig:
    """What one rank reads and how it is batched."""

    data: str                       # directory holding manifest.json and the shards
    split: str = "train"
    batch_size: int = 256
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0            # DataLoader worker processes (0: decode in the training process)
    seed: int = 0
    shuffle_buffer: int = 2000      # samples; 0 disables shuffling (evaluation)
    training: bool = True           # equal full batches on every rank; False: every sample once, last batch partial
    preset: str = "kin"             # cloud feature preset (qgdist.data.features.PRESETS)
    max_particles: int = 128
    device: str = "cpu"             # where batches land; images are densified there
    prefetch_factor: int = 4
    # The model's preprocessing (a checkpoint's); None: build it from this dataset's train-split statistics
    # with ``preset`` and ``max_particles`` (training). Given, it replaces both and must fit the dataset.
    preprocessing: Preprocessing | None = None

    @classmethod
    def of_run(cls, data: DataConfig, split: str, *, training: bool, rank: int = 0, world_size: int = 1,
               seed: int = 0, device: str = "cpu", preprocessing: Preprocessing | None = None) -> LoaderConfig:
        """One rank's loader for a training run's ``data`` section (no shuffling unless ``training``)."""
        return cls(data.data, split=split, batch_size=data.batch_size, rank=rank, world_size=world_size,
                   num_workers=data.loader_workers, seed=seed, shuffle_buffer=data.shuffle_buffer if training else 0,
                   training=training, preset=data.preset, max_particles=data.max_particles, device=device,
                   preprocessing=preprocessing)


@dataclass(frozen=True)
class ShardPart:
    """A piece of work: shard ``path``, part ``part`` of ``parts`` (strided), holding ``samples`` samples."""

    path: str
    part: int
    parts: int
    samples: int


def plan_epoch(manifest: Manifest, data: str, split: str, seed: int, epoch: int,
               slots: int) -> list[list[ShardPart]]:
    """Deal the split's shards to ``slots`` slots for ``epoch``: disjoint, balanced by samples, seeded."""
    shards = manifest.shards_of(split)
    if not shards:
        raise ValueError(f"{data}: manifest lists no {split!r} shards")
    parts = -(-slots // len(shards))  # ceil: split shards only when there are fewer than slots
    units = [ShardPart(os.path.join(data, s.name), j, parts, (s.samples - j + parts - 1) // parts)
             for s in shards for j in range(parts)]
    rng = random.Random(f"{seed}-{epoch}")
    rng.shuffle(units)
    units.sort(key=lambda u: -u.samples)  # stable: equal sizes keep their shuffled order
    plan: list[list[ShardPart]] = [[] for _ in range(slots)]
    load = [0] * slots
    for unit in units:
        target = min(range(slots), key=lambda i: (load[i], i))
        plan[target].append(unit)
        load[target] += unit.samples
    for units_of_slot in plan:
        rng.shuffle(units_of_slot)
    return plan


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    return fsspec.open(url, mode).open()


def _register_url_scheme(path: str) -> None:
    """Let webdataset open ``s3://`` (and any other fsspec URL) through fsspec, as the rest of qgdist does.

    webdataset opens local paths, ``file://``, ``pipe:``, http(s) and a few more itself; for a scheme it has no
    handler for it raises "no gopen handler defined". Its dispatch table is the documented extension point.
    """
    scheme = urlparse(path).scheme
    if len(scheme) > 1 and scheme not in gopen_schemes:
        gopen_schemes[scheme] = _fsspec_gopen


def _raw_samples(units: list[ShardPart]) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of ``units`` in order, read with the stock webdataset pipeline."""
    for unit in units:
        _register_url_scheme(unit.path)   # here, in the DataLoader worker process that opens the shard
        ds = wds.WebDataset(unit.path, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        yield from itertools.islice(iter(ds), unit.part, None, unit.parts)


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """Every raw (undecoded) sample of one shard file, in order: what ``Collate`` takes."""
    return _raw_samples([ShardPart(path, 0, 1, 0)])


def _npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


class Collate:
    """Turns lists of raw samples (tar members) into batches of tensors, standardised with ``pre``'s statistics.

    Runs inside DataLoader workers, and in ``qgdist predict``'s scoring actors on samples read straight from the
    source files, so shards and raw files go through exactly the same preprocessing.
    """

    def __init__(self, pre: Preprocessing):
        self.kind, self.preset, self.max_particles = pre.kind, pre.preset, pre.max_particles
        self.jet_mean = np.array(pre.jet_mean, np.float32)
        self.jet_std = np.array(pre.jet_std, np.float32)
        self.feat_mean = np.array(pre.feature_mean, np.float32)
        self.feat_std = np.array(pre.feature_std, np.float32)

    def __call__(self, raws: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        metas = [json.loads(r["meta.json"]) for r in raws]
        label = torch.tensor([float(m["is_quark"]) for m in metas], dtype=torch.float32)
        jet = np.array([[np.log(max(m["pt"], 1e-9)), m["mass"]] for m in metas], np.float32)
        batch = {"label": label, "jet": torch.from_numpy((jet - self.jet_mean) / self.jet_std),
                 "key": [r["__key__"] for r in raws], "file": [m.get("file", "") for m in metas],
                 "row": torch.tensor([int(m.get("row", -1)) for m in metas], dtype=torch.int64)}
        return batch | (self._images(raws, metas) if self.kind == "image" else self._clouds(raws, metas))

    def _images(self, raws: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        shape = tuple(metas[0]["image_shape"])
        size = int(np.prod(shape))
        pix, val = [], []
        for b, (raw, meta) in enumerate(zip(raws, metas)):
            if tuple(meta["image_shape"]) != shape:
                raise ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')}: image_shape "
                                 f"{meta['image_shape']} differs from {list(shape)} in the same batch")
            pix.append(_npy(raw["pix.npy"]).astype(np.int64) + b * size)
            val.append(_npy(raw["val.npy"]).astype(np.float32))
        return {"pix": torch.from_numpy(np.concatenate(pix)), "val": torch.from_numpy(np.concatenate(val)),
                "image_shape": torch.tensor(shape)}

    def _clouds(self, raws: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        jets = []
        for raw in raws:
            kin, pid = _npy(raw["kin.npy"]).astype(np.float32), _npy(raw["pid.npy"])
            order = np.argsort(-kin[:, 0], kind="stable")[: self.max_particles]  # keep the hardest particles
            jets.append((kin[order], pid[order]))
        n_max = max(1, max(len(k) for k, _ in jets))
        kin = np.zeros((len(jets), n_max, 3), np.float32)
        pid = np.zeros((len(jets), n_max), np.int64)
        mask = np.zeros((len(jets), n_max), bool)
        for b, (k, p) in enumerate(jets):
            kin[b, : len(k)], pid[b, : len(k)], mask[b, : len(k)] = k, p, True
        jet_y = np.array([m["jet_y"] for m in metas], np.float64)
        jet_phi = np.array([m["jet_phi"] for m in metas], np.float64)
        points, features = particle_features(kin, pid, mask, jet_y, jet_phi, self.preset)
        features = (features - self.feat_mean) / self.feat_std * mask[..., None]
        return {"points": torch.from_numpy(points), "features": torch.from_numpy(features.astype(np.float32)),
                "mask": torch.from_numpy(mask)}


class _EpochDataset(torch.utils.data.IterableDataset):
    """One rank's epoch: DataLoader worker ``w`` streams slot ``rank * W + w`` of the epoch's plan."""

    def __init__(self, cfg: LoaderConfig, plan: list[list[ShardPart]], batches_per_worker: int | None,
                 skip: list[int], first: int, collate: Collate, epoch: int):
        self.cfg, self.plan, self.batches_per_worker = cfg, plan, batches_per_worker
        self.skip, self.first, self.collate, self.epoch = skip, first, collate, epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.cfg.num_workers)
        # The DataLoader always starts its round robin at its worker 0; a resumed epoch must start at logical
        # worker ``first`` (the one whose batch is next), so DataLoader worker d plays logical worker first + d.
        w = ((info.id if info is not None else 0) + self.first) % workers
        stream: Iterator[dict[str, Any]] = _raw_samples(self.plan[self.cfg.rank * workers + w])
        if self.cfg.shuffle_buffer > 0:
            seed = f"{self.cfg.seed}-{self.epoch}-{self.cfg.rank}-{w}"
            stream = _shuffle(stream, bufsize=self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, seed=seed)
        bs = self.cfg.batch_size
        # Resume: the skipped batches are read and shuffled exactly as before, but never decoded.
        for _ in itertools.islice(stream, self.skip[w] * bs):
            pass
        for _ in range(self.skip[w], self.batches_per_worker if self.batches_per_worker is not None else 1 << 62):
            raws = list(itertools.islice(stream, bs))
            if not raws or (self.batches_per_worker is not None and len(raws) < bs):
                return
            yield self.collate(raws)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Move a collated batch to ``device`` and build the model inputs (``logits = model(**inputs)``)."""
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    label = batch["label"].to(device, non_blocking=non_blocking)
    jet = batch["jet"].to(device, non_blocking=non_blocking)
    if "pix" in batch:
        shape = [int(s) for s in batch["image_shape"]]
        dense = torch.zeros(len(label) * int(np.prod(shape)), dtype=torch.float32, device=device)
        dense[batch["pix"].to(device, non_blocking=non_blocking)] = batch["val"].to(device, non_blocking=non_blocking)
        return {"image": dense.view(len(label), *shape), "jet": jet}, label
    inputs = {k: batch[k].to(device, non_blocking=non_blocking) for k in ("points", "features", "mask")}
    return inputs, label


class ShardLoader:
    """Iterates one rank's batches epoch by epoch, and knows its position ``(epoch, step)`` for checkpoints.

    >>> loader = ShardLoader(LoaderConfig("data/toy-cloud", batch_size=128))
    >>> for inputs, label in loader.epoch(0):
    ...     logits = model(**inputs)
    """

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.manifest = read_manifest(cfg.data)
        self.kind = self.manifest.kind
        self.preprocessing = cfg.preprocessing or Preprocessing.from_manifest(
            self.manifest, cfg.data, cfg.preset, cfg.max_particles)
        self.preprocessing.check_fits(self.manifest, cfg.data)
        self.collate = Collate(self.preprocessing)
        self.workers = max(1, cfg.num_workers)
        self.position = {"epoch": 0, "step": 0}

    @property
    def in_features(self) -> int:
        """Number of per-particle features a cloud model receives (the preset's length)."""
        return len(self.preprocessing.feature_names)

    def _plan(self, epoch: int) -> list[list[ShardPart]]:
        c = self.cfg
        return plan_epoch(self.manifest, c.data, c.split, c.seed, epoch, c.world_size * self.workers)

    def _batches_per_worker(self, plan: list[list[ShardPart]]) -> int | None:
        if not self.cfg.training:
            return None
        return min(sum(u.samples for u in slot) for slot in plan) // self.cfg.batch_size

    def steps_in_epoch(self, epoch: int) -> int:
        """Training steps every rank runs in ``epoch`` (the same on all ranks)."""
        per_worker = self._batches_per_worker(self._plan(epoch))
        if per_worker is None:
            raise ValueError("steps_in_epoch is defined for training loaders only")
        if per_worker == 0:
            c = self.cfg
            raise ValueError(
                f"{c.data}: the {c.split!r} split is too small for {c.world_size} rank(s) x {self.workers} "
                f"loader worker(s) x batch size {c.batch_size}: a worker would get no full batch")
        return per_worker * self.workers

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Batches ``(inputs, label)`` of ``epoch`` from step ``start_step`` on, on ``cfg.device``."""
        for batch in self.collated(epoch, start_step):
            yield to_device(batch, self.cfg.device)

    def collated(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """The collated CPU batches (sparse images; sample ``key``, source ``file`` and ``row`` included)."""
        plan = self._plan(epoch)
        per_worker = self._batches_per_worker(plan)
        w = self.workers
        # Batch i comes from worker i % W (equal counts per worker), so worker j already delivered:
        skip = [start_step // w + (1 if j < start_step % w else 0) for j in range(w)]
        dataset = _EpochDataset(self.cfg, plan, per_worker, skip, start_step % w, self.collate, epoch)
        kwargs: dict[str, Any] = {}
        if self.cfg.num_workers > 0:
            kwargs = {"num_workers": self.cfg.num_workers, "prefetch_factor": self.cfg.prefetch_factor,
                      "pin_memory": torch.device(self.cfg.device).type == "cuda"}
        # Our own generator: creating a DataLoader iterator draws a seed from it, which must not shift the global
        # torch RNG (dropout) differently in a resumed epoch than in an uninterrupted one.
        generator = torch.Generator().manual_seed(self.cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, generator=generator, **kwargs)
        self.position = {"epoch": epoch, "step": start_step}
        for batch in loader:
            self.position = {"epoch": epoch, "step": self.position["step"] + 1}
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position plus everything that shapes the plan (a resume with other values would not be exact)."""
        c = self.cfg
        return {**self.position, "rank": c.rank, "world_size": c.world_size, "num_workers": c.num_workers,
                "seed": c.seed, "batch_size": c.batch_size, "shuffle_buffer": c.shuffle_buffer}

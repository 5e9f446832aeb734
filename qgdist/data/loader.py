"""Per-rank streaming loader: WebDataset shards of jet chunks -> model-ready batches, with exact mid-epoch positions.

How an epoch is laid out (all of it derived from ``seed``, ``epoch``, the manifest's shard sizes, the world size and
the number of DataLoader workers, so every rank computes the same plan without talking to the others):

1. The split's shards are shuffled with ``Random(seed, epoch)`` and dealt to ``world_size * num_workers`` *slots*
   (largest first, each to the slot holding the fewest jets: balanced and disjoint). Rank ``r`` owns slots
   ``r*W .. r*W+W-1``; its DataLoader worker ``w`` streams slot ``r*W+w``. When there are fewer shards than slots,
   a shard is split into strided parts (part ``j`` of ``n`` keeps chunks ``j, j+n, ...``); the shard's chunk index
   gives each part's jets.
2. One tar sample is a chunk of jets (schema 2), and each shard ends with an index of its chunks' byte ranges and
   jets (the manifest says where). In training a worker reads the indexes of its slot's shards, takes all their
   chunks in one seeded random order (across shards and within them) and fetches each alone by its byte range
   (``os.pread`` locally, one range request on object storage); it keeps a pool of at least ``shuffle_buffer``
   jets from several chunks, each batch is ``batch_size`` jets drawn from the pool at random without replacement
   (a seeded permutation of the pool), and the pool is refilled chunk by chunk.
   Evaluation (no shuffling) streams the shards in order with the stock ``webdataset`` reader (our own node/worker
   split, so ``nodesplitter=None``).
3. Only the jets drawn are decoded and gathered, with vectorised ragged indexing (no per-jet Python loop): cloud
   particles are stored hardest first, so trimming to ``max_particles`` is a prefix; features are computed on the
   real particles of the whole batch at once and scattered into the padded (B, P, C) arrays.
4. For training every worker yields the same number ``m`` of full batches (the smallest slot decides), so every
   rank runs exactly ``m * W`` steps: DDP needs equal step counts, and the DataLoader's round robin over workers
   makes batch ``i`` come from worker ``i % W`` -- which is what makes a position exact.

A position is ``(epoch, step)``; resuming at step ``s`` makes worker ``w`` replay its chunk order and its pool
draws (which need only each chunk's jet count, from the shard indexes) and discard the batches it had already
delivered: chunks whose jets all went into skipped batches are never even read. When the world size changed
mid-epoch (an elastic run), the new layout continues the epoch with exactly the jets the earlier layouts had not
drawn (``qgdist.data.epoch_plan``: plans, pools, replays and re-dealing live there; shard reading in
``qgdist.data.shards.read``).

Images travel sparse (flat pixel indices + values) and are densified where the batch lands (on the GPU when
training there); clouds are trimmed to ``max_particles`` and padded to the longest jet in the batch.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from qgdist.data.config import DataConfig
from qgdist.data.features import flat_features, four_momenta
from qgdist.data.preprocessing import Preprocessing
from qgdist.data.epoch_plan import (JET_BITS, Layout, Pool, Unit, deal, delivered, plan_epoch, remaining_jets,
                                    shuffled_chunks, slot_jets, slot_rng)
from qgdist.data.shards.manifest import read_manifest
from qgdist.data.shards.read import read_parts, read_shard, verify_shard
from qgdist.data.shards.schema import ImageChunk, JetChunk, decode_chunk

#: Batches each DataLoader worker prepares ahead of the training step.
PREFETCH_BATCHES = 4

__all__ = ["Collate", "DenseImages", "Layout", "ShardLoader", "read_shard", "to_device"]


class Collate:
    """Turns chunks of jets into batches of tensors, standardised with ``pre``'s statistics.

    Runs inside DataLoader workers, and in ``qgdist predict``'s scoring actors on chunks read straight from the
    source files, so shards and raw files go through exactly the same preprocessing. Chunks may be given raw
    (tar-member dicts, as ``read_shard`` yields them) or decoded (``JetChunk``, as the source readers make them).

    * ``collate(chunks)``: one batch of every jet of ``chunks``, in order;
    * ``collate.batches(chunks, size)``: consecutive batches of ``size`` jets (the last may be short);
    * ``collate.take(chunks, which, jet)``: the jets ``chunks[which[i]]`` row ``jet[i]``, in that order.
    """

    def __init__(self, pre: Preprocessing):
        self.kind, self.preset, self.max_particles = pre.kind, pre.preset, pre.max_particles
        self.vectors = pre.vectors
        self.jet_mean = np.array(pre.jet_mean, np.float32)
        self.jet_std = np.array(pre.jet_std, np.float32)
        self.feat_mean = np.array(pre.feature_mean, np.float32)
        self.feat_std = np.array(pre.feature_std, np.float32)

    def __call__(self, chunks: Iterable[Any]) -> dict[str, Any]:
        decoded = [decode_chunk(c) for c in chunks]
        return self.take(decoded, np.repeat(np.arange(len(decoded)), [len(c) for c in decoded]),
                         np.concatenate([np.arange(len(c)) for c in decoded]) if decoded else np.zeros(0, np.int64))

    def batches(self, chunks: Iterable[Any], size: int) -> Iterator[dict[str, Any]]:
        for take, entries in Pool(iter(chunks), size, 0, None):
            yield self.gather(take, entries)

    def gather(self, take: np.ndarray, entries: dict[int, Any]) -> dict[str, Any]:
        """The batch of pool ids ``take`` (see ``qgdist.data.epoch_plan.Pool``)."""
        seqs, which = np.unique(take >> JET_BITS, return_inverse=True)
        return self.take([entries[s].chunk() for s in seqs.tolist()], which, take & ((1 << JET_BITS) - 1))

    def take(self, chunks: list[JetChunk], which: np.ndarray, jet: np.ndarray) -> dict[str, Any]:
        if not chunks:
            raise ValueError("no jets to collate")
        for c in chunks:
            if c.kind != self.kind:
                raise ValueError(f"{c.file}: {c.kind} jets given to a {self.kind} model's collate")
        if self.kind == "image":
            shapes = {c.image_shape for c in chunks}  # type: ignore[attr-defined]
            if len(shapes) > 1:
                raise ValueError(f"image shapes {sorted(shapes)} differ within one batch ({chunks[0].file})")
        sel = type(chunks[0]).gather(chunks, which, jet, self.max_particles if self.kind == "cloud" else None)
        jets = sel.jets
        jet_in = np.stack([np.log(np.maximum(jets["pt"], 1e-9)), jets["mass"]], axis=1).astype(np.float32)
        batch = {"label": torch.from_numpy(jets["is_quark"].astype(np.float32)),
                 "jet": torch.from_numpy((jet_in - self.jet_mean) / self.jet_std),
                 "file": sel.files(), "row": torch.from_numpy(jets["row"].astype(np.int64))}
        return batch | (self._images(sel) if isinstance(sel, ImageChunk) else self._clouds(sel))

    def _images(self, sel: ImageChunk) -> dict[str, torch.Tensor]:
        size = int(np.prod(sel.image_shape))
        pix = sel.pix.astype(np.int64) + np.repeat(np.arange(len(sel), dtype=np.int64) * size, sel.jets["n"])
        return {"pix": torch.from_numpy(pix), "val": torch.from_numpy(sel.val.astype(np.float32)),
                "image_shape": torch.tensor([int(v) for v in sel.image_shape], dtype=torch.int64)}

    def _clouds(self, sel: JetChunk) -> dict[str, torch.Tensor]:
        jets = sel.jets
        n = jets["n"].astype(np.int64)
        b, width = len(jets), max(1, int(n.max()) if len(jets) else 1)
        jet = np.repeat(np.arange(b, dtype=np.int64), n)
        points_real, feats_real = flat_features(
            sel.kin, sel.pid, jet, jets["jet_y"], jets["jet_phi"], self.preset, dtype=np.float32)  # type: ignore[attr-defined]
        feats_real -= self.feat_mean
        feats_real /= self.feat_std
        # Particles are stored jet by jet, so a row-major boolean mask of the padded slots takes them in order.
        mask = np.arange(width)[None, :] < n[:, None]
        features = np.zeros((b, width, feats_real.shape[1]), np.float32)
        points = np.zeros((b, width, 2), np.float32)
        features[mask], points[mask] = feats_real, points_real
        out = {"points": torch.from_numpy(points), "features": torch.from_numpy(features),
               "mask": torch.from_numpy(mask)}
        if self.vectors:  # (px, py, pz, E) in GeV, unstandardised: ParT's pair features take logs of them.
            # float64: ln m^2 of a nearly collinear pair is E^2 - p^2 of ~10^5 GeV^2, noise after float32 rounding
            vectors = np.zeros((b, width, 4), np.float64)
            vectors[mask] = four_momenta(sel.kin, sel.pid)[:, [1, 2, 3, 0]]  # type: ignore[attr-defined]
            out["vectors"] = torch.from_numpy(vectors)
        return out


class _EpochDataset(torch.utils.data.IterableDataset):
    """One rank's part of an epoch under one layout: DataLoader worker ``w`` streams slot ``rank * W + w``."""

    def __init__(self, loader: ShardLoader, plan: Sequence[Sequence[Unit]], layout: int,
                 batches_per_worker: int | None, skip: list[int], first: int, epoch: int):
        self.batch_size, self.shuffle, self.workers = loader.data.batch_size, loader.shuffle, loader.workers
        self.rank, self.seed, self.collate = loader.rank, loader.seed, loader.collate
        self.plan, self.layout, self.batches_per_worker = plan, layout, batches_per_worker
        self.skip, self.first, self.epoch = skip, first, epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        # The DataLoader always starts its round robin at its worker 0; a resumed epoch must start at logical
        # worker ``first`` (the one whose batch is next), so DataLoader worker d plays logical worker first + d.
        w = ((info.id if info is not None else 0) + self.first) % self.workers
        units = self.plan[self.rank * self.workers + w]
        rng = None
        if self.shuffle > 0:
            rng = slot_rng(self.seed, self.epoch, self.layout, self.rank, w)
            stream: Iterator[Any] = shuffled_chunks(units, rng)
        else:
            stream = read_parts(units)  # type: ignore[arg-type] -- evaluation: whole shard parts, in order
        bs, limit = self.batch_size, self.batches_per_worker
        for i, (take, entries) in enumerate(Pool(stream, bs, self.shuffle, rng)):
            if limit is not None and (i >= limit or len(take) < bs):
                return
            if i >= self.skip[w]:  # resume: the skipped batches are drawn exactly as before, but never decoded
                yield self.collate.gather(take, entries)


def worker_start_method() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start: forked from a fork server, never from the training process itself.

    The training process is threaded (Ray's gRPC core worker, the MLflow sender, torch's and onnxruntime's pools),
    and ``fork()`` copies a threaded process with whatever locks its other threads held at that instant (a CI run
    once lost a loader worker to SIGABRT after many in-process Ray sessions; not reproduced in 16 tries, fork is
    the likely cause). The fork server is a fresh interpreter, started once per process, that has imported torch
    and this module; each epoch's workers fork from it.
    """
    context = multiprocessing.get_context("forkserver")
    # Taken in when the server starts (first use): each worker then starts with these imported. "__main__" is the
    # running script, imported once there rather than by every worker of every epoch (so scripts need the usual
    # `if __name__ == "__main__":` guard, as with any non-fork start method).
    context.set_forkserver_preload(["__main__", "torch", __name__])
    return context


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate: batches are built already (its default would walk the per-jet ``file`` array)."""
    return batch


class DenseImages:
    """Dense CPU image buffers, re-used once nothing outside holds them any more.

    A fresh 96 MB batch (512 images of 3x125x125) costs a page fault per 4 KB page and the kernel's zeroing of all
    of it; a buffer handed out before is re-used instead when no tensor other than ours references its storage
    (torch's storage use count), after zeroing only the pixels its last batch set -- or all of it if anyone wrote
    to it in place since (the tensor version counter moved). Buffers still held by the caller are never touched:
    a new one is made. At most ``keep`` buffers are kept.
    """

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._pool: list[list[Any]] = []   # [flat buffer, indices its last batch set, its version after our writes]
        self._count = getattr(torch._C, "_storage_Use_Count", None)

    def _free(self, buf: torch.Tensor) -> bool:
        # our buffer plus the temporary storage object made to ask: 2 means nobody else holds it
        return self._count is not None and self._count(buf.untyped_storage()._cdata) <= 2

    def make(self, size: int, pix: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        for entry in self._pool:
            buf, last, version = entry
            if buf.numel() == size and self._free(buf):
                if buf._version == version:
                    buf[last] = 0.0
                else:
                    buf.zero_()
                buf[pix] = val
                entry[1], entry[2] = pix, buf._version
                return buf.view(-1)
        buf = torch.from_numpy(np.zeros(size, np.float32))
        buf[pix] = val
        if len(self._pool) < self.keep and self._count is not None:
            self._pool.append([buf, pix, buf._version])
        return buf.view(-1)


def to_device(batch: dict[str, Any], device: torch.device | str,
              dense: DenseImages | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Move a collated batch to ``device`` and build the model inputs (``logits = model(**inputs)``).

    Images are densified here: on a GPU into a fresh tensor (the caching allocator makes that cheap); on the CPU
    into one of ``dense``'s re-used buffers when given, else into fresh zero pages (numpy's calloc, which the kernel
    zeroes on first touch, instead of torch.zeros writing all 96 MB of a 512-image batch).
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    label = batch["label"].to(device, non_blocking=non_blocking)
    jet = batch["jet"].to(device, non_blocking=non_blocking)
    if "pix" in batch:
        shape = [int(s) for s in batch["image_shape"]]
        size = len(label) * int(np.prod(shape))
        pix = batch["pix"].to(device, non_blocking=non_blocking)
        val = batch["val"].to(device, non_blocking=non_blocking)
        if device.type != "cpu":
            flat = torch.zeros(size, dtype=torch.float32, device=device)
            flat[pix] = val
        elif dense is not None:
            flat = dense.make(size, pix, val)
        else:
            flat = torch.from_numpy(np.zeros(size, np.float32))
            flat[pix] = val
        return {"image": flat.view(len(label), *shape), "jet": jet}, label
    inputs = {k: batch[k].to(device, non_blocking=non_blocking) for k in ("points", "features", "mask", "vectors")
              if k in batch}
    return inputs, label


class ShardLoader:
    """Iterates one rank's batches of one split epoch by epoch, and knows its position ``(epoch, step)`` for
    checkpoints.

    ``data`` is the ``data`` section of a training config (``DataConfig``): which dataset, batch size, shuffle
    pool, preset, loader workers. The rest says which part this rank reads and what for: ``training`` batches are
    shuffled (with ``data.shuffle_buffer``) and every rank gets the same number of full batches; otherwise
    (evaluation) every jet comes once, in order, the last batch partial. ``preprocessing`` is the model's (a
    checkpoint's); None builds it from this dataset's train-split statistics with ``data.preset`` and
    ``data.max_particles`` (a fresh training run), and ``vectors`` (each particle's four-momentum as an input, for
    models that ask for it: ``qgdist.models.extra_inputs``). Given, it replaces all three and must fit the dataset.

    >>> loader = ShardLoader(DataConfig("data/toy-cloud", batch_size=128))
    >>> for inputs, label in loader.epoch(0):
    ...     logits = model(**inputs)
    """

    def __init__(self, data: DataConfig, split: str = "train", *, training: bool = True, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: str = "cpu",
                 preprocessing: Preprocessing | None = None, vectors: bool = False):
        self.data, self.split, self.training = data, split, training
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.shuffle = data.shuffle_buffer if training else 0
        self.manifest = read_manifest(data.data)
        self.kind = self.manifest.kind
        self.preprocessing = preprocessing or Preprocessing.from_manifest(
            self.manifest, data.data, data.preset, data.max_particles, vectors)
        self.preprocessing.check_fits(self.manifest, data.data)
        self.collate = Collate(self.preprocessing)
        self.workers = max(1, data.loader_workers)
        self.position = {"epoch": 0, "step": 0}
        self.earlier: tuple[Layout, ...] = ()   # the layouts that ran the current epoch's first steps
        self._plan_cache: tuple[Any, Any] = (None, None)
        self._dense = DenseImages()

    @property
    def in_features(self) -> int:
        """Number of per-particle features a cloud model receives (the preset's length)."""
        return len(self.preprocessing.feature_names)

    def _plan(self, epoch: int, earlier: Sequence[Layout] = ()) -> Sequence[Sequence[Unit]]:
        """This layout's slots for ``epoch``: the shards dealt afresh, or what ``earlier`` layouts left, re-dealt."""
        data, slots = self.data.data, self.world_size * self.workers
        key = (epoch, tuple(earlier))
        if self._plan_cache[0] != key:
            if not earlier:
                plan: Sequence[Sequence[Unit]] = plan_epoch(self.manifest, data, self.split, self.seed, epoch, slots)
            else:
                if not self.training or self.shuffle <= 0:
                    raise ValueError("an epoch continued under another layout must be a shuffled training epoch")
                left = remaining_jets(self.manifest, data, self.split, self.seed, epoch, self.data.batch_size,
                                      self.shuffle, earlier)
                plan = deal(left, slots, self.seed, epoch, len(earlier))
            self._plan_cache = (key, plan)
        return self._plan_cache[1]

    def _batches_per_worker(self, plan: Sequence[Sequence[Unit]]) -> int | None:
        if not self.training:
            return None
        return min(slot_jets(slot) for slot in plan) // self.data.batch_size

    def steps_in_epoch(self, epoch: int, earlier: Sequence[Layout] = ()) -> int:
        """Training steps every rank runs in ``epoch`` (the same on all ranks), counting those ``earlier``
        layouts ran before this one took over."""
        per_worker = self._batches_per_worker(self._plan(epoch, earlier))
        if per_worker is None:
            raise ValueError("steps_in_epoch is defined for training loaders only")
        if per_worker == 0 and not earlier:
            raise ValueError(
                f"{self.data.data}: the {self.split!r} split is too small for {self.world_size} rank(s) x "
                f"{self.workers} loader worker(s) x batch size {self.data.batch_size}: a worker would get no full "
                "batch")
        return sum(layout.steps for layout in earlier) + per_worker * self.workers

    def epoch(self, epoch: int, start_step: int = 0,
              earlier: Sequence[Layout] = ()) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Batches ``(inputs, label)`` of ``epoch`` from step ``start_step`` on, on ``device``; ``earlier``:
        the layouts (world sizes) that ran the first steps of this epoch, when it was not this one."""
        for batch in self.collated(epoch, start_step, earlier):
            yield to_device(batch, self.device, self._dense)

    def collated(self, epoch: int, start_step: int = 0, earlier: Sequence[Layout] = ()) -> Iterator[dict[str, Any]]:
        """The collated CPU batches (sparse images; each jet's source ``file`` and ``row`` included)."""
        plan = self._plan(epoch, earlier)
        per_worker = self._batches_per_worker(plan)
        w = self.workers
        if self.data.verify_shards:   # here, in the rank's own process: each shard is hashed once per run
            sha = {os.path.join(self.data.data, s.name): s.sha256 for s in self.manifest.shards}
            mine = plan[self.rank * w:(self.rank + 1) * w]
            for path in dict.fromkeys(u.path for slot in mine for u in slot):
                verify_shard(path, sha[path])
        local = start_step - sum(layout.steps for layout in earlier)   # steps already run under this layout
        if local < 0:
            raise ValueError(f"step {start_step} lies before the last layout change of epoch {epoch}")
        skip = [delivered(local, w, j) for j in range(w)]
        dataset = _EpochDataset(self, plan, len(earlier), per_worker, skip, local % w, epoch)
        kwargs: dict[str, Any] = {}
        if self.data.loader_workers > 0:
            kwargs = {"num_workers": self.data.loader_workers, "prefetch_factor": PREFETCH_BATCHES,
                      "pin_memory": torch.device(self.device).type == "cuda",
                      "multiprocessing_context": worker_start_method()}
        # Our own generator: creating a DataLoader iterator draws a seed from it, which must not shift the global
        # torch RNG (dropout) differently in a resumed epoch than in an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, generator=generator, collate_fn=_as_is,
                                             **kwargs)
        self.position = {"epoch": epoch, "step": start_step}
        self.earlier = tuple(earlier)
        for batch in loader:
            self.position = {"epoch": epoch, "step": self.position["step"] + 1}
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position plus everything that shapes the plan (a resume with other values would not be exact)."""
        earlier = [asdict(layout) for layout in self.earlier] if self.position["step"] else []
        return {**self.position, "earlier": earlier, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.data.loader_workers, "seed": self.seed, "batch_size": self.data.batch_size,
                "shuffle_buffer": self.shuffle}

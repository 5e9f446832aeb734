"""The per-rank streaming loader: disjoint balanced ranks, equal steps, exact mid-epoch resume, batch contract."""

from __future__ import annotations

import functools

import itertools

import numpy as np
import pytest
import torch
import webdataset as wds

from qgdist.data.epoch_plan import plan_epoch
from qgdist.data.config import DataConfig
from qgdist.data.loader import ShardLoader
from qgdist.data.shards.schema import decode_chunk
from tests.trainkit import write_dataset


@pytest.fixture(scope="module")
def cloud_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("cloud")), "cloud",
                         {"train": [40, 37, 45, 30, 41], "val": [20, 19], "test": [10]})


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("image")), "image", {"train": [24, 24, 20], "val": [9, 7]})


def _keys(loader: ShardLoader, epoch: int, start: int = 0) -> list[list[tuple[str, int]]]:
    """Each batch's jets as (source file, row)."""
    return [list(zip(b["file"], b["row"].tolist())) for b in loader.collated(epoch, start)]


def test_ranks_are_disjoint_balanced_and_run_equal_steps(cloud_dir):
    loaders = [ShardLoader(DataConfig(cloud_dir, batch_size=8, loader_workers=2), rank=r, world_size=2, seed=3)
               for r in range(2)]
    per_rank = [_keys(ld, 0) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == loaders[0].steps_in_epoch(0) > 0
    seen = [set(itertools.chain(*k)) for k in per_rank]
    assert not seen[0] & seen[1]
    assert all(len(b) == 8 for k in per_rank for b in k)
    # Balanced: slots hold within one shard's worth of samples of each other.
    plan = plan_epoch(loaders[0].manifest, cloud_dir, "train", 3, 0, 4)
    loads = [sum(u.samples for u in slot) for slot in plan]
    assert max(loads) - min(loads) <= 45
    assert sorted(u.path for slot in plan for u in slot) == sorted(
        f"{cloud_dir}/train-{i:06d}.tar" for i in range(5))


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_loader_workers_are_not_forked_from_the_training_process(cloud_dir):
    """The training process is threaded (Ray, the tracker); its loader workers come from a fork server instead."""
    import os

    before = set(_children(os.getpid()))
    batches = ShardLoader(DataConfig(cloud_dir, batch_size=8, loader_workers=2), seed=3).collated(0)
    next(batches)   # the workers are running now
    ours = [p for p in _children(os.getpid()) if p not in before]

    def cmdline(pid: int) -> bytes:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()

    me = cmdline(os.getpid())
    assert not [p for p in ours if cmdline(p) == me]   # a forked worker would carry this process's command line
    server = [p for p in _children(os.getpid()) if b"forkserver" in cmdline(p)]
    assert len(server) == 1 and len(_children(server[0])) >= 2
    batches.close()


def test_shards_are_reassigned_each_epoch_reproducibly(cloud_dir):
    data = DataConfig(cloud_dir, batch_size=8, loader_workers=2)
    a, b = ShardLoader(data, world_size=2, seed=3), ShardLoader(data, world_size=2, seed=3)
    assert _keys(a, 0) == _keys(b, 0)
    assert _keys(a, 0) != _keys(a, 1)
    other_seed = ShardLoader(DataConfig(cloud_dir, batch_size=8, loader_workers=2), world_size=2, seed=4)
    assert _keys(a, 0) != _keys(other_seed, 0)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_is_exact(cloud_dir, workers):
    make = functools.partial(ShardLoader, DataConfig(cloud_dir, batch_size=6, loader_workers=workers, shuffle_buffer=50),
                             rank=1, world_size=2, seed=1)
    full = _keys(make(), 2)
    assert len(full) >= 4
    for start in (1, 3, len(full) - 1):
        loader = make()
        assert _keys(loader, 2, start) == full[start:]
        assert loader.state_dict()["step"] == len(full) and loader.state_dict()["epoch"] == 2


def test_shards_split_into_parts_when_fewer_than_slots(image_dir):
    # 3 train shards, 2 ranks x 2 workers = 4 slots: each shard is read as strided halves.
    keys = []
    for r in range(2):
        loader = ShardLoader(DataConfig(image_dir, batch_size=4, loader_workers=2), rank=r, world_size=2)
        keys.append(set(itertools.chain(*_keys(loader, 0))))
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_evaluation_reads_every_sample_once(cloud_dir):
    keys = []
    for r in range(2):
        loader = ShardLoader(DataConfig(cloud_dir, batch_size=16, loader_workers=2), "val", training=False, rank=r,
                                                 world_size=2)
        keys += list(itertools.chain(*_keys(loader, 0)))
    assert sorted(keys) == sorted(k for i in range(2) for k in _keys_of_shard(f"{cloud_dir}/val-{i:06d}.tar"))


def _keys_of_shard(path: str) -> list[tuple[str, int]]:
    chunks = [decode_chunk(s) for s in wds.WebDataset(path, shardshuffle=False, nodesplitter=None, empty_check=False)]
    return [(c.file, int(r)) for c in chunks for r in c.jets["row"]]


def test_cloud_batch_contract(cloud_dir):
    loader = ShardLoader(DataConfig(cloud_dir, batch_size=16, max_particles=24, preset="kinpid"))
    inputs, label = next(iter(loader.epoch(0)))
    assert set(inputs) == {"points", "features", "mask"}
    b, p, _ = inputs["points"].shape
    assert b == 16 and p <= 24 and inputs["features"].shape == (16, p, loader.in_features) == (16, p, 13)
    assert inputs["mask"].dtype == torch.bool and inputs["mask"].any(1).all()
    assert p == int(inputs["mask"].sum(1).max())          # padded to the longest jet in the batch
    assert label.dtype == torch.float32 and set(label.tolist()) <= {0.0, 1.0}
    real = inputs["features"][inputs["mask"]][:, :7]
    assert real.mean().abs() < 0.5 and 0.3 < real.std() < 2.0  # standardised with the manifest's stats
    assert (inputs["features"][~inputs["mask"]] == 0).all()


def test_image_batch_is_densified_exactly(image_dir):
    loader = ShardLoader(DataConfig(image_dir, batch_size=5), "val", training=False)
    batch = next(iter(loader.collated(0)))
    inputs, label = loader.epoch(0).__next__()
    assert inputs["image"].shape == (5, 3, 20, 20) and inputs["jet"].shape == (5, 2)
    stored = {}
    for shard in ("val-000000.tar", "val-000001.tar"):
        for s in wds.WebDataset(f"{image_dir}/{shard}", shardshuffle=False, nodesplitter=None, empty_check=False):
            stored |= {(j.meta["file"], j.meta["row"]): j for j in decode_chunk(s).samples()}
    for i, key in enumerate(zip(batch["file"], batch["row"].tolist())):
        np.testing.assert_array_equal(inputs["image"][i].numpy(), stored[key].dense())
        assert label[i] == stored[key].meta["is_quark"]


def test_too_small_split_is_a_clear_error(image_dir):
    loader = ShardLoader(DataConfig(image_dir, batch_size=64, loader_workers=2), world_size=2)
    with pytest.raises(ValueError, match="too small"):
        loader.steps_in_epoch(0)


def test_shards_at_an_fsspec_url_read_like_local_ones(cloud_dir):
    """--data s3://...: shards that only fsspec can open (its in-memory filesystem here) stream like local ones."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in fsspec.filesystem("file").ls(cloud_dir, detail=False):
        fs.pipe(f"/loader-test/{name.rsplit('/', 1)[-1]}", open(name, "rb").read())
    place = dict(rank=0, world_size=2, seed=3)
    local = _keys(ShardLoader(DataConfig(cloud_dir, batch_size=8), **place), 1)
    remote = _keys(ShardLoader(DataConfig("memory://loader-test", batch_size=8), **place), 1)
    assert remote == local and len(local) > 0


def test_training_batches_mix_shards_and_resume_reads_no_skipped_chunk(cloud_dir, monkeypatch):
    """Chunks come in one random order across the slot's shards, so a batch mixes several shards; a resume replays
    the draws from the manifest's jet counts and fetches only chunks that still have jets to deliver."""
    import qgdist.data.shards.read as loader_module

    make = functools.partial(ShardLoader, DataConfig(cloud_dir, batch_size=16, shuffle_buffer=30), seed=5)
    loader = make()
    first = next(iter(loader.collated(0)))
    bounds = np.cumsum([40, 37, 45, 30, 41])          # trainkit numbers rows shard after shard
    shards = {int(np.searchsorted(bounds, r, side="right")) for r in first["row"].tolist()}
    assert len(shards) >= 3, shards
    full = _keys(make(), 0)
    reads = []
    original = loader_module.ChunkRef.read
    monkeypatch.setattr(loader_module.ChunkRef, "read", lambda self: reads.append(self.start) or original(self))
    assert _keys(make(), 0, len(full) - 1) == full[-1:]
    assert 0 < len(reads) < sum(s.chunks for s in loader.manifest.shards_of("train")) / 2


def test_the_loader_refuses_schema_1_and_shards_without_an_index(cloud_dir, tmp_path):
    import json
    import shutil

    from qgdist.data.shards.schema import SchemaError

    doc = json.loads(open(f"{cloud_dir}/manifest.json").read())
    for shard in doc["shards"]:
        shard["index"] = []
        shutil.copy(f"{cloud_dir}/{shard['name']}", tmp_path / shard["name"])
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no chunk index .* re-run `qgdist convert`"):
        next(iter(ShardLoader(DataConfig(str(tmp_path), batch_size=8)).collated(0)))
    doc["schema_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="schema version 1 .* re-run `qgdist convert`"):
        ShardLoader(DataConfig(str(tmp_path), batch_size=8))


def test_batches_mix_labels_as_a_random_draw_would_even_from_label_sorted_shards(tmp_path):
    """The worst case for shuffling: the first half of the shards hold only quarks, the rest only gluons. Each
    batch's quark fraction must spread as little as a random draw of ``batch`` jets would (binomial variance
    p(1-p)/batch), within a factor of 3 -- the pool's own composition adds some (~1.7x expected here). Without the
    in-pool permutation a batch is two consecutive 8-jet chunks, and the spread is ~8x the binomial."""
    batch = 16
    data = write_dataset(str(tmp_path / "sorted"), "cloud", {"train": [64] * 8}, seed=1, chunk_jets=8,
                         sorted_labels=True)
    loader = ShardLoader(DataConfig(data, batch_size=batch, shuffle_buffer=128), seed=7)
    fractions = np.array([b["label"].float().mean().item() for e in range(4) for b in loader.collated(e)])
    assert len(fractions) == 4 * 512 // batch
    binomial = 0.25 / batch
    ratio = fractions.var() / binomial
    print(f"per-batch quark fraction: mean {fractions.mean():.3f}, variance {ratio:.2f} x binomial")
    assert abs(fractions.mean() - 0.5) < 0.05 and ratio < 3.0, ratio

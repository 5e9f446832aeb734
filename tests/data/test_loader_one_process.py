"""The loader's epoch plan in one process (no DataLoader workers, so each test takes a second): ranks disjoint and
balanced with equal steps, a new deal every epoch that the seed reproduces, evaluation reading every jet once, and
shards split into parts when there are fewer than slots."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import webdataset as wds

from qgdist.data.config import DataConfig
from qgdist.data.loader import ShardLoader
from qgdist.data.shards.schema import decode_chunk
from tests.trainkit import write_dataset

TRAIN = [40, 37, 45, 30, 41]


@pytest.fixture(scope="module")
def cloud_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("cloud")), "cloud", {"train": TRAIN, "val": [20, 19]},
                         chunk_jets=8)


def _jets(loader: ShardLoader, epoch: int = 0) -> list[list[tuple[str, int]]]:
    return [list(zip(b["file"], b["row"].tolist())) for b in loader.collated(epoch)]


def _stored(path: str) -> list[tuple[str, int]]:
    chunks = [decode_chunk(s) for s in wds.WebDataset(path, shardshuffle=False, nodesplitter=None, empty_check=False)]
    return [(c.file, int(r)) for c in chunks for r in c.jets["row"]]


def test_ranks_draw_disjoint_full_batches_in_equal_numbers(cloud_dir):
    loaders = [ShardLoader(DataConfig(cloud_dir, batch_size=8), rank=r, world_size=2, seed=3) for r in range(2)]
    per_rank = [_jets(loader) for loader in loaders]
    steps = loaders[0].steps_in_epoch(0)
    assert steps == loaders[1].steps_in_epoch(0) == len(per_rank[0]) == len(per_rank[1])
    # 193 jets over 2 slots, balanced to within one shard (<= 45 jets): the smaller slot holds >= 74 jets
    assert steps >= 74 // 8
    assert all(len(batch) == 8 for batches in per_rank for batch in batches)
    seen = [Counter(itertools.chain(*batches)) for batches in per_rank]
    assert max(seen[0].values()) == max(seen[1].values()) == 1 and not set(seen[0]) & set(seen[1])
    assert loaders[1].state_dict() | {"earlier": None} == {
        "epoch": 0, "step": steps, "earlier": None, "rank": 1, "world_size": 2, "num_workers": 0, "seed": 3,
        "batch_size": 8, "shuffle_buffer": DataConfig(cloud_dir).shuffle_buffer}


def test_every_epoch_deals_anew_and_the_seed_reproduces_the_deal(cloud_dir):
    def make(seed: int) -> ShardLoader:
        return ShardLoader(DataConfig(cloud_dir, batch_size=8), rank=1, world_size=2, seed=seed)

    first = _jets(make(3), 0)
    assert _jets(make(3), 0) == first
    assert _jets(make(3), 1) != first
    assert _jets(make(4), 0) != first


def test_evaluation_reads_every_jet_once_in_order_with_a_short_last_batch(cloud_dir):
    jets, sizes = [], []
    for rank in range(2):
        loader = ShardLoader(DataConfig(cloud_dir, batch_size=16), "val", training=False, rank=rank, world_size=2)
        batches = _jets(loader)
        sizes.append([len(b) for b in batches])
        jets += list(itertools.chain(*batches))
        # one shard per rank, read in stored order
        assert list(itertools.chain(*batches)) in (_stored(f"{cloud_dir}/val-000000.tar"),
                                                   _stored(f"{cloud_dir}/val-000001.tar"))
    assert sorted(sizes) == [[16, 3], [16, 4]]
    assert sorted(jets) == sorted(_stored(f"{cloud_dir}/val-000000.tar") + _stored(f"{cloud_dir}/val-000001.tar"))
    with pytest.raises(ValueError, match="training loaders only"):
        ShardLoader(DataConfig(cloud_dir, batch_size=16), "val", training=False).steps_in_epoch(0)


def test_with_fewer_shards_than_ranks_each_shard_is_split_between_them(cloud_dir):
    """2 val shards, 4 ranks: every rank reads part of a shard, and together they read each jet once."""
    jets = []
    for rank in range(4):
        loader = ShardLoader(DataConfig(cloud_dir, batch_size=4), "val", training=False, rank=rank, world_size=4)
        mine = list(itertools.chain(*_jets(loader)))
        assert mine, rank
        jets += mine
    assert sorted(jets) == sorted(_stored(f"{cloud_dir}/val-000000.tar") + _stored(f"{cloud_dir}/val-000001.tar"))

"""The loader's epoch plan in one process (no DataLoader workers, so each test takes a second): ranks disjoint and
balanced with equal steps, a new deal every epoch that the seed reproduces, evaluation reading every jet once,
shards split into parts when there are fewer than slots; the position a checkpoint saves, an epoch continued under
another layout, and the refusals of what cannot run, word for word."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter

import pytest
import torch
import webdataset as wds

from qgdist.data.config import DataConfig
from qgdist.data.epoch_plan import Layout
from qgdist.data.loader import ShardLoader
from qgdist.data.preprocessing import PreprocessingMismatch
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


def test_a_loader_knows_its_position_from_the_start_and_after_a_resumed_start(cloud_dir):
    loader = ShardLoader(DataConfig(cloud_dir, batch_size=8), seed=3)
    assert {k: loader.state_dict()[k] for k in ("epoch", "step", "earlier")} == {"epoch": 0, "step": 0, "earlier": []}
    batches = loader.collated(1, start_step=2)
    for _ in range(3):
        next(batches)
    assert {k: loader.state_dict()[k] for k in ("epoch", "step")} == {"epoch": 1, "step": 5}
    # Resumed exactly at the end of an epoch: no batch comes, and the position is that end.
    end = loader.steps_in_epoch(1)
    assert list(loader.collated(1, start_step=end)) == []
    assert {k: loader.state_dict()[k] for k in ("epoch", "step")} == {"epoch": 1, "step": end}


def test_iterating_an_epoch_leaves_the_global_torch_rng_alone(cloud_dir):
    """A resumed epoch must see the same dropout draws as an uninterrupted one: the DataLoader's seed comes from
    the loader's own generator, never from torch's global one."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(ShardLoader(DataConfig(cloud_dir, batch_size=8), seed=3).epoch(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_an_epoch_continued_under_another_layout_resumes_only_after_its_change_and_records_it(cloud_dir):
    earlier = (Layout(2, 0, 4),)
    loader = ShardLoader(DataConfig(cloud_dir, batch_size=8, shuffle_buffer=24), seed=5)
    collated = [b["row"].tolist() for b in itertools.islice(loader.collated(0, 4, earlier), 2)]
    assert loader.state_dict()["earlier"] == [dataclasses.asdict(layout) for layout in earlier]
    assert loader.state_dict()["step"] == 6
    fresh = [b["row"].tolist() for b in itertools.islice(loader.collated(0, 4), 2)]
    assert collated != fresh   # the continued epoch deals what the earlier layout left, not the whole split
    inputs = [x["features"] for x, _ in itertools.islice(loader.epoch(0, 4, earlier), 2)]
    expected = [b["features"] for b in itertools.islice(loader.collated(0, 4, earlier), 2)]
    assert all(torch.equal(a, b) for a, b in zip(inputs, expected))
    with pytest.raises(ValueError, match=r"^step 3 lies before the last layout change of epoch 0$"):
        next(loader.collated(0, 3, earlier))


@pytest.mark.parametrize("split,training,shuffle", [("val", False, 24), ("train", True, 0)])
def test_only_a_shuffled_training_epoch_can_continue_under_another_layout(cloud_dir, split, training, shuffle):
    loader = ShardLoader(DataConfig(cloud_dir, batch_size=8, shuffle_buffer=shuffle), split, training=training)
    with pytest.raises(ValueError, match=r"^an epoch continued under another layout must be a shuffled training "
                                         r"epoch$"):
        next(loader.collated(0, 4, (Layout(2, 0, 4),)))


def test_a_one_jet_shuffle_pool_still_continues_a_resized_epoch(cloud_dir):
    loader = ShardLoader(DataConfig(cloud_dir, batch_size=8, shuffle_buffer=1), seed=5)
    earlier = (Layout(2, 0, 4),)
    assert loader.steps_in_epoch(0, earlier) == 4 + len(list(loader.collated(0, 4, earlier)))


def test_steps_in_epoch_match_the_batches_of_every_epoch_and_refuse_what_cannot_run(cloud_dir):
    loader = ShardLoader(DataConfig(cloud_dir, batch_size=8), rank=1, world_size=2, seed=3)
    counts = [(loader.steps_in_epoch(e), len(list(loader.collated(e)))) for e in range(4)]
    assert all(steps == n for steps, n in counts), counts
    with pytest.raises(ValueError, match=r"^steps_in_epoch is defined for training loaders only$"):
        ShardLoader(DataConfig(cloud_dir, batch_size=8), "val", training=False).steps_in_epoch(0)
    with pytest.raises(ValueError, match=rf"^{re.escape(cloud_dir)}: the 'val' split is too small for 2 rank\(s\) "
                                         r"x 1 loader worker\(s\) x batch size 32: a worker would get no full batch$"):
        ShardLoader(DataConfig(cloud_dir, batch_size=32), "val", world_size=2).steps_in_epoch(0)


def test_a_dataset_that_does_not_fit_the_models_preprocessing_is_refused_by_name(cloud_dir, tmp_path):
    images = write_dataset(str(tmp_path / "img"), "image", {"train": [8]}, chunk_jets=4, image_size=10)
    pre = ShardLoader(DataConfig(images, batch_size=4)).preprocessing
    with pytest.raises(PreprocessingMismatch, match=rf"^{re.escape(cloud_dir)} does not fit the model \(trained on "
                                                    rf"{re.escape(images)}\): kind: model 'image', data 'cloud'"):
        ShardLoader(DataConfig(cloud_dir, batch_size=4), preprocessing=pre)
    bare = tmp_path / "bare"
    write_dataset(str(bare), "cloud", {"val": [8]}, chunk_jets=4)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bare))}: no train-split normalisation statistics"):
        ShardLoader(DataConfig(str(bare), batch_size=4), "val", training=False)


def test_an_image_loader_densifies_into_its_own_reused_buffers(tmp_path):
    images = write_dataset(str(tmp_path / "img"), "image", {"train": [16]}, chunk_jets=4, image_size=10)
    loader = ShardLoader(DataConfig(images, batch_size=4, shuffle_buffer=4))
    ptrs = {inputs["image"].data_ptr() for inputs, _ in loader.epoch(0)}
    assert ptrs <= {buf.data_ptr() for buf, _, _ in loader._dense._pool} and loader._dense._pool

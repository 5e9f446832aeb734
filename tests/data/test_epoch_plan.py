"""An epoch continued under other world sizes (elastic training): what holds across a resize.

Within one epoch, whatever the sequence of world sizes: no jet is drawn twice; the jets never drawn are only the
tail the last layout leaves so that its slots run equal steps (less than a batch plus a chunk per slot); a resumed
position inside a resized epoch is exact; with no resize the plan is the one a fixed-size run uses.
"""

from __future__ import annotations

import itertools

import pytest

from qgdist.data.epoch_plan import Layout, remaining_jets
from qgdist.data.config import DataConfig
from qgdist.data.loader import ShardLoader
from qgdist.data.shards.schema import decode_chunk
from tests.trainkit import write_dataset

BATCH, CHUNK = 8, 4


@pytest.fixture(scope="module")
def cloud_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("cloud")), "cloud",
                         {"train": [40, 37, 45, 30, 41, 52, 33], "val": [20]}, chunk_jets=CHUNK)


def _loaders(data: str, world: int, workers: int = 0) -> list[ShardLoader]:
    return [ShardLoader(DataConfig(data, batch_size=BATCH, loader_workers=workers, shuffle_buffer=24), rank=r,
                        world_size=world, seed=5) for r in range(world)]


def _run(data: str, world: int, start: int, stop: int | None, earlier: tuple[Layout, ...] = (),
         workers: int = 0) -> list[tuple[str, int]]:
    """The jets every rank of a ``world``-rank layout trains on from step ``start`` to ``stop`` (None: the end)."""
    jets = []
    for loader in _loaders(data, world, workers):
        batches = loader.collated(0, start, earlier)
        for batch in itertools.islice(batches, None if stop is None else stop - start):
            jets += list(zip(batch["file"], batch["row"].tolist()))
    return jets


def test_shrink_then_grow_draws_no_jet_twice_and_leaves_only_the_last_tail(cloud_dir):
    total = sum([40, 37, 45, 30, 41, 52, 33])
    first = _run(cloud_dir, 2, 0, 5)                                   # 2 ranks, 5 steps
    shrunk = (Layout(2, 0, 5),)
    second = _run(cloud_dir, 1, 5, 9, shrunk)                          # 1 rank, 4 more steps
    grown = shrunk + (Layout(1, 0, 4),)
    steps = _loaders(cloud_dir, 3)[0].steps_in_epoch(0, grown)
    third = _run(cloud_dir, 3, 9, None, grown)                         # 3 ranks to the end of the epoch
    trained = first + second + third
    assert len(first) == 2 * 5 * BATCH and len(second) == 4 * BATCH and len(third) == 3 * (steps - 9) * BATCH
    assert len(set(trained)) == len(trained), "a jet was drawn twice within the epoch"
    left_out = total - len(trained)
    assert 0 <= left_out < 3 * (BATCH + CHUNK), left_out                # the last layout's tail only
    assert steps > 9


def test_the_remaining_jets_are_the_split_minus_those_drawn(cloud_dir):
    drawn = {row for _, row in _run(cloud_dir, 2, 0, 6)}
    loader = _loaders(cloud_dir, 1)[0]

    def rows(earlier: list[Layout]) -> list[int]:   # the jets' own row numbers (unique across the toy's shards)
        pieces = remaining_jets(loader.manifest, cloud_dir, "train", 5, 0, BATCH, 24, earlier)
        return [int(r) for p in pieces for r in decode_chunk(p.read()).jets["row"][p.row_ids()]]

    every, left = set(rows([Layout(1, 0, 0)])), rows([Layout(2, 0, 6)])
    assert len(every) == sum([40, 37, 45, 30, 41, 52, 33])
    assert len(left) == len(set(left)) and set(left) | drawn == every and not set(left) & drawn


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_inside_a_resized_epoch_is_exact(cloud_dir, workers):
    earlier = (Layout(2, workers, 4),)
    whole = _run(cloud_dir, 1, 4, None, earlier, workers)
    head = _run(cloud_dir, 1, 4, 7, earlier, workers)
    tail = _run(cloud_dir, 1, 7, None, earlier, workers)
    assert head + tail == whole


def test_without_a_resize_the_plan_is_the_fixed_size_one(cloud_dir):
    loader = _loaders(cloud_dir, 2)[0]
    assert loader.steps_in_epoch(0, ()) == loader.steps_in_epoch(0)
    assert _run(cloud_dir, 2, 3, None) == _run(cloud_dir, 2, 3, None, ())
    state = loader.state_dict()
    assert state["earlier"] == []


def test_an_epoch_deals_whole_shards_largest_first_and_skips_empty_ones():
    """Six 1-jet shards and a 6-jet one over two slots end 6 and 6 (smallest first: 9 and 3); an empty shard is in
    no slot; a split without shards is refused naming the dataset and the split."""
    from qgdist.data.epoch_plan import plan_epoch
    from qgdist.data.shards.manifest import Manifest, ShardInfo

    sizes = {f"train-{i:06d}.tar": n for i, n in enumerate([1, 1, 1, 1, 1, 1, 6, 0])}
    manifest = Manifest(source="energyflow", kind="cloud", dtype="float32", label_convention="toy", inputs=[],
                        split_fractions={"train": 1.0}, rows={},
                        shards=[ShardInfo(name, "train", n, 100, "0" * 64, 1, [0, 1]) for name, n in sizes.items()])
    for seed in range(5):
        plan = plan_epoch(manifest, "data", "train", seed, 0, 2)
        assert sorted(sum(u.samples for u in slot) for slot in plan) == [6, 6], seed
        assert sorted(u.path for slot in plan for u in slot) == [f"data/{n}" for n in sorted(sizes) if sizes[n]]
    with pytest.raises(ValueError, match=r"^data: manifest lists no 'val' shards$"):
        plan_epoch(manifest, "data", "val", 0, 0, 2)


def test_a_resize_deals_the_largest_pieces_first_so_slots_end_even():
    """Greedy dealing to the least-loaded slot is as even as it can be only largest piece first: smallest first,
    six 1-jet pieces and one 6-jet piece over two slots end 9 and 3 instead of 6 and 6."""
    from qgdist.data.epoch_plan import deal
    from qgdist.data.shards.read import ChunkRef

    pieces = [ChunkRef(f"s{i}.tar", 0, 1, 1) for i in range(6)] + [ChunkRef("big.tar", 0, 1, 6)]
    for seed in range(5):
        plan = deal(pieces, 2, seed, epoch=0, layout=1)
        assert sorted(sum(p.jets for p in slot) for slot in plan) == [6, 6], seed
        assert sorted(p.path for slot in plan for p in slot) == sorted(p.path for p in pieces)   # each once


def test_a_pool_whose_chunks_were_read_has_no_remainder_to_re_deal(cloud_dir):
    """remainder() hands back chunk references to re-deal; a pool fed chunks already read cannot, and says why."""
    import glob

    import numpy as np

    from qgdist.data.epoch_plan import Pool
    from qgdist.data.shards.read import read_shard

    pool = Pool(read_shard(sorted(glob.glob(f"{cloud_dir}/train-*.tar"))[0]), BATCH, 16, np.random.default_rng(0))
    next(iter(pool))
    with pytest.raises(RuntimeError, match=r"^remainder\(\) of a pool whose chunks were read: replay draws "
                                           r"without decoding$"):
        pool.remainder()


def test_a_pool_holds_only_what_its_buffer_needs_and_frees_each_chunk_once_drawn(cloud_dir):
    """The shuffle pool reads chunks only until it holds buffer + batch jets, and lets a chunk go as soon as its
    last jet is drawn: memory stays flat however long the stream (an epoch over shards larger than memory)."""
    import glob

    import numpy as np

    from qgdist.data.epoch_plan import JET_BITS, Pool
    from qgdist.data.shards.read import read_shard

    chunks = [c for path in sorted(glob.glob(f"{cloud_dir}/train-*.tar")) for c in read_shard(path)]
    read = [0]

    def stream():
        for c in chunks:
            read[0] += 1
            yield c

    pool = Pool(stream(), BATCH, 16, np.random.default_rng(0))
    drawn = 0
    for take, entries in pool:
        drawn += len(take)
        assert read[0] <= drawn // CHUNK + (16 + BATCH) // CHUNK + 1   # never more read than the buffer needs
        undrawn = pool.ids >> JET_BITS
        assert set(entries) == set(np.unique(undrawn).tolist()) | set(np.unique(take >> JET_BITS).tolist())
    assert drawn == sum(len(decode_chunk(c)) for c in chunks) and read[0] == len(chunks)
    assert pool.entries == {}   # every chunk let go

"""Collate outside the training loader (predict and export use it on chunks read straight from shards or source
files), and the CPU image buffers it densifies into: images come out as they were stored, batches cover every
jet once in order, and a re-used buffer never shows the pixels of an earlier batch."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from qgdist.data.config import DataConfig
from qgdist.data.loader import Collate, DenseImages, ShardLoader, to_device
from qgdist.data.shards.read import read_shard
from qgdist.data.shards.schema import decode_chunk
from tests.trainkit import write_dataset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Raw chunks of one image shard (23 jets in chunks of 4, the last short) and a Collate for them."""
    root = write_dataset(str(tmp_path_factory.mktemp("img")), "image", {"train": [23], "val": [6]}, chunk_jets=4,
                         image_size=10, seed=5)
    chunks = list(read_shard(sorted(glob.glob(f"{root}/train-*.tar"))[0]))
    return chunks, Collate(ShardLoader(DataConfig(root, batch_size=4)).preprocessing)


def _stored(chunks) -> np.ndarray:
    return np.concatenate([decode_chunk(c).dense() for c in chunks])


def test_collated_images_densify_to_the_stored_images(images):
    chunks, collate = images
    batch = collate(chunks)
    inputs, label = to_device(batch, "cpu")
    assert inputs["image"].dtype == torch.float32 and inputs["image"].shape == (23, 3, 10, 10)
    np.testing.assert_array_equal(inputs["image"].numpy(), _stored(chunks))
    assert label.tolist() == np.concatenate([decode_chunk(c).jets["is_quark"] for c in chunks]).tolist()


def test_batches_of_a_size_cover_every_jet_once_in_order(images):
    chunks, collate = images
    batches = list(collate.batches(chunks, 5))
    assert [len(b["label"]) for b in batches] == [5, 5, 5, 5, 3]
    rows = [r for b in batches for r in b["row"].tolist()]
    assert rows == collate(chunks)["row"].tolist() and len(set(rows)) == 23
    for b, start in zip(batches, range(0, 23, 5)):
        np.testing.assert_array_equal(to_device(b, "cpu")[0]["image"].numpy(), _stored(chunks)[start:start + 5])


def test_a_reused_image_buffer_holds_only_its_own_batch(images):
    chunks, collate = images
    first, second = collate(chunks[:2]), collate(chunks[2:4])   # 4 jets each: the same buffer size
    dense = DenseImages(keep=1)
    held = to_device(first, "cpu", dense)[0]["image"]
    kept = held.clone()
    # The first batch is still held: a new buffer, the held one untouched.
    other = to_device(second, "cpu", dense)[0]["image"]
    assert held.data_ptr() != other.data_ptr() and torch.equal(held, kept)
    np.testing.assert_array_equal(other.numpy(), _stored(chunks[2:4]))
    # Released, it is re-used: no pixel of the first batch is left in it.
    ptr = held.data_ptr()
    del held, other
    again = to_device(second, "cpu", dense)[0]["image"]
    assert again.data_ptr() == ptr
    np.testing.assert_array_equal(again.numpy(), _stored(chunks[2:4]))
    # Written to in place by its user, then released: cleared whole, not just where the batch had pixels.
    again.add_(1.0)
    del again
    last = to_device(first, "cpu", dense)[0]["image"]
    assert last.data_ptr() == ptr
    np.testing.assert_array_equal(last.numpy(), _stored(chunks[:2]))

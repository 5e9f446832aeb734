"""Collate outside the training loader (predict and export use it on chunks read straight from shards or source
files), and the CPU image buffers it densifies into: images come out as they were stored, clouds padded to the
longest jet with the inputs each model takes, batches cover every jet once in order, and a re-used buffer never
shows the pixels of an earlier batch."""

from __future__ import annotations

import dataclasses
import glob
import re

import numpy as np
import pytest
import torch

from qgdist.data.config import DataConfig
from qgdist.data.features import four_momenta
from qgdist.data.loader import Collate, DenseImages, ShardLoader, to_device
from qgdist.data.shards.read import read_shard
from qgdist.data.shards.schema import CLOUD_JET, CloudChunk, decode_chunk
from tests.trainkit import write_dataset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Raw chunks of one image shard (23 jets in chunks of 4, the last short) and a Collate for them."""
    root = write_dataset(str(tmp_path_factory.mktemp("img")), "image", {"train": [23], "val": [6]}, chunk_jets=4,
                         image_size=10, seed=5)
    chunks = list(read_shard(min(glob.glob(f"{root}/train-*.tar"))))
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


# --- clouds: what a cloud model receives ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clouds(tmp_path_factory):
    """A toy cloud dataset's loader built for a model that takes four-momenta (ParT), and its Collate."""
    root = write_dataset(str(tmp_path_factory.mktemp("cloud")), "cloud", {"train": [12], "val": [4]}, chunk_jets=4,
                         seed=7)
    loader = ShardLoader(DataConfig(root, batch_size=4), vectors=True)
    return root, loader, Collate(loader.preprocessing)


def _cloud_chunk(n: list[int], pt: list[float] | None = None, file: str = "made.npz") -> CloudChunk:
    """Jets of ``n`` particles each, made here (particles hardest first, a mix of species)."""
    rng = np.random.default_rng(11)
    jets = np.zeros(len(n), CLOUD_JET)
    jets["row"], jets["n"], jets["is_quark"] = np.arange(len(n)), n, np.arange(len(n)) % 2
    jets["pt"] = pt if pt is not None else rng.uniform(400, 600, len(n))
    jets["mass"], jets["jet_y"], jets["jet_phi"] = rng.uniform(5, 60, len(n)), rng.normal(0, 1, len(n)), 0.3
    total = int(sum(n))
    kin = np.stack([np.sort(rng.uniform(1, 80, total))[::-1], rng.normal(0, 0.3, total),
                    rng.normal(0.3, 0.3, total)], axis=1).astype(np.float32)
    return CloudChunk(file=file, source="energyflow", jets=jets, kin=kin,
                      pid=rng.choice([22, 211, -211, 130, 11, 2212], total).astype(np.int32))


def test_cloud_inputs_are_padded_to_the_longest_jet_with_float32_features_and_float64_four_momenta(clouds):
    _, _, collate = clouds
    chunk = _cloud_chunk([3, 1, 5])
    batch = collate([chunk])
    assert batch["points"].shape == (3, 5, 2) and batch["points"].dtype == torch.float32
    assert batch["features"].shape[:2] == (3, 5) and batch["features"].dtype == torch.float32
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    # ParT's pair features take logs of (px, py, pz, E): unstandardised, float64, zero in the padding.
    expect = np.zeros((3, 5, 4))
    expect[batch["mask"].numpy()] = four_momenta(chunk.kin, chunk.pid)[:, [1, 2, 3, 0]]
    assert batch["vectors"].dtype == torch.float64
    np.testing.assert_array_equal(batch["vectors"].numpy(), expect)
    inputs, _ = to_device(batch, "cpu")
    assert sorted(inputs) == ["features", "mask", "points", "vectors"]
    assert torch.equal(inputs["vectors"], batch["vectors"])
    # A batch of one-particle jets is one slot wide; no jets at all, one empty slot.
    assert collate([_cloud_chunk([1, 1])])["points"].shape == (2, 1, 2)
    empty = collate([chunk.take(np.zeros(0, np.int64))])
    assert empty["points"].shape == (0, 1, 2) and empty["label"].shape == (0,)


def test_the_jet_inputs_are_log_pt_and_mass_standardised_by_the_training_statistics(clouds):
    _, loader, _ = clouds
    pre = loader.preprocessing
    collate = Collate(pre)
    chunk = _cloud_chunk([2, 2, 2], pt=[500.0, 0.5, 0.0])   # a soft jet, and a degenerate one
    batch = collate([chunk])
    assert batch["jet"].dtype == torch.float32 and batch["row"].dtype == torch.int64
    jets = chunk.jets
    raw = np.stack([np.log([500.0, 0.5, 1e-9]), jets["mass"]], axis=1)
    np.testing.assert_allclose(batch["jet"].numpy(), (raw - pre.jet_mean) / pre.jet_std, rtol=1e-5)


def test_a_loader_for_a_four_momentum_model_carries_them_in_every_batch(clouds):
    root, loader, _ = clouds
    assert loader.preprocessing.vectors
    batch = next(loader.collated(0))
    assert batch["vectors"].shape[:2] == batch["points"].shape[:2]
    assert "vectors" not in next(ShardLoader(DataConfig(root, batch_size=4)).collated(0))


def test_collate_refuses_no_chunks_another_kind_and_mixed_image_shapes(images, clouds):
    chunks, image_collate = images
    _, _, cloud_collate = clouds
    with pytest.raises(ValueError, match=r"^no jets to collate$"):
        cloud_collate([])
    first = decode_chunk(chunks[0])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(first.file))}: image jets given to a cloud model's "
                                         r"collate$"):
        cloud_collate([first])
    other = dataclasses.replace(decode_chunk(chunks[1]), file="other.parquet", image_shape=(3, 12, 12))
    with pytest.raises(ValueError, match=rf"^image shapes \[\(3, 10, 10\), \(3, 12, 12\)\] differ within one "
                                         rf"batch \({re.escape(str(first.file))}\)$"):
        image_collate([first, other])


def test_a_buffer_reused_batch_after_batch_holds_only_the_latest_and_at_most_keep_are_kept(images):
    chunks, collate = images
    first, second = collate(chunks[:2]), collate(chunks[2:4])   # 4 jets each: the same buffer size
    dense = DenseImages(keep=1)
    image = to_device(first, "cpu", dense)[0]["image"]
    ptr, numel = image.data_ptr(), image.numel()
    del image
    # Were the buffer not kept, its memory would be free now and taken by this array, and the next batch would
    # land elsewhere.
    taken = np.ones(numel, np.float32)
    for batch, stored in ((second, chunks[2:4]), (first, chunks[:2]), (second, chunks[2:4])):
        image = to_device(batch, "cpu", dense)[0]["image"]
        assert image.data_ptr() == ptr
        np.testing.assert_array_equal(image.numpy(), _stored(stored))   # none of the batch before it
        del image
    out = [to_device(first, "cpu", dense)[0]["image"], to_device(second, "cpu", dense)[0]["image"]]
    assert out[0].data_ptr() != out[1].data_ptr() and len(dense._pool) == 1 and taken.all()

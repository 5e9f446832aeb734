"""A damaged shard is named: truncated or garbled bytes end reading with an ``InputError`` that names the shard
(and the chunk), through the training reader (chunks by byte range), the evaluation reader (stock webdataset) and
the command line; ``--verify-shards`` finds damage no parser would (a flipped value byte) by the manifest's sha256.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from qgdist.core.errors import InputError
from qgdist.data.config import DataConfig
from qgdist.data.loader import ShardLoader
from qgdist.data.shards import read
from qgdist.data.shards.manifest import read_manifest
from tests.trainkit import write_dataset


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("shards") / "ds"), "cloud",
                         {"train": [24, 24], "val": [16], "test": [16]}, seed=11)


@pytest.fixture
def data(pristine, tmp_path) -> str:
    """A fresh copy of the dataset for a test to damage."""
    read._INDEXES.clear()
    read._VERIFIED.clear()
    return shutil.copytree(pristine, tmp_path / "ds")


def _shard(data: str, split: str, i: int = 0):
    return sorted((s for s in read_manifest(data).shards if s.split == split), key=lambda s: s.name)[i]


def _batches(data: str, split: str, **kw) -> int:
    cfg = DataConfig(str(data), batch_size=8, shuffle_buffer=8, **kw)
    return sum(1 for _ in ShardLoader(cfg, split, training=split == "train").collated(0))


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_a_truncated_shard_is_named_by_the_training_reader(data) -> None:
    shard = _shard(data, "train")
    _truncate(Path(data) / shard.name, shard.bytes // 2)
    with pytest.raises(InputError, match=rf"{shard.name}: truncated: bytes \d+-\d+ wanted") as err:
        _batches(data, "train")
    assert err.value.file.endswith(shard.name) and "qgdist convert" in err.value.hint


def test_an_empty_shard_is_named_too(data) -> None:
    shard = _shard(data, "train", 1)
    _truncate(Path(data) / shard.name, 0)   # what once surfaced as "tarfile.ReadError: empty file"
    with pytest.raises(InputError, match=rf"{shard.name}: truncated"):
        _batches(data, "train")


def test_the_evaluation_reader_names_a_truncated_shard_and_a_damaged_chunk(data) -> None:
    shard = _shard(data, "val")
    path = Path(data) / shard.name
    second = read.chunk_index(str(path), tuple(shard.index))[1].tolist()
    intact = path.read_bytes()
    raw = bytearray(intact)
    raw[second[0]:second[0] + 512] = bytes(512)   # the second chunk's first tar header
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=rf"{shard.name}: chunk at bytes {second[0]}-{second[1]}: not readable"):
        _batches(data, "val")
    path.write_bytes(intact[:second[0] + 700])    # cut inside the second chunk: the index at the end is gone too
    read._INDEXES.clear()
    with pytest.raises(InputError, match=rf"{shard.name}: truncated") as err:
        _batches(data, "val")
    assert err.value.file.endswith(shard.name)


def test_garbled_chunk_bytes_name_the_shard_and_the_chunk(data) -> None:
    shard = _shard(data, "train")
    path = Path(data) / shard.name
    start, end, _ = read.chunk_index(str(path), tuple(shard.index))[0].tolist()
    raw = bytearray(path.read_bytes())
    raw[start:start + 512] = bytes(512)   # the chunk's first tar header: zeros, as after a bad disk write
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=rf"{shard.name}: chunk at bytes {start}-{end}: not readable tar members"):
        _batches(data, "train")


def test_a_member_that_does_not_decode_names_its_chunk(data) -> None:
    shard = _shard(data, "train")
    path = Path(data) / shard.name
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x93NUMPY")   # the first npy member's magic: its header no longer parses
    raw[at:at + 6] = b"XXXXXX"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=rf"{shard.name}: chunk \S+-r\d+: cannot be decoded"):
        _batches(data, "train")


def test_verify_shards_finds_a_flipped_value_byte_no_parser_sees(data) -> None:
    shard = _shard(data, "train")
    path = Path(data) / shard.name
    start, end, _ = read.chunk_index(str(path), tuple(shard.index))[0].tolist()
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x93NUMPY", start)
    at = raw.index(b"\n", at) + 8          # a byte of the first array's data, past its header
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    assert _batches(data, "train") > 0     # read without the check: nothing notices
    read._VERIFIED.clear()
    with pytest.raises(InputError, match=rf"{shard.name}: sha256 [0-9a-f]+\.\.\. does not match") as err:
        _batches(data, "train", verify_shards=True)
    assert err.value.expected == shard.sha256


def test_verify_shards_hashes_each_shard_once_per_process(data) -> None:
    loader = ShardLoader(DataConfig(str(data), batch_size=8, shuffle_buffer=8, verify_shards=True))
    assert sum(1 for _ in loader.collated(0)) > 0
    train = {os.path.join(data, s.name) for s in read_manifest(data).shards if s.split == "train"}
    assert {p for p, _ in read._VERIFIED} == train
    (Path(data) / _shard(data, "train").name).write_bytes(b"changed after the check")
    read._INDEXES.clear()
    with pytest.raises(InputError, match="truncated"):   # the next epoch reads, but does not hash, again
        sum(1 for _ in loader.collated(1))


def test_training_on_a_truncated_shard_is_one_line_naming_it(data, tmp_path, capsys) -> None:
    from qgdist.cli import main

    shard = _shard(data, "train")
    _truncate(Path(data) / shard.name, shard.bytes // 3)
    code = main(["train", "--data", str(data), "--model", "particlenet-lite", "--workers", "0", "--epochs", "1",
                 "--batch-size", "8", "--shuffle-buffer", "8", "--no-track", "--no-progress",
                 "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"qgdist train: {Path(data) / shard.name}: truncated"), err
    assert np.isfinite(code)

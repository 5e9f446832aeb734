"""Sample encoding round trips through the stock webdataset reader; the manifest round trips through JSON."""

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from qgdist.data.shards.manifest import Manifest, ShardInfo, read_manifest, write_manifest
from qgdist.data.shards.schema import CloudSample, ImageSample, decode_sample, encode_sample, sample_key


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for s in samples:
            key = s.pop("__key__")
            for ext, data in s.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_image_and_cloud_samples_round_trip_through_stock_webdataset(tmp_path):
    rng = np.random.default_rng(0)
    image = np.where(rng.random((3, 10, 12)) > 0.9, rng.random((3, 10, 12)), 0.0)
    img = ImageSample.from_dense(image, {"is_quark": 1, "pt": 100.0, "mass": 10.0, "file": "a.b.parquet", "row": 3})
    cloud = CloudSample({"is_quark": 0, "pt": 500.0, "mass": 50.0, "file": "x.npz", "row": 9},
                        rng.random((17, 3)).astype(np.float32), rng.integers(-300, 300, 17).astype(np.int32))
    keys = [sample_key("a.b.parquet", 3), sample_key("x.npz", 9)]
    assert all("." not in k for k in keys)
    _write_tar(tmp_path / "s.tar", [encode_sample(keys[0], img), encode_sample(keys[1], cloud)])

    got = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == keys
    back_img, back_cloud = decode_sample(got[0]), decode_sample(got[1])
    np.testing.assert_array_equal(back_img.dense(), image.astype(np.float32))
    assert back_img.meta["row"] == 3 and back_img.meta["image_shape"] == [3, 10, 12]
    np.testing.assert_array_equal(back_cloud.kin, cloud.kin)
    np.testing.assert_array_equal(back_cloud.pid, cloud.pid)


def test_manifest_round_trip_and_split_totals(tmp_path):
    m = Manifest(source="cms", kind="image", dtype="float32", label_convention="cms: y=0 is quark",
                 inputs=["a"], split_fractions={"train": 0.8, "val": 0.1, "test": 0.1},
                 shards=[ShardInfo("train-000000.tar", "train", 5, 100, "ab"),
                         ShardInfo("train-000001.tar", "train", 3, 50, "cd"),
                         ShardInfo("val-000000.tar", "val", 1, 20, "ef")],
                 rows={"in": 10, "written": 9, "rejected": 1})
    write_manifest(m, str(tmp_path))
    back = read_manifest(f"file://{tmp_path}")
    assert back == m
    assert back.splits["train"] == {"shards": 2, "samples": 8, "bytes": 150}
    assert back.splits["test"]["samples"] == 0


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_manifest(str(tmp_path))

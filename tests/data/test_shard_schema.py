"""Chunk encoding round trips through the stock webdataset reader (the documented snippet included); the manifest
round trips through JSON; shards and manifests of schema 1 are refused with the way out named."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from qgdist.core.errors import InputError
from qgdist.data.shards.manifest import Manifest, ShardInfo, read_manifest, write_manifest
from qgdist.data.shards.schema import (CLOUD_JET, IMAGE_JET, CloudChunk, ImageChunk, SchemaError, decode_chunk,
                                       load_npy, npy_bytes, sample_key, sort_particles)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ingest.md"


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for s in samples:
            key = s.pop("__key__")
            for ext, data in s.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _chunks(rng):
    # Three images: with two, a jet's offset subtracted instead of added lands on the same pixels (numpy wraps).
    images = np.where(rng.random((3, 3, 10, 12)) > 0.9, rng.random((3, 3, 10, 12)), 0.0).astype(np.float32)
    flat = images.reshape(3, -1)
    img, pix = np.nonzero(flat)
    ijets = np.zeros(3, IMAGE_JET)
    ijets["row"], ijets["is_quark"], ijets["pt"], ijets["mass"] = [3, 8, 11], [1, 0, 1], [100.0, 90.0, 80.0], \
        [10.0, 9.0, 8.0]
    ijets["n"] = np.bincount(img, minlength=3)
    image = ImageChunk(file="a.b.parquet", source="cms", jets=ijets, pix=pix.astype(np.uint16), val=flat[img, pix],
                       image_shape=(3, 10, 12))
    n = np.array([17, 5, 9], np.int32)
    kin = rng.random((n.sum(), 3)).astype(np.float32)
    pid = rng.integers(-300, 300, n.sum()).astype(np.int32)
    kin, pid = sort_particles(kin, pid, n)
    cjets = np.zeros(3, CLOUD_JET)
    cjets["row"], cjets["is_quark"], cjets["pt"], cjets["n"] = [9, 10, 12], [0, 1, 1], [500.0, 510.0, 520.0], n
    cjets["jet_y"], cjets["jet_phi"] = [0.5, -1.25, 2.0], [0.75, 3.0, -2.5]
    cloud = CloudChunk(file="x.npz", source="energyflow", jets=cjets, kin=kin, pid=pid)
    return images, image, cloud


def test_image_and_cloud_chunks_round_trip_through_stock_webdataset(tmp_path):
    images, image, cloud = _chunks(np.random.default_rng(0))
    keys = [sample_key("a.b.parquet", 3), sample_key("x.npz", 9)]
    assert all("." not in k for k in keys)
    _write_tar(tmp_path / "s.tar", [image.encode(), cloud.encode()])
    got = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == keys
    assert got[0]["meta.json"]["jets"] == 3 and got[1]["jets.npy"]["n"].tolist() == [17, 5, 9]
    back_img, back_cloud = decode_chunk(got[0]), decode_chunk(got[1])
    np.testing.assert_array_equal(back_img.dense(), images)
    assert back_img.dense().dtype == np.float32   # what the models take; float64 would double the batch
    np.testing.assert_array_equal(back_img.jet(1).dense(), images[1])
    assert back_img.jet(0).meta["row"] == 3 and back_img.jet(0).meta["image_shape"] == [3, 10, 12]
    np.testing.assert_array_equal(back_cloud.kin, cloud.kin)
    np.testing.assert_array_equal(back_cloud.pid, cloud.pid)
    assert back_cloud.jets.tobytes() == cloud.jets.tobytes()
    assert np.all(np.diff(back_cloud.jet(0).kin[:, 0]) <= 0)   # hardest first
    one = back_cloud.jet(1)   # a per-jet view carries the jet's axis and true multiplicity (predict writes them)
    assert {k: one.meta[k] for k in ("jet_y", "jet_phi", "n", "row")} == \
        {"jet_y": float(cloud.jets["jet_y"][1]), "jet_phi": float(cloud.jets["jet_phi"][1]), "n": 5, "row": 10}
    assert len(one.kin) == len(one.pid) == 5
    # raw bytes (no webdataset decoder) decode the same, through the fast npy path
    raw = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    np.testing.assert_array_equal(decode_chunk(raw[1]).kin, cloud.kin)


def test_uncompressed_and_gzipped_members_decode_alike(tmp_path):
    images, image, _ = _chunks(np.random.default_rng(3))
    plain, gz = image.encode(compress=False), image.encode()
    assert "pix.npy" in plain and "pix.npy.gz" in gz and len(gz["val.npy.gz"]) < len(plain["val.npy"])
    for members in (plain, gz):
        np.testing.assert_array_equal(decode_chunk(members).dense(), images)
    _write_tar(tmp_path / "s.tar", [dict(gz)])
    got = next(iter(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode()))  # stock gz + npy
    np.testing.assert_array_equal(got["val.npy.gz"], image.val)


def test_take_slice_and_concat_keep_jets_whole():
    _, image, cloud = _chunks(np.random.default_rng(1))
    both = CloudChunk.concat([cloud, cloud.take(np.array([2, 0]))])
    assert len(both) == 5 and both.jets["row"].tolist() == [9, 10, 12, 12, 9]
    np.testing.assert_array_equal(both.jet(3).kin, cloud.jet(2).kin)
    trimmed = cloud.take(np.array([0, 1]), limit=6)
    assert trimmed.jets["n"].tolist() == [6, 5]
    np.testing.assert_array_equal(trimmed.jet(0).kin, cloud.jet(0).kin[:6])   # the 6 hardest
    np.testing.assert_array_equal(image.slice(1, 2).jet(0).pix, image.jet(1).pix)
    mixed = CloudChunk.concat([cloud, CloudChunk(file="y.npz", source="energyflow", jets=cloud.jets[:1],
                                                 kin=cloud.kin[:17], pid=cloud.pid[:17])])
    assert mixed.files().tolist() == ["x.npz"] * 3 + ["y.npz"]


def test_fast_npy_reader_matches_numpy():
    for a in (np.arange(7, dtype=np.int64), np.ones((3, 4), np.float16), np.zeros((0, 3), np.float32),
              np.array(3.5), np.zeros(2, CLOUD_JET)):
        back = load_npy(npy_bytes(a))
        assert back.dtype == a.dtype and back.shape == a.shape and back.tobytes() == a.tobytes()


def test_documented_snippet_reads_one_jet(tmp_path):
    """The snippet in docs/ingest.md runs as written (on a shard made here) and finds the jet it says."""
    _, _, cloud = _chunks(np.random.default_rng(2))
    path = tmp_path / "train-000000-000.tar"
    _write_tar(path, [cloud.encode()])
    text = DOCS.read_text()
    snippet = re.search(r"<!-- tested: tests/data/test_shard_schema.py -->\n```python\n(.*?)```", text, re.S).group(1)
    assert 'path = "shards/ef/train-000000-000.tar"' in snippet
    scope: dict = {}
    exec(snippet.replace("shards/ef/train-000000-000.tar", str(path)), scope)
    np.testing.assert_array_equal(scope["kin"], cloud.jet(1).kin)
    np.testing.assert_array_equal(scope["pid"], cloud.jet(1).pid)
    assert (scope["file"], scope["row"], scope["is_quark"]) == ("x.npz", 10, 1)


def test_manifest_round_trip_and_split_totals(tmp_path):
    m = Manifest(source="cms", kind="image", dtype="float32", label_convention="cms: y=0 is quark",
                 inputs=["a"], split_fractions={"train": 0.8, "val": 0.1, "test": 0.1},
                 shards=[ShardInfo("train-000000.tar", "train", 5, 100, "ab", 2, [60, 90]),
                         ShardInfo("train-000001.tar", "train", 3, 50, "cd", 1, [20, 40]),
                         ShardInfo("val-000000.tar", "val", 1, 20, "ef", 1, [5, 10])],
                 rows={"in": 10, "written": 9, "rejected": 1}, chunk_jets=4)
    write_manifest(m, str(tmp_path))
    back = read_manifest(f"file://{tmp_path}")
    assert back == m
    assert back.splits["train"] == {"shards": 2, "samples": 8, "bytes": 150}
    assert back.splits["test"]["samples"] == 0


def test_missing_manifest_names_the_directory(tmp_path):
    from qgdist.core.errors import InputError

    with pytest.raises(InputError, match=f"{tmp_path}: no manifest.json"):
        read_manifest(str(tmp_path))
    with pytest.raises(InputError, match=f"{tmp_path / 'typo'}: no such dataset directory"):
        read_manifest(str(tmp_path / "typo"))


def test_schema_1_is_refused_with_the_way_out(tmp_path):
    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader

    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": []}))
    with pytest.raises(SchemaError, match=r"schema version 1 .* re-run `qgdist convert`"):
        ShardLoader(DataConfig(str(tmp_path)))
    # a schema-1 sample (one jet: meta.json, kin.npy, pid.npy) met in a shard is refused the same way
    old = {"__key__": "x_npz-r000000001", "meta.json": b'{"is_quark": 1}', "kin.npy": npy_bytes(np.zeros((2, 3))),
           "pid.npy": npy_bytes(np.zeros(2, np.int32))}
    with pytest.raises(SchemaError, match=r"schema 1.*re-run `qgdist convert`"):
        decode_chunk(old)


def test_a_decoded_chunk_keeps_where_its_jets_came_from(tmp_path):
    """file, source and dtype survive the round trip: predict writes them beside every score."""
    _, image, cloud = _chunks(np.random.default_rng(4))
    for chunk in (image, cloud):
        back = decode_chunk(chunk.encode())
        assert (back.file, back.source, back.dtype) == (chunk.file, chunk.source, chunk.dtype)
        assert back.files().tolist() == [chunk.file] * len(chunk)


def test_gathering_across_chunks_keeps_each_jets_file_and_the_particle_limit():
    _, _, cloud = _chunks(np.random.default_rng(5))
    other = CloudChunk(file="y.npz", source="energyflow", jets=cloud.jets[:2].copy(), kin=cloud.kin[:22],
                       pid=cloud.pid[:22])
    got = CloudChunk.gather([cloud, other], np.array([1, 0, 1]), np.array([0, 2, 1]), limit=6)
    assert got.files().tolist() == ["y.npz", "x.npz", "y.npz"] and got.jets["n"].tolist() == [6, 6, 5]
    np.testing.assert_array_equal(got.jet(1).kin, cloud.jet(2).kin[:6])
    same = CloudChunk.gather([cloud, cloud.take(np.array([0, 1, 2]))], np.array([0, 1]), np.array([0, 1]))
    assert same.file == "x.npz"   # one file behind every jet: kept as one name, not one per jet
    alone = CloudChunk.gather([cloud], np.array([0, 0]), np.array([0, 2]), limit=4)
    assert alone.jets["n"].tolist() == [4, 4] and alone.jets["row"].tolist() == [9, 12]


def test_the_chunks_own_arrays_take_the_fast_npy_path(monkeypatch):
    """The particle and pixel arrays' plain headers are parsed here, without numpy's reader: the loader's hot path
    (a structured dtype, as jets.npy's, goes to np.load)."""
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called for a plain header"))
    _, image, cloud = _chunks(np.random.default_rng(6))
    for chunk in (image, cloud):
        for name, data in chunk.encode(compress=False).items():
            if name in ("kin.npy", "pid.npy", "pix.npy", "val.npy"):
                assert load_npy(memoryview(data)).tobytes() == getattr(chunk, name[:3]).tobytes()


def test_a_sample_of_another_schema_is_named_by_shard_and_key():
    old = {"__key__": "x_npz-r000000001", "__url__": "shards/train-000000.tar", "meta.json": b'{"is_quark": 1}',
           "kin.npy": npy_bytes(np.zeros((2, 3))), "pid.npy": npy_bytes(np.zeros(2, np.int32))}
    with pytest.raises(SchemaError) as err:
        decode_chunk(old)
    assert str(err.value).startswith("shards/train-000000.tar: sample 'x_npz-r000000001' is not a schema-2 chunk")
    assert str(err.value).endswith("it was written by an older qgdist (schema 1, one jet per sample); re-run "
                                   "`qgdist convert` on the source files")
    _, _, cloud = _chunks(np.random.default_rng(7))
    newer = cloud.encode() | {"__url__": "shards/train-000001.tar"}
    newer["meta.json"] = json.dumps(json.loads(newer["meta.json"]) | {"schema_version": 9}).encode()
    with pytest.raises(SchemaError) as err:
        decode_chunk(newer)
    assert str(err.value).startswith("shards/train-000001.tar: schema_version 9, this qgdist reads ")


def test_a_sample_without_url_or_key_is_named_by_question_marks():
    """Readers that bypass webdataset (a bare dict) still get the message's shape, with '?' where they gave no name."""
    with pytest.raises(SchemaError) as err:
        decode_chunk({"meta.json": b"{}"})
    assert str(err.value).startswith("?: sample '?' is not a schema-2 chunk (members ['meta.json'])")
    _, _, cloud = _chunks(np.random.default_rng(8))
    newer = cloud.encode()
    newer["meta.json"] = json.dumps(json.loads(newer["meta.json"]) | {"schema_version": 9}).encode()
    with pytest.raises(SchemaError, match=r"^\?: schema_version 9, this qgdist reads 2: re-run `qgdist convert`$"):
        decode_chunk(newer)


@pytest.mark.parametrize("member", ["kin.npy", "pix.npy.gz"])
def test_damaged_member_bytes_name_the_shard_the_chunk_and_the_way_out(member):
    _, image, cloud = _chunks(np.random.default_rng(9))
    members = (cloud if member.startswith("kin") else image).encode() | {"__url__": "shards/train-000003.tar"}
    members[member] = members[member][:40]   # a shard cut short on disk
    with pytest.raises(InputError) as err:
        decode_chunk(members)
    key = members["__key__"]
    assert re.fullmatch(rf"shards/train-000003\.tar: chunk {key}: cannot be decoded \((ValueError|EOFError|error): "
                        r".+\)", str(err.value)), str(err.value)
    assert err.value.file == "shards/train-000003.tar"
    assert err.value.hint == ("re-run `qgdist convert` to rewrite the dataset (`qgdist inspect DIR --verify` lists "
                              "every shard whose sha256 no longer matches the manifest)")
    del members["__url__"], members["__key__"]
    with pytest.raises(InputError, match=r"^\?: chunk \?: cannot be decoded") as err:
        decode_chunk(members)
    assert err.value.file == "?"


def test_the_value_dtype_travels_with_the_chunk_and_old_chunks_read_as_float32():
    """A float16 dataset stays float16 through decoding, take, slice, concat and gather (the loader's precision
    check reads it); a chunk written before meta.json had "dtype" is float32, the only dtype then."""
    _, image, cloud = _chunks(np.random.default_rng(10))
    half = CloudChunk(file="h.npz", source="energyflow", jets=cloud.jets, kin=cloud.kin.astype(np.float16),
                      pid=cloud.pid, dtype="float16")
    back = decode_chunk(half.encode())
    assert back.dtype == "float16" and back.kin.dtype == np.float16
    two = CloudChunk.concat([back, back])
    for derived in (back.take(np.array([2, 0])), back.slice(1, 3), two,
                    CloudChunk.gather([back, two], np.array([1, 0]), np.array([4, 1]))):
        assert (derived.dtype, derived.source) == ("float16", "energyflow")
    for chunk in (image, cloud):
        old = chunk.encode()
        meta = json.loads(old["meta.json"])
        del meta["dtype"]
        old["meta.json"] = json.dumps(meta).encode()
        assert decode_chunk(old).dtype == "float32"


def test_the_same_chunk_always_encodes_to_the_same_bytes():
    """Shard checksums in the manifest are reproducible: meta.json's keys sorted, gzip members without a timestamp
    (and at gzip's fastest level, the one flag the header records), jets.npy always in the schema's record layout."""
    _, image, cloud = _chunks(np.random.default_rng(11))
    out = image.encode()
    meta = json.loads(out["meta.json"])
    assert list(meta) == sorted(meta) and out["meta.json"] == json.dumps(meta, sort_keys=True).encode()
    for name in ("pix.npy.gz", "val.npy.gz"):
        header = out[name][:10]
        assert header[:3] == b"\x1f\x8b\x08" and header[4:8] == b"\0\0\0\0", "mtime must be 0"
        assert header[8] == 4, "XFL 4: compressed at the fastest level"
    wide = np.zeros(3, [(name, "<i8" if name in ("is_quark", "n") else CLOUD_JET[name].str)
                        for name in CLOUD_JET.names])   # a caller's wider ints
    for name in CLOUD_JET.names:
        wide[name] = cloud.jets[name]
    odd = CloudChunk(file=cloud.file, source=cloud.source, jets=wide, kin=cloud.kin, pid=cloud.pid)
    written = np.load(io.BytesIO(odd.encode()["jets.npy"]))
    assert written.dtype == CLOUD_JET and written.tolist() == cloud.jets.tolist()


def test_a_chunk_is_keyed_by_its_file_and_first_row_unless_told():
    _, _, cloud = _chunks(np.random.default_rng(12))
    assert cloud.encode()["__key__"] == "x_npz-r000000009"
    assert cloud.encode(key="mine")["__key__"] == "mine"
    empty = cloud.take(np.array([], np.int64))
    assert empty.encode()["__key__"] == "x_npz-r000000000"
    mixed = CloudChunk.concat([cloud, CloudChunk(file="y.npz", source="energyflow", jets=cloud.jets, kin=cloud.kin,
                                                 pid=cloud.pid)])
    with pytest.raises(ValueError, match="^a stored chunk holds jets of one source file$"):
        mixed.encode()


def test_per_jet_files_follow_their_jets_through_take_slice_gather_and_views():
    """A batch gathered from two files keeps one name per jet: predict writes it beside each score."""
    _, _, cloud = _chunks(np.random.default_rng(13))
    other = CloudChunk(file="y.npz", source="energyflow", jets=cloud.jets.copy(), kin=cloud.kin, pid=cloud.pid)
    mixed = CloudChunk.concat([cloud, other])                  # files x x x y y y
    assert mixed.files().tolist() == ["x.npz"] * 3 + ["y.npz"] * 3
    assert mixed.take(np.array([4, 0])).files().tolist() == ["y.npz", "x.npz"]
    assert mixed.slice(2, 5).files().tolist() == ["x.npz", "y.npz", "y.npz"]
    assert mixed.slice(1, 6).files().tolist() == ["x.npz", "x.npz", "y.npz", "y.npz", "y.npz"]
    assert [mixed.jet(i).meta["file"] for i in (0, 5)] == ["x.npz", "y.npz"]
    got = CloudChunk.gather([cloud, mixed], np.array([1, 0, 1]), np.array([5, 1, 3]))
    assert got.files().tolist() == ["y.npz", "x.npz", "y.npz"]
    np.testing.assert_array_equal(got.jet(0).kin, other.jet(2).kin)


def test_a_jets_view_carries_its_record():
    images, image, cloud = _chunks(np.random.default_rng(14))
    meta = cloud.jet(1).meta
    assert meta == {"is_quark": 1, "pt": 510.0, "mass": float(cloud.jets["mass"][1]), "file": "x.npz", "row": 10,
                    "source": "energyflow", "jet_y": -1.25, "jet_phi": 3.0, "n": 5}
    view = image.jet(2)
    assert view.meta["mass"] == 8.0 and view.meta["source"] == "cms" and view.meta["pt"] == 80.0
    dense = view.dense()
    assert dense.dtype == np.float32 and dense.shape == (3, 10, 12)
    np.testing.assert_array_equal(dense, images[2])


def test_only_the_jets_that_are_out_of_order_are_sorted_each_within_itself():
    kin = np.zeros((6, 3), np.float32)
    kin[:, 0] = [5, 4, 3, 1, 5, 3]    # jet 0 hardest first already; jet 1 not (its second particle is the hardest)
    kin[:, 1] = np.arange(6)
    pid = np.arange(6, dtype=np.int32)
    out_kin, out_pid = sort_particles(kin, pid, np.array([3, 3]))
    assert out_kin[:, 0].tolist() == [5, 4, 3, 5, 3, 1] and out_pid.tolist() == [0, 1, 2, 4, 5, 3]
    np.testing.assert_array_equal(out_kin[:, 1], out_pid)   # rows move whole

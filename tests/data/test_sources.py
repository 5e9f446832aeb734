"""Readers and the conversion (in-process executor): round trips through stock webdataset, labels, splits,
manifest integrity, and every class of bad input (error names file/row/field; quarantine keeps the books)."""

import glob
import hashlib
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from qgdist.cli import main
from qgdist.data.convert import ConvertConfig, convert
from qgdist.data.features import jet_kinematics
from qgdist.data.shards.manifest import read_manifest
from qgdist.data.shards.schema import decode_chunk
from qgdist.data.sources.errors import BadRowError
from qgdist.data.split import assign_splits
from qgdist.generate.formats import cms_table, write_energyflow_npz
from qgdist.generate.toy import ToyConfig, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    run(ToyConfig("cms", 24, str(d / "cms.parquet"), seed=1))
    run(ToyConfig("energyflow", 300, str(d / "ef.npz"), seed=2))
    return d


def _convert(source, inputs, out, **kw):
    kw = {"executor": "local", "progress": False, **kw}
    return convert(ConvertConfig(source, [str(p) for p in inputs], str(out), **kw))


def _chunks(out, pattern="*"):
    """Every chunk of the shards matching ``pattern``, read with the stock webdataset reader and decoder."""
    shards = sorted(glob.glob(f"{out}/{pattern}.tar"))
    return [decode_chunk(s) for s in wds.WebDataset(shards, shardshuffle=False).decode()] if shards else []


def _index(path, shard):
    """A shard's chunk index, read with the loader's own range reader from where the manifest says."""
    from qgdist.data.shards.read import chunk_index

    return chunk_index(str(path), tuple(shard.index), shard.sha256)


def _read_back(out, pattern="*"):
    return {(j.meta["file"], j.meta["row"]): j for c in _chunks(out, pattern) for j in c.samples()}


def test_cms_round_trip_through_stock_webdataset(files, tmp_path):
    m = _convert("cms", [files / "cms.parquet"], tmp_path, rows_per_task=10)
    table = pq.read_table(files / "cms.parquet")
    got = _read_back(tmp_path)
    assert len(got) == table.num_rows == m.rows["written"]
    for row in range(table.num_rows):
        s = got[("cms.parquet", row)]
        ref = table.slice(row, 1).to_pylist()[0]
        np.testing.assert_array_equal(s.dense(), np.array(ref["X_jets"], dtype=np.float32))
        assert s.meta["pt"] == ref["pt"] and s.meta["mass"] == ref["m0"]
        assert s.meta["is_quark"] == int(ref["y"] == 0)  # CMS: y = 1 is gluon
    assert m.label_convention == "cms: y=0 is quark, y=1 is gluon"


def test_energyflow_round_trip_float16_stored_and_deflated(files, tmp_path):
    data = np.load(files / "ef.npz")
    X, y = data["X"], data["y"]
    write_energyflow_npz(str(tmp_path / "stored.npz"), X, y, compress=False)
    for name in ("ef.npz", "stored.npz"):
        src = files / name if name == "ef.npz" else tmp_path / name
        out = tmp_path / f"out_{name}"
        _convert("energyflow", [src], out, rows_per_task=70, dtype="float16")
        got = _read_back(out)
        assert len(got) == len(X)
        for row in (0, 69, 70, 151, 299):  # unit and chunk boundaries
            s = got[(name, row)]
            real = X[row][X[row, :, 0] > 0]
            # stored hardest first (by the stored pt; ties keep their source order)
            real = real[np.argsort(-real[:, 0].astype(np.float16).astype(np.float32), kind="stable")]
            assert s.kin.dtype == np.float16 and s.meta["n"] == len(real) == len(s.kin)
            np.testing.assert_allclose(s.kin.astype(np.float64), real[:, :3], rtol=1e-3, atol=4e-3)
            np.testing.assert_array_equal(s.pid, real[:, 3].astype(np.int32))
            assert s.meta["is_quark"] == int(y[row])  # EnergyFlow: y = 1 is quark
            ref = jet_kinematics(real[:, :3], real[:, 3].astype(np.int64))
            assert s.meta["pt"] == pytest.approx(ref["pt"]) and s.meta["mass"] == pytest.approx(ref["mass"])


def test_label_quark_value_override(files, tmp_path):
    m = _convert("cms", [files / "cms.parquet"], tmp_path, label_quark_value=1)
    y = pq.read_table(files / "cms.parquet").column("y").to_numpy()
    got = _read_back(tmp_path)
    assert all(got[("cms.parquet", r)].meta["is_quark"] == int(y[r] == 1) for r in range(len(y)))
    assert m.label_convention == "cms: y=1 is quark, y=0 is gluon"


def test_split_is_deterministic_and_configurable(files, tmp_path):
    a = _convert("energyflow", [files / "ef.npz"], tmp_path / "a", rows_per_task=50)
    b = _convert("energyflow", [files / "ef.npz"], tmp_path / "b", rows_per_task=300)
    assert a.splits["train"]["samples"] == b.splits["train"]["samples"]
    rows_a = {s: sorted(k[1] for k in _split_keys(tmp_path / "a", s)) for s in ("train", "val", "test")}
    rows_b = {s: sorted(k[1] for k in _split_keys(tmp_path / "b", s)) for s in ("train", "val", "test")}
    assert rows_a == rows_b
    expected = assign_splits("ef.npz", np.arange(300), (0.8, 0.1, 0.1))
    assert rows_a["val"] == np.flatnonzero(expected == 1).tolist()
    assert 200 < len(rows_a["train"]) < 280
    c = _convert("energyflow", [files / "ef.npz"], tmp_path / "c", split=(0.5, 0.5, 0.0))
    assert c.splits["test"]["samples"] == 0 and 100 < c.splits["val"]["samples"] < 200


def _split_keys(out, split):
    return list(_read_back(out, f"{split}-*"))


def test_manifest_integrity_and_contiguous_sorted_members(files, tmp_path, capsys):
    m = _convert("energyflow", [files / "ef.npz"], tmp_path, rows_per_task=100, shard_size=20_000)
    assert read_manifest(str(tmp_path)).to_json() == m.to_json()
    on_disk = sorted(os.path.basename(p) for p in glob.glob(f"{tmp_path}/*.tar"))
    assert on_disk == [s.name for s in m.shards] and len(on_disk) > 6  # shard_size rolled shards over
    for shard in m.shards:
        data = (tmp_path / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
        with tarfile.open(tmp_path / shard.name) as tar:
            names = tar.getnames()
        keys = [n.split(".")[0] for n in names]
        assert keys == sorted(keys) and len(names) == 4 * shard.chunks + 1  # contiguous members, sorted keys
        assert {n.split(".", 1)[1] for n in names[:-1]} == {"meta.json", "jets.npy", "kin.npy", "pid.npy"}  # no dots
        assert names[-1] == f"{keys[-1]}.index.npy"      # the chunk index, last, with the last chunk's key
        index = _index(tmp_path / shard.name, shard)
        assert index.shape == (shard.chunks, 3) and index[:, 2].sum() == shard.samples
        assert index[:, 2].max() <= m.chunk_jets == 256 and (index[1:, 0] == index[:-1, 1]).all()
    # statistics come from the train split only
    train = list(_read_back(tmp_path, "train-*").values())
    log_pt = np.log([s.meta["pt"] for s in train])
    assert m.stats["samples"] == len(train)
    assert m.stats["jet"]["log_pt"]["mean"] == pytest.approx(log_pt.mean())
    assert m.stats["jet"]["log_pt"]["std"] == pytest.approx(log_pt.std(), rel=1e-6)
    assert m.stats["particle"]["features"][:2] == ["deta", "dphi"] and len(m.stats["particle"]["mean"]) == 7
    # `qgdist inspect --verify` re-hashes the shards and notices a changed or stray one
    assert main(["inspect", str(tmp_path), "--verify"]) == 0
    with open(tmp_path / m.shards[0].name, "ab") as f:
        f.write(b"x")
    (tmp_path / "val-000099-000.tar").write_bytes(b"")
    assert main(["inspect", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"{m.shards[0].name}: {m.shards[0].bytes + 1} bytes" in out and "val-000099-000.tar: not in" in out


def test_chunks_sample_their_window_of_rows_and_take_fewer_bytes_than_the_source(files, tmp_path):
    from qgdist.data.shards import writer

    m = _convert("energyflow", [files / "ef.npz"], tmp_path / "small", rows_per_task=300, chunk_jets=5)
    assert m.chunk_jets == 5
    train = [c for c in _chunks(tmp_path / "small", "train-*")]
    window = 5 * writer.WINDOW
    assert all(len(c) == 5 for c in train[:writer.WINDOW]) and all(0 < len(c) <= 5 for c in train)
    for c in train:
        rows = c.jets["row"]
        assert (np.diff(rows) > 0).all() and len(set(c.files())) == 1   # source order, one file
    # the first window's train jets (its 80 first train rows) are dealt to its 16 chunks by stride
    first = np.sort(np.concatenate([c.jets["row"] for c in train[:writer.WINDOW]]))
    assert len(first) == window and train[0].jets["row"].tolist() == first[::writer.WINDOW].tolist()
    m = _convert("energyflow", [files / "ef.npz"], tmp_path / "default")
    assert sum(s.bytes for s in m.shards) / m.rows["written"] < os.path.getsize(files / "ef.npz") / 300


def test_image_stats_match_dense_train_images(files, tmp_path):
    m = _convert("cms", [files / "cms.parquet"], tmp_path)
    dense = np.concatenate([c.dense() for c in _chunks(tmp_path, "train-*")]).astype(np.float64)
    np.testing.assert_allclose(m.stats["image"]["channel_mean"], dense.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(m.stats["image"]["channel_std"], dense.std(axis=(0, 2, 3)), rtol=1e-5)


# ---- bad input -------------------------------------------------------------------------------------------------

def _cms_with(tmp_path, name, edit):
    """A CMS file of 8 one-row-group jets after ``edit(images, pt, m0, y)`` (may return replacement columns)."""
    rng = np.random.default_rng(0)
    images = np.where(rng.random((8, 3, 125, 125)) > 0.99, rng.random((8, 3, 125, 125)), 0.0)
    cols = {"images": images, "pt": np.full(8, 100.0), "m0": np.full(8, 10.0), "y": np.array([0, 1.0] * 4)}
    table = edit(cols) or cms_table(cols["images"], cols["pt"], cols["m0"], cols["y"])
    pq.write_table(table, tmp_path / name, row_group_size=1)
    return tmp_path / name


def _wrong_shape(c):
    good = cms_table(c["images"][:5], c["pt"][:5], c["m0"][:5], c["y"][:5])
    bad = cms_table(c["images"][5:6, :, :124], c["pt"][5:6], c["m0"][5:6], c["y"][5:6])
    rest = cms_table(c["images"][6:], c["pt"][6:], c["m0"][6:], c["y"][6:])
    return pa.concat_tables([good, bad, rest])


CMS_BAD = {
    "nan": (lambda c: c["images"].__setitem__((3, 1, 60, 60), np.nan), 3, "X_jets", 1),
    "inf_pt": (lambda c: c["pt"].__setitem__(2, np.inf), 2, "pt", 1),
    "label": (lambda c: c["y"].__setitem__(5, 2.0), 5, "y", 1),
    "shape": (_wrong_shape, 5, "X_jets", 1),
    "missing_column": (lambda c: cms_table(c["images"], c["pt"], c["m0"], c["y"]).drop_columns(["m0"]), 0, "m0", 8),
}


@pytest.mark.parametrize("case", sorted(CMS_BAD))
def test_cms_bad_rows(case, tmp_path):
    edit, row, field, n_bad = CMS_BAD[case]
    path = _cms_with(tmp_path, f"bad_{case}.parquet", edit)
    with pytest.raises(BadRowError) as err:
        _convert("cms", [path], tmp_path / "e")
    assert err.value.record.row == row and err.value.record.field == field
    assert f"bad_{case}.parquet: row {row}, field '{field}'" in str(err.value)
    assert not (tmp_path / "e" / "manifest.json").exists()
    m = _convert("cms", [path], tmp_path / "q", on_bad_row="quarantine")
    assert m.rows == {"in": 8, "written": 8 - n_bad, "rejected": n_bad}
    assert m.quarantine[0]["row"] == row and m.quarantine[0]["field"] == field
    assert len(_read_back(tmp_path / "q")) == 8 - n_bad


def test_cms_corrupt_page_is_rejected_by_row_and_column(files, tmp_path):
    data = bytearray((files / "cms.parquet").read_bytes())
    col = pq.ParquetFile(files / "cms.parquet").metadata.row_group(7).column(0)
    data[col.data_page_offset + 40: col.data_page_offset + 80] = bytes(40)  # smash the page header
    (tmp_path / "corrupt.parquet").write_bytes(bytes(data))
    with pytest.raises(BadRowError, match=r"corrupt.parquet: row 7, field 'X_jets': unreadable"):
        _convert("cms", [tmp_path / "corrupt.parquet"], tmp_path / "e")
    m = _convert("cms", [tmp_path / "corrupt.parquet"], tmp_path / "q", on_bad_row="quarantine")
    assert m.rows == {"in": 24, "written": 23, "rejected": 1}


@pytest.mark.parametrize("kind", ["truncated_cms", "empty_cms", "truncated_npz", "empty_npz"])
def test_unreadable_files(kind, files, tmp_path):
    source = "cms" if kind.endswith("cms") else "energyflow"
    src = files / ("cms.parquet" if source == "cms" else "ef.npz")
    bad = tmp_path / f"{kind}{src.suffix}"
    bad.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2] if kind.startswith("truncated") else b"")
    with pytest.raises(BadRowError, match=rf"{bad.name}: whole file, field '<file>': "
                                          rf"{'empty file' if kind.startswith('empty') else 'not a readable'}"):
        _convert(source, [bad], tmp_path / "e")
    m = _convert(source, [bad, src], tmp_path / "q", on_bad_row="quarantine")  # the good file still converts
    assert m.quarantine[0]["file"] == bad.name and m.quarantine[0]["row"] is None
    assert m.rows["written"] == m.rows["in"] > 0


def _ef_with(tmp_path, name, edit, files):
    data = np.load(files / "ef.npz")
    X, y = data["X"][:40].copy(), data["y"][:40].copy()
    X, y = edit(X, y) or (X, y)
    write_energyflow_npz(str(tmp_path / name), X, y)
    return tmp_path / name


EF_BAD = {
    "nan": (lambda X, y: X.__setitem__((7, 0, 1), np.nan), 7, "X", 1, 40),
    "label": (lambda X, y: y.__setitem__(9, 2.0), 9, "y", 1, 40),
    "y_short": (lambda X, y: (X, y[:37]), 37, "y", 3, 40),
    "x_short": (lambda X, y: (X[:38], y), 38, "X", 2, 40),
    "empty_jet": (lambda X, y: X.__setitem__(4, 0.0), 4, "X", 1, 40),
}


@pytest.mark.parametrize("case", sorted(EF_BAD))
def test_energyflow_bad_rows(case, files, tmp_path):
    edit, row, field, n_bad, n_in = EF_BAD[case]
    path = _ef_with(tmp_path, f"bad_{case}.npz", edit, files)
    with pytest.raises(BadRowError, match=rf"bad_{case}.npz: row {row}, field '{field}'"):
        _convert("energyflow", [path], tmp_path / "e", rows_per_task=16)
    m = _convert("energyflow", [path], tmp_path / "q", rows_per_task=16, on_bad_row="quarantine")
    assert m.rows == {"in": n_in, "written": n_in - n_bad, "rejected": n_bad}
    assert (m.quarantine[0]["row"], m.quarantine[0]["field"]) == (row, field)


def test_energyflow_wrong_shape_and_corrupt_stream(files, tmp_path):
    write_energyflow_npz(str(tmp_path / "shape.npz"), np.ones((5, 3, 3)), np.ones(5))
    with pytest.raises(BadRowError, match=r"shape.npz: whole file, field 'X': shape \[5, 3, 3\]"):
        _convert("energyflow", [tmp_path / "shape.npz"], tmp_path / "e")
    data = bytearray((files / "ef.npz").read_bytes())
    mid = len(data) // 3
    data[mid: mid + 200] = bytes(b ^ 0x5A for b in data[mid: mid + 200])
    (tmp_path / "corrupt.npz").write_bytes(bytes(data))
    m = _convert("energyflow", [tmp_path / "corrupt.npz"], tmp_path / "q", rows_per_task=100,
                 on_bad_row="quarantine")
    assert m.rows["in"] == 300 and m.rows["rejected"] > 0
    assert m.rows["written"] + m.rows["rejected"] == 300
    assert {q["field"] for q in m.quarantine} == {"X"}


def test_cli_exit_code_and_message(files, tmp_path, capsys):
    path = _ef_with(tmp_path, "cli.npz", EF_BAD["label"][0], files)
    code = main(["convert", "--source", "energyflow", "--out", str(tmp_path / "o"), "--no-ray", str(path)])
    assert code == 2
    assert "cli.npz: row 9, field 'y': label 2.0 is not 0 or 1" in capsys.readouterr().err
    code = main(["convert", "--source", "energyflow", "--out", str(tmp_path / "o"), "--no-ray", "--quiet",
                 "--on-bad-row", "quarantine", "--split", "0.6,0.2,0.2", str(path)])
    assert code == 0 and read_manifest(str(tmp_path / "o")).rows["rejected"] == 1


def test_directory_and_glob_inputs(files, tmp_path):
    m = _convert("energyflow", [files], tmp_path / "d", rows_per_task=300)  # picks *.npz only
    assert [os.path.basename(p) for p in m.inputs] == ["ef.npz"] and m.rows["written"] == 300
    m = _convert("cms", [f"file://{files}/*.parquet"], tmp_path / "g")
    assert m.inputs == [f"file://{files}/cms.parquet"] and m.rows["written"] == 24
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ef.npz").write_bytes((files / "ef.npz").read_bytes())
    with pytest.raises(ValueError, match="share a file name"):
        _convert("energyflow", [files / "ef.npz", tmp_path / "other" / "ef.npz"], tmp_path / "x")


def test_convert_flags_and_old_spellings_build_the_config(tmp_path):
    from qgdist.cli import build_parser
    from qgdist.core.config import from_args

    args = build_parser().parse_args(["convert", "--source", "cms", "--out", "o", "--no-ray", "--quiet",
                                      "--shard-size", "512KiB", "--split", "0.7,0.2,0.1", "--label-quark-value",
                                      "1", "a.parquet", "b.parquet"])
    assert from_args(ConvertConfig, args) == ConvertConfig(
        "cms", ["a.parquet", "b.parquet"], "o", shard_size=512 << 10, split=(0.7, 0.2, 0.1), label_quark_value=1,
        executor="local", progress=False)
    defaults = from_args(ConvertConfig, build_parser().parse_args(["convert", "--source", "cms", "--out", "o", "x"]))
    assert (defaults.executor, defaults.progress, defaults.shard_size) == ("ray", True, 64 << 20)
    (tmp_path / "c.yaml").write_text("source: energyflow\nshard_size: 2MB\nsplit: '0.5,0.5,0'\n")
    cfg = from_args(ConvertConfig, build_parser().parse_args(
        ["convert", "--config", str(tmp_path / "c.yaml"), "--out", "o", "--executor", "local", "x"]))
    assert (cfg.source, cfg.shard_size, cfg.split, cfg.executor) == ("energyflow", 2 * 10**6, (0.5, 0.5, 0.0), "local")


def test_toy_and_conversion_write_to_an_fsspec_url(files):
    """memory:// stands in for object storage: the toy file, every shard and the manifest go through fsspec."""
    import fsspec

    url = "memory://qgdist-ingest-test"
    run(ToyConfig("energyflow", 120, f"{url}/raw/ef.npz", seed=4))
    m = _convert("energyflow", [f"{url}/raw/ef.npz"], f"{url}/out", rows_per_task=60, shard_size=20_000)
    assert m.rows == {"in": 120, "written": 120, "rejected": 0}
    assert read_manifest(f"{url}/out").to_json() == m.to_json()
    fs = fsspec.filesystem("memory")
    names = sorted(os.path.basename(p) for p in fs.ls("/qgdist-ingest-test/out", detail=False))
    assert names == sorted([s.name for s in m.shards] + ["manifest.json"])  # no temporary files left behind
    for shard in m.shards:
        assert hashlib.sha256(fs.cat(f"/qgdist-ingest-test/out/{shard.name}")).hexdigest() == shard.sha256
    fs.rm("/qgdist-ingest-test", recursive=True)


def test_aborted_shard_and_failed_parquet_leave_nothing(tmp_path):
    from qgdist.data.shards.writer import ShardWriter
    from qgdist.generate.formats import CMSParquetWriter

    w = ShardWriter(str(tmp_path), "train", lambda k: f"train-000000-{k:03d}.tar", max_bytes=1 << 20)
    w.write({"__key__": "a", "bin": b"x" * 100})
    assert os.listdir(tmp_path) == [".train-000000-000.tar.tmp"]
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"), CMSParquetWriter(str(tmp_path / "c.parquet")) as writer:
        writer.write(np.zeros((1, 3, 4, 4)), np.ones(1), np.ones(1), np.zeros(1))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_energyflow_units_hold_the_same_bytes_however_wide_the_file_was_padded(tmp_path, monkeypatch):
    """A deflated file's unit travels and is decoded whole, as padded (rows, M) arrays: units are cut by bytes of
    ``X``, so a file padded twice as wide gets half the jets per unit; a user's --rows-per-task stays rows."""
    import qgdist.data.sources.energyflow as energyflow
    from qgdist.data.sources.plan import plan_inputs

    rng = np.random.default_rng(4)
    jets = np.zeros((1000, 5, 4))
    jets[..., 0] = -np.sort(-rng.uniform(1, 50, (1000, 5)), axis=1)   # pt, hardest first
    jets[..., 1] = rng.uniform(-1, 1, (1000, 5))                      # rapidity
    jets[..., 2] = rng.uniform(2.5, 3.5, (1000, 5))                   # phi
    jets[..., 3] = 211
    labels = rng.integers(0, 2, 1000)
    for name, width in (("narrow.npz", 20), ("wide.npz", 40)):   # the same jets, the wide file padded further
        write_energyflow_npz(str(tmp_path / name), np.pad(jets, ((0, 0), (0, width - 5), (0, 0))), labels)
    monkeypatch.setattr(energyflow, "UNIT_BYTES", 100 * 20 * 4 * 8)   # 100 rows of the narrow file
    for name, width, rows in (("narrow.npz", 20, 100), ("wide.npz", 40, 50)):
        units, total, _ = plan_inputs("energyflow", [str(tmp_path / name)])
        sizes = {u.row_stop - u.row_start for u in units}
        assert total == 1000 and sizes == {rows} and all(u.stream for u in units), (name, sizes)
        assert rows * width * 4 * 8 <= energyflow.UNIT_BYTES
    units, _, _ = plan_inputs("energyflow", [str(tmp_path / "wide.npz")], rows_per_task=300)
    assert [u.row_stop - u.row_start for u in units] == [300, 300, 300, 100]
    # Cut either way, the shards hold the same jets.
    _convert("energyflow", [tmp_path / "wide.npz"], tmp_path / "by_bytes")
    _convert("energyflow", [tmp_path / "wide.npz"], tmp_path / "by_rows", rows_per_task=300)
    by_bytes, by_rows = _read_back(tmp_path / "by_bytes"), _read_back(tmp_path / "by_rows")
    assert len(by_rows) == 1000 and by_bytes.keys() == by_rows.keys()
    assert all(np.array_equal(by_bytes[k].kin, by_rows[k].kin) and by_bytes[k].meta == by_rows[k].meta for k in by_rows)

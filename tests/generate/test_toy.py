"""The toy generator writes exactly the public formats' quirks, and its quark/gluon differences are physical."""

import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgdist.cli import main
from qgdist.generate.toy import ToyConfig, generate, run


def test_cms_toy_has_the_real_quirks(tmp_path):
    path = tmp_path / "cms.parquet"
    run(ToyConfig("cms", 10, str(path), seed=3))
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups == 10 and all(pf.metadata.row_group(i).num_rows == 1 for i in range(10))
    schema = pf.schema_arrow
    assert schema.field("X_jets").type.value_field.name == "item"
    assert schema.field("X_jets").type.value_type.value_type.value_type == pa.float64()
    assert all(schema.field(c).type == pa.float64() for c in ("pt", "m0", "y"))
    table = pf.read()
    y = table.column("y").to_numpy()
    assert set(y) == {0.0, 1.0} and y.sum() == 5
    images = np.array(table.column("X_jets").to_pylist())
    assert images.shape == (10, 3, 125, 125)
    assert ((images[:, 0] != 0).mean() < 0.01) and (images >= 0).all()
    towers = images[:, 2].reshape(10, 25, 5, 25, 5)
    assert np.allclose(towers, towers[:, :, :1, :, :1])  # HCAL: one value per 5x5 tower
    pt = table.column("pt").to_numpy()
    assert (pt > 60).all() and (pt < 400).all()


def test_cms_toy_element_item_name(tmp_path):
    path = tmp_path / "cms.parquet"
    run(ToyConfig("cms", 2, str(path), item_name="element"))
    assert pq.ParquetFile(path).schema_arrow.field("X_jets").type.value_field.name == "element"


def test_energyflow_toy_has_the_real_quirks(tmp_path):
    path = tmp_path / "ef.npz"
    run(ToyConfig("energyflow", 400, str(path), seed=5))
    with zipfile.ZipFile(path) as zf:
        assert {i.filename for i in zf.infolist()} == {"X.npy", "y.npy"}
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    data = np.load(path)
    X, y = data["X"], data["y"]
    assert X.dtype == np.float64 and y.dtype == np.float64 and X.shape[2] == 4
    n = (X[..., 0] > 0).sum(axis=1)
    assert X.shape[1] == n.max()  # padded to the file's own maximum multiplicity
    assert y.sum() == 200 and 0 < y[:200].sum() < 200  # balanced and shuffled
    assert n[y == 1].mean() < n[y == 0].mean()  # y = 1 is quark: fewer constituents
    real = X[..., 0] > 0
    assert set(np.unique(np.abs(X[..., 3][real])).astype(int)) <= {11, 13, 22, 130, 211, 321, 2112, 2212}
    np.testing.assert_array_equal(np.load(path)["X"], X)
    run(ToyConfig("energyflow", 400, str(tmp_path / "again.npz"), seed=5))
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["X"], X)  # deterministic by seed


def test_quark_gluon_differences_follow_colour_factors():
    rng = np.random.default_rng(0)
    n_jets = 4000
    means = {}
    for pt in (100.0, 1000.0):
        q = (np.arange(n_jets) % 2).astype(np.uint8)
        jets = generate(q, np.full(n_jets, pt), np.zeros(n_jets), np.zeros(n_jets), rng)
        n = np.bincount(jets.jet, minlength=n_jets)
        width = np.bincount(jets.jet, jets.pt * np.hypot(jets.deta, jets.dphi), n_jets) / np.bincount(
            jets.jet, jets.pt, n_jets)
        means[pt] = (n[q == 1].mean(), n[q == 0].mean())
        assert width[q == 0].mean() > 1.15 * width[q == 1].mean()  # gluons wider
    growth_q = means[1000.0][0] - means[100.0][0]
    growth_g = means[1000.0][1] - means[100.0][1]
    assert growth_g / growth_q == pytest.approx(9 / 4, rel=0.15)  # C_A / C_F


def test_generate_toy_cli(tmp_path, capsys):
    out = tmp_path / "t.npz"
    assert main(["generate", "toy", "--format", "energyflow", "--jets", "50", "--out", str(out), "--stored"]) == 0
    assert "wrote 50 toy energyflow jets" in capsys.readouterr().out
    with zipfile.ZipFile(out) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_an_existing_file_is_replaced_only_when_asked(tmp_path, capsys):
    from qgdist.cli import main

    path = tmp_path / "mine.npz"
    path.write_bytes(b"a file the user had")
    args = ["generate", "toy", "--format", "energyflow", "--jets", "20", "--out", str(path)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert path.read_bytes() == b"a file the user had"
    assert main(args + ["--overwrite"]) == 0 and len(np.load(path)["y"]) == 20


def test_an_energyflow_file_is_generated_and_written_chunk_by_chunk(tmp_path, monkeypatch):
    """A file of any size takes one chunk's memory: jets are drawn ``chunk`` at a time and spooled; the npz is
    still one (N, M, 4) array padded to the whole file's M, balanced over the whole file. ``X`` is padded and
    written in slices of at most ``PAD_BYTES``, here a few jets each, across the drawn chunks' boundaries."""
    from qgdist.generate import formats, toy

    monkeypatch.setattr(formats, "PAD_BYTES", 40_000)
    drawn: list[int] = []
    real_generate = toy.generate
    monkeypatch.setattr(toy, "generate", lambda q, *a: drawn.append(len(q)) or real_generate(q, *a))
    cfg = ToyConfig("energyflow", 1001, str(tmp_path / "ef.npz"), seed=9)
    toy.write_energyflow(cfg, chunk=300)
    assert drawn == [300, 300, 300, 101]

    npz = np.load(tmp_path / "ef.npz")
    X, y = npz["X"], npz["y"]
    drawn.clear()
    chunks = list(toy.cloud_chunks(cfg, 300))
    clouds = [c for cs, _ in chunks for c in cs]
    counts = np.array([len(c) for c in clouds])
    assert X.shape == (1001, counts.max(), 4) and X.dtype == y.dtype == np.float64
    assert len({len(max(cs, key=len)) for cs, _ in chunks}) > 1   # the chunks' own Ms differ: padding is the file's
    for i, c in enumerate(clouds):
        assert np.array_equal(X[i, : len(c)], c) and not X[i, len(c):].any()
    assert np.array_equal(y, np.concatenate([q for _, q in chunks])) and y.sum() == 501


def test_the_energyflow_writer_pads_at_most_pad_bytes_at_once(tmp_path, monkeypatch):
    """Writing ``X`` holds one padded slice of ``PAD_BYTES``, not a whole written chunk (numpy's allocations are
    traced by tracemalloc)."""
    import tracemalloc

    from qgdist.generate import formats

    rng = np.random.default_rng(0)
    clouds = [rng.normal(size=(n, 4)) for n in rng.integers(1, 100, size=4000)]
    whole_chunk = len(clouds) * max(map(len, clouds)) * 4 * 8   # ~12.7 MB padded
    monkeypatch.setattr(formats, "PAD_BYTES", 1 << 20)
    writer = formats.EnergyFlowNpzWriter(str(tmp_path / "ef.npz"), compress=False)
    writer.write(clouds, np.zeros(len(clouds)))
    tracemalloc.start()
    try:
        writer.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20 < whole_chunk, (peak, whole_chunk)
    X = np.load(tmp_path / "ef.npz")["X"]
    assert all(np.array_equal(X[i, :len(c)], c) and not X[i, len(c):].any() for i, c in enumerate(clouds))


def test_a_one_chunk_energyflow_file_has_the_members_np_savez_writes(tmp_path):
    from qgdist.generate.formats import pad_clouds, write_energyflow_npz
    from qgdist.generate.toy import cloud_jets

    for compress in (True, False):
        cfg = ToyConfig("energyflow", 200, str(tmp_path / f"streamed-{compress}.npz"), seed=4, compress=compress)
        run(cfg)
        clouds, is_quark = cloud_jets(cfg)
        write_energyflow_npz(str(tmp_path / "whole.npz"), pad_clouds(clouds), is_quark.astype(np.float64), compress)
        streamed, whole = zipfile.ZipFile(cfg.out), zipfile.ZipFile(tmp_path / "whole.npz")
        assert streamed.namelist() == whole.namelist() == ["X.npy", "y.npy"]
        for a, b in zip(streamed.infolist(), whole.infolist()):
            assert (a.compress_type, a.file_size, a.compress_size) == (b.compress_type, b.file_size, b.compress_size)
            assert streamed.read(a) == whole.read(b)


def test_a_failed_energyflow_write_leaves_the_previous_file_whole(tmp_path):
    from qgdist.generate.formats import EnergyFlowNpzWriter

    path = tmp_path / "ef.npz"
    run(ToyConfig("energyflow", 20, str(path), seed=1))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"), EnergyFlowNpzWriter(str(path)) as writer:
        writer.write([np.ones((3, 4))], np.ones(1))
        raise RuntimeError("interrupted")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError, match="ef.npz: 1 clouds but 2 labels"):
        EnergyFlowNpzWriter(str(path)).write([np.ones((3, 4))], np.ones(2))

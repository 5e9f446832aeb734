"""The columnar source (ROOT TTrees, jagged parquet, HDF5 in the weaver/ParT layout): the same particles give the
same shards as the EnergyFlow npz, files are read by entry ranges, and bad files and entries are named by file,
entry and branch."""

import glob

import numpy as np
import pytest
import webdataset as wds

pytest.importorskip("uproot")
pytest.importorskip("h5py")

from qgdist.cli import main  # noqa: E402
from qgdist.data.convert import ConvertConfig, convert  # noqa: E402
from qgdist.data.labels import LabelConvention  # noqa: E402
from qgdist.data.shards.schema import decode_chunk  # noqa: E402
from qgdist.data.sources import columnar  # noqa: E402
from qgdist.data.sources.base import Unit  # noqa: E402
from qgdist.data.sources.errors import BadRowError  # noqa: E402
from qgdist.generate import columnar as writers  # noqa: E402
from qgdist.generate.toy import ToyConfig, cloud_jets, run  # noqa: E402

JETS = 240
EXT = {"root": ".root", "parquet-jagged": ".parquet", "h5": ".h5"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("columnar")
    run(ToyConfig("energyflow", JETS, str(d / "jets.npz"), seed=4))
    for fmt, ext in EXT.items():
        run(ToyConfig(fmt, JETS, str(d / f"jets{ext}"), seed=4))
    return d


def _convert(source, inputs, out, **kw):
    kw = {"executor": "local", "progress": False, **kw}
    return convert(ConvertConfig(source, [str(p) for p in inputs], str(out), **kw))


def _members(out):
    """Every tar member but meta.json (which names the source and file), in order."""
    shards = sorted(glob.glob(f"{out}/*.tar"))
    return [{k: v for k, v in s.items() if k.endswith(".npy")} for s in wds.WebDataset(shards, shardshuffle=False)]


def _jets(out):
    """row -> (jet record, kin, pid) of every jet in the shards."""
    out_ = {}
    for s in wds.WebDataset(sorted(glob.glob(f"{out}/*.tar")), shardshuffle=False).decode():
        if "jets.npy" not in s:
            continue
        c = decode_chunk(s)
        off = c.offsets
        for i in range(len(c)):
            out_[int(c.jets["row"][i])] = (c.jets[i], c.kin[off[i]:off[i + 1]], c.pid[off[i]:off[i + 1]])
    return out_


def test_the_same_particles_in_root_and_npz_give_identical_shards(files, tmp_path):
    # (pt, rapidity, phi) branches holding the npz's own float64 values: every array member is byte-identical.
    clouds, is_quark = cloud_jets(ToyConfig("energyflow", JETS, "", seed=4))
    n = np.array([len(c) for c in clouds])
    flat = np.concatenate(clouds)
    branches = {"label": is_quark.astype(np.int32), "part_pt": (flat[:, 0], n), "part_rapidity": (flat[:, 1], n),
                "part_phi": (flat[:, 2], n), "part_pid": (flat[:, 3].astype(np.int32), n)}
    writers.write_root(str(tmp_path / "same.root"), branches)
    kw = {"split": (1.0, 0.0, 0.0), "rows_per_task": 100}
    _convert("energyflow", [files / "jets.npz"], tmp_path / "npz", **kw)
    m = _convert("columnar", [tmp_path / "same.root"], tmp_path / "root", **kw,
                 branches={"pt": "part_pt", "rapidity": "part_rapidity", "phi": "part_phi"})
    assert m.source == "columnar" and m.kind == "cloud" and m.rows == {"in": JETS, "written": JETS, "rejected": 0}
    npz, root = _members(tmp_path / "npz"), _members(tmp_path / "root")
    assert len(npz) == len(root) > 1 and npz == root


@pytest.mark.parametrize("fmt", sorted(EXT))
def test_generated_files_in_each_layout_hold_the_npz_jets(fmt, files, tmp_path):
    # The ParT layout (float32 four-momenta, massless): the same jets, labels and ids; kinematics to float32.
    _convert("energyflow", [files / "jets.npz"], tmp_path / "npz")
    m = _convert("columnar", [files / f"jets{EXT[fmt]}"], tmp_path / fmt, rows_per_task=100)
    assert m.rows == {"in": JETS, "written": JETS, "rejected": 0} and m.label_convention.startswith("columnar: y=1")
    a, b = _jets(tmp_path / "npz"), _jets(tmp_path / fmt)
    assert a.keys() == b.keys() == set(range(JETS))
    for row in a:
        ja, ka, pa = a[row]
        jb, kb, pb = b[row]
        assert (ja["is_quark"], ja["n"]) == (jb["is_quark"], jb["n"]) and (pa == pb).all()
        np.testing.assert_allclose(kb[:, :2], ka[:, :2], rtol=1e-6, atol=1e-5)
        dphi = np.mod(kb[:, 2] - ka[:, 2] + np.pi, 2 * np.pi) - np.pi     # atan2 wraps phi into (-pi, pi]
        assert np.abs(dphi).max() < 1e-5
        np.testing.assert_allclose(jb["pt"], ja["pt"], rtol=1e-6)


def test_units_read_only_their_entries(files, monkeypatch):
    import uproot

    calls = []
    real = uproot.TBranch.array

    def spy(self, *args, **kw):
        calls.append((kw["entry_start"], kw["entry_stop"]))
        return real(self, *args, **kw)

    monkeypatch.setattr(uproot.TBranch, "array", spy)
    labels = LabelConvention.default("columnar")
    plan = columnar.plan(str(files / "jets.root"), 100)
    assert [(u.row_start, u.row_stop) for u in plan.units] == [(0, 100), (100, 200), (200, 240)]
    whole = [c for c in columnar.read(Unit(str(files / "jets.root"), 0, JETS), labels)]
    calls.clear()
    part = list(columnar.read(Unit(str(files / "jets.root"), 130, 190), labels, read_rows=32))
    assert calls and all(130 <= lo < hi <= 190 and hi - lo <= 32 for lo, hi in calls)
    rows = [r for c in part for r in c.rows]
    assert rows == list(range(130, 190))
    kin = np.concatenate([c.block.kin for c in part])
    ref = whole[0].block.slice(130, 190)
    np.testing.assert_array_equal(kin, ref.kin)
    # parquet: units are whole row groups; HDF5: slices of the datasets
    pq_plan = columnar.plan(str(files / "jets.parquet"), 1)
    assert len(pq_plan.units) == 1 and pq_plan.units[0].row_groups == (0,)   # one row group of 4096 rows holds all
    h5_units = columnar.plan(str(files / "jets.h5"), 64).units
    assert [u.rows for u in h5_units] == [64, 64, 64, 48]


def test_mapping_variants_eta_and_no_pid(files, tmp_path):
    clouds, is_quark = cloud_jets(ToyConfig("energyflow", 60, "", seed=5))
    n = np.array([len(c) for c in clouds])
    flat = np.concatenate(clouds)
    branches = {"is_q": is_quark.astype(np.float32), "pt": (flat[:, 0], n), "eta": (flat[:, 1], n),
                "phi": (flat[:, 2], n)}
    writers.write_parquet(str(tmp_path / "eta.parquet"), branches)
    m = _convert("columnar", [tmp_path / "eta.parquet"], tmp_path / "o",
                 branches={"label": "is_q", "pt": "pt", "eta": "eta", "phi": "phi", "pid": ""})
    assert m.rows["written"] == 60
    jets = _jets(tmp_path / "o")
    assert all((pid == 0).all() for _, _, pid in jets.values())
    # without PDG ids every particle is massless: rapidity = pseudorapidity
    np.testing.assert_allclose(np.sort(jets[0][1][:, 1]), np.sort(clouds[0][:, 1].astype(np.float32)), atol=1e-6)


def _root_with(tmp_path, name, edit):
    clouds, is_quark = cloud_jets(ToyConfig("energyflow", 40, "", seed=6))
    b = writers.part_layout(clouds, is_quark)
    edit(b)
    writers.write_root(str(tmp_path / name), b)
    return tmp_path / name


def _ragged(b):
    values, n = b["part_pz"]
    cut = int(n[:12].sum())                       # entry 12 of part_pz loses its last value
    n2 = n.copy()
    n2[12] -= 1
    b["part_pz"] = (np.delete(values, cut + n[12] - 1), n2)


def _nan(b):
    b["part_energy"][0][int(b["part_energy"][1][:7].sum())] = np.nan   # the first particle of entry 7


BAD_ENTRIES = {
    "ragged": (_ragged, 12, "part_pz", "ragged"),
    "nan": (_nan, 7, "part_energy", "NaN or inf"),
    "label": (lambda b: b["label"].__setitem__(3, 2), 3, "label", "not 0 or 1"),
    "pid": (lambda b: b["part_pid"][0].__setitem__(0, 10**9), 0, "part_pid", "not a known PDG"),
    "counts": (lambda b: b["jet_nparticles"].__setitem__(9, 1), 9, "jet_nparticles", "does not match"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_bad_entries_are_named_by_file_entry_and_branch(case, tmp_path):
    edit, row, branch, reason = BAD_ENTRIES[case]
    path = _root_with(tmp_path, f"bad_{case}.root", edit)
    with pytest.raises(BadRowError, match=rf"bad_{case}.root: row {row}, field '{branch}': .*{reason}"):
        _convert("columnar", [path], tmp_path / "e", rows_per_task=16)
    m = _convert("columnar", [path], tmp_path / "q", rows_per_task=16, on_bad_row="quarantine")
    assert m.rows == {"in": 40, "written": 39, "rejected": 1}
    assert (m.quarantine[0]["row"], m.quarantine[0]["field"]) == (row, branch)


def test_bad_files_are_refused_by_name(files, tmp_path):
    no_pid = _root_with(tmp_path, "nopid.root", lambda b: b.pop("part_pid"))
    with pytest.raises(BadRowError, match=r"nopid.root: whole file, field 'part_pid': no branch 'part_pid' in "
                                          r"TTree 'tree' \(files without PDG ids: --branch pid=\)"):
        _convert("columnar", [no_pid], tmp_path / "a")
    assert _convert("columnar", [no_pid], tmp_path / "b", branches={"pid": ""}).rows["written"] == 40
    flat_px = _root_with(tmp_path, "flat.root", lambda b: b.__setitem__("label", (b["label"], np.ones(40, int))))
    with pytest.raises(BadRowError, match=r"flat.root: whole file, field 'label': holds a list of values per entry"):
        _convert("columnar", [flat_px], tmp_path / "c")
    (tmp_path / "junk.root").write_bytes(b"not a root file" * 100)
    with pytest.raises(BadRowError, match=r"junk.root: whole file, field '<file>': not a readable ROOT file"):
        _convert("columnar", [tmp_path / "junk.root"], tmp_path / "d")
    clouds, y = cloud_jets(ToyConfig("energyflow", 10, "", seed=7))
    b = writers.part_layout(clouds, y)
    b.pop("jet_nparticles")
    writers.write_h5(str(tmp_path / "nocounts.h5"), b)
    with pytest.raises(BadRowError, match=r"nocounts.h5: whole file, field 'jet_nparticles': zero-padded"):
        _convert("columnar", [tmp_path / "nocounts.h5"], tmp_path / "e")
    m = _convert("columnar", [tmp_path / "junk.root", files / "jets.root"], tmp_path / "q", on_bad_row="quarantine")
    assert m.quarantine[0]["file"] == "junk.root" and m.rows["written"] == JETS


def test_hdf5_variable_length_datasets(tmp_path):
    import h5py

    clouds, y = cloud_jets(ToyConfig("energyflow", 30, "", seed=8))
    with h5py.File(tmp_path / "vlen.h5", "w") as f:
        grp = f.create_group("jets")
        grp["label"] = y.astype(np.int8)
        for i, name in enumerate(("pt", "y", "phi", "pid")):
            ds = grp.create_dataset(name, (30,), dtype=h5py.vlen_dtype(np.float64))
            for j, c in enumerate(clouds):
                ds[j] = c[:, i]
    m = _convert("columnar", [tmp_path / "vlen.h5"], tmp_path / "o",
                 branches={"tree": "jets", "pt": "pt", "rapidity": "y", "phi": "phi", "pid": "pid"})
    jets = _jets(tmp_path / "o")
    assert m.rows["written"] == 30 and [int(jets[r][0]["n"]) for r in range(30)] == [len(c) for c in clouds]


def test_branch_options_are_checked_as_flags(files, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["convert", "--source", "columnar", "--out", out, "--no-ray", "--branch", "pxx=a",
                 str(files / "jets.root")]) == 2
    assert "qgdist convert: branch: unknown key 'pxx'" in capsys.readouterr().err
    assert main(["convert", "--source", "columnar", "--out", out, "--no-ray", "--branch", "pt=part_pt",
                 str(files / "jets.root")]) == 2
    assert "branch: with pt= name phi= and one of rapidity= or eta=" in capsys.readouterr().err
    assert main(["convert", "--source", "energyflow", "--out", out, "--no-ray", "--branch", "pid=",
                 str(files / "jets.npz")]) == 2
    assert "--branch applies to --source columnar" in capsys.readouterr().err
    assert main(["convert", "--source", "columnar", "--out", out, "--no-ray", "--quiet", str(files)]) == 0      # a directory: every .root, .parquet and .h5 in it
    from qgdist.data.shards.manifest import read_manifest

    assert read_manifest(out).rows["written"] == 3 * JETS

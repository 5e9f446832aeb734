"""Pythia 8 + FastJet generator: physics cuts, balance, multiplicities, formats, determinism, Ray tasks.

Small samples (20 jets per class and task): the whole file costs about a minute of one CPU.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from qgdist.cli import build_parser
from qgdist.core.config import from_args
from qgdist.data import convert
from qgdist.data.labels import LabelConvention
from qgdist.data.sources import cms, energyflow
from qgdist.generate.mc_settings import PythiaConfig, task_seeds
from qgdist.generate.pythia import run_pythia
from tests.commands import assert_finite, qgdist

pytest.importorskip("pythia8mc")
pytest.importorskip("fastjet")
pytestmark = pytest.mark.slow   # Pythia itself: ~50 s for the file; the quick loop leaves it out

#: Masses (GeV) of the stable visible particles Pythia leaves with default decays.
MASS = {11: 0.000511, 13: 0.10566, 22: 0.0, 130: 0.49761, 211: 0.13957, 321: 0.49368, 2112: 0.93957, 2212: 0.93827}
JETS, PER_TASK = 80, 40


@pytest.fixture(scope="module")
def local_command(tmp_path_factory):
    """``qgdist generate pythia`` run as a command: its config, the summary.json it wrote, the line it printed."""
    out = str(tmp_path_factory.mktemp("pythia_local"))
    cfg = PythiaConfig(out=out, jets=JETS, jets_per_task=PER_TASK, seed=11, use_ray=False)
    printed = qgdist("generate", "pythia", "--out", out, "--jets", JETS, "--jets-per-task", PER_TASK, "--seed", 11,
                     "--no-ray").stdout
    with open(os.path.join(out, "summary.json")) as f:
        return cfg, json.load(f), printed


@pytest.fixture(scope="module")
def local_run(local_command):
    cfg, summary, _ = local_command
    return cfg, summary


def test_generate_pythia_prints_the_summary_it_wrote(local_command):
    cfg, s, printed = local_command
    assert assert_finite({k: v for k, v in s.items() if k != "config"}, "summary.json") > 5
    line = re.fullmatch(r"(\d+) jets \((\d+) quark, (\d+) gluon\) in (\d+) tasks -> (\S+); acceptance quark ([\d.]+) "
                        r"gluon ([\d.]+); mean multiplicity quark ([\d.]+) gluon ([\d.]+); ([\d.]+) s", printed.strip())
    assert line and line[5] == cfg.out, printed
    assert [int(v) for v in line.groups()[:4]] == [JETS, JETS // 2, JETS // 2, JETS // PER_TASK] == [
        s["jets"], s["quark_jets"], s["gluon_jets"], s["tasks"]]
    assert 0 < float(line[6]) == pytest.approx(s["acceptance"]["quark"], abs=5e-4) and float(line[6]) <= 1
    assert 0 < float(line[7]) == pytest.approx(s["acceptance"]["gluon"], abs=5e-4) and float(line[7]) <= 1
    assert 0 < float(line[8]) == pytest.approx(s["mean_multiplicity"]["quark"], abs=0.05)
    assert 0 < float(line[9]) == pytest.approx(s["mean_multiplicity"]["gluon"], abs=0.05)
    assert float(line[10]) == s["wall_seconds"] > 0


def _npz(cfg: PythiaConfig, task: int):
    with np.load(os.path.join(cfg.out, "energyflow", f"pythia_s{cfg.seed}_t{task:05d}.npz")) as f:
        return f["X"], f["y"]


def _parquet(cfg: PythiaConfig, task: int):
    return pq.ParquetFile(os.path.join(cfg.out, "cms", f"pythia_s{cfg.seed}_t{task:05d}.parquet"))


def _jet_kinematics(X: np.ndarray):
    """Jet pT and rapidity recomputed from the stored constituents (pt, y, phi, pdgid)."""
    pts, ys = [], []
    for x in X:
        x = x[x[:, 0] > 0]
        m = np.array([MASS[abs(int(p))] for p in x[:, 3]])
        mt = np.sqrt(x[:, 0] ** 2 + m**2)
        px, py = (x[:, 0] * np.cos(x[:, 2])).sum(), (x[:, 0] * np.sin(x[:, 2])).sum()
        e, pz = (mt * np.cosh(x[:, 1])).sum(), (mt * np.sinh(x[:, 1])).sum()
        pts.append(np.hypot(px, py))
        ys.append(0.5 * np.log((e + pz) / (e - pz)))
    return np.array(pts), np.array(ys)


def test_energyflow_files_pass_cuts_balanced_and_shuffled(local_run):
    cfg, summary = local_run
    assert summary["jets"] == JETS and summary["quark_jets"] == summary["gluon_jets"] == JETS // 2
    for task in range(JETS // PER_TASK):
        X, y = _npz(cfg, task)
        assert X.dtype == np.float64 and y.dtype == np.float64 and X.shape[0] == PER_TASK and X.shape[2] == 4
        mult = (X[:, :, 0] > 0).sum(axis=1)
        assert X.shape[1] == mult.max()  # padded to the file's own maximum multiplicity
        assert set(np.unique(y)) == {0.0, 1.0} and y.sum() == PER_TASK // 2
        assert 0 < np.abs(np.diff(y)).sum()  # not sorted by class
        pt, rap = _jet_kinematics(X)
        assert np.all((pt >= 500.0) & (pt <= 550.0)), pt
        assert np.all(np.abs(rap) < 1.7), rap
        # Particle phi within pi of the jet's phi (FastJet's E-scheme jet phi, in [0, 2 pi)).
        for x in X:
            x = x[x[:, 0] > 0]
            jet_phi = np.mod(np.arctan2((x[:, 0] * np.sin(x[:, 2])).sum(), (x[:, 0] * np.cos(x[:, 2])).sum()), 2 * np.pi)
            assert np.all(np.abs(x[:, 2] - jet_phi) <= np.pi)
        assert set(np.unique(np.abs(X[:, :, 3][X[:, :, 0] > 0]))) <= set(MASS)


def test_multiplicities_quark_below_gluon(local_run):
    cfg, summary = local_run
    q, g = [], []
    for task in range(2):
        Xt, y = _npz(cfg, task)
        mult = (Xt[:, :, 0] > 0).sum(axis=1)
        q.extend(mult[y == 1])
        g.extend(mult[y == 0])
    assert len(q) == len(g) == JETS // 2
    # Literature / large-sample values: quark ~34, gluon ~53; wide bounds for 40 jets per class.
    assert 24 < np.mean(q) < 44 and 42 < np.mean(g) < 66 and np.mean(g) > np.mean(q) + 8
    assert summary["mean_multiplicity"]["quark"] == pytest.approx(np.mean(q))


def test_cms_parquet_matches_energyflow(local_run):
    cfg, _ = local_run
    f = _parquet(cfg, 0)
    assert f.metadata.num_row_groups == PER_TASK  # one row group per jet, as the CMS files
    schema = f.schema_arrow
    assert [n for n in schema.names] == ["X_jets", "pt", "m0", "y"]
    assert str(schema.field("X_jets").type) == "list<item: list<item: list<item: double>>>"
    t = f.read()
    X, y_ef = _npz(cfg, 0)
    # Same jets in the same order: CMS y = 1 means gluon, EnergyFlow y = 1 means quark.
    np.testing.assert_array_equal(t["y"].to_numpy(), 1.0 - y_ef)
    pt_ef, _ = _jet_kinematics(X)
    np.testing.assert_allclose(t["pt"].to_numpy(), pt_ef, rtol=1e-9)
    assert np.all(t["m0"].to_numpy() > 0)
    images = np.array(t["X_jets"].to_pylist())
    assert images.shape == (PER_TASK, 3, 125, 125)
    assert np.all(images >= 0) and np.all(images.sum(axis=(2, 3))[:, 0] > 0)
    # Channel 0 holds charged pT near the axis: most of it lies in the central 46x46 pixels (dR < 0.4).
    centre = images[:, 0, 39:86, 39:86].sum(axis=(1, 2))
    assert np.median(centre / images[:, 0].sum(axis=(1, 2))) > 0.5
    # HCAL-like channel: constant over each aligned 5x5 tower.
    towers = images[:, 2].reshape(PER_TASK, 25, 5, 25, 5)
    assert np.allclose(towers, towers[:, :, :1, :, :1])


def test_columnar_root_file_holds_the_npz_constituents(local_run, tmp_path):
    pytest.importorskip("uproot")
    import uproot

    cfg, _ = local_run
    root = PythiaConfig(out=str(tmp_path), jets=PER_TASK, jets_per_task=PER_TASK, seed=cfg.seed, use_ray=False,
                        format="root")
    run_pythia(root)                       # task 0 of the same seed: the same events as local_run's task 0
    X, y = _npz(cfg, 0)
    with uproot.open(os.path.join(root.out, "columnar", f"pythia_s{cfg.seed}_t00000.root")) as f:
        t = f["tree"].arrays(["label", "jet_nparticles", "part_px", "part_energy", "part_pid"], library="np")
    n = (X[..., 0] > 0).sum(1)
    np.testing.assert_array_equal(t["label"], y)                             # label 1 = quark, as the npz y
    np.testing.assert_array_equal(t["jet_nparticles"], n)
    for i in (0, PER_TASK - 1):
        pt, rap, phi, pid = X[i, : n[i]].T
        np.testing.assert_array_equal(t["part_pid"][i], pid)                 # pt-sorted already in the npz
        np.testing.assert_allclose(t["part_px"][i], pt * np.cos(phi), rtol=1e-5, atol=1e-4)   # float32
        np.testing.assert_allclose(t["part_energy"][i], pt * np.cosh(rap), rtol=1e-5)           # massless


def test_ray_tasks_reproduce_in_process_run_bit_identically(tmp_path):
    """Two Ray tasks on a real private 2-CPU Ray give the same files as the same tasks run in-process."""
    small = dict(jets=20, jets_per_task=10, seed=5)
    local = PythiaConfig(out=str(tmp_path / "local"), use_ray=False, **small)
    on_ray = PythiaConfig(out=str(tmp_path / "ray"), workers=2, **small)
    run_pythia(local)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    summary = run_pythia(on_ray)
    assert summary["tasks_generated_now"] == 2 and summary["jets"] == 20
    for task in range(2):
        for a, b in zip(_npz(local, task), _npz(on_ray, task)):
            np.testing.assert_array_equal(a, b)
        assert _parquet(local, task).read().equals(_parquet(on_ray, task).read())
    # Tasks of one run are independent samples: different seeds, different jets.
    assert task_seeds(5, 0) != task_seeds(5, 1)
    assert not np.array_equal(_npz(local, 0)[0][:, 0, 0], _npz(local, 1)[0][:, 0, 0])
    # A second run reuses the finished tasks.
    assert run_pythia(on_ray)["tasks_generated_now"] == 0


def test_reuse_refuses_other_settings(local_run):
    cfg, _ = local_run
    other = PythiaConfig(out=cfg.out, jets=JETS, jets_per_task=PER_TASK, seed=cfg.seed, pthat_min=400.0,
                         use_ray=False)
    with pytest.raises(ValueError, match="other settings"):
        run_pythia(other)
    with open(os.path.join(cfg.out, "tasks", f"pythia_s{cfg.seed}_t00000.json")) as f:
        assert json.load(f)["settings"]["pthat_min"] == 450.0


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="jets"):
        PythiaConfig(out="x", jets=7).validate()
    with pytest.raises(ValueError, match="format"):
        PythiaConfig(out="x", format="tar").validate()


def test_cli_maps_flags():
    args = build_parser().parse_args(["generate", "pythia", "--out", "d", "--jets", "10", "--format", "cms",
                                      "--seed", "4", "--no-ray", "--no-compress"])
    cfg = from_args(PythiaConfig, args)
    assert cfg == PythiaConfig(out="d", jets=10, format="cms", seed=4, use_ray=False, compress=False)
    assert from_args(PythiaConfig, build_parser().parse_args(["generate", "pythia", "--out", "d"])).use_ray


def test_pythia_ray_does_not_import_pythia():
    """``pythia`` hands its task function to ``pythia_ray``; the Ray runner never imports ``pythia`` back."""
    import subprocess
    import sys

    code = "import sys, qgdist.generate.pythia_ray; assert 'qgdist.generate.pythia' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ingest_readers_read_every_row(local_run):
    cfg, _ = local_run
    for source, sub, ext in (("energyflow", "energyflow", "npz"), ("cms", "cms", "parquet")):
        reader = {"energyflow": energyflow, "cms": cms}[source]
        path = os.path.join(cfg.out, sub, f"pythia_s{cfg.seed}_t00000.{ext}")
        plan = reader.plan(path, 16)
        assert plan.rows == PER_TASK and not plan.rejected
        samples = [s for unit in plan.units for chunk in reader.read(unit, LabelConvention.default(source))
                   for s in chunk.samples]
        assert len(samples) == PER_TASK  # nothing rejected
        quarks = sum(s.meta["is_quark"] for s in samples)
        assert quarks == PER_TASK // 2
        if source == "energyflow":
            X, y = _npz(cfg, 0)
            assert [s.meta["is_quark"] for s in samples] == y.astype(int).tolist()
            assert all(500.0 <= s.meta["pt"] <= 550.0 for s in samples)
        else:
            # Same jets as the npz, in the same order: CMS y = 0 and EnergyFlow y = 1 both mean quark.
            assert [s.meta["is_quark"] for s in samples] == _npz(cfg, 0)[1].astype(int).tolist()
            assert all(s.meta.get("pt", 525.0) >= 500.0 for s in samples)


def test_converts_to_shards_read_by_webdataset(local_run, tmp_path):
    cfg, _ = local_run
    import webdataset as wds

    for source, sub, n_files in (("energyflow", "energyflow", 2), ("cms", "cms", 1)):
        out = tmp_path / source
        inputs = [os.path.join(cfg.out, sub)] if n_files == 2 else [str(_parquet_path(cfg, 0))]
        manifest = convert.convert(convert.ConvertConfig(source=source, inputs=inputs, out=str(out),
                                                         executor="local", progress=False))
        rows = PER_TASK * n_files
        assert manifest.rows == {"in": rows, "written": rows, "rejected": 0}
        tars = sorted(str(p) for p in out.glob("*.tar"))
        jets = np.concatenate([c["jets.npy"] for c in wds.WebDataset(tars, shardshuffle=False,
                                                                      nodesplitter=None).decode()])
        assert len(jets) == rows and int(jets["is_quark"].sum()) == rows // 2
        assert ((jets["pt"] >= 500.0) & (jets["pt"] <= 550.0)).all()


def _parquet_path(cfg: PythiaConfig, task: int) -> str:
    return os.path.join(cfg.out, "cms", f"pythia_s{cfg.seed}_t{task:05d}.parquet")


def test_physics_bench_smoke(local_run, tmp_path):
    """The bench wires generation -> convert -> train -> test metrics; two steps per model, not a physics check."""
    cfg, _ = local_run
    out = qgdist("bench", "physics", "--jets", JETS, "--out", tmp_path, "--pythia-dir", cfg.out, "--epochs", 1,
                 "--batch-size", 16, "--max-steps", 2, "--models", "particlenet-lite", "resnet15").stdout
    results = json.loads((tmp_path / "physics.json").read_text())
    from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint

    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"particlenet-lite", "resnet15"} and results["generated_jets"] == JETS
    assert (tmp_path / "physics_roc.png").stat().st_size > 0
    lines = out.splitlines()
    title = f"Pythia 8 quark/gluon jets (EnergyFlow recipe): {JETS} generated; the paper trained on 1.6M jets."
    assert title in lines, out
    table = lines[lines.index(title):]   # what came before: one progress line per model
    for model, r in rows.items():
        # 1/eps_B is null where no background passed (a handful of test jets): the table prints a dash
        rejection = {k: r["test"].pop(k) for k in list(r["test"]) if k.startswith("rej")}
        assert rejection and all(v is None or v >= 1 for v in rejection.values()), rejection
        assert assert_finite(r, f"physics.json {model}") > 5
        assert 0 < r["train_jets"] < JETS and r["steps"] == 2 and r["parameters"] > 0
        assert r["epochs_run"] == 0   # whole epochs: --max-steps stopped it inside the first
        assert r["train_seconds"] > 0 and 0 <= r["test"]["acc"] <= 1 and 0 <= r["test"]["auc"] <= 1
        manifest = json.loads((tmp_path / f"shards-{r['source']}" / "manifest.json").read_text())
        assert manifest["rows"]["in"] == manifest["rows"]["written"] == JETS   # rows in = rows written
        # The reported test metrics are those of the checkpoint the bench names, scored again by qgdist evaluate.
        again = evaluate_checkpoint(EvalConfig(checkpoint=r["checkpoint"], data=str(tmp_path / f"shards-{r['source']}"),
                                               out=str(tmp_path / f"eval-{model}"), progress=False))
        assert again["n_jets"] == r["test_jets"] > 0
        assert again["metrics"]["auc"] == pytest.approx(r["test"]["auc"], abs=1e-6)
        assert again["metrics"]["acc"] == pytest.approx(r["test"]["acc"], abs=1e-6)
        # ... and the table prints them in the model's row
        line = next(row for row in table if row.startswith(model))
        assert f"{r['train_jets']:6d} {r['test_jets']:6d}" in line and f"{r['test']['acc']:6.3f} {r['test']['auc']:6.4f}" \
            in line, line

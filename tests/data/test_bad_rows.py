"""The bad-row rules of docs/ingest.md, one case each, on files written by the project's own writers.

Every case takes a good toy file (``qgdist generate toy``), breaks one row the way the rule describes, writes it
back with ``qgdist.generate.formats`` (CMS: one row group per jet; EnergyFlow: a deflated npz), and converts it
twice: with ``--on-bad-row error`` the conversion stops naming file, row and field; with ``quarantine`` exactly
that row is rejected, the rest is written, and rows in = written + rejected. Values just inside a rule's bounds
are converted untouched, and toy files of several seeds convert with no rejection at all.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from qgdist.data.convert import ConvertConfig, convert
from qgdist.data.sources.cms import NEGATIVE_PIXEL_TOLERANCE
from qgdist.data.sources.errors import BadRowError
from qgdist.generate.formats import CMSParquetWriter, write_energyflow_npz
from qgdist.generate.toy import ToyConfig, run

BAD_ROW = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    run(ToyConfig("cms", 8, str(d / "cms.parquet"), seed=4))
    run(ToyConfig("energyflow", 40, str(d / "ef.npz"), seed=5))
    table = pq.read_table(d / "cms.parquet")
    cms = {"images": np.array(table.column("X_jets").to_pylist(), dtype=np.float64),
           **{c: table.column(c).to_numpy().astype(np.float64) for c in ("pt", "m0", "y")}}
    data = np.load(d / "ef.npz")
    return {"cms": cms, "ef": {"X": data["X"].copy(), "y": data["y"].copy()}}


def _convert(source: str, path, out, **kw):
    return convert(ConvertConfig(source, [str(path)], str(out), executor="local", progress=False, **kw))


def _write_cms(path, cols) -> None:
    with CMSParquetWriter(str(path)) as writer:
        writer.write(cols["images"], cols["pt"], cols["m0"], cols["y"])


def _write_ef(path, cols) -> None:
    write_energyflow_npz(str(path), cols["X"], cols["y"])


def _set(array_name, index, value):
    def edit(cols):
        cols[array_name][index] = value
    return edit


def _scale_image(factor):
    def edit(cols):
        cols["images"][BAD_ROW] *= factor
    return edit


def _first_particle(column, value):
    """Set feature ``column`` of the first (real) particle of row BAD_ROW."""
    return _set("X", (BAD_ROW, 0, column), value)


#: rule -> (source, edit of the columns, field named, a phrase of the reason)
RULES = {
    "cms: pixel NaN or inf": ("cms", _set("images", (BAD_ROW, 1, 62, 62), np.inf), "X_jets", "NaN or inf"),
    "cms: negative pixel beyond the tolerance": (
        "cms", _set("images", (BAD_ROW, 1, 62, 62), -10 * NEGATIVE_PIXEL_TOLERANCE), "X_jets", "negative energy"),
    "cms: all pixels negative": ("cms", _scale_image(-1.0), "X_jets", "negative energy"),
    "cms: empty image": ("cms", _scale_image(0.0), "X_jets", "image is empty"),
    "cms: pt zero": ("cms", _set("pt", BAD_ROW, 0.0), "pt", "not a positive finite number"),
    "cms: pt negative": ("cms", _set("pt", BAD_ROW, -120.0), "pt", "not a positive finite number"),
    "cms: m0 negative": ("cms", _set("m0", BAD_ROW, -40.0), "m0", "-40.0 is not a non-negative finite number"),
    "cms: m0 NaN": ("cms", _set("m0", BAD_ROW, np.nan), "m0", "not a non-negative finite number"),
    "cms: label": ("cms", _set("y", BAD_ROW, 0.5), "y", "is not 0 or 1"),
    "energyflow: NaN": ("ef", _first_particle(0, np.nan), "X", "NaN or inf"),
    "energyflow: pt <= 0": ("ef", _first_particle(0, -1.0), "X", "pt <= 0"),
    "energyflow: rapidity": ("ef", _first_particle(1, 11.0), "X", "rapidity beyond"),
    "energyflow: phi below -pi": ("ef", _first_particle(2, -3.5), "X", "phi outside [-pi, 3 pi]"),
    "energyflow: phi beyond 3 pi": ("ef", _first_particle(2, 10.0), "X", "phi outside [-pi, 3 pi]"),
    "energyflow: unknown PDG id": ("ef", _first_particle(3, 12345.0), "X", "pdgid 12345 is not a known"),
    "energyflow: invalid PDG id": ("ef", _first_particle(3, 99999999.0), "X", "pdgid 1e+08 is not a known"),
    "energyflow: non-integral PDG id": ("ef", _first_particle(3, 211.5), "X", "pdgid 211.5 is not a known"),
    "energyflow: no particles": ("ef", _set("X", BAD_ROW, 0.0), "X", "no particles"),
    "energyflow: label": ("ef", _set("y", BAD_ROW, -1.0), "y", "is not 0 or 1"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_rejects_exactly_its_row(rule, toy, tmp_path):
    source, edit, field, reason = RULES[rule]
    cols = {k: v.copy() for k, v in toy[source].items()}
    edit(cols)
    path = tmp_path / ("bad.parquet" if source == "cms" else "bad.npz")
    (_write_cms if source == "cms" else _write_ef)(path, cols)
    reader = "cms" if source == "cms" else "energyflow"
    with pytest.raises(BadRowError) as err:
        _convert(reader, path, tmp_path / "error")
    assert (err.value.record.row, err.value.record.field) == (BAD_ROW, field), str(err.value)
    assert reason in err.value.record.reason and str(err.value).startswith(f"{path.name}: row {BAD_ROW}")
    m = _convert(reader, path, tmp_path / "quarantine", on_bad_row="quarantine")
    rows = len(cols["y"])
    assert m.rows == {"in": rows, "written": rows - 1, "rejected": 1}
    assert [(q["row"], q["field"]) for q in m.quarantine] == [(BAD_ROW, field)]


def test_values_inside_the_bounds_are_kept_as_they_are(toy, tmp_path):
    cms = {k: v.copy() for k, v in toy["cms"].items()}
    cms["images"][BAD_ROW, 1, 62, 62] = -0.5 * NEGATIVE_PIXEL_TOLERANCE   # noise around zero
    cms["m0"][BAD_ROW] = 0.0
    _write_cms(tmp_path / "edge.parquet", cms)
    assert _convert("cms", tmp_path / "edge.parquet", tmp_path / "c").rows["rejected"] == 0
    ef = {k: v.copy() for k, v in toy["ef"].items()}
    ef["X"][BAD_ROW, 0, 2] = -np.pi
    ef["X"][BAD_ROW + 1, 0, 2] = 3 * np.pi
    ef["X"][BAD_ROW + 2, 0, 3] = -2212.0   # an antiproton: known
    _write_ef(tmp_path / "edge.npz", ef)
    assert _convert("energyflow", tmp_path / "edge.npz", tmp_path / "e").rows["rejected"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_toy_files_convert_without_rejections(seed, tmp_path):
    run(ToyConfig("cms", 60, str(tmp_path / "t.parquet"), seed=seed))
    run(ToyConfig("energyflow", 2000, str(tmp_path / "t.npz"), seed=seed))
    for source, name in (("cms", "t.parquet"), ("energyflow", "t.npz")):
        m = _convert(source, tmp_path / name, tmp_path / f"out-{source}")
        assert m.rows["rejected"] == 0 and m.rows["written"] == m.rows["in"]


def test_a_failing_pdg_lookup_is_an_error_not_an_unknown_id(toy, tmp_path, monkeypatch):
    """Only the particle package's "no such particle" means unknown: with the package unusable (here: it cannot
    be imported), conversion stops with that error instead of rejecting every jet as holding unknown ids."""
    from qgdist.data import features

    monkeypatch.setattr(features, "_TABLE", np.full_like(features._TABLE, np.nan))   # nothing looked up yet
    features.pdg_lookup.cache_clear()
    monkeypatch.setitem(sys.modules, "particle", None)   # `import particle` raises ImportError
    _write_ef(tmp_path / "ok.npz", toy["ef"])
    try:
        with pytest.raises(ImportError):
            _convert("energyflow", tmp_path / "ok.npz", tmp_path / "q", on_bad_row="quarantine")
    finally:
        features.pdg_lookup.cache_clear()
    assert not (tmp_path / "q" / "manifest.json").exists()

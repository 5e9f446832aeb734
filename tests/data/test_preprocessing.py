"""The model's preprocessing record: built from the training manifest's train-split statistics (by feature name,
whatever order the manifest lists them in), refusing a dataset without them, refusing data of another kind, source
or schema content by name, and surviving the trip through a checkpoint's plain containers."""

from __future__ import annotations

import json

import pytest

from qgdist.data.features import CONTINUOUS, KIN_FEATURES, PID_FEATURES
from qgdist.data.preprocessing import Preprocessing, PreprocessingMismatch
from qgdist.data.shards.manifest import Manifest

JET = {"log_pt": {"mean": 6.0, "std": 0.5}, "mass": {"mean": 40.0, "std": 0.0}}
# The manifest's particle statistics in another order than the preset's, with a zero spread for dr.
ORDER = list(reversed(KIN_FEATURES))
PARTICLE = {"features": ORDER, "mean": [float(i + 1) for i in range(len(ORDER))],
            "std": [0.0 if name == "dr" else float(10 + i) for i, name in enumerate(ORDER)]}


def _manifest(kind: str = "cloud", source: str = "energyflow", stats: dict | None = None,
              schema_version: int = 2) -> Manifest:
    if stats is None:
        stats = {"jet": JET, "particle": PARTICLE} if kind == "cloud" else {"jet": JET}
    return Manifest(source=source, kind=kind, dtype="float32", label_convention=f"{source}: y=1 is quark",
                    inputs=[], split_fractions={"train": 0.8, "val": 0.1, "test": 0.1}, shards=[], rows={},
                    stats=stats, schema_version=schema_version)


def test_cloud_statistics_are_taken_by_feature_name_and_pid_flags_stay_unscaled() -> None:
    pre = Preprocessing.from_manifest(_manifest(), "shards/train", "kinpid", max_particles=64, vectors=True)
    assert pre.feature_names == tuple(KIN_FEATURES + PID_FEATURES)
    for i, name in enumerate(KIN_FEATURES):
        j = ORDER.index(name)
        assert pre.feature_mean[i] == PARTICLE["mean"][j], name
        assert pre.feature_std[i] == (PARTICLE["std"][j] or 1.0), name   # a zero spread divides by 1, not 0
    assert pre.feature_mean[CONTINUOUS:] == (0.0,) * len(PID_FEATURES)
    assert pre.feature_std[CONTINUOUS:] == (1.0,) * len(PID_FEATURES)
    assert (pre.jet_mean, pre.jet_std) == ((6.0, 40.0), (0.5, 1.0))
    assert (pre.kind, pre.source, pre.schema_version, pre.preset, pre.max_particles) == (
        "cloud", "energyflow", 2, "kinpid", 64)
    assert (pre.label_convention, pre.trained_on, pre.vectors) == ("energyflow: y=1 is quark", "shards/train", True)


def test_the_defaults_are_the_kin_preset_128_particles_and_no_four_vectors() -> None:
    pre = Preprocessing.from_manifest(_manifest(), "d")
    assert (pre.preset, pre.max_particles, pre.vectors) == ("kin", 128, False)
    assert pre.feature_names == tuple(KIN_FEATURES) and all(isinstance(v, float) for v in pre.feature_mean)


def test_images_need_only_jet_statistics_and_never_take_four_vectors() -> None:
    pre = Preprocessing.from_manifest(_manifest("image", "cms"), "shards/cms", vectors=True)
    assert pre.kind == "image" and pre.vectors is False and pre.jet_mean == (6.0, 40.0)
    assert pre.feature_mean == (0.0,) * len(KIN_FEATURES) and pre.feature_std == (1.0,) * len(KIN_FEATURES)


@pytest.mark.parametrize("stats, missing", [
    ({}, "stats.jet.log_pt, stats.jet.mass, stats.particle.deta, stats.particle.dphi"),
    ({"jet": {"log_pt": {"mean": 1.0}, "mass": JET["mass"]}, "particle": PARTICLE}, "stats.jet.log_pt)"),
    ({"jet": JET, "particle": PARTICLE | {"features": ORDER[:-1] + ["other"]}}, "(stats.particle.deta)"),
])
def test_a_dataset_without_train_statistics_is_refused_naming_what_is_missing(stats: dict, missing: str) -> None:
    with pytest.raises(ValueError) as err:
        Preprocessing.from_manifest(_manifest(stats=stats), "shards/test-only")
    message = str(err.value)
    assert message.startswith("shards/test-only: no train-split normalisation statistics (") and missing in message
    assert "use the checkpoint (qgdist evaluate / predict), which carries its training statistics" in message


def test_an_unknown_preset_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown feature preset 'kinpidx'; choose from \['kin', 'kinpid'\]"):
        Preprocessing.from_manifest(_manifest(), "d", "kinpidx")


def test_data_of_another_kind_source_or_schema_is_refused_naming_each_difference() -> None:
    pre = Preprocessing.from_manifest(_manifest(), "shards/ef")
    with pytest.raises(PreprocessingMismatch) as err:
        pre.check_fits(_manifest("image", "cms", schema_version=3), "shards/cms")
    assert str(err.value) == ("shards/cms does not fit the model (trained on shards/ef): kind: model 'cloud', data "
                              "'image'; source: model 'energyflow', data 'cms'; schema_version: model 2, data 3")
    nameless = Preprocessing.from_dict(pre.to_dict() | {"trained_on": ""})
    with pytest.raises(PreprocessingMismatch, match=r"^x does not fit the model \(trained on another dataset\): "
                                                    r"kind: model 'cloud', data 'image'$"):
        nameless.check_fits(_manifest("image", "energyflow"), "x")


def test_data_of_the_same_content_fits() -> None:
    """Columnar files make the same clouds as EnergyFlow npz; schema 2 stores schema 1's jets as columns."""
    pre = Preprocessing.from_manifest(_manifest(), "shards/ef")
    pre.check_fits(_manifest(source="columnar"), "shards/root")
    pre.check_fits(_manifest(schema_version=1), "shards/old")
    pre.check_source("columnar", "new/*.root")
    pre.check_source("energyflow", "new/*.npz")
    columnar = Preprocessing.from_manifest(_manifest(source="columnar"), "shards/root")
    columnar.check_fits(_manifest(), "shards/ef")
    columnar.check_source("energyflow", "new/*.npz")


def test_raw_files_of_another_source_are_refused_naming_both() -> None:
    pre = Preprocessing.from_manifest(_manifest(), "shards/ef")
    with pytest.raises(PreprocessingMismatch) as err:
        pre.check_source("cms", "new/a.parquet")
    assert str(err.value) == "new/a.parquet: cms files, but the model was trained on energyflow (clouds from shards/ef)"
    nameless = Preprocessing.from_dict(pre.to_dict() | {"trained_on": ""})
    with pytest.raises(PreprocessingMismatch, match=r"\(clouds from another dataset\)$"):
        nameless.check_source("cms", "x")


def test_the_record_round_trips_through_json_and_ignores_fields_it_does_not_know() -> None:
    pre = Preprocessing.from_manifest(_manifest(), "shards/ef", "kinpid", vectors=True)
    doc = json.loads(json.dumps(pre.to_dict()))
    assert doc["feature_names"] == KIN_FEATURES + PID_FEATURES and isinstance(doc["jet_mean"], list)
    assert Preprocessing.from_dict(doc) == pre
    assert Preprocessing.from_dict(doc | {"added_by_a_newer_qgdist": 1}) == pre

"""What a resume refuses: another training config (the fingerprint's fields, named one by one) and another dataset
(both ids named), unless ``--allow-config-change``, which continues and says what changed."""

from __future__ import annotations

import pytest
import torch

from qgdist.core.errors import IncompatibleCheckpoint
from qgdist.data.identity import TrainedOn
from qgdist.data.preprocessing import Preprocessing
from qgdist.data.shards.manifest import Manifest
from qgdist.train.checkpoint import Checkpoint, check_dataset, check_fingerprint

WHERE = "runs/pn/checkpoints/step-000000120"
SAVED = {"model": "particlenet-lite", "lr": 0.001, "batch_size": 64, "hash": "aaaa"}


def test_a_changed_training_config_is_refused_naming_every_changed_field() -> None:
    now = {"model": "particlenet-lite", "lr": 0.002, "batch_size": 64, "seed": 3, "hash": "bbbb"}
    with pytest.raises(IncompatibleCheckpoint) as err:
        check_fingerprint(SAVED, now, WHERE)
    assert str(err.value) == (
        f"{WHERE} was written with a different training config, so it cannot be resumed exactly:\n"
        "  lr: checkpoint 0.001 != now 0.002\n"
        "  seed: checkpoint None != now 3\n"
        "Use another --run-name to start afresh, or --allow-config-change to resume anyway.")
    assert (err.value.file, err.value.field, err.value.expected, err.value.got) == (WHERE, "fingerprint", "aaaa",
                                                                                     "bbbb")


def test_an_allowed_config_change_resumes_and_lists_the_changes_in_name_order() -> None:
    now = {"model": "particlenet-lite", "lr": 0.002, "batch_size": 32, "hash": "bbbb"}
    assert check_fingerprint(SAVED, now, WHERE, allow=True) == ["batch_size: checkpoint 64 != now 32",
                                                                "lr: checkpoint 0.001 != now 0.002"]


def test_the_same_config_resumes_whatever_its_hash_field_says() -> None:
    """The hash summarises the other fields; only a field that differs is a change."""
    assert check_fingerprint(SAVED, SAVED | {"hash": "other"}, WHERE) == []
    assert check_fingerprint(SAVED, dict(SAVED), WHERE) == []


def _checkpoint(dataset: dict | None) -> Checkpoint:
    pre = Preprocessing(kind="cloud", source="energyflow", schema_version=2, preset="kin", max_particles=8,
                        jet_mean=(0.0, 0.0), jet_std=(1.0, 1.0), feature_names=("a",), feature_mean=(0.0,),
                        feature_std=(1.0,), label_convention="toy")
    return Checkpoint(model_name="particlenet-lite", model_config={}, weights={"w": torch.zeros(1)},
                      preprocessing=pre, config={}, fingerprint={}, dataset=dataset)


def _manifest(dataset_id: str) -> Manifest:
    return Manifest(source="energyflow", kind="cloud", dtype="float32", label_convention="toy", inputs=[],
                    split_fractions={"train": 0.8, "val": 0.1, "test": 0.1}, shards=[], rows={},
                    dataset_id=dataset_id)


TRAINED_ON = TrainedOn("aaaa", "shards/old", (0.8, 0.1, 0.1), {}).to_dict()


def test_a_resume_on_another_dataset_is_refused_naming_both() -> None:
    with pytest.raises(IncompatibleCheckpoint) as err:
        check_dataset(_checkpoint(TRAINED_ON), _manifest("bbbb"), "shards/new", WHERE)
    assert str(err.value).startswith(f"{WHERE} was trained on dataset aaaa (shards/old), but --data is dataset "
                                     "bbbb (shards/new): a resumed run would mix the two.")
    assert str(err.value).endswith(   # the two ways out, as the user types them
        " Use another --run-name to train on this dataset, or --allow-config-change to continue anyway.")
    assert (err.value.file, err.value.field, err.value.expected, err.value.got) == (WHERE, "data", "aaaa", "bbbb")


def test_an_allowed_dataset_change_continues_with_one_line_naming_both() -> None:
    line = check_dataset(_checkpoint(TRAINED_ON), _manifest("bbbb"), "shards/new", WHERE, allow=True)
    assert line == ("dataset changed since the checkpoint (allowed): dataset aaaa (shards/old) -> "
                    "dataset bbbb (shards/new)")


def test_a_dataset_converted_before_ids_is_named_as_such() -> None:
    with pytest.raises(IncompatibleCheckpoint, match=r"--data is dataset \(no id: converted by an older qgdist\) "
                                                     r"\(shards/new\)"):
        check_dataset(_checkpoint(TRAINED_ON), _manifest(""), "shards/new", WHERE)


def test_the_same_dataset_or_a_checkpoint_without_one_resumes_silently() -> None:
    assert check_dataset(_checkpoint(TRAINED_ON), _manifest("aaaa"), "elsewhere/same", WHERE) is None
    assert check_dataset(_checkpoint(None), _manifest("bbbb"), "shards/new", WHERE) is None

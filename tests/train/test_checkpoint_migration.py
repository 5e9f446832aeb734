"""Layout-1 checkpoints (the untyped dict qgdist wrote before the typed ``Checkpoint``) are migrated field by field
on load, or refused with the way out when they lack what the model would be rebuilt from."""

from __future__ import annotations

import io
import json

import pytest
import torch

from qgdist.core.errors import IncompatibleCheckpoint
from qgdist.data.preprocessing import Preprocessing
from qgdist.models import get_model, model_config
from qgdist.train.checkpoint import SCHEMA_VERSION, Checkpoint
from qgdist.train.checkpointer import load_checkpoint

KWARGS = {"conv_params": ((3, (8, 8)),), "fc_params": ((12, 0.1),)}   # in_features comes from the preset


def _pre(kind: str = "cloud") -> dict:
    return Preprocessing(kind=kind, source="energyflow", schema_version=2, preset="kin", max_particles=64,
                         jet_mean=(5.0, 20.0), jet_std=(0.5, 8.0), feature_names=("a", "b", "c", "d", "e"),
                         feature_mean=(0.0,) * 5, feature_std=(1.0,) * 5, label_convention="toy").to_dict()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model("particlenet-lite", in_features=5, **KWARGS)


def _layout_1(**changes) -> dict:
    """A model-only layout-1 dict (what ``artifacts/model.pt`` held), with ``changes`` applied."""
    old = {"model": _model().state_dict(), "epoch": 3, "step": 7, "global_step": 97,
           "fingerprint": {"model": "particlenet-lite", "model_kwargs": KWARGS, "lr": 0.01},
           "preprocessing": _pre()}
    return old | changes


def _load(doc: dict) -> Checkpoint:
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    return Checkpoint.from_bytes(buffer.getvalue(), "old/model.pt")


def test_a_layout_1_model_file_becomes_a_checkpoint_without_training_state() -> None:
    back = _load(_layout_1())
    assert back.schema == SCHEMA_VERSION and back.training is None
    assert (back.model_name, back.epoch, back.step, back.global_step) == ("particlenet-lite", 3, 7, 97)
    assert back.model_config == model_config(_model())   # in_features from the preset's 5 features
    assert back.fingerprint["lr"] == 0.01 and back.preprocessing == Preprocessing.from_dict(_pre())
    assert (back.config, back.metrics, back.history, back.mlflow_run_id) == ({}, {}, {}, "")
    assert all(torch.equal(back.weights[k], v) for k, v in _model().state_dict().items())


def test_the_last_validation_value_of_each_metric_becomes_the_checkpoints_metrics() -> None:
    history = {"val/auc": [[30, 0.7], [60, 0.8]], "val/loss": [[60, 0.5]], "train/loss": [[60, 0.4]],
               "val/acc": []}
    back = _load(_layout_1(history=history, mlflow_run_id=None, config='{"lr": 0.01}'))
    assert back.metrics == {"auc": 0.8, "loss": 0.5} and back.history == history
    assert back.mlflow_run_id == "" and back.config == {"lr": 0.01}
    assert _load(_layout_1(config={"lr": 0.02}, mlflow_run_id="abc")).config == {"lr": 0.02}
    assert _load(_layout_1(mlflow_run_id="abc")).mlflow_run_id == "abc"


def test_the_training_state_of_a_layout_1_checkpoint_is_kept_whole() -> None:
    loader = [{"epoch": 3, "step": 0, "world_size": 2}, {"epoch": 3, "step": 0, "world_size": 2}]
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 90, "total_steps": 300},
             "scaler": {"scale": 2.0}, "rng": [{"a": 1}, {"a": 2}], "loader": loader, "schedule_steps": 250,
             "buffers": [{"x": torch.ones(2)}, {}]}
    training = _load(_layout_1(**state)).training
    assert (training.optimizer, training.scheduler, training.scaler) == (state["optimizer"], state["scheduler"],
                                                                         {"scale": 2.0})
    assert (training.schedule_steps, training.rng, training.loader, training.world_size) == (250, state["rng"],
                                                                                              loader, 2)
    assert torch.equal(training.buffers[0]["x"], torch.ones(2)) and training.buffers[1] == {}
    # older still: no schedule length of its own (the scheduler's total) and no BatchNorm buffers
    del state["schedule_steps"], state["buffers"]
    training = _load(_layout_1(**state)).training
    assert training.schedule_steps == 300 and training.buffers == []
    state["scheduler"] = {"last_epoch": 90}
    assert _load(_layout_1(**state)).training.schedule_steps == 0


def test_an_image_models_layout_1_kwargs_get_no_particle_features() -> None:
    """Only cloud models take ``in_features`` from the preset; an image model's kwargs stay as saved."""
    model = get_model("seed-cnn")
    old = _layout_1(model=model.state_dict(), fingerprint={"model": "seed-cnn"}, preprocessing=_pre("image"))
    back = _load(old)
    assert back.model_config == model_config(model) and "in_features" not in back.model_config
    assert back.kind == "image"


@pytest.mark.parametrize("missing", ["fingerprint", "model name", "preprocessing"])
def test_a_layout_1_file_without_what_rebuilds_its_model_is_refused_with_the_way_out(missing: str) -> None:
    old = _layout_1()
    if missing == "fingerprint":
        del old["fingerprint"]
    elif missing == "model name":
        old["fingerprint"] = {"model_kwargs": KWARGS}
    else:
        old["preprocessing"] = {}
    with pytest.raises(IncompatibleCheckpoint) as err:
        _load(old)
    assert str(err.value) == ("old/model.pt: a layout-1 checkpoint without a fingerprint naming its model or a "
                              "preprocessing record cannot be read; resume the run once with this qgdist to write a "
                              "checkpoint of layout 2")
    assert err.value.file == "old/model.pt"


@pytest.mark.parametrize("doc", [[1, 2], {"schema": "2"}, {"schema": 0}])
def test_something_else_than_a_qgdist_checkpoint_is_refused_as_such(doc) -> None:
    with pytest.raises(IncompatibleCheckpoint, match="is not one this qgdist reads .*not a qgdist checkpoint") as err:
        _load(doc)
    assert (err.value.file, err.value.field, err.value.expected) == ("old/model.pt", "schema", SCHEMA_VERSION)


def test_the_model_card_describes_the_model_as_exported_metadata() -> None:
    """The ONNX file's metadata_props: enough to rebuild the model and its inputs, and how far it trained."""
    history = {"val/auc": [[60, 0.8]], "val/rej30": [[60, float("inf")]], "val/loss": [[60, float("nan")]]}
    back = _load(_layout_1(history=history))
    card = back.model_card()
    assert set(card) == {"qgdist.checkpoint_schema", "qgdist.model", "qgdist.model_config", "qgdist.preprocessing",
                         "qgdist.trained_steps", "qgdist.val_metrics"}
    assert all(isinstance(v, str) for v in card.values())
    assert (card["qgdist.checkpoint_schema"], card["qgdist.model"], card["qgdist.trained_steps"]) == \
        (str(SCHEMA_VERSION), "particlenet-lite", "97")
    assert json.loads(card["qgdist.model_config"]) == json.loads(json.dumps(model_config(_model())))
    assert Preprocessing.from_dict(json.loads(card["qgdist.preprocessing"])) == back.preprocessing
    assert json.loads(card["qgdist.val_metrics"]) == {"auc": 0.8}   # not-finite values left out: strict JSON


def test_loading_a_file_it_cannot_read_names_the_file(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"schema": 99}, path)
    with pytest.raises(IncompatibleCheckpoint) as err:
        load_checkpoint(path)
    assert err.value.file == str(path) and str(err.value).startswith(f"{path}: ")

"""The typed checkpoint: one dataclass saved as plain tensors and containers, the model rebuilt from its own stored
config, model.pt derived from it, and older layouts migrated or refused by name."""

from __future__ import annotations

import io

import pytest
import torch

from qgdist.core.errors import IncompatibleCheckpoint
from qgdist.data.preprocessing import Preprocessing
from qgdist.models import get_model, model_config
from qgdist.models.synthetic import cloud_batch
from qgdist.train.checkpoint import SCHEMA_VERSION, Checkpoint, TrainingState

#: A cloud model whose stored config differs from every registry default (so a rebuild from defaults would fail).
KWARGS = {"conv_params": ((3, (8, 8)),), "fc_params": ((12, 0.1),), "in_features": 7}


def _preprocessing() -> Preprocessing:
    return Preprocessing(kind="cloud", source="energyflow", schema_version=2, preset="kin", max_particles=64,
                         jet_mean=(5.0, 20.0), jet_std=(0.5, 8.0),
                         feature_names=("a", "b", "c", "d", "e", "f", "g"), feature_mean=(0.0,) * 7,
                         feature_std=(1.0,) * 7, label_convention="energyflow: y=1 quark")


def _trained() -> tuple[torch.nn.Module, Checkpoint]:
    torch.manual_seed(3)
    model = get_model("particlenet-lite", **KWARGS)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_var.uniform_(0.5, 2.0)
    optim = torch.optim.AdamW(model.parameters())
    training = TrainingState(optimizer=optim.state_dict(), scheduler={"last_epoch": 4}, scaler={},
                             schedule_steps=10, rng=[{"torch": torch.get_rng_state()}],
                             loader=[{"epoch": 1, "step": 2, "world_size": 1}], buffers=[{}])
    ckpt = Checkpoint(model_name="particlenet-lite", model_config=model_config(model), weights=model.state_dict(),
                      preprocessing=_preprocessing(), config={"model": {"model": "particlenet-lite"}},
                      fingerprint={"model": "particlenet-lite", "hash": "x"}, epoch=1, step=2, global_step=7,
                      metrics={"auc": 0.8}, history={"val/auc": [[5, 0.8]]}, mlflow_run_id="abc", training=training)
    return model.eval(), ckpt


def _logits(model: torch.nn.Module) -> torch.Tensor:
    inputs, _ = cloud_batch(6, in_features=7, max_particles=20)
    with torch.no_grad():
        return model(**inputs)


def test_saved_bytes_are_plain_torch_and_rebuild_the_same_model() -> None:
    model, ckpt = _trained()
    raw = torch.load(io.BytesIO(ckpt.to_bytes()), weights_only=True)   # stock torch, nothing unpickled as code
    assert raw["schema"] == SCHEMA_VERSION and raw["model_name"] == "particlenet-lite"
    assert raw["model_config"]["conv_params"] == ((3, (8, 8)),)
    back = Checkpoint.from_bytes(ckpt.to_bytes())
    assert back.preprocessing == ckpt.preprocessing and back.training.loader == ckpt.training.loader
    rebuilt = back.build_model()   # from the stored config: the registry's defaults would not fit these weights
    assert not rebuilt.training
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_model_file_is_the_checkpoint_without_training_state() -> None:
    model, ckpt = _trained()
    light = Checkpoint.from_bytes(ckpt.for_inference().to_bytes())
    assert light.training is None and light.global_step == 7 and light.metrics == {"auc": 0.8}
    assert torch.equal(_logits(light.build_model()), _logits(model))
    card = light.model_card()
    assert card["qgdist.model"] == "particlenet-lite" and '"max_particles": 64' in card["qgdist.preprocessing"]


def test_a_layout_1_checkpoint_loads() -> None:
    """The untyped dict the loop wrote before the typed checkpoint (no ``schema`` key) is migrated on load."""
    model, ckpt = _trained()
    kwargs = {k: v for k, v in KWARGS.items() if k != "in_features"}   # layout 1 took in_features from the preset
    old = {"model": model.state_dict(), "optimizer": ckpt.training.optimizer, "scheduler": {"last_epoch": 4},
           "scaler": {}, "rng": ckpt.training.rng, "buffers": [{}], "epoch": 1, "step": 2, "global_step": 7,
           "loader": ckpt.training.loader, "fingerprint": {"model": "particlenet-lite", "model_kwargs": kwargs},
           "preprocessing": _preprocessing().to_dict(), "schedule_steps": 10, "mlflow_run_id": "abc",
           "history": {"val/auc": [[5, 0.8]]}, "config": "{}"}
    buffer = io.BytesIO()
    torch.save(old, buffer)
    back = Checkpoint.from_bytes(buffer.getvalue(), "old/state.pt")
    assert back.schema == SCHEMA_VERSION and back.model_name == "particlenet-lite"
    assert back.model_config == model_config(model) and back.metrics == {"auc": 0.8}
    assert back.training.schedule_steps == 10 and back.training.world_size == 1
    assert torch.equal(_logits(back.build_model()), _logits(model))


def test_an_unknown_layout_is_refused_naming_both_versions() -> None:
    _, ckpt = _trained()
    doc = ckpt.state_dict() | {"schema": SCHEMA_VERSION + 7}
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    with pytest.raises(IncompatibleCheckpoint, match=rf"version {SCHEMA_VERSION + 7} .*writes version "
                                                     rf"{SCHEMA_VERSION}.*newer qgdist") as err:
        Checkpoint.from_bytes(buffer.getvalue(), "future/state.pt")
    assert err.value.got == SCHEMA_VERSION + 7 and err.value.file == "future/state.pt"

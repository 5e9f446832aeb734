"""Models: the CNN family (jet images), the EdgeConv GNN family and the Particle Transformer (particle clouds).

``get_model(name, **cfg)`` builds a model by registry name; ``cfg`` are the fields of the family's config
dataclass (e.g. ``in_features=13`` for a cloud model on the ``kinpid`` preset). Every model follows the batch
contract of docs/ARCHITECTURE.md: ``logits = model(**inputs)`` (B,) float32 and ``model.kind`` in {"image", "cloud"}.
Nothing here imports Ray: the models run on a GPU machine without it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import NamedTuple

import torch

from qgdist.core.errors import ConfigError


class Entry(NamedTuple):
    """A registered model: ``module.factory(**fields of module.config)`` builds it."""

    module: str
    factory: str
    config: str        # the family's config dataclass: the settings a user may pass (--model-arg)
    description: str

    @property
    def kind(self) -> str:
        return "image" if self.module == "qgdist.models.cnn" else "cloud"


_CNN, _PN, _PYG = "qgdist.models.cnn", "qgdist.models.particlenet", "qgdist.models.particlenet_pyg"
#: name -> how to build it; the module tells the kind (cnn: image, else cloud)
_REGISTRY: dict[str, Entry] = {
    "seed-cnn": Entry(_CNN, "seed_cnn", "SeedCNNConfig", "seed notebook's Keras CNN (baseline)"),
    "resnet15": Entry(_CNN, "resnet15", "ResNet15Config", "CMS E2E ResNet-15 with the E2E input transform"),
    "particlenet-lite": Entry(_PN, "particlenet_lite", "ParticleNetConfig", "ParticleNet-Lite, dense kNN/EdgeConv"),
    "particlenet": Entry(_PN, "particlenet", "ParticleNetConfig", "ParticleNet, dense kNN/EdgeConv"),
    "seed-particlenet-lite": Entry(_PN, "seed_particlenet_lite", "ParticleNetConfig",
                                   "seed notebook's Keras ParticleNet-Lite settings (baseline)"),
    "particlenet-lite-pyg": Entry(_PYG, "particlenet_lite_pyg", "ParticleNetConfig",
                                  "ParticleNet-Lite through torch_geometric.nn.EdgeConv"),
    "particlenet-pyg": Entry(_PYG, "particlenet_pyg", "ParticleNetConfig",
                             "ParticleNet through torch_geometric.nn.EdgeConv"),
    "particle-transformer": Entry("qgdist.models.part", "particle_transformer", "ParTConfig",
                                  "Particle Transformer (ParT), pair features; needs the batch's four-momenta"),
}


#: Inputs a model takes beyond the batch contract's (the loader adds them when the model's preprocessing asks).
_EXTRA_INPUTS: dict[str, tuple[str, ...]] = {"particle-transformer": ("vectors",)}


def extra_inputs(name: str) -> tuple[str, ...]:
    """Inputs model ``name`` needs beyond ``points``/``features``/``mask`` (clouds) or ``image``/``jet``."""
    return _EXTRA_INPUTS.get(name, ())


def list_models() -> dict[str, str]:
    """Registry names and a one-line description of each."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def _entry(name: str) -> Entry:
    if name not in _REGISTRY:
        raise ConfigError(f"model: unknown model {name!r}; choose from {sorted(_REGISTRY)}", field="model", got=name,
                          expected=sorted(_REGISTRY))
    return _REGISTRY[name]


def model_kind(name: str) -> str:
    """``"image"`` or ``"cloud"``: the inputs model ``name`` takes, known without building it."""
    return _entry(name).kind


def get_model(name: str, **cfg) -> torch.nn.Module:
    """Build the model registered as ``name`` with config fields ``cfg``; an unknown name or field raises
    ``ConfigError`` naming it."""
    entry = _entry(name)
    module = importlib.import_module(entry.module)
    known = {f.name for f in dataclasses.fields(getattr(module, entry.config))}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"model_kwargs: model {name!r} has no setting {', '.join(map(repr, unknown))}; it takes "
                          f"{sorted(known)}", field="model_kwargs", got=unknown, expected=sorted(known))
    return getattr(module, entry.factory)(**cfg)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_config(model: torch.nn.Module) -> dict:
    """The model's config dataclass as a plain dict (for logging and checkpoints)."""
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}

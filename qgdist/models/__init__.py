"""Models: the CNN family (jet images), the EdgeConv GNN family and the Particle Transformer (particle clouds).

``get_model(name, **cfg)`` builds a model by registry name; ``cfg`` are the fields of the family's config
dataclass (e.g. ``in_features=13`` for a cloud model on the ``kinpid`` preset). Every model follows the batch
contract of docs/ARCHITECTURE.md: ``logits = model(**inputs)`` (B,) float32 and ``model.kind`` in {"image", "cloud"}.
Nothing here imports Ray: the models run on a GPU machine without it.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

#: name -> (module, factory function, one-line description); the module tells the kind (cnn: image, else cloud)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "seed-cnn": ("qgdist.models.cnn", "seed_cnn", "seed notebook's Keras CNN (baseline)"),
    "resnet15": ("qgdist.models.cnn", "resnet15", "CMS E2E ResNet-15 with the E2E input transform"),
    "particlenet-lite": ("qgdist.models.particlenet", "particlenet_lite", "ParticleNet-Lite, dense kNN/EdgeConv"),
    "particlenet": ("qgdist.models.particlenet", "particlenet", "ParticleNet, dense kNN/EdgeConv"),
    "seed-particlenet-lite": ("qgdist.models.particlenet", "seed_particlenet_lite",
                              "seed notebook's Keras ParticleNet-Lite settings (baseline)"),
    "particlenet-lite-pyg": ("qgdist.models.particlenet_pyg", "particlenet_lite_pyg",
                             "ParticleNet-Lite through torch_geometric.nn.EdgeConv"),
    "particlenet-pyg": ("qgdist.models.particlenet_pyg", "particlenet_pyg",
                        "ParticleNet through torch_geometric.nn.EdgeConv"),
    "particle-transformer": ("qgdist.models.part", "particle_transformer",
                             "Particle Transformer (ParT), pair features; needs the batch's four-momenta"),
}


#: Inputs a model takes beyond the batch contract's (the loader adds them when the model's preprocessing asks).
_EXTRA_INPUTS: dict[str, tuple[str, ...]] = {"particle-transformer": ("vectors",)}


def extra_inputs(name: str) -> tuple[str, ...]:
    """Inputs model ``name`` needs beyond ``points``/``features``/``mask`` (clouds) or ``image``/``jet``."""
    return _EXTRA_INPUTS.get(name, ())


def list_models() -> dict[str, str]:
    """Registry names and a one-line description of each."""
    return {name: desc for name, (_, _, desc) in _REGISTRY.items()}


def model_kind(name: str) -> str:
    """``"image"`` or ``"cloud"``: the inputs model ``name`` takes, known without building it."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(_REGISTRY)}")
    return "image" if _REGISTRY[name][0] == "qgdist.models.cnn" else "cloud"


def get_model(name: str, **cfg) -> torch.nn.Module:
    """Build the model registered as ``name`` with config fields ``cfg``; unknown names or fields raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(_REGISTRY)}")
    module, factory, _ = _REGISTRY[name]
    try:
        return getattr(importlib.import_module(module), factory)(**cfg)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"model {name!r}: {err}") from None
        raise


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_config(model: torch.nn.Module) -> dict:
    """The model's config dataclass as a plain dict (for logging and checkpoints)."""
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
